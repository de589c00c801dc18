"""Preference pairs for the demo's DPO step, and the held-out preference evaluation.

Pairs.  Each pair is built from one generated task (:mod:`minimind.tasks.generators`): the *chosen*
reply is exactly the assistant turn SFT trains on (the gold answer, or for tool tasks the gold
tool-call turn), the *rejected* reply is a worse answer to the same prompt, of one of the kinds
in :data:`REJECTIONS`:

* ``wrong_value``         right format, wrong content: a wrong result; or, half the time, the
                          answer to a neighbouring question (an operand or date mis-copied from
                          the prompt, the result consistent with it -- the SFT model's typical
                          mistake); a tool call with a mis-copied argument; another idiom's
                          meaning or word's glosses;
* ``wrong_format``        not in the answer's format: a bare value, a sentence, an ISO date, or a
                          tool task answered in plain text (with a made-up value) without a call;
* ``truncated``           the answer cut off right before its value;
* ``malformed_tool_call`` a call of a tool that does not exist, or of a real tool that the
                          prompt does not offer (its required arguments missing).

Task kinds are :data:`DPO_KINDS` by default (answers that follow from the prompt); rejection
kinds are drawn per pair from :data:`REJECTION_MIX`, about half of them wrong values.

Every pair is graded with :func:`~minimind.tasks.checks.check_answer` and
:func:`~minimind.tasks.checks.check_format` when it is built: the chosen reply is correct and
well-formed, a ``wrong_value`` reply is well-formed and wrong, every other rejection is malformed.

Prompts are the SFT prompts without the SFT augmentations (no random system prompt; the empty
think block the generation prompt ends with).  Tool tasks offer their tool in the system message;
the reference DPO format has no ``tools`` field, so the tool block the chat template would render
is written into the system message's text instead, which renders to the same bytes (checked by
the tests on token ids).

Splits.  Training pairs come from train-split items, held-out pairs from eval-split items
(:func:`~minimind.tasks.generators.split_of`), so no held-out item is ever trained on, whatever the seeds.

Evaluation (:func:`preference_eval`).  On held-out pairs, with ``log pi(y|x)`` the summed log-prob
of a reply's tokens (the DPO stage's :meth:`~minimind.train.stages.dpo.DPOStage.response_logps`):

* ``logp_accuracy``: share of pairs with ``log pi(chosen) > log pi(rejected)``, meaningful for any
  model (the SFT model before DPO, the DPO model after);
* with a ``reference`` (the SFT model): the implicit reward ``r = beta * (log pi - log pi_ref)`` of
  each side, ``mean_reward_margin = mean(r_chosen - r_rejected)`` and ``reward_accuracy`` = share
  of pairs with a positive margin (both 0 / undefined for the reference itself).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import random
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minimind.tasks.checks import _EN_MONTHS, _EN_WEEKDAYS, _ZH_WEEKDAYS, check_answer, check_format
from minimind.tasks.generators import Task, dictionary_pool, generate_tasks, idiom_pool, split_of
from minimind.tasks.toolset import TOOL_NAMES, WEATHER, format_number

__all__ = [
    "DPO_KINDS",
    "REJECTIONS",
    "PreferencePair",
    "build_preference_data",
    "inline_tools",
    "longest_pair",
    "make_preference_pairs",
    "pair_logps",
    "preference_eval",
    "read_preference_rows",
    "response_text",
    "write_preference_pairs",
]

REJECTIONS: tuple[str, ...] = ("wrong_value", "wrong_format", "truncated", "malformed_tool_call")
#: Share of each rejection kind (drawn per pair); tool tasks have their own mix.
REJECTION_MIX: dict[str, tuple[tuple[str, float], ...]] = {
    "default": (("wrong_value", 0.5), ("wrong_format", 0.25), ("truncated", 0.25)),
    "tool_call": (("wrong_value", 0.4), ("malformed_tool_call", 0.4), ("wrong_format", 0.2)),
}
#: Task kinds of the demo's pairs: those whose answer follows from the prompt (copy operands,
#: compute, call the offered tool).  Idiom meanings and dictionary glosses are recalled facts the
#: small demo model has not learnt; between two equally unknown 20-token meanings its summed
#: log-probs mostly measure their lengths, so those kinds are left out by default (``kinds=None``
#: takes them too).
DPO_KINDS: tuple[str, ...] = ("arithmetic", "unit_conversion", "date_fact", "tool_call")
#: Seed offsets of the pair generators (the corpus uses ``seed`` for SFT, ``seed + 1`` for eval).
TRAIN_SEED_OFFSET, HELDOUT_SEED_OFFSET = 2, 3


# --------------------------------------------------------------------------- rendering helpers


def response_text(message: dict[str, Any]) -> str:
    """What a model writes for the assistant ``message``: the body after the generation prompt
    (``<think>\\n\\n</think>\\n\\n``) up to ``<|im_end|>``, rendered by the chat template."""
    from minimind.tokenizer.chat_template import render_chat
    text = render_chat([message])
    head = "</think>\n\n"
    body = text[text.index(head) + len(head):]
    assert body.endswith("<|im_end|>\n"), body
    return body[: -len("<|im_end|>\n")]


def inline_tools(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with a system message's ``tools`` written into its text, as the chat template
    renders them; both render to identical bytes, and DPO rows carry no ``tools`` field."""
    if not messages or messages[0].get("role") != "system" or not messages[0].get("tools"):
        return copy.deepcopy(messages)
    from minimind.tokenizer.chat_template import render_chat
    system = messages[0]
    text = render_chat([{"role": "system", "content": system.get("content", "")}], tools=system["tools"])
    start, end = "<|im_start|>system\n", "<|im_end|>\n"
    assert text.startswith(start) and text.endswith(end), text[:80]
    return [{"role": "system", "content": text[len(start):-len(end)]}] + copy.deepcopy(messages[1:])


