"""A pre-allocated KV cache written in place.

Layout per layer: ``[B, n_kv_heads, max_len, head_dim]`` for keys (post-RoPE) and values.  Row ``b``
writes its token at position ``p`` into slot ``p``: rows of different lengths need no left padding,
so positions (and RoPE) are exact for every row, and decode is one ``index_put_`` per layer.
"""

from __future__ import annotations

import torch

from minimind.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self._rows = torch.arange(batch_size, device=device).unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
               kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, kv_heads, T, d]`` at ``position_ids [B, T]``; return slots ``:kv_len``.

        ``kv_len=None`` means a causal prefill starting at position 0: the call's own T slots.
        """
        rows = self._rows[: k.shape[0]].expand_as(position_ids)
        self._write(self.k[layer], rows, position_ids, k)
        self._write(self.v[layer], rows, position_ids, v)
        n = kv_len if kv_len is not None else k.shape[2]
        return self.k[layer][: k.shape[0], :, :n], self.v[layer][: k.shape[0], :, :n]

    @staticmethod
    def _write(buf: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> None:
        # Advanced indices around a slice put the indexed dims first: target is [B, T, heads, d].
        buf[rows, :, pos] = x.transpose(1, 2).to(buf.dtype)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
