"""The RL objective as small functions: a policy term, an advantage, a KL term and an aggregation.

Why this shape: GRPO, Dr.GRPO, DAPO, BNPO, GSPO, CISPO, SPO and PPO differ only in

1. the **policy term** -- how the per-token surrogate turns an advantage into a loss
   (:func:`ppo_clip`, :func:`gspo`, :func:`cispo`, :func:`reinforce`);
2. the **advantage** -- how a scalar reward becomes a learning signal
   (:func:`group_advantages`, :func:`batch_normalized_advantages`, :func:`gae`, :class:`SPOBaseline`);
3. the **KL term** -- which estimator of KL(pi || pi_ref) is added, and with what weight
   (:func:`kl_penalty`);
4. the **aggregation** -- how per-token losses become one scalar (:func:`aggregate`).

Each published method is then one :class:`ObjectiveConfig` in :data:`LOSS_TYPES`, and every RL stage
calls the single :func:`policy_loss` (plus :func:`compute_advantages` for the advantage), so the
difference between two methods is a difference between two config rows, not between two trainers.

Conventions: per-token tensors are ``[B, T]`` (``B`` sampled completions, ``T`` positions);
``logp`` is the log-probability of the *sampled* token under the policy being trained (with
gradient), ``old_logp`` the same under the policy that generated the batch (no gradient);
``mask [B, T]`` (float or bool) marks completion tokens -- tokens the policy generated, not prompt,
padding or tool-output tokens; per-sequence tensors (rewards, advantages) are ``[B]`` and are
broadcast to every token of their sequence. Every policy term returns a per-token loss to be
*minimised* (the negated surrogate) and a dict of float statistics for logging.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "ObjectiveConfig",
    "SPOBaseline",
    "aggregate",
    "batch_normalized_advantages",
    "cispo",
    "compute_advantages",
    "gae",
    "group_advantages",
    "gspo",
    "kl_penalty",
    "mask_truncated",
    "policy_loss",
    "ppo_clip",
    "reinforce",
    "tempered_logps",
    "tis_weight",
]

PolicyKind = Literal["ppo", "gspo", "cispo", "reinforce"]
AdvantageKind = Literal["group", "group_mean", "batch", "gae", "spo"]
KLKind = Literal["none", "k1", "k2", "k3"]
AggregationKind = Literal["token_mean", "seq_mean", "constant"]


# ---- helpers -------------------------------------------------------------------------------------
def _per_token(adv: Tensor, like: Tensor) -> Tensor:
    """A ``[B]`` (per-sequence) advantage as ``[B, 1]`` so it broadcasts over tokens; ``[B, T]`` as is."""
    return adv.unsqueeze(-1) if adv.dim() == like.dim() - 1 else adv


def _masked_mean(x: Tensor, mask: Tensor | None) -> float:
    """Mean of ``x`` over the masked tokens (all tokens without a mask), as a float for logging."""
    x = x.detach().float()
    if mask is None:
        return x.mean().item() if x.numel() else 0.0
    m = mask.to(x.dtype)
    return ((x * m).sum() / m.sum().clamp(min=1.0)).item()


def tempered_logps(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(z / T)[target]`` per position, ``[B, T]`` fp32, 0 at ignored targets.

    Rollouts sample from ``softmax(z / T)``; the policy whose ratio, KL and gradient the objective
    computes must be that same distribution, or every update is biased (for ``T < 1`` the sampled
    tokens are more likely under the sampler than under ``softmax(z)``, and no importance weight
    sees it). So old, new and reference log-probs all divide the logits by the rollout ``T``.
    (Top-k / top-p truncate the sampler further; those log-probs are not of the truncated
    distribution, which is why RL rollouts leave both filters off.)
    """
    from minimind.train.losses import token_logps
    return token_logps(logits if temperature == 1.0 else logits.float() / temperature, targets)


