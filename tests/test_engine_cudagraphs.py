"""``GenerationEngine(compile="cudagraphs")``: the decode step replayed as a CUDA graph.

The replayed graph writes the KV cache in place, so the cache must keep its address between replays
and the logits must be read before the next replay overwrites them.  The greedy test runs where CUDA
is present (it skips elsewhere); the argument check runs everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.engine import compile_mode
from tests.test_generation import reference_greedy, tiny_model


def test_cudagraphs_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        GenerationEngine(tiny_model(), dtype=torch.float32, compile="cudagraphs")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cudagraph_decode_is_greedy_equal_to_the_uncached_reference_cuda() -> None:
    """Rows of different lengths, decoded together and then with a different row count (a second
    graph), and a cache that grows mid-run (new static addresses): every row equals the full
    forward's greedy continuation."""
    cpu_model = tiny_model(max_position_embeddings=1024)
    engine = GenerationEngine(copy.deepcopy(cpu_model).cuda(), dtype=torch.float32, compile="cudagraphs",
                              num_slots=4)
    prompts = [[5, 9, 17, 33, 2], [7, 7, 8], [100, 3, 250, 11, 12, 13, 40]]
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=())
    for batch in (prompts, prompts[:2], [prompts[2]]):
        got = [r.token_ids for r in engine.generate(batch, greedy)]
        assert got == [reference_greedy(cpu_model, p, 40) for p in batch]
    long = SamplingParams(max_new_tokens=300, temperature=0.0, stop_token_ids=())  # past the first cache
    got = engine.generate([prompts[0]], long)[0].token_ids
    assert got == reference_greedy(cpu_model, prompts[0], 300)


def test_compile_flag_means_cuda_graphs_on_cuda_only() -> None:
    """``--compile 1`` of chat and serve: CUDA graphs on CUDA, inductor's kernels elsewhere."""
    assert compile_mode(True, "cuda:0") == "cudagraphs"
    assert compile_mode(True, torch.device("cpu")) is True
    assert compile_mode(False, "cuda") is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cudagraph_multi_step_samples_what_single_steps_sample_cuda() -> None:
    """Eight replays per host read (the CUDA default) feed each step's samples to the next replay on
    the device: seeded rows with a stop token draw exactly the single-step engine's tokens."""
    model = tiny_model(max_position_embeddings=1024).cuda()
    prompts = [[5, 9, 17, 33, 2], [7, 7, 8], [100, 3, 250, 11, 12, 13, 40]]
    free = SamplingParams(max_new_tokens=60, temperature=1.0, top_k=0, top_p=1.0, seed=3, stop_token_ids=())
    first = GenerationEngine(model, compile="cudagraphs", multi_step=1).generate(prompts, free)
    stop = first[1].token_ids[20]  # row 1 stops mid-run, the others carry on
    params = SamplingParams(max_new_tokens=60, temperature=1.0, top_k=0, top_p=1.0, seed=3,
                            stop_token_ids=(stop,))
    runs = [[r.token_ids for r in GenerationEngine(model, compile="cudagraphs", multi_step=k).generate(prompts, params)]
            for k in (1, 8)]
    assert runs[0] == runs[1]
    assert runs[0][1][-1] == stop and len(runs[0][1]) <= 21
