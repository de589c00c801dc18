"""The ``minimind`` command.  Thin: flags -> config dataclasses -> stage function.

Training flags are generated from :class:`minimind.config.TrainConfig` fields (shared by every stage)
and from the stage's own ``Options`` dataclass (``--beta``, ``--lora_rank`` ...), so they keep the
reference names (``--batch_size``, ``--learning_rate``, ``--max_seq_len``, ``--from_resume`` ...).
Precedence: dataclass defaults < stage defaults < ``--config file.toml|.json|.yaml`` < explicit flags.
Config-file values are coerced and validated exactly like flags, and errors name the file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from minimind.config import PRESETS, TrainConfig, nonfinite_fields

_HELP = {
    "data_path": "JSONL file in the reference format of the stage",
    "tokenizer_path": "folder with tokenizer.json (default: <save_dir>/tokenizer)",
    "from_resume": "1 = continue from checkpoints/<save_weight>_<H>_resume.pt if it exists",
    "from_weight": "stage name (pretrain -> out/pretrain_<H>.safetensors) or a weights path; none = scratch",
    "preset": f"model shape preset: {', '.join(PRESETS)}",
    "dtype": "auto = bf16 on CUDA / AVX512-BF16 CPUs, else fp32",
    "compile": "1 = torch.compile the model",
    "max_steps": "stop after this many optimizer steps (0 = run all epochs)",
    "use_wandb": "log to SwanLab (bare flag or 1, the reference's tracker) or Weights & Biases (2)",
    "wandb_project": "tracker project name",
    "skip_bad_lines": "1 = skip malformed JSONL lines with a counted warning instead of failing",
    "warmup_steps": "linear warmup optimizer steps (0 = 1%% of the run)",
    "dropout": "dropout of a new model (0 = none, as the reference)",
    "optimizer": "adamw, or muon: Muon (orthogonalised momentum) for the decoder blocks' matrices, AdamW "
                 "for the embedding, head and norm gains",
    "muon_lr": "Muon's learning rate (with --optimizer muon), on the same warmup/cosine schedule",
    # stage options
    "lora_rank": "adapter rank r",
    "lora_alpha": "adapter scale alpha/r; 0 = alpha equals r (unscaled, as the reference)",
    "lora_dropout": "dropout on the adapter's input",
    "lora_targets": "square (reference: Linears with in == out), all, or a list like q_proj,v_proj",
    "beta": "DPO temperature beta of the implicit reward beta * log(pi / pi_ref)",
    "loss_type": "sigmoid (DPO), ipo or hinge",
    "ref_weight": "reference model (default: the --from_weight model)",
    "ref_cache": "1 = compute each pair's reference log-probs once and keep them",
    "rpo_alpha": "weight of the chosen answers' per-token NLL added to the DPO loss (RPO; 0 = off)",
    "from_teacher_weight": "teacher: stage name (resolved with the teacher shape) or weights path",
    "teacher_hidden_size": "teacher hidden size for a stage-name teacher (0 = the student's)",
    "teacher_use_moe": "teacher is MoE for a stage-name teacher (-1 = like the student)",
    "alpha": "weight of the hard-label cross-entropy (1 - alpha goes to the KL term)",
    "temperature": "softmax temperature T of both distributions",
}


def _field_type(f: dataclasses.Field) -> type:
    kind = type(f.default) if f.default is not dataclasses.MISSING else str
    return int if kind is bool else kind


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type,
                        defaults: dict[str, Any] | None = None, skip: Sequence[str] = ("stage",)) -> None:
    """One ``--field`` per dataclass field.  Defaults are suppressed (so we can tell what was given)
    but shown in the help, with the stage's own defaults where it has them."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        shown = defaults.get(f.name, f.default)
        help_text = (f.metadata or {}).get("help") or _HELP.get(f.name, "")
        help_text = f"{help_text} (default {shown!r})" if help_text else f"(default {shown!r})"
        kwargs: dict[str, Any] = dict(type=_field_type(f), default=argparse.SUPPRESS, help=help_text)
        if f.name == "use_wandb":  # the reference's bare switch, or an explicit 0/1/2
            kwargs.update(nargs="?", const=1)
        parser.add_argument(f"--{f.name}", **kwargs)


