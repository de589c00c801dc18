"""RL rollouts through the inference engine: layout, log-prob alignment, agentic turns, thinking mix.

The central check is that ``rollout_logp`` (what the engine reported while sampling) equals the
log-probs a plain training forward of the batch's ``input_ids`` gives at the masked positions, under
the shifted-target convention the losses use; if that broke, every importance ratio would be wrong.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.batch import IGNORE_INDEX
from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams
from minimind.infer.scheduler import GenerationResult
from minimind.model import MiniMindForCausalLM
from minimind.rl.rollout import (
    EngineBackend,
    RolloutBackend,
    agent_rollouts,
    default_execute,
    single_turn_rollouts,
    thinking_prompt,
)
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.losses import token_logps
from tests.scripted_model import (
    CALCULATOR_RESULT,
    CALCULATOR_TOOL,
    TOOL_ANSWER,
    TOOL_CALL,
    small_tokenizer,
    train_scripted_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> MiniMindTokenizer:
    return small_tokenizer(tmp_path_factory.mktemp("rl_rollout_tok"), [TOOL_ANSWER], vocab_size=400)


@pytest.fixture(scope="module")
def scripted(tok: MiniMindTokenizer) -> MiniMindForCausalLM:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_scripted_model(tok, [TOOL_ANSWER], hidden_size=64)
    finally:
        torch.set_num_threads(threads)


def _random_model(vocab: int) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=128)
    return MiniMindForCausalLM(cfg).eval()


@torch.no_grad()
def _forward_logps(model: MiniMindForCausalLM, batch: Any) -> torch.Tensor:
    """Training-style log-probs of the batch's targets: one forward over the padded rows."""
    logits = model(batch.input_ids, position_ids=batch.position_ids).logits
    via_ce = token_logps(logits, batch.targets)
    # The same numbers by the textbook route, so the test does not only trust token_logps.
    safe = batch.targets.clamp(min=0)
    via_softmax = torch.log_softmax(logits.float(), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(via_ce, via_softmax * batch.completion_mask, atol=1e-5, rtol=1e-5)
    return via_ce


def _assert_logps_match(model: MiniMindForCausalLM, batch: Any) -> None:
    ref = _forward_logps(model, batch)
    mask = batch.completion_mask.bool()
    assert bool(mask.any())
    torch.testing.assert_close(batch.rollout_logp[mask], ref[mask], atol=1e-4, rtol=1e-4)
    assert bool((batch.rollout_logp[~mask] == 0).all())


# ---- layout, with a backend whose answers are known ------------------------------------------------
class _FixedBackend:
    """Returns canned results, to pin the exact tensor layout."""

    def __init__(self, results: list[GenerationResult]) -> None:
        self.results = results
        self.calls: list[tuple[list[list[int]], int]] = []

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, n: int) -> list[GenerationResult]:
        self.calls.append((prompt_ids, n))
        return self.results

    def refresh(self, model: torch.nn.Module) -> None:
        pass


def test_layout_follows_shifted_target_convention() -> None:
    results = [
        GenerationResult([7, 8, 2], "ab", "stop", 3, 3, stop=2, logprobs=[-0.1, -0.2, -0.3]),
        GenerationResult([9, 9], "cc", "length", 3, 2, logprobs=[-1.0, -2.0]),
    ]
    backend = _FixedBackend(results)
    assert isinstance(backend, RolloutBackend)
    batch = single_turn_rollouts(backend, [[5, 6, 4]], SamplingParams(max_new_tokens=2), n=2, pad_id=0)
    assert backend.calls == [([[5, 6, 4]], 2)]
    assert batch.input_ids.tolist() == [[5, 6, 4, 7, 8, 2], [5, 6, 4, 9, 9, 0]]
    assert batch.attention_mask.tolist() == [[True] * 6, [True] * 5 + [False]]
    # position i is marked when input_ids[i + 1] is generated: the prompt's last token predicts the first
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert batch.targets.tolist() == [[IGNORE_INDEX] * 2 + [7, 8, 2, IGNORE_INDEX],
                                      [IGNORE_INDEX] * 2 + [9, 9] + [IGNORE_INDEX] * 2]
    torch.testing.assert_close(batch.rollout_logp, torch.tensor([[0, 0, -0.1, -0.2, -0.3, 0],
                                                                 [0, 0, -1.0, -2.0, 0, 0]]))
    assert batch.prompt_index.tolist() == [0, 0]
    assert batch.truncated.tolist() == [False, True]
    assert batch.completion_lengths.tolist() == [3, 2]
    assert batch.prompt_lengths.tolist() == [3, 3]
    assert batch.sequence_lengths.tolist() == [6, 5]
    assert batch.texts == ["ab", "cc"]
    assert batch.position_ids.tolist() == [list(range(6))] * 2
    moved = batch.to("cpu")
    assert moved.texts is batch.texts and torch.equal(moved.input_ids, batch.input_ids)


