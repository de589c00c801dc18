"""Multiple-choice evaluation (C-Eval, CMMLU, or any JSONL of questions with lettered options).

Data.  :func:`load_mc` reads

* C-Eval CSV files (``id,question,A,B,C,D,answer[,explanation]``; ``<subject>_val.csv`` /
  ``_dev.csv`` / ``_test.csv``, the split suffix is not part of the subject),
* CMMLU CSV files (``,Question,A,B,C,D,Answer``: an unnamed index column, capitalised names),
* JSONL rows ``{"question": str, "choices": [str, ...], "answer": "B" | 1, "subject"?: str}``,

a file or a folder of such files; the subject of a CSV item is its file stem, of a JSONL item its
``subject`` field (default: the file stem).  A ``subject_mapping.json`` in the folder or its parent
(C-Eval ships one: ``{"computer_network": ["Computer Network", "计算机网络", "STEM"]}``) supplies
readable subject names for the prompt.

Prompt.  CSV data gets the Chinese format, JSONL the English one (unless its questions are mostly
Chinese, or ``lang`` says otherwise)::

    以下是关于{subject}的单项选择题，请直接给出正确答案的选项。

    {shot question}
    A. ...
    B. ...
    答案：C

    {question}
    A. ...
    B. ...
    答案：

k-shot examples are the first k items of the same subject in the dev data (``--dev``; without it,
the evaluated data itself), never the item being asked.  Shots are dropped, last first, when the
prompt would not fit the model's context.  Every prompt starts with ``<|im_start|>``, as
pretraining documents do.

Two scores per item, both from one batched forward pass in which the prompt is run once and every
option's text follows it as a separate branch (a mask keeps the branches from seeing each other; see
:class:`_Packed`), so each option is scored exactly as ``prompt + option`` alone would be:

* **letter**: the option whose letter token (``A`` after ``答案：``, `` A`` after ``Answer:``) has the
  highest next-token log-probability after the prompt, ``argmax_i log p(letter_i | prompt)``.
  Should a letter not be a single token, its summed continuation log-probability is used instead
  (scored as one more branch).
* **choice**: the option whose text, as the continuation of the prompt, has the highest
  length-normalised log-likelihood ``(1/|c_i|) sum_t log p(c_i,t | prompt, c_i,<t)``.

Accuracy = share of items whose prediction equals the answer, per subject and overall (micro: over
items; macro: mean of the subject accuracies); chance = mean of ``1 / number of choices``.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minimind.data.jsonl import DataFormatError, iter_jsonl
from minimind.eval.bpb import final_hidden, gather_logprobs

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SPLIT_SUFFIX = re.compile(r"_(val|dev|test|train)$")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")

HEADERS = {
    "zh": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
    "en": "The following are multiple choice questions about {subject}. "
          "Answer with the letter of the correct option.\n\n",
}
ANSWER_CUE = {"zh": "答案：", "en": "Answer:"}


@dataclass
class MCItem:
    """One question; ``answer`` is the 0-based index of the right choice, ``where`` is ``file:line``."""

    question: str
    choices: list[str]
    answer: int
    subject: str
    where: str = ""
    lang: str = "zh"

    def same_question(self, other: MCItem) -> bool:
        return self.question == other.question and self.choices == other.choices


def subject_of(stem: str) -> str:
    """``computer_network_val`` -> ``computer_network`` (C-Eval puts the split into the name)."""
    return _SPLIT_SUFFIX.sub("", stem)


def _answer_index(value: Any, n_choices: int) -> int:
    """A letter (``"B"``, ``" b "``) or a 0-based index -> index; ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"answer must be a letter or an index, got {value!r}")
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    else:
        raise ValueError(f"answer must be a letter A-{LETTERS[n_choices - 1]} or an index, got {value!r}")
    if not 0 <= idx < n_choices:
        raise ValueError(f"answer {value!r} is not one of the {n_choices} choices")
    return idx