def coerce_values(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Convert config-file values to the field types (YAML reads ``5e-4`` as a string, JSON has no
    int/float distinction), failing with ``source: key: ...`` on anything that does not fit."""
    types = {f.name: _field_type(f) for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = types[key]
        try:
            if kind is str:
                if not isinstance(value, str):
                    raise TypeError
                out[key] = value
            elif kind is int:
                if isinstance(value, bool):
                    out[key] = int(value)
                elif isinstance(value, float) and value.is_integer():
                    out[key] = int(value)
                elif isinstance(value, (int, str)):
                    out[key] = int(value)
                else:
                    raise TypeError
            elif kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise TypeError
                out[key] = float(value)
            else:
                out[key] = value
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {key}: expected {kind.__name__}, got {value!r}") from None
    return out


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--config file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # optional
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"--config must be .toml, .json or .yaml: {path}")
    except ValueError:
        raise
    except Exception as e:  # parser errors of the three formats
        raise ValueError(f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    return data


def split_config_values(args: argparse.Namespace, stage_defaults: dict[str, Any],
                        options_cls: type | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig values, stage option values) from stage defaults, ``--config`` and flags."""
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    opt_names = {f.name for f in dataclasses.fields(options_cls)} if options_cls else set()
    values: dict[str, Any] = dict(stage_defaults)
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        data = _read_config_file(path)
        unknown = sorted(set(data) - train_names - opt_names)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}")
        values.update(coerce_values(TrainConfig, {k: v for k, v in data.items() if k in train_names},
                                    str(path)))
        if options_cls:
            options.update(coerce_values(options_cls, {k: v for k, v in data.items() if k in opt_names},
                                         str(path)))
    given = vars(args)
    values.update({k: v for k, v in given.items() if k in train_names})
    options.update({k: v for k, v in given.items() if k in opt_names})
    return values, options


def build_train_config(args: argparse.Namespace, stage_defaults: dict[str, Any]) -> TrainConfig:
    values, _ = split_config_values(args, stage_defaults)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def build_stage(name: str, args: argparse.Namespace):
    """(stage object, TrainConfig) for sub-command ``name``; both validated before any data is read."""
    from minimind.train.stages import STAGES
    cls = STAGES[name]
    values, options = split_config_values(args, {**cls.defaults, "stage": name}, cls.Options)
    cfg = TrainConfig(**values)
    cfg.validate()
    stage = cls(cls.Options(**options) if cls.Options else None)
    bad = nonfinite_fields(stage.options) if stage.options is not None else []
    if bad:
        raise ValueError(f"invalid {name} options: " + "; ".join(bad))
    stage.validate(cfg)
    return stage, cfg


def load_tokenizer_for(cfg: TrainConfig):
    from minimind.tokenizer import MiniMindTokenizer
    path = Path(cfg.tokenizer_path or Path(cfg.save_dir) / "tokenizer")
    if not (path / "tokenizer.json").exists() and not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: train one with `minimind tokenizer train` or "
                                f"pass --tokenizer_path (e.g. the reference model/ folder)")
    return MiniMindTokenizer.from_dir(path)


def cmd_train(stage_name: str, args: argparse.Namespace) -> int:
    from minimind.train.loop import train
    stage, cfg = build_stage(stage_name, args)
    tok = load_tokenizer_for(cfg)
    run = getattr(stage, "run", None)  # RL stages bring their own driver (rollouts between steps)
    res = run(cfg, tok) if run is not None else train(stage, cfg, tok)
    print(f"saved {res.weights_path}  steps={res.steps}  loss={res.final_loss:.4f}  "
          f"{res.useful_tokens_per_s:.0f} useful tok/s  metrics={res.metrics_path}")
    return 0