def test_missing_logprobs_are_rejected() -> None:
    backend = _FixedBackend([GenerationResult([7, 2], "a", "stop", 1, 2, stop=2, logprobs=None)])
    with pytest.raises(ValueError, match="log-probs"):
        single_turn_rollouts(backend, [[5]], SamplingParams(), n=1)


# ---- single turn through the engine ----------------------------------------------------------------
def test_single_turn_matches_training_forward() -> None:
    vocab = 64
    model = _random_model(vocab)
    engine = GenerationEngine(model, num_slots=4)
    backend = EngineBackend(engine)
    assert isinstance(backend, RolloutBackend)
    stops = tuple(range(0, vocab, 8))  # 1 in 8 tokens stops: some rows stop, some hit the budget
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=stops,
                            seed=3)
    prompts = [[3, 5, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31, 33, 35, 37]]
    n = 3
    batch = single_turn_rollouts(backend, prompts, params, n=n, pad_id=0)

    assert batch.shape[0] == len(prompts) * n
    assert batch.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(n)]
    for b in range(len(batch)):
        prompt = prompts[b // n]
        p, c = len(prompt), int(batch.completion_lengths[b])
        row = batch.input_ids[b]
        assert row[:p].tolist() == prompt  # every sample of a group carries its prompt
        assert int(batch.sequence_lengths[b]) == p + c
        expected = torch.zeros(batch.shape[1])
        expected[p - 1:p - 1 + c] = 1  # exactly the completion, stop token included, no padding
        assert torch.equal(batch.completion_mask[b], expected)
        last = int(row[p + c - 1])
        if bool(batch.truncated[b]):
            assert c == params.max_new_tokens and last not in stops
        else:
            assert last in stops
        assert not bool(batch.attention_mask[b, p + c:].any())
    assert bool(batch.truncated.any()) and not bool(batch.truncated.all())
    _assert_logps_match(model, batch)


def test_refresh_goes_to_the_engine() -> None:
    model = _random_model(32)
    engine = GenerationEngine(model, dtype=torch.bfloat16)
    backend = EngineBackend(engine)
    trained = _random_model(32)
    with torch.no_grad():
        trained.lm_head.weight.add_(1.0)
    backend.refresh(trained)
    torch.testing.assert_close(engine.model.lm_head.weight.float(), trained.lm_head.weight.bfloat16().float())


# ---- adaptive thinking ------------------------------------------------------------------------------
def test_thinking_mix(tok: MiniMindTokenizer) -> None:
    messages = [{"role": "user", "content": "What is 12*7?"}]
    opened_tail = tok.encode("<think>\n")
    closed_tail = tok.encode("<think>\n\n</think>\n\n")

    def draw(ratio: float, forced: bool | None = None, count: int = 200) -> list[bool]:
        rng = random.Random(0)
        flags = []
        for _ in range(count):
            ids, opened = thinking_prompt(messages, tok, forced, ratio, rng)
            tail = opened_tail if opened else closed_tail
            assert ids[-len(tail):] == tail
            assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  open_thinking=opened)
            flags.append(opened)
        return flags

    mixed = draw(0.5)
    assert 60 < sum(mixed) < 140
    assert not any(draw(0.0))
    assert all(draw(1.0))
    assert all(draw(0.0, forced=True, count=5))
    assert not any(draw(1.0, forced=False, count=5))
    with pytest.raises(ValueError):
        thinking_prompt(messages, tok, None, 1.5, random.Random(0))


# ---- agentic ----------------------------------------------------------------------------------------
def _greedy(max_new_tokens: int = 64) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_token_ids=(2,))


