"""SFT throughput: assistant-loss tokens per second of one optimizer step, packed rows vs padded rows.

Compares, in one run on the same model size, machine and conversations (the sides' steps taken in
turn, median per side, so a busy machine moves the ratios less than the absolute figures):

* ``reference_<dtype>`` -- the reference SFT loop: one conversation per row, cut to ``seq_len + 1``
  tokens and padded to it, the loss mask over assistant tokens (labels ``-100`` elsewhere), plain
  causal attention from position 0, all ``[B, T, V]`` logits upcast to fp32 for the cross-entropy
  ``L = -(1/N) sum_{i: label_i != -100} log p(label_i | x_<=i)`` with ``N`` the labelled tokens;
* ``packed_<dtype>`` -- ``minimind sft``'s step: the same tokenized conversations best-fit packed into
  rows of ``seq_len + 1`` (:class:`~minimind.data.packing.PackedDataset`, mode ``sft``),
  document-causal attention with positions restarting per conversation, the same ``L`` over the same
  assistant targets (:func:`~minimind.train.stages.base.next_token_loss`, chunked cross-entropy);

for ``dtype`` fp32 and, where the hardware runs it fast (CUDA, AVX-512 BF16 / AMX CPUs), bf16
autocast over fp32 weights (the reference trains under ``torch.autocast`` on CUDA too).  Both sides
take ``B`` rows of ``T`` tokens per step, on the same conversations: those the packed batch holds
(``S``).  A reference step costs the same whatever its rows hold (fixed shape, plain causal), so
its tokens per step are ``B / |S|`` of ``S``'s totals (a pass over ``S`` takes ``|S| / B`` steps),
and the rows it is timed on are ``B`` conversations of ``S`` drawn at random.  Since every (context, target) pair is
the same on both sides, the two losses over one set of conversations agree
(``tests/test_bench_sft.py``); only the padding differs.

The conversations are generated here, offline: the project's checkable tasks
(:mod:`minimind.tasks.generators`: arithmetic, unit conversion, dates, idioms, dictionary, tool calls),
1..``--max_turns`` tasks chained into one multi-turn conversation, ``--think_share`` of them with
``<think>`` reasoning, tokenized with a byte-level BPE trained on them, with ``minimind sft``'s
augmentation and loss mask (:func:`minimind.data.sft.tokenize_conversation`).  Prints one JSON object:
assistant-target ("useful"), conversation (non-padding) and slot tokens/s per side, the packed /
reference ratios per dtype, bf16 / fp32, and the environment block of ``bench_pretrain.py``::

    python bench/bench_sft.py --hidden_size 512 --num_hidden_layers 8 --batch_size 8 --seq_len 768
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import bench_dtypes, emit_json, environment, optimizer_step, round_robin

from minimind.config import ModelConfig
from minimind.data import PackedDataset, ShardReader
from minimind.data.batch import IGNORE_INDEX, Batch
from minimind.data.formats import sft_conversation
from minimind.data.packing import PAD_DOC
from minimind.data.sft import MaskMarkers, tokenize_conversation
from minimind.data.store import write_docs
from minimind.model import MiniMindForCausalLM
from minimind.tasks.generators import generate_tasks
from minimind.tasks.rows import task_to_sft_row
from minimind.tokenizer import MiniMindTokenizer, train_tokenizer
from minimind.train.device import pick_device
from minimind.train.stages.base import next_token_loss

Doc = tuple[list[int], list[int]]  # (token ids, assistant loss mask)


def chat_rows(n: int, seed: int, max_turns: int = 8, think_share: float = 0.3) -> list[dict[str, Any]]:
    """``n`` SFT rows ``{"conversations": [...]}``: 1..``max_turns`` generated tasks chained into one
    conversation (a later task's system turn is dropped: tools may only sit on the first message),
    ``think_share`` of the conversations with reasoning in every assistant turn."""
    rng = random.Random(seed)
    turns = [rng.randint(1, max_turns) for _ in range(n)]
    tasks = iter(generate_tasks(sum(turns), seed))
    rows = []
    for k in turns:
        thinking = rng.random() < think_share
        conv: list[dict[str, Any]] = []
        for _ in range(k):
            msgs = task_to_sft_row(next(tasks), thinking=thinking)["conversations"]
            conv += [m for m in msgs if not (conv and m["role"] == "system")]
        rows.append({"conversations": conv})
    return rows


def sft_tokenizer(rows: Sequence[dict[str, Any]], out_dir: Path, vocab_size: int = 6400) -> MiniMindTokenizer:
    """A byte-level BPE trained on the rows' rendered chat text (so tokens per conversation are
    realistic for a tokenizer fitted to its data; the vocabulary may come out below ``vocab_size``)."""
    base = train_tokenizer(["bootstrap"], out_dir / "base", vocab_size=300, show_progress=False)
    texts = []
    for row in rows:
        messages, tools = sft_conversation(row)
        texts.append(base.apply_chat_template(messages, tools=tools, tokenize=False))
    return train_tokenizer(texts, out_dir / "tok", vocab_size=vocab_size, show_progress=False)


def tokenize_rows(tok: MiniMindTokenizer, rows: Sequence[dict[str, Any]], max_len: int | None = None,
                  seed: int = 0) -> list[Doc]:
    """``(ids, mask)`` per row as ``minimind sft`` builds its shards: augmentation drawn per line,
    cut to ``max_len`` (= ``seq_len + 1``) tokens, assistant spans through ``<|im_end|>`` labelled."""
    markers = MaskMarkers(tok)
    docs = []
    for i, row in enumerate(rows):
        messages, tools = sft_conversation(row)
        docs.append(tokenize_conversation(tok, messages, tools, random.Random(f"bench-sft:{seed}:{i}"),
                                          max_len=max_len, markers=markers))
    return docs


def cut(docs: Sequence[Doc], max_len: int) -> list[Doc]:
    """Every conversation cut to ``max_len`` tokens; the mask scan runs left to right, so labelling
    the cut ids (what the SFT shards do) equals cutting the full mask."""
    return [(ids[:max_len], mask[:max_len]) for ids, mask in docs]


def packed_sft_batch(docs: Sequence[Doc], seq_len: int, rows: int | None, work_dir: Path, vocab_size: int,
                     pad_id: int, seed: int = 0, max_position: int | None = None) -> tuple[Batch, list[int]]:
    """The first ``rows`` rows (all with ``None``) of ``minimind sft``'s packing of ``docs`` -- shard
    folder, best-fit ``sft`` plan, :meth:`PackedDataset.get_batch` -- and the indices of the
    conversations they hold, in row order."""
    write_docs(work_dir, docs, kind="sft", vocab_size=vocab_size, pad_id=pad_id)
    ds = PackedDataset(ShardReader(work_dir), seq_len=seq_len, seed=seed, mode="sft", max_position=max_position)
    plan = ds.plan(0)
    picked = range(plan.n_rows if rows is None else min(rows, plan.n_rows))
    held = [int(d) for r in picked for d in plan.seg_doc[plan.row_ptr[r]:plan.row_ptr[r + 1]] if d != PAD_DOC]
    return ds.get_batch(0, list(picked)), held


def padded_sft_rows(docs: Sequence[Doc], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-style ``(input_ids, labels)`` ``[N, seq_len]``: conversation ``n`` cut to ``seq_len +
    1`` tokens and right-padded with ``pad_id``; ``labels[n, i] = ids[i + 1]`` where ``mask[i + 1]``,
    else ``-100`` (what the reference's in-model shift of its ``-100``-masked labels amounts to)."""
    row = seq_len + 1
    ids = np.full((len(docs), row), pad_id, np.int64)
    mask = np.zeros((len(docs), row), np.bool_)
    for n, (d_ids, d_mask) in enumerate(docs):
        k = min(len(d_ids), row)
        ids[n, :k] = d_ids[:k]
        mask[n, :k] = np.asarray(d_mask[:k], np.bool_)
    labels = np.where(mask[:, 1:], ids[:, 1:], IGNORE_INDEX)
    return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(labels)


