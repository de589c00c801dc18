"""MiniMindTokenizer: reference compatibility, training, save/load, HF interop, streaming."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from minimind.tokenizer import (
    ADDED_TOKENS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    MiniMindTokenizer,
    StreamDecoder,
    iter_texts_from_jsonl,
    train_tokenizer,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF_DIR = SHARED / "compat" / "reference_tokenizer"

MIXED = (
    "MiniMind 是一个小型语言模型 🚀🤖 — naïve café ümlaut.\n"
    "def square(x: int) -> int:\n    return x ** 2  # 平方\n\t{\"k\": [1, 2.5e-3]}\n"
    "日本語テキスト、한국어 텍스트 ✅ 👨‍👩‍👧 <think>推理</think>"
)
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "算术",
                                            "parameters": {"type": "object", "properties": {}}}}]
TOOL_MSGS = [
    {"role": "system", "content": "你是助手"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"name": "calc", "arguments": {"e": "2+2"}}]},
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "<think>easy</think>答案是 4。"},
]


@pytest.fixture(scope="module")
def ref_tok() -> MiniMindTokenizer:
    if not (REF_DIR / "tokenizer.json").is_file():
        pytest.skip("reference tokenizer fixture absent")
    return MiniMindTokenizer.from_dir(REF_DIR)


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(1234)
    zh = "我们今天学习语言模型的训练方法数据清洗分词器人工智能你好世界天气很好的问题回答"
    en = "the model learns tokens from data and we train small language models quickly".split()
    lines = []
    for i in range(n):
        zh_part = "".join(rng.choice(zh) for _ in range(rng.randint(4, 24)))
        en_part = " ".join(rng.choice(en) for _ in range(rng.randint(3, 10)))
        lines.append(f"{zh_part}，{en_part} {i}。\n")
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[MiniMindTokenizer, Path]:
    out = tmp_path_factory.mktemp("trained_tok")
    tok = train_tokenizer(_corpus(), out, vocab_size=600, show_progress=False)
    return tok, out


# ---------------------------------------------------------------------- reference tokenizer
def test_reference_loads(ref_tok: MiniMindTokenizer) -> None:
    assert ref_tok.vocab_size == len(ref_tok) == 6400
    assert (ref_tok.pad_id, ref_tok.bos_id, ref_tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert ref_tok.all_special_ids == list(range(21))
    for idx, (content, _) in enumerate(ADDED_TOKENS):
        assert ref_tok.token_to_id(content) == idx
    assert ref_tok.token_to_id("no-such-token-xyz") is None


@pytest.mark.parametrize(
    "text, ids",
    [
        ("<|im_start|>assistant\n", [1, 1388, 570, 811, 234]),
        ("<|im_end|>\n", [2, 234]),
        ("<think>\n\n</think>\n\n", [25, 234, 234, 26, 234, 234]),
        ("\n", [234]),
    ],
)
def test_reference_marker_ids(ref_tok: MiniMindTokenizer, text: str, ids: list[int]) -> None:
    assert ref_tok.encode(text) == ids


def test_skip_special_tokens_keeps_think_and_tool_call(ref_tok: MiniMindTokenizer) -> None:
    text = "<|im_start|>assistant\n<think>r</think><tool_call>x</tool_call><|im_end|><|endoftext|>"
    ids = ref_tok.encode(text)
    assert ref_tok.decode(ids) == text
    assert ref_tok.decode(ids, skip_special_tokens=True) == (
        "assistant\n<think>r</think><tool_call>x</tool_call>"
    )


def test_round_trip_and_batch(ref_tok: MiniMindTokenizer) -> None:
    texts = [MIXED, "", "  leading and trailing  ", "\n\n\r\n", "😀" * 5]
    batch = ref_tok.encode_batch(texts)
    assert batch == [ref_tok.encode(t) for t in texts]
    for t, ids in zip(texts, batch):
        assert ref_tok.decode(ids) == t
    assert ref_tok.decode_batch(batch) == texts


def test_reference_save_reproduces_config_and_hash(
    ref_tok: MiniMindTokenizer, tmp_path: Path
) -> None:
    ref_tok.save(tmp_path)
    saved_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    ref_cfg = json.loads((REF_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved_cfg == ref_cfg
    reloaded = MiniMindTokenizer.from_dir(tmp_path)
    assert reloaded.hash == ref_tok.hash and len(ref_tok.hash) == 16
    assert reloaded.encode(MIXED) == ref_tok.encode(MIXED)


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        MiniMindTokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        MiniMindTokenizer.from_dir(tmp_path)


def test_stream_decoder_matches_full_decode(ref_tok: MiniMindTokenizer) -> None:
    text = "流式解码测试：你好世界🌏🎉，emoji 👍 混合 English。"
    ids = ref_tok.encode(text)
    dec = StreamDecoder(ref_tok)
    pieces = [dec.put(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == ref_tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # Multi-byte characters span several tokens here, so some calls must have buffered.
    assert "" in pieces[:-1]
    assert dec.pending == 0 and dec.flush() == ""


def test_stream_decoder_flushes_incomplete_bytes(ref_tok: MiniMindTokenizer) -> None:
    ids = ref_tok.encode("🎉")
    assert len(ids) > 1  # a 4-byte emoji is not a single token in a 6400 vocab
    dec = StreamDecoder(ref_tok)
    assert dec.put(ids[0]) == ""
    assert dec.flush().endswith("\ufffd")


# ---------------------------------------------------------------------- training
def test_trained_layout_and_flags(trained: tuple[MiniMindTokenizer, Path]) -> None:
    tok, out = trained
    assert 292 < tok.vocab_size <= 600
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert [(a["id"], a["content"], a["special"]) for a in data["added_tokens"]] == [
        (i, c, s) for i, (c, s) in enumerate(ADDED_TOKENS)
    ]
    assert data["normalizer"] is None and data["post_processor"] is None
    assert data["pre_tokenizer"]["pretokenizers"][0]["type"] == "Split"
    assert tok.all_special_ids == list(range(21))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    # The 256 byte symbols follow the added tokens, then merges.
    assert tok.id_to_token(36) is not None and len(tok.id_to_token(36)) == 1
    assert tok.encode("<|im_end|>\n")[0] == 2


def test_trained_round_trip_and_reload(trained: tuple[MiniMindTokenizer, Path]) -> None:
    tok, out = trained
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert len(tok.encode("我们今天学习语言模型")) < len("我们今天学习语言模型".encode())  # merges learnt
    reloaded = MiniMindTokenizer.from_dir(out)
    assert reloaded.encode(MIXED) == ids
    assert reloaded.hash == tok.hash
    assert tok.decode(tok.encode("<think>x</think><|im_end|>"), skip_special_tokens=True) == (
        "<think>x</think>"
    )


def test_trained_stream_decoder(trained: tuple[MiniMindTokenizer, Path]) -> None:
    tok, _ = trained
    ids = tok.encode(MIXED)
    dec = StreamDecoder(tok)
    assert dec.put_many(ids) + dec.flush() == MIXED


def test_transformers_autotokenizer_agrees(trained: tuple[MiniMindTokenizer, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    tok, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf(MIXED, add_special_tokens=False)["input_ids"] == tok.encode(MIXED)
    hf_text = hf.apply_chat_template(TOOL_MSGS, tools=TOOLS, tokenize=False,
                                     add_generation_prompt=True, open_thinking=True)
    ours = tok.apply_chat_template(TOOL_MSGS, tools=TOOLS, add_generation_prompt=True,
                                   open_thinking=True)
    assert hf_text == ours
    assert hf(hf_text, add_special_tokens=False)["input_ids"] == tok.apply_chat_template(
        TOOL_MSGS, tools=TOOLS, add_generation_prompt=True, open_thinking=True, tokenize=True
    )


def test_transformers_loads_resaved_reference(ref_tok: MiniMindTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(ref_tok.save(tmp_path)))
    assert hf(MIXED, add_special_tokens=False)["input_ids"] == ref_tok.encode(MIXED)


def test_train_rejects_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], tmp_path, vocab_size=200, show_progress=False)


# ---------------------------------------------------------------------- corpus reader
def test_iter_texts_from_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "mix.jsonl"
    rows = [
        json.dumps({"text": "pretrain 文本"}, ensure_ascii=False),
        json.dumps({"conversations": [{"role": "user", "content": "问"},
                                      {"role": "assistant", "content": ""},
                                      {"role": "assistant", "content": "答"}]},
                   ensure_ascii=False),
        "{not json",
        json.dumps({"other": 1}),
        "",
        json.dumps({"text": "last"}),
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="skipped 2 malformed"):
        assert list(iter_texts_from_jsonl(path)) == ["pretrain 文本", "问\n答", "last"]
    assert list(iter_texts_from_jsonl(path, max_lines=2)) == ["pretrain 文本", "问\n答"]