def test_agent_rollout_executes_tool_and_masks_environment(tok: MiniMindTokenizer,
                                                            scripted: MiniMindForCausalLM) -> None:
    engine = GenerationEngine(scripted, tok, num_slots=4)
    backend = EngineBackend(engine)
    calls: list[tuple[str, dict[str, Any]]] = []
    run = default_execute([CALCULATOR_TOOL])

    def execute(name: str, arguments: dict[str, Any]) -> str:
        calls.append((name, arguments))
        return run(name, arguments)

    question = TOOL_CALL["messages"][:1]
    batch = agent_rollouts(backend, tok, [question], [CALCULATOR_TOOL], _greedy(), max_turns=4,
                           execute=execute, n=2)
    assert calls == [("calculate_math", {"expression": "12*7"})] * 2
    assert batch.prompt_index.tolist() == [0, 0]
    assert batch.turns.tolist() == [2, 2] and batch.tool_calls.tolist() == [1, 1]
    assert batch.truncated.tolist() == [False, False]
    assert batch.texts == ["12*7 = 84.", "12*7 = 84."]
    assert batch.messages is not None
    assert batch.messages[0][-2] == {"role": "tool", "tool_call_id": "call_0", "content": CALCULATOR_RESULT}
    assert batch.messages[0][-1]["content"] == "12*7 = 84."

    eos = tok.eos_token
    full = tok.apply_chat_template(TOOL_ANSWER["messages"], tools=TOOL_ANSWER["tools"])
    assert isinstance(full, str)
    tool_turn = TOOL_CALL["messages"][:2]
    first_reply = tok.apply_chat_template(tool_turn, tools=[CALCULATOR_TOOL]).rsplit(  # type: ignore[union-attr]
        "</think>\n\n", 1)[1].removesuffix(eos + "\n")
    for b in range(len(batch)):
        length = int(batch.sequence_lengths[b])
        ids = batch.input_ids[b, :length]
        # the whole conversation, as the template lays it out, up to the final end-of-turn token
        assert tok.decode(ids.tolist()) == full.removesuffix("\n")
        mask = batch.completion_mask[b, :length - 1].bool()
        policy_ids = ids[1:][mask].tolist()
        assert tok.decode(policy_ids) == first_reply + eos + "12*7 = 84." + eos
        env_ids = ids[1:][~mask].tolist()
        env_text = tok.decode(env_ids)
        # the tool result (and its template tokens) are in the sequence but carry no loss
        assert f"<tool_response>\n{CALCULATOR_RESULT}\n</tool_response>" in env_text
        assert CALCULATOR_RESULT not in tok.decode(policy_ids)
        # the second assistant turn's tokens are trained: its first token follows the generation prompt
        prompt2 = tok.encode("<think>\n\n</think>\n\n")
        first_turn_end = policy_ids.index(tok.eos_id)
        assert policy_ids[first_turn_end + 1:] == tok.encode("12*7 = 84.") + [tok.eos_id]
        starts = [i for i in range(length - len(prompt2)) if ids[i:i + len(prompt2)].tolist() == prompt2]
        second_prompt_end = starts[-1] + len(prompt2) - 1
        assert bool(batch.completion_mask[b, second_prompt_end])
        assert not bool(batch.completion_mask[b, second_prompt_end - 1])
    _assert_logps_match(scripted, batch)


def test_agent_rollout_limits(tok: MiniMindTokenizer, scripted: MiniMindForCausalLM) -> None:
    engine = GenerationEngine(scripted, tok, num_slots=2)
    backend = EngineBackend(engine)
    question = TOOL_CALL["messages"][:1]

    one = agent_rollouts(backend, tok, [question], [CALCULATOR_TOOL], _greedy(), max_turns=1)
    assert one.turns.tolist() == [1] and one.tool_calls.tolist() == [0]
    assert not bool(one.truncated[0])  # stopped by its end-of-turn token, calls left pending
    assert one.messages is not None and one.messages[0][-1]["tool_calls"]
    n_ids = int(one.sequence_lengths[0])

    tight = agent_rollouts(backend, tok, [question], [CALCULATOR_TOOL], _greedy(), max_turns=4,
                           max_length=n_ids + 5)
    assert tight.turns.tolist() == [1] and bool(tight.truncated[0])
    assert int(tight.sequence_lengths[0]) == n_ids  # the insertion that would not fit is not added

    cut = agent_rollouts(backend, tok, [question], [CALCULATOR_TOOL], _greedy(max_new_tokens=3), max_turns=4)
    assert cut.turns.tolist() == [1] and bool(cut.truncated[0]) and int(cut.completion_lengths[0]) == 3
    _assert_logps_match(scripted, cut)


def test_default_execute_restricts_to_offered_tools() -> None:
    run = default_execute([CALCULATOR_TOOL])
    assert run("calculate_math", {"expression": "12*7"}) == CALCULATOR_RESULT
    assert "error" in run("get_current_weather", {"location": "Paris"})


def test_open_thinking_flags_per_episode(tok: MiniMindTokenizer) -> None:
    backend = _FixedBackend([GenerationResult([tok.eos_id], "", "stop", 1, 1, stop=tok.eos_id,
                                              logprobs=[-0.5])] * 2)
    messages = [{"role": "user", "content": "hi"}]
    batch = agent_rollouts(backend, tok, [messages, messages], None, _greedy(), max_turns=2,
                           open_thinking=[True, False], pad_id=0)
    prompts, _ = backend.calls[0]
    assert prompts[0][-len(tok.encode("<think>\n")):] == tok.encode("<think>\n")
    assert prompts[1][-len(tok.encode("</think>\n\n")):] == tok.encode("</think>\n\n")
    assert batch.completion_lengths.tolist() == [1, 1]
    with pytest.raises(ValueError, match="open_thinking"):
        agent_rollouts(backend, tok, [messages], None, _greedy(), max_turns=1, open_thinking=[True, False])