def cmd_lora(args: argparse.Namespace) -> int:
    if getattr(args, "lora_action", None) == "merge":
        from minimind.model.lora import merge_lora_files
        out = merge_lora_files(args.weight, args.lora_weight, args.out)
        print(f"wrote merged weights {out}")
        return 0
    return cmd_train("lora", args)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from minimind.tokenizer import iter_texts_from_jsonl, train_tokenizer
    if Path(args.data_path).is_dir():
        raise ValueError(f"--data_path {args.data_path} is a folder; pass a JSONL file")
    texts = iter_texts_from_jsonl(args.data_path, max_lines=args.max_lines or None,
                                  skip_bad_lines=bool(args.skip_bad_lines))
    tok = train_tokenizer(texts, args.out_dir, vocab_size=args.vocab_size)
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out_dir}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Tokenize once with exactly the settings (and cache folder) the training stage would use."""
    stage, cfg = build_stage(args.kind, args)
    tok = load_tokenizer_for(cfg)
    info = stage.prepare_data(cfg, tok, progress=bool(cfg.progress))
    print(f"shards in {info.out_dir}: {info.n_docs} documents, {info.n_tokens} tokens"
          f"{' (reused)' if info.reused else ''}; train with the same --data_path/--max_seq_len/--seed"
          f"{'' if not cfg.shard_dir else ' and --shard_dir ' + cfg.shard_dir}")
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


def _export_source(args: argparse.Namespace) -> tuple[Path, Path]:
    """The weights file (a path or a stage name) and tokenizer folder an export reads."""
    from minimind.infer.loading import find_tokenizer_dir
    from minimind.model.weights import resolve_weight_path
    weight = resolve_weight_path(args.weight, args.save_dir, args.hidden_size, args.use_moe)
    # the lookup of chat / serve / eval: --tokenizer_path, else beside the weights, <dir>/tokenizer ...
    return weight, find_tokenizer_dir(args.tokenizer_path or None, weight)


def cmd_export_hf(args: argparse.Namespace) -> int:
    """A transformers-loadable folder (Qwen3ForCausalLM / Qwen3MoeForCausalLM, no remote code)."""
    from minimind.export import export_hf
    weight, tok_dir = _export_source(args)
    out = export_hf(weight, args.out, tok_dir, dtype=args.dtype)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """A GGUF file for llama.cpp (architecture qwen3 / qwen3moe) and an ollama Modelfile beside it."""
    from minimind.export.gguf import export_gguf
    weight, tok_dir = _export_source(args)
    from minimind.export.gguf import modelfile_for
    try:
        out = export_gguf(weight, args.out, tok_dir, dtype=args.dtype)
    except ImportError as e:
        raise ValueError(str(e)) from None
    modelfile = modelfile_for(out)
    print(f"wrote {out} and {modelfile} (llama-cli -m {out}; ollama create NAME -f {modelfile.name})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A HF Qwen3 / MiniMind folder or a reference .pth -> our safetensors (+ its tokenizer)."""
    from minimind.export import import_hf
    out = import_hf(args.src, args.out, dtype=args.dtype or None)
    print(f"wrote {out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from minimind.train.plots import plot_metrics
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    out = plot_metrics([Path(p) for p in args.metrics], Path(args.out), keys=keys, strict=True)
    print(f"wrote {out}")
    return 0


#: TrainConfig fields that only the stages reading SFT conversations use (their augmentations).
SFT_ONLY_FIELDS = ("add_system_ratio", "empty_think_ratio")
SFT_DATA_STAGES = ("sft", "lora", "distill")


def _add_stage_parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    from minimind.train.stages import STAGES
    cls = STAGES[name]
    sp = sub.add_parser(name, help=help_text, description=f"{help_text}. {cls.__doc__ or ''}".strip())
    sp.add_argument("--config", help="TOML/JSON/YAML file with settings (any flag of this command)")
    skip = ("stage",) if name in SFT_DATA_STAGES else ("stage", *SFT_ONLY_FIELDS)
    add_dataclass_flags(sp, TrainConfig, defaults=cls.defaults, skip=skip)
    if cls.Options is not None:
        add_dataclass_flags(sp.add_argument_group(f"{name} options"), cls.Options)
    return sp


def _add_export_source_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--weight", required=True, help="weights path or stage name (full_sft -> out/full_sft_<H>)")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--tokenizer_path", default="",
                        help="tokenizer folder (default: beside the weights, then <dir>/tokenizer, out/tokenizer, "
                             "model/)")
    parser.add_argument("--save_dir", default="out")
    parser.add_argument("--hidden_size", type=int, default=0, help="shape of a stage-name --weight")
    parser.add_argument("--use_moe", type=int, default=-1, choices=[-1, 0, 1])


