"""Decode throughput of our GenerationEngine against the reference ``generate()`` loop and llama.cpp.

What is measured, for each mode and batch size, in one run on the same random-weight model:

* ``engine`` (and any other engine variant named with ``--variants``): our
  :class:`~minimind.infer.GenerationEngine`; mode ``float32`` / ``bfloat16`` is its ``dtype``, mode
  ``int8`` is ``quantize="int8"`` with the activations ``--dtype auto`` gives (bf16, float32 on an
  AVX2-only CPU) (int8 block matrices and LM head, see
  :mod:`minimind.infer.quant`);
* ``reference``: the reference decoder and sampling loop rebuilt in ``bench/reference_decode.py``
  (growing ``torch.cat`` KV cache, ``repeat_kv``, manual attention per decode step, logits for every
  prompt position), cast with ``model.to(dtype)`` as a user of that project would do (it has no int8
  mode: the int8 rows compare with its bfloat16 row);
* ``llama_cpp``: llama.cpp (through ``llama-cpp-python``) on the *same* weights exported with
  :func:`minimind.export.gguf.export_gguf` as ``f32`` / ``bf16`` / ``q8_0`` (int8 blocks of 32 with an
  f16 scale each: llama.cpp's int8), same prompt, same sampling settings, same thread count; batch 1
  through ``Llama.generate``, larger batches as one multi-sequence ``llama_decode`` per step.  Skipped,
  with the reason in the JSON, where ``llama-cpp-python`` or ``gguf`` is not installed (or with
  ``--no_llama_cpp``: a llama.cpp 0.3.36 built with ``GGML_NATIVE=ON`` on an AMX CPU crashed in its AMX
  q8_0 matmul here; to compare q8_0 build it with ``GGML_NATIVE=OFF``, the CPU's AVX-512 options on
  and ``GGML_AMX_*=OFF``);
* ``matmul_floor``: one decode step's matrix products alone (q/k/v/o/gate/up/down for every layer
  plus ``lm_head``, for the whole batch, in that mode's weights) timed in a tight loop.  ``batch /
  step time`` is an upper bound on decode tokens/s for any engine that does these products unfused.

Every side also reports ``weight_bytes_per_step`` (the bytes of weights one decode step streams: all
matrices and norms, not the embedding table unless it doubles as the LM head) and
``weight_gb_s = weight_bytes_per_step * steps/s``: the memory bandwidth the side reaches.  A 64M-
parameter model does little arithmetic per token, so decode speed is set by reading the weights and
by per-step overhead (Python, dispatch, small kernels, cache copies, host syncs), not by FLOPs.

All sides sample with temperature 0.85, top-k 50, top-p 0.85 and no stop token (the reference gets
an EOS id that can never be sampled, so it still pays its per-step "all finished?" check), so every
row decodes exactly ``--new_tokens`` tokens.  Prefill and decode are separated: the time to first
token (TTFT) is a ``max_new_tokens=1`` call (prefill plus one sample), and
``decode tok/s = B * (N - 1) / (total - TTFT)``.  Each side is warmed up once before timing; the
reported times are the best of ``--repeats`` runs, the sides taking turns within each repeat
(interference from other processes only ever adds time, so the fastest run is the least disturbed
one; every run's time is kept in the JSON).  ``targets`` sums up the ratios the project aims at.
Prints one JSON object (``--out`` also writes it).

Run it on an otherwise idle machine: when other processes hold the cores, multi-threaded kernels
wait on each other and small matmuls get orders of magnitude slower.  The report records the load
average at start and end so such runs can be recognised (``--threads 1`` is the robust fallback).

    python bench/bench_engine.py                      # minimind-3, batches 1,8,32, fp32 and bf16
    python bench/bench_engine.py --dtypes float32,bfloat16,int8 --batches 1,8 --threads 1
    python bench/bench_engine.py --quick              # tiny model, short lengths: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import inspect
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from _common import emit_json  # bench/ is not a package: scripts import it from their own folder
from llama_cpp_side import export_for_llama_cpp, gguf_weight_bytes, llama_cpp_missing, make_llama_cpp_run

from minimind.config import PRESETS, preset
from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.quant import Int8Linear, use_gemv_, weight_bytes
from minimind.model import MiniMindForCausalLM
from minimind.train.device import pick_dtype

TEMPERATURE, TOP_K, TOP_P = 0.85, 50, 0.85
NEVER_SAMPLED_EOS = -1  # no token has this id: rows never finish early, the finished check still runs

# Engine variants: name -> extra GenerationEngine keyword arguments.  A variant whose arguments the
# installed engine does not accept is reported as skipped, so options can be listed before they exist.
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "engine": {},
    "engine_compiled": {"compile": True},
    "engine_gemv": {},  # the engine's float layers swapped for GemvLinear (single rows through torch.mv)
    # the engine's previous kernels: no oneDNN-packed weights (minimind.infer.onednn), torch.mv for one
    # bf16 row, _weight_int8pack_mm / torch._int_mm for int8, no AVX2 int8 kernel
    # (minimind.infer.avx2_int8); "engine" uses them where the CPU allows
    "engine_no_onednn": {"onednn": False},
    "engine_compiled_no_onednn": {"compile": True, "onednn": False},
    # int8 with separate q/k/v and gate/up products (the engine fuses them: minimind.infer.fuse)
    "engine_unfused": {"fuse": False},
    "engine_compiled_unfused": {"compile": True, "fuse": False},
    # inductor freezing + max_autotune on the decode step, meant for int8 b1 (weights compiled in;
    # ~100 s compile per batch shape, paid in the warm-up); one slot
    "engine_frozen": {"compile": "frozen", "num_slots": 1},
    # CUDA only: the compiled decode step replayed as a CUDA graph (inductor's reduce-overhead mode)
    "engine_cudagraphs": {"compile": "cudagraphs"},
    # one host read per token instead of the accelerator default of one per 8 (multi_step); on a CPU
    # "engine" is already this
    "engine_step1": {"multi_step": 1},
    "engine_cudagraphs_step1": {"compile": "cudagraphs", "multi_step": 1},
}
GEMV_VARIANTS = {"engine_gemv"}
# compiled variants warm up with a whole-length call: the decode graph is specialised to the cache
# length, which grows past its first size during a 100 + 200-token row (a recompile in the timed run)
FULL_WARMUP = {"engine_compiled", "engine_compiled_no_onednn", "engine_compiled_unfused",
               "engine_frozen", "engine_cudagraphs", "engine_cudagraphs_step1"}


class Mode:
    """One row of the report: the engine's compute dtype and quantization, the GGUF type llama.cpp
    runs, and the dtype the reference loop runs (``None``: it has no such mode)."""

    def __init__(self, dtype: torch.dtype, quantize: str | None, gguf: str,
                 reference: torch.dtype | None) -> None:
        self.dtype, self.quantize, self.gguf, self.reference = dtype, quantize, gguf, reference


MODES = {
    "float32": Mode(torch.float32, None, "f32", torch.float32),
    "bfloat16": Mode(torch.bfloat16, None, "bf16", torch.bfloat16),
    "float16": Mode(torch.float16, None, "f16", torch.float16),
    "int8": Mode(torch.bfloat16, "int8", "q8_0", None),  # activations: see mode_for
}


def mode_for(name: str, device: torch.device) -> Mode:
    """``MODES[name]``, with int8's activation dtype what ``--quantize int8`` runs with ``--dtype
    auto`` on ``device``: bf16 where the CPU has native bf16 (and on CUDA), float32 on an AVX2-only
    CPU, where bf16 arithmetic is emulated."""
    mode = MODES[name]
    if mode.quantize:
        mode = Mode(pick_dtype(device, "auto"), mode.quantize, mode.gguf, mode.reference)
    return mode

DTYPES = {name: m.dtype for name, m in MODES.items()}  # kept for callers of the old name

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


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> dict[str, Any]:
    """CPU model and the instruction-set flags that decide how fast bf16 / int8 matmuls can be."""
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
    info["flags"] = {f: f in flags for f in CPU_FLAGS}
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

    Sides take turns within each repeat (engine, reference, llama.cpp, engine, ...) so that a change
    in machine load hits all of them alike.  The warm-up is one short call per side (a whole-length
    one for compiled variants); it pays one-off costs (allocator growth, kernel selection, lazy
    initialisation, compilation) a served model pays once.
    """
    for name, run in runs.items():
        torch.manual_seed(seed)
        run(new_tokens if name in FULL_WARMUP else min(new_tokens, 8))
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


