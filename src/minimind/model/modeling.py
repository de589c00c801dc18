"""The MiniMind decoder: a Qwen3-shaped causal LM whose parameter names equal HF ``Qwen3ForCausalLM``
(dense) and ``Qwen3MoeForCausalLM`` (MoE), so export is a plain save and reference checkpoints load.

Block (pre-norm):  ``h = x + attn(norm1(x))``;  ``out = h + mlp(norm2(h))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minimind.config import ModelConfig
from minimind.model.attention import Attention
from minimind.model.kv_cache import KVCache, SlotView
from minimind.model.layers import RMSNorm, SwiGLU, rope_tables
from minimind.model.masks import BlockMask, document_attention_mask
from minimind.model.moe import MoEFeedForward


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    hidden_states: torch.Tensor


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else SwiGLU(
            config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: "torch.Tensor | BlockMask | None", position_ids: torch.Tensor,
                kv_cache: KVCache | SlotView | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, position_ids, kv_cache)
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        if isinstance(mlp_out, tuple):
            mlp_out, aux = mlp_out
            return x + mlp_out, aux
        return x + mlp_out, None


class MiniMindModel(nn.Module):
    """Embeddings, blocks and final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = rope_tables(config.head_dim, config.rope_theta, config.max_position_embeddings,
                               config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attn_mask: "torch.Tensor | BlockMask | None", kv_cache: KVCache | SlotView | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(self.embed_tokens(input_ids))
        cos = self.rope_cos[position_ids].unsqueeze(2).to(x.dtype)
        sin = self.rope_sin[position_ids].unsqueeze(2).to(x.dtype)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, aux = layer(x, cos, sin, attn_mask, position_ids, kv_cache)
            if aux is not None:
                aux_total = aux_total + aux
        return self.norm(x), aux_total


class MiniMindForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: "torch.Tensor | BlockMask | None" = None, doc_ids: torch.Tensor | None = None,
                kv_cache: KVCache | SlotView | None = None,
                logits_to_keep: int | torch.Tensor = 0) -> CausalLMOutput:
        """Run the decoder.

        * ``position_ids [B, T]``: default ``0..T-1``; packed rows restart them per document.
        * ``attn_mask [B, 1, T, S]`` bool, or ``doc_ids [B, T]`` for document-causal attention (a
          FlexAttention block mask on CUDA, a dense mask on the CPU: see :mod:`minimind.model.masks`),
          or neither for plain causal attention (SDPA ``is_causal``).
        * ``kv_cache``: keys/values are written at ``position_ids`` (see :class:`KVCache`).
        * ``logits_to_keep``: only the last n positions get logits (0 = all), e.g. 1 when decoding;
          or a ``[B]`` tensor of positions, one per row (the last prompt token of right-padded
          prompts), giving logits ``[B, 1, V]`` without projecting every position to the vocabulary.
        """
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if attn_mask is None and doc_ids is not None:
            attn_mask = document_attention_mask(doc_ids)
        hidden, aux = self.model(input_ids, position_ids, attn_mask, kv_cache)
        if isinstance(logits_to_keep, torch.Tensor):
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), logits_to_keep].unsqueeze(1)
        else:
            h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return CausalLMOutput(logits=self.lm_head(h), aux_loss=aux, hidden_states=hidden)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters (tied embedding counted once); ``active`` counts top-k experts only."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not (active and self.config.use_moe):
            return total
        per_expert = sum(p.numel() for layer in self.model.layers
                         for p in layer.mlp.experts[0].parameters())
        idle = self.config.num_experts - self.config.num_experts_per_tok
        return total - per_expert * idle

    def describe(self) -> str:
        """``Model Params: 63.91M`` or ``198.42M-A63.94M`` like the reference prints."""
        total = self.num_parameters() / 1e6
        if self.config.use_moe:
            return f"Model Params: {total:.2f}M-A{self.num_parameters(active=True) / 1e6:.2f}M"
        return f"Model Params: {total:.2f}M"
