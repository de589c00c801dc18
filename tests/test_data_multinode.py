"""Token caches on a filesystem shared by several nodes: one builder at a time, no foreign deletions.

Each node's local rank 0 prepares the cache; pids are only meaningful on their own host, so a build
folder or lock of another host is judged by its age, never by a local ``kill(pid, 0)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minimind.data import load_or_prepare_shards, prepare_shards, read_meta
from minimind.data.store import BuildLock, _host, remove_stale_builds


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from minimind.tokenizer import train_tokenizer
    texts = [f"line {i} of a small corpus about cats and dogs" for i in range(100)]
    return train_tokenizer(iter(texts), tmp_path_factory.mktemp("tok"), vocab_size=300, show_progress=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "pt.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} about cats"}) + "\n" for i in range(50)))
    return path


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                         text=True, check=True)
    return int(out.stdout)


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_stale_builds_of_other_hosts_are_judged_by_age_not_pid(tmp_path: Path) -> None:
    dead = _dead_pid()
    here, other = _host(), "other-node-7.cluster"
    mine_dead = tmp_path / f".pt.tmp-{dead}-aaaa0000@{here}"
    mine_live = tmp_path / f".pt.tmp-{os.getpid()}-bbbb0000@{here}"
    theirs_busy = tmp_path / f".pt.tmp-{dead}-cccc0000@{other}"  # that pid is dead HERE, not there
    theirs_idle = tmp_path / f".pt.old-{dead}-dddd0000@{other}"
    legacy_dead = tmp_path / f".pt.tmp-{dead}-eeee0000"  # older versions: no host, local by then
    for d in (mine_dead, mine_live, theirs_busy, theirs_idle, legacy_dead):
        d.mkdir()
        (d / "ids.bin").write_bytes(b"12")
    for p in (theirs_idle / "ids.bin", theirs_idle):
        _age(p, 2 * 3600)
    assert remove_stale_builds(tmp_path / "pt") == 3
    assert not mine_dead.exists() and not theirs_idle.exists() and not legacy_dead.exists()
    assert mine_live.exists() and theirs_busy.exists()


def _foreign_lock(out: Path, host: str, pid: int, age: float = 0.0) -> Path:
    lock = out.parent / f".{out.name}.lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, "id": "x"}))
    if age:
        _age(lock, age)
    return lock


def test_second_node_waits_for_the_first_builder_and_reuses_its_build(tmp_path: Path, tok, data) -> None:
    out = tmp_path / "cache"
    lock = _foreign_lock(out, "node-a", 4242)  # node A is building (its lock is fresh)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(
        info=load_or_prepare_shards(data, out, tok, "pretrain", num_proc=1, progress=False)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and read_meta(out) is None  # node B did not start a second build
    prepare_shards(data, out, tok, "pretrain", num_proc=1, progress=False)  # node A finishes ...
    lock.unlink()  # ... and releases
    waiter.join(timeout=30)
    assert not waiter.is_alive() and result["info"].reused  # B took A's build as it was


@pytest.mark.parametrize("host, pid, age", [("node-a", 4242, 3600.0),  # a crashed node: lock idle
                                            ("<here>", None, 0.0)])  # a dead process of this host
def test_a_dead_builders_lock_is_taken_over(tmp_path: Path, tok, data, host, pid, age) -> None:
    out = tmp_path / "cache"
    lock = _foreign_lock(out, _host() if host == "<here>" else host, pid or _dead_pid(), age)
    info = load_or_prepare_shards(data, out, tok, "pretrain", num_proc=1, progress=False)
    assert not info.reused and info.n_docs == 50
    assert not lock.exists()  # our own lock is released after the build


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    with BuildLock(out) as held:
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
        assert not held._try_create()  # a second claimant cannot create it
    assert not held.path.exists()
