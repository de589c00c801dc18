"""``minimind chat``: Ctrl-C handling, reference-style stage names, LoRA flags, the shared loader."""

from __future__ import annotations

import argparse
import io
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from rich.console import Console

from minimind.config import ModelConfig
from minimind.infer.chat import add_chat_arguments, chat_main, run_chat
from minimind.infer.engine import GenerationEngine, GenerationResult, TextStream
from minimind.infer.sampling import SamplingParams
from minimind.model import MiniMindForCausalLM, export_reference_pth, save_weights
from minimind.tokenizer.train import train_tokenizer


# ---- a: Ctrl-C ----------------------------------------------------------------------------------
class FakeTokenizer:
    eos_id, bos_id, pad_id = 2, 1, 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f"[{int(i)}]" for i in ids)


class FakeEngine:
    """Scripted replies; a reply listed as ``None`` pieces is cut by Ctrl-C after two pieces."""

    tokenizer = None

    def __init__(self, replies: list[list[str] | None]) -> None:
        self.replies = list(replies)
        self.seen: list[list[dict[str, Any]]] = []
        self.closed = 0

    def chat_prompt_ids(self, messages, tools=None, open_thinking=False) -> list[int]:
        self.seen.append([dict(m) for m in messages])
        return [5, 6, 7]

    def stream(self, ids, params) -> TextStream:
        pieces = self.replies.pop(0)
        engine = self

        def gen() -> Iterator[str]:
            try:
                if pieces is None:
                    yield "Hel"
                    yield "lo"
                    raise KeyboardInterrupt  # the user pressed Ctrl-C during the forward pass
                yield from pieces
                text = "".join(pieces)
                return GenerationResult(token_ids=[9] * len(pieces), text=text, finish_reason="stop",
                                        prompt_tokens=len(ids), completion_tokens=len(pieces))
            finally:
                engine.closed += 1

        return TextStream(gen())


def test_ctrl_c_stops_the_reply_keeps_history_and_session() -> None:
    engine = FakeEngine([None, ["Fine", "."]])
    inputs = iter(["hi", "go on"])

    def input_fn(prompt: str) -> str:
        try:
            return next(inputs)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt: a clean exit

    buf = io.StringIO()
    replies = run_chat(engine, FakeTokenizer(), None, history=4, params=SamplingParams(),
                       console=Console(file=buf, width=100), input_fn=input_fn)
    assert [r.finish_reason for r in replies] == ["interrupted", "stop"]
    assert replies[0].text == "Hello" and replies[0].completion_tokens == 2
    assert engine.closed == 2
    # the second prompt ran with the partial reply in its history
    assert engine.seen[1] == [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "go on"}]
    out = buf.getvalue()
    assert "Hello" in out and "interrupted]" in out and "Fine." in out


def test_empty_line_keeps_the_session_and_its_history() -> None:
    """A stray Enter used to end the chat and lose the conversation; only /exit or Ctrl-D end it."""
    engine = FakeEngine([["A"], ["B"]])
    inputs = iter(["hi", "", "   ", "more"])

    def input_fn(prompt: str) -> str:
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    replies = run_chat(engine, FakeTokenizer(), None, history=4, params=SamplingParams(),
                       console=Console(file=io.StringIO()), input_fn=input_fn)
    assert [r.text for r in replies] == ["A", "B"]
    assert engine.seen[1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"},
                              {"role": "user", "content": "more"}]


def test_ctrl_c_in_scripted_mode_drops_the_rest() -> None:
    engine = FakeEngine([["a"], None, ["never"]])
    buf = io.StringIO()
    replies = run_chat(engine, FakeTokenizer(), ["one", "two", "three"], console=Console(file=buf))
    assert [r.finish_reason for r in replies] == ["stop", "interrupted"]
    assert len(engine.seen) == 2 and "remaining prompts skipped" in buf.getvalue()


# ---- the real engine after an interrupt, and chat_main end to end ----------------------------------
H = 64


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([f"hello world, a tiny corpus line {i}." for i in range(200)], out,
                    vocab_size=320, show_progress=False)
    return out


def tiny_model(**over) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=320, max_position_embeddings=64)
    cfg.update(over)
    return MiniMindForCausalLM(ModelConfig(**cfg)).eval()


