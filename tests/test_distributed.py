"""DDP under torchrun on CPU (gloo, 2 processes) computes what one process with the same global batch
computes: gradients are all-reduced, each rank reads its own rows, only rank 0 writes files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_loop import _corpus

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_two_processes_match_single_process(tmp_path):
    from minimind.tokenizer import iter_texts_from_jsonl, train_tokenizer
    data = _corpus(tmp_path / "pre.jsonl", n_docs=200)
    train_tokenizer(iter_texts_from_jsonl(data), tmp_path / "tok", vocab_size=400, show_progress=False)
    common = ["pretrain", "--data_path", str(data), "--tokenizer_path", str(tmp_path / "tok"),
              "--preset", "tiny", "--hidden_size", "64", "--num_hidden_layers", "2", "--vocab_size", "400",
              "--max_seq_len", "64", "--max_steps", "6", "--log_interval", "1", "--learning_rate", "3e-3",
              "--progress", "0", "--device", "cpu", "--dtype", "float32", "--num_workers", "1",
              "--shard_dir", str(tmp_path / "shards")]
    # prepare shards once so both runs read identical data (and ranks don't race on the cache)
    _run([sys.executable, "-m", "minimind.cli", *common, "--batch_size", "8", "--save_dir",
          str(tmp_path / "single"), "--checkpoint_dir", str(tmp_path / "single_ck")], tmp_path)
    _run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "minimind.cli", *common,
          "--batch_size", "4", "--save_dir", str(tmp_path / "ddp"), "--checkpoint_dir",
          str(tmp_path / "ddp_ck")], tmp_path)

    def losses(d: str) -> list[float]:
        rows = Path(tmp_path / d / "pretrain_64_metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows]

    single, ddp = losses("single"), losses("ddp")
    assert len(single) == len(ddp) == 6
    # Same global batch (2 ranks x 4 rows == 1 x 8 rows), all rows full: identical up to float
    # reduction order.  Without the all-reduce the ranks would diverge after step 1.
    for a, b in zip(single, ddp):
        assert abs(a - b) < 2e-3, (single, ddp)
    assert single[-1] < single[0]