def read_mc_csv(path: str | Path, lang: str = "zh") -> list[MCItem]:
    """Items of one C-Eval or CMMLU CSV file (layout recognised from the header)."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(path, 1, "empty CSV file") from None
        names = [h.strip().lower() for h in header]
        if "question" not in names or "answer" not in names:
            raise DataFormatError(path, 1, f"CSV header needs question and answer columns (C-Eval: "
                                           f"id,question,A,B,C,D,answer; CMMLU: ,Question,A,B,C,D,Answer), "
                                           f"got {','.join(header)}")
        q_col, a_col = names.index("question"), names.index("answer")
        letter_cols = []
        for letter in LETTERS.lower():
            if letter not in names:
                break
            letter_cols.append(names.index(letter))
        if len(letter_cols) < 2:
            raise DataFormatError(path, 1, "CSV header needs option columns A, B, ...")
        subject = subject_of(path.stem)
        items: list[MCItem] = []
        while True:
            line_no = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataFormatError(path, line_no, f"bad CSV: {e}") from None
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise DataFormatError(path, line_no, f"expected {len(header)} columns, got {len(row)}")
            answer = row[a_col].strip()
            if not answer:
                raise DataFormatError(path, line_no, "no answer (a test split without labels? use val/dev)")
            try:
                idx = _answer_index(answer, len(letter_cols))
            except ValueError as e:
                raise DataFormatError(path, line_no, str(e)) from None
            items.append(MCItem(question=row[q_col], choices=[row[c] for c in letter_cols], answer=idx,
                                subject=subject, where=f"{path}:{line_no}", lang=lang))
    return items


def read_mc_jsonl(path: str | Path, lang: str | None = None) -> list[MCItem]:
    """Items of a JSONL file; ``lang=None`` picks ``zh`` when most questions contain CJK characters."""
    path = Path(path)
    items: list[MCItem] = []
    for line_no, row in iter_jsonl(path):
        try:
            question, choices = row.get("question"), row.get("choices")
            if not isinstance(question, str) or not question.strip():
                raise ValueError('missing or empty "question" string')
            if isinstance(choices, dict):  # {"A": ..., "B": ...}
                choices = [choices[k] for k in sorted(choices)]
            if not (isinstance(choices, list) and len(choices) >= 2
                    and all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices)):
                raise ValueError('"choices" must be a list of at least 2 strings')
            if len(choices) > len(LETTERS):
                raise ValueError(f"at most {len(LETTERS)} choices")
            if "answer" not in row:
                raise ValueError('missing "answer" (a letter or a 0-based index)')
            idx = _answer_index(row["answer"], len(choices))
            subject = row.get("subject") or subject_of(path.stem)
            if not isinstance(subject, str):
                raise ValueError('"subject" must be a string')
        except ValueError as e:
            raise DataFormatError(path, line_no, str(e)) from None
        items.append(MCItem(question=question, choices=[str(c) for c in choices], answer=idx,
                            subject=subject, where=f"{path}:{line_no}", lang=lang or ""))
    if lang is None:
        zh = sum(bool(_CJK.search(it.question)) for it in items)
        for it in items:
            it.lang = "zh" if zh * 2 > len(items) else "en"
    return items


def load_mc(path: str | Path, lang: str = "auto") -> list[MCItem]:
    """Items of a CSV / JSONL file, or of every ``*.csv`` and ``*.jsonl`` in a folder (sorted).

    ``lang``: ``auto`` (Chinese prompts for CSV, English for JSONL unless mostly Chinese), ``zh``
    or ``en``.
    """
    if lang not in ("auto", "zh", "en"):
        raise ValueError(f"lang must be auto, zh or en, got {lang!r}")
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl") and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .csv or .jsonl files in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"multiple-choice data not found: {path}")
    items: list[MCItem] = []
    for f in files:
        if f.suffix == ".csv":
            items += read_mc_csv(f, lang="zh" if lang == "auto" else lang)
        elif f.suffix == ".jsonl":
            items += read_mc_jsonl(f, lang=None if lang == "auto" else lang)
        else:
            raise ValueError(f"{f}: multiple-choice data must be .csv or .jsonl")
    if not items:
        raise ValueError(f"no questions in {path}")
    return items


def subject_names(path: str | Path, lang: str) -> dict[str, str]:
    """Readable subject names from a ``subject_mapping.json`` next to the data, if there is one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for cand in (folder / "subject_mapping.json", folder.parent / "subject_mapping.json"):
        if cand.is_file():
            try:
                data = json.loads(cand.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cand}: not valid JSON ({e})") from None
            out = {}
            for key, value in (data.items() if isinstance(data, dict) else []):
                if isinstance(value, str):
                    out[key] = value
                elif isinstance(value, list) and value:
                    out[key] = str(value[1] if lang == "zh" and len(value) > 1 else value[0])
            return out
    return {}


