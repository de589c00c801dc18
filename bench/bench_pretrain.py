"""Pretraining throughput: useful (non-padding) tokens per second of one optimizer step.

Compares, in one run on the same model and machine (steps of all variants taken in turn, median per
variant, so a busy machine moves the ratios less than the absolute figures):

* ``reference_style`` -- what the reference trainer feeds the model: every document in its own row,
  truncated/padded to ``seq_len`` (``--pad_fraction`` of the tokens are padding, 30% by default as
  measured for pretrain_t2t_mini at 340), plain causal attention, fp32 logits for the loss; in fp32
  on a CPU and under bf16 autocast on CUDA, as the reference's trainer runs on each;
* ``doc_<dtype>`` -- this project's step: packed rows (no padding), document-causal attention
  (dense mask on the CPU, FlexAttention block mask on CUDA), the chunked cross-entropy;
* ``causal_<dtype>`` -- the same with ``--attention causal`` (SDPA ``is_causal``: flash on CUDA);
* ``..._compiled`` -- the loss step under ``torch.compile(fullgraph=True)`` (``--compile 1``);

for ``dtype`` fp32 and, where the hardware runs it fast (CUDA, AVX-512 BF16 / AMX CPUs), bf16
autocast.  Prints one JSON object: tokens/s per variant, the ratios against ``reference_style``,
``causal / doc`` and ``bf16 / fp32``, the model FLOPs utilisation of each variant (``6 N + 12 L H T``
FLOPs per useful token against the GPU's datasheet bf16 peak, or on a CPU against a measured GEMM:
:func:`minimind.train.device.peak_flops`), and the CPU's model name and matmul-relevant flags.

    python bench/bench_pretrain.py --hidden_size 512 --num_hidden_layers 8 --batch_size 32 --seq_len 340
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from _common import bench_dtypes, environment, optimizer_step, round_robin

from minimind.config import ModelConfig
from minimind.data.batch import Batch
from minimind.model import MiniMindForCausalLM
from minimind.train.device import peak_flops, pick_device
from minimind.train.metrics import training_flops_per_token
from minimind.train.stages.base import next_token_loss


def packed_batch(b: int, t: int, vocab: int, gen: torch.Generator) -> Batch:
    """Documents of random length (20..300 tokens) packed back to back; positions restart per
    document and no target crosses a document end."""
    ids = torch.randint(3, vocab, (b, t), generator=gen)
    targets = ids.roll(-1, dims=1)
    doc = torch.zeros(b, t, dtype=torch.int32)
    pos = torch.zeros(b, t, dtype=torch.long)
    for r in range(b):
        o, d = 0, 0
        while o < t:
            n = min(int(torch.randint(20, 300, (1,), generator=gen)), t - o)
            doc[r, o:o + n] = d
            pos[r, o:o + n] = torch.arange(n)
            targets[r, o + n - 1] = -100
            o, d = o + n, d + 1
    return Batch(ids, targets, pos, doc, num_target_tokens=int((targets != -100).sum()))


def padded_rows(b: int, t: int, vocab: int, pad_fraction: float, gen: torch.Generator):
    """Reference-style rows: one document per row, the tail padded."""
    ids = torch.randint(3, vocab, (b, t), generator=gen)
    targets = ids.roll(-1, dims=1)
    real = int(t * (1 - pad_fraction))
    targets[:, real - 1:] = -100
    ids[:, real:] = 0
    return ids, targets, b * real


def make_step(variant: str, mcfg: ModelConfig, args, device: torch.device, dtype: torch.dtype):
    """``(step, useful_tokens)``: one optimizer step of ``variant`` on its own model, warmed up."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    if variant.startswith("reference_style"):
        ids, targets, useful = (x.to(device) if torch.is_tensor(x) else x
                                for x in padded_rows(args.batch_size, args.seq_len, mcfg.vocab_size,
                                                     args.pad_fraction, gen))

        def loss_fn() -> torch.Tensor:
            logits = model(ids).logits.float()  # the reference upcasts all [N, V] logits
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    else:
        batch = packed_batch(args.batch_size, args.seq_len, mcfg.vocab_size, gen).to(device)
        if variant.startswith("causal"):
            batch = batch.plain_causal()
        useful = batch.num_real_tokens

        def step_loss(m: torch.nn.Module, b: Batch) -> torch.Tensor:
            return next_token_loss(m, b).loss

        compiled = torch.compile(step_loss, fullgraph=True) if variant.endswith("compiled") else step_loss

        def loss_fn() -> torch.Tensor:
            return compiled(model, batch)

    def step() -> None:
        optimizer_step(model, opt, loss_fn, device, dtype)

    for _ in range(args.warmup + (1 if variant.endswith("compiled") else 0)):
        step()
    return step, useful