def _grade(kind: str, gt: list[Any], text: str) -> tuple[bool, bool]:
    return bool(check_answer(kind, gt, text)), bool(check_format(kind, text))


# --------------------------------------------------------------------------- the pair record


@dataclass
class PreferencePair:
    """One preference pair: shared prompt, chosen and rejected final assistant turns, metadata."""

    kind: str  # task kind
    lang: str
    key: str  # the task's item key (decides its split)
    split: str
    rejection: str  # one of REJECTIONS
    prompt: list[dict[str, Any]]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    gt: list[Any]

    @property
    def chosen_text(self) -> str:
        return response_text(self.chosen)

    @property
    def rejected_text(self) -> str:
        return response_text(self.rejected)

    def to_row(self) -> dict[str, Any]:
        """A reference DPO row (``chosen``/``rejected`` conversations) plus metadata fields."""
        return {"chosen": self.prompt + [self.chosen], "rejected": self.prompt + [self.rejected],
                "kind": self.kind, "lang": self.lang, "key": self.key, "split": self.split,
                "rejection": self.rejection, "gt": list(self.gt)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PreferencePair:
        return cls(kind=row["kind"], lang=row["lang"], key=row["key"], split=row["split"],
                   rejection=row["rejection"], prompt=row["chosen"][:-1], chosen=row["chosen"][-1],
                   rejected=row["rejected"][-1], gt=list(row["gt"]))


# --------------------------------------------------------------------------- wrong values


def _wrong_int(c: int, rng: random.Random, lo: int = 0, avoid: Sequence[int] = ()) -> int:
    """A plausible mistake near ``c``: off by one to three, by ten, or a factor of ten."""
    cands = {c + d for d in (-10, -3, -2, -1, 1, 2, 3, 10)} | {c * 10}
    if c % 10 == 0 and c:
        cands.add(c // 10)
    cands = sorted(x for x in cands if x >= lo and x != c and x not in avoid)
    return rng.choice(cands)


def _wrong_number_text(s: str, rng: random.Random) -> str:
    """``s`` (e.g. ``"145.9992"``, ``"28°C"``) with its first number changed."""
    m = re.search(r"-?\d+(?:\.\d+)?", s)
    assert m, s
    x = float(m.group())
    if x == int(x) and "." not in m.group():
        new = str(_wrong_int(int(x), rng, lo=-1000))
    else:
        new = format_number(x * rng.choice((0.5, 0.9, 1.1, 2.0)) + rng.choice((0, 1)))
    return s[: m.start()] + new + s[m.end():]


def _value_span(task: Task) -> tuple[str, str, str, list[str]]:
    """Split the gold answer into ``(head, value, tail)`` with ``head + value + tail == answer`` and
    ``value`` the part that carries the answer; also wrong values in the same format (candidates)."""
    a = task.answer
    if task.kind in ("arithmetic", "unit_conversion"):
        m = list(re.finditer(r"-?\d+", a))[-1]
        return a[: m.start()], m.group(), a[m.end():], []
    if task.kind == "date_fact":
        want = str(task.gt[0])
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", want):  # next day
            nxt = dt.date.fromisoformat(want)
            fmt = (lambda d: f"{d.year}年{d.month}月{d.day}日") if task.lang == "zh" else \
                (lambda d: f"{_EN_MONTHS[d.month - 1]} {d.day}, {d.year}")
            value = fmt(nxt)
            day = nxt - dt.timedelta(days=1)
            wrong = [fmt(day), fmt(nxt + dt.timedelta(days=1)), fmt(nxt + dt.timedelta(days=2))]
            if nxt.day == 1:  # month end: the classic mistake is a day 32 / 31 / 29 of the old month
                wrong.append(f"{day.year}年{day.month}月{day.day + 1}日" if task.lang == "zh"
                             else f"{_EN_MONTHS[day.month - 1]} {day.day + 1}, {day.year}")
        elif want in _ZH_WEEKDAYS or want in _EN_WEEKDAYS:
            names = _ZH_WEEKDAYS if want in _ZH_WEEKDAYS else _EN_WEEKDAYS
            value, wrong = want, [w for w in names if w != want]
        else:  # days in a month
            value, wrong = want, [str(x) for x in (28, 29, 30, 31) if str(x) != want]
        i = a.rindex(value)
        return a[:i], value, a[i + len(value):], wrong
    if task.kind == "idiom_meaning":
        i = a.index("：") + 1
        return a[:i], a[i:], "", []
    if task.kind == "dictionary":
        i = a.index("): ") + 3
        return a[:i], a[i:], "", []
    raise ValueError(f"no value span for kind {task.kind!r}")


def _wrong_value(task: Task, value: str, cands: list[str], rng: random.Random) -> str:
    if task.kind in ("arithmetic", "unit_conversion"):
        return str(_wrong_int(int(value), rng, avoid=(1,) if task.kind == "unit_conversion" else ()))
    if task.kind == "date_fact":
        return rng.choice(cands)
    if task.kind == "idiom_meaning":
        return rng.choice(idiom_pool()).meaning
    if task.kind == "dictionary":
        return "; ".join(rng.choice(dictionary_pool()).glosses)
    raise ValueError(task.kind)


def _wrong_format(task: Task, head: str, value: str, rng: random.Random) -> str:
    if task.kind in ("arithmetic", "unit_conversion"):
        sentence = f"答案是{value}。" if task.lang == "zh" else f"The answer is {value}."
        return rng.choice((value, sentence))
    if task.kind == "date_fact" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(task.gt[0])):
        return str(task.gt[0])  # ISO date: right date, wrong format
    return value  # the bare value: a weekday, a number, an idiom meaning, glosses


def _en_or_zh_date(d: dt.date, lang: str) -> str:
    return f"{d.year}年{d.month}月{d.day}日" if lang == "zh" else f"{_EN_MONTHS[d.month - 1]} {d.day}, {d.year}"


def _copy_error(task: Task, rng: random.Random) -> str | None:
    """The right answer to a neighbouring question: an operand (value, date) not copied right from
    the prompt and the result consistent with it -- the typical mistake of a small SFT model.
    ``None`` where the task has no such variant (or it would need another grammatical form)."""
    a = task.answer
    if task.kind == "arithmetic":
        m = re.fullmatch(r"(\d+) ([+\-×]) (\d+) = (-?\d+)", a)
        if not m:
            return None
        x, op, y = int(m[1]), m[2], int(m[3])
        for _ in range(10):
            x2, y2 = (_wrong_int(x, rng), y) if rng.random() < 0.5 else (x, _wrong_int(y, rng))
            if op != "-" or x2 >= y2:
                return f"{x2} {op} {y2} = {x2 + y2 if op == '+' else x2 - y2 if op == '-' else x2 * y2}"
        return None
    if task.kind == "unit_conversion":
        nums = list(re.finditer(r"\d+", a))
        if len(nums) != 2:
            return None
        v, r = int(nums[0].group()), int(nums[1].group())
        if 1 in (v, r) or max(v, r) % min(v, r):  # singular unit names; non-integer factors
            return None
        f = max(v, r) // min(v, r)
        if r > v:
            v2 = _wrong_int(v, rng, lo=2)
            r2 = v2 * f
        else:
            r2 = _wrong_int(r, rng, lo=2)
            v2 = r2 * f
        (s0, e0), (s1, e1) = nums[0].span(), nums[1].span()
        return a[:s0] + str(v2) + a[e0:s1] + str(r2) + a[e1:]
    if task.kind == "date_fact" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(task.gt[0])):
        nxt = dt.date.fromisoformat(str(task.gt[0]))
        day = nxt - dt.timedelta(days=1)
        template = "{d}的后一天是{n}。" if task.lang == "zh" else "The day after {d} is {n}."
        fmt = lambda x: _en_or_zh_date(x, task.lang)
        if a != template.format(d=fmt(day), n=fmt(nxt)):
            return None
        day2 = day + dt.timedelta(days=rng.choice((-10, -7, -3, -2, 2, 3, 7, 10)))
        return template.format(d=fmt(day2), n=fmt(day2 + dt.timedelta(days=1)))
    return None