# ---- prompts -------------------------------------------------------------------------------------
def format_question(item: MCItem, with_answer: bool = False, lang: str | None = None) -> str:
    """The question, its lettered options and the answer cue (plus the answer letter for a shot),
    in ``lang`` (default the item's own; a shot takes the language of the question it precedes)."""
    lang = lang or item.lang
    lines = [item.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    text = "\n".join(lines) + "\n" + ANSWER_CUE[lang]
    if with_answer:
        text += letter_text(lang, item.answer) + "\n\n"
    return text


def letter_text(lang: str, index: int) -> str:
    """How an answer letter follows the cue: ``A`` after ``答案：``, `` A`` after ``Answer:``."""
    return LETTERS[index] if lang == "zh" else " " + LETTERS[index]


def choice_text(lang: str, choice: str) -> str:
    """An option's text as the continuation of the cue (after ``Answer:`` with a leading space)."""
    return choice.strip() if lang == "zh" else " " + choice.strip()


def build_prompt(item: MCItem, shots: Sequence[MCItem], subject_name: str | None = None) -> str:
    """Header, the answered ``shots``, then ``item`` ending in the answer cue."""
    name = subject_name or item.subject.replace("_", " ")
    return (HEADERS[item.lang].format(subject=name)
            + "".join(format_question(s, True, item.lang) for s in shots) + format_question(item))


def select_shots(item: MCItem, pool: dict[str, list[MCItem]], k: int) -> list[MCItem]:
    """The first ``k`` items of ``item``'s subject in ``pool`` (all subjects pooled when the subject
    is absent), skipping ``item`` itself."""
    if k <= 0:
        return []
    cands = pool.get(item.subject)
    if cands is None:
        cands = [it for subj in sorted(pool) for it in pool[subj]]
    return [c for c in cands if not c.same_question(item)][:k]


def group_by_subject(items: Sequence[MCItem]) -> dict[str, list[MCItem]]:
    out: dict[str, list[MCItem]] = defaultdict(list)
    for it in items:
        out[it.subject].append(it)
    return dict(out)


# ---- scoring -------------------------------------------------------------------------------------
@dataclass
class _Packed:
    """One item as one sequence: the prompt once, then each continuation as a branch.

    Branches are the options' texts (and the letters, when those are not single tokens).  A branch
    sees the prompt and its own earlier tokens only, and its positions continue from the prompt's,
    so every branch is scored exactly as ``prompt + branch`` alone would be, while the prompt (the
    long part, with k shots) is run once instead of once per option.
    """

    item: int
    ctx: list[int]
    branches: list[tuple[str, int, list[int]]]  # (kind "choice" | "letter", option index, tokens)

    @property
    def length(self) -> int:  # a branch's last token is only a target, never an input
        return len(self.ctx) + sum(len(t) - 1 for _, _, t in self.branches)


def _letter_ids(tokenizer: Any, lang: str, n: int) -> list[int] | None:
    """Single-token ids of the first ``n`` letters as they follow the cue, or None if not all are."""
    ids = []
    for i in range(n):
        enc = tokenizer.encode(letter_text(lang, i))
        if len(enc) != 1:
            return None
        ids.append(enc[0])
    return ids if len(set(ids)) == n else None


def _pack(tokenizer: Any, item: MCItem, idx: int, shots: list[MCItem], max_len: int,
          names: dict[str, str], letter_ids: list[int] | None) -> tuple[_Packed, dict[str, Any]]:
    """The packed sequence of one item, with as many of ``shots`` as fit the context."""
    conts = [tokenizer.encode(choice_text(item.lang, c)) for c in item.choices]
    branches = [("choice", i, c) for i, c in enumerate(conts) if c]  # an empty option scores -inf
    if letter_ids is None:
        branches += [("letter", i, tokenizer.encode(letter_text(item.lang, i))) for i in range(len(conts))]
    longest = max((len(t) for _, _, t in branches), default=1)
    if longest >= max_len:
        raise ValueError(f"{item.where}: an option has {longest} tokens, more than the model's "
                         f"{max_len} positions leave for a prompt")
    chosen = list(shots)
    while True:
        ctx = [tokenizer.bos_id] + tokenizer.encode(build_prompt(item, chosen, names.get(item.subject)))
        if len(ctx) + longest - 1 <= max_len or not chosen:
            break
        chosen.pop()
    cut = len(ctx) + longest - 1 > max_len
    if cut:  # even zero-shot is too long: keep the end of the prompt (the question's tail + cue)
        ctx = ctx[-(max_len - longest + 1):]
    info = {"shots": len(chosen), "cut": cut, "letters": letter_ids,
            "empty": {i for i, c in enumerate(conts) if not c}}
    return _Packed(idx, ctx, branches), info


def _score_batch(model: nn.Module, chunk: Sequence[_Packed], pad_id: int, dtype: torch.dtype | None,
                 letter_ids: dict[int, list[int]]) -> tuple[dict[tuple[int, str, int], float],
                                                           dict[int, list[float]]]:
    """Summed log-prob of every branch, and the letter log-probs after the prompt of the items in
    ``letter_ids``, for one batch of packed items."""
    device = next(model.parameters()).device
    width = max(p.length for p in chunk)
    inp = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(chunk), width), dtype=torch.long)
    seg = torch.full((len(chunk), width), -1, dtype=torch.long)
    where_b, where_t, targets, owners = [], [], [], []
    for b, p in enumerate(chunk):
        n_ctx = len(p.ctx)
        inp[b, :n_ctx] = torch.tensor(p.ctx)
        pos[b, :n_ctx] = torch.arange(n_ctx)
        seg[b, :n_ctx] = 0
        off = n_ctx
        for s, (kind, i, toks) in enumerate(p.branches, start=1):
            k = len(toks) - 1
            if k:
                inp[b, off:off + k] = torch.tensor(toks[:-1])
                pos[b, off:off + k] = torch.arange(n_ctx, n_ctx + k)
                seg[b, off:off + k] = s
            for j, t in enumerate(toks):  # token j is predicted at the prompt's end or at token j - 1
                where_b.append(b)
                where_t.append(n_ctx - 1 if j == 0 else off + j - 1)
                targets.append(t)
                owners.append((p.item, kind, i))
            off += k
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    hidden = final_hidden(model, inp.to(device), position_ids=pos.to(device), dtype=dtype,
                          attn_mask=mask[:, None].to(device))
    lp = gather_logprobs(model, hidden[where_b, where_t], torch.tensor(targets, device=device)[:, None])
    sums: dict[tuple[int, str, int], float] = defaultdict(float)
    for owner, value in zip(owners, lp[:, 0].tolist()):
        sums[owner] += value
    letters: dict[int, list[float]] = {}
    need = [(b, p) for b, p in enumerate(chunk) if p.item in letter_ids]
    if need:
        h = hidden[[b for b, _ in need], [len(p.ctx) - 1 for _, p in need]]
        ids = [letter_ids[p.item] for _, p in need]
        wide = max(len(x) for x in ids)
        index = torch.tensor([x + [0] * (wide - len(x)) for x in ids], device=device)
        for (_, p), x, vals in zip(need, ids, gather_logprobs(model, h, index).tolist()):
            letters[p.item] = vals[:len(x)]
    return dict(sums), letters


