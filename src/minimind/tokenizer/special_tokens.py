"""The 36 added tokens of the MiniMind vocabulary, in id order.

These are compatibility data: published MiniMind checkpoints assume these exact ids, so the order
and the ``special`` flags must never change. The flag matters at decode time:
``decode(..., skip_special_tokens=True)`` drops only tokens flagged special, and the reasoning /
tool-call parsers in serving and RL rely on ``<think>``, ``<tool_call>`` and friends *surviving*
that call, which is why ids 21-35 are added tokens (matched atomically) but not special.
"""

from __future__ import annotations

PAD_TOKEN: str = "<|endoftext|>"
BOS_TOKEN: str = "<|im_start|>"
EOS_TOKEN: str = "<|im_end|>"
#: The reference uses the padding token as the unknown token too (byte-level BPE never needs it).
UNK_TOKEN: str = PAD_TOKEN

PAD_ID: int = 0
BOS_ID: int = 1
EOS_ID: int = 2

#: ``(content, special)`` for ids 0..35.
ADDED_TOKENS: list[tuple[str, bool]] = [
    (PAD_TOKEN, True),  # 0  pad / unk
    (BOS_TOKEN, True),  # 1  bos
    (EOS_TOKEN, True),  # 2  eos
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<|audio_pad|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),  # 20
    # Structural markers: atomic tokens, but kept by skip_special_tokens=True.
    ("<tool_call>", False),  # 21
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),  # 25
    ("</think>", False),  # 26
    *[(f"<|buffer{i}|>", False) for i in range(1, 10)],  # 27..35, reserved for future use
]

#: Contents of the tokens flagged special (ids 0..20).
SPECIAL_TOKEN_STRINGS: list[str] = [tok for tok, special in ADDED_TOKENS if special]

#: ``additional_special_tokens`` as the reference tokenizer_config writes it: ids 1..20
#: (``<|endoftext|>`` is excluded because it is already registered as pad/unk).
ADDITIONAL_SPECIAL_TOKENS: list[str] = [tok for tok, _ in ADDED_TOKENS[1:21]]

#: Multimodal alias fields the reference tokenizer_config.json carries (unused by text models,
#: kept so that downstream multimodal loaders find the names they expect).
MULTIMODAL_ALIASES: dict[str, str] = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

assert len(ADDED_TOKENS) == 36, "MiniMind reserves exactly 36 added-token ids"
assert ADDED_TOKENS[PAD_ID][0] == PAD_TOKEN
assert ADDED_TOKENS[BOS_ID][0] == BOS_TOKEN
assert ADDED_TOKENS[EOS_ID][0] == EOS_TOKEN
