"""Model + tokenizer for inference from whatever a user points at; one loader for chat, serve and eval.

``weight`` may be one of our weights files (``.safetensors`` with the config in its metadata, or a
reference ``.pth`` with or without its sidecar), a reference-style stage name (``full_sft`` ->
``<save_dir>/full_sft_<H>[_moe].safetensors``, then ``.pth``), or a Hugging Face folder (``minimind
export hf`` output, or a Qwen3 / MiniMind folder), read into our own model class so every command
runs the same forward pass whatever the weights came from.  The tokenizer is the explicit folder,
else the HF folder's own, else the first of: beside the weights, ``<dir>/tokenizer``,
``out/tokenizer``, ``model/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind.model.modeling import MiniMindForCausalLM


@dataclass
class LoadedModel:
    model: MiniMindForCausalLM  # eval mode, on the CPU
    tokenizer: Any
    source: Path  # the resolved weights file or HF folder
    lora: Path | None = None  # the adapter applied, if any

    @property
    def name(self) -> str:
        return self.source.name if self.source.is_dir() else self.source.stem


def no_lora(value: str | None) -> bool:
    """The reference passes ``--lora_weight None`` for "no adapter"."""
    return not value or value.strip().lower() == "none"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def find_tokenizer_dir(explicit: str | Path | None, weight: Path) -> Path:
    """The first folder holding ``tokenizer.json`` (see the module docstring for the order)."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        base = weight if weight.is_dir() else weight.parent
        candidates = [base, base / "tokenizer", Path("out/tokenizer"), Path("model")]
    for c in candidates:
        if (c / "tokenizer.json").is_file():
            return c
        if c.is_file() and c.name == "tokenizer.json":
            return c.parent
    raise FileNotFoundError("no tokenizer.json found in " + ", ".join(map(str, candidates))
                            + "; pass --tokenizer_path")


def load_for_inference(weight: str | Path, *, tokenizer_path: str | Path | None = None,
                       save_dir: str | Path = "out", lora_weight: str | None = None, hidden_size: int = 0,
                       use_moe: int = -1, num_hidden_layers: int = 0, preset: str = "minimind-3",
                       yarn: bool = False) -> LoadedModel:
    """Load weights (+ optional LoRA adapter) and tokenizer; see the module docstring.

    ``hidden_size`` / ``use_moe`` pick a stage name's file (``_<H>[_moe]``) and, with
    ``num_hidden_layers``, override the shape of a bare ``.pth``.  Errors are one line:
    ``FileNotFoundError`` or ``ValueError``.
    """
    from minimind.infer.yarn import enable_yarn
    from minimind.model import load_model, load_weights
    from minimind.model.weights import resolve_weight_path
    from minimind.tokenizer import MiniMindTokenizer

    if not str(weight):
        raise ValueError("a model is required: a .safetensors / reference .pth weights file, a stage "
                         "name such as full_sft, or a Hugging Face folder")
    source = Path(weight)
    if is_hf_folder(source):
        from minimind.export.hf import read_hf_folder
        config, state = read_hf_folder(source)
        model = MiniMindForCausalLM(config)
        load_weights(model, state)
    else:
        source = resolve_weight_path(str(weight), save_dir, hidden_size, use_moe)
        overrides = {"hidden_size": hidden_size or None, "num_hidden_layers": num_hidden_layers or None,
                     "use_moe": None if use_moe < 0 else bool(use_moe)}
        model = load_model(source, preset=preset, overrides=overrides)
    lora = None
    if not no_lora(lora_weight):
        from minimind.model.lora import load_lora
        cfg = model.config
        lora = resolve_weight_path(str(lora_weight), save_dir, cfg.hidden_size, int(cfg.use_moe))
        load_lora(model, lora)
    tokenizer = MiniMindTokenizer.from_dir(find_tokenizer_dir(tokenizer_path, source))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}: wrong --tokenizer_path?")
    if yarn:
        enable_yarn(model)
    return LoadedModel(model.eval(), tokenizer, source, lora)
