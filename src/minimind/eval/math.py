"""Math word problems with a numeric final answer (GSM8K style): accuracy and pass@k.

Data rows (JSONL), either

* GSM8K: ``{"question": str, "answer": "...worked solution...\\n#### 72"}`` (or a bare number), or
* agent-RL style: ``{"conversations": [..., {"role": "user", ...}, {"role": "assistant",
  "content": ""}], "gt": ["72"]}`` -- ``gt`` a list of accepted values (or one value).

An optional ``kind`` / ``subject`` / ``type`` field groups the per-subject breakdown.  Rows whose
expected answer holds no number (e.g. the demo's date questions) are skipped and counted.

Prompts are rendered with the chat template (user turn + generation prompt) and completed by
:class:`~minimind.infer.GenerationEngine`: greedily, or ``n`` samples per question for pass@k.

Answer extraction (:func:`extract_answer`) looks, in this order, for ``#### N``, ``\\boxed{N}``,
"答案是/答案为/答案：N", "the answer is N" / "answer: N" (the last occurrence of the first marker
found), and otherwise takes the last number in the text (after ``</think>`` when the model thinks).
Numbers may carry thousands separators, a sign, decimals, fractions (``3/4``, ``\\frac{3}{4}``),
full-width digits, ``$`` and ``%``.  Two numbers are equal when ``|a - b| <= max(abs_tol, rel_tol *
|b|)``.

pass@k uses the unbiased estimator of Chen et al. (2021): with ``c`` correct among ``n`` samples,
``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over questions.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from minimind.data.jsonl import DataFormatError, iter_jsonl

# ---- numbers -------------------------------------------------------------------------------------
#: A number: optional sign (directly before the digits or a ``$``), thousands-grouped or plain
#: digits, optional decimals, optional "/denominator", optional %.  A '-' directly after a letter,
#: digit or closing bracket is an operator or a hyphen ("10-3", "COVID-19"), not a sign, and
#: neither is one followed by a space ("10 - 3").  ASCII only: the
#: text is NFKC-normalised first, which turns full-width digits into ASCII ones.
_NUMBER = re.compile(
    r"(?P<sign>(?<![A-Za-z0-9)\]])[-+])?(?:\$\s?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?"
    r"(?P<pct>\s?%)?", re.ASCII)
_MARKERS = (
    re.compile(r"####\s*"),
    re.compile(r"(?:最终答案|答案)\s*(?:是|为|应为|應為|:)\s*"),
    re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*", re.IGNORECASE),
    re.compile(r"answer\s*:\s*", re.IGNORECASE),
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")


def normalize_text(text: str) -> str:
    """Full-width to ASCII (NFKC), Unicode minus signs to ``-``, LaTeX ``\\frac{a}{b}`` to ``a/b``,
    and the thin spaces / ``\\,`` / ``{,}`` used as thousands separators in LaTeX removed."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-")
    text = text.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\$", "$")
    text = text.replace("\\%", "%").replace("\\left", "").replace("\\right", "")
    return _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)


def _to_fraction(m: re.Match) -> Fraction | None:
    whole, frac = m.group("int"), m.group("frac")
    if whole is None and frac is None:
        return None
    value = Fraction((whole or "0").replace(",", "") + (frac or ""))
    den = m.group("den")
    if den is not None:
        d = Fraction(den)
        if d == 0:
            return None
        value /= d
    return -value if m.group("sign") == "-" else value


def find_numbers(text: str) -> list[Fraction]:
    """Every number in ``text`` (already normalised), in order, as exact fractions."""
    out = []
    for m in _NUMBER.finditer(text):
        value = _to_fraction(m)
        if value is not None:
            out.append(value)
    return out


def parse_number(text: str | float) -> Fraction | None:
    """The first number in ``text`` (``"1,234.5"``, ``"-3/4"``, ``"$5"``, ``"７"``), or None."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return Fraction(text) if math.isfinite(text) else None
    nums = find_numbers(normalize_text(str(text)))
    return nums[0] if nums else None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (nested braces balanced)."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def extract_answer(text: str) -> Fraction | None:
    """The final numeric answer of a model's reply (rules in the module docstring), or None."""
    if "</think>" in text:
        after = text.rsplit("</think>", 1)[1]
        text = after if after.strip() else text
    text = normalize_text(text)
    hashes = list(_MARKERS[0].finditer(text))
    if hashes:
        nums = find_numbers(text[hashes[-1].end():])
        if nums:
            return nums[0]
    for content in reversed(_boxed_contents(text)):
        nums = find_numbers(content)
        if nums:
            return nums[-1] if "=" in content else nums[0]
    for marker in _MARKERS[1:]:
        found = list(marker.finditer(text))
        for m in reversed(found):
            nums = find_numbers(text[m.end():])
            if nums:
                return nums[0]
    nums = find_numbers(text)
    return nums[-1] if nums else None


