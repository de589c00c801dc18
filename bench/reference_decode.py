"""A stand-alone re-implementation of the reference MiniMind decoder and its ``generate()`` loop.

Why it exists: inference benchmarks need a baseline that behaves like the reference project does
when a user runs it, without installing that project or ``transformers``.  So this module rebuilds,
in plain PyTorch, the reference's dense model forward and its sampling loop with the same
per-step work, because on small models that per-step work (not FLOPs) decides the speed:

* the KV cache is a list of per-layer ``(k, v)`` tensors in ``[B, T, n_kv, head_dim]`` layout that
  grows by ``torch.cat`` every step (a copy of the whole cache per layer per token);
* keys and values are expanded to all query heads (``repeat_kv``) before attention;
* single-token decode steps and padded batches take a manual attention path
  (``q @ k^T / sqrt(d)``, a ``-inf`` upper triangle on the last ``T`` columns, an additive
  ``(1 - mask) * -1e9`` padding term, softmax in float32, ``@ v``); only an unpadded prefill uses
  SDPA with ``is_causal``; the "is the mask all ones?" test is a host sync per layer in prefill;
* RoPE tables are model buffers sliced at ``[start_pos : start_pos + T]`` (absolute positions, so a
  left-padded row's positions include its padding), and each forward checks ``cos[0, 0] == 0``;
* RMSNorm runs in float32 (weight multiplied in float32); q/k get a per-head RMSNorm before RoPE;
* prefill computes logits for every prompt position; sampling divides by the temperature, then
  applies top-k and top-p (sorted cumulative softmax ``> top_p`` shifted right by one) and draws
  with ``multinomial``; finished rows are forced to emit EOS and the loop stops when all are done.

Parameter names equal this project's :class:`minimind.model.MiniMindForCausalLM` (which equal HF
Qwen3), so ``ReferenceForCausalLM(cfg).load_state_dict(our_model.state_dict())`` works.  Only the
dense model is rebuilt; MoE layers are out of scope.  The module imports nothing from
``minimind`` so that it stays a faithful outside baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReferenceConfig:
    """The reference dense-model fields the forward pass reads (reference field names)."""

    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int | None = None
    vocab_size: int = 6400
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    flash_attn: bool = True

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = int(math.ceil(self.hidden_size * math.pi / 64) * 64)

    @classmethod
    def from_config(cls, config: Any) -> ReferenceConfig:
        """Copy the matching attributes of any config object (e.g. ``minimind.config.ModelConfig``).

        MoE configs are refused because only the dense forward is rebuilt here.
        """
        if getattr(config, "use_moe", False):
            raise ValueError("the reference re-implementation covers dense models only")
        if getattr(config, "rope_scaling", None) is not None:
            raise ValueError("the reference re-implementation does not rebuild YaRN rope scaling")
        kwargs = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**kwargs)


@dataclass
class ReferenceOutput:
    """What the reference causal-LM forward hands back (the fields ``generate`` uses)."""

    logits: torch.Tensor
    past_key_values: list[tuple[torch.Tensor, torch.Tensor] | None]
    hidden_states: torch.Tensor


class RefRMSNorm(nn.Module):
    """RMSNorm computed in float32 with the weight applied in float32, then cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).type_as(x)