@torch.no_grad()
def score_items(model: nn.Module, tokenizer: Any, items: Sequence[MCItem], shots: int = 0,
                dev: Sequence[MCItem] | None = None, batch_size: int = 8,
                dtype: torch.dtype | None = None, names: dict[str, str] | None = None,
                progress: bool = False) -> list[dict[str, Any]]:
    """Per item: ``letter_logprobs``, ``choice_scores`` (mean token log-prob), both predictions,
    ``shots`` used and whether the context had to be cut.  See the module docstring.

    ``batch_size`` items share a forward pass (each item is one packed sequence, see
    :class:`_Packed`); items are sorted by length first so a batch carries little padding.
    """
    from tqdm import tqdm

    names = names or {}
    pool = group_by_subject(dev if dev is not None else items)
    max_len = int(model.config.max_position_embeddings)
    letter_cache: dict[tuple[str, int], list[int] | None] = {}
    packed: list[_Packed] = []
    info: list[dict[str, Any]] = []
    for idx, item in enumerate(items):
        key = (item.lang, len(item.choices))
        if key not in letter_cache:
            letter_cache[key] = _letter_ids(tokenizer, item.lang, len(item.choices))
        p, i = _pack(tokenizer, item, idx, select_shots(item, pool, shots), max_len, names, letter_cache[key])
        packed.append(p)
        info.append(i)

    was_training = model.training
    model.eval()
    sums: dict[tuple[int, str, int], float] = {}
    letter_lp: dict[int, list[float]] = {}
    order = sorted(packed, key=lambda p: p.length)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    shown = tqdm(batches, desc="mc", unit="batch", disable=None, leave=False) if progress else batches
    try:
        for chunk in shown:
            fast = {p.item: info[p.item]["letters"] for p in chunk if info[p.item]["letters"] is not None}
            s, lt = _score_batch(model, chunk, tokenizer.pad_id, dtype, fast)
            sums.update(s)
            letter_lp.update(lt)
    finally:
        model.train(was_training)

    out = []
    for idx, item in enumerate(items):
        n = len(item.choices)
        letters = letter_lp[idx] if idx in letter_lp else [sums[(idx, "letter", i)] for i in range(n)]
        lengths = {i: len(t) for kind, i, t in packed[idx].branches if kind == "choice"}
        choice_scores = [float("-inf") if i in info[idx]["empty"] else sums[(idx, "choice", i)] / lengths[i]
                         for i in range(n)]
        pred_letter = max(range(n), key=lambda i: letters[i])
        pred_choice = max(range(n), key=lambda i: choice_scores[i])
        out.append({"subject": item.subject, "answer": item.answer, "letter_logprobs": letters,
                    "choice_scores": choice_scores, "pred_letter": pred_letter, "pred_choice": pred_choice,
                    "correct_letter": pred_letter == item.answer,
                    "correct_choice": pred_choice == item.answer,
                    "chance": 1.0 / n, "shots": info[idx]["shots"], "cut": info[idx]["cut"]})
    return out


