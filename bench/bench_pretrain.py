"""Pretraining throughput: useful (non-padding) tokens per second of one optimizer step.

Compares, in one run on the same model and machine:
  * ``reference_style`` — what the reference trainer feeds the model: every document in its own row,
    truncated/padded to ``max_seq_len`` (``--pad_fraction`` of the tokens are padding, 30% by default
    as measured for pretrain_t2t_mini at 340), plain causal attention, fp32 on CPU;
  * ``packed`` — this project's packed rows with the document-causal mask (no padding);
  * ``packed_compiled`` — the same under ``torch.compile`` (``--compile 1``);
  * ``packed_autocast`` — with the project's automatic dtype (bf16 on CUDA / AVX512-BF16 CPUs).
Prints one JSON object with tokens/s per variant and the ratios against ``reference_style``.

    python bench/bench_pretrain.py --hidden_size 512 --num_hidden_layers 8 --batch_size 32 --seq_len 340
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.train.device import autocast, pick_device, pick_dtype


def make_batch(b: int, t: int, vocab: int, pad_fraction: float, packed: bool, gen: torch.Generator):
    ids = torch.randint(3, vocab, (b, t), generator=gen)
    targets = ids.roll(-1, dims=1)
    if packed:
        # documents of random length packed back to back; positions restart at each start
        doc = torch.zeros(b, t, dtype=torch.int32)
        pos = torch.zeros(b, t, dtype=torch.long)
        for r in range(b):
            o, d = 0, 0
            while o < t:
                n = int(torch.randint(20, 300, (1,), generator=gen))
                doc[r, o:o + n] = d
                pos[r, o:o + n] = torch.arange(min(n, t - o))
                o, d = o + n, d + 1
        return ids, targets, pos, doc, b * t
    real = int(t * (1 - pad_fraction))
    targets[:, real - 1:] = -100
    ids[:, real:] = 0
    return ids, targets, None, None, b * real


def run(variant: str, mcfg: ModelConfig, args, device, dtype) -> float:
    torch.manual_seed(0)
    model = MiniMindForCausalLM(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if variant == "packed_compiled" else model
    gen = torch.Generator().manual_seed(0)
    packed = variant != "reference_style"
    batch = [x.to(device) if torch.is_tensor(x) else x
             for x in make_batch(args.batch_size, args.seq_len, mcfg.vocab_size, args.pad_fraction, packed, gen)]
    ids, targets, pos, doc, useful = batch

    def step():
        with autocast(device, dtype):
            out = fwd(ids, position_ids=pos, doc_ids=doc)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return useful * args.steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=340)
    p.add_argument("--pad_fraction", type=float, default=0.30)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", type=int, default=0)
    p.add_argument("--variants", default="")
    args = p.parse_args()
    device = pick_device(args.device)
    mcfg = ModelConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                       max_position_embeddings=max(2048, args.seq_len))
    auto = pick_dtype(device, "auto")
    variants = args.variants.split(",") if args.variants else (
        ["reference_style", "packed"] + (["packed_compiled"] if args.compile else [])
        + (["packed_autocast"] if auto != torch.float32 else []))
    out = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "model_params": MiniMindForCausalLM(mcfg).num_parameters(), "batch": [args.batch_size, args.seq_len],
           "pad_fraction_reference": args.pad_fraction, "useful_tokens_per_s": {}}
    for v in variants:
        dtype = auto if v == "packed_autocast" else (torch.float32 if device.type == "cpu" else auto)
        out["useful_tokens_per_s"][v] = round(run(v, mcfg, args, device, dtype), 1)
    base = out["useful_tokens_per_s"].get("reference_style")
    if base:
        out["speedup_vs_reference_style"] = {k: round(v / base, 3) for k, v in out["useful_tokens_per_s"].items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