def reference_sft_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's SFT loss: plain causal forward, every logit upcast to fp32, mean cross-entropy
    over the labelled (assistant) tokens, plus the MoE auxiliary loss."""
    out = model(input_ids)
    logits = out.logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return ce + out.aux_loss


def packed_sft_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Our SFT loss on packed rows (:func:`next_token_loss`: document-causal, chunked cross-entropy)."""
    return next_token_loss(model, batch).loss


def sft_step(side: str, mcfg: ModelConfig, device: torch.device, dtype: torch.dtype, *,
             packed: Batch | None = None, padded: tuple[torch.Tensor, torch.Tensor] | None = None,
             lr: float = 1e-4, seed: int = 0) -> Callable[[], torch.Tensor]:
    """One optimizer step of ``side`` (``reference`` on ``padded``, ``packed`` on ``packed``) on its own
    model initialised from ``seed`` (both sides start from the same weights); returns the loss."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    if side == "reference":
        assert padded is not None
        ids, labels = (t.to(device) for t in padded)

        def loss_fn() -> torch.Tensor:
            return reference_sft_loss(model, ids, labels)
    elif side == "packed":
        assert packed is not None
        batch = packed.to(device)

        def loss_fn() -> torch.Tensor:
            return packed_sft_loss(model, batch)
    else:
        raise ValueError(f"side must be 'reference' or 'packed', not {side!r}")
    return lambda: optimizer_step(model, opt, loss_fn, device, dtype)


def build_batches(args: argparse.Namespace, work: Path, vocab_size: int
                  ) -> tuple[Batch, tuple[torch.Tensor, torch.Tensor], dict[str, dict[str, int]], dict[str, Any]]:
    """Generate and tokenize conversations; the packed batch of ``B`` rows, the reference batch of
    the first ``B`` conversations it holds, the tokens per step of both, data statistics."""
    rows = chat_rows(args.conversations, args.seed, args.max_turns, args.think_share)
    tok = sft_tokenizer(rows, work, vocab_size=min(vocab_size, args.tokenizer_vocab))
    full = tokenize_rows(tok, rows, seed=args.seed)
    docs = cut(full, args.seq_len + 1)
    packed, held = packed_sft_batch(docs, args.seq_len, args.batch_size, work / "shards", vocab_size,
                                    tok.pad_id, args.seed, max_position=max(2048, args.seq_len + 1))
    if len(held) < args.batch_size:
        raise SystemExit(f"only {len(held)} conversations in {args.batch_size} packed rows: "
                         "raise --conversations")
    # The reference step costs the same whatever its rows hold (fixed [B, T], plain causal), so its
    # tokens per step are the held conversations' totals scaled to B of them (what a pass over the
    # same conversations gives per step); the timed rows are B of them drawn at random.
    pick = sorted(random.Random(args.seed).sample(held, args.batch_size))
    padded = padded_sft_rows([docs[i] for i in pick], args.seq_len, tok.pad_id)
    _, all_labels = padded_sft_rows([docs[i] for i in held], args.seq_len, tok.pad_id)
    scale = args.batch_size / len(held)
    # a row's inputs are its first seq_len tokens (the last one is only a target)
    real = sum(min(len(docs[i][0]), args.seq_len) for i in held)
    counts = tokens_per_step(packed, padded, round(real * scale),
                             round(int((all_labels != IGNORE_INDEX).sum()) * scale))
    lengths = [len(ids) for ids, _ in full]
    stats = {"conversations_generated": len(docs), "tokenizer_vocab": tok.vocab_size,
             "conversation_tokens_mean": round(statistics.mean(lengths), 1),
             "conversation_tokens_median": statistics.median(lengths),
             "conversations_cut_to_seq_len": sum(n > args.seq_len + 1 for n in lengths),
             "conversations_per_packed_row": round(len(held) / packed.shape[0], 2)}
    return packed, padded, counts, stats


def tokens_per_step(packed: Batch, padded: tuple[torch.Tensor, torch.Tensor], reference_real: int,
                    reference_useful: int) -> dict[str, dict[str, int]]:
    """Per side: assistant targets (useful), non-padding inputs (conversation), row slots."""
    return {"packed": {"useful": packed.num_target_tokens, "conversation": packed.num_real_tokens,
                       "slots": packed.input_ids.numel()},
            "reference": {"useful": reference_useful, "conversation": reference_real,
                          "slots": padded[0].numel()}}


def ratios(tps: dict[str, dict[str, float]], dtypes: Sequence[str]) -> dict[str, dict[str, float]]:
    """packed / reference per dtype and measure; bf16 / fp32 per side."""
    out: dict[str, dict[str, float]] = {"packed_vs_reference": {}, "bf16_vs_fp32": {}}
    for d in dtypes:
        for what in ("useful", "conversation", "slots"):
            ref, ours = tps[f"reference_{d}"][what], tps[f"packed_{d}"][what]
            out["packed_vs_reference"][f"{d}_{what}"] = round(ours / ref, 3)
    if "bf16" in dtypes and "fp32" in dtypes:
        for side in ("reference", "packed"):
            out["bf16_vs_fp32"][side] = round(tps[f"{side}_bf16"]["useful"] / tps[f"{side}_fp32"]["useful"], 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8, help="rows per step (both sides)")
    p.add_argument("--seq_len", type=int, default=768, help="tokens per row (the SFT stage's default)")
    p.add_argument("--conversations", type=int, default=600, help="generated conversations to pack from")
    p.add_argument("--max_turns", type=int, default=8, help="tasks chained per conversation: 1..max_turns")
    p.add_argument("--think_share", type=float, default=0.3)
    p.add_argument("--tokenizer_vocab", type=int, default=6400)
    p.add_argument("--steps", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtypes", default="auto", help="auto (fp32, plus bf16 where fast) | e.g. fp32,bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    dtypes = bench_dtypes(device, args.dtypes)
    mcfg = ModelConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                       max_position_embeddings=max(2048, args.seq_len + 1))
    with tempfile.TemporaryDirectory() as tmp:
        packed, padded, counts, stats = build_batches(args, Path(tmp), mcfg.vocab_size)
    print(f"[bench_sft] data: {stats}", file=sys.stderr, flush=True)
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    for d, dtype in dtypes.items():
        for side in ("reference", "packed"):
            step = sft_step(side, mcfg, device, dtype, packed=packed, padded=padded, seed=args.seed)
            print(f"[bench_sft] warm-up {side}_{d}", file=sys.stderr, flush=True)
            for _ in range(args.warmup):
                step()
            steps[f"{side}_{d}"] = step
    print(f"[bench_sft] timing {args.steps} rounds of {', '.join(steps)}", file=sys.stderr, flush=True)
    secs = round_robin(steps, args.steps, device)
    tps = {name: {what: round(n / secs[name], 1) for what, n in counts[name.split("_")[0]].items()}
           for name in steps}
    out: dict[str, Any] = {
        **environment(device), "model_params": MiniMindForCausalLM(mcfg).num_parameters(),
        "batch": [args.batch_size, args.seq_len], "steps": args.steps, "data": stats,
        "tokens_per_step": counts, "seconds_per_step": {k: round(v, 3) for k, v in secs.items()},
        "tokens_per_s": tps}
    out.update(ratios(tps, list(dtypes)))
    return emit_json(out, args.out)


if __name__ == "__main__":
    main()
