"""``minimind eval``: bits per byte, multiple choice, math answers, results JSON and the CLI."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from minimind.cli import main
from minimind.config import ModelConfig
from minimind.data.jsonl import DataFormatError
from minimind.eval.bpb import bpb_of_texts, evaluate_bpb_jsonl, window_slices
from minimind.eval.math import (
    MathItem,
    evaluate_math,
    extract_answer,
    load_math,
    numbers_equal,
    parse_number,
    pass_at_k,
)
from minimind.eval.mc import (
    MCItem,
    build_prompt,
    choice_text,
    letter_text,
    load_mc,
    read_mc_csv,
    score_items,
    select_shots,
    summarize,
)
from minimind.eval.results import EvalResult, read_results, write_results
from minimind.infer.engine import GenerationResult
from minimind.model import MiniMindForCausalLM, save_weights
from minimind.tokenizer import MiniMindTokenizer
from minimind.tokenizer.train import train_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Numbers: 12, 345 and 6789; prices rose by 3.5% in 1998.",
    "人民日报 1998 年 1 月 1 日：新年献词，祝全国人民新年快乐！",
    "A",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    texts = DOCS * 5 + [f"以下是关于农学的单项选择题 answer {i} 答案：A B C D" for i in range(30)]
    train_tokenizer(texts, out, vocab_size=300, show_progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> MiniMindTokenizer:
    return MiniMindTokenizer.from_dir(tok_dir)


def tiny_model(vocab: int, seed: int = 0, max_pos: int = 512) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=max_pos, tie_word_embeddings=False)
    model = MiniMindForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init gives near-uniform logits; make them say something
        model.lm_head.weight.normal_(0, 0.5)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@torch.no_grad()
def cont_logprobs(model: MiniMindForCausalLM, ctx: list[int], cont: list[int]) -> list[float]:
    """Log-probs of ``cont`` after ``ctx``, from one unpadded forward pass."""
    ids = torch.tensor([ctx + cont])
    lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)]


# ---- bits per byte ---------------------------------------------------------------------------------
def test_uniform_predictor_bpb_is_log2_vocab_times_tokens_per_byte(tok: MiniMindTokenizer,
                                                                   tmp_path: Path) -> None:
    model = tiny_model(tok.vocab_size + 20)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/V for every token
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS])
    res = evaluate_bpb_jsonl(model, tok, data, batch_size=2)
    tokens = sum(len(tok.encode(t)) for t in DOCS)
    n_bytes = sum(len(t.encode("utf-8")) for t in DOCS)
    vocab = tok.vocab_size + 20
    assert res["tokens"] == tokens and res["bytes"] == n_bytes and res["docs"] == len(DOCS)
    expected = math.log2(vocab) * tokens / n_bytes
    assert abs(res["bpb"] - expected) / expected < 1e-6
    assert abs(res["perplexity"] - vocab) / vocab < 1e-6
    assert evaluate_bpb_jsonl(model, tok, data, max_docs=2)["docs"] == 2


def test_window_slices_score_every_token_once_with_bounded_context() -> None:
    for n, window, stride in [(1, 4, 1), (4, 4, 3), (5, 4, 1), (17, 5, 2), (30, 8, 7), (9, 2, 1)]:
        scored = []
        for begin, end, skip in window_slices(n, window, stride):
            assert end - begin <= window
            for target in range(begin + 1 + skip, end):
                scored.append(target)
                assert 1 <= target - begin <= window - 1  # context length
        assert sorted(scored) == list(range(1, n))
    with pytest.raises(ValueError):
        window_slices(10, 4, 4)


def test_sliding_window_bpb(tok: MiniMindTokenizer) -> None:
    model = tiny_model(tok.vocab_size, seed=1)
    docs = DOCS[:4]
    plain = bpb_of_texts(model, tok, docs, batch_size=3)
    longest = max(len(tok.encode(t)) for t in docs) + 1  # + BOS
    covered = bpb_of_texts(model, tok, docs, batch_size=3, window=longest, stride=5)
    assert covered["docs_windowed"] == 0
    assert covered["tokens"] == plain["tokens"]
    assert abs(covered["bpb"] - plain["bpb"]) / plain["bpb"] < 1e-5
    short = bpb_of_texts(model, tok, docs, batch_size=3, window=8, stride=3)
    assert short["docs_windowed"] >= 3 and short["tokens"] == plain["tokens"]
    assert math.isfinite(short["bpb"]) and abs(short["bpb"] - plain["bpb"]) > 1e-3
    # the windowed total equals the slices scored one by one, without batching or padding
    nats = 0.0
    for text in docs:
        seq = [tok.bos_id, *tok.encode(text)]
        for begin, end, skip in window_slices(len(seq), 8, 3):
            lps = cont_logprobs(model, seq[begin:begin + 1], seq[begin + 1:end])
            nats -= sum(lps[skip:])
    assert abs(short["nats"] - nats) / nats < 1e-5
    with pytest.raises(ValueError, match="stride"):
        bpb_of_texts(model, tok, docs, window=8, stride=8)


# ---- multiple choice -------------------------------------------------------------------------------
CEVAL = ("id,question,A,B,C,D,answer,explanation\n"
         '0,"明月几时有？\n（第二行）",一,二,三,四,B,解释\n'
         "1,举头望明月,低头,思故乡,床前,明月光,D,\n"
         "2,疑是地上霜,甲,乙,丙,丁,A,\n")
CMMLU = (",Question,A,B,C,D,Answer\n0,肉牛屠宰后哪个部位好,胸,腹,大腿,小腿,C\n"
         "1,产蛋量最高的是,高邮鸭,北京鸭,樱桃谷鸭,绍鸭,D\n")


def test_ceval_and_cmmlu_csv_layouts(tmp_path: Path) -> None:
    ceval = tmp_path / "ceval" / "poetry_val.csv"
    ceval.parent.mkdir()
    ceval.write_text(CEVAL, encoding="utf-8")
    items = read_mc_csv(ceval)
    assert [it.answer for it in items] == [1, 3, 0]
    assert items[0].question == "明月几时有？\n（第二行）" and items[0].choices == ["一", "二", "三", "四"]
    assert items[0].subject == "poetry" and items[1].where.endswith("poetry_val.csv:4")
    cmmlu = tmp_path / "cmmlu" / "agronomy.csv"
    cmmlu.parent.mkdir()
    cmmlu.write_text("\ufeff" + CMMLU, encoding="utf-8")  # a BOM, as Excel writes
    items = load_mc(cmmlu.parent)
    assert [(it.subject, it.answer, it.lang) for it in items] == [("agronomy", 2, "zh"),
                                                                   ("agronomy", 3, "zh")]
    assert items[1].choices[2] == "樱桃谷鸭"
    bad = tmp_path / "bad.csv"
    bad.write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,C\n1,q2,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.csv:3:"):
        read_mc_csv(bad)
    bad.write_text("q,a,b\n1,2,3\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="question and answer"):
        read_mc_csv(bad)


def test_jsonl_items_and_kshot_prompt_excludes_the_item(tmp_path: Path) -> None:
    rows = [{"question": f"Question {i}?", "choices": [f"a{i}", f"b{i}", f"c{i}"], "answer": i % 3}
            for i in range(4)]
    rows[1]["answer"] = "c"
    items = load_mc(write_jsonl(tmp_path / "quiz.jsonl", rows))
    assert [it.answer for it in items] == [0, 2, 2, 0] and items[0].lang == "en"
    pool = {"quiz": items}
    shots = select_shots(items[1], pool, 2)
    assert [s.question for s in shots] == ["Question 0?", "Question 2?"]
    prompt = build_prompt(items[1], shots)
    assert prompt.startswith("The following are multiple choice questions about quiz.")
    assert prompt.count("Question 1?") == 1 and prompt.endswith("Question 1?\nA. a1\nB. b1\nC. c1\nAnswer:")
    assert "Question 0?\nA. a0\nB. b0\nC. c0\nAnswer: A\n\n" in prompt
    assert len(select_shots(items[1], pool, 10)) == 3
    zh = MCItem("问题", ["甲", "乙"], 1, "农学", lang="zh")
    assert build_prompt(zh, [MCItem("例题", ["子", "丑"], 0, "农学", lang="zh")]) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "例题\nA. 子\nB. 丑\n答案：A\n\n问题\nA. 甲\nB. 乙\n答案：")
    bad = write_jsonl(tmp_path / "bad.jsonl",
                      rows[:2] + [{"question": "q", "choices": ["x", "y"], "answer": 5}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3:.*not one of the 2 choices"):
        load_mc(bad)


def test_mc_scores_match_direct_computation(tok: MiniMindTokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "mc"
    folder.mkdir()
    (folder / "poetry_val.csv").write_text(CEVAL, encoding="utf-8")
    items = load_mc(folder)
    items.append(MCItem("Which letter?", ["first one", "second", "third choice"], 1, "letters", lang="en"))
    model = tiny_model(tok.vocab_size, seed=2)
    # Make "C" the clear winner after the first question's prompt: its lm_head row points along the
    # final hidden state there.
    ctx0 = [tok.bos_id] + tok.encode(build_prompt(items[0], []))
    (c_id,) = tok.encode(letter_text("zh", 2))
    with torch.no_grad():
        h = model(torch.tensor([ctx0])).hidden_states[0, -1]
        model.lm_head.weight[c_id] = 40 * h / h.pow(2).sum()
    scored = score_items(model, tok, items, shots=0, batch_size=3)
    assert scored[0]["pred_letter"] == 2
    for item, s in zip(items, scored):
        ctx = [tok.bos_id] + tok.encode(build_prompt(item, []))
        letters = [sum(cont_logprobs(model, ctx, tok.encode(letter_text(item.lang, i))))
                   for i in range(len(item.choices))]
        choices = []
        for c in item.choices:
            lps = cont_logprobs(model, ctx, tok.encode(choice_text(item.lang, c)))
            choices.append(sum(lps) / len(lps))
        assert s["letter_logprobs"] == pytest.approx(letters, abs=1e-4)
        assert s["choice_scores"] == pytest.approx(choices, abs=1e-4)
        assert s["pred_letter"] == max(range(len(letters)), key=letters.__getitem__)
        assert s["pred_choice"] == max(range(len(choices)), key=choices.__getitem__)
    metrics, subjects = summarize(scored)
    assert metrics["n"] == 4 and set(subjects) == {"poetry", "letters"}
    assert subjects["poetry"]["chance"] == 0.25 and subjects["letters"]["chance"] == pytest.approx(1 / 3)
    want = sum(s["pred_letter"] == it.answer for it, s in zip(items, scored)) / 4
    assert metrics["acc_letter"] == want
    # k-shot from the same data: one shot each, never the question itself
    shot = score_items(model, tok, items[:3], shots=1, batch_size=4)
    assert [s["shots"] for s in shot] == [1, 1, 1]


# ---- math --------------------------------------------------------------------------------------------
EXTRACT = [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The answer is $1,234.50.", "1234.5"),
    ("so the final answer is \\boxed{\\frac{3}{4}}", "3/4"),
    ("\\boxed{x = 42} and then 7", "42"),
    ("答案是 ３６", "36"),
    ("首先 5+3=8，所以答案为８。", "8"),
    ("答案：-12个苹果", "-12"),
    ("10 - 3 = 7", "7"),
    ("The temperature is −7 degrees", "-7"),
    ("x = -5", "-5"),
    ("It went up 45%", "45"),
    ("She ate 3/4 of the pie", "3/4"),
    ("He has 18 dollars.", "18"),
    ("<think>maybe 12</think>The result is 15", "15"),
    ("#### -0.5", "-0.5"),
    ("Answer: 7 apples, not 8", "7"),
    ("共有1,000,000元", "1000000"),
    ("The answer is 5. Wait: the answer is 6.", "6"),
    ("半径为 .5 米", "0.5"),
    ("It costs $ 12 per hour, so 3 hours cost 36", "36"),
    ("COVID-19 cases: 250", "250"),
    ("no number here", None),
    ("１２３４５", "12345"),
    ("Total = 2,500 + 500 = 3,000.", "3000"),
]


@pytest.mark.parametrize("text,want", EXTRACT)
def test_extract_answer(text: str, want: str | None) -> None:
    got = extract_answer(text)
    assert (got is None) if want is None else got == Fraction(want)


def test_number_parsing_and_comparison() -> None:
    assert parse_number("1,234") == 1234 and parse_number(" -3/4 ") == Fraction(-3, 4)
    assert parse_number(72) == 72 and parse_number("abc") is None and parse_number(True) is None
    assert numbers_equal(Fraction(1, 2), 0.5) and numbers_equal(Fraction(1, 3), 0.3333333334)
    assert not numbers_equal(Fraction(1, 3), 0.333) and not numbers_equal(None, 1)


def test_pass_at_k_unbiased_estimator() -> None:
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(5, 1, 3) == pytest.approx(0.6)  # 1 - C(4,3)/C(5,3)
    assert pass_at_k(3, 2, 2) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_load_math_formats(tmp_path: Path) -> None:
    rows = [{"question": "How many?", "answer": "Work: 1000 + 234 = 1234\n#### 1,234"},
            {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": ""}],
             "gt": ["4"], "kind": "arithmetic"},
            {"conversations": [{"role": "user", "content": "星期几？"}], "gt": ["星期三"]},
            {"question": "Half?", "answer": 0.5}]
    items, skipped = load_math(write_jsonl(tmp_path / "m.jsonl", rows))
    assert skipped == 1 and [it.answers for it in items] == [[1234], [4], [Fraction(1, 2)]]
    assert items[1].messages == [{"role": "user", "content": "2+2?"}] and items[1].subject == "arithmetic"
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2:.*gt"):
        load_math(write_jsonl(tmp_path / "bad.jsonl",
                              rows[:1] + [{"conversations": rows[1]["conversations"]}]))


class ScriptedEngine:
    """Replies from a table (question -> its n sample texts), to check the scoring arithmetic."""

    class Tok:
        eos_id = 2

    tokenizer = Tok()

    def __init__(self, replies: dict[str, list[str]]) -> None:
        self.replies = replies
        self.calls: list[tuple[int, int]] = []

    def chat_prompt_ids(self, messages, tools=None, open_thinking=False) -> list[int]:
        return [ord(c) for c in messages[-1]["content"]]

    def check_prompt(self, ids, n: int = 1) -> None:
        pass

    def generate(self, prompts, params, n: int = 1) -> list[GenerationResult]:
        self.calls.append((len(prompts), n))
        out = []
        for ids in prompts:
            texts = self.replies["".join(map(chr, ids))]
            assert len(texts) == n
            out += [GenerationResult(token_ids=[], text=t, finish_reason="stop", prompt_tokens=len(ids),
                                     completion_tokens=1) for t in texts]
        return out


def test_math_accuracy_and_pass_at_k_from_scripted_samples() -> None:
    items = [MathItem([{"role": "user", "content": "q1"}], [Fraction(72)], "a"),
             MathItem([{"role": "user", "content": "q2"}], [Fraction(1, 2)], "b"),
             MathItem([{"role": "user", "content": "q3"}], [Fraction(-3)], "b")]
    engine = ScriptedEngine({
        "q1": ["#### 72", "so 71", "The answer is 72.", "no idea"],  # c = 2
        "q2": ["\\boxed{\\frac{1}{2}}", "0.5", "答案是 0.50", "1/2"],  # c = 4
        "q3": ["-2", "3", "x = 3", "minus"],  # c = 0
    })
    res = evaluate_math(engine, items, n=4, temperature=0.7, batch_size=2, ks=[2, 9])
    m = res["metrics"]
    assert engine.calls == [(2, 4), (1, 4)]
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(6 / 12)
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 + 0) / 3)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + 1 + 0) / 3)  # 1 - C(2,2)/C(4,2) for q1
    assert m["pass@4"] == pytest.approx(2 / 3) and "pass@9" not in m
    assert res["subjects"]["b"]["accuracy"] == pytest.approx(4 / 8)
    assert res["samples"][0]["extracted"] == "72" and res["samples"][1]["extracted"] == "0.5"
    with pytest.raises(ValueError, match="temperature"):
        evaluate_math(engine, items, n=4, temperature=0.0)


# ---- results and CLI ----------------------------------------------------------------------------------
def test_results_round_trip(tmp_path: Path) -> None:
    res = EvalResult("mc", "m.safetensors", {"acc": 0.5, "bad": float("nan")}, {"shots": 0},
                     {"a": {"n": 2, "acc": 0.5}}, seconds=1.25)
    back = read_results(write_results(res, tmp_path / "sub" / "r.json"))
    assert back.metrics == {"acc": 0.5, "bad": None} and back.subjects == res.subjects
    assert back.timestamp == res.timestamp and back.seconds == 1.25


def test_cli_end_to_end(tok: MiniMindTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = tmp_path / "run"
    tok.save(model_dir / "tokenizer")
    model = tiny_model(tok.vocab_size, seed=3, max_pos=256)
    weights = save_weights(model, model_dir / "pretrain_32.safetensors")
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "bpb.json"
    assert main(["eval", "bpb", "--model", str(weights), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--dtype", "float32", "--batch_size", "2"]) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    assert {"format", "task", "model", "settings", "metrics", "subjects", "timestamp", "seconds"} <= set(res)
    assert res["task"] == "bpb" and res["model"] == "pretrain_32.safetensors"
    direct = bpb_of_texts(model, tok, DOCS)
    assert res["metrics"]["bpb"] == pytest.approx(direct["bpb"], rel=1e-5)
    assert 0 < res["metrics"]["bpb"] < 3 * math.log2(tok.vocab_size) and res["settings"]["window"] == 256
    assert "bpb" in capsys.readouterr().out

    # a stage name, resolved in --save_dir, and the multiple-choice table
    mc_dir = tmp_path / "mc"
    mc_dir.mkdir()
    (mc_dir / "poetry_val.csv").write_text(CEVAL, encoding="utf-8")
    (mc_dir / "agronomy.csv").write_text(CMMLU, encoding="utf-8")
    assert main(["eval", "mc", "--model", "pretrain", "--save_dir", str(model_dir), "--data", str(mc_dir),
                 "--shots", "1", "--out", str(tmp_path / "mc.json"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "mc.json").read_text(encoding="utf-8"))
    assert set(res["subjects"]) == {"agronomy", "poetry"} and res["metrics"]["n"] == 5
    for key in ("acc_letter", "acc_choice", "macro_acc_letter"):
        assert 0.0 <= res["metrics"][key] <= 1.0
    assert res["metrics"]["chance"] == 0.25 and res["metrics"]["mean_shots"] == 1.0
    assert "poetry" in capsys.readouterr().out

    # math through the engine, greedy
    mdata = write_jsonl(tmp_path / "math.jsonl", [
        {"conversations": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": ""}],
         "gt": ["2"]},
        {"question": "2+2?", "answer": "#### 4"}, {"question": "3+3?", "answer": "#### 6"}])
    assert main(["eval", "math", "--model", str(weights), "--data", str(mdata), "--limit", "2",
                 "--max_new_tokens", "4", "--out", str(tmp_path / "math.json"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "math.json").read_text(encoding="utf-8"))
    assert res["metrics"]["n"] == 2 and 0.0 <= res["metrics"]["accuracy"] <= 1.0
    assert res["metrics"]["pass@1"] == res["metrics"]["accuracy"] and len(res["samples"]) == 2

    # an HF folder scores the same numbers as the weights file it was exported from
    from minimind.export import export_hf
    hf = export_hf(weights, tmp_path / "hf", model_dir / "tokenizer")
    assert main(["eval", "bpb", "--model", str(hf), "--data", str(data), "--out", str(tmp_path / "hf.json"),
                 "--device", "cpu", "--dtype", "float32"]) == 0
    hf_bpb = json.loads((tmp_path / "hf.json").read_text(encoding="utf-8"))["metrics"]["bpb"]
    assert hf_bpb == pytest.approx(direct["bpb"], rel=1e-5)

    # bad input: one line, file:line, exit code 2
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", "bpb", "--model", str(weights), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: missing field 'text'" in capsys.readouterr().err


# ---- the real data files -------------------------------------------------------------------------------
def test_real_cmmlu_dev_and_math_file(shared_dir: Path) -> None:
    data = shared_dir / "data"
    items = load_mc(data / "cmmlu_dev")
    assert len(items) == 335 and len({it.subject for it in items}) == 67
    assert all(len(it.choices) == 4 and 0 <= it.answer < 4 and it.lang == "zh" for it in items)
    first = next(it for it in items if it.subject == "agronomy")
    assert first.question == "肉牛屠宰后，胴体的哪个部位肉质较好" and first.answer == 2
    jitems = load_mc(data / "cmmlu_dev.jsonl")
    assert jitems[0].lang == "zh"  # a Chinese JSONL gets the Chinese prompt
    assert sorted((it.subject, it.question, it.answer) for it in jitems) == \
        sorted((it.subject, it.question, it.answer) for it in items)
    math_items, skipped = load_math(data / "math_rl_train.jsonl", limit=200)
    assert len(math_items) == 200 and skipped == 0
    assert math_items[0].answers == [220] and math_items[0].messages[-1]["role"] == "user"
