"""``minimind report``: one markdown page from evaluation results and training metrics.

Why: after a few ``minimind eval ... --out x.json`` runs and some training, the numbers are spread
over JSON files (:mod:`minimind.eval.results` format) and metrics JSONL files (one per training
run, ``<save_weight>_<H>_metrics.jsonl``, written by :mod:`minimind.train.metrics`).  The report
gathers them:

* one section per eval task (``bpb``, ``mc``, ``math``, ``tools``, ``longctx``...) with a table of
  the runs' metrics (one row per result file, so models and stages compare side by side), a table
  of their settings, each run's breakdown (subjects, kinds, position buckets) and any plot a run
  recorded (``settings["plot"]``);
* one section per training run: a loss curve PNG (:func:`minimind.train.plots.plot_metrics`) and a
  summary line (steps, first / last / lowest logged loss).

Images are written to ``<report stem>_files/`` beside the report and linked relatively, so the
folder can be moved or zipped as a whole.  Inputs are files or folders (searched recursively for
results JSON and ``*_metrics.jsonl``; other JSON files, such as the demo's own ``results.json``,
are skipped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minimind.eval.results import FORMAT, EvalResult, _fmt
from minimind.fileio import atomic_write_text
from minimind.train.metrics import read_metrics

__all__ = ["add_report_parser", "build_report", "cmd_report", "collect_inputs", "write_report"]

#: Settings that identify the machine rather than change the numbers: left out of the settings table.
_QUIET_SETTINGS = ("device", "tokenizer", "plot")
_MAX_BREAKDOWN_ROWS = 60
#: A folder may hold large JSON files that are not results (tokenizers, caches): not even read.
_MAX_SCANNED_JSON = 16 << 20


def _is_results(obj: Any) -> bool:
    return isinstance(obj, dict) and (obj.get("format") == FORMAT
                                      or ({"task", "model", "metrics"} <= set(obj)
                                          and isinstance(obj.get("metrics"), dict)))


def collect_inputs(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, EvalResult]], list[Path]]:
    """``(results, metrics files)`` from files and folders.

    A named ``.json`` file must be a results file and a named ``.jsonl`` file a metrics file;
    folders are searched recursively, keeping only files that are one or the other.
    """
    results: list[tuple[Path, EvalResult]] = []
    metrics: list[Path] = []
    seen: set[Path] = set()

    def add_json(path: Path, strict: bool) -> None:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if strict:
                raise ValueError(f"{path}: not JSON ({e})") from None
            return
        if _is_results(obj):
            results.append((path, EvalResult.from_dict(obj)))
        elif strict:
            raise ValueError(f"{path}: not an eval results file (minimind eval ... --out)")

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.resolve() in seen or not p.is_file():
                    continue
                seen.add(p.resolve())
                if p.suffix == ".json" and p.stat().st_size <= _MAX_SCANNED_JSON:
                    add_json(p, strict=False)
                elif p.name.endswith("_metrics.jsonl"):
                    metrics.append(p)
        elif path.is_file():
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            if path.suffix == ".json":
                add_json(path, strict=True)
            elif path.suffix == ".jsonl":
                metrics.append(path)
            else:
                raise ValueError(f"{path}: expected a results .json or a metrics .jsonl file")
        else:
            raise FileNotFoundError(f"not found: {path}")
    return results, metrics


# ---- markdown helpers ----------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False)
    text = _fmt(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return out + [""]


def _columns(dicts: Sequence[dict[str, Any]], skip: Sequence[str] = ()) -> list[str]:
    cols: list[str] = []
    for d in dicts:
        cols += [k for k in d if k not in cols and k not in skip]
    return cols


def _run_label(path: Path, res: EvalResult) -> str:
    data = Path(res.data).name if res.data else ""
    return " · ".join(x for x in (res.model, data) if x) or path.stem


def _run_labels(runs: Sequence[tuple[Path, EvalResult]]) -> list[str]:
    """``model · data`` per run; runs that share one (other settings) also get their file name."""
    labels = [_run_label(p, r) for p, r in runs]
    return [f"{label} ({p.name})" if labels.count(label) > 1 else label for label, (p, _) in zip(labels, runs)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


# ---- sections ------------------------------------------------------------------------------------
def _eval_sections(results: Sequence[tuple[Path, EvalResult]], out_dir: Path) -> list[str]:
    by_task: dict[str, list[tuple[Path, EvalResult]]] = defaultdict(list)
    for path, res in results:
        by_task[res.task].append((path, res))
    lines = ["## Evaluations", ""] if by_task else []
    for task, runs in sorted(by_task.items()):
        runs = sorted(runs, key=lambda r: (r[1].timestamp, str(r[0])))
        labels = _run_labels(runs)
        lines += [f"### eval {task}", ""]
        cols = _columns([res.metrics for _, res in runs])
        lines += _table(["run", *cols, "seconds"],
                        [[label, *(r.metrics.get(c, "") for c in cols), r.seconds]
                         for label, (_, r) in zip(labels, runs)])
        scols = _columns([res.settings for _, res in runs], skip=_QUIET_SETTINGS)
        if scols:
            lines += ["Settings:", ""]
            lines += _table(["run", *scols], [[label, *(r.settings.get(c, "") for c in scols)]
                                              for label, (_, r) in zip(labels, runs)])
        lines += ["Files: " + ", ".join(f"[{p.name}]({_rel(p, out_dir)})" for p, _ in runs), ""]
        for label, (path, res) in zip(labels, runs):
            plot = res.settings.get("plot")
            if res.subjects:
                rows = list(res.subjects.items())
                bcols = _columns([row for _, row in rows])
                lines += [f"Breakdown, {label}:", ""]
                lines += _table(["group", *bcols], [[name, *(row.get(c, "") for c in bcols)]
                                                    for name, row in rows[:_MAX_BREAKDOWN_ROWS]])
                if len(rows) > _MAX_BREAKDOWN_ROWS:
                    lines += [f"({len(rows) - _MAX_BREAKDOWN_ROWS} more groups in {path.name})", ""]
            if plot:
                png = Path(plot)
                if not png.is_absolute() and not png.exists():
                    png = path.parent / png
                if png.is_file():
                    lines += [f"![{task}: {label}]({_rel(png, out_dir)})", ""]
    return lines


def _first_last(rows: Sequence[dict[str, Any]], key: str) -> tuple[Any, Any, Any]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return (vals[0], vals[-1], min(vals)) if vals else ("", "", "")


def training_sections(metrics: Sequence[Path], out_dir: Path, files_dir: Path) -> list[str]:
    """"Training runs": a table of every run's steps, first/last/lowest loss, lr and tok/s, and a loss
    curve per run (PNGs under ``files_dir``, linked relative to ``out_dir``); the demo's report too."""
    from minimind.train.plots import plot_metrics

    if not metrics:
        return []
    lines = ["## Training runs", ""]
    summary = []
    plots = []
    for path in metrics:
        rows = [r for r in read_metrics(path) if "step" in r]
        name = path.name.removesuffix("_metrics.jsonl").removesuffix(".jsonl")
        first, last, low = _first_last(rows, "loss")
        summary.append([name, rows[-1]["step"] if rows else 0, first, last, low,
                        rows[-1].get("lr", "") if rows else "", rows[-1].get("tok_per_s", "") if rows else ""])
        if any("loss" in r for r in rows):
            keys = ("loss", "lr") if any("lr" in r for r in rows) else ("loss",)
            png = plot_metrics([path], files_dir / f"loss_{_slug(name)}.png", keys=keys, title=name)
            plots.append((name, png))
    lines += _table(["run", "last step", "first loss", "last loss", "lowest loss", "last lr", "tok/s"], summary)
    for name, png in plots:
        lines += [f"### {name}", "", f"![loss curve of {name}]({_rel(png, out_dir)})", ""]
    return lines


