"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A run killed mid-save leaves the previous file intact instead of a truncated one.  The temporary
file is named ``.<name>.<pid>.<random>.tmp``: the writer's pid lets a later save tell a leftover of a
killed run (pid no longer alive: safe to delete) from the file of a save still in progress.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterator

#: Leftovers of the former ``tempfile.mkstemp`` naming carry no pid; they are only removed once
#: they are this old, because a writer still running an older version cannot be recognised.
LEGACY_TMP_MAX_AGE_S = 24 * 3600

_PID_TMP = re.compile(r"(\d+)\.[0-9a-f]+")
_LEGACY_TMP = re.compile(r"[a-z0-9_]{8}")


def _pid_alive(pid: int) -> bool:
    """True unless the process certainly does not exist (another user's process counts as alive)."""
    if pid <= 0:
        return True  # not a real writer pid: never claim it is dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def remove_stale_tmp(path: str | Path) -> list[Path]:
    """Delete ``.<name>.<pid>.<random>.tmp`` siblings of ``path`` whose writer process is dead.

    A save killed between creating its temporary file and the rename leaves a partial file that
    can be as large as the model; nothing else would ever remove it.  Files of live writers (this
    process included) are kept.  Returns the removed paths.
    """
    path = Path(path)
    prefix, suffix = f".{path.name}.", ".tmp"
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        middle = name[len(prefix):-len(suffix)]
        cand = path.parent / name
        m = _PID_TMP.fullmatch(middle)
        try:
            if m is not None:
                stale = not _pid_alive(int(m.group(1)))
            elif _LEGACY_TMP.fullmatch(middle):
                stale = time.time() - cand.stat().st_mtime > LEGACY_TMP_MAX_AGE_S
            else:
                stale = False
            if stale:
                cand.unlink()
                removed.append(cand)
        except FileNotFoundError:  # another process cleaned it up first
            continue
    return removed


def _create_tmp(path: Path) -> Path:
    """Create an empty ``.<name>.<pid>.<random>.tmp`` next to ``path``.

    ``os.open`` with mode 0o666 lets the process umask decide the permissions (0644 under the
    usual umask 022), as a plain ``open()`` would; ``mkstemp`` forces 0600, which made saved
    weights unreadable to other users of a shared machine.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Leftover temporary files of killed writers of the same ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp_path = _create_tmp(path)
    # The umask-derived mode, read back instead of querying the umask (``os.umask`` can only be read
    # by setting it, which races with other threads).  Re-applied after writing, because some writers
    # (safetensors' ``save_file``) replace the file and create it 0600 themselves.
    mode = tmp_path.stat().st_mode & 0o777
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
