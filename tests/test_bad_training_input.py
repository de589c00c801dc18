"""A table of bad training inputs: every one ends in exit code 2 with a one-line reason.

For each case the CLI runs in-process (``minimind.cli.main(argv)``; a subprocess per case would cost
seconds each) and the test asserts:

* exit code 2 (argparse's code for bad usage, and ours for bad configuration or data);
* no ``Traceback`` on stderr, and an ``error:`` line that names the culprit: ``file:line`` for a
  malformed data line, the file for a bad file, the flag (``--learning_rate``) for a bad value;
* nothing written or overwritten in the output and checkpoint folders: a sentinel weights file and
  a sentinel resume file are created first and must keep their bytes, and no other file may appear.

Cases are generated: every malformed-line kind that applies to all JSONL readers x the stages
pretrain / sft / dpo / grpo, each stage's own field errors, whole-file problems x stages, and bad
flag values (non-finite floats, out-of-range numbers, folders where files belong ...).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from minimind.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

H = 32  # hidden size of every model here: weights are <save_weight>_32.safetensors
WORDS = "the a cat dog runs sits on mat big small red blue one two three four five".split()
STAGES = ("pretrain", "sft", "dpo", "grpo")


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))


def good_line(stage: str, rng: random.Random) -> str:
    """One valid line of ``stage``'s data format."""
    q, a, b = _text(rng), _text(rng), _text(rng)
    if stage == "pretrain":
        return json.dumps({"text": q})
    user = {"role": "user", "content": q}
    if stage == "sft":
        return json.dumps({"conversations": [user, {"role": "assistant", "content": a}]})
    if stage == "dpo":
        return json.dumps({"chosen": [user, {"role": "assistant", "content": a}],
                           "rejected": [user, {"role": "assistant", "content": b + " no"}]})
    return json.dumps({"conversations": [user], "gt": a})


# ------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    """``lines``: the data file (``None`` = the stage's good file); ``expect``: text the error must
    contain (``{data}`` is replaced by the data file's path)."""

    id: str
    stage: str
    expect: str
    lines: list[str | bytes] | None = None
    flags: list[str] = field(default_factory=list)
    setup: str = ""  # name of a file-setup step (see _apply_setup)


BAD_LINE_AT = 3  # the bad line comes after two good ones: the message must say d.jsonl:3

#: Malformed lines any JSONL reader must refuse with ``file:line``, whatever the stage.
GENERIC_BAD_LINES: dict[str, str | bytes] = {
    "invalid_json": '{"text": oops}',
    "truncated_json": '{"text": "abc',
    "trailing_garbage": '{"text": "abc"} x',
    "array_line": "[1, 2, 3]",
    "string_line": '"just a string"',
    "number_line": "42",
    "null_line": "null",
    "invalid_utf8": b'{"text": "caf\xe9"}',
    "nested_100k": "[" * 100_000 + "]" * 100_000,
    "nested_object_100k": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "nan_literal_object": '{"text": NaN, "conversations": NaN, "chosen": NaN, "rejected": NaN}',
}


def _conv(*roles: str, **extra) -> list[dict]:
    return [{"role": r, "content": f"{r} says hi"} | extra.get(str(i), {}) for i, r in enumerate(roles)]


def _sft(conv) -> str:
    return json.dumps({"conversations": conv}, ensure_ascii=False)


def _dpo(chosen, rejected) -> str:
    return json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False)


UA = _conv("user", "assistant")
SURROGATE = "x\ud800y"

