"""MiniMind tokenizer: byte-level BPE with 36 added tokens, the chat template, and training."""

from .chat_template import CHAT_TEMPLATE, render_chat
from .special_tokens import ADDED_TOKENS, BOS_ID, EOS_ID, PAD_ID
from .streaming import StreamDecoder
from .tokenizer import MiniMindTokenizer
from .train import iter_texts_from_jsonl, train_tokenizer

__all__ = [
    "MiniMindTokenizer",
    "StreamDecoder",
    "train_tokenizer",
    "iter_texts_from_jsonl",
    "render_chat",
    "CHAT_TEMPLATE",
    "ADDED_TOKENS",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
]
