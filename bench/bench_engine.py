"""Decode throughput of our GenerationEngine against the reference ``generate()`` loop.

What is measured, for each dtype and batch size, in one run on the same random-weight model:

* ``engine`` (and any other engine variant named with ``--variants``): our
  :class:`~minimind.infer.GenerationEngine` with ``dtype=<dtype>``;
* ``reference``: the reference decoder and sampling loop rebuilt in ``bench/reference_decode.py``
  (growing ``torch.cat`` KV cache, ``repeat_kv``, manual attention per decode step, logits for every
  prompt position), cast with ``model.to(dtype)`` as a user of that project would do;
* ``matmul_floor``: one decode step's matrix products alone (q/k/v/o/gate/up/down for every layer
  plus ``lm_head``, for the whole batch, in that dtype) timed in a tight loop.  ``batch / step time``
  is an upper bound on decode tokens/s for any engine that does these products unfused.

Why the floor matters: a 64M-parameter model does little arithmetic per token, so its decode speed
is set by per-step overhead (Python, dispatch, small kernels, cache copies, host syncs) and by
reading the weights, not by FLOPs.  The gap between an engine and the floor is that overhead.

Both sides sample with temperature 0.85, top-k 50, top-p 0.85 and no stop token (the reference gets
an EOS id that can never be sampled, so it still pays its per-step "all finished?" check), so every
row decodes exactly ``--new_tokens`` tokens.  Prefill and decode are separated: the time to first
token (TTFT) is a ``max_new_tokens=1`` call (prefill plus one sample), and
``decode tok/s = B * (N - 1) / (total - TTFT)``.  Each side is warmed up once before timing; the
reported times are the best of ``--repeats`` runs (interference from other processes only ever
adds time, so the fastest run is the least disturbed one; every run's time is kept in the JSON).
Prints one JSON object (``--out`` also writes it).

Run it on an otherwise idle machine: when other processes hold the cores, multi-threaded kernels
wait on each other and small matmuls get orders of magnitude slower.  The report records the load
average at start and end so such runs can be recognised (``--threads 1`` is the robust fallback).

    python bench/bench_engine.py                      # minimind-3, batches 1,8,32, fp32 and bf16
    python bench/bench_engine.py --batches 1,8 --out runs/bench_engine.json
    python bench/bench_engine.py --quick              # tiny model, short lengths: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from minimind.config import PRESETS, preset
from minimind.infer import GenerationEngine, SamplingParams
from minimind.model import MiniMindForCausalLM

TEMPERATURE, TOP_K, TOP_P = 0.85, 50, 0.85
NEVER_SAMPLED_EOS = -1  # no token has this id: rows never finish early, the finished check still runs

# Engine variants: name -> extra GenerationEngine keyword arguments.  A variant whose arguments the
# installed engine does not accept is reported as skipped, so options can be listed before they exist.
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "engine": {},
    "engine_compiled": {"compile": True},
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FULL_DEFAULTS: dict[str, Any] = {"preset": "minimind-3", "batches": "1,8,32", "prompt_len": 100,
                                 "new_tokens": 200, "repeats": 3, "floor_iters": 20}
QUICK_DEFAULTS: dict[str, Any] = {"preset": "tiny", "batches": "1,8", "prompt_len": 32, "new_tokens": 32,
                                  "repeats": 2, "floor_iters": 10}


def load_reference() -> ModuleType:
    """Import ``reference_decode.py`` from this script's folder (bench/ is not a package)."""
    name = "reference_decode"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cpu_info() -> dict[str, Any]:
    """CPU model and the instruction-set flags that decide how fast bf16 matmuls can be."""
    info: dict[str, Any] = {"machine": platform.machine(), "model": platform.processor() or None}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and info.get("model") in (None, "", platform.machine()):
                info["model"] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    info["flags"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    try:
        info["mkldnn_bf16_supported"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["mkldnn_bf16_supported"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[int], int], n: int, device: torch.device) -> tuple[float, int]:
    """Seconds and completion tokens of one ``run(n)`` call (device work included)."""
    sync(device)
    t0 = time.perf_counter()
    count = run(n)
    sync(device)
    return time.perf_counter() - t0, count


def measure(runs: dict[str, Callable[[int], int]], batch: int, prompt_len: int, new_tokens: int,
            repeats: int, seed: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Time each side's ``run(max_new_tokens) -> completion tokens`` for TTFT and the full decode.

    Sides take turns within each repeat (engine, reference, engine, ...) so that a change in
    machine load hits all of them alike.  The warm-up is one short call per side; it pays one-off
    costs (allocator growth, kernel selection, lazy initialisation) a served model pays once.
    """
    for run in runs.values():
        torch.manual_seed(seed)
        run(min(new_tokens, 8))
    ttfts: dict[str, list[float]] = {name: [] for name in runs}
    totals: dict[str, list[float]] = {name: [] for name in runs}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            torch.manual_seed(seed)
            ttfts[name].append(timed(run, 1, device)[0])
            torch.manual_seed(seed)
            t, counts[name] = timed(run, new_tokens, device)
            totals[name].append(t)
    out = {}
    for name in runs:
        ttft, total = min(ttfts[name]), min(totals[name])
        decode_s = max(total - ttft, 1e-9)
        out[name] = {
            "ttft_s": ttft,
            "prefill_tok_s": batch * prompt_len / ttft,
            "total_s": total,
            "decode_s": decode_s,
            "decode_tok_s": batch * (new_tokens - 1) / decode_s,
            "decode_tok_s_per_row": (new_tokens - 1) / decode_s,
            "end_to_end_tok_s": batch * new_tokens / total,
            "completion_tokens": counts[name],
            "ttft_runs_s": ttfts[name],
            "total_runs_s": totals[name],
        }
    return out


def make_engine_run(engine: GenerationEngine, prompts: list[list[int]]) -> Callable[[int], int]:
    def run(n: int) -> int:
        params = SamplingParams(max_new_tokens=n, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P,
                                stop_token_ids=())
        return sum(r.completion_tokens for r in engine.generate(prompts, params))
    return run


def make_reference_run(model: torch.nn.Module, prompts: torch.Tensor) -> Callable[[int], int]:
    mask = torch.ones_like(prompts)  # what the reference's tokenizer call hands to generate()

    def run(n: int) -> int:
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=n, temperature=TEMPERATURE,
                             top_k=TOP_K, top_p=TOP_P, eos_token_id=NEVER_SAMPLED_EOS)
        return (out.shape[1] - prompts.shape[1]) * out.shape[0]
    return run


@torch.inference_mode()
def matmul_floor(model: MiniMindForCausalLM, batch: int, dtype: torch.dtype, iters: int,
                 device: torch.device) -> dict[str, float]:
    """Time one decode step's projections for ``batch`` rows: every layer's seven weight matrices
    and the LM head, each a separate tensor so the weights stream from memory as in a real step."""
    sd = model.state_dict()
    names = [f"model.layers.{i}.{m}.weight" for i in range(model.config.num_hidden_layers)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head.weight"]
    weights = [sd[n].detach().to(device=device, dtype=dtype).clone() for n in names]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=dtype) for w in weights}

    def step() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    for _ in range(2):
        step()
    times = []
    for _ in range(iters):  # each step timed alone; the fastest is the least disturbed by other load
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = min(times)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    return {"step_s": step_s, "step_s_median": sorted(times)[len(times) // 2], "tok_s": batch / step_s,
            "tok_s_per_row": 1.0 / step_s, "weight_gb_s": weight_bytes / step_s / 1e9}


def engine_variant_kwargs(name: str) -> tuple[dict[str, Any] | None, str | None]:
    """The variant's extra kwargs, or ``(None, reason)`` when the installed engine lacks them."""
    if name not in ENGINE_VARIANTS:
        raise SystemExit(f"unknown engine variant {name!r}; choose from {sorted(ENGINE_VARIANTS)}")
    kwargs = ENGINE_VARIANTS[name]
    accepted = inspect.signature(GenerationEngine.__init__).parameters
    missing = [k for k in kwargs if k not in accepted]
    if missing:
        return None, f"GenerationEngine does not accept {', '.join(missing)}"
    return kwargs, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model shape (default minimind-3; tiny with --quick)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--prompt_len", type=int, default=None, help="prompt tokens per row (default 100)")
    p.add_argument("--new_tokens", type=int, default=None, help="decoded tokens per row (default 200)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (default 3); the fastest is reported")
    p.add_argument("--floor_iters", type=int, default=None, help="decode steps timed for the matmul floor")
    p.add_argument("--variants", default="engine",
                   help=f"comma-separated engine variants: {', '.join(ENGINE_VARIANTS)}")
    p.add_argument("--no_reference", action="store_true", help="skip the reference loop")
    p.add_argument("--max_positions", type=int, default=0,
                   help="override max_position_embeddings (0 = the preset's; sizes the RoPE tables)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny model and short lengths (about a minute on 2 CPU cores)")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    for key, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.floor_iters < 1:
        p.error("--prompt_len and --repeats, --floor_iters must be >= 1 and --new_tokens >= 2 "
                "(decode speed needs tokens after the first)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _bench(args)
    finally:
        torch.set_num_threads(threads_before)  # main() is also called in-process (tests)


def load_average() -> list[float] | None:
    """1/5/15-minute load: other busy processes make multi-threaded CPU timings meaningless."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",") if b]
    dtype_names = [d for d in args.dtypes.split(",") if d]
    for d in dtype_names:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    variants = [v for v in args.variants.split(",") if v]
    overrides = {"max_position_embeddings": args.max_positions} if args.max_positions else {}
    cfg = preset(args.preset, **overrides)
    if args.prompt_len + args.new_tokens > cfg.max_position_embeddings:
        raise SystemExit("prompt_len + new_tokens exceeds max_position_embeddings")
    reference = load_reference()

    torch.manual_seed(args.seed)
    base = MiniMindForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(args.seed)
    all_prompts = torch.randint(3, cfg.vocab_size, (max(batches), args.prompt_len), generator=gen)

    report: dict[str, Any] = {
        "benchmark": "decode",
        "preset": args.preset,
        "model": {"parameters": base.num_parameters(), **{k: getattr(cfg, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")}},
        "settings": {"batches": batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "dtypes": dtype_names, "repeats": args.repeats, "floor_iters": args.floor_iters,
                     "variants": variants, "sampling": {"temperature": TEMPERATURE, "top_k": TOP_K,
                                                        "top_p": TOP_P, "stop": None},
                     "seed": args.seed, "quick": args.quick},
        "environment": {"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "device": str(device),
                        "cpu_count": os.cpu_count(), "load_average_at_start": load_average(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "results": {},
    }
    t_start = time.perf_counter()
    for dname in dtype_names:
        dtype = DTYPES[dname]
        engines: dict[str, GenerationEngine | str] = {}
        for v in variants:
            kwargs, reason = engine_variant_kwargs(v)
            engines[v] = reason if kwargs is None else GenerationEngine(
                copy.deepcopy(base), device=device, dtype=dtype, **kwargs)
        ref_model = None
        if not args.no_reference:
            ref_model = reference.ReferenceForCausalLM(reference.ReferenceConfig.from_config(cfg))
            ref_model.load_state_dict(base.state_dict())
            ref_model = ref_model.eval().to(device=device, dtype=dtype)
        per_dtype: dict[str, Any] = {}
        for b in batches:
            prompts = all_prompts[:b]
            cell: dict[str, Any] = {}
            runs: dict[str, Callable[[int], int]] = {}
            for v, engine in engines.items():
                if isinstance(engine, str):
                    cell[v] = {"skipped": engine}
                else:
                    runs[v] = make_engine_run(engine, prompts.tolist())
            if ref_model is not None:
                runs["reference"] = make_reference_run(ref_model, prompts.to(device))
            print(f"[bench] {dname} batch {b}: {', '.join(runs)}", file=sys.stderr, flush=True)
            cell.update(measure(runs, b, args.prompt_len, args.new_tokens, args.repeats, args.seed, device))
            cell["matmul_floor"] = matmul_floor(base, b, dtype, args.floor_iters, device)
            floor = cell["matmul_floor"]["tok_s"]
            for side in [*engines, "reference"]:
                if "decode_tok_s" in cell.get(side, {}):
                    cell[side]["decode_fraction_of_floor"] = cell[side]["decode_tok_s"] / floor
            ref = cell.get("reference")
            for v in engines:
                ours = cell[v]
                if ref is None or "decode_tok_s" not in ours:
                    continue
                key = "engine_vs_reference" if v == "engine" else f"{v}_vs_reference"
                cell[key] = {"decode": ours["decode_tok_s"] / ref["decode_tok_s"],
                             "prefill": ours["prefill_tok_s"] / ref["prefill_tok_s"],
                             "ttft_speedup": ref["ttft_s"] / ours["ttft_s"],
                             "total_speedup": ref["total_s"] / ours["total_s"]}
            per_dtype[str(b)] = cell
        report["results"][dname] = per_dtype
        del engines, ref_model
        gc.collect()
    report["wall_s"] = time.perf_counter() - t_start
    report["environment"]["load_average_at_end"] = load_average()
    return emit(report, args.out)


def emit(report: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Print the report as JSON and, with ``out``, also write it there."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
