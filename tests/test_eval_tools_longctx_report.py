"""``minimind eval tools`` (multi-round tool use), ``eval longctx`` (loss by position, YaRN) and ``report``."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from minimind.cli import main
from minimind.config import REFERENCE_YARN, ModelConfig
from minimind.eval.longctx import (
    bucket_edges,
    bucket_means,
    evaluate_longctx,
    long_sequences,
    position_nll,
    with_plain_rope,
    with_yarn,
)
from minimind.eval.report import collect_inputs, write_report
from minimind.eval.results import EvalResult, write_results
from minimind.eval.tooluse import (
    METRICS,
    ToolEpisode,
    engine_replier,
    episode_from_row,
    evaluate_tool_use,
    generated_tool_episodes,
    load_tool_episodes,
    run_tool_episodes,
    summarize_episodes,
)
from minimind.infer.engine import GenerationEngine, GenerationResult
from minimind.infer.yarn import enable_yarn
from minimind.model import MiniMindForCausalLM, save_weights
from minimind.tasks.generators import generate_tasks
from minimind.tasks.toolcalls import format_tool_call
from minimind.tasks.toolset import TOOLS, execute_tool
from minimind.tokenizer import MiniMindTokenizer
from minimind.tokenizer.train import train_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIXED_KINDS = ("arithmetic", "date_fact", "tool_call")  # kinds without optional data sources: fast
CALC = {"name": "calculate_math", "arguments": {"expression": "12*7"}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> MiniMindTokenizer:
    """A small BPE that has seen the tool schemas and tool prompts, so tool prompts stay short."""
    tasks = generate_tasks(40, 1, kinds=["tool_call"], level="easy")
    texts = [json.dumps(TOOLS, ensure_ascii=False)] * 20
    texts += [json.dumps(t.messages, ensure_ascii=False) for t in tasks] * 3
    texts += [f"plain text {i} with numbers {i * 13} and words." for i in range(40)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=500, show_progress=False)


def tiny_model(vocab: int, seed: int = 0, max_pos: int = 2048) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=max_pos, tie_word_embeddings=False)
    model = MiniMindForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init gives near-uniform logits and attention; sharpen both
        model.lm_head.weight.normal_(0, 0.5)
        model.model.embed_tokens.weight.normal_(0, 1.0)
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(3.0)
            layer.self_attn.k_norm.weight.fill_(3.0)
    return model


def calc_episode(lang: str = "en", where: str = "") -> ToolEpisode:
    return ToolEpisode(kind="tool_call", lang=lang,
                       messages=[{"role": "system", "content": "You can call tools.", "tools": TOOLS},
                                 {"role": "user", "content": "Use the calculator to work out 12*7."}],
                       tools=TOOLS, gt=["84"], expected_calls=[copy.deepcopy(CALC)], where=where)


class Script:
    """A scripted replier: ``replies[k]`` is every episode's reply in round ``k``; records batch sizes."""

    def __init__(self, *replies: str) -> None:
        self.replies = replies
        self.batches: list[int] = []

    def __call__(self, episodes: Sequence[ToolEpisode]) -> list[str | None]:
        self.batches.append(len(episodes))
        return [self.replies[min(ep.rounds, len(self.replies) - 1)] for ep in episodes]


def perfect_reply(ep: ToolEpisode) -> str:
    """The gold behaviour: the expected calls first, then an answer reporting every gt value."""
    if ep.rounds == 0:
        return "\n".join(format_tool_call(c["name"], c["arguments"]) for c in ep.expected_calls)
    return "The result is " + ", ".join(map(str, ep.gt)) + "."


