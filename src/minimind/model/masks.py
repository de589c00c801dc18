"""Which keys a query may see, in the form each attention kernel wants.

Every attention call of the model goes through :func:`minimind.model.attention.attend`, which takes
one of three mask kinds:

* ``None`` -- plain causal attention over the call's own tokens (SDPA ``is_causal``; flash on CUDA).
  Also what ``--attention causal`` trains with: the documents of a packed row are told apart only by
  their BOS/EOS tokens, the GPT-2 / nanochat way.
* a FlexAttention :class:`BlockMask` -- document-causal packed rows on CUDA: a token attends to
  earlier tokens of its own document, and blocks of the ``T x T`` grid that are fully masked are
  skipped instead of computed.
* a bool tensor ``[B, 1, T, S]`` (True = attend) -- inference over a KV cache (a query may see only
  the slots its own row has written), and document-causal rows on the CPU.  FlexAttention has no
  CPU backward in torch 2.13, and its compiled CPU forward measured slower than SDPA with this dense
  mask (83 vs 65 ms for 8 x 340 tokens, 8 heads, bf16), so the CPU keeps the dense mask.
"""

from __future__ import annotations

import functools

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # torch without FlexAttention: every document mask is dense
    BlockMask, create_block_mask = None, None  # type: ignore[assignment,misc]



def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Dense ``mask[b, 0, i, j] = doc[b, i] == doc[b, j] and j <= i`` for ``doc_ids [B, T]``."""
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return (same_doc & causal).unsqueeze(1)


def flex_available(device: torch.device) -> bool:
    """FlexAttention is used where it trains: CUDA (CPU has no backward, see the module docstring)."""
    return create_block_mask is not None and device.type == "cuda"


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The document-causal mask of ``doc_ids [B, T]`` as a FlexAttention block mask (no ``T x T``
    tensor is materialised: the mask is evaluated per 128 x 128 block by a compiled predicate)."""
    if create_block_mask is None:
        raise RuntimeError("this torch build has no torch.nn.attention.flex_attention")
    b, t = doc_ids.shape

    def same_doc_causal(batch, head, q_idx, kv_idx):
        return (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx]) & (kv_idx <= q_idx)

    # Built by a compiled create_block_mask on CUDA (eager it materialises the T x T predicate); inside
    # a graph that is already being compiled the plain function is traced into it instead.
    eager = torch.compiler.is_compiling() or doc_ids.device.type != "cuda"
    build = create_block_mask if eager else _compiled_create_block_mask()
    return build(same_doc_causal, b, None, t, t, device=doc_ids.device)


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask)


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor | BlockMask:
    """Document-causal mask for ``doc_ids [B, T]``: a block mask where FlexAttention trains (CUDA),
    the dense bool mask elsewhere."""
    if flex_available(doc_ids.device):
        return document_block_mask(doc_ids)
    return document_causal_mask(doc_ids)


def cache_attention_mask(position_ids: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Mask for queries at ``position_ids [B, T]`` over cache slots ``0..kv_len-1``.

    Each row's tokens sit at their own positions in the cache (no left padding), so a query at
    position p sees slots ``<= p``; slots beyond a row's length hold stale values and stay hidden.
    """
    slots = torch.arange(kv_len, device=position_ids.device)
    return (slots.view(1, 1, kv_len) <= position_ids.unsqueeze(-1)).unsqueeze(1)


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """``flex_attention`` compiled once per process (uncompiled it runs a slow reference loop)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)
