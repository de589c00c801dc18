"""Generation engine: cached batched decoding equals plain recomputation, stops, limits, chat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from minimind.config import ModelConfig
from minimind.infer import GenerationEngine, SamplingParams, enable_yarn
from minimind.infer.chat import ThinkSplitter, infer_model_config, load_prompts, run_chat
from minimind.infer.sampling import apply_repetition_penalty, seen_token_mask
from minimind.model import KVCache, MiniMindForCausalLM, load_weights, read_state_dict

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20]]  # three different lengths


def tiny_model(use_moe: bool = False, seed: int = 0, **over) -> MiniMindForCausalLM:
    """H=64 random model with large weights: greedy outputs vary (a 0.02-std tied model just
    repeats its input token, which would make every comparison trivially true)."""
    torch.manual_seed(seed)
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 300, "max_position_embeddings": 256, "tie_word_embeddings": False,
             "use_moe": use_moe, "num_experts": 4, "num_experts_per_tok": 2 if use_moe else 1}
    cfg = ModelConfig(**{**shape, **over})
    model = MiniMindForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


class FakeTokenizer:
    """Token i decodes to ``[i]``: multi-character pieces, so stop strings can span tokens."""

    eos_id, bos_id, pad_id = 2, 1, 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f"[{int(i)}]" for i in ids)


def reference_greedy(model, prompt, n, penalty: float = 1.0, stop=()) -> list[int]:
    """No cache: a full forward over the growing sequence, argmax of the last position."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            if penalty != 1.0:
                logits = apply_repetition_penalty(
                    logits, seen_token_mask(torch.tensor([ids]), logits.shape[-1]), penalty)
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
            if t in stop:
                break
    return out


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, stop_token_ids=kw.pop("stop_token_ids", ()),
                          **kw)


@pytest.fixture(scope="module")
def dense() -> MiniMindForCausalLM:
    return tiny_model()


@pytest.mark.parametrize("use_moe", [False, True])
def test_cached_batch_equals_uncached_recomputation(use_moe: bool, dense) -> None:
    model = dense if not use_moe else tiny_model(use_moe=True, seed=1)
    results = GenerationEngine(model).generate(PROMPTS, greedy(16))
    for prompt, res in zip(PROMPTS, results):
        assert res.token_ids == reference_greedy(model, prompt, 16)
        assert res.finish_reason == "length"
        assert res.prompt_tokens == len(prompt) and res.completion_tokens == 16
    assert len({tuple(r.token_ids) for r in results}) == 3  # the rows really differ


def test_batched_equals_each_prompt_alone(dense) -> None:
    engine = GenerationEngine(dense)
    batched = engine.generate(PROMPTS, greedy(12))
    for prompt, res in zip(PROMPTS, batched):
        assert engine.generate([prompt], greedy(12))[0].token_ids == res.token_ids


def test_repetition_penalty_matches_uncached(dense) -> None:
    results = GenerationEngine(dense).generate(PROMPTS, greedy(12, repetition_penalty=1.8))
    plain = GenerationEngine(dense).generate(PROMPTS, greedy(12))
    for prompt, res in zip(PROMPTS, results):
        assert res.token_ids == reference_greedy(dense, prompt, 12, penalty=1.8)
    assert [r.token_ids for r in results] != [r.token_ids for r in plain]


def test_stop_token_ends_one_row_while_others_continue(dense) -> None:
    engine = GenerationEngine(dense, tokenizer=FakeTokenizer())
    full = [r.token_ids for r in engine.generate(PROMPTS, greedy(12))]
    k, stop = next((k, t) for k, t in enumerate(full[1]) if k >= 2 and t not in full[1][:k]
                   and t not in full[0] and t not in full[2])
    seen: list[tuple[int, int]] = []
    results = engine.generate(PROMPTS, greedy(12, stop_token_ids=(stop,)),
                              on_token=lambda row, tok: seen.append((row, tok)))
    assert results[1].token_ids == full[1][:k + 1]
    assert results[1].finish_reason == "stop" and results[1].stop == stop
    assert results[1].text == FakeTokenizer().decode(full[1][:k])  # stop token not in the text
    for r in (0, 2):  # the other rows kept going after row 1 was compacted away
        assert results[r].token_ids == full[r] and results[r].finish_reason == "length"
    for r in range(3):
        assert [t for row, t in seen if row == r] == results[r].token_ids


