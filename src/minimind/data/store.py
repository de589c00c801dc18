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

Temporary folders are named ``.<name>.tmp-<pid>-<random>@<host>`` so that, on a filesystem shared by
several nodes, a build of another host is never mistaken for a dead local one, and
:class:`BuildLock` lets only one node at a time build a given folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
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


#: A temporary build folder (or build lock) untouched for this long belongs to a dead builder, on
#: whatever host: a live build appends to its files every chunk, a live lock holder touches its
#: lock every :data:`LOCK_HEARTBEAT_SECONDS`.
STALE_BUILD_SECONDS = 3600.0
STALE_LOCK_SECONDS = 300.0
LOCK_HEARTBEAT_SECONDS = 30.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _host() -> str:
    """This machine's name, as recorded in build names and locks (no ``/``: it is part of a file name)."""
    return socket.gethostname().replace("/", "_") or "localhost"


def _build_tag() -> str:
    """``<pid>-<random>@<host>``: a folder on a shared filesystem says which process of which node owns it."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}@{_host()}"


def _latest_mtime(path: Path) -> float:
    """Newest modification time of a folder and the files directly in it (0 if it vanished)."""
    try:
        times = [path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()]
    except OSError:
        return 0.0
    return max(times)


def _is_stale(host: str | None, pid: int, mtime: float, max_age: float) -> bool:
    """A builder is gone if it ran on this host and its pid is dead, or (any host: pids of other
    nodes mean nothing here) if it has not touched its files for ``max_age`` seconds.  Names
    without a host come from older versions, which only ever checked local pids."""
    if (host is None or host == _host()) and not _pid_alive(pid):
        return True
    return time.time() - mtime > max_age


def remove_stale_builds(out_dir: str | os.PathLike, max_age: float = STALE_BUILD_SECONDS) -> int:
    """Delete temporary siblings ``.<name>.tmp-<pid>-<rnd>@<host>`` / ``.<name>.old-...`` of dead builders.

    They are what a killed build (SIGKILL, power loss) leaves behind.  On a filesystem shared by
    several nodes a pid says nothing about another host's processes, so another host's build is only
    removed once it has been idle for ``max_age`` seconds; live builders anywhere are untouched.
    """
    out_dir = Path(out_dir)
    removed = 0
    if not out_dir.parent.is_dir():
        return 0
    for p in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        tag, _, rest = p.name[len(out_dir.name) + 2:].partition("-")
        pid, _, rest = rest.partition("-")
        host = rest.partition("@")[2] or None
        if tag in ("tmp", "old") and pid.isdigit() and _is_stale(host, int(pid), _latest_mtime(p), max_age):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


class BuildLock:
    """An exclusive lock on building ``out_dir``, valid across the nodes of a shared filesystem.

    ``torchrun`` on several nodes starts one local rank 0 per node, and each would build the same
    cache folder.  The lock is a sibling file ``.<name>.lock`` created with ``O_CREAT | O_EXCL``
    (atomic on local filesystems and NFS v3+) holding ``{"host", "pid"}``; its holder touches it
    every :data:`LOCK_HEARTBEAT_SECONDS` from a daemon thread.  A waiter takes the lock over when
    the holder is a dead process of this host or has not touched it for ``stale_after`` seconds
    (a crashed node), and otherwise polls until it is released.
    """

    def __init__(self, out_dir: str | os.PathLike, stale_after: float = STALE_LOCK_SECONDS,
                 poll: float = 1.0, heartbeat: float = LOCK_HEARTBEAT_SECONDS) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir.parent / f".{self.out_dir.name}.lock"
        self.stale_after, self.poll, self.heartbeat = stale_after, poll, heartbeat
        self.owner = {"host": _host(), "pid": os.getpid(), "id": uuid.uuid4().hex}
        self.waited = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.owner, f)
        return True

    def _read(self) -> tuple[dict | None, float]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")), self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):  # being written right now, or garbage: judge by age only
            try:
                return {}, self.path.stat().st_mtime
            except OSError:
                return None, 0.0

    def _holder_gone(self, owner: dict, mtime: float) -> bool:
        pid = owner.get("pid")
        host = owner.get("host") if isinstance(owner.get("host"), str) else ""
        if not isinstance(pid, int):
            return time.time() - mtime > self.stale_after
        return _is_stale(host, pid, mtime, self.stale_after)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while not self._try_create():
            owner, mtime = self._read()
            if owner is None:
                continue  # released between our attempt and the read
            if self._holder_gone(owner, mtime):
                again, _ = self._read()
                if again == owner:  # still the same dead holder: take it over
                    self.path.unlink(missing_ok=True)
                continue
            if not told:
                print(f"waiting for {owner.get('host', '?')}:{owner.get('pid', '?')} to finish building "
                      f"{self.out_dir} (lock {self.path})", file=sys.stderr)
                told = True
            self.waited = True
            time.sleep(self.poll)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        owner, _ = self._read()
        if owner == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``, replacing an older build if there is one."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{_build_tag()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Context manager that builds a shard folder; nothing appears at ``out_dir`` before commit."""

    def __init__(self, out_dir: str | os.PathLike, dtype: np.dtype | str) -> None:
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{_build_tag()}"
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