def test_real_engine_survives_an_interrupted_stream(tok_dir: Path, monkeypatch) -> None:
    from minimind.tokenizer import MiniMindTokenizer

    tok = MiniMindTokenizer.from_dir(tok_dir)
    model = tiny_model()
    engine = GenerationEngine(model, tok)
    calls = {"n": 0}
    head = engine.model.lm_head  # the engine decodes through its own modules (the caller's weights)
    real_forward = head.forward

    def flaky_forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # prefill + two decode steps, then Ctrl-C
            raise KeyboardInterrupt
        return real_forward(*a, **k)

    monkeypatch.setattr(head, "forward", flaky_forward)
    greedy = SamplingParams(max_new_tokens=6, greedy=True, stop_token_ids=())
    buf = io.StringIO()
    replies = run_chat(engine, tok, ["hello", "world"], params=greedy, console=Console(file=buf))
    assert [r.finish_reason for r in replies] == ["interrupted"]
    assert calls["n"] == 4 and not model.training and not engine.model.training
    monkeypatch.setattr(head, "forward", real_forward)
    inputs = iter(["hello", "world"])
    replies = run_chat(engine, tok, None, params=greedy, history=2, console=Console(file=buf),
                       input_fn=lambda p: next(inputs, "/exit"))
    assert [r.finish_reason for r in replies] == ["length", "length"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    return parser.parse_args(list(argv))


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n", encoding="utf-8")
    return path


def test_stage_name_weight_and_lora(tmp_path: Path, tok_dir: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    save_weights(tiny_model(), out / f"full_sft_{H}.safetensors")
    calls: list[tuple[Any, Path]] = []
    fake_lora = types.ModuleType("minimind.model.lora")  # decoupled from the real adapter code

    def load_lora(model: MiniMindForCausalLM, path: str | Path, cfg: Any = None) -> None:
        calls.append((model, Path(path)))

    fake_lora.load_lora = load_lora  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "minimind.model.lora", fake_lora)
    common = ["--save_dir", str(out), "--hidden_size", str(H), "--tokenizer_path", str(tok_dir),
              "--prompts", str(_prompts(tmp_path)), "--max_new_tokens", "3", "--temperature", "0",
              "--device", "cpu"]
    assert chat_main(_args("--weight", "full_sft", *common)) == 0
    assert f"full_sft_{H}.safetensors" in capsys.readouterr().out
    assert calls == []  # no adapter asked for
    (out / f"lora_medical_{H}.pth").write_bytes(b"adapter")
    for flag, value in (("--lora_weight", "lora_medical"), ("--lora", str(out / f"lora_medical_{H}.pth"))):
        assert chat_main(_args("--weight", "full_sft", flag, value, *common)) == 0
        assert calls[-1][1] == out / f"lora_medical_{H}.pth"
        assert isinstance(calls[-1][0], MiniMindForCausalLM)
        assert f"LoRA lora_medical_{H}.pth" in capsys.readouterr().out
    assert chat_main(_args("--weight", "full_sft", "--lora_weight", "None", *common)) == 0
    assert len(calls) == 2


def test_missing_stage_name_lists_tried_paths(tmp_path: Path, capsys) -> None:
    from minimind.cli import main

    assert main(["chat", "--weight", "full_sft", "--save_dir", str(tmp_path), "--use_moe", "1"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "full_sft_768_moe.safetensors") in err
    assert str(tmp_path / "full_sft_768_moe.pth") in err


def test_bare_pth_uses_overrides_through_load_model(tmp_path: Path, tok_dir: Path, capsys) -> None:
    model = tiny_model(num_hidden_layers=3)
    path = export_reference_pth(model, tmp_path / "m.pth")
    path.with_suffix(".json").unlink()
    args = _args("--weight", str(path), "--tokenizer_path", str(tok_dir), "--prompts",
                 str(_prompts(tmp_path)), "--max_new_tokens", "2", "--device", "cpu",
                 "--num_hidden_layers", "2")
    # inferred config: one warning; the override reached the model: 3 stored layers do not fit 2
    with pytest.warns(UserWarning, match="assumed from preset"), \
            pytest.raises(ValueError, match="weights do not fit"):
        chat_main(args)
    args.num_hidden_layers = 0
    with pytest.warns(UserWarning, match="assumed from preset"):
        assert chat_main(args) == 0


@pytest.mark.parametrize("content", [b"not weights at all\n", b'{"hidden_size": 64}\n'])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".json"])
def test_non_weights_file_is_a_one_line_error(tmp_path: Path, capsys, content: bytes, suffix: str) -> None:
    from minimind.cli import main

    bad = tmp_path / f"x{suffix}"
    bad.write_bytes(content)
    assert main(["chat", "--weight", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not a weights file: ") and str(bad) in err
    assert len(err.splitlines()) == 1


def test_compile_and_quantize_flags_reach_the_engine(tmp_path: Path, tok_dir: Path, monkeypatch) -> None:
    """``--compile 1 --quantize int8`` build the engine with them (the default builds neither)."""
    import minimind.infer.chat as chat_mod

    out = tmp_path / "out"
    save_weights(tiny_model(), out / f"full_sft_{H}.safetensors")
    seen: list[dict[str, Any]] = []

    class Recording(GenerationEngine):
        def __init__(self, *a: Any, **kw: Any) -> None:
            seen.append(kw)
            super().__init__(*a, **{**kw, "compile": False})  # the flag is what is checked, not inductor

    monkeypatch.setattr(chat_mod, "GenerationEngine", Recording)
    common = ["--weight", "full_sft", "--save_dir", str(out), "--hidden_size", str(H), "--tokenizer_path",
              str(tok_dir), "--prompts", str(_prompts(tmp_path)), "--max_new_tokens", "2", "--device", "cpu"]
    assert chat_main(_args(*common)) == 0
    assert chat_main(_args(*common, "--compile", "1", "--quantize", "int8")) == 0
    assert (seen[0]["compile"], seen[0]["quantize"]) == (False, None)
    assert (seen[1]["compile"], seen[1]["quantize"]) == (True, "int8")
