"""DDP under torchrun on CPU (gloo, 2 processes) computes what one process with the same global batch
computes: gradients are all-reduced with every target token weighted the same across ranks, each rank
reads its own rows, rank 0 builds the token cache while the other waits, only rank 0 writes files,
and a resumed run continues every rank's RNG stream."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_loop import _corpus
from tests.weights_check import assert_same_weights

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _torchrun(*args: str) -> list[str]:
    return ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "minimind.cli", *args]


def _uneven_sft(path: Path, n: int = 96, seed: int = 0) -> Path:
    """Conversations whose assistant turns range from 1 to ~60 tokens, so the ranks' micro-batches
    hold very different numbers of target tokens."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "red", "blue", "cat", "dog", "学习", "模型"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
            a = " ".join(rng.choice(words) for _ in range(1 if i % 3 == 0 else rng.randint(5, 25)))
            conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    from minimind.tokenizer import iter_texts_from_jsonl, train_tokenizer
    root = tmp_path_factory.mktemp("ddp")
    data = _corpus(root / "pre.jsonl", n_docs=200)
    sft = _uneven_sft(root / "sft.jsonl")
    train_tokenizer(iter_texts_from_jsonl(data), root / "tok", vocab_size=400, show_progress=False)
    return {"root": root, "pre": data, "sft": sft, "tok": root / "tok"}


def _common(ws: dict[str, Path], *extra: str) -> list[str]:
    return ["--tokenizer_path", str(ws["tok"]), "--preset", "tiny", "--hidden_size", "64",
            "--num_hidden_layers", "2", "--vocab_size", "400", "--log_interval", "1", "--learning_rate", "3e-3",
            "--progress", "0", "--device", "cpu", "--dtype", "float32", "--num_workers", "1", *extra]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(r) for r in path.read_text().splitlines()]


def test_ddp_fresh_cache_two_processes_match_single_process(ws, tmp_path):
    """Both runs start from an empty cache: under torchrun rank 0 tokenizes while rank 1 waits."""
    common = ["pretrain", "--data_path", str(ws["pre"]), "--max_seq_len", "64", "--max_steps", "6",
              *_common(ws)]
    _run([sys.executable, "-m", "minimind.cli", *common, "--batch_size", "8", "--save_dir",
          str(tmp_path / "single"), "--checkpoint_dir", str(tmp_path / "single_ck"),
          "--shard_dir", str(tmp_path / "shards_single")], tmp_path)
    ddp = _run(_torchrun(*common, "--batch_size", "4", "--save_dir", str(tmp_path / "ddp"),
                         "--checkpoint_dir", str(tmp_path / "ddp_ck"), "--shard_dir", str(tmp_path / "shards_ddp")),
               tmp_path)
    # one build, no leftovers of a second (racing) build
    assert (tmp_path / "shards_ddp" / "meta.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards_ddp.")], list(tmp_path.iterdir())
    assert ddp.stderr.count("tokenizing") <= 1
    single = [r["loss"] for r in _metrics(tmp_path / "single" / "pretrain_64_metrics.jsonl")]
    two = [r["loss"] for r in _metrics(tmp_path / "ddp" / "pretrain_64_metrics.jsonl")]
    assert len(single) == len(two) == 6
    # Same global batch (2 ranks x 4 rows == 1 x 8 rows), all rows full: identical up to float
    # reduction order.  Without the all-reduce the ranks would diverge after step 1.
    torch.testing.assert_close(torch.tensor(two), torch.tensor(single), rtol=1e-4, atol=1e-5)
    assert single[-1] < single[0]


def test_ddp_sft_weights_every_token_the_same_across_ranks(ws, tmp_path):
    """SFT rows with very uneven assistant-token counts: averaging the ranks' losses equally would
    weight a token on the sparse rank more.  DDP must match one process to float precision."""
    common = ["sft", "--data_path", str(ws["sft"]), "--max_seq_len", "64", "--max_steps", "5",
              "--from_weight", "none", "--add_system_ratio", "0", "--empty_think_ratio", "1",
              "--shard_dir", str(ws["root"] / "sft_shards"), *_common(ws)]
    _run([sys.executable, "-m", "minimind.cli", *common, "--batch_size", "4", "--save_dir",
          str(tmp_path / "single"), "--checkpoint_dir", str(tmp_path / "c1")], tmp_path)
    _run(_torchrun(*common, "--batch_size", "2", "--save_dir", str(tmp_path / "ddp"),
                   "--checkpoint_dir", str(tmp_path / "c2")), tmp_path)
    single = _metrics(tmp_path / "single" / "full_sft_64_metrics.jsonl")
    two = _metrics(tmp_path / "ddp" / "full_sft_64_metrics.jsonl")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two]),
                               torch.tensor([r["loss"] for r in single]), rtol=2e-5, atol=1e-6)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "single" / "full_sft_64.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "full_sft_64.safetensors"))
    assert_same_weights(a, b, rtol=1e-5)