# ---- policy terms --------------------------------------------------------------------------------
def ppo_clip(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
             delta: float | None = None, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017), with DAPO's clip-higher and optional dual clip.

    With the per-token ratio ``r = exp(logp - old_logp)``::

        loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)

    Clip-higher (DAPO, Yu et al. 2025) is ``eps_high > eps_low`` (0.2 / 0.28): low-probability
    tokens with a positive advantage may grow further before the clip stops them, which keeps
    entropy from collapsing. Dual clip (Ye et al. 2020) bounds the loss of a negative advantage,
    where a huge ratio would otherwise give an unbounded step: for ``A < 0`` the surrogate is
    ``max(min(r A, clip(r) A), delta * A)`` with ``delta > 1`` (typically 3), so the loss is at
    most ``-delta * A = delta * |A|``.

    ``adv`` is ``[B]`` or ``[B, T]``. Statistics (over ``mask`` when given): ``clip_frac`` -- the
    share of tokens where the clipped branch is taken and the gradient is therefore zero;
    ``dual_clip_frac``; ``ratio_mean``.
    """
    adv = _per_token(adv, logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    stats = {"clip_frac": _masked_mean((clipped < unclipped).float(), mask),
             "ratio_mean": _masked_mean(ratio, mask)}
    if delta is not None:
        if delta <= 1.0:
            raise ValueError(f"dual-clip delta must be > 1, got {delta}")
        floor = delta * adv
        dual = (adv < 0) & (surrogate < floor)
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, floor), surrogate)
        stats["dual_clip_frac"] = _masked_mean(dual.float(), mask)
    return -surrogate, stats


def gspo(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, eps_low: float = 3e-4,
         eps_high: float = 4e-4) -> tuple[Tensor, dict[str, float]]:
    """GSPO (Zheng et al. 2025): the PPO clip applied to a *sequence-level* importance ratio.

    The ratio of sequence ``i`` is the geometric mean of its token ratios::

        s_i = exp( (1 / |y_i|) * sum_t (logp_t - old_logp_t) )

    and the objective is ``min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)`` -- one
    importance weight and one clip decision per sequence, because the reward is per sequence and
    token-level ratios only add noise. The clip range is therefore much narrower (3e-4 / 4e-4 in
    the paper). Written per token ("GSPO-token"), each token carries::

        s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])

    whose value is ``s_i`` and whose gradient w.r.t. ``logp_t`` is ``s_i``; averaged over the
    sequence's tokens (``seq_mean`` aggregation) this reproduces the sequence-level gradient
    ``s_i * A_i * (1 / |y_i|) * sum_t grad logp_t`` exactly. ``adv`` is ``[B]`` (or ``[B, T]``,
    allowing per-token advantages as in the paper's GSPO-token).
    """
    m = mask.to(logp.dtype)
    lengths = m.sum(-1).clamp(min=1.0)
    seq_log_ratio = ((logp - old_logp) * m).sum(-1) / lengths  # [B]
    seq_ratio = torch.exp(seq_log_ratio).detach().unsqueeze(-1)  # sg[s_i], [B, 1]
    token_ratio = seq_ratio * torch.exp(logp - logp.detach())  # value s_i, gradient s_i
    adv = _per_token(adv, logp)
    unclipped = token_ratio * adv
    clipped = torch.clamp(token_ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    stats = {"clip_frac": _masked_mean((clipped < unclipped).float(), mask),
             "seq_ratio_mean": seq_ratio.mean().item()}
    return loss, stats


def cispo(logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float = 1.0, eps_high: float = 0.28,
          *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, 2025): clip the importance-sampling *weight*, never drop a token's gradient.

    ::

        loss = -sg[clip(r, 1 - eps_low, 1 + eps_high)] * A * logp,   r = exp(logp - old_logp)

    In PPO a clipped token contributes no gradient at all, and the rare "fork" tokens of a
    reasoning chain are exactly the ones with large ratios; CISPO keeps every token's REINFORCE
    gradient ``A * grad logp`` and only bounds its weight. The paper sets no effective lower bound
    (a large ``eps_low``; the default 1.0 clamps at 0, which a ratio never goes below) and tunes
    the upper one; ``eps_high = 0.28`` is this module's default, borrowed from DAPO's clip-higher.
    """
    adv = _per_token(adv, logp)
    ratio = torch.exp(logp - old_logp).detach()
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * adv * logp
    stats = {"clip_frac": _masked_mean((weight != ratio).float(), mask),
             "ratio_mean": _masked_mean(ratio, mask)}
    return loss, stats


def reinforce(logp: Tensor, adv: Tensor) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE (Williams 1992), the policy term of SPO: ``loss = -A * logp``.

    Its gradient ``-A * grad logp`` is also PPO's at ratio 1, i.e. on the first (or only) update
    of a batch; without a ratio there is no clip, so this suits strictly on-policy training.
    """
    return -_per_token(adv, logp) * logp, {}


# ---- advantages ----------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024): a z-score within each prompt's group.

    ``rewards [B]`` holds ``group_size`` consecutive samples of each prompt::

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        (scale=True, GRPO)
        A_i =  r_i - mean_g(r)                             (scale=False, Dr.GRPO, Liu et al. 2025)

    Dr.GRPO drops the division by the std because it up-weights prompts that are nearly always
    (or never) solved -- a difficulty bias. The std is the population std (divisor ``G``), so a
    group of one, or a group with equal rewards, gets advantage 0 rather than NaN.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B] with B a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, correction=0, keepdim=True) + eps)
    return centred.view(-1)


def batch_normalized_advantages(rewards: Tensor, eps: float = 1e-6, mask: Tensor | None = None) -> Tensor:
    """Batch-level normalisation: ``A = (r - mean_batch(r)) / (std_batch(r) + eps)``.

    REINFORCE++ (Hu 2025) normalises over the whole batch instead of per prompt group: the
    baseline is less local but the statistics come from many more samples, and a prompt whose
    samples all score alike still gets a (batch-relative) signal. BNPO (Xiao et al. 2025)
    normalises with a fitted Beta distribution; this plain batch z-score is the form used here.
    ``rewards`` is ``[B]``, or ``[B, T]`` with ``mask`` choosing the tokens the statistics (and
    the result, zero elsewhere) cover. The std is the population std.
    """
    r = rewards.float()
    if mask is None:
        return (r - r.mean()) / (r.std(correction=0) + eps)
    m = mask.to(r.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (r * m).sum() / n
    var = (((r - mean) * m) ** 2).sum() / n
    return (r - mean) / (var.sqrt() + eps) * m


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each sequence's masked tokens.

    With the steps of a sequence being its masked tokens ``t_1 < t_2 < ... < t_n``::

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last step is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}     (A after the last step is 0)
        R_t     = A_t + V_t                            (the value target)

    where ``t + 1`` means the next *masked* token: unmasked positions inside a completion (a tool's
    output in a multi-turn rollout) are skipped, not treated as steps, and everything after the last
    masked token is zero. Vectorised over the batch: one reverse loop over ``T`` that carries the
    next value and advantage through unmasked positions. Returns ``(advantages, returns)``, both
    ``[B, T]`` and zero outside the mask, without gradient.
    """
    rewards, values = rewards.detach().float(), values.detach().float()
    m = mask.to(rewards.dtype)
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)
    next_adv = rewards.new_zeros(B)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        mt = m[:, t]
        advantages[:, t] = adv_t * mt
        next_adv = mt * adv_t + (1.0 - mt) * next_adv
        next_value = mt * values[:, t] + (1.0 - mt) * next_value
    returns = (advantages + values) * m
    return advantages, returns


