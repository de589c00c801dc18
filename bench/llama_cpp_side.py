"""The llama.cpp side of ``bench_engine.py``: the same weights as GGUF, decoded by llama-cpp-python.

Kept apart so that the engine benchmark reads as our engine against its baselines, and so that
llama.cpp's C API (one multi-sequence context, its own sampler chain) sits in one place.  Everything
here is optional: :func:`llama_cpp_missing` says why the side cannot run, and the benchmark then skips it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from minimind.model import MiniMindForCausalLM

Sampling = tuple[int, float, float]  # (top_k, top_p, temperature)


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp side cannot run here, or ``None``."""
    for module, hint in (("llama_cpp", "pip install llama-cpp-python"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({hint})"
    return None


def export_for_llama_cpp(model: MiniMindForCausalLM, folder: Path, gguf_type: str) -> Path:
    """The model as ``<folder>/bench-<type>.gguf`` with a small byte-level BPE tokenizer (ids below the
    model's vocabulary; the benchmark feeds token ids, so the tokenizer's contents do not matter)."""
    from minimind.export.gguf import export_gguf
    from minimind.tokenizer import MiniMindTokenizer, train_tokenizer

    tok_dir = folder / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = MiniMindTokenizer.from_dir(tok_dir)
    else:
        texts = ["decode speed of a small model on a laptop CPU, 0123456789"] * 20
        tok = train_tokenizer(texts, tok_dir, vocab_size=300, show_progress=False)
    return export_gguf(model, folder / f"bench-{gguf_type}.gguf", tok, dtype=gguf_type)


def gguf_weight_bytes(path: Path) -> int:
    """Bytes one llama.cpp decode step streams: every tensor of the file, without the embedding table
    when a separate ``output.weight`` exists (with tied embeddings the table is the LM head)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def make_llama_cpp_run(path: Path, prompts: list[list[int]], context: int, threads: int, seed: int,
                       sampling: Sampling) -> Callable[[int], int]:
    """``run(n)``: ``n`` sampled tokens for every prompt.  One prompt: ``Llama.generate`` (what a
    llama-cpp-python user calls).  Several: a context holding one KV sequence per prompt and one
    ``llama_decode`` per step over all of them, sampled with llama.cpp's own sampler chain (top-k,
    top-p, temperature, then a draw).  ``sampling`` is ``(top_k, top_p, temperature)``."""
    top_k, top_p, temperature = sampling
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=max(512, context), n_threads=threads,
                          n_threads_batch=threads, seed=seed, verbose=False)
    if len(prompts) == 1:
        def run_one(count: int) -> int:
            llm.reset()  # no prefix reuse between runs: every run pays its prefill
            made = 0
            for _ in llm.generate(prompts[0], top_k=top_k, top_p=top_p, min_p=0.0, temp=temperature,
                                  reset=True):
                made += 1
                if made >= count:
                    break
            return made
        run_one.keep = llm  # type: ignore[attr-defined]  # keeps the model alive with the closure
        return run_one
    return _batched_llama_run(llama_cpp, llm, prompts, context, threads, seed, sampling)


def _batched_llama_run(llama_cpp: ModuleType, llm: Any, prompts: list[list[int]], context: int,
                       threads: int, seed: int, sampling: Sampling) -> Callable[[int], int]:
    top_k, top_p, temperature = sampling
    n, width = len(prompts), sum(len(p) for p in prompts)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max = context * n, n
    params.n_batch = params.n_ubatch = max(512, width)
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if ctx is None:
        raise RuntimeError("llama.cpp could not create a multi-sequence context")
    batch = llama_cpp.llama_batch_init(max(width, n), 0, n)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for s in (llama_cpp.llama_sampler_init_top_k(top_k), llama_cpp.llama_sampler_init_top_p(top_p, 1),
              llama_cpp.llama_sampler_init_temp(temperature), llama_cpp.llama_sampler_init_dist(seed)):
        llama_cpp.llama_sampler_chain_add(chain, s)
    memory = llama_cpp.llama_get_memory(ctx)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants logits)`` items."""
        batch.n_tokens = len(items)
        for i, (token, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def run(count: int) -> int:
        llama_cpp.llama_memory_clear(memory, True)
        decode([(t, i, seq, i == len(p) - 1) for seq, p in enumerate(prompts) for i, t in enumerate(p)])
        rows = [sum(len(p) for p in prompts[:seq + 1]) - 1 for seq in range(n)]  # logit row per sequence
        made = 0
        for step in range(count):
            tokens = [llama_cpp.llama_sampler_sample(chain, ctx, rows[seq]) for seq in range(n)]
            made += n
            if step == count - 1:
                break
            decode([(tokens[seq], len(prompts[seq]) + step, seq, True) for seq in range(n)])
            rows = list(range(n))
        return made

    run.keep = (llm, ctx, batch, chain)  # type: ignore[attr-defined]
    return run
