"""``minimind demo`` on the command line: its flags, ``--set FIELD=VALUE`` overrides of
:class:`~minimind.demo.settings.DemoSettings`, and ``--steps`` subsets of the pipeline."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from minimind.demo.pipeline import STEPS_BY_NAME, run_demo
from minimind.demo.settings import DemoSettings

__all__ = ["add_demo_arguments", "demo_main"]


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out_dir", default="out/demo")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (training precision)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain_steps", type=int, default=0, help="override the pretraining length")
    p.add_argument("--sft_epochs", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a DemoSettings field (VALUE parsed as JSON when it can be), for experiments")
    p.add_argument("--steps", default="", help="comma-separated subset of the steps to run on an existing "
                   f"--out_dir ({', '.join(STEPS_BY_NAME)}), e.g. dpo,task_eval")


def _override(s: DemoSettings, item: str) -> None:
    """Apply one ``--set FIELD=VALUE`` (the value as JSON when it parses, else as a string)."""
    name, sep, raw = item.partition("=")
    known = {f.name for f in fields(s)}
    if not sep or name not in known:
        raise SystemExit(f"--set wants FIELD=VALUE with FIELD one of {', '.join(sorted(known))}; got {item!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    setattr(s, name, tuple(value) if isinstance(value, list) else value)


def demo_main(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    s = DemoSettings.quick(out) if args.quick else DemoSettings(out_dir=out)
    s.device, s.seed = args.device, args.seed
    s.dtype = getattr(args, "dtype", "auto")
    if args.pretrain_steps:
        s.pretrain_steps = args.pretrain_steps
    if args.sft_epochs:
        s.sft_epochs = args.sft_epochs
    for item in getattr(args, "set", None) or []:
        _override(s, item)
    steps = None
    if args.steps:
        names = [n.strip() for n in args.steps.split(",") if n.strip()]
        unknown = [n for n in names if n not in STEPS_BY_NAME]
        if unknown:
            raise SystemExit(f"unknown demo steps {unknown}; known: {', '.join(STEPS_BY_NAME)}")
        steps = [STEPS_BY_NAME[n] for n in names]
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    run_demo(s, steps)
    return 0
