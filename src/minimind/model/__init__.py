"""Qwen3-shaped decoder in native PyTorch (dense and MoE), KV cache and weight I/O."""

from minimind.model.kv_cache import KVCache
from minimind.model.masks import cache_attention_mask, document_causal_mask
from minimind.model.modeling import CausalLMOutput, MiniMindForCausalLM
from minimind.model.weights import (export_reference_pth, load_model, load_weights, read_config,
                                    read_state_dict, save_weights)

__all__ = ["KVCache", "CausalLMOutput", "MiniMindForCausalLM", "cache_attention_mask",
           "document_causal_mask", "export_reference_pth", "load_model", "load_weights",
           "read_config", "read_state_dict", "save_weights"]
