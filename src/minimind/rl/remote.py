"""Rollouts on inference servers: a :class:`~minimind.rl.rollout.RolloutBackend` over HTTP.

When RL outgrows one process, rollouts run on inference servers (SGLang, vLLM, ``minimind serve``) and
the trainer trains elsewhere.  :class:`HTTPRolloutBackend` sends token-id prompts to one or more
servers and builds the same :class:`~minimind.infer.scheduler.GenerationResult` s the in-process
engine returns: every sampled id, including the stop token that ended the row, with the log-prob the
server's sampler gave it.  Nothing is re-tokenised.

**Dialects** (:mod:`minimind.rl.remote_dialects`): ``sglang`` is SGLang's native ``/generate``
(``input_ids``, ``return_logprob``, ``meta_info.output_token_logprobs``), which ``minimind serve``
answers exactly; ``vllm`` is vLLM's OpenAI ``/v1/completions`` with token-id prompts, ``logprobs: 0``
and ``return_tokens_as_token_ids``.

**Load balancing and failures.**  A ``generate`` call is cut into chunks of prompts sent concurrently;
each chunk goes to the live server with the fewest chunks in flight.  A chunk whose server fails (the
connection drops, it times out, answers 5xx or a malformed body, or serves stale weights) is retried
on another live server and the failure is reported on stderr and in :attr:`HTTPRolloutBackend.failures`;
when no server is left the call raises :class:`RolloutServerError` naming every server and why it
failed.  A 429 (the server's queue is full) is not a failure: the chunk asks again after
``Retry-After``.  Nothing waits without a bound: every request has a timeout, and so do the retries.

**Weight sync.**  :meth:`HTTPRolloutBackend.refresh` (called by the driver after each optimizer step)
writes the policy's weights every ``sync_interval``-th call, atomically, as an HF folder
(``model.safetensors`` + ``config.json``, the layout ``minimind export hf`` writes) and asks every
server to load them with SGLang's ``POST /update_weights_from_disk`` ``{"model_path", "weight_version"}``
(the servers must see the trainer's filesystem).  The version is then *expected*: a sample whose
server reports another version is refused and its prompts retried elsewhere, so a rollout is never
silently sampled from stale weights.  Servers that failed are offered every new version too, and
come back into service when they load it.  Under DDP rank 0 writes and syncs; every rank waits at a
barrier before its next rollouts.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from torch import nn

from minimind.infer.sampling import SamplingParams
from minimind.infer.scheduler import GenerationResult
from minimind.rl.remote_dialects import DIALECTS, Dialect, MalformedResponse, Unit

__all__ = ["API_KEY_ENV", "HTTPRolloutBackend", "OneStepAhead", "RolloutServerError", "StaleWeightsError",
           "parse_urls", "rollout_option_problems", "rollout_option_warnings",
           "server_backend"]

#: The API key sent to the rollout servers (the one ``minimind serve`` reads too).
API_KEY_ENV = "MINIMIND_API_KEY"


class RolloutServerError(ConnectionError):
    """No rollout server could serve a request (each one's failure is in the message).  A
    ``ConnectionError``, so the CLI reports it as one line (``error: no rollout server left ...``)."""


class StaleWeightsError(RuntimeError):
    """A server answered with weights other than the version the trainer last pushed."""


def parse_urls(spec: str | Sequence[str]) -> list[str]:
    """``"http://a:1,http://b:2"`` -> the URLs without trailing slashes; a bad one is a ``ValueError``
    naming ``--rollout_url``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    if not urls:
        raise ValueError("--rollout_url names no server (e.g. --rollout_url http://127.0.0.1:30000)")
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"--rollout_url: {u!r} is not an http(s):// URL")
    if len(set(urls)) != len(urls):
        raise ValueError(f"--rollout_url lists a server twice: {','.join(urls)}")
    return urls


@dataclass
class _Server:
    url: str
    alive: bool = True
    inflight: int = 0
    served: int = 0  # chunks answered
    model: str | None = None  # the model id, for the OpenAI dialect
    error: str = ""