def summarize(scored: Sequence[dict[str, Any]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Overall metrics and the per-subject table from :func:`score_items` output."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in scored:
        by[s["subject"]].append(s)

    def acc(rows: Sequence[dict[str, Any]], key: str) -> float:
        return sum(bool(r[key]) for r in rows) / max(len(rows), 1)

    subjects = {name: {"n": len(rows), "acc_letter": acc(rows, "correct_letter"),
                       "acc_choice": acc(rows, "correct_choice"),
                       "chance": sum(r["chance"] for r in rows) / len(rows)}
                for name, rows in sorted(by.items())}
    metrics = {"n": len(scored), "acc_letter": acc(scored, "correct_letter"),
               "acc_choice": acc(scored, "correct_choice"),
               "chance": sum(r["chance"] for r in scored) / max(len(scored), 1),
               "macro_acc_letter": sum(s["acc_letter"] for s in subjects.values()) / max(len(subjects), 1),
               "macro_acc_choice": sum(s["acc_choice"] for s in subjects.values()) / max(len(subjects), 1),
               "subjects": len(subjects),
               "mean_shots": sum(r["shots"] for r in scored) / max(len(scored), 1),
               "cut_prompts": sum(bool(r["cut"]) for r in scored)}
    return metrics, subjects


def limit_per_subject(items: Sequence[MCItem], limit: int | None) -> list[MCItem]:
    """The first ``limit`` items of every subject (all when ``limit`` is None or 0)."""
    if not limit:
        return list(items)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for it in items:
        if seen[it.subject] < limit:
            out.append(it)
            seen[it.subject] += 1
    return out
