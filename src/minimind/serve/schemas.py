"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Why strict models: the reference server took any JSON and silently ignored what it did not know
(``stop``, ``n``, a negative temperature...). Here every field the server acts on is typed and
range-checked, so a bad request fails with a 400 that names the field instead of producing odd
output. Fields an OpenAI client may send but that do not apply (``user``, ``metadata``,
``response_format`` of type text, ``parallel_tool_calls``...) are accepted and ignored, so stock
clients keep working.

Extensions beyond the OpenAI API (also accepted by vLLM): ``top_k``, ``repetition_penalty``,
``ignore_eos``, ``chat_template_kwargs`` (``open_thinking`` / ``enable_thinking``) and a top-level
``open_thinking`` as the reference server had.

Ranges follow OpenAI where it sets one (temperature [0, 2], top_p (0, 1], penalties [-2, 2],
top_logprobs [0, 20], at most 16 stop strings...) and vLLM for its extensions; the repetition
penalty is [0.01, 10] because a penalty of 1e-38 turns a logit into ``inf`` (OpenAI has none).
Floats must be finite (JSON's ``NaN``/``Infinity`` extensions are refused). Every string anywhere in
a body must be valid Unicode: a lone surrogate (``"\ud800"``) is a 400, not a failure later in the
tokenizer or in encoding the response.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "FunctionSpec",
    "MessageToolCall",
    "NamedToolChoice",
    "StreamOptions",
    "ToolCallRequest",
    "ToolSpec",
]

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000
#: ``n`` above this is refused by the schema (the server's own limits, slots and rows per request,
#: are usually lower and are checked later with a message naming the flag).
MAX_N = 128
MAX_SEED = 2**63 - 1
#: How deep a body's JSON may nest before it is refused (the chat template walks tool schemas).
MAX_DEPTH = 64


def find_lone_surrogate(value: Any, path: str = "", depth: int = 0) -> str | None:
    """The location (``messages.0.content``) of the first string holding a lone surrogate, or None.

    Python's JSON decoder turns ``"\ud800"`` into a str that cannot be encoded as UTF-8, so any later
    step (the tokenizer, the response) would fail on it. Keys are checked too. Raises ``ValueError``
    for JSON nested deeper than :data:`MAX_DEPTH`.
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"the request nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        # The location is quoted in the error message, so the key is written with \\udXXX escapes.
        name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
        where = f"{path}.{name}" if path else name
        if isinstance(key, str) and find_lone_surrogate(key, where, depth + 1):
            return where
        found = find_lone_surrogate(item, where, depth + 1)
        if found:
            return found
    return None


class _Lenient(BaseModel):
    """Unknown fields are ignored: OpenAI SDKs send fields this server has no use for."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Body(_Lenient):
    """A whole request body: refuses lone surrogates and absurd nesting anywhere in it."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where}: the text holds a lone surrogate (invalid Unicode)")
        return data


class TextPart(_Lenient):
    """A ``{"type": "text", "text": ...}`` content part (the only kind a text model can read)."""

    type: Literal["text"]
    text: str


class FunctionCallIn(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    # The template inserts a string verbatim and serialises an object, so both are accepted.
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(_Lenient):
    """A call inside an earlier assistant message, in OpenAI form."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Lenient):
    """One message; ``developer`` is treated as ``system`` (what newer OpenAI clients send)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role != "assistant" and self.tool_calls:
            raise ValueError("only assistant messages may carry 'tool_calls'")
        return self

    def text(self) -> str:
        """The content as one string (text parts concatenated, missing content as "")."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionSpec(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by both completion endpoints."""

    model: str | None = Field(default=None, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1, description="extension; 0 or -1 = off")
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0, description="extension; 1 = off")
    # Accepted for compatibility and range-checked, but not applied (see the README).
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    ignore_eos: bool = Field(default=False, description="extension: keep going past <|im_end|> (benchmarks)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        values = [value] if isinstance(value, str) else value or []
        if len(values) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        if any(not s for s in values):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in values):
            raise ValueError(f"stop strings may be at most {MAX_STOP_CHARS} characters long")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    open_thinking: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, "
                                 f"which is not in 'tools'")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs 'tools'")
        return self

    def thinking(self) -> bool:
        """Thinking is on if any of the reference server's three switches is set."""
        kwargs = self.chat_template_kwargs or {}
        return bool(self.open_thinking or kwargs.get("open_thinking") or kwargs.get("enable_thinking"))

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (the legacy text endpoint): raw prompts, no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this model")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each one a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ToolCallRequest(_Body):
    """``POST /api/tools/call``: run one built-in tool (for the web UI)."""

    name: str = Field(min_length=1, max_length=256)
    arguments: dict[str, Any] | str | None = None
