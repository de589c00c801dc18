"""RL rollouts on an inference server: ``minimind serve``'s SGLang routes and the HTTP rollout backend.

Servers run on free 127.0.0.1 ports (uvicorn in a thread, or ``minimind serve`` in a subprocess); the
model is the toy task's tiny 2-layer one, so every check is exact and fast:

* with greedy decoding the server's token ids and log-probs equal the in-process engine's;
* after a weight sync the server's log-probs of a fixed completion equal the trainer's new policy's,
  and a sample of any other version is refused;
* a weight update lets the request that is decoding finish on the old weights and runs the one that
  was waiting on the new weights;
* the request/response shapes of both dialects match the documented SGLang / vLLM formats.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from minimind.config import TrainConfig
from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams, derive_seed
from minimind.infer.service import EngineService
from minimind.rl.remote import HTTPRolloutBackend, RolloutServerError
from minimind.rl.remote_dialects import MalformedResponse, OpenAICompletions, SGLangGenerate, Unit
from minimind.rl.toy import write_toy_task
from minimind.serve.app import create_app
from minimind.serve.rollout_api import WEIGHT_VERSION_HEADER
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.core import build_model
from minimind.train.losses import token_logps
from tests.tiny_server import Running

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers -----------------------------------------------------------------------------------------
def toy_cfg(root: Path, **kw: Any) -> TrainConfig:
    """The RL tests' toy configuration (2 layers, width 32, the toy task's tokenizer)."""
    base: dict[str, Any] = {
        "stage": "grpo", "save_weight": "grpo", "data_path": str(root / "toy.jsonl"),
        "tokenizer_path": str(root / "tok"), "save_dir": str(root / "out"),
        "checkpoint_dir": str(root / "ckpt"), "from_weight": "none", "preset": "tiny",
        "hidden_size": 32, "num_hidden_layers": 2, "batch_size": 8, "max_seq_len": 64, "learning_rate": 1e-2,
        "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "log_interval": 1, "save_interval": 0,
        "progress": 0, "device": "cpu", "dtype": "float32", "seed": 0, "max_steps": 4}
    base.update(kw)
    return TrainConfig(**base)


def serve_stack(model: Any, tok: Any, slots: int = 16) -> tuple[Running, EngineService]:
    """``create_app`` + the rollout routes over an engine service of ``model``."""
    service = EngineService(GenerationEngine(model, tok, num_slots=slots))
    app = create_app(service, "toy", static_dir=None, max_rows_per_request=4096, max_queue=4096)
    return Running(app), service


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("rl_remote")
    write_toy_task(root)
    tok = MiniMindTokenizer.from_dir(root / "tok")
    torch.manual_seed(0)
    model, _ = build_model(toy_cfg(root), tok.vocab_size)
    return {"root": root, "tok": tok, "model": model.eval()}


@pytest.fixture(scope="module")
def server(toy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    import copy
    served = copy.deepcopy(toy["model"])  # the server's own copy: syncs must reach it over HTTP
    running, service = serve_stack(served, toy["tok"])
    yield {"url": running.url, "service": service, "model": served}
    running.stop()
    service.close()


def prompts(tok: Any, k: int = 4) -> list[list[int]]:
    texts = [f"say {d}" for d in range(k)]
    return [list(tok.encode(tok.apply_chat_template([{"role": "user", "content": t}],
                                                    add_generation_prompt=True, tokenize=False)))
            for t in texts]


def full_forward_logps(model: Any, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[k] | prompt + completion[:k]) by one forward of the whole sequence."""
    ids = torch.tensor([prompt + completion])
    targets = torch.full_like(ids, -100)
    targets[0, len(prompt) - 1:-1] = torch.tensor(completion)
    with torch.no_grad():
        lp = token_logps(model(ids).logits, targets)
    return lp[0, len(prompt) - 1:-1]