@dataclass
class Failure:
    """One reported failure: which server, why, and how many prompts were moved elsewhere."""

    url: str
    reason: str
    prompts: int
    left: int


@dataclass
class _Pool:
    """The servers, their health and load; thread-safe."""

    servers: list[_Server]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, exclude: set[str]) -> _Server | None:
        with self.lock:
            live = [s for s in self.servers if s.alive and s.url not in exclude]
            if not live:
                return None
            best = min(live, key=lambda s: (s.inflight, s.served))
            best.inflight += 1
            return best

    def release(self, server: _Server, ok: bool, reason: str = "") -> int:
        """Return a server after a request; a failed one leaves service.  Returns live servers left."""
        with self.lock:
            server.inflight -= 1
            if ok:
                server.served += 1
            else:
                server.alive, server.error = False, reason
            return sum(s.alive for s in self.servers)


class OneStepAhead:
    """``--overlap``: the rollouts of step k+1 are generated on the servers while step k trains.

    The driver starts step k+1's rollout-and-score (:meth:`start`) before step k's update and takes it
    (:meth:`take`) at step k+1.  Those samples come from the weights before step k's update: one step
    off-policy, which the objective's importance weights correct (``--tis_cap``); the weight sync at
    the end of step k waits for them, so each batch is still of one weight version."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self._step: int | None = None
        self._future: Any = None

    def start(self, step: int, fn: Callable[[], Any]) -> None:
        self._step, self._future = step, self._executor.submit(fn)

    def take(self, step: int, fn: Callable[[], Any]) -> Any:
        """Step ``step``'s prefetched result, or ``fn()`` when none was started for it."""
        future, started = self._future, self._step
        self._future = self._step = None
        if future is not None and started == step:
            return future.result()
        return fn()


