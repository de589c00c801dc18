"""RL rewards: rule-based checks, the weighted combination with per-function stats, the reward model."""

from __future__ import annotations

import pytest
import torch

from minimind.rl.rewards import (
    REWARD_FUNCTIONS,
    CombinedReward,
    RewardModel,
    format_reward,
    get_reward,
    length_penalty,
    math_reward,
    tool_format_reward,
)
from minimind.tasks import checks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("completion, gt, want", [
    ("The total is 5 + 7 = 12.\n#### 12", ["12"], 1.0),
    ("so we get \\boxed{72}", "72", 1.0),
    ("<think>maybe 3 or 4</think>The answer is 4.", [4], 1.0),
    ("I think 10, then 11", "Natalia sold 48/2 = 24 clips...\n#### 11", 1.0),  # GSM8K solution as gt
    ("It costs $1,234.50", ["1234.5"], 1.0),
    ("half: \\frac{1}{2}", ["0.5"], 1.0),
    ("#### 13", ["12"], 0.0),
    ("no number here", ["12"], 0.0),
    ("answer: 7", ["6", "7"], 1.0),  # any accepted value
])
def test_math_reward_table(completion, gt, want):
    assert math_reward("Q", completion, gt=gt, kind="ignored") == want


def test_format_reward():
    assert format_reward("p", "<think>reason</think>answer") == 1.0
    assert format_reward("p", "  <think>\nreason\n</think>\n\nThe answer is 3.") == 1.0
    assert format_reward("p", "<think>reason</think>") == 0.0  # no answer after
    assert format_reward("p", "answer without reasoning") == 0.0
    assert format_reward("p", "<think>a</think>b<think>c</think>d") == 0.0  # two blocks
    assert format_reward("p", "<think>never closed") == 0.0
    assert format_reward("p", "x<think>r</think>y") == 0.0  # block not at the start
    # a generation prompt that opened the block: the completion starts inside it
    assert format_reward("<|im_start|>assistant\n<think>\n", "reason</think>answer") == 1.0
    assert format_reward("<|im_start|>assistant\n", "reason</think>answer") == 0.0


def test_tool_format_reward():
    good = '<tool_call>\n{"name": "calc", "arguments": {"x": 1}}\n</tool_call>'
    bad_json = '<tool_call>\n{"name": "calc", "arguments": {x}}\n</tool_call>'
    assert tool_format_reward("p", good) == 1.0
    assert tool_format_reward("p", "<think>need a tool</think>" + good + good) == 1.0
    assert tool_format_reward("p", good + bad_json) == 0.0  # every block must parse
    assert tool_format_reward("p", good + "<tool_call>{\"name\": \"x\"}") == 0.0  # unclosed
    assert tool_format_reward("p", good + "</tool_call>") == 0.0  # stray closing tag
    assert tool_format_reward("p", "no call at all") == 0.0
    assert tool_format_reward("p", "<think>" + good + "</think>done") == 0.0  # calls in the reasoning


def test_length_penalty():
    # DAPO: 0 up to max - cache, linear to -1 at max, -1 beyond
    assert length_penalty("p", "x" * 60, max_len=100, cache_len=20) == 0.0
    assert length_penalty("p", "x" * 80, max_len=100, cache_len=20) == 0.0
    assert length_penalty("p", "x" * 90, max_len=100, cache_len=20) == pytest.approx(-0.5)
    assert length_penalty("p", "x" * 100, max_len=100, cache_len=20) == pytest.approx(-1.0)
    assert length_penalty("p", "x" * 101, max_len=100, cache_len=20) == -1.0
    assert length_penalty("p", "short", max_len=100, cache_len=20, completion_tokens=95) == pytest.approx(-0.75)
    assert length_penalty("p", "x" * 88, max_len=100) == pytest.approx((75 - 88) / 25)  # cache = max // 4


def test_registry_holds_the_task_checkers():
    assert REWARD_FUNCTIONS["task"] is checks.task_reward
    assert REWARD_FUNCTIONS["tool_call"] is checks.tool_call_reward
    assert REWARD_FUNCTIONS["task_format"] is checks.format_reward
    assert get_reward("math") is math_reward
    with pytest.raises(KeyError, match="unknown reward"):
        get_reward("nope")