def precompute_rope(head_dim: int, end: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[end, head_dim]`` in the half-split layout (no YaRN: dense baseline only)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs = torch.outer(torch.arange(end, dtype=torch.float32), inv_freq)
    cos = torch.cat([torch.cos(freqs), torch.cos(freqs)], dim=-1)
    sin = torch.cat([torch.sin(freqs), torch.sin(freqs)], dim=-1)
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``[B, T, heads, d]`` tensors with ``[T, d]`` tables broadcast over batch and heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_rot = (q * cos + rotate_half(q) * sin).to(q.dtype)
    k_rot = (k * cos + rotate_half(k) * sin).to(k.dtype)
    return q_rot, k_rot


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, T, n_kv, d] -> [B, T, n_kv * n_rep, d]`` by expand + reshape (a real copy)."""
    if n_rep == 1:
        return x
    b, t, n_kv, d = x.shape
    return x[:, :, :, None, :].expand(b, t, n_kv, n_rep, d).reshape(b, t, n_kv * n_rep, d)


class RefAttention(nn.Module):
    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RefRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RefRMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.flash = config.flash_attn and hasattr(F, "scaled_dot_product_attention")
        self.is_causal = True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past_key_value: tuple[torch.Tensor, torch.Tensor] | None, use_cache: bool,
                attention_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, cos, sin)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=1)
            v = torch.cat([past_key_value[1], v], dim=1)
        present = (k, v) if use_cache else None
        q = q.transpose(1, 2)
        k = repeat_kv(k, self.n_rep).transpose(1, 2)
        v = repeat_kv(v, self.n_rep).transpose(1, 2)
        # Same short-circuit order as the reference: the mask test (a host sync) only runs in prefill.
        if (self.flash and t > 1 and (not self.is_causal or past_key_value is None)
                and (attention_mask is None or torch.all(attention_mask == 1))):
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.is_causal)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if self.is_causal:
                causal = torch.triu(torch.full((t, t), float("-inf"), device=scores.device), diagonal=1)
                scores[:, :, :, -t:] += causal
            if attention_mask is not None:
                extended = attention_mask.unsqueeze(1).unsqueeze(2)
                scores = scores + (1.0 - extended) * -1e9
            probs = F.softmax(scores.float(), dim=-1).type_as(q)
            out = self.attn_dropout(probs) @ v
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.resid_dropout(self.o_proj(out)), present


class RefMLP(nn.Module):
    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RefBlock(nn.Module):
    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.self_attn = RefAttention(config)
        self.input_layernorm = RefRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RefRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = RefMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past_key_value: tuple[torch.Tensor, torch.Tensor] | None, use_cache: bool,
                attention_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        attn_out, present = self.self_attn(self.input_layernorm(x), cos, sin, past_key_value,
                                           use_cache, attention_mask)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class RefModel(nn.Module):
    """Embeddings, blocks, final norm and the RoPE buffers (non-persistent, cast by ``.to()``)."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(RefBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RefRMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = precompute_rope(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                use_cache: bool = False
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor] | None]]:
        t = input_ids.shape[1]
        past_key_values = past_key_values or [None] * len(self.layers)
        start_pos = past_key_values[0][0].shape[1] if past_key_values[0] is not None else 0
        h = self.dropout(self.embed_tokens(input_ids))
        # The reference re-derives zeroed tables (meta-device init) here; the test is a host sync.
        if self.freqs_cos[0, 0] == 0:
            cos, sin = precompute_rope(self.config.head_dim, self.config.max_position_embeddings,
                                       self.config.rope_theta)
            self.freqs_cos = cos.to(self.freqs_cos)
            self.freqs_sin = sin.to(self.freqs_sin)
        cos = self.freqs_cos[start_pos:start_pos + t]
        sin = self.freqs_sin[start_pos:start_pos + t]
        presents = []
        for layer, past in zip(self.layers, past_key_values):
            h, present = layer(h, cos, sin, past, use_cache, attention_mask)
            presents.append(present)
        return self.norm(h), presents


class ReferenceForCausalLM(nn.Module):
    """The reference causal LM: ``model.*`` decoder plus ``lm_head`` (tied to the embedding if set)."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.config = config
        self.model = RefModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.model.embed_tokens.weight = self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                use_cache: bool = False, logits_to_keep: int = 0) -> ReferenceOutput:
        hidden, presents = self.model(input_ids, attention_mask, past_key_values, use_cache)
        logits = self.lm_head(hidden[:, slice(-logits_to_keep, None), :])
        return ReferenceOutput(logits=logits, past_key_values=presents, hidden_states=hidden)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 8192, temperature: float = 0.85, top_p: float = 0.85,
                 top_k: int = 50, eos_token_id: int | None = 2, use_cache: bool = True,
                 num_return_sequences: int = 1, do_sample: bool = True,
                 repetition_penalty: float = 1.0) -> torch.Tensor:
        """The reference sampling loop; returns ``[B * n, prompt + generated]`` token ids.

        Every step feeds ``input_ids[:, past_len:]`` (the whole prompt first, then one token) with
        a mask that grows by a column of ones, so the prefill makes logits for all positions.
        ``eos_token_id=None`` disables the finished-row bookkeeping (and its per-step host sync).
        """
        input_ids = input_ids.repeat(num_return_sequences, 1)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat(num_return_sequences, 1)
        past_key_values = None
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            past_len = past_key_values[0][0].shape[1] if past_key_values else 0
            out = self.forward(input_ids[:, past_len:], attention_mask, past_key_values, use_cache)
            if attention_mask is not None:
                attention_mask = torch.cat(
                    [attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
            logits = out.logits[:, -1, :] / temperature
            if repetition_penalty != 1.0:
                for i in range(input_ids.shape[0]):
                    seen = torch.unique(input_ids[i])
                    picked = logits[i, seen]
                    logits[i, seen] = torch.where(picked > 0, picked / repetition_penalty,
                                                  picked * repetition_penalty)
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
                logits[logits < kth] = -float("inf")
            if top_p < 1.0:
                sorted_logits, sorted_idx = torch.sort(logits, descending=True)
                drop = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1) > top_p
                drop[..., 1:] = drop[..., :-1].clone()
                drop[..., 0] = False
                logits[drop.scatter(1, sorted_idx, drop)] = -float("inf")
            if do_sample:
                next_token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            else:
                next_token = torch.argmax(logits, dim=-1, keepdim=True)
            if eos_token_id is not None:
                next_token = torch.where(finished.unsqueeze(-1),
                                         next_token.new_full(next_token.shape, eos_token_id), next_token)
            input_ids = torch.cat([input_ids, next_token], dim=-1)
            past_key_values = out.past_key_values if use_cache else None
            if eos_token_id is not None:
                finished |= next_token.squeeze(-1).eq(eos_token_id)
                if finished.all():
                    break
        return input_ids