# ---- matmul floor --------------------------------------------------------------------------------
@torch.inference_mode()
def matmul_floor(model: MiniMindForCausalLM, batch: int, dtype: torch.dtype, iters: int,
                 device: torch.device, quantize: str | None = None) -> dict[str, float]:
    """Time one decode step's projections for ``batch`` rows: every layer's seven weight matrices
    and the LM head, each a separate tensor so the weights stream from memory as in a real step
    (int8 modules with ``quantize``)."""
    sd = model.state_dict()
    names = [f"model.layers.{i}.{m}.weight" for i in range(model.config.num_hidden_layers)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head.weight"]
    weights = [sd[n].detach().to(device=device, dtype=dtype).clone() for n in names]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=dtype) for w in weights}
    if quantize is not None:
        layers = [Int8Linear.from_linear(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=device,
                                                         dtype=dtype).requires_grad_(False), dtype)
                  for w in weights]
        for layer, w in zip(layers, weights):
            layer.set_weight(w)
        calls = [(layer, inputs[layer.in_features]) for layer in layers]
        weight_total = sum(weight_bytes(layer) for layer in layers)
    else:
        calls = [((lambda x, w=w: F.linear(x, w)), inputs[w.shape[1]]) for w in weights]
        weight_total = sum(w.numel() * w.element_size() for w in weights)

    def step() -> None:
        for fn, x in calls:
            fn(x)

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
    return {"step_s": step_s, "step_s_median": sorted(times)[len(times) // 2], "tok_s": batch / step_s,
            "tok_s_per_row": 1.0 / step_s, "weight_gb_s": weight_total / step_s / 1e9}


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
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help=f"comma-separated modes: {', '.join(MODES)} (int8 = bf16 compute, int8 weights)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (default 3); the fastest is reported")
    p.add_argument("--floor_iters", type=int, default=None, help="decode steps timed for the matmul floor")
    p.add_argument("--variants", default="engine",
                   help=f"comma-separated engine variants: {', '.join(ENGINE_VARIANTS)}")
    p.add_argument("--no_reference", action="store_true", help="skip the reference loop")
    p.add_argument("--no_llama_cpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--max_positions", type=int, default=0,
                   help="override max_position_embeddings (0 = the preset's; sizes the RoPE tables)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default); "
                   "llama.cpp gets the same count")
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
    for d in args.dtypes.split(","):
        if d and d not in MODES:
            p.error(f"--dtypes: unknown mode {d!r}; choose from {', '.join(MODES)}")
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
    # Every compiled engine here compiles the same model.forward, and dynamo counts their graphs
    # (row counts x attended lengths x variants) against one limit of 8: past it the last variant
    # silently ran eager in a 2-variant, 2-batch run.  One process per engine never gets near it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    batches = [int(b) for b in args.batches.split(",") if b]
    mode_names = [d for d in args.dtypes.split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    overrides = {"max_position_embeddings": args.max_positions} if args.max_positions else {}
    cfg = preset(args.preset, **overrides)
    if args.prompt_len + args.new_tokens > cfg.max_position_embeddings:
        raise SystemExit("prompt_len + new_tokens exceeds max_position_embeddings")
    reference = load_reference()
    llama_skip = "--no_llama_cpp" if args.no_llama_cpp else llama_cpp_missing()
    if llama_skip is None and device.type != "cpu":
        llama_skip = "llama.cpp is measured on the CPU only"

    torch.manual_seed(args.seed)
    base = MiniMindForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(args.seed)
    all_prompts = torch.randint(3, cfg.vocab_size, (max(batches), args.prompt_len), generator=gen)

    llama_version = None
    if llama_skip is None:
        import llama_cpp
        llama_version = getattr(llama_cpp, "__version__", None)
    report: dict[str, Any] = {
        "benchmark": "decode",
        "preset": args.preset,
        "model": {"parameters": base.num_parameters(), **{k: getattr(cfg, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")}},
        "settings": {"batches": batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "dtypes": mode_names, "repeats": args.repeats, "floor_iters": args.floor_iters,
                     "variants": variants, "sampling": {"temperature": TEMPERATURE, "top_k": TOP_K,
                                                        "top_p": TOP_P, "stop": None},
                     "seed": args.seed, "quick": args.quick,
                     "int8_activation_dtype": str(mode_for("int8", device).dtype).replace("torch.", "")},
        "environment": {"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "device": str(device),
                        "cpu_count": os.cpu_count(), "load_average_at_start": load_average(),
                        "llama_cpp_python": llama_version, "llama_cpp_skipped": llama_skip,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "results": {},
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        for mname in mode_names:
            report["results"][mname] = _bench_mode(args, mode_for(mname, device), base, all_prompts, batches,
                                                   variants, reference, llama_skip, Path(tmp), device)
            gc.collect()
    report["targets"] = targets(report["results"],
                                torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    report["wall_s"] = time.perf_counter() - t_start
    report["environment"]["load_average_at_end"] = load_average()
    return emit_json(report, args.out)


def _bench_mode(args: argparse.Namespace, mode: Mode, base: MiniMindForCausalLM, all_prompts: torch.Tensor,
                batches: list[int], variants: list[str], reference: ModuleType, llama_skip: str | None,
                tmp: Path, device: torch.device) -> dict[str, Any]:
    """Every batch size of one mode: engine variants, the reference loop, llama.cpp, the floor."""
    engines: dict[str, GenerationEngine | str] = {}
    for v in variants:
        kwargs, reason = engine_variant_kwargs(v)
        if kwargs is not None and mode.quantize is not None:
            kwargs, reason = ({**kwargs, "quantize": mode.quantize}, None) if "quantize" in inspect.signature(
                GenerationEngine.__init__).parameters else (None, "GenerationEngine does not accept quantize")
        try:
            engines[v] = reason if kwargs is None else GenerationEngine(
                copy.deepcopy(base), device=device, dtype=mode.dtype, **kwargs)
        except ValueError as err:  # e.g. engine_frozen without an own weight copy (fp32 on fp32 weights)
            engines[v] = str(err)
        if v in GEMV_VARIANTS and not isinstance(engines[v], str):
            use_gemv_(engines[v].model)  # the engine's own copy (a deepcopy of base): int8 layers stay
    ref_model = None
    if not args.no_reference and mode.reference is not None:
        ref_model = reference.ReferenceForCausalLM(reference.ReferenceConfig.from_config(base.config))
        ref_model.load_state_dict(base.state_dict())
        ref_model = ref_model.eval().to(device=device, dtype=mode.reference)
    gguf_path, gguf_skip = None, llama_skip
    if gguf_skip is None:
        try:
            gguf_path = export_for_llama_cpp(base, tmp, mode.gguf)
        except (ValueError, RuntimeError, OSError) as err:
            gguf_skip = f"GGUF export failed: {err}"
    step_bytes = {v: weight_bytes(e.model) for v, e in engines.items() if not isinstance(e, str)}
    if ref_model is not None:
        step_bytes["reference"] = weight_bytes(ref_model)
    if gguf_path is not None:
        step_bytes["llama_cpp"] = gguf_weight_bytes(gguf_path)

    per_batch: dict[str, Any] = {}
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
        if gguf_path is not None:
            context = args.prompt_len + args.new_tokens + 8
            runs["llama_cpp"] = make_llama_cpp_run(gguf_path, prompts.tolist(), context,
                                                   torch.get_num_threads(), args.seed,
                                                   (TOP_K, TOP_P, TEMPERATURE))
        else:
            cell["llama_cpp"] = {"skipped": gguf_skip}
        print(f"[bench] {mode.gguf} batch {b}: {', '.join(runs)}", file=sys.stderr, flush=True)
        cell.update(measure(runs, b, args.prompt_len, args.new_tokens, args.repeats, args.seed, device))
        runs.clear()
        gc.collect()  # frees the llama.cpp context of this batch size
        cell["matmul_floor"] = matmul_floor(base, b, mode.dtype, args.floor_iters, device, mode.quantize)
        floor = cell["matmul_floor"]["tok_s"]
        for side, nbytes in step_bytes.items():
            if "decode_tok_s" in cell.get(side, {}):
                cell[side]["decode_fraction_of_floor"] = cell[side]["decode_tok_s"] / floor
                cell[side]["weight_bytes_per_step"] = nbytes
                cell[side]["weight_gb_s"] = nbytes * cell[side]["decode_tok_s"] / b / 1e9
        for v in engines:
            ours = cell[v]
            if "decode_tok_s" not in ours:
                continue
            for other in ("reference", "llama_cpp"):
                theirs = cell.get(other, {})
                if "decode_tok_s" not in theirs:
                    continue
                key = f"{v}_vs_{other}"
                cell[key] = {"decode": ours["decode_tok_s"] / theirs["decode_tok_s"],
                             "prefill": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
                             "ttft_speedup": theirs["ttft_s"] / ours["ttft_s"],
                             "total_speedup": theirs["total_s"] / ours["total_s"]}
        per_batch[str(b)] = cell
    return per_batch


#: Datasheet memory bandwidth of GPUs in TB/s (SXM parts where there are several), for decode's
#: share of it; matched by substring of the device name like the MFU table.
GPU_BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "A800": 2.0, "L40S": 0.864, "4090": 1.008,
                     "3090": 0.936, "A10": 0.6, "V100": 0.9, "T4": 0.32}


def targets(results: dict[str, Any], gpu: str | None = None) -> dict[str, Any]:
    """The issue's decode targets as measured ratios (``None`` where a side was not measured), each
    with the fastest engine variant: b1 int8 / llama.cpp q8_0 >= 1, b1 bf16 / llama.cpp bf16 >= 0.8,
    b8 best engine mode / the reference loop >= 3 (bf16; float32 where bf16 was not measured); on a
    GPU of :data:`GPU_BANDWIDTH_TBS` also b1 bf16 weight bandwidth / the datasheet's >= 0.5."""
    def best(mode: str, batch: str) -> tuple[float | None, str | None]:
        cell = results.get(mode, {}).get(batch, {})
        found = [(v["decode_tok_s"], k) for k, v in cell.items()
                 if k.startswith("engine") and isinstance(v, dict) and "decode_tok_s" in v]
        return max(found) if found else (None, None)

    def side(mode: str, batch: str, name: str) -> float | None:
        return results.get(mode, {}).get(batch, {}).get(name, {}).get("decode_tok_s")

    def entry(ours: tuple[float | None, str | None], theirs: float | None, target: float,
              mode: str | None = None) -> dict[str, Any]:
        ratio = ours[0] / theirs if ours[0] and theirs else None
        return {"ratio": ratio, "target": target, "engine_variant": ours[1], "engine_mode": mode}

    b8 = max(((best(m, "8"), m) for m in results), key=lambda x: x[0][0] or 0.0, default=((None, None), None))
    # the reference loop's bf16 run; its float32 run where bf16 was not measured (AVX2-only CPUs,
    # whose bf16 is emulated); the key names which
    ref = "bfloat16" if side("bfloat16", "8", "reference") else "float32"
    out = {
        "b1_int8_vs_llama_cpp_q8_0": entry(best("int8", "1"), side("int8", "1", "llama_cpp"), 1.0, "int8"),
        "b1_bf16_vs_llama_cpp_bf16": entry(best("bfloat16", "1"), side("bfloat16", "1", "llama_cpp"), 0.8,
                                           "bfloat16"),
        f"b8_best_engine_vs_reference_{'bf16' if ref == 'bfloat16' else 'fp32'}":
            entry(b8[0], side(ref, "8", "reference"), 3.0, b8[1]),
    }
    peak = next((tbs for key, tbs in GPU_BANDWIDTH_TBS.items() if gpu and key in gpu), None)
    if peak is not None:
        _, variant = best("bfloat16", "1")
        gb_s = results.get("bfloat16", {}).get("1", {}).get(variant, {}).get("weight_gb_s") if variant else None
        out["b1_bf16_bandwidth_fraction"] = {"ratio": gb_s / (peak * 1e3) if gb_s else None, "target": 0.5,
                                             "engine_variant": variant, "engine_mode": "bfloat16",
                                             "peak_tb_s": peak}
    return out


if __name__ == "__main__":
    main()