def test_rank_token_weights_differ_in_this_data(ws):
    """The previous test can only see a wrong cross-rank weighting if the two ranks' rows really hold
    different numbers of target tokens: check that they do, by a margin that an equal average of
    the ranks' losses would turn into a visible loss difference."""
    from minimind.config import TrainConfig
    from minimind.tokenizer import MiniMindTokenizer
    from minimind.train.stages import SFT
    cfg = TrainConfig(stage="sft", data_path=str(ws["sft"]), tokenizer_path=str(ws["tok"]), max_seq_len=64,
                      shard_dir=str(ws["root"] / "sft_shards_check"), preset="tiny", hidden_size=64,
                      num_hidden_layers=2, vocab_size=400, add_system_ratio=0.0, empty_think_ratio=1.0,
                      progress=0, num_workers=1)
    ds = SFT.build_dataset(cfg, MiniMindTokenizer.from_dir(ws["tok"]))
    ratios = []
    for step in range(5):  # rows of step s: rank 0 reads 4s..4s+1, rank 1 reads 4s+2..4s+3
        r0 = ds.get_batch(0, range(4 * step, 4 * step + 2)).num_target_tokens
        r1 = ds.get_batch(0, range(4 * step + 2, 4 * step + 4)).num_target_tokens
        ratios.append(max(r0, r1) / max(min(r0, r1), 1))
    assert max(ratios) > 1.3, ratios


def _ddp_worker(rank: int, world: int, port: int, cfg_kw: dict, kill_at: int, result_file: str) -> None:
    """One rank of an in-process 2-rank run (spawned): train, optionally 'killed' after step ``kill_at``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from minimind.config import TrainConfig
    from minimind.tokenizer import MiniMindTokenizer
    from minimind.train.loop import train
    from minimind.train.stages import PRETRAIN

    class Killed(RuntimeError):
        pass

    def on_step(step: int, record: dict) -> None:
        if step == kill_at:
            raise Killed()

    import gc

    import torch.distributed as dist
    destroy, alive = dist.destroy_process_group, []

    def counting_destroy(*a, **kw):  # DDP wrappers still alive when the group goes (see cleanup())
        gc.collect()
        alive.append(sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()))
        return destroy(*a, **kw)

    dist.destroy_process_group = counting_destroy
    cfg = TrainConfig(**cfg_kw)
    try:
        res = train(PRETRAIN, cfg, MiniMindTokenizer.from_dir(cfg.tokenizer_path), on_step=on_step)
    except Killed:
        # A kill is abrupt: leave without tearing down (a normal return lets the interpreter destroy
        # gloo's threads in arbitrary order, which sometimes aborts the process with SIGABRT).
        os._exit(0)
    if rank == 0:
        Path(result_file).write_text(json.dumps(res.losses))
        Path(result_file + ".alive").write_text(json.dumps(alive))


def _spawn(cfg_kw: dict, kill_at: int, result_file: Path) -> None:
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, cfg_kw, kill_at, str(result_file)), nprocs=2, join=True)


def test_ddp_resume_restores_each_ranks_rng(ws, tmp_path):
    """With dropout each rank draws its own masks: a resumed 2-process run must continue both ranks'
    RNG streams (not rank 0's on both) to reproduce the uninterrupted run's losses."""
    base = dict(stage="pretrain", data_path=str(ws["pre"]), tokenizer_path=str(ws["tok"]),
                shard_dir=str(ws["root"] / "pre_shards"), preset="tiny", hidden_size=64, num_hidden_layers=2,
                vocab_size=400, batch_size=4, max_seq_len=64, learning_rate=3e-3, warmup_steps=2,
                log_interval=1, save_interval=3, progress=0, num_workers=1, device="cpu", dtype="float32",
                seed=7, dropout=0.2, max_steps=6)
    _spawn({**base, "save_dir": str(tmp_path / "a"), "checkpoint_dir": str(tmp_path / "a_ck")}, 0,
           tmp_path / "full.json")
    full = json.loads((tmp_path / "full.json").read_text())
    # the DDP wrapper is gone before the group is destroyed (else gloo may abort the process at exit)
    assert json.loads((tmp_path / "full.json.alive").read_text()) == [0]
    part = {**base, "save_dir": str(tmp_path / "b"), "checkpoint_dir": str(tmp_path / "b_ck")}
    _spawn(part, 4, tmp_path / "unused.json")  # killed after step 4; the last checkpoint is step 3
    state = torch.load(tmp_path / "b_ck" / "pretrain_64_resume.pt", weights_only=True)
    assert state["step"] == 3 and len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
    _spawn({**part, "from_resume": 1}, 0, tmp_path / "resumed.json")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed == full[3:], (full, resumed)


def _rl_worker(rank: int, world: int, port: int, cfg_kw: dict, out_dir: str) -> None:
    """One rank of a 2-rank GRPO run: writes its final weights' checksum and the prompts it rolled out."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from minimind.config import TrainConfig
    from minimind.tokenizer import MiniMindTokenizer
    from minimind.train.core import Trainer
    from minimind.train.stages import rl_recipe as rl_trainer
    from minimind.train.stages.rl import GRPOOptions, GRPOStage

    held: dict = {}
    setup = Trainer.setup_model

    def checksum(model) -> float:
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    def keep_model(self):  # the driver does not hand its model out: keep a reference to it
        held["model"] = setup(self)
        held["init"] = checksum(held["model"])
        return held["model"]

    Trainer.setup_model = keep_model
    seen: list[str] = []
    rollout = rl_trainer.rollout

    def record_prompts(stage, backend, tokenizer, rows, *a, **kw):
        seen.extend(r.messages[-1]["content"] for r in rows)
        return rollout(stage, backend, tokenizer, rows, *a, **kw)

    rl_trainer.rollout = record_prompts
    cfg = TrainConfig(**cfg_kw)
    from minimind.rl.toy import register_toy_reward
    register_toy_reward()  # a leading digit scores too: a fresh model's groups then differ in reward
    opts = GRPOOptions(loss_type="grpo", num_generations=4, beta=0.0, reward="task:1,toy_digit:1",
                       max_gen_len=8, temperature=1.0, thinking_ratio=0.0)
    GRPOStage(opts).run(cfg, MiniMindTokenizer.from_dir(cfg.tokenizer_path))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"init": held["init"], "checksum": checksum(held["model"]), "prompts": seen}))