#: Lines that are valid JSON but wrong for one stage's format.
FIELD_BAD_LINES: dict[str, dict[str, str]] = {
    "pretrain": {
        "missing_text": '{"txt": "a"}',
        "text_int": '{"text": 5}',
        "text_empty": '{"text": ""}',
        "text_list": '{"text": ["a"]}',
        "text_null": '{"text": null}',
        "surrogate_text": json.dumps({"text": SURROGATE}),
        "surrogate_key": '{"text": "a", "\\udc00": 1}',
    },
    "sft": {
        "missing_conversations": '{"messages": []}',
        "conversations_int": '{"conversations": 7}',
        "conversations_empty": '{"conversations": []}',
        "message_not_object": _sft(["hi", {"role": "assistant", "content": "a"}]),
        "unknown_role": _sft(_conv("robot", "assistant")),
        "content_int": _sft([{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]),
        "content_missing": _sft([{"role": "user"}, {"role": "assistant", "content": "a"}]),
        "no_assistant": _sft(_conv("user")),
        "assistant_first": _sft(_conv("assistant", "user", "assistant")),
        "system_after_user": _sft(_conv("user", "system", "assistant")),
        "two_assistants": _sft(_conv("user", "assistant", "assistant")),
        "two_users": _sft(_conv("user", "user", "assistant")),
        "tool_without_call": _sft(_conv("user", "assistant", "tool", "assistant")),
        "tools_function_5": _sft([{"role": "system", "content": "s", "tools": [{"function": 5}]}] + UA),
        "tools_no_name": _sft([{"role": "system", "content": "s", "tools": [{"function": {}}]}] + UA),
        "tools_not_list": _sft([{"role": "system", "content": "s", "tools": {"a": 1}}] + UA),
        "tools_bad_json": _sft([{"role": "system", "content": "s", "tools": "[{"}] + UA),
        "tools_on_user": _sft([{"role": "user", "content": "q", "tools": [{"name": "f"}]},
                               {"role": "assistant", "content": "a"}]),
        "tool_calls_on_user": _sft([{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]},
                                    {"role": "assistant", "content": "a"}]),
        "tool_calls_bad_json": _sft([{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "", "tool_calls": "[{"}]),
        "tool_calls_no_name": _sft([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}]),
        "tool_calls_args_int": _sft([{"role": "user", "content": "q"},
                                     {"role": "assistant", "tool_calls": [{"name": "f", "arguments": 5}]}]),
        "reasoning_on_user": _sft([{"role": "user", "content": "q", "reasoning_content": "r"},
                                   {"role": "assistant", "content": "a"}]),
        "reasoning_int": _sft([{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a", "reasoning_content": 3}]),
        "surrogate_content": _sft([{"role": "user", "content": SURROGATE},
                                   {"role": "assistant", "content": "a"}]),
    },
    "dpo": {
        "missing_chosen": json.dumps({"rejected": UA}),
        "missing_rejected": json.dumps({"chosen": UA}),
        "chosen_not_list": json.dumps({"chosen": "a", "rejected": UA}),
        "rejected_empty": json.dumps({"chosen": UA, "rejected": []}),
        "chosen_equals_rejected": _dpo(UA, UA),
        "prompts_differ": _dpo(UA, [{"role": "user", "content": "other"},
                                    {"role": "assistant", "content": "b"}]),
        "ends_with_user": _dpo(UA, UA + [{"role": "user", "content": "more"}]),
        "unknown_role_rejected": _dpo(UA, _conv("robot", "assistant")),
        "assistant_first": _dpo(_conv("assistant", "user", "assistant"), UA),
        "system_after_user": _dpo(_conv("user", "system", "assistant"), UA),
        "tools_in_pair": _dpo([{"role": "system", "content": "s", "tools": [{"name": "f"}]}] + UA,
                              [{"role": "system", "content": "s", "tools": [{"name": "f"}]},
                               UA[0], {"role": "assistant", "content": "other"}]),
        "content_int": _dpo([{"role": "user", "content": 5}, UA[1]], UA),
        "surrogate_answer": _dpo([UA[0], {"role": "assistant", "content": SURROGATE}], UA),
    },
    "grpo": {
        "missing_conversations": '{"prompt": "x"}',
        "conversations_int": '{"conversations": 7}',
        "conversations_empty": '{"conversations": []}',
        "message_not_object": '{"conversations": [5]}',
        "unknown_role": _sft(_conv("robot")),
        "content_int": _sft([{"role": "user", "content": 5}]),
        "assistant_first": _sft(_conv("assistant", "user")),
        "system_after_user": _sft(_conv("user", "system", "user")),
        "surrogate_prompt": _sft([{"role": "user", "content": SURROGATE}]),
    },
}


def _line_cases() -> list[Case]:
    cases = []
    for stage in STAGES:
        for kind, line in GENERIC_BAD_LINES.items():
            cases.append(Case(f"{stage}-line-{kind}", stage, f"{{data}}:{BAD_LINE_AT}:", lines=[line]))
        for kind, line in FIELD_BAD_LINES[stage].items():
            cases.append(Case(f"{stage}-field-{kind}", stage, f"{{data}}:{BAD_LINE_AT}:", lines=[line]))
    return cases


def _file_cases() -> list[Case]:
    cases = []
    for stage in STAGES:
        cases += [
            Case(f"{stage}-file-empty", stage, "{data}", lines=[], setup="only_bad"),
            Case(f"{stage}-file-blank_lines", stage, "{data}", lines=["", "  ", ""], setup="only_bad"),
            Case(f"{stage}-file-all_skipped", stage, "{data}", lines=['{"x": 1}', "[]"] * 3,
                 flags=["--skip_bad_lines", "1"], setup="only_bad"),
            Case(f"{stage}-file-missing", stage, "missing.jsonl", setup="missing_data"),
            Case(f"{stage}-file-data_is_folder", stage, "--data_path", setup="data_folder"),
            Case(f"{stage}-file-save_dir_is_file", stage, "--save_dir", setup="save_dir_file"),
            Case(f"{stage}-file-corrupt_tokenizer", stage, "tokenizer.json", setup="corrupt_tokenizer"),
        ]
    cases += [
        Case("pretrain-file-tokenizer_missing", "pretrain", "tokenizer", setup="no_tokenizer"),
        Case("pretrain-file-checkpoint_dir_is_file", "pretrain", "--checkpoint_dir", setup="ckpt_dir_file"),
        Case("pretrain-file-shard_dir_under_file", "pretrain", "--shard_dir", setup="shard_dir_file"),
        Case("pretrain-file-resume_truncated", "pretrain", "_resume.pt", flags=["--from_resume", "1"],
             setup="resume_truncated"),
        Case("pretrain-file-resume_pickled_object", "pretrain", "pickled Python objects",
             flags=["--from_resume", "1"], setup="resume_pickle"),
        Case("pretrain-file-resume_not_ours", "pretrain", "not a minimind resume",
             flags=["--from_resume", "1"], setup="resume_foreign"),
        Case("sft-file-resume_garbage", "sft", "_resume.pt", flags=["--from_resume", "1"],
             setup="resume_garbage"),
        Case("sft-file-from_weight_wrong_keys", "sft", "missing keys", setup="weights_wrong_keys"),
        Case("sft-file-from_weight_garbage", "sft", "not a weights file", setup="weights_garbage"),
        Case("sft-file-from_weight_missing", "sft", "nope.safetensors",
             flags=["--from_weight", "nope.safetensors"]),
        Case("sft-file-vocab_contradicts_weights", "sft", "--vocab_size", setup="from_pretrained",
             flags=["--vocab_size", "6400"]),
        Case("dpo-file-all_pairs_cut", "dpo", "--max_seq_len", setup="long_prompts",
             flags=["--max_seq_len", "16"]),
        Case("sft-file-all_answers_cut", "sft", "--max_seq_len", setup="long_prompts",
             flags=["--max_seq_len", "16"]),
        Case("pretrain-file-config_nan", "pretrain", "learning_rate", setup="config_nan"),
        Case("pretrain-file-config_unknown_key", "pretrain", "unknown settings", setup="config_unknown"),
    ]
    return cases


#: (flag, value, text the error must hold); run on pretrain unless the flag is a stage option.
BAD_FLAGS: list[tuple[str, str, str]] = [
    *[(f, v, f"--{f}") for f in ("learning_rate", "weight_decay", "grad_clip", "min_lr_ratio", "beta1",
                                 "beta2", "muon_lr", "add_system_ratio", "empty_think_ratio", "dropout")
      for v in ("nan", "inf")],
    ("learning_rate", "-inf", "--learning_rate"), ("learning_rate", "0", "--learning_rate"),
    ("learning_rate", "-1", "--learning_rate"), ("weight_decay", "-1", "--weight_decay"),
    ("grad_clip", "-1", "--grad_clip"), ("min_lr_ratio", "2", "--min_lr_ratio"),
    ("add_system_ratio", "1.5", "--add_system_ratio"), ("dropout", "1.5", "dropout"),
    ("max_seq_len", "1", "--max_seq_len"), ("max_seq_len", "0", "--max_seq_len"),
    ("max_seq_len", "15", "--max_seq_len"), ("max_seq_len", "abc", "--max_seq_len"),
    ("batch_size", "0", "--batch_size"), ("batch_size", "-3", "--batch_size"),
    ("batch_size", "1.5", "--batch_size"), ("accumulation_steps", "0", "--accumulation_steps"),
    ("epochs", "0", "--epochs"), ("log_interval", "0", "--log_interval"),
    ("warmup_steps", "-1", "--warmup_steps"), ("max_steps", "-1", "--max_steps"),
    ("save_interval", "-1", "--save_interval"), ("num_workers", "-1", "--num_workers"),
    ("preset", "huge", "--preset"), ("dtype", "fp8", "--dtype"), ("device", "tpu", "--device"),
    ("optimizer", "sgd", "--optimizer"), ("from_resume", "7", "--from_resume"),
    ("use_moe", "5", "--use_moe"), ("skip_bad_lines", "2", "--skip_bad_lines"),
    ("progress", "3", "--progress"), ("compile", "2", "--compile"), ("hidden_size", "-1", "--hidden_size"),
    ("vocab_size", "-5", "--vocab_size"), ("learning_rate", "fast", "--learning_rate"),
    ("learning_rate", "1e38", "--learning_rate"), ("muon_lr", "1e300", "--muon_lr"),
]
DPO_FLAGS: list[tuple[str, str, str]] = [
    ("beta", "nan", "--beta"), ("beta", "inf", "--beta"), ("beta", "0", "--beta"),
    ("rpo_alpha", "nan", "--rpo_alpha"), ("rpo_alpha", "-1", "--rpo_alpha"),
    ("loss_type", "kto", "--loss_type"), ("ref_cache", "2", "--ref_cache"),
]

GRPO_FLAGS: list[tuple[str, str, str]] = [
    ("compile_rollouts", "2", "--compile_rollouts"), ("quantize", "int4", "--quantize"),
]


def _flag_cases() -> list[Case]:
    cases = [Case(f"pretrain-flag-{f}-{v}", "pretrain", want, flags=[f"--{f}", v])
             for f, v, want in BAD_FLAGS]
    cases += [Case(f"dpo-flag-{f}-{v}", "dpo", want, flags=[f"--{f}", v]) for f, v, want in DPO_FLAGS]
    cases += [Case(f"grpo-flag-{f}-{v}", "grpo", want, flags=[f"--{f}", v]) for f, v, want in GRPO_FLAGS]
    cases += [Case(f"{s}-flag-learning_rate-nan", s, "--learning_rate", flags=["--learning_rate", "nan"])
              for s in ("sft", "dpo", "grpo")]
    return cases


CASES = _line_cases() + _file_cases() + _flag_cases()


def test_the_table_has_at_least_100_kinds() -> None:
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------ workspace
@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a good data file per stage and a tiny pretrained weights file."""
    from minimind.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("bad_input")
    rng = random.Random(0)
    texts = [_text(rng) for _ in range(200)]
    train_tokenizer(iter(texts), root / "tok", vocab_size=300, show_progress=False)
    files = {"root": root, "tok": root / "tok"}
    for stage in STAGES:
        path = root / f"{stage}.jsonl"
        path.write_text("".join(good_line(stage, rng) + "\n" for _ in range(40)), encoding="utf-8")
        files[stage] = path
    code = main(_argv("pretrain", files["pretrain"], root / "pre", files["tok"]) + ["--save_weight", "pre"])
    assert code == 0
    files["weights"] = root / "pre" / "out" / f"pre_{H}.safetensors"
    assert files["weights"].is_file()
    return files


def _argv(stage: str, data: Path, work: Path, tok: Path) -> list[str]:
    return [stage, "--data_path", str(data), "--tokenizer_path", str(tok),
            "--save_dir", str(work / "out"), "--checkpoint_dir", str(work / "ckpt"),
            "--shard_dir", str(work / "shards"), "--preset", "tiny", "--hidden_size", str(H),
            "--num_hidden_layers", "1", "--batch_size", "2", "--max_seq_len", "48", "--max_steps", "1",
            "--device", "cpu", "--dtype", "float32", "--progress", "0", "--num_workers", "1",
            "--save_weight", "sentinel"]


def _write_lines(path: Path, lines: list[str | bytes]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")) + b"\n")
    return path


def _snapshot(*dirs: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs if d.is_dir() for p in sorted(d.rglob("*")) if p.is_file()}


def _apply_setup(case: Case, ws: dict[str, Path], work: Path, argv: list[str]) -> list[str]:
    """File-level preparations of a case; returns the (possibly changed) argv."""
    def set_flag(name: str, value: str) -> None:
        i = argv.index(name)
        argv[i + 1] = value

    ckpt = work / "ckpt" / f"sentinel_{H}_resume.pt"
    kind = case.setup
    if kind == "missing_data":
        set_flag("--data_path", str(work / "missing.jsonl"))
    elif kind == "data_folder":
        set_flag("--data_path", str(work))
    elif kind == "save_dir_file":
        (work / "a_file").write_text("x")
        set_flag("--save_dir", str(work / "a_file"))
    elif kind == "ckpt_dir_file":
        (work / "a_file").write_text("x")
        set_flag("--checkpoint_dir", str(work / "a_file" / "sub"))
    elif kind == "shard_dir_file":
        (work / "a_file").write_text("x")
        set_flag("--shard_dir", str(work / "a_file" / "sub"))
    elif kind in ("corrupt_tokenizer", "no_tokenizer"):
        tok = work / "tok"
        tok.mkdir()
        if kind == "corrupt_tokenizer":
            text = (ws["tok"] / "tokenizer.json").read_text(encoding="utf-8")
            (tok / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
        set_flag("--tokenizer_path", str(tok))
    elif kind.startswith("resume_"):
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if kind == "resume_truncated":
            torch.save({"model": {"w": torch.zeros(1000)}, "step": 1}, ckpt)
            ckpt.write_bytes(ckpt.read_bytes()[:300])
        elif kind == "resume_pickle":
            torch.save({"model": {}, "extra": random.Random(0)}, ckpt)
        elif kind == "resume_foreign":
            torch.save({"w": torch.zeros(3)}, ckpt)
        else:
            ckpt.write_bytes(b"\x00garbage" * 10)
    elif kind == "weights_wrong_keys":
        from safetensors.torch import save_file
        save_file({"transformer.wte.weight": torch.zeros(300, H)}, str(work / "w.safetensors"))
        argv += ["--from_weight", str(work / "w.safetensors")]
    elif kind == "weights_garbage":
        (work / "w.pth").write_bytes(b"not a checkpoint")
        argv += ["--from_weight", str(work / "w.pth")]
    elif kind == "from_pretrained":
        argv += ["--from_weight", str(ws["weights"])]
    elif kind == "long_prompts":
        long_q = " ".join(["the cat runs on the mat"] * 12)
        rows = [good_line(case.stage, random.Random(i)) for i in range(20)]
        rows = [r.replace('"role": "user", "content": "', f'"role": "user", "content": "{long_q} ')
                for r in rows]
        set_flag("--data_path", str(_write_lines(work / "long.jsonl", rows)))
    elif kind == "config_nan":
        (work / "run.json").write_text('{"learning_rate": "nan"}')
        argv += ["--config", str(work / "run.json")]
    elif kind == "config_unknown":
        (work / "run.json").write_text('{"learning_rat": 0.1}')
        argv += ["--config", str(work / "run.json")]
    return argv


def _data_file(case: Case, ws: dict[str, Path], work: Path) -> Path:
    if case.lines is None:
        return ws[case.stage]
    rng = random.Random(1)
    if case.setup == "only_bad":
        lines = list(case.lines)
    else:  # the bad line at BAD_LINE_AT, good lines around it
        lines = [good_line(case.stage, rng) for _ in range(BAD_LINE_AT - 1)] + list(case.lines)
        lines += [good_line(case.stage, rng) for _ in range(30)]
    return _write_lines(work / "d.jsonl", lines)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_training_input_is_refused_cleanly(case: Case, ws, tmp_path: Path, capsys) -> None:
    work = tmp_path
    data = _data_file(case, ws, work)
    argv = _argv(case.stage, data, work, ws["tok"])
    if case.stage == "grpo":
        argv += ["--reward", "format:1"]  # a rule reward that needs no task columns
    if case.stage in ("dpo", "grpo"):
        argv += ["--from_weight", str(ws["weights"])]
    elif case.setup not in ("weights_wrong_keys", "weights_garbage", "from_pretrained") \
            and "--from_weight" not in case.flags:
        argv += ["--from_weight", "none"]
    argv = _apply_setup(case, ws, work, argv) + case.flags

    # sentinels: a weights file and a resume file that must survive byte for byte
    out, ckpt = work / "out", work / "ckpt"
    out.mkdir(exist_ok=True)
    (out / f"sentinel_{H}.safetensors").write_bytes(b"sentinel weights")
    ckpt.mkdir(exist_ok=True)
    if not case.setup.startswith("resume_"):
        (ckpt / f"sentinel_{H}_resume.pt").write_bytes(b"sentinel resume")
    before = _snapshot(out, ckpt)
    capsys.readouterr()

    try:
        code = main(argv)
    except SystemExit as e:  # argparse: bad type or choice
        code = e.code
    err = capsys.readouterr().err

    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert errors, err
    assert case.expect.format(data=data) in errors[-1], err
    assert _snapshot(out, ckpt) == before


# --------------------------------------------------------------- what is dropped with a warning
def test_dpo_pairs_cut_off_by_max_seq_len_are_dropped_with_a_count(ws, tmp_path: Path, capsys) -> None:
    """Pairs whose prompt fills the row lose their answers: not trained (loss log 2, zero gradient
    for ever), but counted in one warning that names the flag; the others train."""
    rng = random.Random(3)
    long_q = " ".join(["the cat runs on the mat"] * 12)
    rows = [good_line("dpo", rng) for _ in range(30)]
    rows[::3] = [r.replace('"role": "user", "content": "', f'"role": "user", "content": "{long_q} ')
                 for r in rows[::3]]
    data = _write_lines(tmp_path / "d.jsonl", rows)
    argv = _argv("dpo", data, tmp_path, ws["tok"]) + ["--from_weight", str(ws["weights"]),
                                                      "--max_seq_len", "128"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "dropped 10 of 30 pairs" in err and "--max_seq_len 128" in err, err

    from minimind.data import ShardReader
    from minimind.data.dpo import DPODataset
    ds = DPODataset(ShardReader(tmp_path / "shards"), seq_len=128, seed=0, drop_cut_pairs=True)
    seen = {int(p) for r in range(ds.num_rows(0)) for p in ds.get_batch(0, [r]).pair_ids}
    assert seen == set(range(30)) - set(range(0, 30, 3))
    for r in range(ds.num_rows(0)):  # every packed pair has trained tokens on both sides
        b = ds.get_batch(0, [r])
        sides = {int(s) for s in b.seq_index[b.targets != -100].tolist()}
        assert sides == set(range(b.num_seqs))


def test_skip_bad_lines_trains_the_rest_and_counts(ws, tmp_path: Path, capsys) -> None:
    rng = random.Random(4)
    lines = [good_line("sft", rng) for _ in range(20)]
    lines[4] = FIELD_BAD_LINES["sft"]["assistant_first"]
    lines[9] = GENERIC_BAD_LINES["nested_100k"]
    data = _write_lines(tmp_path / "d.jsonl", lines)
    argv = _argv("sft", data, tmp_path, ws["tok"]) + ["--from_weight", "none", "--skip_bad_lines", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad line(s)" in err and f"{data}:5:" in err and f"{data}:10:" in err, err
    assert (tmp_path / "out" / f"sentinel_{H}.safetensors").is_file()
