"""``MiniMindTokenizer``: a thin, dependency-light wrapper around a ``tokenizers.Tokenizer``.

Why not ``transformers.PreTrainedTokenizerFast``: the training and inference code only needs
encode / decode / chat rendering, and the Rust tokenizer plus our Jinja renderer give exactly the
same ids and text (proved against the reference fixtures in the tests) without importing
``transformers``. ``save()`` still writes a folder that ``AutoTokenizer.from_pretrained`` loads, so
exported checkpoints stay usable by the HF ecosystem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer

from .chat_template import CHAT_TEMPLATE, render_chat
from .special_tokens import (
    ADDITIONAL_SPECIAL_TOKENS,
    BOS_TOKEN,
    EOS_TOKEN,
    MULTIMODAL_ALIASES,
    PAD_TOKEN,
    UNK_TOKEN,
)

__all__ = ["MiniMindTokenizer", "TOKENIZER_FILE", "CONFIG_FILE"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
#: transformers >= 4.43 may save the template in its own file instead of tokenizer_config.json.
TEMPLATE_FILE = "chat_template.jinja"
MODEL_MAX_LENGTH = 131072


def _template_from_config(config: Mapping[str, Any]) -> str | None:
    """Extract the chat template from a tokenizer_config dict (string or HF's named-list form)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


class MiniMindTokenizer:
    """Byte-level BPE tokenizer with MiniMind's added tokens and chat template.

    Nothing is added automatically: ``encode`` never inserts BOS/EOS (the data pipeline decides),
    while added-token strings such as ``<|im_start|>`` that occur in the text are always matched
    atomically to their ids, which is what chat-formatted training data requires.
    """

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None) -> None:
        self._tok = tokenizer
        self._chat_template = chat_template or CHAT_TEMPLATE
        self._hash: str | None = None
        ids = {name: tokenizer.token_to_id(tok) for name, tok in
               (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN))}
        missing = [name for name, idx in ids.items() if idx is None]
        if missing:
            raise ValueError(f"tokenizer lacks the MiniMind {'/'.join(missing)} token(s)")
        self._bos_id: int = ids["bos"]  # type: ignore[assignment]
        self._eos_id: int = ids["eos"]  # type: ignore[assignment]
        self._pad_id: int = ids["pad"]  # type: ignore[assignment]
        # Only tokens flagged special are dropped by skip_special_tokens; <think> etc. are not.
        decoder = tokenizer.get_added_tokens_decoder()
        self._special_ids: list[int] = sorted(i for i, t in decoder.items() if t.special)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_dir(cls, path: str | Path) -> "MiniMindTokenizer":
        """Load ``tokenizer.json`` (and the chat template, if any) from a tokenizer folder.

        The template is taken from ``chat_template.jinja`` if present (newer HF layout), else from
        ``tokenizer_config.json``'s ``chat_template``, else the built-in :data:`CHAT_TEMPLATE`.
        A path to the ``tokenizer.json`` file itself is accepted too.
        """
        path = Path(path)
        if path.is_file() and path.name == TOKENIZER_FILE:
            path = path.parent
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        json_path = path / TOKENIZER_FILE
        if not json_path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in tokenizer folder {path}")
        try:
            tokenizer = Tokenizer.from_file(str(json_path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception for any parse error
            raise ValueError(f"{json_path} is not a readable tokenizer file ({e}); re-copy it or train one "
                             f"with `minimind tokenizer train`") from None

        template: str | None = None
        config_path = path / CONFIG_FILE
        if config_path.is_file():
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path} is not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
            template = _template_from_config(config)
        jinja_path = path / TEMPLATE_FILE
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8") or template
        return cls(tokenizer, chat_template=template)

    def tokenizer_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` content, laid out as the reference (and HF) write it."""
        added = self._tok.get_added_tokens_decoder()
        added_tokens_decoder = {
            str(idx): {
                "content": tok.content,
                "lstrip": tok.lstrip,
                "normalized": tok.normalized,
                "rstrip": tok.rstrip,
                "single_word": tok.single_word,
                "special": tok.special,
            }
            for idx, tok in sorted(added.items())
        }
        config: dict[str, Any] = {
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
            "bos_token": BOS_TOKEN,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS_TOKEN,
            "legacy": True,
            "model_max_length": MODEL_MAX_LENGTH,
            "pad_token": PAD_TOKEN,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "unk_token": UNK_TOKEN,
            **MULTIMODAL_ALIASES,
            "chat_template": self._chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        return config

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``path`` (created)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / TOKENIZER_FILE), pretty=True)
        with open(path / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(self.tokenizer_config(), f, ensure_ascii=False, indent=4)
            f.write("\n")
        return path

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, added-token strings map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts with the Rust batch encoder (multi-threaded, much faster)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. ``skip_special_tokens`` drops ids 0-20 but keeps <think>/<tool_call>."""
        return self._tok.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )

    def decode_batch(
        self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        """Decode several id sequences at once."""
        return self._tok.decode_batch(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special_tokens
        )

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary or added token string, ``None`` if absent."""
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        """Vocabulary string (byte-level symbols for BPE pieces) of ``idx``."""
        return self._tok.id_to_token(int(idx))

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render messages with this tokenizer's template; ids instead of text if ``tokenize``.

        Mirrors HF's signature for the common arguments; template kwargs such as
        ``open_thinking=True`` pass through.
        """
        text = render_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            template=self._chat_template,
            **kwargs,
        )
        return self.encode(text) if tokenize else text

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (for exporters that need the raw model)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (6400 for the reference tokenizer)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_token(self) -> str:
        return BOS_TOKEN

    @property
    def eos_token(self) -> str:
        return EOS_TOKEN

    @property
    def pad_token(self) -> str:
        return PAD_TOKEN

    @property
    def chat_template(self) -> str:
        return self._chat_template

    @property
    def all_special_ids(self) -> list[int]:
        """Ids flagged ``special`` (0-20 for MiniMind), sorted."""
        return list(self._special_ids)

    @property
    def hash(self) -> str:
        """Short, stable fingerprint of the tokenizer (16 hex chars of a sha256).

        Data caches of token ids are keyed on it, so it must change whenever the ids could and
        must not change with incidental formatting: the tokenizer.json content is re-serialised
        canonically (sorted keys, compact) before hashing, making a loaded file, its re-saved copy
        and an in-memory tokenizer agree.
        """
        if self._hash is None:
            canonical = json.dumps(
                json.loads(self._tok.to_str()),
                sort_keys=True,
                ensure_ascii=False,
                separators=(",", ":"),
            )
            self._hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        return self._hash

    def __repr__(self) -> str:
        return f"MiniMindTokenizer(vocab_size={self.vocab_size}, hash={self.hash})"