# ---- tool-use episodes ---------------------------------------------------------------------------
def test_valid_call_is_executed_and_the_final_answer_scored() -> None:
    ep = calc_episode()
    script = Script(format_tool_call("calculate_math", {"expression": "12*7"}), "12*7 = 84")
    run_tool_episodes([ep], script, max_rounds=3)
    assert script.batches == [1, 1]
    assert ep.status == "answered" and ep.rounds == 2 and ep.final == "12*7 = 84"
    assert ep.call_valid and ep.right_tool and ep.exact_args and ep.final_correct and ep.tool_errors == 0
    roles = [m["role"] for m in ep.messages]
    assert roles == ["system", "user", "assistant", "tool"]
    assert ep.messages[2]["tool_calls"] == [CALC] and ep.messages[2]["content"] == ""
    assert json.loads(ep.messages[3]["content"]) == execute_tool("calculate_math", {"expression": "12*7"})
    # a wrong final answer is scored wrong with everything else unchanged
    ep2 = calc_episode()
    run_tool_episodes([ep2], Script(format_tool_call("calculate_math", {"expression": "12*7"}), "12*7 = 85"))
    assert ep2.status == "answered" and ep2.exact_args and not ep2.final_correct


def test_malformed_call_counts_invalid_and_ends_the_episode() -> None:
    ep = calc_episode()
    script = Script('<tool_call>\n{"name": "calculate_math", "arguments": {</tool_call>', "84")
    run_tool_episodes([ep], script, max_rounds=3)
    assert script.batches == [1]
    assert ep.status == "invalid_call" and ep.rounds == 1
    assert not ep.call_valid and not ep.right_tool and not ep.exact_args and not ep.final_correct
    assert [m["role"] for m in ep.messages] == ["system", "user"]  # nothing executed or appended
    # a valid first call followed by a malformed one is invalid too
    ep2 = calc_episode()
    run_tool_episodes([ep2], Script(format_tool_call("calculate_math", {"expression": "12*7"}),
                                    "<tool_call>\nnot json\n</tool_call>"), max_rounds=3)
    assert ep2.status == "invalid_call" and ep2.rounds == 2 and ep2.exact_args and not ep2.call_valid


def test_round_limit_is_respected() -> None:
    call = format_tool_call("calculate_math", {"expression": "12*7"})
    for limit in (1, 3):
        ep = calc_episode()
        script = Script(call)
        run_tool_episodes([ep], script, max_rounds=limit)
        assert script.batches == [1] * limit
        assert ep.status == "round_limit" and ep.rounds == limit and not ep.answered
        assert not ep.final_correct and ep.call_valid
        assert [m["role"] for m in ep.messages].count("tool") == limit
    with pytest.raises(ValueError):
        run_tool_episodes([calc_episode()], Script(call), max_rounds=0)
    # a prompt that does not fit ends the episode and counts as a miss on every metric
    full = calc_episode()
    run_tool_episodes([full], lambda running: [None] * len(running))
    assert full.status == "context_full" and full.rounds == 0
    m = summarize_episodes([full])[0]
    assert all(m[name] == 0.0 for name in METRICS) and m["mean_rounds"] == 0.0 and m["ended_context_full"] == 1


def test_wrong_tool_unknown_tool_and_wrong_arguments() -> None:
    wrong_args = calc_episode()
    run_tool_episodes([wrong_args], Script(format_tool_call("calculate_math", {"expression": "12*8"}), "96"))
    assert wrong_args.call_valid and wrong_args.right_tool and not wrong_args.exact_args
    unknown = calc_episode()
    run_tool_episodes([unknown], Script(format_tool_call("no_such_tool", {"x": 1}), "84"))
    assert unknown.call_valid and not unknown.right_tool and not unknown.exact_args
    assert unknown.tool_errors == 1 and "error" in json.loads(unknown.messages[3]["content"])
    assert unknown.final_correct  # answered right anyway: the final answer is graded on its own