def test_combined_reward_weights_and_stats():
    prompts = ["q1", "q2", "q3"]
    completions = ["<think>r</think>#### 4", "#### 5", "<think>r</think>#### 9"]
    rows = [{"gt": ["4"], "kind": "arithmetic"}, {"gt": ["5"], "kind": "arithmetic"},
            {"gt": ["6"], "kind": "arithmetic"}]

    def constant(prompt, completion, **_):
        return 2.0

    combo = CombinedReward([("math", 1.0), ("format", 0.5), (constant, -0.25)])
    total, parts = combo(prompts, completions, rows)
    assert list(parts) == ["math", "format", "constant"]
    assert parts["math"].tolist() == [1.0, 1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0, 1.0]
    assert torch.allclose(total, torch.tensor([1 + 0.5 - 0.5, 1 + 0 - 0.5, 0 + 0.5 - 0.5]))
    stats = CombinedReward.summary(parts)
    assert stats["reward/math/mean"] == pytest.approx(2 / 3)
    assert stats["reward/math/std"] == pytest.approx(torch.tensor([1.0, 1.0, 0.0]).std(correction=0).item())
    assert stats["reward/constant/std"] == 0.0
    # the task checker by name, with rows splatted in
    row = {"kind": "arithmetic", "gt": [4], "prompt": "a column that must not clash"}
    total, parts = CombinedReward([("task", 1.0), ("task", 2.0)])(["a"], ["2 + 2 = 4"], [row])
    assert list(parts) == ["task", "task#2"] and total.item() == 3.0
    with pytest.raises(ValueError):
        combo(prompts, completions[:2], rows)


# ---- reward model --------------------------------------------------------------------------------
def _tiny_hf_folder(path, kind: str):
    """A randomly initialised tiny Qwen3 (classifier or causal LM) + byte-level tokenizer in ``path``."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                  pad_token="<|endoftext|>")
    hf_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    hf_tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}")
    hf_tok.save_pretrained(path)
    cfg = transformers.Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=8, max_position_embeddings=256, num_labels=1,
                                   pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    cls = transformers.Qwen3ForSequenceClassification if kind == "classifier" else transformers.Qwen3ForCausalLM
    model = cls(cfg).eval()
    if kind == "classifier":  # a random head of std 0.02 gives near-equal scores; make them differ
        torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(path)
    return model, hf_tok


def test_reward_model_classifier_matches_direct_forward(tmp_path):
    model, tok = _tiny_hf_folder(tmp_path / "rm", "classifier")
    prompts = ["What is 2+2?", "Say hi", [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "Name a colour"}]]
    completions = ["4", "Hello there, how are you today?", "blue"]
    rm = RewardModel(tmp_path / "rm", batch_size=2)
    assert rm.kind == "classifier"
    scores = rm.score(prompts, completions)
    want = []
    for p, c in zip(prompts, completions):
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": c}], tokenize=False)
        assert rm.render(p, c) == text
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            want.append(model(input_ids=ids).logits[0, 0].item())  # one unpadded row: the last token
    assert scores.shape == (3,)
    assert torch.allclose(scores, torch.tensor(want), atol=1e-5)
    assert len({round(w, 4) for w in want}) == 3
    # batched reward inside a combination
    total, parts = CombinedReward([(rm, 2.0)])(prompts, completions, [{}] * 3)
    assert torch.allclose(parts["reward_model"], scores) and torch.allclose(total, 2 * scores)


def test_reward_model_causal_judge_scores_log_prob_of_reward_token(tmp_path):
    model, tok = _tiny_hf_folder(tmp_path / "judge", "causal")
    rm = RewardModel(tmp_path / "judge", reward_token="yes", judge_suffix="Correct? ", use_chat_template=False)
    assert rm.kind == "causal"
    prompts, completions = ["1+1=", "The sky is "], ["2", "green, obviously"]
    scores = rm(prompts, completions)
    yes = tok.encode("yes", add_special_tokens=False)[0]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([tok.encode(p + c + "Correct? ", add_special_tokens=False)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[yes].item()
        assert scores[i].item() == pytest.approx(logp, abs=1e-5)
    assert torch.all(scores < 0)