def _plain_rejection(task: Task, rejection: str, rng: random.Random) -> str:
    head, value, tail, cands = _value_span(task)
    if rejection == "wrong_value":
        if rng.random() < 0.5:  # half the wrong values are copy errors, half wrong results
            wrong = _copy_error(task, rng)
            if wrong is not None:
                return wrong
        return head + _wrong_value(task, value, cands, rng) + tail
    if rejection == "wrong_format":
        return _wrong_format(task, head, value, rng)
    if rejection == "truncated":
        return head.rstrip()
    raise ValueError(f"rejection {rejection!r} does not apply to {task.kind}")


#: Malformed calls that diverge from the gold call at the tool name.  A call broken further on (a
#: missing brace, a misnamed argument key) shares its prefix with the gold call and differs only
#: in a token or two inside the JSON; in the demo, pushing those tokens down taught the model to
#: break its own calls (well-formed tool calls fell from 0.85 to under 0.1), so they are not used.
_BAD_TOOL_NAMES = {"calculate_math": "calculator", "unit_converter": "convert_units",
                   "get_current_weather": "weather"}


def _tool_rejection(task: Task, rejection: str, rng: random.Random) -> dict[str, Any]:
    """The rejected first assistant turn of a tool task."""
    call = task.tool_calls[0]
    name, args = call["name"], dict(call["arguments"])
    if rejection == "wrong_value":  # a well-formed call that computes something else
        if name == "calculate_math":
            expr = args["expression"]
            nums = list(re.finditer(r"\d+", expr))
            m = rng.choice(nums)
            args["expression"] = expr[: m.start()] + str(_wrong_int(int(m.group()), rng, lo=2)) + expr[m.end():]
        elif name == "unit_converter":
            if rng.random() < 0.5:
                args["value"] = _wrong_int(int(args["value"]), rng, lo=-20)
            else:
                args["from_unit"], args["to_unit"] = args["to_unit"], args["from_unit"]
        else:
            col = 0 if task.lang == "zh" else 1
            args["location"] = rng.choice([r[col] for r in WEATHER if r[col] != args["location"]])
        return {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": args}]}
    if rejection == "malformed_tool_call":  # a tool that does not exist, or one not offered
        if rng.random() < 0.5:
            name = _BAD_TOOL_NAMES[name]
        else:  # a real tool, but not the one offered: its required arguments are missing
            name = rng.choice([t for t in TOOL_NAMES if t != name])
        return {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": args}]}
    if rejection == "wrong_format":  # no call at all: a made-up final answer in plain text
        gt = str(task.gt[0])
        return {"role": "assistant", "content": task.answer.replace(gt, _wrong_number_text(gt, rng), 1)}
    raise ValueError(f"rejection {rejection!r} does not apply to tool_call")


def _prompt_and_chosen(task: Task) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The SFT prompt (tools inlined) and the SFT-trained turn that answers it."""
    prompt = inline_tools(task.prompt_messages)
    answer = copy.deepcopy(task.messages[len(task.prompt_messages)])
    assert answer["role"] == "assistant", task.messages
    return prompt, answer


def pair_from_task(task: Task, rejection: str, rng: random.Random, split: str | None = None,
                   tries: int = 8) -> PreferencePair | None:
    """A checked pair for ``task`` with the given rejection kind, or ``None`` when no rejected
    reply of that kind can be made (e.g. every wrong candidate is also graded correct)."""
    prompt, chosen = _prompt_and_chosen(task)
    if _grade(task.kind, task.gt, response_text(chosen)) != (True, True):
        return None
    for _ in range(tries):
        if task.kind == "tool_call":
            rejected = _tool_rejection(task, rejection, rng)
        else:
            rejected = {"role": "assistant", "content": _plain_rejection(task, rejection, rng)}
        correct, formed = _grade(task.kind, task.gt, response_text(rejected))
        if rejection == "wrong_value" and formed and not correct:
            break
        if rejection != "wrong_value" and not formed:
            break
    else:
        return None
    return PreferencePair(task.kind, task.lang, task.key, split or split_of(task.key), rejection, prompt,
                          chosen, rejected, list(task.gt))


def make_preference_pairs(n: int, seed: int, split: str, level: str = "easy",
                          kinds: Sequence[str] | None = DPO_KINDS) -> list[PreferencePair]:
    """``n`` checked pairs from ``split`` items (deterministic in its arguments); task kinds in
    equal shares (``None``: every available kind), rejection kinds drawn per pair from
    :data:`REJECTION_MIX`."""
    rng = random.Random(f"{seed}:preferences:{split}")
    pairs: list[PreferencePair] = []
    extra = 0
    while len(pairs) < n:
        pairs = []
        for task in generate_tasks(n + extra, seed, kinds=kinds, split=split, level=level):
            mix = REJECTION_MIX.get(task.kind, REJECTION_MIX["default"])
            order = [r for r, _ in mix]
            first = rng.choices(order, weights=[w for _, w in mix])[0]
            for rejection in [first] + [r for r in order if r != first]:
                pair = pair_from_task(task, rejection, rng, split)
                if pair is not None:
                    pairs.append(pair)
                    break
            if len(pairs) == n:
                break
        extra = max(2 * extra, 8)
    return pairs


# --------------------------------------------------------------------------- files


def write_preference_pairs(pairs: Sequence[PreferencePair], path: Path | str) -> Path:
    """Write pairs as a DPO JSONL (one :meth:`PreferencePair.to_row` per line)."""
    from .corpus import _write_jsonl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, (p.to_row() for p in pairs))
    return path


def read_preference_rows(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def build_preference_data(out_dir: Path | str, seed: int = 0, n_train: int = 1000, n_heldout: int = 200,
                          level: str = "easy", kinds: Sequence[str] | None = DPO_KINDS) -> dict[str, Any]:
    """Write ``dpo_train.jsonl`` (train-split items) and ``dpo_heldout.jsonl`` (eval-split items)
    under ``out_dir``; return their paths and counts by task kind and rejection kind.  A file that
    already holds exactly these pairs is left untouched, so the shard cache stays valid."""
    out = Path(out_dir)
    stats: dict[str, Any] = {}
    for name, n, split, offset in (("train", n_train, "train", TRAIN_SEED_OFFSET),
                                   ("heldout", n_heldout, "eval", HELDOUT_SEED_OFFSET)):
        pairs = make_preference_pairs(n, seed + offset, split, level, kinds)
        path = out / f"dpo_{name}.jsonl"
        text = "".join(json.dumps(p.to_row(), ensure_ascii=False) + "\n" for p in pairs)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_preference_pairs(pairs, path)
        stats[name] = {"path": str(path), "pairs": len(pairs),
                       "by_kind": dict(sorted(Counter(p.kind for p in pairs).items())),
                       "by_rejection": dict(sorted(Counter(p.rejection for p in pairs).items()))}
    return stats


def longest_pair(tokenizer: Any, paths: Sequence[Path | str]) -> int:
    """Tokens of the longest pair (chosen + rejected side) in the DPO JSONL files: a packed row of
    at least this many tokens holds every pair whole (a longer pair would be cut, and a long tool
    prompt can leave a cut pair without any response token)."""
    from minimind.data import MaskMarkers, dpo_pair
    from minimind.data.dpo import tokenize_pair
    markers = MaskMarkers(tokenizer)
    longest = 0
    for path in paths:
        for row in read_preference_rows(path):
            pt = tokenize_pair(tokenizer, *dpo_pair(row), markers=markers)
            longest = max(longest, len(pt.chosen_ids) + len(pt.rejected_ids))
    return longest


# --------------------------------------------------------------------------- evaluation


def _dataset(pairs: Any, tokenizer: Any, seq_len: int, cache_dir: Path | str | None):
    """A :class:`~minimind.data.dpo.DPODataset` (as is, or built from a DPO JSONL path)."""
    from minimind.data import ShardReader
    from minimind.data.dpo import DPODataset, load_or_prepare_dpo_shards
    if isinstance(pairs, DPODataset):
        return pairs, None
    path = Path(pairs)
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="minimind-pref-")
        cache_dir = tmp.name
    shard_dir = Path(cache_dir) / f"{path.stem}_{tokenizer.hash[:12]}_{seq_len}"
    # Each side is cut to seq_len + 1 tokens, as the DPO stage cuts its training pairs.
    load_or_prepare_dpo_shards(path, shard_dir, tokenizer, max_len=seq_len + 1, num_proc=1, progress=False)
    return DPODataset(ShardReader(shard_dir), seq_len=seq_len, seed=0), tmp


def pair_logps(model: Any, dataset: Any, batch_rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs ``(chosen[P], rejected[P])`` of every pair of ``dataset``, indexed
    by pair number (the line order of the JSONL), from one pass over epoch 0's packed rows."""
    import torch

    from minimind.train.stages.dpo import DPOStage
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.full((dataset.num_pairs, 2), np.nan)
    n_rows = dataset.num_rows(0)
    try:
        with torch.no_grad():
            for start in range(0, n_rows, batch_rows):
                batch = dataset.get_batch(0, range(start, min(start + batch_rows, n_rows))).to(device)
                logps, _ = DPOStage.response_logps(model, batch)
                out[batch.pair_ids.numpy()] = logps.float().cpu().numpy().reshape(-1, 2)
    finally:
        model.train(was_training)
    if np.isnan(out).any():
        raise RuntimeError(f"{int(np.isnan(out[:, 0]).sum())} pairs were not packed into any row")
    return out[:, 0], out[:, 1]


def _share(mask: np.ndarray) -> float:
    return round(float(np.mean(mask)), 4) if len(mask) else math.nan


def preference_eval(model: Any, tokenizer: Any, pairs: Any, *, reference: Any = None, beta: float = 0.1,
                    seq_len: int = 512, batch_rows: int = 8, cache_dir: Path | str | None = None) -> dict[str, Any]:
    """Preference figures of ``model`` on ``pairs`` (a DPO JSONL path or a ``DPODataset``).

    Returns ``n_pairs``, ``logp_accuracy`` (share of pairs with ``log pi(chosen) > log pi(rejected)``,
    summed over each reply's tokens), ``mean_logp_margin`` (mean of that difference), per task kind
    and per rejection kind when the JSONL rows carry ``kind``/``rejection``, and the per-pair
    ``chosen_logps``/``rejected_logps``.  ``reference`` (a model, or an earlier result of this
    function on the same pairs) adds the DPO implicit rewards ``beta * (log pi - log pi_ref)``:
    ``mean_reward_chosen``, ``mean_reward_rejected``, ``mean_reward_margin`` and ``reward_accuracy``
    (share of pairs with a positive reward margin).  ``seq_len`` packs pairs like the DPO stage
    with ``max_seq_len = seq_len`` (pairs longer than that are cut the same way).
    """
    dataset, tmp = _dataset(pairs, tokenizer, seq_len, cache_dir)
    try:
        pc, pr = pair_logps(model, dataset, batch_rows)
        if reference is None:
            ref = None
        elif isinstance(reference, dict):
            ref = (np.asarray(reference["chosen_logps"]), np.asarray(reference["rejected_logps"]))
        else:
            ref = pair_logps(reference, dataset, batch_rows)
    finally:
        if tmp is not None:
            tmp.cleanup()
    wins = pc > pr
    # pairs shortened to fit a row of seq_len + 1 tokens (0 when seq_len covers the longest pair)
    res: dict[str, Any] = {"n_pairs": len(pc), "n_cut_pairs": dataset.num_cut_pairs,
                           "logp_accuracy": _share(wins),
                           "mean_logp_margin": round(float(np.mean(pc - pr)), 4)}
    if not isinstance(pairs, (str, Path)):
        rows = []
    else:
        rows = read_preference_rows(pairs)
    if len(rows) == len(pc) and all("kind" in r and "rejection" in r for r in rows):
        for field in ("kind", "rejection"):
            groups: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(rows):
                groups[r[field]].append(i)
            res[f"logp_accuracy_by_{field}"] = {k: _share(wins[v]) for k, v in sorted(groups.items())}
    if ref is not None:
        if len(ref[0]) != len(pc):
            raise ValueError(f"reference has {len(ref[0])} pairs, the model {len(pc)}")
        rc, rr = beta * (pc - ref[0]), beta * (pr - ref[1])
        margin = rc - rr
        res.update(beta=beta, mean_reward_chosen=round(float(np.mean(rc)), 4),
                   mean_reward_rejected=round(float(np.mean(rr)), 4),
                   mean_reward_margin=round(float(np.mean(margin)), 4), reward_accuracy=_share(margin > 0))
    res["chosen_logps"] = [float(x) for x in pc]
    res["rejected_logps"] = [float(x) for x in pr]
    return res