class HTTPRolloutBackend:
    """:class:`~minimind.rl.rollout.RolloutBackend` over inference servers (see the module docstring).

    ``urls``: one or more server base URLs; ``dialect``: ``"sglang"`` (also ``minimind serve``) or
    ``"vllm"``; ``tokenizer``: decodes each sample's text as the in-process engine does (without its
    stop token); ``sync_dir``: where the policy's weights are written for the servers to load;
    ``sync_interval``: push the weights every k-th :meth:`refresh` (0 = never: the servers keep their
    own weights); ``timeout``: seconds one HTTP request may take; ``chunks_per_server``: concurrent
    requests per live server for one ``generate`` call; ``max_context``: positions a row may use (for
    multi-turn rollouts).
    """

    def __init__(self, urls: str | Sequence[str], dialect: str = "sglang", *, tokenizer: Any = None,
                 sync_dir: str | Path | None = None, sync_interval: int = 1, timeout: float = 600.0,
                 chunks_per_server: int = 2, max_context: int | None = None, api_key: str | None = None,
                 model_name: str | None = None, rank: int = 0, world_size: int = 1,
                 log: Callable[[str], None] | None = None) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"--rollout_dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
        if sync_interval < 0:
            raise ValueError(f"--sync_interval must be >= 0, got {sync_interval}")
        if timeout <= 0 or chunks_per_server < 1:
            raise ValueError("--rollout_timeout must be > 0 and chunks_per_server >= 1")
        self.dialect: Dialect = DIALECTS[dialect]()
        if sync_interval and not self.dialect.can_sync:
            raise ValueError(self.dialect.sync_unsupported)
        if sync_interval and sync_dir is None:
            raise ValueError("weight sync needs a sync_dir the servers can read")
        self.pool = _Pool([_Server(u, model=model_name) for u in parse_urls(urls)])
        self.tokenizer = tokenizer
        self.sync_dir = Path(sync_dir) if sync_dir is not None else None
        self.sync_interval = sync_interval
        self.chunks_per_server = chunks_per_server
        self.timeout = timeout
        self.max_context = max_context
        self.rank, self.world_size = rank, world_size
        self.expected_version: str | None = None
        self.syncs = 0
        self.policy: nn.Module | None = None  # pushed before the first rollouts when set (see server_backend)
        self.failures: list[Failure] = []
        self._refreshes = 0
        self._busy = threading.RLock()  # generate() and sync() exclude each other
        self.ahead = OneStepAhead()
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._executor = ThreadPoolExecutor(max_workers=max(2, len(self.pool.servers) * chunks_per_server),
                                            thread_name_prefix="rollout-http")

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.pool.servers]

    @property
    def live_urls(self) -> list[str]:
        return [s.url for s in self.pool.servers if s.alive]

    def close(self) -> None:
        self.ahead._executor.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # ---- generation -------------------------------------------------------------------------------
    #: ``generate`` takes one :class:`SamplingParams` per prompt (each request its own seed)
    per_prompt_params = True

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams | Sequence[SamplingParams], n: int
                 ) -> list[GenerationResult]:
        """``n`` samples of every prompt, prompt-major (``results[i * n + j]``), from the servers;
        ``params`` one setting for every prompt or one per prompt."""
        per = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompt_ids):
            raise ValueError(f"{len(per)} sampling settings for {len(prompt_ids)} prompts")
        if not prompt_ids:
            return []
        with self._busy:  # a sync waits for this call: its samples all come from one version
            if self.policy is not None and self.syncs == 0 and self.sync_interval:
                self.sync(self.policy)  # the servers start from the trainer's weights, resumed ones included
            units = [Unit(i, list(p), prm) for i, (p, prm) in enumerate(zip(prompt_ids, per))]
            live = max(1, len(self.live_urls))
            size = math.ceil(len(units) / min(len(units), live * self.chunks_per_server))
            chunks = [units[s:s + size] for s in range(0, len(units), size)]
            futures = [self._executor.submit(self._run_chunk, c, n) for c in chunks]
            out: list[GenerationResult] = []
            for f in futures:
                out.extend(f.result())
            return out

    def _run_chunk(self, chunk: list[Unit], n: int) -> list[GenerationResult]:
        tried: set[str] = set()
        reasons: list[str] = []
        busy_until = time.monotonic() + self.timeout
        while True:
            server = self.pool.acquire(tried)
            if server is None:
                raise RolloutServerError(self._none_left(reasons))
            try:
                results = self._ask(server, chunk, n)
            except _Busy as busy:  # 429: the server is healthy but its queue is full; ask again later
                self.pool.release(server, ok=True)
                if time.monotonic() + busy.wait > busy_until:
                    raise RolloutServerError(f"rollout server {server.url} stayed busy (429) for "
                                             f"{self.timeout:.0f} s: {busy}") from None
                time.sleep(busy.wait)
                continue
            except (httpx.HTTPError, MalformedResponse, StaleWeightsError) as exc:
                tried.add(server.url)
                reason = _describe(exc)
                left = self.pool.release(server, ok=False, reason=reason)
                reasons.append(f"{server.url}: {reason}")
                self.failures.append(Failure(server.url, reason, len(chunk), left))
                self._log(f"warning: rollout server {server.url} failed ({reason}); retrying its "
                          f"{len(chunk)} prompt(s) elsewhere, {left} of {len(self.pool.servers)} server(s) "
                          f"left")
                continue
            except _RequestRejected:
                self.pool.release(server, ok=True)
                raise
            self.pool.release(server, ok=True)
            return results

    def _none_left(self, reasons: list[str]) -> str:
        every = [f"{s.url}: {s.error or 'out of service'}" for s in self.pool.servers]
        return ("no rollout server left to generate on (" + "; ".join(reasons or every) + "). Check the "
                "servers, then resume with --from_resume 1")

    def _ask(self, server: _Server, chunk: list[Unit], n: int) -> list[GenerationResult]:
        if self.dialect.needs_model and server.model is None:
            server.model = self.dialect.model_id(self._http, server.url)
        path, body = self.dialect.request(chunk, n, server.model)
        resp = self._http.post(server.url + path, json=body)
        if resp.status_code == 429:
            raise _Busy(_error_message(resp), _retry_after(resp))
        if 400 <= resp.status_code < 500:
            raise _RequestRejected(f"rollout server {server.url} rejected the request ({resp.status_code}): "
                                   f"{_error_message(resp)}")
        resp.raise_for_status()
        samples = self.dialect.parse(resp, len(chunk), n)
        out = []
        for sample in samples:
            version = sample.version
            if self.expected_version is not None and version is not None and version != self.expected_version:
                raise StaleWeightsError(f"served weight version {version!r}, expected "
                                        f"{self.expected_version!r}")
            unit = chunk[len(out) // n]
            out.append(self._result(sample.token_ids, sample.logprobs, sample.finish_reason, sample.stop,
                                    len(unit.prompt), sample.text, unit.params))
        return out

    def _result(self, ids: list[int], logprobs: list[float], finish: str, stop: int | str | None,
                prompt_len: int, text: str | None, params: SamplingParams) -> GenerationResult:
        """A :class:`GenerationResult` as the in-process engine builds it (text without the stop token)."""
        if finish == "stop" and stop is None and ids and ids[-1] in params.stop_token_ids:
            stop = ids[-1]
        if self.tokenizer is not None:
            content = ids[:-1] if isinstance(stop, int) and ids and ids[-1] == stop else ids
            text = self.tokenizer.decode(content)
        return GenerationResult(token_ids=ids, text=text, finish_reason=finish,  # type: ignore[arg-type]
                                prompt_tokens=prompt_len, completion_tokens=len(ids), stop=stop,
                                logprobs=logprobs)

    # ---- weight sync ------------------------------------------------------------------------------
    def refresh(self, model: nn.Module) -> None:
        """Called after each optimizer step: push the weights every ``sync_interval``-th call."""
        self._refreshes += 1
        if self.sync_interval and self._refreshes % self.sync_interval == 0:
            self.sync(model)

    def sync(self, model: nn.Module, version: str | None = None) -> str:
        """Write ``model``'s weights and make every server serve them as ``version`` (default: the
        next number); from then on only samples of that version are accepted.  Returns the version."""
        if not self.dialect.can_sync:
            raise ValueError(self.dialect.sync_unsupported)
        with self._busy:
            version = version or str(self.syncs + 1)
            if self.rank == 0:
                self._push(model, version)
            _barrier(self.world_size)
            self.syncs += 1
            self.expected_version = version
            return version

    def _push(self, model: nn.Module, version: str) -> None:
        """Write the weights as an HF folder (our parameter names are Qwen3's, so SGLang's loader
        reads it as it reads an export) and ask every server to load it."""
        from minimind.export.hf import hf_config
        from minimind.fileio import atomic_write_text
        from minimind.model.lora import merged_copy
        from minimind.model.weights import save_weights

        assert self.sync_dir is not None
        folder = (self.sync_dir / "policy").resolve()
        save_weights(merged_copy(model), folder / "model.safetensors",  # type: ignore[arg-type]
                     extra_metadata={"weight_version": version})
        atomic_write_text(folder / "config.json", json.dumps(hf_config(model.config), indent=2))  # type: ignore[arg-type]
        body = {"model_path": str(folder), "weight_version": version}
        servers = self.pool.servers
        answers = list(self._executor.map(lambda s: self._update_one(s, body), servers))
        with self.pool.lock:
            for server, problem in zip(servers, answers):
                was = server.alive
                server.alive, server.error = problem is None, problem or ""
                if problem is not None and was:
                    self._log(f"warning: rollout server {server.url} did not load weight version {version} "
                              f"({problem}); it is out of service until it loads a later one")
                elif problem is None and not was:
                    self._log(f"rollout server {server.url} is back in service at weight version {version}")
        if not any(s.alive for s in servers):
            raise RolloutServerError("no rollout server loaded the new weights (" + "; ".join(
                f"{s.url}: {s.error}" for s in servers) + ")")

    def _update_one(self, server: _Server, body: dict[str, Any]) -> str | None:
        """``None`` when ``server`` loaded the weights, else why not."""
        try:
            resp = self._http.post(server.url + "/update_weights_from_disk", json=body)
        except httpx.HTTPError as exc:
            return _describe(exc)
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}: {_error_message(resp)}"
        try:
            answer = resp.json()
        except ValueError:
            return "the answer is not JSON"
        if not isinstance(answer, dict) or answer.get("success") is not True:
            return f"refused: {answer.get('message') if isinstance(answer, dict) else answer!r}"
        return None