def test_max_new_tokens_and_context_limit(dense) -> None:
    engine = GenerationEngine(dense)
    for n in (1, 5):
        assert all(len(r.token_ids) == n for r in engine.generate(PROMPTS, greedy(n)))
    # 60-token prompt, 64 positions: only positions 60..63 remain for the completion.
    short = GenerationEngine(dense, max_batch_len=64)
    prompt = [(7 * i) % 300 for i in range(60)]
    res = short.generate([prompt, [3, 4]], greedy(10))
    assert len(res[0].token_ids) == 4 and res[0].finish_reason == "length"
    assert res[0].token_ids == reference_greedy(dense, prompt, 4)
    assert len(res[1].token_ids) == 10


def test_prompt_longer_than_context_is_a_clear_error(dense) -> None:
    engine = GenerationEngine(dense)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1] * 256], greedy(4))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        KVCache(dense.config, 1, 257)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 300]], greedy(4))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1], []], greedy(4))


def test_stop_strings_truncate_text_and_stream(dense) -> None:
    tok = FakeTokenizer()
    engine = GenerationEngine(dense, tokenizer=tok)
    full = engine.generate(PROMPTS, greedy(12))
    ids = full[1].token_ids
    stop = f"{ids[3]}][{ids[4]}"  # spans two tokens
    text = tok.decode(ids)
    cut = text.find(stop)
    need = next(n for n in range(1, 13) if stop in tok.decode(ids[:n]))
    res = engine.generate(PROMPTS, greedy(12, stop_strings=(stop,)))
    assert res[1].text == text[:cut] and res[1].finish_reason == "stop" and res[1].stop == stop
    assert res[1].token_ids == ids[:need]
    stream = engine.stream(PROMPTS[1], greedy(12, stop_strings=(stop,)))
    pieces = list(stream)
    assert "".join(pieces) == text[:cut] and len(pieces) > 1
    assert stream.result is not None and stream.result.token_ids == ids[:need]
    with pytest.raises(ValueError, match="tokenizer"):
        GenerationEngine(dense).generate(PROMPTS, greedy(4, stop_strings=("x",)))


def test_seeded_sampling_is_reproducible(dense) -> None:
    engine = GenerationEngine(dense)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0,
                            stop_token_ids=(), seed=7)
    a = [r.token_ids for r in engine.generate(PROMPTS, params)]
    b = [r.token_ids for r in engine.generate(PROMPTS, params)]
    c = [r.token_ids for r in engine.generate(PROMPTS, SamplingParams(
        max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(), seed=8))]
    assert a == b and a != c


def test_enable_yarn_rebuilds_rope_tables(dense) -> None:
    model = tiny_model()
    enable_yarn(model, max_position_embeddings=4096)
    ref = MiniMindForCausalLM(ModelConfig(**{**dense.config.to_dict(), "inference_rope_scaling": True,
                                             "rope_scaling": None, "max_position_embeddings": 4096}))
    assert model.config.max_position_embeddings == 4096 and model.config.rope_scaling["factor"] == 16
    assert torch.equal(model.model.rope_cos, ref.model.rope_cos)
    assert torch.equal(model.model.rope_sin, ref.model.rope_sin)
    assert "rope_cos" not in model.state_dict()  # still a non-persistent buffer
    assert dense.config.rope_scaling is None  # the original config object is untouched
    assert GenerationEngine(model).max_context == 4096


def test_think_splitter() -> None:
    sp = ThinkSplitter(thinking=True)
    out = sp.feed("plan</thi") + sp.feed("nk>\n\nanswer <thi") + sp.feed("nk>x") + sp.flush()
    assert out == [("think", "plan"), ("answer", "\n\nanswer "), ("think", "x")]


def test_load_prompts(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("hello\n\n world \n", encoding="utf-8")
    assert load_prompts(txt) == ["hello", "world"]
    jl = tmp_path / "p.jsonl"
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    jl.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"conversations": conv}) + "\n")
    assert load_prompts(jl) == ["hi", conv[:2]]
    jl.write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        load_prompts(jl)


