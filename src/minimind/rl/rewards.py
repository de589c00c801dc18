"""Reward functions for RL: rule-based checks, a weighted combination, and a learned reward model.

Reward contract (the one :mod:`minimind.tasks.checks` defines): a reward is a plain function
``reward(prompt: str, completion: str, **row) -> float``; ``prompt`` is the rendered prompt the
completion continues, ``completion`` the generated assistant text, and the data row's columns
(``gt``, ``kind``, ``tool_calls``, ...) are passed by keyword, each function taking what it needs
and ignoring the rest, so a whole row can be splatted in.

Why a registry and :class:`CombinedReward`: an RL stage is configured with names and weights
(``[("math", 1.0), ("format", 0.1)]``) and must log every component's mean and std, not only
the total -- a total that rises while format reward rises and correctness falls is reward hacking
that only the components reveal. A *batched* reward (one with ``batched = True``, such as
:class:`RewardModel`) is called once per batch as ``fn(prompts, completions, rows) -> [B]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minimind.eval.math import extract_answer, numbers_equal, parse_number
from minimind.tasks import checks
from minimind.tasks.toolcalls import (
    CALL_CLOSE,
    CALL_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    parse_tool_calls,
    split_reasoning,
)

__all__ = [
    "REWARD_FUNCTIONS",
    "CombinedReward",
    "RewardFunction",
    "RewardModel",
    "format_reward",
    "get_reward",
    "length_penalty",
    "math_reward",
    "register_reward",
    "tool_format_reward",
]

#: ``(prompt, completion, **row) -> float``.
RewardFunction = Callable[..., float]

#: Rewards by name, for configs: filled by :func:`register_reward`.
REWARD_FUNCTIONS: dict[str, RewardFunction] = {}


def register_reward(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Decorator: register a reward under ``name`` (a name may be registered only once)."""

    def deco(fn: RewardFunction) -> RewardFunction:
        if name in REWARD_FUNCTIONS and REWARD_FUNCTIONS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFunction:
    """The registered reward called ``name``."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARD_FUNCTIONS)}") from None


# ---- rule-based rewards --------------------------------------------------------------------------
def _expected_numbers(gt: Any) -> list[Any]:
    """Accepted answers from ``gt``: a value, a list of values, or a GSM8K solution ``"... #### N"``."""
    out = []
    for g in gt if isinstance(gt, (list, tuple)) else [gt]:
        if isinstance(g, str) and "####" in g:
            g = g.rsplit("####", 1)[1]
        value = parse_number(g)
        if value is not None:
            out.append(value)
    return out


@register_reward("math")
def math_reward(prompt: str, completion: str, *, gt: Any, **_: Any) -> float:
    """1.0 when the completion's final answer equals one of the ground-truth numbers, else 0.0.

    The answer is extracted exactly as the math evaluation does (:func:`minimind.eval.math.extract_answer`:
    ``#### N``, then ``\\boxed{N}``, then "the answer is N", then the last number, after any
    ``</think>``) and compared with :func:`~minimind.eval.math.numbers_equal`, so RL optimises what
    the eval measures. ``gt`` may be a number, a string, a list of accepted values, or a GSM8K
    solution ending in ``#### N``.
    """
    answers = _expected_numbers(gt)
    pred = extract_answer(completion or "")
    return 1.0 if any(numbers_equal(pred, a) for a in answers) else 0.0


_THINK_THEN_ANSWER = re.compile(r"\s*<think>(?:(?!<think>|</think>).)*</think>\s*\S.*", re.DOTALL)


@register_reward("format")
def format_reward(prompt: str, completion: str, **_: Any) -> float:
    """1.0 for ``<think>reasoning</think>`` followed by a non-empty answer, else 0.0.

    Exactly one reasoning block, at the start, closed, with something after it. When the prompt
    already opened the block (a generation prompt ending in ``<think>``), the completion begins
    inside it and is judged with the opening tag put back.
    """
    text = completion or ""
    if prompt.rstrip().endswith(THINK_OPEN) and not text.lstrip().startswith(THINK_OPEN):
        text = THINK_OPEN + text
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return 0.0
    return 1.0 if _THINK_THEN_ANSWER.fullmatch(text) else 0.0


@register_reward("tool_format")
def tool_format_reward(prompt: str, completion: str, **_: Any) -> float:
    """1.0 when the reply makes at least one tool call and *every* ``<tool_call>`` block parses.

    Parsing is :func:`minimind.tasks.toolcalls.parse_tool_calls` (the server's and the evaluation's
    parser): a block must be closed and hold a JSON object with a string ``name`` and object
    ``arguments``. Blocks inside the reasoning do not count; a stray ``</tool_call>`` without an
    opening tag is a malformed block too. Correctness of the call is :func:`checks.tool_call_reward`'s.
    """
    _, content = split_reasoning(completion or "")
    _, calls, errors = parse_tool_calls(content)
    if not calls or errors:
        return 0.0
    return 1.0 if content.count(CALL_OPEN) == len(calls) == content.count(CALL_CLOSE) else 0.0


@register_reward("length")
def length_penalty(prompt: str, completion: str, *, max_len: int, cache_len: int | None = None,
                   completion_tokens: int | None = None, **_: Any) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 when short enough, down to -1 at the limit.

    With ``L`` the completion length, ``L_max = max_len`` and ``L_cache = cache_len``::

        0                                  if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
        -1                                 if L > L_max

    ``L`` is ``completion_tokens`` when the row carries it (the RL stage knows the token count),
    else the number of characters. ``cache_len`` defaults to ``max_len // 4``.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    cache = max_len // 4 if cache_len is None else cache_len
    length = len(completion or "") if completion_tokens is None else int(completion_tokens)
    if length > max_len:
        return -1.0
    if cache <= 0 or length <= max_len - cache:
        return 0.0
    return ((max_len - cache) - length) / cache


# The task checkers (the same checks the task evaluation uses), registered under their names.
register_reward("task")(checks.task_reward)
register_reward("tool_call")(checks.tool_call_reward)
register_reward("task_format")(checks.format_reward)


# ---- combination ---------------------------------------------------------------------------------
def _name_of(fn: Any) -> str:
    for key, value in REWARD_FUNCTIONS.items():
        if value is fn:
            return key
    inner = getattr(fn, "func", None)  # functools.partial: name it after the wrapped function
    return (getattr(fn, "name", None) or getattr(fn, "__name__", None) or getattr(inner, "__name__", None)
            or type(fn).__name__)


class CombinedReward:
    """A weighted sum of rewards: ``total_i = sum_k w_k * reward_k(prompt_i, completion_i, **row_i)``.

    ``specs`` is ``[(fn_or_name, weight), ...]``; names come from the registry. Calling it returns
    ``(total [B], {name: [B]})`` with each component *unweighted*, for logging (:meth:`summary`).
    Two components with the same name get ``#2``, ``#3`` suffixes.
    """

    def __init__(self, specs: Sequence[tuple[str | Callable[..., Any], float]]) -> None:
        if not specs:
            raise ValueError("CombinedReward needs at least one (reward, weight) pair")
        self.components: list[tuple[str, Callable[..., Any], float]] = []
        seen: dict[str, int] = {}
        for fn, weight in specs:
            fn = get_reward(fn) if isinstance(fn, str) else fn
            name = _name_of(fn)
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}#{seen[name]}"
            self.components.append((name, fn, float(weight)))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 rows: Sequence[dict[str, Any]] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        # A row's own "prompt"/"completion" columns would clash with the positional arguments.
        rows = [{} for _ in prompts] if rows is None else [
            {k: v for k, v in r.items() if k not in ("prompt", "completion")} for r in rows]
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} rows for {len(prompts)} prompts")
        total = torch.zeros(len(prompts), dtype=torch.float32)
        parts: dict[str, Tensor] = {}
        for name, fn, weight in self.components:
            if getattr(fn, "batched", False):
                values = torch.as_tensor(fn(list(prompts), list(completions), rows), dtype=torch.float32)
                values = values.detach().cpu().reshape(-1)
            else:
                values = torch.tensor([float(fn(p, c, **r)) for p, c, r in zip(prompts, completions, rows)],
                                      dtype=torch.float32)
            parts[name] = values
            total += weight * values
        return total, parts

    @staticmethod
    def summary(parts: dict[str, Tensor], prefix: str = "reward/") -> dict[str, float]:
        """``{prefix + name + "/mean": ..., prefix + name + "/std": ...}`` (population std)."""
        out: dict[str, float] = {}
        for name, values in parts.items():
            out[f"{prefix}{name}/mean"] = values.mean().item() if values.numel() else 0.0
            out[f"{prefix}{name}/std"] = values.std(correction=0).item() if values.numel() else 0.0
        return out


# ---- learned reward model ------------------------------------------------------------------------
class RewardModel:
    """A reward model from a local Hugging Face folder, scoring prompt + completion texts in batches.

    Two kinds (``kind="auto"`` picks by the folder's architecture name):

    * ``"classifier"`` -- an ``AutoModelForSequenceClassification`` (Bradley-Terry reward model):
      the score is the head's logit ``label`` at the *last* token of the conversation;
    * ``"causal"`` -- a causal LM used as a judge: the score is the log-probability of the first
      token of ``reward_token`` (e.g. ``"yes"``) after the conversation plus ``judge_suffix``.

    The conversation is rendered with the reward model's own chat template when it has one (a
    ``prompt`` may then be a list of chat messages, or a string taken as the user turn), else
    ``prompt + completion``; ``use_chat_template=False`` forces the plain concatenation (for
    prompts already rendered). Sequences are right-padded, so the real tokens never attend to
    padding, and the score is read at each sequence's own last token. Loaded lazily with
    ``transformers``, never running code from the folder (``trust_remote_code=False``).
    It is a batched reward: ``CombinedReward([(RewardModel(path), 1.0)])`` calls it once per batch.
    """

    batched = True

    def __init__(self, path: str | Path, *, kind: str = "auto", reward_token: str = "yes",
                 judge_suffix: str = "", label: int = 0, batch_size: int = 8, max_length: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 use_chat_template: bool = True, name: str = "reward_model") -> None:
        import transformers

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"reward model folder not found: {self.path}")
        config = transformers.AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        if kind == "auto":
            archs = getattr(config, "architectures", None) or []
            kind = "classifier" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal"
        if kind not in ("classifier", "causal"):
            raise ValueError(f"kind must be 'auto', 'classifier' or 'causal', got {kind!r}")
        auto = (transformers.AutoModelForSequenceClassification if kind == "classifier"
                else transformers.AutoModelForCausalLM)
        kwargs: dict[str, Any] = {"trust_remote_code": False}
        if dtype is not None:
            kwargs["dtype"] = dtype
        self.model = auto.from_pretrained(self.path, **kwargs).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        self.kind, self.label, self.batch_size, self.max_length = kind, label, batch_size, max_length
        self.judge_suffix, self.use_chat_template, self.name = judge_suffix, use_chat_template, name
        self.device = torch.device(device)
        self.reward_token_id: int | None = None
        if kind == "causal":
            ids = self.tokenizer.encode(reward_token, add_special_tokens=False)
            if not ids:
                raise ValueError(f"reward_token {reward_token!r} encodes to no tokens")
            self.reward_token_id = ids[0]

    def render(self, prompt: str | list[dict[str, Any]], completion: str) -> str:
        """The text the model scores: the templated conversation (plus ``judge_suffix``)."""
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
            messages.append({"role": "assistant", "content": completion})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            if not isinstance(prompt, str):
                raise ValueError("message-list prompts need a reward model with a chat template")
            text = prompt + completion
        return text + self.judge_suffix

    @torch.no_grad()
    def _score_texts(self, texts: list[str]) -> Tensor:
        enc = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        if self.max_length is not None:
            enc = [ids[-self.max_length:] for ids in enc]  # keep the end: the score is read there
        if any(not ids for ids in enc):
            raise ValueError("a text encodes to no tokens")
        lengths = torch.tensor([len(ids) for ids in enc])
        width = int(lengths.max())
        input_ids = torch.zeros(len(enc), width, dtype=torch.long)
        attention = torch.zeros(len(enc), width, dtype=torch.long)
        for i, ids in enumerate(enc):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention[i, :len(ids)] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        last = (lengths - 1).to(self.device)
        rows = torch.arange(len(enc), device=self.device)
        if self.kind == "classifier" and not hasattr(self.model, "score"):  # e.g. an encoder's classifier
            if self.model.config.pad_token_id is None and len(enc) > 1:
                return torch.cat([self._score_texts([t]) for t in texts])
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits
            return logits[:, self.label].float().cpu()
        if self.kind == "classifier":
            # Per-token logits from the backbone + head, read at each row's last real token: robust to
            # a missing or in-text pad id, which the stock pooling relies on.
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=input_ids, attention_mask=attention).last_hidden_state
            logits = self.model.score(hidden[rows, last])
            return logits[:, self.label].float().cpu()
        logits = self.model(input_ids=input_ids, attention_mask=attention).logits[rows, last]
        return torch.log_softmax(logits.float(), dim=-1)[:, self.reward_token_id].cpu()

    def score(self, prompts: Sequence[str | list[dict[str, Any]]], completions: Sequence[str]) -> Tensor:
        """Scores ``[B]`` (float32, CPU) of the prompt/completion pairs, ``batch_size`` at a time."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        out = [self._score_texts(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: Sequence[str | list[dict[str, Any]]], completions: Sequence[str],
                 rows: Sequence[dict[str, Any]] | None = None) -> Tensor:
        return self.score(prompts, completions)
