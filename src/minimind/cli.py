"""The ``minimind`` command.  Thin: flags -> config dataclass -> stage function.

Training flags are generated from :class:`minimind.config.TrainConfig` fields, so they keep the
reference names (``--batch_size``, ``--learning_rate``, ``--max_seq_len``, ``--from_resume`` ...).
Precedence: dataclass defaults < stage defaults < ``--config file.toml|.json`` < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from minimind.config import PRESETS, TrainConfig

_HELP = {
    "data_path": "JSONL file in the reference format of the stage",
    "tokenizer_path": "folder with tokenizer.json (default: <save_dir>/tokenizer)",
    "from_resume": "1 = continue from checkpoints/<save_weight>_<H>_resume.pt if it exists",
    "from_weight": "stage name (pretrain -> out/pretrain_<H>.safetensors) or a weights path; none = scratch",
    "preset": f"model shape preset: {', '.join(PRESETS)}",
    "dtype": "auto = bf16 on CUDA / AVX512-BF16 CPUs, else fp32",
    "compile": "1 = torch.compile the model",
    "max_steps": "stop after this many optimizer steps (0 = run all epochs)",
    "use_wandb": "1 = SwanLab (reference behaviour), 2 = Weights & Biases",
    "skip_bad_lines": "1 = skip malformed JSONL lines with a counted warning instead of failing",
}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field`` per dataclass field; defaults are suppressed so we can tell what was given."""
    for f in dataclasses.fields(cls):
        if f.name == "stage":  # the sub-command names the stage
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        kind = int if kind is bool else kind
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                            help=_HELP.get(f.name, f"(default {f.default!r})"))


def build_train_config(args: argparse.Namespace, stage_defaults: dict[str, Any]) -> TrainConfig:
    values: dict[str, Any] = dict(stage_defaults)
    if getattr(args, "config", None):
        values.update(_read_config_file(Path(args.config)))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    unknown = set(values) - names
    if unknown:
        raise SystemExit(f"unknown config keys: {sorted(unknown)}")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        import tomllib
        return tomllib.loads(path.read_text())
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        import yaml  # optional
        return yaml.safe_load(path.read_text())
    raise SystemExit(f"--config must be .toml, .json or .yaml: {path}")


def load_tokenizer_for(cfg: TrainConfig):
    from minimind.tokenizer import MiniMindTokenizer
    path = Path(cfg.tokenizer_path or Path(cfg.save_dir) / "tokenizer")
    if not (path / "tokenizer.json").exists() and not path.is_file():
        raise SystemExit(f"no tokenizer at {path}: train one with `minimind tokenizer train` or pass "
                         f"--tokenizer_path (e.g. the reference model/ folder)")
    tok = MiniMindTokenizer.from_dir(path)
    keep = Path(cfg.save_dir) / "tokenizer"
    if path.resolve() != keep.resolve() and not (keep / "tokenizer.json").exists():
        tok.save(keep)  # weights and their tokenizer travel together
    return tok


