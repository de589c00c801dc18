"""Data pipeline: JSONL reading and validation, tokenisation to on-disk shards, packing into batches.

Flow: ``iter_jsonl`` / ``formats`` validate records -> ``prepare_shards`` tokenises them once into
memory-mapped ``ids.bin`` / ``mask.bin`` / ``offsets.npy`` -> ``PackedDataset`` packs documents into
fixed ``[B, T]`` rows and serves deterministic :class:`Batch` objects by ``(epoch, row indices)``.
"""

from .batch import IGNORE_INDEX, Batch
from .formats import chat_messages, dpo_pair, pretrain_text, sft_conversation
from .jsonl import DataFormatError, SkipStats, iter_jsonl, parse_jsonl_line
from .packing import PackedDataset, PackPlan, pack_rows
from .sft import SYSTEM_PROMPTS, MaskMarkers, assistant_mask, render_sft_text, tokenize_conversation
from .shards import ShardInfo, load_or_prepare_shards, prepare_shards
from .store import ShardReader, ShardWriter, read_meta, write_docs

__all__ = [
    "Batch", "IGNORE_INDEX",
    "DataFormatError", "SkipStats", "iter_jsonl", "parse_jsonl_line",
    "pretrain_text", "sft_conversation", "dpo_pair", "chat_messages",
    "SYSTEM_PROMPTS", "MaskMarkers", "assistant_mask", "render_sft_text", "tokenize_conversation",
    "ShardInfo", "ShardReader", "ShardWriter", "prepare_shards", "load_or_prepare_shards",
    "read_meta", "write_docs",
    "PackPlan", "PackedDataset", "pack_rows",
]
