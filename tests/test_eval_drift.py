"""The drift measure the demo reports for the kinds GRPO does not train: KL(start || tuned) per reply
token, against the definition written out, and blind to everything but the replies."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.formats import sft_conversation
from minimind.data.sft import MaskMarkers, tokenize_conversation
from minimind.eval.drift import reply_kl
from minimind.model import MiniMindForCausalLM
from minimind.rl.toy import write_toy_task
from minimind.tokenizer import MiniMindTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": f"say {d}"}, {"role": "assistant", "content": f"digit {d} number {d}"}]
    for d in range(6)
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> MiniMindTokenizer:
    root = tmp_path_factory.mktemp("drift")
    write_toy_task(root)
    return MiniMindTokenizer.from_dir(root / "tok")


def _model(vocab: int, seed: int) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=128)
    return MiniMindForCausalLM(cfg).eval()


def _naive(start: torch.nn.Module, tuned: torch.nn.Module, tok: MiniMindTokenizer,
           every_position: bool = False) -> float:
    total, n = 0.0, 0
    for conv in CONVERSATIONS:
        msgs, tools = sft_conversation({"conversations": conv})
        ids, mask = tokenize_conversation(tok, msgs, tools, random.Random(0), 0.0, 1.0, markers=MaskMarkers(tok))
        x = torch.tensor([ids])
        with torch.no_grad():
            p = torch.log_softmax(start(x).logits[0].double(), -1)
            q = torch.log_softmax(tuned(x).logits[0].double(), -1)
        for i in range(len(ids) - 1):
            if mask[i + 1] or every_position:  # position i predicts reply token i + 1
                total += float((p[i].exp() * (p[i] - q[i])).sum())
                n += 1
    return total / n


def test_reply_kl_is_the_per_reply_token_kl_from_the_start_model(tok: MiniMindTokenizer) -> None:
    start = _model(tok.vocab_size, 0)
    assert reply_kl(start, copy.deepcopy(start), tok, CONVERSATIONS) == pytest.approx(0.0, abs=1e-7)
    tuned = copy.deepcopy(start)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got, want = reply_kl(start, tuned, tok, CONVERSATIONS), _naive(start, tuned, tok)
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-4)
    # not symmetric: it is KL(start || tuned), not the reverse
    assert reply_kl(tuned, start, tok, CONVERSATIONS) != pytest.approx(got, rel=1e-3)
    # only the reply positions count: over every position the KL is another number
    assert got != pytest.approx(_naive(start, tuned, tok, every_position=True), rel=1e-3)