def numbers_equal(a: Fraction | float | None, b: Fraction | float | None, rel_tol: float = 1e-6,
                  abs_tol: float = 1e-6) -> bool:
    """``|a - b| <= max(abs_tol, rel_tol * |b|)``; False when either is missing."""
    if a is None or b is None:
        return False
    return abs(float(a) - float(b)) <= max(abs_tol, rel_tol * abs(float(b)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question: ``1 - C(n - c, k) / C(n, k)`` (1 when ``n - c < k``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class MathItem:
    """One question: chat ``messages`` to answer, accepted numeric answers, a group for the table."""

    messages: list[dict[str, Any]]
    answers: list[Fraction]
    subject: str = ""
    where: str = ""
    gt_text: list[str] = field(default_factory=list)


def _row_item(row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    if isinstance(row.get("conversations"), list):
        conv = row["conversations"]
        users = [i for i, m in enumerate(conv) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("conversation has no user turn")
        messages = [{"role": m.get("role"), "content": m.get("content") or ""} for m in conv[:users[-1] + 1]]
        if "gt" in row:
            gt = row["gt"]
        elif "answer" in row:
            gt = row["answer"]
        else:
            raise ValueError('a "conversations" row needs a "gt" list (or an "answer")')
    elif isinstance(row.get("question"), str):
        if not row["question"].strip():
            raise ValueError('"question" is empty')
        messages = [{"role": "user", "content": row["question"]}]
        if "answer" not in row:
            raise ValueError('a "question" row needs an "answer" ("... #### N" or a number)')
        gt = row["answer"]
        if isinstance(gt, str) and "####" in gt:
            gt = gt.rsplit("####", 1)[1].strip()
    else:
        raise ValueError('expected a "question" string or a "conversations" list')
    gts = gt if isinstance(gt, list) else [gt]
    if not gts or not all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in gts):
        raise ValueError('the expected answer ("gt" / "answer") must be a number, a string or a list of them')
    return messages, gts


def load_math(path: str | Path, limit: int | None = None) -> tuple[list[MathItem], int]:
    """Items of a math JSONL file and the number of rows skipped for a non-numeric answer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    items: list[MathItem] = []
    skipped = 0
    for line_no, row in iter_jsonl(path):
        try:
            messages, gts = _row_item(row)
        except ValueError as e:
            raise DataFormatError(path, line_no, str(e)) from None
        answers = [a for a in (parse_number(g) for g in gts) if a is not None]
        if not answers:
            skipped += 1
            continue
        subject = row.get("kind") or row.get("subject") or row.get("type") or ""
        items.append(MathItem(messages, answers, str(subject), f"{path}:{line_no}", [str(g) for g in gts]))
        if limit and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{path}: no rows with a numeric answer")
    return items, skipped


# ---- evaluation ----------------------------------------------------------------------------------
def evaluate_math(engine: Any, items: Sequence[MathItem], n: int = 1, temperature: float = 0.0,
                  top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 512, batch_size: int = 16,
                  ks: Sequence[int] = (), seed: int | None = None, open_thinking: bool = False,
                  keep_samples: int = 20, progress: bool = False) -> dict[str, Any]:
    """Complete every item ``n`` times and score: ``accuracy`` (share of correct samples, the pass@1
    estimate), ``pass@k`` for every ``k`` in ``{1, n} | ks`` (k <= n), per subject and overall.

    ``temperature=0`` decodes greedily (then ``n`` must be 1: the samples would be identical).
    """
    from tqdm import tqdm

    from minimind.infer.sampling import SamplingParams

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > 1 and temperature <= 0:
        raise ValueError("pass@k with n > 1 samples needs --temperature > 0 (greedy samples are identical)")
    ks = sorted({1, n, *(k for k in ks if 1 <= k <= n)})
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            greedy=temperature <= 0, stop_token_ids=(tok.eos_id,), seed=seed)
    per_item: list[tuple[str, int]] = []
    samples: list[dict[str, Any]] = []
    prompts = []
    for it in items:
        ids = engine.chat_prompt_ids(it.messages, open_thinking=open_thinking)
        try:
            engine.check_prompt(ids)  # generate() adds the slots n samples need
        except ValueError as e:
            raise ValueError(f"{it.where}: {e}") from None
        prompts.append(ids)
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc="math", unit="batch", disable=None, leave=False) if progress else starts:
        results = engine.generate(prompts[start:start + batch_size], params, n=n)
        for i, it in enumerate(items[start:start + batch_size]):
            correct = 0
            for j in range(n):
                res = results[i * n + j]
                text = res.text if res.text is not None else tok.decode(res.token_ids)
                pred = extract_answer(text)
                ok = any(numbers_equal(pred, a) for a in it.answers)
                correct += ok
                if len(samples) < keep_samples and j == 0:
                    samples.append({"where": it.where, "question": it.messages[-1]["content"], "output": text,
                                    "extracted": None if pred is None else _show(pred), "gt": it.gt_text,
                                    "correct": ok})
            per_item.append((it.subject, correct))

    def block(rows: Sequence[tuple[str, int]]) -> dict[str, float]:
        out: dict[str, float] = {"n": len(rows),
                                 "accuracy": sum(c for _, c in rows) / (n * max(len(rows), 1))}
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for _, c in rows) / max(len(rows), 1)
        return out

    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for subject, c in per_item:
        groups[subject or "all"].append((subject, c))
    subjects = {name: block(rows) for name, rows in sorted(groups.items())} if len(groups) > 1 else {}
    return {"metrics": {**block(per_item), "samples_per_question": n}, "subjects": subjects,
            "samples": samples}


def _show(value: Fraction) -> str:
    """``72``, ``0.75``, ``1/3`` (decimal when finite and short, else the fraction)."""
    if value.denominator == 1:
        return str(value.numerator)
    f = float(value)
    return repr(f) if Fraction(repr(f)) == value else f"{value.numerator}/{value.denominator}"
