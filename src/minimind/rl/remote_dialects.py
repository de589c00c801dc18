"""The request and response shapes of the inference servers RL rollouts run on.

Each dialect turns a chunk of token-id prompts into one HTTP request and its answer into one
:class:`Sample` per (prompt, sample) pair, prompt-major.  The shapes follow the servers' own
documentation:

* **SGLang** native ``POST /generate`` (``io_struct.GenerateReqInput``): ``input_ids`` as a list of
  token-id lists, ``sampling_params`` a list with one dict per prompt (``max_new_tokens``,
  ``temperature``, ``top_p``, ``top_k`` (-1 = off), ``repetition_penalty``, ``stop_token_ids``,
  ``sampling_seed``, ``no_stop_trim``, ``ignore_eos`` when no stop token is given: the model's EOS
  stops a row otherwise), ``return_logprob: true``.  The answer is a list of
  ``{"text", "output_ids", "meta_info"}``; ``meta_info.output_token_logprobs`` holds ``[logprob,
  token_id, text]`` for every output token, ``meta_info.finish_reason`` is ``{"type": "stop",
  "matched": ...}`` or ``{"type": "length", ...}`` and ``meta_info.weight_version`` names the weights.
  ``n`` samples of a prompt are sent as ``n`` copies with seeds derived from (the prompt's seed, its
  index, the sample) (SGLang's radix cache shares their prefill), so parallel samples never share a
  seed.
* **vLLM** OpenAI ``POST /v1/completions``: ``prompt`` a list of token-id lists, ``n``, ``max_tokens``,
  ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``stop_token_ids``, ``seed``,
  ``logprobs: 0`` (the sampled token's log-prob only) and ``return_tokens_as_token_ids: true``, which
  makes ``choices[k].logprobs.tokens`` read ``"token_id:<id>"``; ``choices[k].index = prompt * n +
  sample``.  One request carries one setting (the first prompt's; its seed seeds the request).
  vLLM reports no weight version in its body; a ``X-Weight-Version`` header is read if a server
  sends one.  vLLM returns the log-probs of the raw logits by default (``--logprobs-mode
  raw_logprobs``: before temperature), which are not the distribution it sampled at T != 1; its
  server must run with ``--logprobs-mode processed_logprobs`` for the importance correction to
  compare like with like.  vLLM cannot load weights from disk over HTTP: its weight updates go
  through its weight-transfer engine (``--weight-transfer-config`` with an NCCL or CUDA-IPC backend,
  driven by the ``/init_weight_transfer_engine`` ... ``/update_weights`` routes of its development
  mode while the trainer sends the tensors itself), which needs a trainer-side NCCL group this
  project does not open; so with vLLM only ``--sync_interval 0`` runs.

Both dialects ask for the log-probs the server's sampler computed, which is what the importance
correction of the objective compares against (see ``minimind.rl.rollout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx

from minimind.infer.sampling import SamplingParams, derive_seed

__all__ = ["DIALECTS", "Dialect", "MalformedResponse", "OpenAICompletions", "SGLangGenerate", "Sample",
           "Unit", "derive_seed"]

#: The header a server may use to name the weights a response was produced with.
WEIGHT_VERSION_HEADER = "x-weight-version"


class MalformedResponse(ValueError):
    """A server's answer does not have the documented shape (or lacks per-token log-probs)."""


@dataclass
class Unit:
    """One prompt of a ``generate`` call: its index in the call, its token ids and its sampling
    settings (each prompt may carry its own seed)."""

    index: int
    prompt: list[int]
    params: SamplingParams