class _Busy(Exception):
    """A 429 answer: retry after ``wait`` seconds."""

    def __init__(self, message: str, wait: float) -> None:
        super().__init__(message)
        self.wait = wait


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(max(float(resp.headers.get("retry-after", 1)), 0.05), 30.0)
    except ValueError:
        return 1.0


class _RequestRejected(ValueError):
    """A 4xx answer: the request itself is wrong, and another server would refuse it too."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {_error_message(exc.response)}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))[:300]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:300]
    return str(body)[:300]


def rollout_option_problems(options: Any) -> list[str]:
    """What is wrong with the ``--rollout_*`` / ``--sync_interval`` flags (empty when nothing is)."""
    problems = []
    backend, url = options.rollout_backend, options.rollout_url
    if backend not in ("engine", "server"):
        problems.append(f"--rollout_backend must be engine or server, got {backend!r}")
    elif backend == "server" and not url:
        problems.append("--rollout_backend server needs --rollout_url (e.g. http://127.0.0.1:30000)")
    elif backend == "server":
        try:
            parse_urls(url)
        except ValueError as exc:
            problems.append(str(exc))
    elif url:
        problems.append("--rollout_url is only used with --rollout_backend server")
    if options.rollout_dialect not in DIALECTS:
        problems.append(f"--rollout_dialect must be one of {', '.join(DIALECTS)}, "
                        f"got {options.rollout_dialect!r}")
    elif backend == "server" and options.sync_interval and not DIALECTS[options.rollout_dialect].can_sync:
        problems.append(DIALECTS[options.rollout_dialect].sync_unsupported)
    if options.sync_interval < 0:
        problems.append(f"--sync_interval must be >= 0, got {options.sync_interval}")
    if getattr(options, "overlap", 0) and backend != "server":
        problems.append("--overlap 1 needs --rollout_backend server (the in-process engine samples from the "
                        "very weights the step is updating)")
    if not options.rollout_timeout > 0:
        problems.append(f"--rollout_timeout must be > 0, got {options.rollout_timeout}")
    return problems


def rollout_option_warnings(options: Any) -> list[str]:
    """Settings that run but probably not as meant: ``--overlap 1`` samples step k+1's rollouts from
    the weights before step k's update, and without ``--tis_cap`` nothing reweights them to the
    policy being trained (the objective's ratio is against the trainer's own log-probs)."""
    warnings = []
    if getattr(options, "overlap", 0) and options.rollout_backend == "server" and not options.tis_cap > 0:
        warnings.append("--overlap 1 with --tis_cap 0: the rollouts are one step off-policy and no "
                        "importance weight corrects them; pass --tis_cap 2 (or similar) to apply the "
                        "truncated correction")
    return warnings


def server_backend(options: Any, cfg: Any, tokenizer: Any, model: nn.Module, max_context: int | None,
                   info: Any) -> HTTPRolloutBackend:
    """The driver's backend for ``--rollout_backend server``: the servers of ``--rollout_url``, spoken to
    in ``--rollout_dialect``, with the weights written under ``<checkpoint_dir>/rollout_sync/`` and
    pushed before the first rollouts (so they come from the trainer's policy, resumed weights
    included, whatever the servers loaded at start) and then every ``--sync_interval`` optimizer
    steps."""
    if not options.rollout_url:
        raise ValueError("--rollout_backend server needs --rollout_url (e.g. http://127.0.0.1:30000)")
    sync_dir = Path(cfg.checkpoint_dir) / "rollout_sync" / cfg.save_weight
    backend = HTTPRolloutBackend(options.rollout_url, options.rollout_dialect, tokenizer=tokenizer,
                                 sync_dir=sync_dir, sync_interval=options.sync_interval,
                                 timeout=options.rollout_timeout, max_context=max_context,
                                 api_key=os.environ.get(API_KEY_ENV) or None, rank=info.rank,
                                 world_size=info.world_size)
    backend.policy = model
    return backend


def _barrier(world_size: int) -> None:
    if world_size <= 1:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
