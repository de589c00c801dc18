"""Loss by position on long sequences, with plain RoPE and with YaRN: does the context extend?

A model trained on ``T``-token rows has only ever seen RoPE angles of positions ``< T``.  Past
that, plain RoPE extrapolates and the loss typically climbs; YaRN
(:func:`minimind.infer.yarn.enable_yarn`) slows the low-frequency rotary dimensions down by
``factor`` so that the far positions' angles stay in the trained range.  This module measures both
on the same tokens:

* sequences of ``length`` tokens are cut from held-out text (:func:`long_sequences`): the
  documents of a pretrain JSONL file laid end to end as pretraining lays them out
  (``<|im_start|> doc <|im_end|>``), or one long text file;
* the per-position loss is ``nll[t] = mean over sequences of -log p(x_t | x_<t)`` for every
  target position ``t = 1 .. length-1`` (:func:`position_nll`), once on a copy of the model with
  plain RoPE tables covering ``length`` positions and once on a copy with YaRN;
* positions are grouped into contiguous buckets (:func:`bucket_edges`, every position in exactly
  one bucket) and each bucket reports the mean of its positions' ``nll``; the plot draws the whole
  curves.

YaRN as implemented in :func:`minimind.model.layers.rope_inv_freq` rescales the frequencies only
when the rotary table is longer than ``original_max_position_embeddings``, and then for *every*
position (it changes frequencies, not a position range).  So: a YaRN copy whose table is no longer
than the original context is the plain model exactly, and with a real extension the loss inside
the trained range may move too; the curves show by how much.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minimind.config import REFERENCE_YARN
from minimind.eval.bpb import iter_pretrain_texts, target_logprobs
from minimind.infer.yarn import enable_yarn
from minimind.model.layers import rope_tables

__all__ = [
    "bucket_edges",
    "bucket_means",
    "evaluate_longctx",
    "long_sequences",
    "plot_position_curves",
    "position_nll",
    "with_plain_rope",
    "with_yarn",
]


# ---- data --------------------------------------------------------------------------------------
def _token_stream(path: Path, tokenizer: Any) -> Iterator[list[int]]:
    """Token ids in pieces: per document for a JSONL file, the whole text for any other file."""
    if path.suffix == ".jsonl":
        group: list[str] = []
        for _, text in iter_pretrain_texts(path):
            group.append(text)
            if len(group) >= 64:
                for ids in tokenizer.encode_batch(group):
                    yield [tokenizer.bos_id, *ids, tokenizer.eos_id]
                group.clear()
        for ids in tokenizer.encode_batch(group) if group else []:
            yield [tokenizer.bos_id, *ids, tokenizer.eos_id]
    else:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{path}: the text file is empty")
        yield [tokenizer.bos_id, *tokenizer.encode(text)]


def long_sequences(path: str | Path, tokenizer: Any, length: int, max_seqs: int | None = None) -> torch.Tensor:
    """``[N, length]`` token ids: consecutive, non-overlapping ``length``-token pieces of the
    file's token stream (a trailing partial piece is dropped), at most ``max_seqs`` of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if length < 2:
        raise ValueError(f"length must be >= 2 tokens, got {length}")
    seqs: list[list[int]] = []
    buf: list[int] = []
    total = 0
    for ids in _token_stream(path, tokenizer):
        buf.extend(ids)
        total += len(ids)
        while len(buf) >= length and (max_seqs is None or len(seqs) < max_seqs):
            seqs.append(buf[:length])
            del buf[:length]
        if max_seqs is not None and len(seqs) >= max_seqs:
            break
    if not seqs:
        raise ValueError(f"{path}: {total} tokens, fewer than one sequence of --length {length}")
    return torch.tensor(seqs, dtype=torch.long)


