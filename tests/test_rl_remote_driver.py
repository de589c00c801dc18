"""The RL driver with ``--rollout_backend server``: GRPO and the agent loop through inference servers.

* on the toy task (:mod:`minimind.rl.toy`) the reward rises through the server as it does in-process,
  and at the end the server serves exactly the weights the trainer saved;
* ``minimind grpo`` over two servers, one of them a ``minimind serve`` process killed mid-run: the
  failure is reported and the run finishes on the other; with no server left the run stops with an
  error naming every server -- it never hangs (every request has a timeout);
* the agent loop (tool turns) runs a step through the server;
* ``--overlap 1`` samples step k + 1 on the weights from before step k's update (the server's stamps say);
* (slow) two DDP ranks share one server and rank 0 alone pushes the weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from minimind.cli import main
from minimind.model.weights import save_weights
from minimind.rl.remote import RolloutServerError
from minimind.rl.rewards import REWARD_FUNCTIONS, register_reward
from minimind.rl.toy import register_toy_reward, write_toy_task
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.core import build_model
from minimind.train.stages.rl import GRPOOptions, GRPOStage
from tests import rl_fixtures
from tests.test_rl_remote import serve_stack, toy_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

register_toy_reward()


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("rl_remote_driver")
    write_toy_task(root)
    return {"root": root, "tok": MiniMindTokenizer.from_dir(root / "tok")}


def toy_options(**kw: Any) -> GRPOOptions:
    """The toy GRPO options (:func:`tests.rl_fixtures.toy_options`) with rollouts through servers."""
    return rl_fixtures.toy_options(GRPOOptions, **{"rollout_backend": "server", **kw})


def server_for(cfg: Any, tok: Any, slots: int = 64) -> tuple[Any, Any]:
    """An in-thread server whose model has the trainer's shape (its weights are the trainer's after
    the first sync)."""
    model, _ = build_model(cfg, tok.vocab_size)
    return serve_stack(model.eval(), tok, slots=slots)


def test_grpo_through_the_server_raises_the_toy_reward(ws: dict[str, Any], tmp_path: Path) -> None:
    cfg = toy_cfg(tmp_path, max_steps=80, epochs=2, data_path=str(ws["root"] / "toy.jsonl"),
                  tokenizer_path=str(ws["root"] / "tok"))
    running, service = server_for(cfg, ws["tok"])
    try:
        res = GRPOStage(toy_options(rollout_url=running.url)).run(cfg, ws["tok"])
        served = {k: v.clone() for k, v in service.engine.model.state_dict().items()}
        version = httpx.get(running.url + "/get_weight_version").json()["weight_version"]
    finally:
        running.stop()
        service.close()
    k = 10
    first, last = sum(res.rewards[:k]) / k, sum(res.rewards[-k:]) / k
    print(f"through the server: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    assert last > first + 0.2, res.rewards
    # one sync before the first rollouts, then one per step that moved the weights
    assert version == str(1 + sum(1 - r["skipped"] for r in res.records))
    saved = load_file(str(res.weights_path))
    for name, tensor in saved.items():
        torch.testing.assert_close(served[name], tensor, rtol=0, atol=0)


def _varied_reward(prompt: str, completion: str, **_: Any) -> float:
    """A reward that differs between samples (so every step has signal and updates the weights)."""
    return float(sum(map(ord, completion)) % 5)


if "toy_varied" not in REWARD_FUNCTIONS:
    register_reward("toy_varied")(_varied_reward)


@pytest.mark.parametrize("overlap", [0, 1])
def test_overlap_samples_the_next_step_on_the_previous_weights(ws: dict[str, Any], tmp_path: Path,
                                                               overlap: int) -> None:
    """Which weights each step's rollouts came from, read off the server's version stamps: in
    lockstep step k samples version k + 1 (one sync per step, the first before step 0); with
    ``--overlap 1`` step k + 1 is generated while step k trains, so version 1 serves steps 0 and 1."""
    cfg = toy_cfg(tmp_path, data_path=str(ws["root"] / "toy.jsonl"), tokenizer_path=str(ws["root"] / "tok"),
                  batch_size=4, max_steps=4)
    running, service = server_for(cfg, ws["tok"])
    handles: list[Any] = []
    stamped = service.submit

    def recording_submit(*args: Any, **kwargs: Any) -> Any:
        handles.append(stamped(*args, **kwargs))
        return handles[-1]

    service.submit = recording_submit  # type: ignore[method-assign]
    try:
        stage = GRPOStage(toy_options(num_generations=4, reward="toy_varied:1", rollout_url=running.url,
                                      overlap=overlap))
        res = stage.run(cfg, ws["tok"])
    finally:
        running.stop()
        service.close()
    assert [r["skipped"] for r in res.records] == [0, 0, 0, 0]
    versions = [getattr(h.request, "held_version", None) or h.request.submit_version for h in handles]
    per_step = 4 * 4
    assert len(versions) == 4 * per_step
    steps = [versions[k * per_step:(k + 1) * per_step] for k in range(4)]
    want = [["1"], ["1"], ["2"], ["3"]] if overlap else [["1"], ["2"], ["3"], ["4"]]
    assert [sorted(set(v)) for v in steps] == want


def _ddp_worker(rank: int, world: int, port: int, cfg_kw: dict[str, Any], url: str, out_dir: str) -> None:
    """One rank of a 2-process GRPO run whose rollouts go to the parent's server."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from minimind.train.core import Trainer
    held: dict[str, Any] = {}
    setup = Trainer.setup_model

    def keep_model(self: Any) -> Any:
        held["model"] = setup(self)
        return held["model"]

    Trainer.setup_model = keep_model  # type: ignore[method-assign]
    register_toy_reward()
    cfg = toy_cfg(Path(out_dir), **cfg_kw)
    res = GRPOStage(toy_options(num_generations=4, reward="toy_varied:1", rollout_url=url)).run(
        cfg, MiniMindTokenizer.from_dir(cfg.tokenizer_path))
    checksum = float(sum(p.detach().double().sum() for p in held["model"].parameters()))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"checksum": checksum, "steps": res.steps}))


