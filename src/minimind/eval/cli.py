"""``minimind eval bpb|mc|math|tools|longctx``: score a model, print a table, optionally write JSON results.

``--weight`` (or ``--model``) takes our weights file, a stage name (``full_sft`` ->
``<save_dir>/full_sft_<H>...``) or a Hugging Face folder (see :mod:`minimind.eval.loading`); ``--out results.json`` writes the
:mod:`minimind.eval.results` format.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from minimind.eval.results import EvalResult, print_results, write_results


def _common(p: argparse.ArgumentParser, batch_size: int, limit_help: str,
            data_help: str = "evaluation data file (or folder, for mc)", data_required: bool = True) -> None:
    a = p.add_argument
    a("--model", required=True,
      help="weights file (.safetensors / reference .pth), stage name (full_sft -> <save_dir>/full_sft_<H>"
           ".safetensors) or a Hugging Face model folder (minimind export hf)")
    a("--tokenizer", default="",
      help="tokenizer folder (default: beside the model, then out/tokenizer, model/)")
    a("--data", required=data_required, default="", help=data_help)
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="compute dtype (auto: bf16 on CUDA / bf16-capable CPUs, else fp32)")
    a("--quantize", default="", choices=["", "int8"],
      help="int8: generation-based evals decode with int8 weights (the engine's own copy)")
    a("--batch_size", type=int, default=batch_size, help="sequences per forward pass")
    a("--limit", type=int, default=0, help=limit_help)
    a("--out", default="", help="write the results as JSON to this path")
    a("--save_dir", default="out", help="where a stage-name --weight is looked up")
    a("--hidden_size", type=int, default=0, help="H of a stage-name --weight (0 = 768, or the only one there)")
    a("--use_moe", type=int, default=-1, choices=[-1, 0, 1], help="1 = a stage-name --weight ends in _moe")
    a("--preset", default="minimind-3", help="shape defaults for a reference .pth without a config")
    a("--progress", type=int, default=1, choices=[0, 1], help="progress bar on a terminal")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` with its ``bpb``, ``mc``, ``math``, ``tools`` and ``longctx`` sub-commands."""
    ev = subparsers.add_parser("eval", help="evaluate a model: bits per byte, multiple choice, math, tool use, "
                                            "long context",
                               description="Evaluate a model; prints a table, --out writes JSON results.")
    tasks = ev.add_subparsers(dest="task", required=True)

    bp = tasks.add_parser("bpb", help="bits per UTF-8 byte and perplexity on a pretrain JSONL "
                                      "({\"text\"} rows)")
    _common(bp, 8, "score only the first N documents (0 = all)")
    bp.add_argument("--max_docs", dest="limit", type=int, default=argparse.SUPPRESS, help="same as --limit")
    bp.add_argument("--window", type=int, default=0,
                    help="tokens per slice for long documents, BOS included (0 = max_position_embeddings)")
    bp.add_argument("--stride", type=int, default=0,
                    help="tokens a sliding window advances (0 = window // 2)")
    bp.set_defaults(func=cmd_eval_bpb)

    mc = tasks.add_parser("mc", help="multiple choice: C-Eval / CMMLU CSV (file or folder) or JSONL")
    _common(mc, 16, "at most N questions per subject (0 = all)")
    mc.add_argument("--shots", type=int, default=0, help="k-shot: answered examples before each question")
    mc.add_argument("--dev", default="", help="where shots come from (file or folder; default: --data "
                                              "itself, never the question being asked)")
    mc.add_argument("--lang", default="auto", choices=["auto", "zh", "en"],
                    help="prompt language (auto: zh for CSV, en for JSONL unless mostly Chinese)")
    mc.add_argument("--subjects", default="", help="comma-separated subjects to keep (default all)")
    mc.set_defaults(func=cmd_eval_mc)

    mt = tasks.add_parser("math", help="GSM8K-style math: accuracy and pass@k of generated answers")
    _common(mt, 16, "evaluate only the first N questions (0 = all)")
    mt.add_argument("--n", type=int, default=1, help="samples per question (pass@k needs n >= k)")
    mt.add_argument("--pass_k", default="", help="extra k values for pass@k, e.g. 2,4 (1 and n always)")
    mt.add_argument("--temperature", type=float, default=None,
                    help="0 = greedy (default for n = 1); default 0.8 for n > 1")
    mt.add_argument("--top_p", type=float, default=0.95)
    mt.add_argument("--top_k", type=int, default=0, help="0 = disabled")
    mt.add_argument("--max_new_tokens", type=int, default=512)
    mt.add_argument("--open_thinking", type=int, default=0, choices=[0, 1], help="open a <think> block")
    mt.add_argument("--seed", type=int, default=0, help="sampling seed")
    mt.add_argument("--samples", type=int, default=20, help="completions kept in the JSON results")
    mt.set_defaults(func=cmd_eval_math)

    tl = tasks.add_parser("tools", help="multi-round tool use: call validity, right tool, exact arguments, "
                                        "final answer")
    _common(tl, 256, "evaluate only the first N tool episodes (0 = all)",
            data_help="JSONL of task rows (e.g. the demo's data/eval_tasks.jsonl; non-tool rows are "
                      "skipped); default: generate --n_tasks eval-split tool tasks",
            data_required=False)
    tl.add_argument("--n_tasks", type=int, default=64, help="tool tasks to generate when there is no --data")
    tl.add_argument("--task_seed", type=int, default=0, help="seed of the generated tasks")
    tl.add_argument("--langs", default="zh,en", help="languages of the generated tasks")
    tl.add_argument("--level", default="standard", choices=["standard", "easy"],
                    help="difficulty of the generated tasks (easy: only the needed tool is offered)")
    tl.add_argument("--max_rounds", type=int, default=3, help="model replies per episode at most")
    tl.add_argument("--max_new_tokens", type=int, default=256, help="tokens per reply at most")
    tl.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    tl.add_argument("--top_p", type=float, default=0.95)
    tl.add_argument("--top_k", type=int, default=0, help="0 = disabled")
    tl.add_argument("--seed", type=int, default=0, help="sampling seed")
    tl.add_argument("--open_thinking", type=int, default=0, choices=[0, 1], help="open a <think> block")
    tl.add_argument("--samples", type=int, default=20, help="episode transcripts kept in the JSON results")
    tl.set_defaults(func=cmd_eval_tools)

    lc = tasks.add_parser("longctx", help="loss by position on long sequences, plain RoPE vs YaRN")
    _common(lc, 4, "at most N sequences (default 32, 0 = all)",
            data_help="pretrain JSONL ({\"text\"} rows, laid end to end) or one long text file")
    lc.set_defaults(limit=32)
    lc.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    lc.add_argument("--original_length", type=int, default=0,
                    help="the context the model was trained on (its --max_seq_len; default: the model's "
                         "YaRN original_max_position_embeddings, else max_position_embeddings)")
    lc.add_argument("--yarn_factor", type=float, default=0.0,
                    help="YaRN factor (0 = max(1, length / original_length))")
    lc.add_argument("--buckets", type=int, default=8, help="position buckets in the table")
    lc.add_argument("--plot", default="", help="write a PNG of both loss curves to this path")
    lc.set_defaults(func=cmd_eval_longctx)
    return ev


