"""Switch a loaded model to YaRN RoPE for contexts longer than it was trained on.

The reference exposes this as ``--inference_rope_scaling``: the same weights, but the rotary tables
are rebuilt with YaRN (frequencies of the low-frequency dimensions divided by ``factor``), and the
position table extended to ``original_max_position_embeddings * factor`` (2048 * 16 = 32768).
Because the tables are non-persistent buffers, the switch is a recomputation, not a reload.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from minimind.config import REFERENCE_YARN
from minimind.model.layers import rope_tables
from minimind.model.modeling import MiniMindForCausalLM


def enable_yarn(model: MiniMindForCausalLM, max_position_embeddings: int | None = None,
                rope_scaling: dict[str, Any] | None = None) -> MiniMindForCausalLM:
    """Rebuild ``model.model.rope_cos/rope_sin`` with YaRN and return the (same) model.

    ``rope_scaling`` defaults to the reference settings (:data:`minimind.config.REFERENCE_YARN`);
    the new table length defaults to ``max(current, original * factor)`` so that enabling YaRN on a
    reference config (32768 positions, original 2048, factor 16) gives exactly the reference's
    ``inference_rope_scaling=True`` tables.  The config is replaced by an updated copy (shared
    config objects elsewhere are left alone).
    """
    scaling = dict(rope_scaling if rope_scaling is not None else REFERENCE_YARN)
    config = model.config
    if max_position_embeddings is None:
        orig = int(scaling.get("original_max_position_embeddings", 2048))
        max_position_embeddings = max(config.max_position_embeddings,
                                      int(orig * float(scaling.get("factor", 16.0))))
    if max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be positive, got {max_position_embeddings}")
    new_config = dataclasses.replace(config, rope_scaling=scaling, inference_rope_scaling=True,
                                     max_position_embeddings=int(max_position_embeddings))
    cos, sin = rope_tables(new_config.head_dim, new_config.rope_theta,
                           new_config.max_position_embeddings, new_config.rope_scaling)
    inner = model.model
    # Assigning to a registered buffer name keeps it a (non-persistent) buffer.
    inner.rope_cos = cos.to(device=inner.rope_cos.device, dtype=inner.rope_cos.dtype)
    inner.rope_sin = sin.to(device=inner.rope_sin.device, dtype=inner.rope_sin.dtype)
    model.config = new_config
    inner.config = new_config
    return model