@dataclass
class Sample:
    """One sampled completion as a server reported it."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    stop: int | str | None
    text: str | None
    version: str | None


def _check_sample(ids: list[int], logprobs: list[float], where: str) -> None:
    if not ids:
        raise MalformedResponse(f"{where}: no output tokens")
    if len(logprobs) != len(ids):
        raise MalformedResponse(f"{where}: {len(logprobs)} log-probs for {len(ids)} tokens")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x <= 1e-4 for x in logprobs):
        raise MalformedResponse(f"{where}: log-probs must be finite and <= 0")


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise MalformedResponse("the answer is not JSON") from None


class Dialect:
    """How to ask a kind of server for samples, and read its answer."""

    name = ""
    can_sync = False
    needs_model = False
    sync_unsupported = ""

    def request(self, chunk: list[Unit], n: int, model: str | None) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def parse(self, resp: httpx.Response, prompts: int, n: int) -> list[Sample]:
        raise NotImplementedError

    def model_id(self, http: httpx.Client, url: str) -> str:
        raise NotImplementedError


class SGLangGenerate(Dialect):
    """SGLang's native ``/generate`` (also answered by ``minimind serve``)."""

    name = "sglang"
    can_sync = True

    def request(self, chunk: list[Unit], n: int, model: str | None) -> tuple[str, dict[str, Any]]:
        ids, sampling = [], []
        for unit in chunk:
            base = self._sampling(unit.params)
            for j in range(n):
                ids.append(unit.prompt)
                sp = dict(base)
                if unit.params.seed is not None and not unit.params.is_greedy:
                    sp["sampling_seed"] = derive_seed(unit.params.seed, unit.index, j)
                sampling.append(sp)
        return "/generate", {"input_ids": ids, "sampling_params": sampling, "return_logprob": True}

    @staticmethod
    def _sampling(params: SamplingParams) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.is_greedy else params.temperature,
            "top_p": params.top_p, "top_k": params.top_k or -1,
            "repetition_penalty": params.repetition_penalty,
            "stop_token_ids": list(params.stop_token_ids), "no_stop_trim": True}
        if not params.stop_token_ids:  # only the budget ends a row, as in-process (SGLang checks its
            out["ignore_eos"] = True  # stop_token_ids only while ignore_eos is off)
        if params.stop_strings:
            out["stop"] = list(params.stop_strings)
        return out

    def parse(self, resp: httpx.Response, prompts: int, n: int) -> list[Sample]:
        body = _json(resp)
        if isinstance(body, dict):
            body = [body]
        if not isinstance(body, list) or len(body) != prompts * n:
            got = len(body) if isinstance(body, list) else type(body).__name__
            raise MalformedResponse(f"/generate answered {got} samples, expected {prompts * n}")
        header = resp.headers.get(WEIGHT_VERSION_HEADER)
        out = []
        for k, item in enumerate(body):
            meta = item.get("meta_info") if isinstance(item, dict) else None
            if not isinstance(meta, dict) or not isinstance(meta.get("output_token_logprobs"), list):
                raise MalformedResponse(f"sample {k}: no meta_info.output_token_logprobs (was return_logprob "
                                        f"sent?)")
            try:
                logprobs = [float(e[0]) for e in meta["output_token_logprobs"]]
                ids = [int(e[1]) for e in meta["output_token_logprobs"]]
            except (TypeError, ValueError, IndexError):
                raise MalformedResponse(f"sample {k}: output_token_logprobs entries must be "
                                        f"[logprob, token_id, text]") from None
            _check_sample(ids, logprobs, f"sample {k}")
            finish = meta.get("finish_reason") or {}
            kind = finish.get("type") if isinstance(finish, dict) else finish
            if kind not in ("stop", "length"):
                raise MalformedResponse(f"sample {k}: finish_reason {finish!r} (aborted?)")
            matched = finish.get("matched") if isinstance(finish, dict) else None
            version = meta.get("weight_version", header)
            out.append(Sample(ids, logprobs, kind, matched, item.get("text"),
                              None if version is None else str(version)))
        return out


class OpenAICompletions(Dialect):
    """vLLM's OpenAI ``/v1/completions`` with token-id prompts and token-id log-prob entries."""

    name = "vllm"
    needs_model = True
    sync_unsupported = ("--rollout_dialect vllm cannot push weights: vLLM has no update-from-disk route; "
                        "its weight-update RPC is the NCCL weight-transfer API (see the README, 'RL at "
                        "scale'). Use SGLang or `minimind serve` for on-policy training, or --sync_interval "
                        "0 to sample from the server's own weights")

    def model_id(self, http: httpx.Client, url: str) -> str:
        resp = http.get(url + "/v1/models")
        resp.raise_for_status()
        data = _json(resp).get("data") or []
        if not data or "id" not in data[0]:
            raise MalformedResponse("/v1/models lists no model")
        return str(data[0]["id"])

    def request(self, chunk: list[Unit], n: int, model: str | None) -> tuple[str, dict[str, Any]]:
        params = chunk[0].params  # one setting per request: vLLM seeds a request, not each prompt
        body: dict[str, Any] = {
            "model": model, "prompt": [u.prompt for u in chunk], "n": n, "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.is_greedy else params.temperature, "top_p": params.top_p,
            "top_k": params.top_k or -1, "repetition_penalty": params.repetition_penalty,
            "stop_token_ids": list(params.stop_token_ids), "logprobs": 0, "return_tokens_as_token_ids": True,
            "ignore_eos": not params.stop_token_ids}
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)
        if params.seed is not None and not params.is_greedy:
            body["seed"] = derive_seed(params.seed, chunk[0].index)
        return "/v1/completions", body

    def parse(self, resp: httpx.Response, prompts: int, n: int) -> list[Sample]:
        body = _json(resp)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != prompts * n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise MalformedResponse(f"/v1/completions answered {got} choices, expected {prompts * n}")
        version = resp.headers.get(WEIGHT_VERSION_HEADER)
        out = []
        for c in sorted(choices, key=lambda c: c.get("index", 0)):
            k = c.get("index")
            lp = c.get("logprobs")
            if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
                raise MalformedResponse(f"choice {k}: no logprobs.tokens (was logprobs sent?)")
            try:
                ids = [_token_id(t) for t in lp["tokens"]]
                logprobs = [float(x) for x in lp.get("token_logprobs") or []]
            except (TypeError, ValueError):
                raise MalformedResponse(f"choice {k}: logprobs.tokens must read 'token_id:<id>' "
                                        f"(return_tokens_as_token_ids)") from None
            _check_sample(ids, logprobs, f"choice {k}")
            finish = c.get("finish_reason")
            if finish not in ("stop", "length"):
                raise MalformedResponse(f"choice {k}: finish_reason {finish!r}")
            stop = c.get("stop_reason")
            out.append(Sample(ids, logprobs, finish, stop if isinstance(stop, (int, str)) else None,
                              c.get("text"), version))
        return out


def _token_id(token: Any) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise ValueError(token)
    return int(token.removeprefix("token_id:"))


DIALECTS: dict[str, type[Dialect]] = {"sglang": SGLangGenerate, "vllm": OpenAICompletions}