# ---- (a) greedy: the server equals the in-process engine ---------------------------------------------
def test_greedy_server_equals_the_in_process_engine(toy: dict[str, Any], server: dict[str, Any]) -> None:
    tok, ps = toy["tok"], prompts(toy["tok"])
    server["model"].load_state_dict(toy["model"].state_dict())
    params = SamplingParams(max_new_tokens=12, temperature=0.0, greedy=True, top_k=0, top_p=1.0,
                            stop_token_ids=(tok.eos_id,))
    local = GenerationEngine(toy["model"], tok, num_slots=16).generate(ps, params, n=2, logprobs=True)
    backend = HTTPRolloutBackend(server["url"], tokenizer=tok, sync_interval=0, chunks_per_server=2)
    try:
        remote = backend.generate(ps, params, 2)
    finally:
        backend.close()
    assert len(remote) == len(local) == 8
    for a, b in zip(remote, local):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason and a.stop == b.stop and a.text == b.text
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    assert not backend.failures


def test_sampled_groups_draw_distinct_seeds(toy: dict[str, Any], server: dict[str, Any]) -> None:
    """``n`` samples of one prompt go out with different seeds; the same call seed reproduces them."""
    tok = toy["tok"]
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=0, top_p=1.0,
                            stop_token_ids=(tok.eos_id,),
                            seed=123)
    backend = HTTPRolloutBackend(server["url"], tokenizer=tok, sync_interval=0)
    try:
        first = backend.generate(prompts(tok, 1), params, 6)
        again = backend.generate(prompts(tok, 1), params, 6)
    finally:
        backend.close()
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in first}) > 1
    assert derive_seed(123, 0, 0) != derive_seed(123, 0, 1)


