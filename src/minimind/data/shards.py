"""Tokenised shards on disk: built once per (data file, tokenizer, settings), memory-mapped after.

The reference re-renders and re-tokenises every sample in ``__getitem__`` on every epoch (spec
6.3.1).  Here a JSONL file is converted once into the shard folder described in
:mod:`minimind.data.store` (``ids.bin``, ``mask.bin``, ``offsets.npy``, ``meta.json``); pretrain
masks are all 1, SFT masks are the assistant spans (body through ``<|im_end|>\n``).

Memory stays bounded for files larger than RAM: the input is streamed in chunks of lines, chunks are
tokenised in a process pool with at most ``2 * num_proc`` chunks in flight (``Pool.imap`` would read
the whole file ahead), and results are appended to the store in input order.  The store publishes
the folder atomically, so a failed or interrupted build leaves nothing at ``out_dir``.

SFT augmentation draws from ``random.Random(f"...:{seed}:{line_no}")``: the shards are identical
whatever ``num_proc`` is, and a given line always gets the same augmentation.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import random
import sys
import warnings
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar

import numpy as np

from .formats import pretrain_text, sft_conversation
from .jsonl import DataFormatError, SkipStats, iter_jsonl_raw, parse_jsonl_line
from .sft import MaskMarkers, assistant_mask, render_sft_text
from .store import (SHARD_VERSION, BuildLock, ShardReader, ShardWriter, files_match_meta, ids_dtype,
                    read_meta)

__all__ = ["ShardInfo", "ShardReader", "prepare_shards", "load_or_prepare_shards", "read_meta",
           "tokenizer_key", "ChunkTokenizer"]
Kind = Literal["pretrain", "sft"]
#: Lines per work unit, and a byte cap so that chunks of very long lines stay small.
CHUNK_LINES = 512
CHUNK_BYTES = 4 << 20
#: ``fork`` on Linux: workers inherit the loaded tokenizer and need no importable ``__main__``
#: (stdin scripts and notebooks work; children never touch torch/CUDA).  Elsewhere ``spawn``, where
#: the tokenizer is pickled once per worker through the pool initializer.
MP_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"

T = TypeVar("T")
C = TypeVar("C", bound="_Chunk")


@dataclass
class ShardInfo:
    """Summary of a built (or reused) shard folder."""

    out_dir: Path
    kind: str
    n_docs: int
    n_tokens: int
    skipped_lines: int
    reused: bool
    meta: dict = field(repr=False, default_factory=dict)


def tokenizer_key(tokenizer: Any) -> str:
    """Cache key of everything in the tokenizer that changes ids: vocab/merges and chat template."""
    key = str(tokenizer.hash)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        key += "-" + hashlib.sha256(template.encode("utf-8")).hexdigest()[:8]
    return key


def _load_tokenizer(spec: Any) -> Any:
    if isinstance(spec, (str, os.PathLike)):
        from minimind.tokenizer import MiniMindTokenizer
        return MiniMindTokenizer.from_dir(spec)
    return spec


def _usable_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def _source_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _settings(kind: str, seed: int, skip_bad_lines: bool, max_len: int | None,
              add_system_ratio: float, empty_think_ratio: float) -> dict:
    """The build settings that change the shard content (pretrain ignores the SFT knobs)."""
    s: dict[str, Any] = {"skip_bad_lines": bool(skip_bad_lines)}
    if kind == "sft":
        s.update(seed=int(seed), max_len=max_len, add_system_ratio=float(add_system_ratio),
                 empty_think_ratio=float(empty_think_ratio))
    return s


# ---------------------------------------------------------------------------------------- workers
@dataclass
class _Chunk:
    """Tokenised output of one chunk of lines, in input order."""

    ids: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None
    errors: list[tuple[int, str]]
    n_bytes: int = 0
    no_target: int = 0  # documents whose mask is all 0 (an SFT conversation cut before its answer)


def render_lines(lines: list[tuple[int, bytes]], src: str,
                 render: Callable[[dict, int], T]) -> tuple[list[T], list[int], list[tuple[int, str]]]:
    """Parse each ``(line_no, raw)`` JSONL line and ``render(obj, line_no)`` it.

    Returns the rendered values and their line numbers (blank lines are skipped) and the
    ``(line_no, problem)`` of every line that failed, so a chunk reports all its bad lines at once."""
    out: list[T] = []
    line_nos: list[int] = []
    errors: list[tuple[int, str]] = []
    for line_no, raw in lines:
        try:
            obj = parse_jsonl_line(raw, src, line_no)
            if obj is None:
                continue
            out.append(render(obj, line_no))
            line_nos.append(line_no)
        except DataFormatError as e:
            errors.append((line_no, e.problem))
        except ValueError as e:
            errors.append((line_no, str(e)))
    return out, line_nos, errors


class ChunkTokenizer:
    """Turns a list of ``(line_no, raw_line)`` into concatenated ids/masks; one per process."""

    def __init__(self, tokenizer: Any, kind: str, src: str, seed: int, max_len: int | None,
                 add_system_ratio: float, empty_think_ratio: float) -> None:
        if kind not in ("pretrain", "sft"):
            raise ValueError(f"kind must be 'pretrain' or 'sft', got {kind!r}")
        self.tok = tokenizer
        self.kind, self.src, self.seed, self.max_len = kind, src, seed, max_len
        self.ratios = (add_system_ratio, empty_think_ratio)
        self.dtype = ids_dtype(tokenizer.vocab_size)
        self.markers = MaskMarkers(tokenizer) if kind == "sft" else None

    def line_rng(self, line_no: int) -> random.Random:
        """Per-line RNG: depends only on (seed, line number), never on worker or chunk layout."""
        return random.Random(f"minimind-sft:{self.seed}:{line_no}")

    def _text(self, obj: dict, line_no: int) -> str:
        if self.kind == "pretrain":
            return pretrain_text(obj)
        messages, tools = sft_conversation(obj)
        try:
            return render_sft_text(self.tok, messages, tools, self.line_rng(line_no), *self.ratios)
        except Exception as e:  # template errors on odd-but-valid JSON shapes are data errors
            raise ValueError(f"cannot render conversation: {type(e).__name__}: {e}") from None

    def __call__(self, lines: list[tuple[int, bytes]]) -> _Chunk:
        texts, _, errors = render_lines(lines, self.src, self._text)
        encoded = self.tok.encode_batch(texts) if texts else []
        if self.kind == "pretrain":
            bos, eos = self.tok.bos_id, self.tok.eos_id
            docs = [[bos, *ids, eos] for ids in encoded]  # reference: labels include EOS
            masks = None
        else:
            docs = [ids[: self.max_len] if self.max_len else ids for ids in encoded]
            masks = [assistant_mask(ids, self.markers) for ids in docs]
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        total = int(lengths.sum())
        ids_arr = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=total)
        mask_arr = (None if masks is None else
                    np.fromiter(itertools.chain.from_iterable(masks), dtype=np.uint8, count=total))
        no_target = 0 if masks is None else sum(1 for m in masks if not any(m))
        return _Chunk(ids_arr, lengths, mask_arr, errors, no_target=no_target)


_WORKER: Any = None
_WORKER_INIT_ERROR: str | None = None


def _worker_init(worker_cls: type, tokenizer: Any, args: tuple) -> None:
    """Pool initializer: set up the chunk tokenizer (``worker_cls(tokenizer, *args)``) once per process.

    An exception here would make ``multiprocessing.Pool`` respawn workers forever; it is stored
    instead and re-raised by the first task, which surfaces it in the parent.
    """
    global _WORKER, _WORKER_INIT_ERROR
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the pool
    try:
        _WORKER = worker_cls(tokenizer, *args)
    except BaseException as e:  # noqa: BLE001 - reported through the first task
        _WORKER_INIT_ERROR = f"{type(e).__name__}: {e}"


def _worker_run(lines: list[tuple[int, bytes]]) -> _Chunk:
    if _WORKER is None:
        raise RuntimeError(f"tokenizer worker failed to start: {_WORKER_INIT_ERROR}")
    return _WORKER(lines)


def _read_chunks(path: Path) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
    """Yield ``(lines, n_bytes)`` groups of at most CHUNK_LINES lines / ~CHUNK_BYTES bytes."""
    lines: list[tuple[int, bytes]] = []
    n_bytes = 0
    for line_no, raw, size in iter_jsonl_raw(path):
        lines.append((line_no, raw))
        n_bytes += size
        if len(lines) >= CHUNK_LINES or n_bytes >= CHUNK_BYTES:
            yield lines, n_bytes
            lines, n_bytes = [], 0
    if lines:
        yield lines, n_bytes


def checked_chunks(chunks: Iterator[C], data_path: Path, skip_bad_lines: bool, stats: SkipStats) -> Iterator[C]:
    """The chunks, after their bad lines: raised as :class:`DataFormatError` (``file:line``; the
    shard writer then deletes its temporary folder), or counted into ``stats`` when skipping."""
    for chunk in chunks:
        for line_no, problem in chunk.errors:
            err = DataFormatError(data_path, line_no, problem)
            if not skip_bad_lines:
                raise err
            stats.add(err)
        yield chunk


def _tokenized_chunks(path: Path, tokenizer: Any, args: tuple, num_proc: int,
                      worker_cls: type = None) -> Iterator[_Chunk]:
    """Tokenise chunks in order, with at most ``2 * num_proc`` chunks in flight.

    ``worker_cls(tokenizer, *args)`` turns a list of ``(line_no, raw_line)`` into a :class:`_Chunk`
    (default :class:`ChunkTokenizer`; the DPO pair reader plugs in its own)."""
    worker_cls = worker_cls or ChunkTokenizer
    if num_proc <= 1:
        work = worker_cls(tokenizer, *args)
        for lines, n_bytes in _read_chunks(path):
            out = work(lines)
            out.n_bytes = n_bytes
            yield out
        return
    ctx = mp.get_context(MP_START_METHOD)
    pool = ctx.Pool(num_proc, initializer=_worker_init, initargs=(worker_cls, tokenizer, args))
    try:
        pending: deque = deque()
        for lines, n_bytes in _read_chunks(path):
            pending.append((pool.apply_async(_worker_run, (lines,)), n_bytes))
            while len(pending) >= 2 * num_proc:
                res, nb = pending.popleft()
                out = res.get()
                out.n_bytes = nb
                yield out
        while pending:
            res, nb = pending.popleft()
            out = res.get()
            out.n_bytes = nb
            yield out
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------------------------- build
def prepare_shards(data_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any,
                   kind: Kind, num_proc: int = 0, seed: int = 0, skip_bad_lines: bool = False,
                   max_len: int | None = None, add_system_ratio: float = 0.2,
                   empty_think_ratio: float = 0.2, progress: bool = True) -> ShardInfo:
    """Tokenise ``data_path`` (JSONL) into ``out_dir`` (replaced atomically); see module docstring.

    ``tokenizer`` is a :class:`~minimind.tokenizer.MiniMindTokenizer` or its folder.  ``num_proc=0``
    uses every CPU.  Pretrain documents are ``[BOS] + encode(text) + [EOS]`` and are never cut (the
    packer splits long ones); SFT documents follow :func:`minimind.data.sft.tokenize_conversation`
    and are cut to ``max_len`` when given.  Bad lines raise :class:`DataFormatError` (nothing is
    left behind) unless ``skip_bad_lines``, which counts them into the meta and warns once.
    """
    from tqdm.auto import tqdm

    data_path, out_dir = Path(data_path), Path(out_dir)
    if kind not in ("pretrain", "sft"):
        raise ValueError(f"kind must be 'pretrain' or 'sft', got {kind!r}")
    if max_len is not None and max_len < 1:
        raise ValueError("max_len must be positive")
    tok = _load_tokenizer(tokenizer)
    num_proc = num_proc or _usable_cpus()
    source = _source_fingerprint(data_path)
    dtype = ids_dtype(tok.vocab_size)
    args = (kind, str(data_path), seed, max_len, add_system_ratio, empty_think_ratio)

    stats = SkipStats()
    bar = tqdm(total=source["size"], unit="B", unit_scale=True, disable=not progress,
               desc=f"tokenizing {data_path.name}")
    chunks = _tokenized_chunks(data_path, tok, args, num_proc)
    n_docs = no_target = 0
    with ShardWriter(out_dir, dtype) as writer, bar, closing(chunks):
        for chunk in checked_chunks(chunks, data_path, skip_bad_lines, stats):
            writer.append(chunk.ids, chunk.lengths, chunk.mask)
            n_docs += len(chunk.lengths)
            no_target += chunk.no_target
            bar.update(chunk.n_bytes)
        check_usable(data_path, n_docs, stats)
        if kind == "sft" and no_target == n_docs:
            raise ValueError(f"{data_path}: no conversation keeps an assistant token within --max_seq_len "
                             f"{max_len - 1 if max_len else '?'} (every one is cut before its answer); "
                             f"raise --max_seq_len")
        meta = writer.commit({
            "kind": kind, "source": source, "tokenizer": tokenizer_key(tok),
            "vocab_size": tok.vocab_size, "seed": seed,
            "settings": _settings(kind, seed, skip_bad_lines, max_len, add_system_ratio,
                                  empty_think_ratio),
            "skipped_lines": stats.count, "skipped_examples": stats.locations,
            "no_target_docs": no_target,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        })
    stats.warn(data_path)
    if kind == "sft" and no_target:
        warnings.warn(f"{data_path}: {no_target} of {n_docs} conversations are cut by --max_seq_len "
                      f"{max_len - 1 if max_len else '?'} before any assistant token and teach nothing; "
                      f"raise --max_seq_len to train them", RuntimeWarning, stacklevel=2)
    return ShardInfo(out_dir, kind, meta["n_docs"], meta["n_tokens"], stats.count, reused=False,
                     meta=meta)


def check_usable(data_path: Path, n_docs: int, stats: SkipStats) -> None:
    """Refuse a build with no document, naming the file and why (empty, or every line skipped)."""
    if n_docs:
        return
    if stats.count:
        raise ValueError(f"{data_path}: all {stats.count} non-blank line(s) were skipped as bad "
                         f"(--skip_bad_lines 1); first: {stats.locations[0]}")
    raise ValueError(f"{data_path}: the file holds no data (empty or only blank lines)")


def load_or_prepare_shards(data_path: str | os.PathLike, out_dir: str | os.PathLike,
                           tokenizer: Any, kind: Kind, num_proc: int = 0, seed: int = 0,
                           skip_bad_lines: bool = False, max_len: int | None = None,
                           add_system_ratio: float = 0.2, empty_think_ratio: float = 0.2,
                           progress: bool = True) -> ShardInfo:
    """Reuse ``out_dir`` if it was built from the same source/tokenizer/settings, else rebuild.

    "Same source" means same resolved path, size and mtime (hashing a 10 GB file on every start
    would cost more than it saves).  Arguments are those of :func:`prepare_shards`.
    """
    tok = _load_tokenizer(tokenizer)
    want = {
        "version": SHARD_VERSION, "kind": kind, "source": _source_fingerprint(Path(data_path)),
        "tokenizer": tokenizer_key(tok),
        "settings": _settings(kind, seed, skip_bad_lines, max_len, add_system_ratio,
                              empty_think_ratio),
    }
    return reuse_or_build(out_dir, kind, want, lambda: prepare_shards(
        data_path, out_dir, tokenizer, kind, num_proc=num_proc, seed=seed, skip_bad_lines=skip_bad_lines,
        max_len=max_len, add_system_ratio=add_system_ratio, empty_think_ratio=empty_think_ratio,
        progress=progress))


def reused_build(out_dir: str | os.PathLike, kind: str, want: dict) -> ShardInfo | None:
    """The existing build at ``out_dir`` if its meta matches ``want`` and its files are whole."""
    meta = read_meta(out_dir)
    if meta is None or any(meta.get(k) != v for k, v in want.items()) or not files_match_meta(out_dir, meta):
        return None
    return ShardInfo(Path(out_dir), kind, meta["n_docs"], meta["n_tokens"], meta.get("skipped_lines", 0),
                     reused=True, meta=meta)


def reuse_or_build(out_dir: str | os.PathLike, kind: str, want: dict,
                   build: Callable[[], ShardInfo]) -> ShardInfo:
    """Reuse a matching build, else ``build()`` under a :class:`BuildLock`.

    Within a node the training loop lets local rank 0 build while the others wait; across the nodes
    of a shared filesystem the lock does the same for the nodes' rank 0s: the first builds, the
    others wait for it and then find the build fresh and reuse it."""
    info = reused_build(out_dir, kind, want)
    if info is not None:
        return info
    with BuildLock(out_dir):
        info = reused_build(out_dir, kind, want)  # built by another node while we waited
        return info if info is not None else build()
