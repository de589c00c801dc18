"""``minimind serve``: load a checkpoint and run the OpenAI-compatible server with uvicorn.

Loading reuses the helpers ``minimind chat`` uses (:func:`~minimind.model.weights.resolve_weight_path`,
:func:`~minimind.model.load_model`, the tokenizer search next to the weights, LoRA, YaRN, device and
dtype picking), composed once in :func:`load_for_inference` so both commands read a checkpoint the
same way. A Hugging Face folder (e.g. one written by ``minimind export hf``) is read with
:func:`~minimind.export.hf.read_hf_folder`.

Safe defaults on purpose: the server binds 127.0.0.1, has no CORS, caps bodies and completion
lengths; exposing it on a network is an explicit ``--host 0.0.0.0`` and should come with an API key.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_serve_arguments", "add_serve_parser", "cmd_serve", "load_for_inference"]

API_KEY_ENV = "MINIMIND_API_KEY"


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
    a("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server: set --api_key)")
    a("--port", type=int, default=8998)
    a("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 and /api "
                                      f"(default: ${API_KEY_ENV}; none = open)")
    a("--max_tokens_cap", type=int, default=4096, help="most completion tokens one request may ask for")
    a("--max_body_bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    a("--max_context", type=int, default=0,
      help="positions per sequence, prompt + completion (0 = the model's max_position_embeddings)")
    a("--cors", nargs="*", default=None, metavar="ORIGIN",
      help="browser origins allowed to call the API, e.g. http://localhost:3000 (default: none)")
    a("--slots", type=int, default=8, help="sequences decoded together (continuous-batching slots)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
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


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine thread and run uvicorn until Ctrl-C."""
    import uvicorn

    from minimind.infer.engine import GenerationEngine
    from minimind.infer.service import EngineService
    from minimind.serve.app import DEFAULT_STATIC_DIR, create_app
    from minimind.train.device import pick_device, pick_dtype

    if args.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {args.slots}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    model, tokenizer, source = load_for_inference(args)
    device = pick_device(args.device)
    engine = GenerationEngine(model, tokenizer, device=device, dtype=pick_dtype(device, args.dtype),
                              max_batch_len=args.max_context or None, num_slots=args.slots)
    name = args.model_name or (source.name if source.is_dir() else source.stem)
    service = EngineService(engine)
    try:
        app = create_app(service, name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                         max_tokens_cap=args.max_tokens_cap, cors_origins=args.cors or None,
                         static_dir=None if args.no_ui else DEFAULT_STATIC_DIR)
        exposed = args.host not in ("127.0.0.1", "localhost", "::1")
        print(f"serving {name} ({model.describe()}) on {device}, {args.slots} slots, context "
              f"{engine.max_context} at http://{args.host}:{args.port}/v1"
              f"{'' if api_key else ' (no API key)'}", file=sys.stderr)
        if exposed and not api_key:
            print(f"warning: --host {args.host} exposes an unauthenticated server; set --api_key or "
                  f"${API_KEY_ENV}", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        service.close()
    return 0