# ---- buckets -----------------------------------------------------------------------------------
def bucket_edges(start: int, stop: int, n_buckets: int) -> list[tuple[int, int]]:
    """Split positions ``start .. stop-1`` into at most ``n_buckets`` contiguous half-open ranges
    ``[a, b)`` of near-equal size (``a_i = start + (stop - start) * i // n``): every position lies
    in exactly one bucket, none is empty."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    if stop <= start:
        raise ValueError(f"empty position range [{start}, {stop})")
    n = min(n_buckets, stop - start)
    edges = [start + (stop - start) * i // n for i in range(n + 1)]
    return list(itertools.pairwise(edges))


def bucket_means(values: torch.Tensor, first_position: int,
                 buckets: Sequence[tuple[int, int]]) -> list[float]:
    """Mean of ``values[p - first_position]`` over the positions ``p`` of each bucket."""
    return [float(values[a - first_position:b - first_position].double().mean()) for a, b in buckets]


# ---- models ------------------------------------------------------------------------------------
def _rebuild(model: nn.Module, config: Any) -> nn.Module:
    cos, sin = rope_tables(config.head_dim, config.rope_theta, config.max_position_embeddings,
                           config.rope_scaling)
    inner = model.model
    inner.rope_cos = cos.to(device=inner.rope_cos.device, dtype=inner.rope_cos.dtype)
    inner.rope_sin = sin.to(device=inner.rope_sin.device, dtype=inner.rope_sin.dtype)
    model.config = inner.config = config
    return model


def with_plain_rope(model: nn.Module, positions: int) -> nn.Module:
    """``model`` itself when it already has unscaled RoPE tables of at least ``positions`` rows,
    else a copy with unscaled tables that long (plain RoPE extrapolated past training)."""
    cfg = model.config
    if cfg.rope_scaling is None and cfg.max_position_embeddings >= positions:
        return model
    new_cfg = dataclasses.replace(cfg, rope_scaling=None, inference_rope_scaling=False,
                                  max_position_embeddings=max(positions, cfg.max_position_embeddings))
    return _rebuild(copy.deepcopy(model), new_cfg)


def with_yarn(model: nn.Module, original_length: int, factor: float, positions: int) -> nn.Module:
    """A copy of ``model`` with YaRN: the reference settings with ``original_max_position_embeddings
    = original_length`` and ``factor``, tables of ``max(positions, original_length * factor)`` rows
    (so YaRN is active exactly when that exceeds ``original_length``)."""
    if original_length < 1:
        raise ValueError(f"original_length must be >= 1, got {original_length}")
    if not factor >= 1.0:
        raise ValueError(f"the YaRN factor must be >= 1, got {factor}")
    scaling = {**REFERENCE_YARN, "original_max_position_embeddings": int(original_length), "factor": float(factor)}
    table = max(int(positions), math.ceil(original_length * factor))
    return enable_yarn(copy.deepcopy(model), max_position_embeddings=table, rope_scaling=scaling)


# ---- scoring -----------------------------------------------------------------------------------
@torch.no_grad()
def position_nll(model: nn.Module, sequences: torch.Tensor, batch_size: int = 4,
                 dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """float64 ``[L - 1]``: entry ``t - 1`` is ``mean_n -log p(x[n, t] | x[n, :t])`` for ``t = 1..L-1``.

    One forward pass per batch over positions ``0 .. L-2`` (plain causal attention); the
    vocabulary projection is float32 (see :func:`minimind.eval.bpb.target_logprobs`).
    """
    from tqdm import tqdm

    n, length = sequences.shape
    if length - 1 > model.config.max_position_embeddings:
        raise ValueError(f"sequences of {length} tokens need {length - 1} positions; the model has "
                         f"{model.config.max_position_embeddings}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(length - 1, dtype=torch.float64)
    starts = range(0, n, batch_size)
    try:
        for start in tqdm(starts, desc="positions", unit="batch", disable=None, leave=False) if progress \
                else starts:
            batch = sequences[start:start + batch_size].to(device)
            lp = target_logprobs(model, batch[:, :-1], batch[:, 1:], dtype=dtype)
            total -= lp.double().sum(0).cpu()
    finally:
        model.train(was_training)
    return total / n


def evaluate_longctx(model: nn.Module, sequences: torch.Tensor, original_length: int,
                     yarn_factor: float | None = None, n_buckets: int = 8, batch_size: int = 4,
                     dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, Any]:
    """Per-position loss with plain RoPE and with YaRN, and their bucket means.

    ``original_length`` is the context the model was trained on; ``yarn_factor`` defaults to
    ``max(1, length / original_length)``, the smallest factor whose range covers the sequences.
    Returns ``{"metrics", "buckets", "nll_plain", "nll_yarn", "first_position", "yarn_factor"}``;
    metrics are the means over all positions and over those inside (``t < original_length``) and
    beyond the original context: ``nll_<rope>_<part> = mean_t nll[t]`` over that part's positions.
    """
    n, length = sequences.shape
    positions = length - 1
    factor = float(yarn_factor) if yarn_factor else max(1.0, length / original_length)
    plain = position_nll(with_plain_rope(model, positions), sequences, batch_size, dtype, progress)
    yarn = position_nll(with_yarn(model, original_length, factor, positions), sequences, batch_size, dtype,
                        progress)
    buckets = bucket_edges(1, length, n_buckets)
    metrics: dict[str, Any] = {"sequences": n, "length": length, "tokens_scored": n * positions,
                               "nll_plain": float(plain.mean()), "nll_yarn": float(yarn.mean())}
    inside = min(max(original_length - 1, 0), positions)  # targets t = 1 .. original_length-1
    for part, sl in (("within", slice(0, inside)), ("beyond", slice(inside, positions))):
        if sl.stop > sl.start:
            metrics[f"nll_plain_{part}"] = float(plain[sl].mean())
            metrics[f"nll_yarn_{part}"] = float(yarn[sl].mean())
    rows = [{"start": a, "end": b - 1, "nll_plain": p, "nll_yarn": y}
            for (a, b), p, y in zip(buckets, bucket_means(plain, 1, buckets), bucket_means(yarn, 1, buckets))]
    return {"metrics": metrics, "buckets": rows, "nll_plain": plain, "nll_yarn": yarn, "first_position": 1,
            "yarn_factor": factor}


def plot_position_curves(nll_plain: torch.Tensor, nll_yarn: torch.Tensor, out: str | Path,
                         original_length: int | None = None, yarn_factor: float | None = None,
                         first_position: int = 1, title: str | None = None) -> Path:
    """PNG of both per-position curves, smoothed by a centred moving average of about 1/64 of the
    length (the raw curve of a few sequences is noise), with the original context marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    width = max(1, len(nll_plain) // 64)

    def smooth(v: torch.Tensor) -> list[float]:
        if width == 1:
            return v.tolist()
        kernel = torch.ones(1, 1, width, dtype=torch.float64) / width
        padded = torch.nn.functional.pad(v.view(1, 1, -1).double(), (width // 2, width - 1 - width // 2),
                                         mode="replicate")
        return torch.nn.functional.conv1d(padded, kernel).view(-1).tolist()

    xs = list(range(first_position, first_position + len(nll_plain)))
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(xs, smooth(nll_plain), label="plain RoPE")
    ax.plot(xs, smooth(nll_yarn), label=f"YaRN x{yarn_factor:g}" if yarn_factor else "YaRN")
    if original_length and original_length <= xs[-1]:
        ax.axvline(original_length, color="grey", linestyle="--", linewidth=1, label="original context")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean NLL (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "loss by position")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