@pytest.mark.slow  # two spawned processes: ~25 s on this CPU
def test_ddp_grpo_through_one_server_syncs_once_per_step(ws: dict[str, Any], tmp_path: Path) -> None:
    """Two ranks roll out on one server; rank 0 alone pushes the weights (the other waits at a
    barrier), so the server loads one version per step and ends on the replicas' weights."""
    import torch.multiprocessing as mp
    cfg_kw = {"data_path": str(ws["root"] / "toy.jsonl"), "tokenizer_path": str(ws["root"] / "tok"),
              "batch_size": 2, "max_steps": 3}
    running, service = server_for(toy_cfg(tmp_path, **cfg_kw), ws["tok"])
    try:
        mp.spawn(_ddp_worker, args=(2, _free_port(), cfg_kw, running.url, str(tmp_path)), nprocs=2, join=True)
        weights = running.server.config.app.state.weights
        served = {k: v.clone() for k, v in service.engine.model.state_dict().items()}
    finally:
        running.stop()
        service.close()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 3 and r0["checksum"] == r1["checksum"]
    assert weights.updates == 1 + 3 and weights.version == "4"  # the first sync, then one per step
    saved = load_file(str(next((tmp_path / "out").glob("grpo_*.safetensors"))))
    for name, tensor in saved.items():
        torch.testing.assert_close(served[name], tensor, rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_minimind_serve(weights: Path, tok_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-c", "import sys; from minimind.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", "--weight", str(weights), "--tokenizer", str(tok_dir), "--port", str(port), "--no_ui",
           "--device", "cpu", "--dtype", "float32", "--slots", "64", "--log_level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"minimind serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("minimind serve did not start within 90 s")


def test_cli_grpo_survives_a_killed_server(ws: dict[str, Any], tmp_path: Path, capsys) -> None:
    cfg = toy_cfg(tmp_path)
    model, _ = build_model(cfg, ws["tok"].vocab_size)
    weights = save_weights(model, tmp_path / "served.safetensors")
    proc, doomed = _start_minimind_serve(weights, ws["root"] / "tok")
    running, service = server_for(cfg, ws["tok"])
    metrics = tmp_path / "metrics.jsonl"

    def kill_after_two_steps() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_two_steps, daemon=True)
    killer.start()
    try:
        rc = main(["grpo", "--data_path", str(ws["root"] / "toy.jsonl"),
                   "--tokenizer_path", str(ws["root"] / "tok"), "--save_dir", str(tmp_path / "out"),
                   "--checkpoint_dir", str(tmp_path / "ckpt"), "--from_weight", "none", "--hidden_size", "32",
                   "--num_hidden_layers", "2", "--preset", "tiny", "--device", "cpu", "--dtype", "float32",
                   "--max_steps", "6", "--batch_size", "4", "--num_generations", "4", "--max_gen_len", "2",
                   "--reward", "toy_digit:1", "--thinking_ratio", "0", "--progress", "0",
                   "--learning_rate", "1e-2", "--metrics_path", str(metrics),
                   "--rollout_backend", "server", "--rollout_url", f"{doomed},{running.url}",
                   "--rollout_timeout", "30"])
        killer.join(5)
        err = capsys.readouterr().err
        assert rc == 0 and proc.poll() is not None
        # found dead by a rollout request or by the next weight sync, whichever came first
        assert f"rollout server {doomed} failed" in err or f"rollout server {doomed} did not load" in err
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6]

        # the last server goes away mid-run: a clear error naming it, not a hang
        def stop_at_step_2(step: int, rec: dict[str, Any]) -> None:
            if step == 2:
                running.stop()

        cfg2 = toy_cfg(tmp_path / "b", data_path=str(ws["root"] / "toy.jsonl"),
                       tokenizer_path=str(ws["root"] / "tok"), batch_size=4)
        stage = GRPOStage(toy_options(num_generations=4, rollout_url=running.url, rollout_timeout=30.0))
        with pytest.raises(RolloutServerError, match=f"no rollout server left.*{running.url}"):
            stage.run(cfg2, ws["tok"], on_step=stop_at_step_2)
    finally:
        proc.kill()
        running.stop()
        service.close()


