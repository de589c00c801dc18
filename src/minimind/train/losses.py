"""Loss functions of the preference (DPO) and distillation stages, as pure tensor functions.

No model, no loop: each function maps logits / log-probabilities to a loss, so the stages stay thin
and every formula is tested against a hand computation.  Everything is computed in fp32 whatever
the dtype of the logits (bf16 log-probabilities summed over hundreds of tokens lose the small
differences DPO is made of).

Target convention (as :class:`minimind.data.Batch`): ``targets[b, t]`` is the token predicted at
position ``t`` or ``IGNORE_INDEX`` (-100) where nothing is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minimind.data.batch import IGNORE_INDEX

__all__ = ["token_nll", "token_logps", "sequence_logps", "DPO_LOSS_TYPES", "dpo_loss", "distill_loss"]

#: Supported DPO objectives (see :func:`dpo_loss`).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


#: Elements of one fp32 logits chunk (64 MiB): bounds the fp32 memory of :func:`token_nll`.
CHUNK_ELEMENTS = 1 << 24


class _ChunkedNLL(torch.autograd.Function):
    """``nll_i = logsumexp(z_i) - z_i[y_i]`` (0 where ``y_i`` is ignored) for logits ``z [N, V]``,
    computed ``rows`` at a time in fp32.

    Backward: ``d nll_i / d z_i = softmax(z_i) - onehot(y_i)``, recomputed per chunk from the saved
    logits (in their own dtype) and the fp32 ``logsumexp`` ``[N]``; the gradient is written in the
    logits' dtype.  So neither pass ever holds fp32 ``[N, V]``: autograd through ``z.float()`` and
    ``F.cross_entropy`` would keep the fp32 copy (and its log-softmax) alive until backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, rows: int) -> Tensor:
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lse = torch.cat([torch.logsumexp(logits[s:s + rows].float(), dim=-1)
                         for s in range(0, logits.shape[0], rows)])
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.rows = rows
        return torch.where(valid, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_nll: Tensor) -> tuple[Tensor, None, None]:
        logits, safe, valid, lse = ctx.saved_tensors
        rows = ctx.rows
        scale = torch.where(valid, grad_nll, torch.zeros_like(grad_nll)).unsqueeze(1)
        parts = []
        for s in range(0, logits.shape[0], rows):
            probs = torch.exp(logits[s:s + rows].float() - lse[s:s + rows].unsqueeze(1))
            probs = probs.scatter_add(1, safe[s:s + rows].unsqueeze(1),
                                      -torch.ones_like(probs[:, :1]))  # softmax - onehot
            parts.append((probs * scale[s:s + rows]).to(logits.dtype))
        return torch.cat(parts), None, None