STAGE_HELP = {
    "pretrain": "next-token pretraining on {\"text\"} rows",
    "sft": "full SFT on {\"conversations\"} rows (assistant tokens only)",
    "lora": "LoRA fine-tuning on SFT data (only adapters train; `minimind lora merge` merges)",
    "dpo": "DPO on {\"chosen\", \"rejected\"} pairs against a frozen reference model",
    "distill": "white-box distillation from a teacher model on SFT data",
    "grpo": "GRPO-family RL (--loss_type grpo|dr_grpo|dapo|bnpo|gspo|cispo) on {\"conversations\"} prompts",
    "spo": "single-stream RL: one sample per prompt against a persistent per-prompt baseline",
    "ppo": "PPO: clipped surrogate, GAE from a value head, KL folded into the reward",
    "agent": "multi-turn tool-use RL: tool calls run between turns, rewards grade the final answer",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minimind", description="MiniMind: build a tokenizer, pretrain, "
                                "fine-tune, chat with and convert small Qwen3-shaped language models.")
    sub = p.add_subparsers(dest="command", required=True)

    for name, text in STAGE_HELP.items():
        sp = _add_stage_parser(sub, name, text)
        if name == "distill":
            sp.add_argument("--from_student_weight", dest="from_weight", default=argparse.SUPPRESS,
                            help="reference name of --from_weight for the student")
        if name == "lora":
            sp.add_argument("--lora_name", dest="save_weight", default=argparse.SUPPRESS,
                            help="reference name of --save_weight for adapters (default 'lora_medical')")
            ms = sp.add_subparsers(dest="lora_action").add_parser(
                "merge", help="write base weights + adapter as one full weights file")
            ms.add_argument("--weight", required=True, help="base weights (.safetensors or .pth)")
            ms.add_argument("--lora_weight", "--lora", required=True, help="adapter file")
            ms.add_argument("--out", required=True, help="output .safetensors (or reference .pth)")
            sp.set_defaults(func=cmd_lora)
        else:
            sp.set_defaults(func=lambda a, n=name: cmd_train(n, a))

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    tt = tk.add_parser("train", help="train a byte-level BPE tokenizer on a JSONL corpus")
    tt.add_argument("--data_path", required=True, help="JSONL corpus (text of any record format)")
    tt.add_argument("--out_dir", default="out/tokenizer", help="folder for tokenizer.json and its config")
    tt.add_argument("--vocab_size", type=int, default=6400, help="tokens, the special ones included")
    tt.add_argument("--max_lines", type=int, default=0, help="read at most this many lines (0 = all)")
    tt.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1], help=_HELP["skip_bad_lines"])
    tt.set_defaults(func=cmd_tokenizer_train)

    dp = sub.add_parser("data", help="data tools").add_subparsers(dest="action", required=True)
    pr = dp.add_parser("prepare", help="tokenize a JSONL file once into the shard cache training reads",
                       description="Tokenize with the same settings and into the same cache folder as "
                                   "the training command of --kind with the same flags.")
    pr.add_argument("--kind", choices=["pretrain", "sft", "dpo"], required=True)
    pr.add_argument("--out_dir", dest="shard_dir", default=argparse.SUPPRESS,
                    help="cache folder (default: the one training would pick); same as --shard_dir")
    for name in ("data_path", "tokenizer_path", "shard_dir", "save_dir", "max_seq_len", "seed", "num_workers",
                 "skip_bad_lines", "add_system_ratio", "empty_think_ratio", "progress"):
        f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
        pr.add_argument(f"--{name}", type=_field_type(f), default=argparse.SUPPRESS,
                        help=_HELP.get(name, "as for training"))
    pr.set_defaults(func=cmd_data_prepare)

    from minimind.infer.chat import add_chat_arguments, chat_main
    ch = sub.add_parser("chat", help="chat with a trained model (interactive or --prompts file)")
    add_chat_arguments(ch)
    ch.set_defaults(func=chat_main)
    from minimind.serve.cli import add_serve_parser
    add_serve_parser(sub)

    cv = sub.add_parser("convert", help="convert weights: .safetensors <-> reference-style fp16 .pth")
    cv.add_argument("--weight", required=True, help="input .safetensors or .pth")
    cv.add_argument("--out", required=True, help="output path ending in .pth or .safetensors")
    cv.add_argument("--preset", default="minimind-3", help="shape defaults for a .pth without config")
    cv.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="export weights for other tools").add_subparsers(dest="format", required=True)
    eh = ex.add_parser("hf", help="a Hugging Face transformers folder (also what vLLM serves)")
    _add_export_source_args(eh, "output folder")
    eh.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    eh.set_defaults(func=cmd_export_hf)
    eg = ex.add_parser("gguf", help="a GGUF file for llama.cpp, plus an ollama Modelfile")
    _add_export_source_args(eg, "output .gguf path")
    eg.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    eg.set_defaults(func=cmd_export_gguf)

    im = sub.add_parser("import", help="import a HF Qwen3 / MiniMind folder or a reference .pth")
    im.add_argument("src", help="folder with config.json + weights, or a .pth / .safetensors file")
    im.add_argument("--out", required=True, help="output .safetensors (its tokenizer goes to <out dir>/tokenizer)")
    im.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"])
    im.set_defaults(func=cmd_import)

    pl = sub.add_parser("plot", help="turn metrics JSONL files into a PNG")
    pl.add_argument("metrics", nargs="+", help="metrics JSONL files written by training")
    pl.add_argument("--out", default="out/metrics.png", help="PNG path")
    pl.add_argument("--keys", default="loss", help="comma-separated metrics to plot, one panel each")
    pl.set_defaults(func=cmd_plot)

    from minimind.eval.cli import add_eval_parser
    add_eval_parser(sub)
    from minimind.eval.report import add_report_parser
    add_report_parser(sub)

    from minimind.demo.cli import add_demo_arguments, demo_main
    dm = sub.add_parser("demo", help="the embedded default: build a corpus and run the whole pipeline")
    add_demo_arguments(dm)
    dm.set_defaults(func=demo_main)
    return finish_parser(p)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """``warning: <message>`` on stderr: the counted data warnings are for users, who have no use
    for the source line of the ``warnings.warn`` call that Python prints by default."""
    print(f"warning: {message}", file=file or sys.stderr)