def _load(args: argparse.Namespace):
    from minimind.eval.loading import load_eval_model
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    return load_eval_model(args.model, args.tokenizer or None, device=args.device, dtype=args.dtype,
                           save_dir=args.save_dir, hidden_size=args.hidden_size, use_moe=args.use_moe,
                           preset=args.preset)


def results_console() -> Console:
    """Rich console for the results tables.  On a terminal rich uses its width; piped into a file or
    ``tee`` it would assume 80 columns and cut the tables, so there the width is unbounded (a table
    only takes the width its content needs)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 1000)


def _finish(result: EvalResult, args: argparse.Namespace) -> int:
    print_results(result, console=results_console())
    if args.out:
        path = write_results(result, args.out)
        print(f"wrote {path}")
    return 0


def _base_settings(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    return {"device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
            "batch_size": args.batch_size, "limit": args.limit or None,
            "tokenizer": str(args.tokenizer) if args.tokenizer else None,
            "params": loaded.model.num_parameters()}


def cmd_eval_bpb(args: argparse.Namespace) -> int:
    from minimind.eval.bpb import evaluate_bpb_jsonl
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    loaded = _load(args)
    start = time.perf_counter()
    metrics = evaluate_bpb_jsonl(loaded.model, loaded.tokenizer, args.data, batch_size=args.batch_size,
                                 max_docs=args.limit or None, window=args.window or None,
                                 stride=args.stride or None, dtype=loaded.dtype, progress=bool(args.progress))
    settings = {**_base_settings(args, loaded), "window": metrics.pop("window"),
                "stride": metrics.pop("stride")}
    return _finish(EvalResult("bpb", loaded.name, metrics, settings, model_path=str(loaded.path),
                              data=str(args.data), seconds=time.perf_counter() - start), args)


def cmd_eval_mc(args: argparse.Namespace) -> int:
    from minimind.eval.mc import LETTERS, limit_per_subject, load_mc, score_items, subject_names, summarize
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    items = load_mc(args.data, args.lang)
    if args.subjects:
        keep = {s.strip() for s in args.subjects.split(",") if s.strip()}
        unknown = keep - {it.subject for it in items}
        if unknown:
            raise ValueError(f"--subjects: not in {args.data}: {', '.join(sorted(unknown))}")
        items = [it for it in items if it.subject in keep]
    items = limit_per_subject(items, args.limit)
    dev = load_mc(args.dev, args.lang) if args.dev else None
    loaded = _load(args)
    start = time.perf_counter()
    scored = score_items(loaded.model, loaded.tokenizer, items, shots=args.shots, dev=dev,
                         batch_size=args.batch_size, dtype=loaded.dtype,
                         names=subject_names(args.data, items[0].lang), progress=bool(args.progress))
    metrics, subjects = summarize(scored)
    samples = [{"where": it.where, "answer": LETTERS[s["answer"]], "pred_letter": LETTERS[s["pred_letter"]],
                "pred_choice": LETTERS[s["pred_choice"]]} for it, s in list(zip(items, scored))[:20]]
    settings = {**_base_settings(args, loaded), "shots": args.shots, "dev": args.dev or None,
                "lang": args.lang, "subjects": args.subjects or None}
    return _finish(EvalResult("mc", loaded.name, metrics, settings, subjects, model_path=str(loaded.path),
                              data=str(args.data), seconds=time.perf_counter() - start,
                              samples=samples), args)


def cmd_eval_math(args: argparse.Namespace) -> int:
    from minimind.eval.math import evaluate_math, load_math
    from minimind.infer.engine import GenerationEngine
    try:
        ks = [int(k) for k in args.pass_k.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--pass_k must be comma-separated integers, got {args.pass_k!r}") from None
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    bad = [k for k in ks if not 1 <= k <= args.n]
    if bad:
        raise ValueError(f"--pass_k values must be between 1 and --n {args.n}, got {bad}")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
    if args.n > 1 and temperature <= 0:
        raise ValueError("--n > 1 samples need --temperature > 0 (greedy samples are all the same)")
    items, skipped = load_math(args.data, args.limit or None)
    loaded = _load(args)
    engine = GenerationEngine(loaded.model, loaded.tokenizer, dtype=loaded.dtype,
                              num_slots=max(8, args.batch_size * args.n),
                              quantize=getattr(args, "quantize", "") or None)
    start = time.perf_counter()
    out = evaluate_math(engine, items, n=args.n, temperature=temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, ks=ks, seed=args.seed,
                        open_thinking=bool(args.open_thinking), keep_samples=args.samples,
                        progress=bool(args.progress))
    metrics = {**out["metrics"], "skipped_non_numeric": skipped}
    settings = {**_base_settings(args, loaded), "n": args.n, "temperature": temperature, "top_p": args.top_p,
                "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "open_thinking": bool(args.open_thinking)}
    return _finish(EvalResult("math", loaded.name, metrics, settings, out["subjects"],
                              model_path=str(loaded.path), data=str(args.data),
                              seconds=time.perf_counter() - start, samples=out["samples"]), args)


def cmd_eval_tools(args: argparse.Namespace) -> int:
    from minimind.eval.tooluse import (
        engine_replier,
        evaluate_tool_use,
        generated_tool_episodes,
        load_tool_episodes,
    )
    from minimind.infer.engine import GenerationEngine
    if args.max_rounds < 1:
        raise ValueError(f"--max_rounds must be >= 1, got {args.max_rounds}")
    if args.data:
        episodes = load_tool_episodes(args.data, args.limit or None)
    else:
        if args.n_tasks < 1:
            raise ValueError(f"--n_tasks must be >= 1, got {args.n_tasks}")
        langs = [x.strip() for x in args.langs.split(",") if x.strip()]
        episodes = generated_tool_episodes(args.limit or args.n_tasks, seed=args.task_seed, langs=langs,
                                           level=args.level)
    loaded = _load(args)
    engine = GenerationEngine(loaded.model, loaded.tokenizer, dtype=loaded.dtype,
                              num_slots=max(8, min(args.batch_size, len(episodes))),
                              quantize=getattr(args, "quantize", "") or None)
    replier = engine_replier(engine, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                             open_thinking=bool(args.open_thinking))
    start = time.perf_counter()
    out = evaluate_tool_use(replier, episodes, max_rounds=args.max_rounds, keep_samples=args.samples,
                            progress=bool(args.progress))
    settings = {**_base_settings(args, loaded), "max_rounds": args.max_rounds,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "open_thinking": bool(args.open_thinking)}
    if not args.data:
        settings.update(generated_tasks=len(episodes), task_seed=args.task_seed, langs=args.langs,
                        level=args.level)
    return _finish(EvalResult("tools", loaded.name, out["metrics"], settings, out["subjects"],
                              model_path=str(loaded.path), data=str(args.data or "generated"),
                              seconds=time.perf_counter() - start, samples=out["samples"]), args)


def cmd_eval_longctx(args: argparse.Namespace) -> int:
    from minimind.eval.longctx import evaluate_longctx, long_sequences, plot_position_curves
    if args.length < 2:
        raise ValueError(f"--length must be >= 2, got {args.length}")
    if args.buckets < 1:
        raise ValueError(f"--buckets must be >= 1, got {args.buckets}")
    if args.yarn_factor and args.yarn_factor < 1:
        raise ValueError(f"--yarn_factor must be >= 1 (or 0 for automatic), got {args.yarn_factor}")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    loaded = _load(args)
    cfg = loaded.model.config
    original = args.original_length or int((cfg.rope_scaling or {}).get("original_max_position_embeddings")
                                           or cfg.max_position_embeddings)
    seqs = long_sequences(args.data, loaded.tokenizer, args.length, args.limit or None)
    start = time.perf_counter()
    out = evaluate_longctx(loaded.model, seqs, original, yarn_factor=args.yarn_factor or None,
                           n_buckets=args.buckets, batch_size=args.batch_size, dtype=loaded.dtype,
                           progress=bool(args.progress))
    subjects = {f"positions {b['start']}-{b['end']}": {"nll_plain": b["nll_plain"], "nll_yarn": b["nll_yarn"],
                                                        "yarn_minus_plain": b["nll_yarn"] - b["nll_plain"]}
                for b in out["buckets"]}
    settings = {**_base_settings(args, loaded), "length": args.length, "original_length": original,
                "yarn_factor": out["yarn_factor"], "buckets": args.buckets}
    if args.plot:
        path = plot_position_curves(out["nll_plain"], out["nll_yarn"], args.plot, original_length=original,
                                    yarn_factor=out["yarn_factor"], first_position=out["first_position"],
                                    title=f"{loaded.name}: loss by position")
        settings["plot"] = str(path)
        print(f"wrote {path}")
    return _finish(EvalResult("longctx", loaded.name, out["metrics"], settings, subjects,
                              model_path=str(loaded.path), data=str(args.data),
                              seconds=time.perf_counter() - start), args)
