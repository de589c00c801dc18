"""Load the model and tokenizer an evaluation runs on, from any of the forms a user has at hand.

``--model`` may be one of our weights files (``.safetensors`` with the config inside, or a reference
``.pth``), a reference-style stage name (``full_sft`` -> ``<save_dir>/full_sft_<H>.safetensors``,
resolved exactly as ``minimind chat`` resolves ``--weight``), or a Hugging Face folder written by
``minimind export hf`` (or a Qwen3 / MiniMind folder from the Hub).  The HF folder is read with
:func:`minimind.export.read_hf_folder` into our own model class, so every evaluation scores the same
forward pass whatever the weights came from.

Loading itself is :mod:`minimind.infer.loading`, shared with chat and the server.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind.model.modeling import MiniMindForCausalLM


@dataclass
class LoadedModel:
    """A model ready for evaluation: eval mode, on ``device``; ``dtype`` is the compute dtype."""

    model: MiniMindForCausalLM
    tokenizer: Any
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward passes (a no-op for float32)."""
        from minimind.train.device import autocast
        return autocast(self.device, self.dtype)


def load_eval_model(model: str | Path, tokenizer: str | Path | None = None, device: str = "auto",
                    dtype: str = "auto", save_dir: str | Path = "out", hidden_size: int = 0,
                    use_moe: int = -1, preset: str = "minimind-3") -> LoadedModel:
    """Model + tokenizer from ``--model`` / ``--tokenizer`` through the one inference loader
    (:func:`minimind.infer.loading.load_for_inference`), frozen, on ``device``, with the compute dtype.
    Raises ``FileNotFoundError`` or a one-line ``ValueError`` for anything that does not load."""
    from minimind.infer.loading import load_for_inference
    from minimind.train.device import pick_device, pick_dtype

    loaded = load_for_inference(model, tokenizer_path=tokenizer, save_dir=save_dir, hidden_size=hidden_size,
                                use_moe=use_moe, preset=preset)
    dev = pick_device(device)
    net = loaded.model.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=net, tokenizer=loaded.tokenizer, name=loaded.source.name, path=loaded.source,
                       device=dev, dtype=pick_dtype(dev, dtype))