def test_cli_without_a_reachable_server_is_a_one_line_error(ws: dict[str, Any], tmp_path: Path,
                                                             capsys) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    rc = main(["grpo", "--data_path", str(ws["root"] / "toy.jsonl"),
               "--tokenizer_path", str(ws["root"] / "tok"),
               "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
               "--from_weight", "none", "--hidden_size", "32", "--num_hidden_layers", "2", "--preset", "tiny",
               "--device", "cpu", "--max_steps", "2", "--batch_size", "2", "--num_generations", "2",
               "--max_gen_len", "2", "--reward", "toy_digit:1", "--beta", "0", "--progress", "0",
               "--rollout_backend", "server", "--rollout_url", closed, "--rollout_timeout", "10"])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: no rollout server loaded the new weights ({closed}: ConnectError" in err
    assert "Traceback" not in err
    rc = main(["grpo", "--data_path", str(ws["root"] / "toy.jsonl"), "--rollout_backend", "server"])
    assert rc == 2 and "--rollout_backend server needs --rollout_url" in capsys.readouterr().err


def test_agent_runs_a_step_through_the_server(tmp_path: Path) -> None:
    """Tool episodes through the server: turns, tool calls and rewards as in-process."""
    from minimind.train.stages.rl import AgentStage
    data, tok = rl_fixtures.agent_task(tmp_path)
    cfg = toy_cfg(tmp_path, stage="agent", save_weight="agent", data_path=str(data),
                  tokenizer_path=str(tmp_path / "tok"), batch_size=2, max_steps=1, max_seq_len=1900,
                  vocab_size=tok.vocab_size)
    running, service = server_for(cfg, tok, slots=8)
    asked: list[int] = []
    real_submit = service.submit

    def counting_submit(*args: Any, **kwargs: Any) -> Any:
        asked.append(len(args[0]))
        return real_submit(*args, **kwargs)

    service.submit = counting_submit  # type: ignore[method-assign]
    try:
        stage = AgentStage(rl_fixtures.agent_options(rollout_backend="server", rollout_url=running.url))
        res = stage.run(cfg, tok)
    finally:
        running.stop()
        service.close()
    assert res.steps == 1 and {"turns", "tool_calls", "reward/task/mean"} <= set(res.records[0])
    assert len(asked) >= 4  # every sample of the first turn went through the server