def cmd_train(stage_name: str, args: argparse.Namespace) -> int:
    from minimind.train.loop import train
    from minimind.train.stages import STAGES
    stage = STAGES[stage_name]
    cfg = build_train_config(args, {**stage.defaults, "stage": stage_name})
    tok = load_tokenizer_for(cfg)
    res = train(stage, cfg, tok)
    print(f"saved {res.weights_path}  steps={res.steps}  loss={res.final_loss:.4f}  "
          f"{res.useful_tokens_per_s:.0f} useful tok/s  metrics={res.metrics_path}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from minimind.tokenizer import iter_texts_from_jsonl, train_tokenizer
    texts = iter_texts_from_jsonl(args.data_path, max_lines=args.max_lines or None)
    tok = train_tokenizer(texts, args.out_dir, vocab_size=args.vocab_size)
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out_dir}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from minimind.data import load_or_prepare_shards
    from minimind.tokenizer import MiniMindTokenizer
    tok = MiniMindTokenizer.from_dir(args.tokenizer_path)
    out = args.out_dir or str(Path("data_cache") / f"{Path(args.data_path).stem}-{args.kind}-{args.max_seq_len}-{tok.hash}")
    info = load_or_prepare_shards(args.data_path, out, tok, kind=args.kind, num_proc=args.num_workers,
                                  skip_bad_lines=bool(args.skip_bad_lines),
                                  max_len=args.max_seq_len + 1 if args.kind == "sft" else None)
    print(f"shards in {out}: {info}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """safetensors <-> reference-style fp16 ``.pth`` (both tied keys, as the reference saves)."""
    from minimind.model import export_reference_pth, load_model, save_weights
    model = load_model(args.weight, preset=args.preset)
    out = Path(args.out)
    if out.suffix == ".pth":
        export_reference_pth(model, out)
    elif out.suffix == ".safetensors":
        save_weights(model, out)
    else:
        raise ValueError(f"--out must end in .pth or .safetensors: {out}")
    print(f"wrote {out} ({model.describe()})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from minimind.train.plots import plot_metrics
    out = plot_metrics([Path(p) for p in args.metrics], Path(args.out), keys=args.keys.split(","))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind", description="MiniMind: build a tokenizer, pretrain, "
                                "fine-tune, chat with and convert small Qwen3-shaped language models.")
    sub = p.add_subparsers(dest="command", required=True)

    from minimind.train.stages import STAGES
    for name, stage in STAGES.items():
        sp = sub.add_parser(name, help=f"{name} training (reference-style flags)")
        sp.add_argument("--config", help="TOML/JSON/YAML file with TrainConfig fields")
        add_dataclass_flags(sp, TrainConfig)
        sp.set_defaults(func=lambda a, n=name: cmd_train(n, a))

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    tt = tk.add_parser("train", help="train a byte-level BPE tokenizer on a JSONL corpus")
    tt.add_argument("--data_path", required=True)
    tt.add_argument("--out_dir", default="out/tokenizer")
    tt.add_argument("--vocab_size", type=int, default=6400)
    tt.add_argument("--max_lines", type=int, default=0)
    tt.set_defaults(func=cmd_tokenizer_train)

    dp = sub.add_parser("data", help="data tools").add_subparsers(dest="action", required=True)
    pr = dp.add_parser("prepare", help="tokenize a JSONL file once into on-disk shards")
    pr.add_argument("--data_path", required=True)
    pr.add_argument("--kind", choices=["pretrain", "sft"], required=True)
    pr.add_argument("--tokenizer_path", required=True)
    pr.add_argument("--out_dir", default="")
    pr.add_argument("--max_seq_len", type=int, default=768)
    pr.add_argument("--num_workers", type=int, default=0)
    pr.add_argument("--skip_bad_lines", type=int, default=0)
    pr.set_defaults(func=cmd_data_prepare)

    from minimind.infer.chat import add_chat_arguments, chat_main
    ch = sub.add_parser("chat", help="chat with a trained model (interactive or --prompts file)")
    add_chat_arguments(ch)
    ch.set_defaults(func=chat_main)

    cv = sub.add_parser("convert", help="convert weights: .safetensors <-> reference-style fp16 .pth")
    cv.add_argument("--weight", required=True, help="input .safetensors or .pth")
    cv.add_argument("--out", required=True, help="output path ending in .pth or .safetensors")
    cv.add_argument("--preset", default="minimind-3", help="shape defaults for a .pth without config")
    cv.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plot", help="turn metrics JSONL files into a PNG")
    pl.add_argument("metrics", nargs="+")
    pl.add_argument("--out", default="out/metrics.png")
    pl.add_argument("--keys", default="loss")
    pl.set_defaults(func=cmd_plot)

    from minimind.demo.pipeline import add_demo_arguments, demo_main
    dm = sub.add_parser("demo", help="the embedded default: build a corpus and run the whole pipeline")
    add_demo_arguments(dm)
    dm.set_defaults(func=demo_main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # configuration / data errors: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