@pytest.mark.parametrize("use_moe", [False, True])
def test_infer_model_config_from_state_dict(use_moe: bool) -> None:
    model = tiny_model(use_moe=use_moe)
    cfg = infer_model_config(model.state_dict(), "minimind-3")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "use_moe", "intermediate_size"):
        assert getattr(cfg, key) == getattr(model.config, key), key
    load_weights(MiniMindForCausalLM(cfg), model.state_dict())  # strict load succeeds


# ---- reference fixtures (skipped without ../shared) -------------------------------------------
def _compat_model(root: Path, variant: str) -> MiniMindForCausalLM:
    cfg = ModelConfig.from_dict(json.loads((root / variant / "config.json").read_text()))
    model = MiniMindForCausalLM(cfg)
    load_weights(model, read_state_dict(root / variant / "model.pth"))
    return model.eval()


@pytest.fixture(scope="module")
def compat(request) -> Path:
    root = Path(__file__).resolve().parents[1].parent / "shared" / "compat"
    if not (root / "manifest.json").is_file():
        pytest.skip("shared compat fixtures absent")
    return root


@pytest.mark.parametrize("variant", ["dense_tiny", "moe_tiny", "moe_top2_tiny", "dense_tiny_yarn"])
def test_reference_greedy_continuation(compat: Path, variant: str) -> None:
    manifest = json.loads((compat / "manifest.json").read_text())
    res = GenerationEngine(_compat_model(compat, variant)).generate(
        [manifest["input_ids"]], greedy(24))[0]
    assert res.token_ids == manifest["models"][variant]["greedy_continuation"]


def test_yarn_switch_reproduces_reference_yarn_model(compat: Path) -> None:
    manifest = json.loads((compat / "manifest.json").read_text())
    a = read_state_dict(compat / "dense_tiny" / "model.pth")
    b = read_state_dict(compat / "dense_tiny_yarn" / "model.pth")
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        pytest.skip("the two fixtures do not share weights")
    model = enable_yarn(_compat_model(compat, "dense_tiny"), max_position_embeddings=4096)
    res = GenerationEngine(model).generate([manifest["input_ids"]], greedy(24))[0]
    assert res.token_ids == manifest["models"]["dense_tiny_yarn"]["greedy_continuation"]


def test_stream_and_chat_with_reference_tokenizer(compat: Path) -> None:
    from minimind.tokenizer import MiniMindTokenizer

    tok = MiniMindTokenizer.from_dir(compat / "reference_tokenizer")
    engine = GenerationEngine(_compat_model(compat, "dense_tiny"), tokenizer=tok)
    manifest = json.loads((compat / "manifest.json").read_text())
    stream = engine.stream(manifest["input_ids"], greedy(24))
    text = "".join(stream)
    assert stream.result is not None
    assert text == stream.result.text == tok.decode(manifest["models"]["dense_tiny"]["greedy_continuation"])

    seen_messages: list[list[dict]] = []
    original = engine.chat_prompt_ids

    def spy(messages, tools=None, open_thinking=False):
        seen_messages.append(list(messages))
        return original(messages, tools, open_thinking)

    engine.chat_prompt_ids = spy  # type: ignore[method-assign]
    buf = io.StringIO()
    replies = run_chat(engine, tok, ["你好", "再说一遍", "/clear", "bye"], history=2,
                       open_thinking=True, params=SamplingParams(max_new_tokens=6, temperature=0.0),
                       console=Console(file=buf, width=100))
    assert len(replies) == 3 and all(r.completion_tokens <= 6 for r in replies)
    assert [len(m) for m in seen_messages] == [1, 3, 1]  # history kept, then cleared
    assert seen_messages[1][1] == {"role": "assistant", "content": replies[0].text}
    assert buf.getvalue().count("tokens/s") == 3
    raw = run_chat(engine, tok, ["hello"], raw=True, params=greedy(4), console=Console(file=buf))
    assert raw[0].prompt_tokens == len(tok.encode("<|im_start|>hello"))
