"""On-disk token store: an append-only, atomically published shard folder and its memmap reader.

Layout of a shard folder::

    ids.bin       all documents' token ids back to back (uint16 if the vocab fits, else uint32)
    mask.bin      uint8 loss mask per token (1 = trained as a target)
    offsets.npy   int64 [n_docs + 1]; document i is ids[offsets[i]:offsets[i+1]]
    meta.json     version, dtype, n_docs, n_tokens + whatever the producer records

:class:`ShardWriter` appends to files in a temporary sibling folder and renames it into place only
on :meth:`ShardWriter.commit`; an exception (or Ctrl-C) removes the temporary folder, so a reader
never sees a half-written build.  Document lengths go to a scratch file and become ``offsets.npy``
by a chunked cumulative sum, so neither tokens nor the index are ever held in RAM as a whole.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SHARD_VERSION = 1


def ids_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id ``< vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(out_dir: str | os.PathLike) -> dict | None:
    """The ``meta.json`` of a shard folder, or ``None`` if there is no complete build."""
    try:
        with open(Path(out_dir) / "meta.json", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def files_match_meta(out_dir: str | os.PathLike, meta: dict) -> bool:
    """Cheap consistency check of a shard folder against its meta (file sizes only)."""
    d = Path(out_dir)
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        return ((d / "ids.bin").stat().st_size == meta["n_tokens"] * itemsize
                and (d / "mask.bin").stat().st_size == meta["n_tokens"]
                and (d / "offsets.npy").is_file())
    except (OSError, KeyError, TypeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_builds(out_dir: str | os.PathLike) -> int:
    """Delete temporary siblings ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` of dead processes.

    They are what a killed build (SIGKILL, power loss) leaves behind; live builders are untouched.
    """
    out_dir = Path(out_dir)
    removed = 0
    if not out_dir.parent.is_dir():
        return 0
    for p in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        tag, _, rest = p.name[len(out_dir.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if tag in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``, replacing an older build if there is one."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Context manager that builds a shard folder; nothing appears at ``out_dir`` before commit."""

    def __init__(self, out_dir: str | os.PathLike, dtype: np.dtype | str) -> None:
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{tag}"
        self.n_tokens = 0
        self.committed = False

    def __enter__(self) -> "ShardWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(self.out_dir)
        self.tmp.mkdir()
        self._f_ids = open(self.tmp / "ids.bin", "wb")
        self._f_mask = open(self.tmp / "mask.bin", "wb")
        self._f_len = open(self.tmp / "lengths.tmp", "wb")
        return self

    def append(self, ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents given as concatenated ``ids``, their ``lengths`` and an optional mask
        (``None`` = all ones, i.e. every token trained)."""
        ids = np.asarray(ids)
        if ids.dtype != self.dtype:
            ids = ids.astype(self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(ids) or (mask is not None and len(mask) != len(ids)):
            raise ValueError("lengths/mask do not match the concatenated ids")
        ids.tofile(self._f_ids)
        mask_arr = np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask, np.uint8)
        mask_arr.tofile(self._f_mask)
        lengths.tofile(self._f_len)
        self.n_tokens += len(ids)

    def _close(self) -> None:
        for f in (self._f_ids, self._f_mask, self._f_len):
            f.close()

    def _write_offsets(self, block: int = 1 << 22) -> int:
        lengths_path = self.tmp / "lengths.tmp"
        n_docs = lengths_path.stat().st_size // 8
        offsets = np.lib.format.open_memmap(self.tmp / "offsets.npy", mode="w+", dtype=np.int64,
                                            shape=(n_docs + 1,))
        offsets[0] = 0
        carry, pos = 0, 0
        with open(lengths_path, "rb") as f:
            while pos < n_docs:
                lens = np.fromfile(f, dtype=np.int64, count=min(block, n_docs - pos))
                cs = np.cumsum(lens) + carry
                offsets[pos + 1: pos + 1 + len(lens)] = cs
                carry, pos = int(cs[-1]), pos + len(lens)
        offsets.flush()
        del offsets
        lengths_path.unlink()
        return n_docs

    def commit(self, meta: dict[str, Any]) -> dict:
        """Finish the index, write ``meta.json`` (+ version/dtype/counts), publish the folder."""
        self._close()
        n_docs = self._write_offsets()
        full = {"version": SHARD_VERSION, **meta, "dtype": self.dtype.name, "n_docs": n_docs,
                "n_tokens": self.n_tokens}
        with open(self.tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(full, f, ensure_ascii=False, indent=2)
        _replace_dir(self.tmp, self.out_dir)
        self.committed = True
        return full

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.committed:
            self._close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_docs(out_dir: str | os.PathLike, docs: Iterable[tuple[Iterable[int], Iterable[int] | None]],
               kind: str, vocab_size: int, **meta: Any) -> dict:
    """Write ``(ids, mask_or_None)`` documents as a shard folder; returns the meta.

    For producers that already hold token ids (synthetic tasks, tests, derived datasets).
    """
    with ShardWriter(out_dir, ids_dtype(vocab_size)) as w:
        for ids, mask in docs:
            ids_arr = np.asarray(list(ids), dtype=w.dtype)
            mask_arr = None if mask is None else np.asarray(list(mask), dtype=np.uint8)
            w.append(ids_arr, np.array([len(ids_arr)]), mask_arr)
        return w.commit({"kind": kind, "vocab_size": int(vocab_size), **meta})


class ShardReader:
    """Read-only, memory-mapped view of a shard folder: ``doc(i) -> (ids, mask)``."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        meta = read_meta(self.out_dir)
        if meta is None:
            raise FileNotFoundError(f"no complete shard build in {self.out_dir} (missing meta.json)")
        self.meta: dict = meta
        self.kind: str = meta["kind"]
        self.n_tokens: int = int(meta["n_tokens"])
        dtype = np.dtype(meta["dtype"])
        if self.n_tokens:
            self.ids = np.memmap(self.out_dir / "ids.bin", dtype=dtype, mode="r")
            self.mask = np.memmap(self.out_dir / "mask.bin", dtype=np.uint8, mode="r")
        else:  # np.memmap refuses empty files
            self.ids, self.mask = np.zeros(0, dtype), np.zeros(0, np.uint8)
        self.offsets: np.ndarray = np.load(self.out_dir / "offsets.npy", mmap_mode="r")
        self.lengths: np.ndarray = np.diff(self.offsets)
        if len(self.ids) != self.n_tokens or int(self.offsets[-1]) != self.n_tokens:
            raise ValueError(f"shard folder {self.out_dir} is inconsistent with its meta.json")

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and loss mask of document ``i`` (views into the memmaps)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    def __reduce__(self) -> tuple:
        # Re-open the memmaps in the receiving process instead of pickling their contents.
        return (type(self), (self.out_dir,))