class SPOBaseline:
    """SPO's persistent per-prompt value tracker (Xu et al. 2025, Single-stream Policy Optimisation).

    SPO samples one completion per prompt (no group) and keeps, across steps, an estimate ``v(x)``
    of each prompt's success rate; the advantage is ``A = r - v(x)`` with the value from *before*
    this sample was seen (a sample must not be its own baseline), then normalised over the whole
    batch (:func:`batch_normalized_advantages`). The estimate is the mean of a discounted Beta
    posterior over a Bernoulli success rate::

        alpha(x) <- rho(x) * alpha(x) + r,    beta(x) <- rho(x) * beta(x) + (1 - r),
        v(x) = alpha(x) / (alpha(x) + beta(x))

    **KL-adaptive forgetting.** Old evidence is worth less the further the policy has moved since
    the prompt was last seen, so the discount depends on that drift ``D(x)``::

        rho(x) = clip(2 ** (-D(x) / kl_half), rho_min, rho_max)

    ``D(x)`` is measured on a global clock: the driver adds each step's policy KL
    (:meth:`advance`, the mean k3 KL between the policy before and after the step's updates on that
    step's tokens) and ``D(x)`` is the clock now minus the clock at the prompt's last visit. (The
    paper measures the KL per prompt; the global clock is the same quantity averaged over prompts,
    and needs no stored old policies.) ``rho_min == rho_max`` gives a fixed discount.

    **Prioritised sampling.** :meth:`priorities` weighs prompts by ``sqrt(v (1 - v)) + eps``, the
    standard deviation of their Bernoulli reward: prompts the policy always or never solves give
    no signal and are drawn rarely, uncertain ones often (an unseen prompt sits at the prior).

    An unseen prompt starts from ``alpha = prior_mean * prior_weight``, ``beta = (1 - prior_mean) *
    prior_weight``. Rewards are expected in ``[0, 1]``. Every update is a pure function of the
    (prompt, reward) sequence it is fed, so ranks that feed it the same all-gathered sequence hold
    identical trackers.
    """

    def __init__(self, discount: float | None = None, prior_mean: float = 0.5, prior_weight: float = 1.0,
                 *, rho_min: float = 0.875, rho_max: float = 0.96, kl_half: float = 0.06,
                 priority_eps: float = 0.05) -> None:
        if discount is not None:
            rho_min = rho_max = discount
        if not 0.0 < rho_min <= rho_max <= 1.0:
            raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got {rho_min}, {rho_max}")
        if not 0.0 <= prior_mean <= 1.0 or prior_weight <= 0.0 or kl_half <= 0.0 or priority_eps < 0.0:
            raise ValueError("need 0 <= prior_mean <= 1, prior_weight > 0, kl_half > 0, priority_eps >= 0")
        self.prior_mean, self.prior_weight = prior_mean, prior_weight
        self.rho_min, self.rho_max, self.kl_half, self.priority_eps = rho_min, rho_max, kl_half, priority_eps
        self.alpha: dict[Hashable, float] = {}
        self.beta: dict[Hashable, float] = {}
        self.seen_at: dict[Hashable, float] = {}
        self.clock = 0.0

    def value(self, prompt_id: Hashable) -> float:
        """The current success-rate estimate ``v(x)`` of one prompt (the prior mean when unseen)."""
        if prompt_id not in self.alpha:
            return self.prior_mean
        a, b = self.alpha[prompt_id], self.beta[prompt_id]
        return a / (a + b)

    def values(self, prompt_ids: list[Hashable]) -> Tensor:
        return torch.tensor([self.value(p) for p in prompt_ids], dtype=torch.float32)

    def rho(self, prompt_id: Hashable) -> float:
        """The discount of a prompt's old evidence: ``clip(2^(-D/kl_half), rho_min, rho_max)``."""
        drift = self.clock - self.seen_at.get(prompt_id, self.clock)
        return min(max(2.0 ** (-drift / self.kl_half), self.rho_min), self.rho_max)

    def update(self, prompt_id: Hashable, reward: float) -> None:
        """Fold one reward into the prompt's discounted Beta posterior."""
        a = self.alpha.get(prompt_id, self.prior_mean * self.prior_weight)
        b = self.beta.get(prompt_id, (1.0 - self.prior_mean) * self.prior_weight)
        rho = self.rho(prompt_id)
        self.alpha[prompt_id] = rho * a + reward
        self.beta[prompt_id] = rho * b + (1.0 - reward)
        self.seen_at[prompt_id] = self.clock

    def advance(self, kl: float) -> None:
        """Move the drift clock by one step's policy KL (negative estimates count as 0)."""
        self.clock += max(float(kl), 0.0)

    def priorities(self, prompt_ids: list[Hashable]) -> Tensor:
        """Sampling weights ``sqrt(v (1 - v)) + eps``: the reward's standard deviation under ``v``."""
        v = self.values(prompt_ids)
        return (v * (1.0 - v)).clamp(min=0.0).sqrt() + self.priority_eps

    def advantages(self, prompt_ids: list[Hashable], rewards: Tensor) -> Tensor:
        """``A_i = r_i - v(x_i)`` with the pre-update baselines, then update every ``v(x_i)``."""
        if len(prompt_ids) != rewards.numel():
            raise ValueError(f"{len(prompt_ids)} prompt ids for {rewards.numel()} rewards")
        base = self.values(prompt_ids)
        r = rewards.detach().float().reshape(-1).cpu()
        for p, ri in zip(prompt_ids, r.tolist()):
            self.update(p, ri)
        return (r - base).to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"prior_mean": self.prior_mean, "prior_weight": self.prior_weight, "rho_min": self.rho_min,
                "rho_max": self.rho_max, "kl_half": self.kl_half, "priority_eps": self.priority_eps,
                "clock": self.clock, "alpha": dict(self.alpha), "beta": dict(self.beta),
                "seen_at": dict(self.seen_at)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("prior_mean", "prior_weight", "rho_min", "rho_max", "kl_half", "priority_eps", "clock"):
            if key in state:
                setattr(self, key, float(state[key]))
        if "discount" in state and "rho_min" not in state:  # an older resume file: a fixed discount
            self.rho_min = self.rho_max = float(state["discount"])
        self.alpha = dict(state["alpha"])
        self.beta = dict(state["beta"])
        self.seen_at = dict(state.get("seen_at", {p: self.clock for p in self.alpha}))

    def __len__(self) -> int:
        return len(self.alpha)