def test_each_round_is_one_batch_over_running_episodes() -> None:
    eps = [calc_episode(where=str(i)) for i in range(3)]
    call = format_tool_call("calculate_math", {"expression": "12*7"})

    def replier(running: Sequence[ToolEpisode]) -> list[str | None]:
        batches.append([ep.where for ep in running])
        out: list[str | None] = []
        for ep in running:
            if ep.where == "0":
                out.append("84")  # answers at once
            elif ep.where == "1":
                out.append(call if ep.rounds == 0 else "12*7 = 84")
            else:
                out.append(call)  # never stops calling
        return out

    batches: list[list[str]] = []
    run_tool_episodes(eps, replier, max_rounds=3)
    assert batches == [["0", "1", "2"], ["1", "2"], ["2"]]
    assert [ep.status for ep in eps] == ["answered", "answered", "round_limit"]
    assert [ep.rounds for ep in eps] == [1, 2, 3]


def test_metrics_arithmetic_on_a_hand_built_case() -> None:
    eps = [calc_episode("en"), calc_episode("en"), calc_episode("zh"), calc_episode("zh")]
    eps[3].expected_calls = []  # a row without expected calls: left out of right_tool / exact_args
    eps[0].replies, eps[0].status, eps[0].made_call = ["c", "a"], "answered", True
    eps[0].right_tool, eps[0].exact_args, eps[0].final_correct = True, True, True
    eps[1].replies, eps[1].status, eps[1].made_call, eps[1].malformed = ["c", "x"], "invalid_call", True, True
    eps[1].right_tool, eps[1].exact_args = True, False
    eps[2].replies, eps[2].status, eps[2].made_call = ["c", "c", "c"], "round_limit", True
    eps[2].right_tool, eps[2].exact_args, eps[2].tool_errors = False, False, 2
    eps[3].replies, eps[3].status, eps[3].final_correct = ["a"], "answered", True
    metrics, subjects = summarize_episodes(eps)
    assert metrics["n"] == 4
    assert metrics["call_valid"] == pytest.approx(2 / 4)  # 0 and 2 (1 malformed, 3 never called)
    assert metrics["right_tool"] == pytest.approx(2 / 3)  # of the 3 that know their calls
    assert metrics["exact_args"] == pytest.approx(1 / 3)
    assert metrics["final_correct"] == pytest.approx(2 / 4)
    assert metrics["answered"] == pytest.approx(2 / 4)
    assert metrics["mean_rounds"] == pytest.approx((2 + 2 + 3 + 1) / 4)
    assert metrics["tool_errors"] == 2
    assert (metrics["ended_answered"], metrics["ended_invalid_call"], metrics["ended_round_limit"]) == (2, 1, 1)
    assert set(subjects) == {"tool_call/en", "tool_call/zh", "tool=calculate_math"}
    assert subjects["tool_call/en"]["n"] == 2 and subjects["tool_call/en"]["call_valid"] == 0.5
    assert subjects["tool_call/zh"]["right_tool"] == 0.0 and subjects["tool_call/zh"]["final_correct"] == 0.5
    assert subjects["tool=calculate_math"]["n"] == 3
    empty = [calc_episode()]
    empty[0].expected_calls = []
    assert summarize_episodes(empty)[0]["exact_args"] is None