# ---- (b) weight sync ------------------------------------------------------------------------------------
def test_sync_makes_the_server_score_like_the_new_policy(toy: dict[str, Any], server: dict[str, Any],
                                                         tmp_path: Path) -> None:
    import copy
    tok = toy["tok"]
    policy = copy.deepcopy(toy["model"])
    with torch.no_grad():  # an "optimizer step": every weight moves
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    backend = HTTPRolloutBackend(server["url"], tokenizer=tok, sync_dir=tmp_path, sync_interval=1)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
                            stop_token_ids=(tok.eos_id,),
                            seed=7)
    try:
        backend.refresh(policy)  # the driver calls this after each optimizer step
        assert backend.expected_version == "1"
        assert httpx.get(server["url"] + "/get_weight_version").json() == {"weight_version": "1"}
        ps = prompts(tok, 2)
        results = backend.generate(ps, params, 2)
    finally:
        backend.close()
    for k, r in enumerate(results):
        want = full_forward_logps(policy, ps[k // 2], r.token_ids)
        torch.testing.assert_close(torch.tensor(r.logprobs), want, rtol=0, atol=1e-4)
    # the old policy scores the same tokens differently: the check above could fail
    old = full_forward_logps(toy["model"], ps[0], results[0].token_ids)
    assert (old - torch.tensor(results[0].logprobs)).abs().max() > 1e-3


def test_stale_weights_are_refused(toy: dict[str, Any], server: dict[str, Any]) -> None:
    tok = toy["tok"]
    backend = HTTPRolloutBackend(server["url"], tokenizer=tok, sync_interval=0, log=lambda _: None)
    backend.expected_version = "not-served"
    params = SamplingParams(max_new_tokens=2, temperature=0.0, greedy=True, stop_token_ids=(tok.eos_id,))
    try:
        with pytest.raises(RolloutServerError, match="expected 'not-served'"):
            backend.generate(prompts(tok, 1), params, 1)
    finally:
        backend.close()
    assert backend.failures and "weight version" in backend.failures[0].reason


def test_update_lets_running_requests_finish_on_the_old_weights(toy: dict[str, Any], tmp_path: Path) -> None:
    """One slot: request A decodes, B waits in the engine's queue, then an update arrives.  A must
    finish on the old weights and B run entirely on the new ones, and each names its version."""
    import copy

    from minimind.model.weights import save_weights
    tok = toy["tok"]
    served = copy.deepcopy(toy["model"])
    running, service = serve_stack(served, tok, slots=1)
    new = copy.deepcopy(toy["model"])
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_weights(new, tmp_path / "new.safetensors")
    p0 = prompts(tok, 1)[0]
    body = {"input_ids": p0, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}
    answers: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            a = threading.Thread(target=lambda: answers.update(a=http.post("/generate", json=body).json()))
            a.start()
            while service.active_rows == 0:
                time.sleep(0.001)
            b = service.submit(p0, SamplingParams(max_new_tokens=200, temperature=0.0, greedy=True,
                                                  stop_token_ids=()), logprobs=True)
            assert service.waiting == 1  # one slot: B waits for A
            up = http.post("/update_weights_from_disk",
                           json={"model_path": str(path), "weight_version": "v2"})
            a.join(60)
            list(b)  # B's events, to its end
            assert up.json() == {"success": True, "message": f"loaded {path} as weight version v2",
                                 "num_paused_requests": 1, "weight_version": "v2"}
            assert up.headers[WEIGHT_VERSION_HEADER] == "v2"
            bad = http.post("/update_weights_from_disk",
                            json={"model_path": str(tmp_path / "none.safetensors")})
            assert bad.json()["success"] is False and "not found" in bad.json()["message"]
            assert http.get("/get_weight_version").json() == {"weight_version": "v2"}
    finally:
        running.stop()
        service.close()
    meta = answers["a"]["meta_info"]
    assert meta["weight_version"] == "0"
    ids = [e[1] for e in meta["output_token_logprobs"]]
    assert ids == answers["a"]["output_ids"] and len(ids) == 200
    torch.testing.assert_close(torch.tensor([e[0] for e in meta["output_token_logprobs"]]),
                               full_forward_logps(toy["model"], p0, ids), rtol=0, atol=1e-4)
    result = b.results[0]
    assert b.request.held_version == "v2" and len(result.token_ids) == 200
    torch.testing.assert_close(torch.tensor(result.logprobs), full_forward_logps(new, p0, result.token_ids),
                               rtol=0, atol=1e-4)


def test_a_dead_server_is_reported_and_its_prompts_served_elsewhere(toy: dict[str, Any],
                                                                    server: dict[str, Any]) -> None:
    tok = toy["tok"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused
    seen: list[str] = []
    backend = HTTPRolloutBackend(f"{dead},{server['url']}", tokenizer=tok, sync_interval=0, log=seen.append)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, greedy=True, stop_token_ids=(tok.eos_id,))
    try:
        results = backend.generate(prompts(tok), params, 2)
        assert len(results) == 8 and backend.live_urls == [server["url"]]
        assert backend.failures[0].url == dead and "ConnectError" in backend.failures[0].reason
        assert seen and dead in seen[0] and "1 of 2 server(s) left" in seen[0]
    finally:
        backend.close()
    lonely = HTTPRolloutBackend(dead, tokenizer=tok, sync_interval=0, log=seen.append)
    try:
        with pytest.raises(RolloutServerError, match=f"no rollout server left to generate on \\({dead}: "):
            lonely.generate(prompts(tok, 1), params, 1)
    finally:
        lonely.close()


def test_a_busy_server_is_asked_again_not_failed() -> None:
    """429 (the server's queue is full) is transient: the chunk waits Retry-After and asks again."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    stub = FastAPI()
    calls: list[int] = []

    @stub.post("/generate")
    def generate(body: dict[str, Any]) -> Any:
        calls.append(len(body["input_ids"]))
        if len(calls) == 1:
            return JSONResponse({"error": {"message": "the server is busy"}}, status_code=429,
                                headers={"Retry-After": "0"})
        return [{"text": "", "output_ids": [7, 2], "meta_info": {
            "finish_reason": {"type": "stop", "matched": 2}, "output_token_logprobs": [[-1.0, 7, None],
                                                                                    [-0.5, 2, None]]}}]

    running = Running(stub)
    backend = HTTPRolloutBackend(running.url, sync_interval=0, log=lambda _: None)
    try:
        (result,) = backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, stop_token_ids=(2,)), 1)
    finally:
        backend.close()
        running.stop()
    assert calls == [1, 1] and not backend.failures
    assert result.token_ids == [7, 2] and result.logprobs == [-1.0, -0.5] and result.stop == 2


def test_a_server_slower_than_the_timeout_is_failed_not_waited_on() -> None:
    """A server that accepts the request and then never answers (frozen, swapping) is failed after
    ``--rollout_timeout`` seconds with a reason naming the timeout: the run never hangs on it."""
    from fastapi import FastAPI
    stub = FastAPI()
    release = threading.Event()

    @stub.post("/generate")
    def generate(body: dict[str, Any]) -> Any:
        release.wait(30)  # far past the backend's timeout
        return []

    running = Running(stub)
    backend = HTTPRolloutBackend(running.url, sync_interval=0, timeout=0.5, log=lambda _: None)
    started = time.monotonic()
    try:
        with pytest.raises(RolloutServerError, match="no rollout server left") as err:
            backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, stop_token_ids=(2,)), 1)
        waited = time.monotonic() - started
    finally:
        release.set()
        backend.close()
        running.stop()
    assert waited < 20, f"waited {waited:.1f} s on a server the backend gives 0.5 s"
    assert backend.failures and "Timeout" in backend.failures[0].reason, backend.failures
    assert running.url in str(err.value)


def test_overlap_without_tis_warns() -> None:
    """``--overlap 1`` samples one step off-policy; with ``--tis_cap 0`` nothing corrects that, so the
    options say so (and say nothing once a cap is set)."""
    from minimind.rl.options import RLOptions
    base = dict(rollout_backend="server", rollout_url="http://127.0.0.1:1", overlap=1)
    with pytest.warns(RuntimeWarning, match="--overlap 1 with --tis_cap 0"):
        RLOptions(**base).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RLOptions(**base, tis_cap=2.0).validate()
        RLOptions(**{**base, "overlap": 0}).validate()


# ---- the documented request/response shapes ------------------------------------------------------------
def test_sglang_dialect_shapes() -> None:
    """Request keys and response fields as SGLang documents ``/generate`` (GenerateReqInput, meta_info)."""
    params = SamplingParams(max_new_tokens=5, temperature=0.7, top_k=0, top_p=0.9, stop_token_ids=(2,),
                            seed=3)
    path, body = SGLangGenerate().request([Unit(0, [5, 6], params), Unit(1, [7], params)], 2, None)
    assert path == "/generate" and body["return_logprob"] is True
    assert body["input_ids"] == [[5, 6], [5, 6], [7], [7]]
    sp = body["sampling_params"]
    assert len(sp) == 4 and sp[0]["max_new_tokens"] == 5 and sp[0]["top_k"] == -1
    assert sp[0]["stop_token_ids"] == [2]
    assert len({s["sampling_seed"] for s in sp}) == 4
    documented = [{"text": "ab", "output_ids": [9, 2], "meta_info": {
        "id": "x", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 2,
        "completion_tokens": 2,
        "weight_version": "default", "output_token_logprobs": [[-0.5, 9, None], [-0.25, 2, None]]}}] * 4
    resp = httpx.Response(200, json=documented)
    samples = SGLangGenerate().parse(resp, 2, 2)
    assert samples[0].token_ids == [9, 2] and samples[0].logprobs == [-0.5, -0.25]
    assert samples[0].stop == 2 and samples[0].finish_reason == "stop" and samples[0].version == "default"
    with pytest.raises(MalformedResponse, match="expected 4"):
        SGLangGenerate().parse(httpx.Response(200, json=documented[:3]), 2, 2)
    no_lp = [{"text": "", "output_ids": [9], "meta_info": {"finish_reason": {"type": "length"}}}]
    with pytest.raises(MalformedResponse, match="return_logprob"):
        SGLangGenerate().parse(httpx.Response(200, json=no_lp), 1, 1)


def test_vllm_dialect_shapes() -> None:
    """Request keys and response fields as vLLM documents ``/v1/completions`` with
    ``return_tokens_as_token_ids`` (tokens read ``token_id:<id>``, ``index = prompt * n + sample``)."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(2,),
                            seed=1)
    path, body = OpenAICompletions().request([Unit(0, [5, 6], params), Unit(1, [7], params)], 2, "m")
    assert path == "/v1/completions"
    assert body["prompt"] == [[5, 6], [7]] and body["n"] == 2 and body["logprobs"] == 0
    assert body["return_tokens_as_token_ids"] is True and body["max_tokens"] == 4 and body["model"] == "m"
    choices = [{"index": i, "text": "x", "finish_reason": "stop" if i % 2 else "length", "stop_reason": None,
                "logprobs": {"tokens": ["token_id:9", f"token_id:{i}"], "token_logprobs": [-1.0, -2.0],
                             "top_logprobs": None, "text_offset": [0, 1]}} for i in (3, 1, 0, 2)]
    samples = OpenAICompletions().parse(httpx.Response(200, json={"choices": choices}), 2, 2)
    assert [s.token_ids[-1] for s in samples] == [0, 1, 2, 3]
    assert samples[1].finish_reason == "stop" and samples[0].finish_reason == "length"
    choices[0]["logprobs"]["tokens"] = ["hello", "world"]
    with pytest.raises(MalformedResponse, match="token_id"):
        OpenAICompletions().parse(httpx.Response(200, json={"choices": choices}), 2, 2)
    with pytest.raises(ValueError, match="cannot push weights"):
        HTTPRolloutBackend("http://127.0.0.1:1", dialect="vllm", sync_dir=".", sync_interval=1)


def test_vllm_dialect_through_a_stub_server(toy: dict[str, Any], server: dict[str, Any]) -> None:
    """A stub answering vLLM's documented shapes from the real engine: the backend reads the same
    tokens and log-probs as through SGLang's route."""
    from fastapi import FastAPI
    tok, ps = toy["tok"], prompts(toy["tok"], 2)
    engine = GenerationEngine(toy["model"], tok, num_slots=8)
    stub = FastAPI()
    seen: list[dict[str, Any]] = []

    @stub.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "toy-vllm", "object": "model"}]}

    @stub.post("/v1/completions")
    def completions(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        p = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                           greedy=body["temperature"] == 0, stop_token_ids=tuple(body["stop_token_ids"]))
        res = engine.generate(body["prompt"], p, n=body["n"], logprobs=True)
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": [
            {"index": i, "text": r.text, "finish_reason": r.finish_reason, "stop_reason": None,
             "logprobs": {"tokens": [f"token_id:{t}" for t in r.token_ids], "token_logprobs": r.logprobs,
                          "top_logprobs": None, "text_offset": [0] * len(r.token_ids)}}
            for i, r in enumerate(res)]}

    running = Running(stub)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, greedy=True, stop_token_ids=(tok.eos_id,))
    via_vllm = HTTPRolloutBackend(running.url, dialect="vllm", tokenizer=tok, sync_interval=0)
    via_sglang = HTTPRolloutBackend(server["url"], tokenizer=tok, sync_interval=0)
    server["model"].load_state_dict(toy["model"].state_dict())
    try:
        a, b = via_vllm.generate(ps, params, 2), via_sglang.generate(ps, params, 2)
    finally:
        via_vllm.close()
        via_sglang.close()
        running.stop()
    assert seen and seen[0]["model"] == "toy-vllm" and seen[0]["return_tokens_as_token_ids"] is True
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)
        assert x.text == y.text


def test_generate_route_errors_name_the_field(server: dict[str, Any]) -> None:
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        r = http.post("/generate",
                      json={"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 10 ** 6}})
        assert r.status_code == 400 and "max_new_tokens" in r.json()["error"]["message"]
        r = http.post("/generate", json={"input_ids": [[10 ** 7]]})
        assert r.status_code == 400 and "outside" in r.json()["error"]["message"]
        r = http.post("/generate", json={"input_ids": [1, 2], "stream": True})
        assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
        single = http.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        assert isinstance(single.json(), dict) and single.json()["meta_info"]["completion_tokens"] <= 2
        served = http.get("/get_weight_version").json()["weight_version"]
        assert single.headers[WEIGHT_VERSION_HEADER] == served
    assert json.dumps(single.json())  # plain JSON, no NaN
