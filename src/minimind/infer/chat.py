"""``minimind chat``: talk to a checkpoint in the terminal, interactively or from a prompts file.

Behaves like the reference ``eval_llm.py`` (chat template with ``open_thinking``, ``--historys``
messages of context, a raw ``<|im_start|>`` + text prompt for pretrained weights, tokens/s after
each reply) on top of :class:`GenerationEngine`.  Differences on purpose: the reference's
``'model' in path`` heuristic is replaced by an explicit weights file whose shape is read from the
file itself, fp32 is kept on CPUs (the reference forced ``.half()`` everywhere), and reasoning
inside ``<think>...</think>`` is shown dimmed so it is not mistaken for the answer.  Reference habits
that still work: ``--weight full_sft`` (a stage name, resolved in ``--save_dir``) and
``--lora_weight lora_medical``.  Ctrl-C stops the reply being streamed and returns to the prompt
with the history kept; Ctrl-C at the prompt quits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from minimind.infer.engine import GenerationEngine, GenerationResult, compile_mode
from minimind.infer.sampling import SamplingParams
from minimind.model.weights import infer_model_config  # noqa: F401  (re-export)

Prompt = str | list[dict[str, Any]]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Split streamed text into ``("think", s)`` and ``("answer", s)`` segments.

    The tags are single tokens, but a stream decoder can hand them over glued to other text, so
    the splitter searches inside pieces and holds back a trailing partial tag.
    """

    def __init__(self, thinking: bool = False) -> None:
        self.thinking = thinking
        self._buf = ""

    def _kind(self) -> str:
        return "think" if self.thinking else "answer"

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            i = self._buf.find(tag)
            if i < 0:
                break
            if i:
                out.append((self._kind(), self._buf[:i]))
            self._buf = self._buf[i + len(tag):]
            self.thinking = not self.thinking
        tag = THINK_CLOSE if self.thinking else THINK_OPEN
        hold = next((k for k in range(min(len(tag) - 1, len(self._buf)), 0, -1)
                     if tag.startswith(self._buf[-k:])), 0)
        ready, self._buf = self._buf[:len(self._buf) - hold], self._buf[len(self._buf) - hold:]
        if ready:
            out.append((self._kind(), ready))
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self._buf = self._buf, ""
        return [(self._kind(), rest)] if rest else []


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a text file (one per line) or JSONL (``{"prompt": ...}`` or
    ``{"conversations": [...]}`` rows; a conversation is cut after its last user turn so the
    model answers it, with earlier turns as context)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return [ln.strip() for ln in lines]
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("conversations"), list):
            conv = row["conversations"]
            users = [i for i, m in enumerate(conv) if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise ValueError(f"{path}:{n}: conversation has no user turn")
            prompts.append([dict(m) for m in conv[:users[-1] + 1]])
        else:
            raise ValueError(f'{path}:{n}: expected a "prompt" string or a "conversations" list')
    return prompts


def _interactive(console: Console, input_fn: Callable[[str], str]) -> Iterable[str]:
    """Typed prompts until ``/exit``, Ctrl-D or Ctrl-C.  An empty line is ignored: a stray Enter
    must not end the session and lose the conversation."""
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if line.strip() == "/exit":
            return
        if line.strip():
            yield line


def run_chat(engine: GenerationEngine, tokenizer: Any, prompts: Sequence[Prompt] | None = None,
             history: int = 0, open_thinking: bool = False, params: SamplingParams | None = None,
             raw: bool = False, console: Console | None = None,
             input_fn: Callable[[str], str] = input) -> list[GenerationResult]:
    """Chat loop: interactive when ``prompts`` is None (``/exit``, Ctrl-D or Ctrl-C quits,
    ``/clear`` drops the history), else the scripted prompts in order.  Returns the replies.

    ``history`` = number of past messages (user and assistant) sent as context; 0 = stateless.
    ``raw`` = pretrained-model mode: no template, the prompt is ``<|im_start|>`` + text.

    Ctrl-C during a reply ends that reply only (``finish_reason == "interrupted"``); its partial
    text enters the history like a full reply, so the conversation goes on where the user cut it.
    With scripted prompts there is no prompt to return to, so the remaining prompts are dropped.
    """
    console = console or Console(highlight=False)
    params = params or SamplingParams()
    scripted = prompts is not None
    source: Iterable[Prompt] = prompts if scripted else _interactive(console, input_fn)
    past: list[dict[str, Any]] = []
    replies: list[GenerationResult] = []
    for prompt in source:
        if isinstance(prompt, str) and prompt.strip() == "/clear":
            past.clear()
            console.print("(history cleared)", style="dim")
            continue
        user_text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
        if scripted:
            console.print(f"> {user_text}", markup=False, highlight=False)
        if raw:
            ids = tokenizer.encode(tokenizer.decode([tokenizer.bos_id]) + user_text)
            thinking = False
        else:
            if isinstance(prompt, str):
                context = past[-history:] if history > 0 else []
                messages = context + [{"role": "user", "content": prompt}]
            else:
                messages = list(prompt)
            ids = engine.chat_prompt_ids(messages, open_thinking=open_thinking)
            # The generation prompt opens a think block when open_thinking is on.
            thinking = tokenizer.decode(ids[-4:]).rstrip().endswith(THINK_OPEN)
        result = _stream_reply(engine, ids, params, thinking, console)
        replies.append(result)
        if not raw and isinstance(prompt, str):
            past += [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": result.text or ""}]
        if scripted and result.finish_reason == "interrupted":
            console.print("(stopped: remaining prompts skipped)", style="dim")
            break
    return replies


def _interrupted_result(engine: GenerationEngine, ids: list[int], text: str,
                        n_pieces: int) -> GenerationResult:
    """What the user saw of a reply cut by Ctrl-C.  The engine's own result is lost with its
    generator, so the token count is the shown text re-encoded (or the number of streamed pieces
    when the tokenizer cannot encode), close to but not exactly the sampled ids."""
    tok = getattr(engine, "tokenizer", None)
    token_ids = list(tok.encode(text)) if text and hasattr(tok, "encode") else []
    return GenerationResult(token_ids=token_ids, text=text,
                            finish_reason="interrupted",
                            prompt_tokens=len(ids),
                            completion_tokens=len(token_ids) if token_ids else n_pieces)


def _stream_reply(engine: GenerationEngine, ids: list[int], params: SamplingParams, thinking: bool,
                  console: Console) -> GenerationResult:
    """Print one reply as it streams; Ctrl-C ends the reply (not the session)."""
    splitter = ThinkSplitter(thinking)
    start = time.perf_counter()
    pieces: list[str] = []

    def show(segments: list[tuple[str, str]]) -> None:
        for kind, text in segments:
            console.print(text, style="dim" if kind == "think" else None, end="", markup=False,
                          highlight=False, soft_wrap=True)

    stream = None
    try:
        stream = engine.stream(ids, params)
        for piece in stream:
            pieces.append(piece)
            show(splitter.feed(piece))
        result = stream.result
        assert result is not None
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()  # ends the generator: its KV cache is freed, the engine is reusable
        result = _interrupted_result(engine, ids, "".join(pieces), len(pieces))
    show(splitter.flush())
    elapsed = time.perf_counter() - start
    speed = result.completion_tokens / max(elapsed, 1e-9)
    console.print(f"\n[{result.completion_tokens} tokens, {speed:.1f} tokens/s, "
                  f"{result.finish_reason}]", style="dim", markup=False, highlight=False)
    return result


# ---- CLI -----------------------------------------------------------------------------------------
def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``minimind chat`` (reference ``eval_llm.py`` names where they exist)."""
    a = parser.add_argument
    a("--weight", default="",
      help="weights file (.safetensors with its config inside, or reference .pth), or a stage name: "
           "full_sft -> <save_dir>/full_sft_<hidden_size>[_moe].safetensors (then .pth)")
    a("--save_dir", default="out", help="where stage names of --weight / --lora_weight are looked up")
    a("--lora_weight", "--lora", dest="lora_weight", default="",
      help="LoRA adapter file or stage name (lora_medical -> <save_dir>/lora_medical_<H>[_moe]...); "
           "none = no adapter")
    a("--tokenizer_path", default="",
      help="folder with tokenizer.json (default: next to the weights, then out/tokenizer, model/)")
    a("--prompts", default="", help="text file (one prompt per line) or JSONL; default interactive")
    a("--historys", type=int, default=0, help="past messages kept as context (0 = stateless)")
    a("--open_thinking", type=int, default=0, choices=[0, 1], help="open a <think> block")
    a("--max_new_tokens", type=int, default=8192)
    a("--temperature", type=float, default=0.85, help="0 = greedy")
    a("--top_p", type=float, default=0.95)
    a("--top_k", type=int, default=50, help="0 = disabled")
    a("--repetition_penalty", type=float, default=1.0)
    a("--inference_rope_scaling", action="store_true", help="YaRN RoPE (2048 x 16 positions)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (auto: cuda, mps, cpu)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    a("--quantize", default="", choices=["", "int8"],
      help="int8: int8 weight-only decode (the engine's own weight copy; faster CPU decode)")
    a("--compile", type=int, default=0, choices=[0, 1],
      help="1: torch.compile the decode step (~30-60 s first compile on a CPU, then 1.2-2x faster "
           "steps; on CUDA the step is replayed as a CUDA graph, 7x at one row on an H200)")
    a("--raw", action="store_true",
      help="pretrained-model mode: no chat template (automatic for weights named pretrain*)")
    a("--seed", type=int, default=None, help="sampling seed (default: random)")
    a("--preset", default="minimind-3", help="shape defaults for .pth files without a config")
    a("--hidden_size", type=int, default=0,
      help="H of a stage-name --weight (0 = 768); for a bare .pth also overrides the shape")
    a("--num_hidden_layers", type=int, default=0, help=".pth only: override")
    a("--use_moe", type=int, default=-1, choices=[-1, 0, 1],
      help="1 = a stage-name --weight ends in _moe; for a bare .pth also overrides the shape")


def chat_main(args: argparse.Namespace) -> int:
    """Load weights + tokenizer from the flags and run :func:`run_chat`; Ctrl-C exits with 130."""
    try:
        return _chat_main(args)
    except KeyboardInterrupt:  # while loading, or at the prompt of a terminal without readline
        print(file=sys.stderr)
        return 130


def _chat_main(args: argparse.Namespace) -> int:
    from minimind.infer.loading import load_for_inference
    from minimind.train.device import pick_device, pick_dtype

    loaded = load_for_inference(
        args.weight, tokenizer_path=args.tokenizer_path, save_dir=getattr(args, "save_dir", "out"),
        lora_weight=getattr(args, "lora_weight", ""), hidden_size=args.hidden_size, use_moe=args.use_moe,
        num_hidden_layers=args.num_hidden_layers, preset=args.preset, yarn=args.inference_rope_scaling)
    model, tokenizer, weight = loaded.model, loaded.tokenizer, loaded.source
    lora_note = f" + LoRA {loaded.lora.name}" if loaded.lora else ""
    device = pick_device(args.device)
    engine = GenerationEngine(model, tokenizer, device=device, dtype=pick_dtype(device, args.dtype),
                              quantize=getattr(args, "quantize", "") or None,
                              compile=compile_mode(bool(getattr(args, "compile", 0)), device))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty,
                            stop_token_ids=(tokenizer.eos_id,), seed=args.seed)
    raw = bool(args.raw) or weight.name.startswith("pretrain")
    console = Console(highlight=False)
    console.print(f"{model.describe()} | {weight.name}{lora_note} on {device}"
                  f"{' | raw (pretrain) mode' if raw else ''}", style="dim", markup=False)
    prompts = load_prompts(args.prompts) if args.prompts else None
    if prompts is None:
        console.print("/exit or Ctrl-D quits, /clear resets the history, "
                      "Ctrl-C during a reply stops it", style="dim")
    run_chat(engine, tokenizer, prompts, history=args.historys, open_thinking=bool(args.open_thinking),
             params=params, raw=raw, console=console)
    return 0