def token_nll(logits: Tensor, targets: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Per-position cross-entropy ``-log p(target)``, fp32 with the shape of ``targets``, 0 where
    ``target == IGNORE_INDEX``; equal to ``F.cross_entropy(logits.float(), targets, reduction='none')``
    in value and gradient, but the fp32 softmax lives only ``chunk_elements / V`` rows at a time
    (see :class:`_ChunkedNLL`).  No host sync: usable inside ``torch.compile(fullgraph=True)``."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    vocab = logits.shape[-1]
    rows = max(1, chunk_elements // vocab)
    nll = _ChunkedNLL.apply(logits.reshape(-1, vocab), targets.reshape(-1), rows)
    return nll.view(targets.shape)


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log p(target)`` per position, ``[B, T]`` fp32, 0 where ``target == IGNORE_INDEX``.

    ``log p(y) = -CE(logits, y)``, computed by :func:`token_nll` in fp32 chunks, so no full
    ``[B, T, V]`` fp32 tensor is ever held, neither for the caller nor for the backward pass.
    """
    return -token_nll(logits, targets)


def sequence_logps(logits: Tensor, targets: Tensor, seq_index: Tensor, n_seq: int) -> Tensor:
    """Sum of token log-probabilities per sequence, ``[n_seq]`` fp32.

    ``log p(sequence) = sum_t log p(y_t)`` over the sequence's trained positions (a *sum*, not a
    mean, as in the DPO paper and the reference).  Several sequences may share a packed row, so
    ``seq_index`` ``[B, T]`` (long) names the sequence of each position, ``-1`` for none (padding);
    positions with target ``IGNORE_INDEX`` contribute 0.  Sequences without any trained token get 0.
    Indices must be ``< n_seq`` (not checked here: that would force a device sync).
    """
    if seq_index.shape != targets.shape:
        raise ValueError(f"seq_index {tuple(seq_index.shape)} does not match targets "
                         f"{tuple(targets.shape)}")
    tok = token_logps(logits, targets)
    valid = seq_index >= 0
    idx = torch.where(valid, seq_index, torch.zeros_like(seq_index)).reshape(-1)
    vals = torch.where(valid, tok, torch.zeros_like(tok)).reshape(-1)
    return tok.new_zeros(n_seq).index_add(0, idx, vals)


def sequence_token_counts(targets: Tensor, seq_index: Tensor, n_seq: int) -> Tensor:
    """Number of trained positions (target != IGNORE_INDEX) per sequence, ``[n_seq]`` fp32 --
    the denominators that turn :func:`sequence_logps` sums into per-token means."""
    valid = (seq_index >= 0) & (targets != IGNORE_INDEX)
    idx = torch.where(valid, seq_index, torch.zeros_like(seq_index)).reshape(-1)
    return torch.zeros(n_seq, dtype=torch.float32, device=targets.device).index_add(
        0, idx, valid.reshape(-1).float())


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float,
             loss_type: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss from sequence log-probabilities (sums), all ``[P]``.

    With the implicit reward margin ``h = (pi_c - pi_r) - (ref_c - ref_r)``:

    * ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * h)``  (the reference's loss);
    * ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 * beta))^2`` -- regresses the margin to a fixed
      target instead of pushing it to infinity, which resists over-fitting deterministic prefs;
    * ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta * h)``.

    Returns ``(losses, chosen_rewards, rejected_rewards)`` where the rewards
    ``beta * (pi - ref)`` are detached (for logging: accuracy = chosen > rejected, margins).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    pi_c, pi_r = policy_chosen.float(), policy_rejected.float()
    ref_c, ref_r = ref_chosen.float(), ref_rejected.float()
    h = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * h)
    chosen_rewards = (beta * (pi_c - ref_c)).detach()
    rejected_rewards = (beta * (pi_r - ref_r)).detach()
    return losses, chosen_rewards, rejected_rewards


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float,
                 temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """White-box knowledge distillation (Hinton et al. 2015) over the trained positions.

    ``loss = alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)``
    with ``p^T = softmax(logits / T)``.  Both terms are averaged over the positions with
    ``targets != IGNORE_INDEX`` (the KL is summed over the vocabulary per token, i.e. the
    reference's ``kl_div(reduction='batchmean')`` over the selected rows).  The ``T^2`` factor keeps
    the soft-target gradients on the scale of the hard-target ones as ``T`` grows.

    Teacher logits over a larger vocabulary are cut to the student's (the extra ids are never
    targets); a smaller teacher vocabulary is an error.  The teacher is treated as frozen (its
    logits are detached).  Computed in fp32; no trained position gives a zero loss (not NaN) that
    still back-propagates (zero gradients).  Returns ``(loss, ce, kl)`` with ``ce``/``kl``
    detached and ``kl`` *without* the ``T^2`` factor.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[:-1] != targets.shape or teacher_logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} / {tuple(teacher_logits.shape)} "
                         f"do not match targets {tuple(targets.shape)}")
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] < vocab:
        raise ValueError(f"teacher vocab ({teacher_logits.shape[-1]}) is smaller than the "
                         f"student's ({vocab})")
    sel = targets != IGNORE_INDEX
    # Select rows before the fp32 cast: only trained positions are ever materialised in fp32.
    s = student_logits[sel].float()
    t = teacher_logits.detach()[sel][:, :vocab].float()
    n = sel.sum().clamp(min=1)
    ce = F.cross_entropy(s, targets[sel], reduction="sum") / n
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / n
    loss = alpha * ce + (1.0 - alpha) * temperature ** 2 * kl
    return loss, ce.detach(), kl.detach()
