"""A pre-allocated KV cache of addressable slots, written in place.

Layout per layer: ``[S, n_kv_heads, max_len, head_dim]`` for keys (post-RoPE) and values, ``S`` slots.
A slot holds one sequence; its token at position ``p`` lives at index ``p``.  Sequences of different
lengths therefore need no left padding, RoPE positions are exact for every row, and decoding one
token is one ``index_put_`` per layer.

The model's forward only sees an object with :meth:`KVCache.update`.  Used directly, a cache maps
batch row ``b`` to slot ``b``; :meth:`KVCache.slots` returns a :class:`SlotView` that maps batch row
``b`` to any chosen slot, which is how the continuous-batching engine runs a step over the slots that
are busy.  A contiguous run of slots is addressed by a slice (a view, no copy); arbitrary slots by an
index tensor (keys are gathered), which the engine avoids by keeping its busy slots contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        self._layers = torch.arange(config.num_hidden_layers, device=device).view(-1, 1, 1)  # [L, 1, 1]

    @property
    def num_slots(self) -> int:
        return self.batch_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
               kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, kv_heads, T, d]`` at ``position_ids [B, T]``; return slots ``:kv_len``.

        ``kv_len=None`` means a causal prefill starting at position 0: the call's own T slots.
        Batch row ``b`` is slot ``b``.
        """
        return self.slots(slice(0, k.shape[0])).update(layer, k, v, position_ids, kv_len)

    def slots(self, slots: slice | Sequence[int] | torch.Tensor) -> SlotView:
        """A cache view whose batch row ``b`` is slot ``slots[b]``."""
        return SlotView(self, slots)

    def copy_slot(self, src: int, dst: Sequence[int] | slice, length: int) -> None:
        """Copy positions ``:length`` of slot ``src`` into the slots ``dst`` (e.g. a shared prompt)."""
        self.k[:, dst, :, :length] = self.k[:, src:src + 1, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src:src + 1, :, :length]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class SlotView:
    """Batch row ``b`` of a forward pass reads and writes slot ``slots[b]`` of ``cache``."""

    def __init__(self, cache: KVCache, slots: slice | Sequence[int] | torch.Tensor) -> None:
        self.cache = cache
        if isinstance(slots, slice):
            self._index: slice | torch.Tensor = slots
            n = len(range(*slots.indices(cache.batch_size)))
        else:
            idx = torch.as_tensor(slots, dtype=torch.long, device=cache.k.device).view(-1)
            n = idx.numel()
            # A run of consecutive slots is a plain slice: reads are views instead of gathers.
            first = int(idx[0]) if n else 0
            if n and torch.equal(idx, torch.arange(first, first + n, device=idx.device)):
                self._index = slice(first, first + n)
            else:
                self._index = idx
        self.n = n
        self._slots = (cache._rows[self._index] if isinstance(self._index, slice)
                       else self._index.unsqueeze(1))  # type: ignore[union-attr]  # [B, 1] slot of row b

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
               kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`KVCache.update`, for the view's slots."""
        if k.shape[0] != self.n:
            raise ValueError(f"batch of {k.shape[0]} rows for a view of {self.n} slots")
        c = self.cache
        slots = self._slots.expand_as(position_ids)
        layers = c._layers[layer].expand_as(position_ids)
        # Written on the whole cache tensor with index tensors only, never through a view of it: under
        # torch.compile a write through a view becomes a copy of the whole cache (per layer, per step).
        # Advanced indices around a slice put the indexed dims first: the target is [B, T, heads, d].
        c.k[layers, slots, :, position_ids] = k.transpose(1, 2).to(c.k.dtype)
        c.v[layers, slots, :, position_ids] = v.transpose(1, 2).to(c.v.dtype)
        kb, vb = c.k[layer], c.v[layer]
        n = kv_len if kv_len is not None else k.shape[2]
        if isinstance(self._index, slice):
            return kb[self._index, :, :n], vb[self._index, :, :n]
        return kb[:, :, :n].index_select(0, self._index), vb[:, :, :n].index_select(0, self._index)