def measure(variants: list[str], mcfg: ModelConfig, args, device: torch.device,
            dtypes: dict[str, torch.dtype]) -> dict[str, float]:
    """Useful tokens/s per variant from the median of ``args.steps`` steps, taken round-robin
    (:func:`_common.round_robin`)."""
    steps = {}
    for v in variants:
        steps[v] = make_step(v, mcfg, args, device, variant_dtype(v, device, dtypes))
    secs = round_robin({v: s[0] for v, s in steps.items()}, args.steps, device)
    return {v: round(steps[v][1] / secs[v], 1) for v in variants}


def variant_dtype(variant: str, device: torch.device, dtypes: dict[str, torch.dtype]) -> torch.dtype:
    """The autocast dtype a variant runs in: named in it (``doc_bf16``), else the reference trainer's
    own choice (bf16 on CUDA, fp32 on a CPU)."""
    named = next((dt for name, dt in dtypes.items() if f"_{name}" in variant), None)
    if named is not None:
        return named
    return torch.bfloat16 if variant.startswith("reference_style") and device.type == "cuda" else torch.float32


def mfu(tps: dict[str, float], mcfg: ModelConfig, seq_len: int, device: torch.device,
        dtypes: dict[str, torch.dtype]) -> dict[str, float]:
    """Model FLOPs utilisation per variant: useful tokens/s x training FLOPs per token / peak."""
    per_tok = training_flops_per_token(MiniMindForCausalLM(mcfg), seq_len)
    return {v: round(t * per_tok / peak_flops(device, variant_dtype(v, device, dtypes)), 4)
            for v, t in tps.items()}


def ratios(tps: dict[str, float]) -> dict[str, dict[str, float]]:
    """Every variant against reference_style; causal against doc; bf16 against fp32."""
    out: dict[str, dict[str, float]] = {}
    base = tps.get("reference_style")
    if base:
        out["vs_reference_style"] = {k: round(v / base, 3) for k, v in tps.items() if k != "reference_style"}
    doc_of = {k: k.replace("causal", "doc", 1) for k in tps if k.startswith("causal")}
    out["causal_vs_doc"] = {k.replace("causal_", ""): round(tps[k] / tps[d], 3)
                            for k, d in doc_of.items() if d in tps}
    out["bf16_vs_fp32"] = {k.replace("_bf16", ""): round(v / tps[k.replace("bf16", "fp32")], 3)
                           for k, v in tps.items() if "bf16" in k and k.replace("bf16", "fp32") in tps}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--use_moe", type=int, default=0, help="1 = the MoE preset's experts")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=340)
    p.add_argument("--pad_fraction", type=float, default=0.30)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", type=int, default=0, help="also time the compiled (fullgraph) loss step")
    p.add_argument("--variants", default="", help="comma-separated subset (default: all that apply)")
    args = p.parse_args()
    device = pick_device(args.device)
    mcfg = ModelConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                       use_moe=bool(args.use_moe), max_position_embeddings=max(2048, args.seq_len))
    dtypes = bench_dtypes(device)
    if args.variants:
        variants = args.variants.split(",")
    else:
        variants = ["reference_style"] + [f"{mode}_{d}" for d in dtypes for mode in ("doc", "causal")]
        if args.compile:
            variants += [f"{mode}_{d}_compiled" for d in dtypes if d != "fp32" or len(dtypes) == 1
                         for mode in ("doc", "causal")]
    out: dict[str, object] = {
        **environment(device), "model_params": MiniMindForCausalLM(mcfg).num_parameters(), "batch": [args.batch_size, args.seq_len],
        "pad_fraction_reference": args.pad_fraction, "steps": args.steps}
    tps = measure(variants, mcfg, args, device, dtypes)
    out["useful_tokens_per_s"] = tps
    out["mfu"] = mfu(tps, mcfg, args.seq_len, device, dtypes)
    out.update(ratios(tps))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