def test_rows_as_the_demo_writes_them(tmp_path: Path) -> None:
    tasks = generate_tasks(12, 3, kinds=MIXED_KINDS, split="eval", level="easy")
    path = tmp_path / "eval_tasks.jsonl"
    path.write_text("".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
    eps = load_tool_episodes(path)
    want = [t for t in tasks if t.kind == "tool_call"]
    assert len(eps) == len(want) > 0
    for ep, t in zip(eps, want):
        assert ep.messages == t.prompt_messages and ep.expected_calls == t.tool_calls and ep.gt == t.gt
        assert ep.lang == t.lang and ep.tools == t.tools and ep.where.startswith(str(path))
    assert len(load_tool_episodes(path, limit=1)) == 1
    # an agent-RL row with JSON-string tools and no expected calls
    row = {"conversations": [{"role": "system", "content": "s", "tools": json.dumps(TOOLS)},
                             {"role": "user", "content": "天气？"}, {"role": "assistant", "content": ""}],
           "gt": ["28°C"], "kind": "tool_call"}
    ep = episode_from_row(row)
    assert ep.lang == "zh" and ep.tools == TOOLS and ep.expected_calls == [] and len(ep.messages) == 2
    only_math = tmp_path / "math.jsonl"
    only_math.write_text(json.dumps({"conversations": [{"role": "user", "content": "1+1"}], "gt": ["2"],
                                     "kind": "arithmetic"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no tool-task rows"):
        load_tool_episodes(only_math)


def test_perfect_replier_scores_one_everywhere() -> None:
    eps = generated_tool_episodes(9, seed=5)
    out = evaluate_tool_use(lambda running: [perfect_reply(ep) for ep in running], eps, max_rounds=3)
    for name in METRICS:
        assert out["metrics"][name] == 1.0, name
    assert out["metrics"]["mean_rounds"] == 2.0 and out["metrics"]["tool_errors"] == 0
    for row in out["subjects"].values():
        assert all(row[name] == 1.0 for name in METRICS)
    assert len(out["samples"]) == 9 and out["samples"][0]["status"] == "answered"


class FakeEngine:
    """Just what :func:`engine_replier` uses of an engine; replies perfectly from the rendered prompt,
    so the test checks that the tool results really reach the next prompt."""

    def __init__(self, tok: MiniMindTokenizer, episodes: Sequence[ToolEpisode], max_context: int) -> None:
        self.tokenizer = tok
        self.max_context = max_context
        self.by_question = {ep.prompt: ep for ep in episodes}
        self.calls: list[int] = []

    def chat_prompt_ids(self, messages: Any, tools: Any = None, open_thinking: bool = False) -> list[int]:
        return GenerationEngine.chat_prompt_ids(self, messages, tools, open_thinking)  # type: ignore[arg-type]

    def generate(self, prompts: Sequence[Sequence[int]], params: Any) -> list[GenerationResult]:
        self.calls.append(len(prompts))
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            ep = next(ep for q, ep in self.by_question.items() if q in text)
            if "<tool_response>" in text:
                result = execute_tool(ep.expected_calls[0]["name"], ep.expected_calls[0]["arguments"])
                assert json.dumps(result, ensure_ascii=False) in text
                reply = "The result is " + ", ".join(map(str, ep.gt)) + "."
            else:
                reply = format_tool_call(ep.expected_calls[0]["name"], ep.expected_calls[0]["arguments"])
            out.append(GenerationResult(token_ids=[], text=reply, finish_reason="stop", prompt_tokens=len(ids),
                                        completion_tokens=0))
        return out


def test_engine_replier_batches_and_feeds_tool_results(tok: MiniMindTokenizer) -> None:
    eps = generated_tool_episodes(5, seed=2, level="easy")
    engine = FakeEngine(tok, eps, max_context=100_000)
    out = evaluate_tool_use(engine_replier(engine, batch_size=0), eps, max_rounds=3)
    assert engine.calls == [5, 5]  # one generate call per round
    assert all(out["metrics"][name] == 1.0 for name in METRICS)
    eps = generated_tool_episodes(5, seed=2, level="easy")
    engine = FakeEngine(tok, eps, max_context=100_000)
    evaluate_tool_use(engine_replier(engine, batch_size=2), eps, max_rounds=3)
    assert engine.calls == [2, 2, 1, 2, 2, 1]
    # a conversation that no longer fits ends the episode instead of failing the run
    eps = generated_tool_episodes(2, seed=2, level="easy")
    first = len(engine.chat_prompt_ids(eps[0].messages, eps[0].tools))
    engine = FakeEngine(tok, eps, max_context=max(first, len(engine.chat_prompt_ids(eps[1].messages,
                                                                                    eps[1].tools))) + 5)
    out = evaluate_tool_use(engine_replier(engine), eps, max_rounds=3)
    assert out["metrics"]["ended_context_full"] == 2 and out["metrics"]["final_correct"] == 0.0


def test_engine_path_on_a_tiny_random_model(tok: MiniMindTokenizer) -> None:
    model = tiny_model(tok.vocab_size, seed=1)
    engine = GenerationEngine(model, tok, num_slots=4)
    eps = generated_tool_episodes(4, seed=7, level="easy")
    out = evaluate_tool_use(engine_replier(engine, max_new_tokens=6), eps, max_rounds=2)
    m = out["metrics"]
    assert m["n"] == 4 and 1.0 <= m["mean_rounds"] <= 2.0
    for name in METRICS:
        assert 0.0 <= m[name] <= 1.0, name
    assert sum(m[f"ended_{s}"] for s in ("answered", "invalid_call", "round_limit", "context_full")) == 4
    assert all(isinstance(r, str) for s in out["samples"] for r in s["replies"])


# ---- long context --------------------------------------------------------------------------------
def test_buckets_cover_every_position_exactly_once() -> None:
    for start, stop, n in [(1, 48, 8), (1, 9, 8), (1, 4, 8), (0, 1, 3), (5, 1029, 8), (1, 100, 7)]:
        buckets = bucket_edges(start, stop, n)
        covered = [p for a, b in buckets for p in range(a, b)]
        assert covered == list(range(start, stop))
        assert len(buckets) == min(n, stop - start) and all(b > a for a, b in buckets)
        sizes = [b - a for a, b in buckets]
        assert max(sizes) - min(sizes) <= 1
    values = torch.arange(1, 48, dtype=torch.float64)  # value == position
    buckets = bucket_edges(1, 48, 8)
    assert bucket_means(values, 1, buckets) == pytest.approx([(a + b - 1) / 2 for a, b in buckets])
    with pytest.raises(ValueError):
        bucket_edges(3, 3, 2)


def test_yarn_changes_nothing_when_the_table_fits_the_original_context() -> None:
    """``rope_inv_freq`` scales only when the table is longer than the original context: with
    ``original_max_position_embeddings`` >= the table (>= the sequence) YaRN is the plain model; the
    same YaRN settings with a longer table do change the losses, so the equality is not vacuous."""
    model = tiny_model(97, seed=4, max_pos=64)
    torch.manual_seed(0)
    seqs = torch.randint(3, 97, (3, 48))
    plain = position_nll(model, seqs, batch_size=2)
    scaling = {**REFERENCE_YARN, "original_max_position_embeddings": 64, "factor": 4.0}
    fitted = enable_yarn(copy.deepcopy(model), max_position_embeddings=64, rope_scaling=scaling)
    same = position_nll(fitted, seqs, batch_size=2)
    assert torch.allclose(same, plain, rtol=1e-5, atol=0)
    longer = enable_yarn(copy.deepcopy(model), max_position_embeddings=256, rope_scaling=scaling)
    moved = position_nll(longer, seqs, batch_size=2)
    assert ((moved - plain).abs() / plain).max() > 1e-3  # YaRN active: every position's angles change
    # the eval's own path: sequences within the original context give identical curves
    out = evaluate_longctx(model, seqs, original_length=64, n_buckets=4, batch_size=2)
    assert out["yarn_factor"] == 1.0
    assert torch.allclose(out["nll_yarn"], out["nll_plain"], rtol=1e-5, atol=0)
    assert torch.allclose(out["nll_plain"], plain, rtol=1e-6, atol=0)
    assert "nll_plain_beyond" not in out["metrics"]


def test_longctx_beyond_the_trained_context() -> None:
    model = tiny_model(97, seed=5, max_pos=32)
    torch.manual_seed(1)
    seqs = torch.randint(3, 97, (2, 64))
    with pytest.raises(ValueError, match="positions"):
        position_nll(model, seqs)
    assert with_plain_rope(model, 31) is model
    extended = with_plain_rope(model, 63)
    assert extended is not model and extended.config.max_position_embeddings == 63
    assert model.config.max_position_embeddings == 32 and model.model.rope_cos.shape[0] == 32
    # plain tables extend the old ones exactly
    assert torch.equal(extended.model.rope_cos[:32], model.model.rope_cos)
    yarn = with_yarn(model, original_length=16, factor=4.0, positions=63)
    assert yarn.config.max_position_embeddings == 64 and yarn.config.rope_scaling["factor"] == 4.0
    out = evaluate_longctx(model, seqs, original_length=16, n_buckets=8, batch_size=2)
    assert out["yarn_factor"] == 4.0 and len(out["buckets"]) == 8
    assert out["buckets"][0]["start"] == 1 and out["buckets"][-1]["end"] == 63
    assert out["nll_plain"].shape == (63,) and torch.isfinite(out["nll_yarn"]).all()
    m = out["metrics"]
    assert m["tokens_scored"] == 2 * 63
    assert m["nll_plain_within"] == pytest.approx(float(out["nll_plain"][:15].mean()))
    assert m["nll_yarn_beyond"] == pytest.approx(float(out["nll_yarn"][15:].mean()))
    assert not torch.allclose(out["nll_plain"], out["nll_yarn"])


def test_long_sequences_from_jsonl_and_text(tok: MiniMindTokenizer, tmp_path: Path) -> None:
    docs = [f"document {i}: " + "some words and numbers 123 " * (i + 1) for i in range(6)]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    stream = [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    seqs = long_sequences(path, tok, 20)
    assert seqs.shape == (len(stream) // 20, 20)
    assert seqs.flatten().tolist() == stream[:seqs.numel()]
    assert long_sequences(path, tok, 20, max_seqs=2).shape == (2, 20)
    text = tmp_path / "book.txt"
    text.write_text(" ".join(docs), encoding="utf-8")
    assert long_sequences(text, tok, 16)[0, 0].item() == tok.bos_id
    with pytest.raises(ValueError, match="fewer than one sequence"):
        long_sequences(path, tok, 100_000)


# ---- report --------------------------------------------------------------------------------------
def test_report_from_results_and_metrics(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_results(EvalResult("mc", "full_sft_256.safetensors", {"acc_letter": 0.31, "n": 40},
                             {"shots": 0, "device": "cpu"}, {"agronomy": {"n": 40, "acc_letter": 0.31}},
                             data="cmmlu.csv", seconds=1.5), runs / "mc.json")
    write_results(EvalResult("tools", "full_sft_256.safetensors", {"call_valid": 0.75, "final_correct": 0.5},
                             {"max_rounds": 3}, {"tool_call/en": {"n": 4, "call_valid": 0.75}},
                             data="eval_tasks.jsonl", seconds=2.0), runs / "tools.json")
    write_results(EvalResult("tools", "full_sft_256.safetensors", {"call_valid": 1.0}, {"max_rounds": 1},
                             data="eval_tasks.jsonl", seconds=1.0), runs / "tools_r1.json")
    (runs / "results.json").write_text('{"results": {}, "timings": {}}', encoding="utf-8")  # skipped
    metrics = runs / "pretrain_256_metrics.jsonl"
    metrics.write_text("".join(json.dumps({"time": 0, "step": s, "epoch": 0, "loss": 5.0 - s / 10, "lr": 1e-3})
                               + "\n" for s in range(1, 11)), encoding="utf-8")
    results, found = collect_inputs([runs])
    assert sorted(r.task for _, r in results) == ["mc", "tools", "tools"] and found == [metrics]

    out = write_report([runs], tmp_path / "site" / "report.md")
    md = out.read_text(encoding="utf-8")
    assert "### eval mc" in md and "### eval tools" in md
    assert "| run | acc_letter | n | seconds |" in md
    assert "| full_sft_256.safetensors · cmmlu.csv | 0.3100 | 40 | 1.5000 |" in md
    assert "| run | call_valid | final_correct | seconds |" in md
    # two runs of one model on one file: told apart by their file names; a missing metric is blank
    assert "| full_sft_256.safetensors · eval_tasks.jsonl (tools.json) | 0.7500 | 0.5000 | 2.0000 |" in md
    assert "| full_sft_256.safetensors · eval_tasks.jsonl (tools_r1.json) | 1.0000 |  | 1.0000 |" in md
    assert "| run | shots |" in md and "device" not in md.split("### eval tools")[0].split("Settings:")[1][:60]
    assert "tool_call/en" in md and "agronomy" in md
    png = tmp_path / "site" / "report_files" / "loss_pretrain_256.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "](report_files/loss_pretrain_256.png)" in md
    assert "| pretrain_256 | 10 | 4.9000 | 4.0000 | 4.0000 |" in md
    assert "](../runs/mc.json)" in md

    # named files: a non-results JSON is an error; the CLI writes the same report
    with pytest.raises(ValueError, match="not an eval results file"):
        collect_inputs([runs / "results.json"])
    assert main(["report", str(runs / "mc.json"), str(metrics), "--out", str(tmp_path / "r2.md")]) == 0
    md2 = (tmp_path / "r2.md").read_text(encoding="utf-8")
    assert "### eval mc" in md2 and "### eval tools" not in md2 and "](r2_files/loss_pretrain_256.png)" in md2
    assert main(["report", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "r3.md")]) == 2


# ---- the CLI end to end ----------------------------------------------------------------------------
def test_cli_tools_longctx_and_report(tok: MiniMindTokenizer, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    tok.save(run / "tokenizer")
    weights = save_weights(tiny_model(tok.vocab_size, seed=2, max_pos=2048), run / "full_sft_32.safetensors")
    tasks = generate_tasks(8, 4, kinds=MIXED_KINDS, split="eval", level="easy")
    data = tmp_path / "eval_tasks.jsonl"
    data.write_text("".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
    n_tool = sum(t.kind == "tool_call" for t in tasks)
    assert main(["eval", "tools", "--model", str(weights), "--data", str(data), "--max_rounds", "2",
                 "--max_new_tokens", "4", "--out", str(run / "tools.json"), "--device", "cpu",
                 "--dtype", "float32"]) == 0
    res = json.loads((run / "tools.json").read_text(encoding="utf-8"))
    assert res["task"] == "tools" and res["metrics"]["n"] == n_tool and res["settings"]["max_rounds"] == 2
    assert all(0.0 <= res["metrics"][k] <= 1.0 for k in METRICS)
    assert "call_valid" in capsys.readouterr().out
    # no --data: freshly generated eval-split tool tasks
    assert main(["eval", "tools", "--model", str(weights), "--n_tasks", "2", "--max_rounds", "1",
                 "--max_new_tokens", "2", "--out", str(tmp_path / "gen.json"), "--device", "cpu"]) == 0
    gen = json.loads((tmp_path / "gen.json").read_text(encoding="utf-8"))
    assert gen["data"] == "generated" and gen["metrics"]["n"] == 2 and gen["metrics"]["mean_rounds"] == 1.0

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": f"held-out text {i} " * 12}) + "\n" for i in range(8)),
                       encoding="utf-8")
    plot = run / "longctx.png"
    assert main(["eval", "longctx", "--model", str(weights), "--data", str(heldout), "--length", "40",
                 "--original_length", "16", "--buckets", "4", "--limit", "3", "--plot", str(plot),
                 "--out", str(run / "longctx.json"), "--device", "cpu", "--dtype", "float32"]) == 0
    res = json.loads((run / "longctx.json").read_text(encoding="utf-8"))
    assert res["settings"]["yarn_factor"] == 2.5 and res["metrics"]["sequences"] <= 3
    assert list(res["subjects"]) == ["positions 1-9", "positions 10-19", "positions 20-29", "positions 30-39"]
    assert plot.read_bytes()[:8] == PNG_MAGIC

    md = write_report([run], tmp_path / "report.md").read_text(encoding="utf-8")
    assert "### eval tools" in md and "### eval longctx" in md and "](run/longctx.png)" in md