def test_ddp_grpo_keeps_replicas_identical_while_ranks_roll_out_different_prompts(ws, tmp_path):
    """Each rank samples its own prompts, so its gradient differs; the all-reduce must leave both
    replicas with the same weights after every step (and they must have moved)."""
    import socket

    import torch.multiprocessing as mp

    from minimind.tasks import generate_tasks, task_to_rl_row
    data = tmp_path / "rl.jsonl"
    tasks = generate_tasks(64, seed=0, kinds=["arithmetic"], split="train", level="easy")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(task_to_rl_row(t), ensure_ascii=False) + "\n" for t in tasks)
    cfg_kw = {"stage": "grpo", "save_weight": "grpo", "data_path": str(data), "tokenizer_path": str(ws["tok"]),
              "save_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ck"), "from_weight": "none",
              "preset": "tiny", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 400, "batch_size": 2,
              "max_seq_len": 64, "learning_rate": 1e-2, "warmup_steps": 0, "min_lr_ratio": 1.0,
              "weight_decay": 0.0, "log_interval": 1, "save_interval": 0, "progress": 0, "device": "cpu",
              "dtype": "float32", "seed": 3, "max_steps": 3}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rl_worker, args=(2, port, cfg_kw, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["prompts"]) == len(r1["prompts"]) == 3 * 2 and not set(r0["prompts"]) & set(r1["prompts"])
    assert r0["init"] == r1["init"] and r0["checksum"] == r1["checksum"]
    assert r0["checksum"] != r0["init"]  # trained: the identical result is the all-reduce, not inaction
    metrics = [json.loads(ln) for ln in (tmp_path / "out" / "grpo_64_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward" in m] == [1, 2, 3]


def _bf16_grads_worker(rank: int, world: int, port: int, result_file: str) -> None:
    """One rank: a linear layer wrapped by :func:`wrap_ddp` with ``bf16_grads``; rank-specific data."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from minimind.train.distributed import DistInfo, cleanup, wrap_ddp
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = torch.nn.Linear(16, 8, bias=False)
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(10 + rank))
        local = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
        ddp = wrap_ddp(layer, DistInfo(rank, world, rank), torch.device("cpu"), bf16_grads=True)
        ddp(x).square().sum().backward()
        locals_ = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(locals_, local)
        if rank == 0:
            torch.save({"reduced": layer.weight.grad, "locals": locals_,
                        "bucket_view": ddp.gradient_as_bucket_view}, result_file)
        del ddp  # before the group goes: see cleanup()
        cleanup(DistInfo(rank, world, rank), finished=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_bf16_gradient_compression_averages_in_bf16(tmp_path):
    """``--ddp_bf16_grads``: the averaged gradient is the fp32 mean to bf16 precision, and every value is
    a bf16 number (the all-reduce ran in bf16); gradients are views of DDP's buckets."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.spawn(_bf16_grads_worker, args=(2, port, str(out)), nprocs=2, join=True)
    res = torch.load(out)
    mean = torch.stack(res["locals"]).mean(0)
    reduced = res["reduced"]
    torch.testing.assert_close(reduced, mean, rtol=1.6e-2, atol=1e-3)
    assert torch.equal(reduced, reduced.bfloat16().float())
    assert not torch.equal(reduced, mean)  # fp32 all-reduce would give the mean exactly (2 ranks)
    assert res["bucket_view"]


def test_mfu_peak_table_names_the_common_gpus(monkeypatch):
    """MFU's denominator on CUDA: the card's dense bf16 peak (TF32 in fp32: half)."""
    from minimind.train import device as dev
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert dev.peak_flops(cuda, torch.bfloat16) == 989e12
    assert dev.peak_flops(cuda, torch.float32) == 989e12 / 2
    expected = {"NVIDIA GeForce RTX 3090": 71e12, "NVIDIA GeForce RTX 4090": 165e12,
                "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA L40S": 362e12}
    for name, peak in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert dev.peak_flops(cuda, torch.bfloat16) == pytest.approx(peak), name
