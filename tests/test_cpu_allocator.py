"""glibc malloc tuning: large tensors freed and made again reuse heap pages, and nothing else changes.

Each case runs in a fresh interpreter: the thresholds are process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

# A step's pattern: two 48 MiB results made from one input and freed, 24 times; report the
# minor page faults of the last twelve steps (each fresh 4 KiB page the kernel zeroes is one) and a
# checksum of the results.
_PROBE = """
import json, resource, sys, torch
from minimind.cpu_allocator import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else None
x = torch.linspace(-1.0, 1.0, 12 << 20)  # 48 MiB of fp32
total, faults = 0.0, 0
for step in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x * 2
    z = y.exp()
    total += float(z[::4096].sum())
    del y, z
    if step >= 12:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "sum": total}))
"""


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_large_tensors_reuse_heap_pages_instead_of_faulting_fresh_ones():
    pages = (48 << 20) // 4096
    plain = _probe("plain")
    tuned = _probe("tune")
    assert plain["applied"] is None and tuned["applied"] and tuned["applied"] >= 48 << 20
    # glibc's default: every 48 MiB block is a fresh mmap (the dynamic threshold stops at 32 MiB),
    # so each of the twelve steps faults both results' pages in again
    assert plain["faults"] >= 12 * 2 * pages * 0.9
    # tuned: once the heap has grown to hold them (the first few steps) the steps reuse its pages; a
    # block now and then still lands past the heap's top (0-2 of the 24 blocks, measured)
    assert tuned["faults"] < 0.25 * plain["faults"]
    assert tuned["sum"] == plain["sum"]  # where the bytes live changes no result


def test_the_tuning_stands_down_when_asked_or_when_glibc_is_told_directly():
    assert _probe("tune", MINIMIND_MALLOC_TUNING="0")["applied"] is None
    assert _probe("tune", MALLOC_MMAP_THRESHOLD_="262144")["applied"] is None


def test_the_cli_tunes_malloc_before_running_a_command(monkeypatch):
    import minimind.cpu_allocator as alloc
    from minimind import cli
    order = []
    monkeypatch.setattr(alloc, "tune_malloc", lambda: order.append("tune"))
    monkeypatch.setattr(cli, "_run", lambda args: order.append(args.command) or 0)
    assert cli.main(["demo", "--quick"]) == 0
    assert order == ["tune", "demo"]