# ---- KL ------------------------------------------------------------------------------------------
def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from a token ``x ~ pi`` (Schulman, "Approximating KL").

    With the log-ratio ``l = log pi_ref(x) - log pi(x)``::

        k1 = -l                    unbiased, high variance, negative for some samples
        k2 = l^2 / 2               biased but always >= 0, low variance
        k3 = exp(l) - 1 - l        unbiased (E_pi[exp(l)] = 1) and always >= 0: GRPO's choice

    ``kind="none"`` gives zeros. The gradient flows through ``logp`` (``ref_logp`` is detached).
    """
    if kind == "none":
        return torch.zeros_like(logp)
    log_ratio = ref_logp.detach() - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (none, k1, k2, k3)")


# ---- aggregation, masks, importance weights ------------------------------------------------------
def aggregate(loss: Tensor, mask: Tensor, mode: AggregationKind = "token_mean",
              max_tokens: int | None = None) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar over the masked tokens.

    * ``token_mean`` (DAPO): ``sum_i,t m * loss / sum_i,t m`` -- every token weighs the same, so
      long completions are not under-weighted (and long bad ones not under-penalised).
    * ``seq_mean`` (original GRPO): ``(1/B') sum_i (sum_t m * loss) / |y_i|`` -- each sequence
      weighs the same; ``B'`` counts the sequences with at least one masked token.
    * ``constant`` (Dr.GRPO): ``sum_i,t m * loss / (B * max_tokens)`` -- a fixed normaliser
      (``max_tokens`` defaults to ``T``), so no length enters the gradient scale at all.
    """
    m = mask.to(loss.dtype)
    total = loss * m
    if mode == "token_mean":
        return total.sum() / m.sum().clamp(min=1.0)
    if mode == "seq_mean":
        lengths = m.sum(-1)
        has = lengths > 0
        per_seq = total.sum(-1) / lengths.clamp(min=1.0)
        return per_seq[has].sum() / has.sum().clamp(min=1)
    if mode == "constant":
        denom = loss.shape[0] * (max_tokens if max_tokens is not None else loss.shape[-1])
        return total.sum() / denom
    raise ValueError(f"unknown aggregation {mode!r} (token_mean, seq_mean, constant)")


