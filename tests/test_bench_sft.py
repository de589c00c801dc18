"""The SFT benchmark compares like with like.

``bench/bench_sft.py`` times a reference-style SFT step (one conversation per padded row) against
ours (the conversations packed, document-causal).  Its tokens/s ratio only means something if both
steps train the same thing: on the same conversations and the same initial weights, the padded
loss and the packed loss must be equal (every (context, assistant target) pair is the same on both
sides; only the padding differs), and stay equal after an optimizer step.  No timing here.
"""

from __future__ import annotations

import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.batch import IGNORE_INDEX
from minimind.model import MiniMindForCausalLM
from minimind.train.stages.base import next_token_loss
from tests.test_bench_reference import _load

bench = _load("bench_sft")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    """Eight generated conversations, none cut, packed into fewer rows than conversations."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sft_bench")
    rows = bench.chat_rows(8, seed=1, max_turns=2, think_share=0.5)
    tok = bench.sft_tokenizer(rows, tmp, vocab_size=600)
    docs = bench.tokenize_rows(tok, rows, seed=1)
    seq_len = max(len(ids) for ids, _ in docs) + 7
    assert bench.cut(docs, seq_len + 1) == docs
    packed, held = bench.packed_sft_batch(docs, seq_len, None, tmp / "shards", tok.vocab_size, tok.pad_id,
                                          max_position=seq_len + 1)
    padded = bench.padded_sft_rows(docs, seq_len, tok.pad_id)
    mcfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=tok.vocab_size, max_position_embeddings=seq_len + 1)
    return docs, packed, held, padded, mcfg


def test_both_sides_hold_the_same_conversations_and_targets(data) -> None:
    docs, packed, held, padded, _ = data
    ids, labels = padded
    assert sorted(held) == list(range(len(docs)))
    assert packed.shape[0] < len(docs)  # rows really hold several conversations
    assert ids.shape[0] == len(docs)
    n_targets = int((labels != IGNORE_INDEX).sum())
    assert n_targets == packed.num_target_tokens == sum(sum(m[1:]) for _, m in docs) > 0
    # the same multiset of assistant target tokens on both sides
    assert sorted(labels[labels != IGNORE_INDEX].tolist()) == sorted(
        packed.targets[packed.targets != IGNORE_INDEX].tolist())


def test_padded_and_packed_steps_compute_the_same_loss(data) -> None:
    _, packed, _, padded, mcfg = data
    device, dtype = torch.device("cpu"), torch.float32
    ref_step = bench.sft_step("reference", mcfg, device, dtype, padded=padded, lr=1e-3, seed=3)
    ours_step = bench.sft_step("packed", mcfg, device, dtype, packed=packed, lr=1e-3, seed=3)
    losses = [(float(ref_step()), float(ours_step())) for _ in range(3)]
    for ref, ours in losses:
        assert ours == pytest.approx(ref, rel=1e-4)
    assert losses[-1][0] < losses[0][0] - 1e-3  # the steps did train (step 2 is not step 1 again)


def test_the_check_tells_attention_across_conversations_apart(data) -> None:
    """The same packed rows under plain causal attention (conversations see each other, positions
    run on) give another loss, so the equality above is not trivially met."""
    _, packed, _, padded, mcfg = data
    torch.manual_seed(3)
    model = MiniMindForCausalLM(mcfg)
    with torch.no_grad():
        for w in model.parameters():  # large weights: a near-uniform random model hides the difference
            w.mul_(4.0)
        doc = float(next_token_loss(model, packed).loss)
        mixed = float(next_token_loss(model, packed.plain_causal()).loss)
        ref = float(bench.reference_sft_loss(model, *padded))
    assert doc == pytest.approx(ref, rel=1e-5)
    assert abs(mixed - ref) > 1e-3  # 10x the tolerance (rel 1e-5 of ~10) the equality passes at