def build_report(results: Sequence[tuple[Path, EvalResult]], metrics: Sequence[Path], out: str | Path,
                 title: str = "MiniMind report") -> str:
    """The markdown text of the report that will live at ``out`` (loss PNGs are written now)."""
    out = Path(out)
    out_dir = out.parent if str(out.parent) else Path(".")
    files_dir = out_dir / f"{out.stem}_files"
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# {title}", "",
             f"{len(results)} evaluation result(s), {len(metrics)} training run(s); generated {stamp}.", ""]
    lines += _eval_sections(results, out_dir)
    lines += training_sections(metrics, out_dir, files_dir)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(inputs: Sequence[str | Path], out: str | Path, title: str = "MiniMind report") -> Path:
    """Collect ``inputs`` (:func:`collect_inputs`) and write the report to ``out``."""
    results, metrics = collect_inputs(inputs)
    if not results and not metrics:
        raise ValueError("no eval results (.json) or training metrics (*_metrics.jsonl) found in "
                         + ", ".join(map(str, inputs)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, build_report(results, metrics, out, title))
    return out


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.inputs, args.out, args.title)
    print(f"wrote {path}")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to ``subparsers``."""
    rp = subparsers.add_parser("report", help="one markdown page from eval results JSON and training metrics",
                               description="Gather `minimind eval --out` JSON files and *_metrics.jsonl "
                                           "training logs (files or folders) into a markdown report with "
                                           "tables and loss-curve PNGs.")
    rp.add_argument("inputs", nargs="+", help="results .json / metrics .jsonl files, or folders to search")
    rp.add_argument("--out", default="report.md", help="markdown file to write (PNGs go to <stem>_files/)")
    rp.add_argument("--title", default="MiniMind report")
    rp.set_defaults(func=cmd_report)
    return rp
