"""``minimind serve``: load a checkpoint and run the OpenAI-compatible server with uvicorn.

Loading reuses the helpers ``minimind chat`` uses (:func:`~minimind.model.weights.resolve_weight_path`,
:func:`~minimind.model.load_model`, the tokenizer search next to the weights, LoRA, YaRN, device and
dtype picking), composed once in :func:`load_for_inference` so both commands read a checkpoint the
same way. A Hugging Face folder (e.g. one written by ``minimind export hf``) is read with
:func:`~minimind.export.hf.read_hf_folder`.

Safe defaults on purpose: the server binds 127.0.0.1, answers only Host headers naming it (no DNS
rebinding), has no CORS, caps bodies, body time, completion lengths, completions per request and
the queue. Exposing it on a network (any non-loopback ``--host``) needs an API key; without one the
command refuses to start unless ``--allow_insecure_public`` says that is intended.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_serve_arguments", "add_serve_parser", "allowed_hosts_for", "check_exposure", "cmd_serve",
           "load_for_inference", "missing_package_hint"]

API_KEY_ENV = "MINIMIND_API_KEY"
#: Module name -> what to install when it is missing (the server's optional-at-runtime packages).
_INSTALL_HINTS = {
    "fastapi": "fastapi", "starlette": "fastapi", "pydantic": "fastapi", "uvicorn": "uvicorn",
    "h11": "uvicorn", "safetensors": "safetensors", "tokenizers": "tokenizers", "jinja2": "jinja2",
    "transformers": "transformers", "gguf": "gguf", "matplotlib": "matplotlib",
}
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def missing_package_hint(exc: ModuleNotFoundError, command: str = "minimind serve") -> str:
    """One line saying which package to install, instead of a traceback."""
    top = (exc.name or "").split(".")[0]
    package = _INSTALL_HINTS.get(top, top or "the missing package")
    return (f"{command} needs the Python package {package!r}, which is not installed: "
            f"pip install {package}   (or reinstall minimind: pip install -e .)")


def check_exposure(host: str, api_key: str | None, allow_insecure_public: bool) -> None:
    """Refuse a non-loopback bind without an API key (``ValueError`` naming the flags)."""
    from minimind.serve.middleware import is_loopback

    if is_loopback(host) or api_key or allow_insecure_public:
        return
    raise ValueError(f"--host {host} exposes the server beyond this machine, but no API key is set: anyone who "
                     f"can reach it could use it. Set --api_key (or ${API_KEY_ENV}), bind --host 127.0.0.1, or "
                     f"pass --allow_insecure_public if an open server is really intended")


def allowed_hosts_for(host: str, extra: list[str] | None) -> list[str]:
    """Host-header names the server answers: loopback names, the bound address, ``--allowed_hosts``.

    A wildcard bind (0.0.0.0, ::) is reached under names the server cannot know, so it answers any
    Host unless ``--allowed_hosts`` lists them (the API key guards it then).
    """
    from minimind.serve.middleware import LOOPBACK_HOSTS

    if host in _WILDCARD_HOSTS and not extra:
        return ["*"]
    names = [*LOOPBACK_HOSTS, *(extra or [])]
    if host not in _WILDCARD_HOSTS:
        names.append(host)
    return names


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``minimind serve``."""
    a = parser.add_argument
    a("--weight", "--model", dest="weight", required=True,
      help="weights file (.safetensors / reference .pth), a stage name (full_sft -> "
           "<save_dir>/full_sft_<H>.safetensors) or a Hugging Face model folder")
    a("--tokenizer", "--tokenizer_path", dest="tokenizer_path", default="",
      help="folder with tokenizer.json (default: the HF folder, else next to the weights, out/tokenizer, model/)")
    a("--save_dir", default="out", help="where stage names of --weight / --lora_weight are looked up")
    a("--lora_weight", "--lora", dest="lora_weight", default="", help="LoRA adapter file or stage name")
    a("--hidden_size", type=int, default=0, help="H of a stage-name --weight (0 = 768)")
    a("--use_moe", type=int, default=-1, choices=[-1, 0, 1], help="1 = a stage-name --weight ends in _moe")
    a("--num_hidden_layers", type=int, default=0, help=".pth without config only: override")
    a("--preset", default="minimind-3", help="shape defaults for .pth files without a config")
    a("--inference_rope_scaling", action="store_true", help="YaRN RoPE (2048 x 16 positions)")
    a("--model_name", default="", help="the model id clients see (default: the weights file's stem)")
    a("--host", default="127.0.0.1",
      help="bind address; a non-loopback one (e.g. 0.0.0.0) needs --api_key or --allow_insecure_public")
    a("--port", type=int, default=8998)
    a("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' on every route but /health and "
                                      f"the page (default: ${API_KEY_ENV}; none = open)")
    a("--allow_insecure_public", action="store_true",
      help="start on a non-loopback --host without an API key (anyone who reaches it can use it)")
    a("--allowed_hosts", nargs="*", default=None, metavar="NAME",
      help="extra names the Host header may carry (e.g. myserver.lan); loopback names and the bound "
           "address are always allowed; '*' allows any (default for 0.0.0.0)")
    a("--max_tokens_cap", type=int, default=4096, help="most completion tokens one request may ask for")
    a("--max_rows_per_request", type=int, default=256,
      help="most completions (prompts x n) one request may ask for; more gets 400")
    a("--max_queue", type=int, default=1024,
      help="most completions waiting for a slot, all requests together; more gets 429 with Retry-After")
    a("--max_body_bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    a("--body_timeout", type=float, default=30.0,
      help="seconds a request body may take to arrive (a short body holding the connection gets 408)")
    a("--max_context", type=int, default=0,
      help="positions per sequence, prompt + completion (0 = the model's max_position_embeddings)")
    a("--cors", nargs="*", default=None, metavar="ORIGIN",
      help="browser origins allowed to call the API, e.g. http://localhost:3000 (default: none)")
    a("--slots", type=int, default=8, help="sequences decoded together (continuous-batching slots)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    a("--quantize", default="", choices=["", "int8"],
      help="int8: int8 weight-only decode (the engine's own weight copy; faster CPU decode)")
    a("--compile", type=int, default=0, choices=[0, 1],
      help="1: torch.compile the decode step (~30-60 s first compile on a CPU, then 1.2-2x faster "
           "steps; on CUDA the step is replayed as a CUDA graph, 7x at one row on an H200)")
    a("--no_ui", action="store_true", help="do not serve the web UI at /")
    a("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on the top-level CLI's subparsers."""
    sp = subparsers.add_parser(
        "serve", help="OpenAI-compatible API server (+ web UI) for a checkpoint",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                    "/v1/completions, /v1/models) with continuous batching, plus a small web UI at /.")
    add_serve_arguments(sp)
    sp.set_defaults(func=cmd_serve)
    return sp


def load_for_inference(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """``(model, tokenizer, source path)`` from the checkpoint flags shared with ``minimind chat``."""
    from minimind.infer.loading import load_for_inference as load

    loaded = load(args.weight, tokenizer_path=args.tokenizer_path, save_dir=args.save_dir,
                  lora_weight=args.lora_weight, hidden_size=args.hidden_size, use_moe=args.use_moe,
                  num_hidden_layers=args.num_hidden_layers, preset=args.preset,
                  yarn=args.inference_rope_scaling)
    return loaded.model, loaded.tokenizer, loaded.source


def _check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in range, before the (slow) model load."""
    if args.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {args.slots}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for flag in ("max_tokens_cap", "max_rows_per_request", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0:
        raise ValueError(f"--max_queue must be >= 0, got {args.max_queue}")
    if not 0 < args.body_timeout < float("inf"):
        raise ValueError(f"--body_timeout must be a positive number of seconds, got {args.body_timeout}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the flags, load the model, start the engine thread and run uvicorn until Ctrl-C.

    A missing package ends with a one-line hint (exit 2), not a traceback."""
    try:
        return _serve(args)
    except ModuleNotFoundError as exc:
        raise ValueError(missing_package_hint(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    _check_flags(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key, args.allow_insecure_public)

    import uvicorn

    from minimind.infer.engine import GenerationEngine, compile_mode
    from minimind.infer.service import EngineService
    from minimind.serve.app import DEFAULT_STATIC_DIR, create_app
    from minimind.train.device import pick_device, pick_dtype

    model, tokenizer, source = load_for_inference(args)
    device = pick_device(args.device)
    engine = GenerationEngine(model, tokenizer, device=device, dtype=pick_dtype(device, args.dtype),
                              max_batch_len=args.max_context or None, num_slots=args.slots,
                              quantize=getattr(args, "quantize", "") or None,
                              compile=compile_mode(bool(getattr(args, "compile", 0)), device))
    name = args.model_name or (source.name if source.is_dir() else source.stem)
    service = EngineService(engine)
    try:
        app = create_app(service, name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                         max_tokens_cap=args.max_tokens_cap, max_rows_per_request=args.max_rows_per_request,
                         max_queue=args.max_queue, cors_origins=args.cors or None,
                         allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts),
                         body_timeout=args.body_timeout, static_dir=None if args.no_ui else DEFAULT_STATIC_DIR)
        print(f"serving {name} ({model.describe()}) on {device}, {args.slots} slots, context "
              f"{engine.max_context} at http://{args.host}:{args.port}/v1"
              f"{'' if api_key else ' (no API key)'}", file=sys.stderr)
        if not api_key and args.allow_insecure_public:
            print(f"warning: --allow_insecure_public: {args.host} serves without an API key", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        service.close()
    return 0
