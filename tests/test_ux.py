"""Usability fixes: weight files that keep their config, readable errors for wrong files, file modes
and stale temporaries, BOM-tolerant JSONL, a located-error tokenizer corpus reader, tracker checks."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.jsonl import DataFormatError, iter_jsonl
from minimind.fileio import atomic_path, atomic_write_text, remove_stale_tmp
from minimind.model import MiniMindForCausalLM, export_reference_pth, load_model, read_config, read_state_dict
from minimind.model.weights import AssumedConfigWarning, resolve_weight_path, save_weights
from minimind.tokenizer.train import iter_texts_from_jsonl, train_tokenizer
from minimind.train.metrics import MetricsWriter, check_tracker

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
        "beta_slow": 1.0, "attention_factor": 1.0}


def tiny_model(seed: int = 0, **over) -> MiniMindForCausalLM:
    """H=64 random model; weights scaled up so that config differences change the logits a lot."""
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=97, max_position_embeddings=64)
    cfg.update(over)
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.6 if name.endswith("mlp.gate.weight") else 0.2)
    return model.eval()


def moe_top2(**over) -> MiniMindForCausalLM:
    return tiny_model(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      rope_theta=1e4, rope_scaling=YARN, **over)


def logits(model: MiniMindForCausalLM, n: int = 20) -> torch.Tensor:
    ids = torch.arange(n)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


# ---- 3: .pth export keeps the config ------------------------------------------------------------
def test_pth_export_writes_config_and_top2_moe_reloads_identically(tmp_path: Path) -> None:
    model = moe_top2()
    path = export_reference_pth(model, tmp_path / "out" / "x.pth", dtype=torch.float32)
    sidecar = tmp_path / "out" / "x.json"
    assert sidecar.is_file()
    assert json.loads(sidecar.read_text())["num_experts_per_tok"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config was found: nothing is assumed, nothing warned
        back = load_model(path)
    assert back.config.to_dict() == model.config.to_dict()
    assert torch.equal(logits(back), logits(model))


def test_bare_moe_pth_warns_and_names_what_it_assumed(tmp_path: Path) -> None:
    model = moe_top2()
    path = export_reference_pth(model, tmp_path / "x.pth", dtype=torch.float32)
    path.with_suffix(".json").unlink()  # a bare reference-style .pth
    assert read_config(path) is None
    with pytest.warns(AssumedConfigWarning) as caught:
        guessed = load_model(path, preset="minimind-3")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "\n" not in msg
    for name in ("num_experts_per_tok=1", "rope_theta", "rope_scaling", "max_position_embeddings"):
        assert name in msg, name
    # what the warning is about: the guess is a top-1 model and its logits differ
    assert guessed.config.num_experts_per_tok == 1
    assert not torch.allclose(logits(guessed), logits(model), atol=1e-3)
    # overrides for the bare case (chat's --hidden_size/--use_moe ride on the same mechanism)
    with pytest.warns(AssumedConfigWarning) as caught:
        fixed = load_model(path, overrides={"num_experts_per_tok": 2, "rope_theta": 1e4,
                                            "max_position_embeddings": 64, "rope_scaling": YARN,
                                            "hidden_size": None})
    assert "num_experts_per_tok" not in str(caught[0].message)
    assert torch.equal(logits(fixed), logits(model))


# ---- 4: a file that is not weights --------------------------------------------------------------
@pytest.mark.parametrize("name, content", [
    ("x.safetensors", b"just some text\n"),
    ("x.pth", b"just some text\n"),
    ("x.pth", b""),
    ("x.json", json.dumps({"hidden_size": 64}).encode()),
])
def test_non_weights_file_is_a_one_line_value_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    for fn in (read_state_dict, load_model):
        with pytest.raises(ValueError) as exc:
            fn(path)
        msg = str(exc.value)
        assert msg.startswith("not a weights file: ") and str(path) in msg and "\n" not in msg
    if path.suffix == ".safetensors":
        with pytest.raises(ValueError, match="not a weights file"):
            read_config(path)


def test_pickled_non_state_dict_is_rejected(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a weights file: .*list"):
        read_state_dict(tmp_path / "list.pth")


def test_broken_sidecar_config_names_the_file(tmp_path: Path) -> None:
    path = save_weights(tiny_model(), tmp_path / "m.safetensors")
    # metadata wins; a .pth with a broken sidecar names the sidecar
    export_reference_pth(tiny_model(), tmp_path / "m.pth")
    (tmp_path / "m.json").write_text("{oops")
    with pytest.raises(ValueError, match="m.json"):
        read_config(tmp_path / "m.pth")
    assert read_config(path) is not None


# ---- 5: file modes and stale temporaries --------------------------------------------------------
def test_atomic_writes_get_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        weights = save_weights(tiny_model(), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert weights.stat().st_mode & 0o777 == 0o644


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid until the kernel reuses it


def test_stale_tmp_of_dead_writer_is_removed_live_one_kept(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    dead = tmp_path / f".model.safetensors.{_dead_pid()}.0a1b2c3d.tmp"
    live = tmp_path / f".model.safetensors.{os.getpid()}.deadbeef.tmp"
    other = tmp_path / f".other.safetensors.{_dead_pid()}.0a1b2c3d.tmp"  # another file's: not ours
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    assert remove_stale_tmp(target) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
    # atomic_path cleans up before writing, and its own temporary carries this pid
    dead.write_bytes(b"partial")
    with atomic_path(target) as tmp:
        assert not dead.exists()
        assert tmp.name.startswith(f".model.safetensors.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, target.name])


# ---- 6: BOM ---------------------------------------------------------------------------------------
def test_jsonl_bom_accepted_on_first_line_only(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "first"}\n{"text": "second"}\n')
    assert [row["text"] for _, row in iter_jsonl(path)] == ["first", "second"]
    path.write_bytes(b'{"text": "first"}\n' + "\ufeff".encode() + b'{"text": "second"}\n')
    with pytest.raises(DataFormatError, match="pretrain.jsonl:2"):
        list(iter_jsonl(path))


# ---- 7: tokenizer corpus reader --------------------------------------------------------------------
def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_tokenizer_corpus_errors_are_located(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [b'{"text": "ok"}', b'{"text": "bad \xff utf8"}',
                                         b'{"other": 1}', b'{"text": "last"}'])
    with pytest.raises(DataFormatError, match=r"c\.jsonl:2: invalid UTF-8"):
        list(iter_texts_from_jsonl(path, skip_bad_lines=False))
    with pytest.warns(RuntimeWarning) as caught:
        assert list(iter_texts_from_jsonl(path, skip_bad_lines=True)) == ["ok", "last"]
    msg = str(caught[0].message)
    assert "skipped 2" in msg and "c.jsonl:2" in msg and "c.jsonl:3" in msg
    # max_lines stops before a bad line that lies beyond it, even in strict mode
    assert list(iter_texts_from_jsonl(path, max_lines=1, skip_bad_lines=False)) == ["ok"]
    bom = _write(tmp_path / "bom.jsonl", ["\ufeff".encode() + b'{"text": "x"}'])
    assert list(iter_texts_from_jsonl(bom, skip_bad_lines=False)) == ["x"]


@pytest.mark.parametrize("lines", [[], [b""], [b"{bad", b'{"other": 1}']])
def test_empty_or_all_bad_corpus_fails_instead_of_a_292_token_tokenizer(tmp_path: Path, lines) -> None:
    path = _write(tmp_path / "c.jsonl", lines) if lines else tmp_path / "c.jsonl"
    if not lines:
        path.write_bytes(b"")
    out = tmp_path / "tok"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="no tokenizer training text"):
            train_tokenizer(iter_texts_from_jsonl(path), out, vocab_size=400, show_progress=False)
    assert not (out / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], out, vocab_size=400, show_progress=False)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(["", ""], out, vocab_size=400, show_progress=False)
    assert not (out / "tokenizer.json").exists()


# ---- 8: trackers ----------------------------------------------------------------------------------
def test_check_tracker_reports_missing_package(tmp_path: Path) -> None:
    check_tracker("")  # no tracker: nothing to check
    with pytest.raises(ValueError, match="unknown tracker"):
        check_tracker("tensorboard")
    missing = [n for n in ("swanlab", "wandb") if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("both trackers are installed here")
    name = missing[0]
    with pytest.raises(ValueError) as exc:
        check_tracker(name)
    assert str(exc.value) == f"--use_wandb needs the `{name}` package: pip install {name}"
    assert name not in sys.modules  # checked without importing
    with pytest.raises(ValueError, match=f"pip install {name}"):
        MetricsWriter(tmp_path / "m.jsonl", tracker=name, project="Mine")


def test_metrics_writer_passes_project_to_tracker(tmp_path: Path, monkeypatch) -> None:
    import types

    from minimind.train import metrics

    seen: dict = {}
    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw), log=lambda d: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(metrics, "check_tracker", lambda name: None)
    MetricsWriter(tmp_path / "m.jsonl", tracker="wandb", run_name="r", project="MyProject")
    assert seen["project"] == "MyProject" and seen["name"] == "r"


# ---- 9b: stage names -------------------------------------------------------------------------------
def test_resolve_weight_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError) as exc:
        resolve_weight_path("full_sft", out)
    assert str(out / "full_sft_768.safetensors") in str(exc.value)
    assert str(out / "full_sft_768.pth") in str(exc.value)
    (out / "full_sft_768.pth").write_bytes(b"x")
    assert resolve_weight_path("full_sft", out) == out / "full_sft_768.pth"
    (out / "full_sft_768.safetensors").write_bytes(b"x")
    assert resolve_weight_path("full_sft", out) == out / "full_sft_768.safetensors"
    (out / "full_sft_512_moe.safetensors").write_bytes(b"x")
    assert resolve_weight_path("full_sft", out, 512, 1) == out / "full_sft_512_moe.safetensors"
    # the only file of that name is used whatever its size
    (out / "pretrain_640.safetensors").write_bytes(b"x")
    (out / "pretrain_long_768.safetensors").write_bytes(b"x")  # another name, not a size
    assert resolve_weight_path("pretrain", out) == out / "pretrain_640.safetensors"
    with pytest.raises(FileNotFoundError, match="several"):
        resolve_weight_path("full_sft", out, 256)
    # a folder in the name wins over save_dir; paths pass through; missing paths are errors
    in_name = resolve_weight_path(str(out / "full_sft"), tmp_path / "elsewhere")
    assert in_name == out / "full_sft_768.safetensors"
    assert resolve_weight_path(out / "full_sft_768.pth", "ignored") == out / "full_sft_768.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_weight_path(out / "nope.pth", out)


# ---- new-user friction: one flag spelling per meaning, defaults in help, plot keys, progress ----------
def _parse(*argv: str):
    from minimind.cli import build_parser
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, dest, value", [
    (("chat", "--model", "w"), "weight", "w"),
    (("chat", "--tokenizer", "t"), "tokenizer_path", "t"),
    (("eval", "bpb", "--weight", "w", "--data_path", "d"), "model", "w"),
    (("eval", "bpb", "--weight", "w", "--data_path", "d"), "data", "d"),
    (("eval", "mc", "--model", "w", "--data", "d", "--tokenizer_path", "t"), "tokenizer", "t"),
    (("serve", "--model", "w", "--tokenizer", "t"), "tokenizer_path", "t"),
    (("export", "hf", "--model", "w", "--out", "o"), "weight", "w"),
    (("export", "gguf", "--weight", "w", "--out", "o.gguf", "--tokenizer", "t"), "tokenizer_path", "t"),
    (("sft", "--data", "x.jsonl"), "data_path", "x.jsonl"),
    (("tokenizer", "train", "--data", "x.jsonl"), "data_path", "x.jsonl"),
])
def test_both_flag_spellings_are_accepted_everywhere(argv, dest, value) -> None:
    assert getattr(_parse(*argv), dest) == value


def _help(*argv: str) -> str:
    from minimind.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize("argv, shown, hidden, default", [
    (("chat",), "--weight WEIGHT", "--model", "--top_p TOP_P (default: 0.95)"),
    (("eval", "bpb"), "--weight WEIGHT", "--model", "(default: 8)"),
    (("eval", "mc"), "--data_path DATA_PATH", "--data DATA", "--shots SHOTS k-shot"),
    (("serve",), "--tokenizer_path TOKENIZER_PATH", "--tokenizer ", "(default: 8998)"),
    (("tokenizer", "train"), "--data_path DATA_PATH", "--data DATA", "(default: 6400)"),
    (("plot",), "--keys KEYS", "--data", "(default: loss)"),
])
def test_help_shows_one_spelling_and_the_defaults(argv, shown, hidden, default) -> None:
    text = _help(*argv)
    assert shown in text and hidden not in text.replace(shown, ""), text
    assert default in text, text


def test_pretrain_help_lists_no_sft_only_flags() -> None:
    pre, sft = _help("pretrain"), _help("sft")
    for flag in ("--add_system_ratio", "--empty_think_ratio"):
        assert flag not in pre and flag in sft


def _metrics(path: Path) -> Path:
    rows = [{"step": i, "loss": 3.0 - i / 10, "lr": 1e-3} for i in range(1, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_unknown_key_is_an_error_naming_the_available_ones(tmp_path: Path, capsys) -> None:
    from minimind.cli import main
    m = _metrics(tmp_path / "m.jsonl")
    assert main(["plot", str(m), "--keys", "loss,los", "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--keys los" in err and "available: loss, lr" in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()
    assert main(["plot", str(m), "--keys", "loss,lr", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_eval_tables_are_not_cut_at_80_columns_when_piped(monkeypatch) -> None:
    from minimind.eval.cli import results_console
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert results_console().width > 200
