"""The GGUF export run by llama.cpp itself (llama-cpp-python, built from source in a separate CI step):
same token ids as our tokenizer on mixed CJK / digits / whitespace / special-token text, the same
logits, and the same greedy continuation, for a dense and a MoE (top-2) model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minimind.config import ModelConfig
from minimind.export.gguf import export_gguf
from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams
from minimind.tokenizer import train_tokenizer
from tests.test_model_numerics import random_model

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

TEXTS = ["Hello, world! 123 4567 and 89.5%", "我们喜欢学习模型，2024年1月1日是星期一。",
         "  leading spaces\tand tabs\n\nnew lines  ", "<|im_start|>user\n你好<|im_end|>\n<think>\n\n</think>",
         "mixed中文English123数字 x=1+2*3", "def f(x):\n    return x ** 2  # 平方\n"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS * 30, tmp_path_factory.mktemp("tok"), vocab_size=400, show_progress=False)


def _llama(path):
    # f32 KV cache: llama.cpp keeps keys and values in f16 by default (a ~1e-3 relative logit difference)
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def test_llamacpp_tokenizes_like_us(tok, tmp_path):
    model = random_model(ModelConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=tok.vocab_size,
                                     max_position_embeddings=256))
    llm = _llama(export_gguf(model, tmp_path / "m.gguf", tok, dtype="f32"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe_top2"])
def test_llamacpp_logits_and_greedy_equal_ours(tok, tmp_path, moe):
    cfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=tok.vocab_size, max_position_embeddings=256, use_moe=moe, num_experts=4,
                      num_experts_per_tok=2)
    model = random_model(cfg, seed=3)
    llm = _llama(export_gguf(model, tmp_path / "m.gguf", tok, dtype="f32"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "3+4=? 我们"}], add_generation_prompt=True,
                                     tokenize=True)
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[: len(prompt)])
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0].numpy()
    diff = float(np.abs(theirs - ours).max())
    print(f"llama.cpp vs ours: max |logit diff| {diff:.2e} of max |logit| {float(np.abs(ours).max()):.1f}")
    assert diff <= 1e-4 * float(np.abs(ours).max()) + 1e-4, diff

    engine = GenerationEngine(model, tok, device=torch.device("cpu"), dtype=torch.float32)
    want = engine.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=()))[0]
    llm.reset()
    got: list[int] = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(t)
        if len(got) == len(want.token_ids):
            break
    assert got == want.token_ids