#: One spelling per meaning, the first shown in help; the others are accepted wherever one of them is
#: a flag (``chat --weight``, ``eval --model``; training's ``--data_path`` and eval's ``--data``).
FLAG_SPELLINGS: tuple[tuple[str, ...], ...] = (("--weight", "--model"), ("--data_path", "--data"),
                                               ("--tokenizer_path", "--tokenizer"))


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default (unless its help already says it) and only the first spelling of
    an aliased flag, so ``--help`` lists one name per meaning."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)".strip()

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) > 1 and any(set(action.option_strings) <= set(group)
                                                  for group in FLAG_SPELLINGS):
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)


def _shows_default(action: argparse.Action) -> bool:
    """Flags whose default is a value worth printing (not a switch, not unset)."""
    return (bool(action.option_strings) and action.nargs != 0 and action.help != argparse.SUPPRESS
            and not (action.default is None or action.default is argparse.SUPPRESS or action.default == ""))


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for p in dict.fromkeys(a.choices.values())]


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Walk every (sub-)parser: the common help formatter, and the other spellings of
    :data:`FLAG_SPELLINGS` added to whichever flag a command has (the canonical one listed first)."""
    parser.formatter_class = HelpFormatter
    for action in list(parser._actions):
        if not action.help and _shows_default(action):
            action.help = "(default: %(default)s)"  # argparse prints nothing for a flag without help
        for group in FLAG_SPELLINGS:
            if not set(action.option_strings) & set(group):
                continue
            extra = [f for f in group if f not in parser._option_string_actions]
            for flag in extra:
                parser._option_string_actions[flag] = action
            names = action.option_strings + extra
            action.option_strings = sorted(names, key=lambda f: group.index(f) if f in group else len(group))
            if action.metavar is None and action.nargs != 0:
                action.metavar = action.option_strings[0].lstrip("-").upper()
    for sub in _subparsers(parser):
        finish_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from minimind.cpu_allocator import tune_malloc
    args = build_parser().parse_args(argv)
    tune_malloc()  # large CPU tensors reuse heap pages instead of page-faulting fresh ones every step
    with warnings.catch_warnings():  # restores the default display when main returns (tests call it)
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from minimind.train.loop import TrainingInterrupted
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # configuration / data errors: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder where a file belongs, permissions, a full disk: the OS said why
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package (a reward model's transformers, gguf, ...)
        from minimind.serve.cli import missing_package_hint
        print(f"error: {missing_package_hint(e, f'minimind {args.command}')}", file=sys.stderr)
        return 2
    except TrainingInterrupted:
        return 130  # the loop saved and printed how to resume
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