def mask_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """Drop completions that hit the length limit without stopping (DAPO's overlong filtering).

    A truncated completion's reward says nothing about its (unfinished) answer, so training on it
    is noise; ``truncated [B]`` bool zeroes those rows of ``mask [B, T]``.
    """
    return mask * (~truncated.bool()).unsqueeze(-1).to(mask.dtype)


def tis_weight(train_logp: Tensor, rollout_logp: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance sampling for the rollout / training mismatch (Yao et al. 2025).

    Rollouts come from an inference copy (bf16, different kernels) whose probabilities differ from
    the trainer's, so the batch is slightly off-policy even on the first update. Reweighting each
    token by ``min(pi_train(x) / pi_rollout(x), cap) = min(exp(train_logp - rollout_logp), cap)``
    corrects it; the cap bounds the variance. Detached: a weight, not a path for the gradient.
    """
    return torch.clamp(torch.exp(train_logp.detach() - rollout_logp.detach()), max=cap)


# ---- composition ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectiveConfig:
    """One RL method = policy term + advantage + KL term + aggregation (+ clip range, TIS, truncation).

    ``beta`` weighs the KL term (ignored when ``kl == "none"``); ``eps_low`` / ``eps_high`` are the
    clip range of ``ppo``/``gspo``/``cispo``; ``delta`` the dual clip of ``ppo``; ``tis_cap`` turns
    on truncated importance sampling against the rollout engine's log-probs; ``mask_truncated``
    drops completions cut off by the length limit.
    """

    policy: PolicyKind = "ppo"
    advantage: AdvantageKind = "group"
    kl: KLKind = "none"
    beta: float = 0.0
    aggregation: AggregationKind = "token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    tis_cap: float | None = None
    mask_truncated: bool = False

    def with_(self, **changes: Any) -> ObjectiveConfig:
        """A copy with some fields changed (``LOSS_TYPES["grpo"].with_(beta=0.0)``)."""
        return replace(self, **changes)


#: The published settings, by name:
#:
#: * ``grpo`` (DeepSeekMath, Shao et al. 2024): PPO clip 0.2 + group z-score + k3 KL (beta 0.04)
#:   + ``seq_mean``.
#: * ``dr_grpo`` (Liu et al. 2025, "GRPO done right"): group *mean-only* advantage (no std) +
#:   ``constant`` normaliser (no length); KL off.
#: * ``dapo`` (Yu et al. 2025): clip-higher 0.2 / 0.28 + group z-score + ``token_mean`` + no KL +
#:   truncated completions masked out (overlong filtering). DAPO's dynamic sampling (dropping groups
#:   whose rewards are all equal) and soft overlong punishment (:func:`minimind.rl.rewards.length_penalty`)
#:   belong to the sampler and the reward, not to this loss.
#: * ``bnpo``: PPO clip + batch-normalised advantages + ``token_mean``, no KL.
#: * ``gspo`` (Zheng et al. 2025): sequence-level ratio clipped at 3e-4 / 4e-4 + group z-score +
#:   ``seq_mean``, no KL.
#: * ``cispo`` (MiniMax-M1 2025): clipped, stop-gradient IS weight x logp + group z-score +
#:   ``token_mean``, no KL.
#: * ``spo`` (Xu et al. 2025): PPO clip + the persistent per-prompt baseline (:class:`SPOBaseline`),
#:   ``r - v(x)`` z-scored over the batch + ``token_mean``, no KL.
#: * ``ppo`` (Schulman et al. 2017; RLHF as in Ouyang et al. 2022): PPO clip 0.2 + GAE from a value
#:   model + ``token_mean``. The RLHF KL penalty belongs in the per-token reward before GAE
#:   (``rewards - beta * kl_penalty(logp, ref_logp, "k1")``), not in this loss, so ``kl`` is off.
LOSS_TYPES: dict[str, ObjectiveConfig] = {
    "grpo": ObjectiveConfig("ppo", "group", "k3", 0.04, "seq_mean"),
    "dr_grpo": ObjectiveConfig("ppo", "group_mean", "none", 0.0, "constant"),
    "dapo": ObjectiveConfig("ppo", "group", "none", 0.0, "token_mean", eps_low=0.2, eps_high=0.28,
                            mask_truncated=True),
    "bnpo": ObjectiveConfig("ppo", "batch", "none", 0.0, "token_mean"),
    "gspo": ObjectiveConfig("gspo", "group", "none", 0.0, "seq_mean", eps_low=3e-4, eps_high=4e-4),
    "cispo": ObjectiveConfig("cispo", "group", "none", 0.0, "token_mean", eps_low=1.0, eps_high=0.28),
    "spo": ObjectiveConfig("ppo", "spo", "none", 0.0, "token_mean"),
    "ppo": ObjectiveConfig("ppo", "gae", "none", 0.0, "token_mean"),
}


def compute_advantages(cfg: ObjectiveConfig, rewards: Tensor, *, group_size: int | None = None,
                       prompt_ids: list[Hashable] | None = None, baseline: SPOBaseline | None = None,
                       values: Tensor | None = None, mask: Tensor | None = None, gamma: float = 1.0,
                       lam: float = 0.95, eps: float = 1e-6) -> Tensor:
    """The advantage ``cfg.advantage`` names, from sequence rewards ``[B]``.

    ``group``/``group_mean`` need ``group_size``; ``spo`` needs ``prompt_ids`` and the persistent
    ``baseline`` (``r - v(x)``, then z-scored over the batch as the SPO paper does); ``gae`` needs
    ``values`` and ``mask`` ``[B, T]`` and takes ``rewards`` either per token ``[B, T]`` or per
    sequence ``[B]`` (then placed on each sequence's last masked token).
    Returns ``[B]`` (``[B, T]`` for ``gae``).
    """
    kind = cfg.advantage
    if kind in ("group", "group_mean"):
        if group_size is None:
            raise ValueError(f"advantage {kind!r} needs group_size")
        return group_advantages(rewards, group_size, scale=kind == "group", eps=eps)
    if kind == "batch":
        return batch_normalized_advantages(rewards, eps)
    if kind == "spo":
        if baseline is None or prompt_ids is None:
            raise ValueError("advantage 'spo' needs prompt_ids and an SPOBaseline")
        return batch_normalized_advantages(baseline.advantages(prompt_ids, rewards), eps)
    if kind == "gae":
        if values is None or mask is None:
            raise ValueError("advantage 'gae' needs values and mask [B, T]")
        if rewards.dim() == 1:
            m = mask.to(torch.float32)
            positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
            last = torch.where(m > 0, positions, torch.full_like(positions, -1)).max(-1).values
            token_rewards = torch.zeros_like(m)
            rows = torch.nonzero(last >= 0).squeeze(-1)
            token_rewards[rows, last[rows]] = rewards.float()[rows]
            rewards = token_rewards
        return gae(rewards, values, mask, gamma, lam)[0]
    raise ValueError(f"unknown advantage {kind!r}")


def policy_loss(cfg: ObjectiveConfig, logp: Tensor, old_logp: Tensor | None, adv: Tensor, mask: Tensor,
                ref_logp: Tensor | None = None, rollout_logp: Tensor | None = None,
                max_tokens: int | None = None, truncated: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss every RL stage minimises: ``aggregate(w_tis * policy_term(A) + beta * KL)``.

    ``old_logp=None`` means on-policy (one update per batch): ``old_logp = logp.detach()``, ratio 1.
    ``ref_logp`` is needed when ``cfg.kl != "none"``; ``rollout_logp`` (the inference engine's
    log-probs) turns on TIS when ``cfg.tis_cap`` is set, weighting the policy term by
    :func:`tis_weight` of ``old_logp`` (the trainer's probabilities of the same tokens) against it;
    ``truncated [B]`` drops cut-off completions when ``cfg.mask_truncated``. Returns the scalar
    loss and float statistics (the policy term's, ``kl``, ``tis_mean``, ``policy_loss``).
    """
    if old_logp is None:
        old_logp = logp.detach()
    mask = mask.to(logp.dtype)
    if cfg.mask_truncated and truncated is not None:
        mask = mask_truncated(mask, truncated)

    # 1. policy term (the advantage is already computed: compute_advantages)
    if cfg.policy == "ppo":
        per_token, stats = ppo_clip(logp, old_logp, adv, cfg.eps_low, cfg.eps_high, cfg.delta, mask=mask)
    elif cfg.policy == "gspo":
        per_token, stats = gspo(logp, old_logp, adv, mask, cfg.eps_low, cfg.eps_high)
    elif cfg.policy == "cispo":
        per_token, stats = cispo(logp, old_logp, adv, cfg.eps_low, cfg.eps_high, mask=mask)
    elif cfg.policy == "reinforce":
        per_token, stats = reinforce(logp, adv)
    else:
        raise ValueError(f"unknown policy term {cfg.policy!r}")

    # 2. rollout/training mismatch correction
    if cfg.tis_cap is not None and rollout_logp is not None:
        weight = tis_weight(old_logp, rollout_logp, cfg.tis_cap)
        per_token = per_token * weight
        stats["tis_mean"] = _masked_mean(weight, mask)
    stats["policy_loss"] = aggregate(per_token.detach(), mask, cfg.aggregation, max_tokens).item()

    # 3. KL term
    if cfg.kl != "none" and cfg.beta != 0.0:
        if ref_logp is None:
            raise ValueError(f"KL estimator {cfg.kl!r} needs ref_logp")
        kl = kl_penalty(logp, ref_logp, cfg.kl)
        per_token = per_token + cfg.beta * kl
        stats["kl"] = _masked_mean(kl, mask)

    # 4. aggregation
    return aggregate(per_token, mask, cfg.aggregation, max_tokens), stats
