"""The demo's report: ``report.md`` with the figures of every step, plus PNG plots beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minimind.train.plots import plot_metrics


def _bar_chart(per_label: dict[str, dict[str, float]], out: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(per_label)
    kinds = sorted({k for v in per_label.values() for k in v})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(kinds) + 2), 3.8))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, [per_label[label].get(k, 0.0) for k in kinds], width=width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))], kinds, rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


_REJECTION_TEXT = {
    "wrong_value": "right format, wrong value",
    "wrong_format": "wrong format (bare value, sentence, ISO date; tool task: no call)",
    "truncated": "cut off before the value",
    "malformed_tool_call": "malformed tool call (unknown tool, or a tool not offered)",
}


def _dpo_section(ctx: Any, d: dict[str, Any]) -> list[str]:
    """Preference tuning: pairs, run, held-out preference accuracy before -> after, reward curves."""
    h = d["heldout"]
    train, held = d["pairs"]["train"], d["pairs"]["heldout"]
    mix = ", ".join(f"{k} {v}" for k, v in train["by_rejection"].items())
    kinds = ", ".join(train["by_kind"])
    intro = (f"{train['pairs']} training pairs from train-split tasks ({kinds}), {held['pairs']} held-out pairs "
             "from eval-split tasks. Chosen = the answer SFT trains on; rejected = a worse answer to the same "
             f"prompt ({mix}). {d['steps']} DPO steps from the SFT model (sigmoid loss, β {d['beta']}, "
             f"{_rpo(d)}lr {d['lr']}) in {d['seconds']} s; scoring the pairs before and after took {d['eval_seconds']} s.")
    acc, margin = h["logp_accuracy"], h["mean_logp_margin"]
    lines = ["## Preference tuning (DPO)", "", intro, "",
             "| held-out pairs | SFT model | DPO model |", "|---|---|---|",
             f"| log π(chosen) > log π(rejected) | {acc[0]:.2f} | **{acc[1]:.2f}** |",
             f"| mean log π(chosen) − log π(rejected) (nats) | {margin[0]:.2f} | {margin[1]:.2f} |"]
    for k, (b, a) in h.get("by_rejection", {}).items():
        lines.append(f"| … rejected: {_REJECTION_TEXT.get(k, k)} | {b:.2f} | {a:.2f} |")
    for k, (b, a) in h.get("by_kind", {}).items():
        lines.append(f"| … task: {k} | {b:.2f} | {a:.2f} |")
    tp = d.get("train_pairs")
    if tp:
        lines.append(f"| *{tp['n_pairs']} training pairs:* log π(chosen) > log π(rejected) | "
                     f"{tp['logp_accuracy'][0]:.2f} | {tp['logp_accuracy'][1]:.2f} |")
    reward = (f"Implicit reward β·(log π − log π_SFT) of the DPO model, the SFT model as reference, on held-out "
              f"pairs: chosen {h['mean_reward_chosen']:+.3f}, rejected {h['mean_reward_rejected']:+.3f}, margin "
              f"**{h['mean_reward_margin']:+.3f}**, positive on {h['reward_accuracy']:.0%} of the pairs")
    if tp:
        reward += f" (training pairs: margin {tp['mean_reward_margin']:+.3f}, positive on {tp['reward_accuracy']:.0%})"
    note = ("log π is summed over a reply's tokens, so of two replies the model finds equally unlikely the "
            "shorter one wins; the implicit reward compares each reply with the SFT model's own log-prob of it.")
    lines += ["", reward + ". " + note, ""]
    if d.get("train_margin"):
        m, pa = d["train_margin"], d["train_pref_accuracy"]
        batches = (f"On training batches the reward margin went {m[0]:+.3f} → {m[1]:+.3f} and the preference "
                   f"accuracy {pa[0]:.2f} → {pa[1]:.2f} (first and last logged steps).")
        lines += [batches, ""]
    metrics = ctx.artifacts.get("dpo_metrics")
    if metrics is not None and Path(metrics).exists():
        png = plot_metrics([metrics], ctx.out / "dpo.png",
                           keys=("reward_chosen", "reward_rejected", "margin", "pref_accuracy"),
                           title="DPO training batches: implicit rewards β·(log π − log π_SFT)")
        lines += [f"![DPO rewards]({png.name})", ""]
    return lines


def _grpo_data(g: dict[str, Any]) -> str:
    """What the GRPO prompts and groups held beyond the plain samples (month ends, guidance, retain)."""
    out = ""
    if "date_fact" in g["kinds"] and g.get("month_end_share") is not None:
        out += f" Month ends are {g['month_end_share']:.0%} of the next-day date prompts."
    if g.get("guidance"):
        out += (f" Off-policy guidance: a group with no right sample trains on the item's right reply in place of "
                f"its last sample ({g.get('guided_share', 0.0):.1%} of the groups).")
    if g.get("retain_kinds"):
        out += (f" Retain term: γ = {g['retain_coef']:g} times the KL from the start model on thinking-off "
                f"rows of the kinds GRPO does not train ({', '.join(g['retain_kinds'])}); over the last steps "
                f"it is {g['retain_kl_last']:.5f} nats per token.")
    return out


def _grpo_section(ctx: Any, g: dict[str, Any], task_eval: dict[str, Any]) -> list[str]:
    """GRPO: the run, training reward first -> last steps, held-out accuracy of its kinds before -> after."""
    lines = ["## Reinforcement learning (GRPO)", "",
             (f"{g['steps']} GRPO steps from `{g['from']}` in {g['seconds']} s ({g['sec_per_step_median']} s per step): "
              f"{g['prompts_per_step']} train-split prompts × {g['generations']} samples per step, kinds "
              f"{', '.join(g['kinds'])}, reward = the task checker (1 = exactly right), lr {g['lr']}.{_grpo_data(g)} "
              f"Mean training reward {g['train_reward_first']:.3f} (first steps) → {g['train_reward_last']:.3f} "
              f"(last steps)."), ""]
    before = next((task_eval[k] for k in ("dpo", "sft") if k in task_eval), None)
    after = task_eval.get("grpo")
    if before is not None and after is not None:
        def kinds_acc(v: dict[str, Any]) -> float:
            n = sum(v["n_per_kind"].get(k, 0) for k in g["kinds"])
            return sum(v["per_kind"].get(k, 0) * v["n_per_kind"].get(k, 0) for k in g["kinds"]) / max(n, 1)
        label = "dpo" if "dpo" in task_eval else "sft"
        lines += [f"| held-out, kinds trained by GRPO | {label.upper()} model | GRPO model |", "|---|---|---|"]
        mode = "thinking on" if g.get("sampled_with_thinking") else "thinking off"
        if "heldout_sampled_accuracy" in g:
            b, a = g["heldout_sampled_accuracy"]
            temp = f"{g.get('sampled_temperature', 1.0):g}"
            lines.append(f"| {g['heldout_items']} items × {g['generations']} samples at temperature {temp}, {mode} (what "
                         f"GRPO optimises): share exactly right | {b:.3f} | **{a:.3f}** |")
        if "heldout_pass_at_n" in g:
            b, a = g["heldout_pass_at_n"]
            lines.append(f"| … items with at least one right sample (pass@{g['generations']}) | {b:.3f} | {a:.3f} |")
        n_items = sum(before["n_per_kind"].get(k, 0) for k in g["kinds"])
        modes = [("thinking off", before, after)]
        if "thinking" in before and "thinking" in after:
            modes.append(("thinking on", before["thinking"], after["thinking"]))
        for name, b, a in modes:
            lines.append(f"| greedy, {name}: exact accuracy ({n_items} items) | {kinds_acc(b):.3f} | "
                         f"**{kinds_acc(a):.3f}** |")
            lines += [f"| … {k} | {b['per_kind'].get(k, 0):.3f} | {a['per_kind'].get(k, 0):.3f} |" for k in g["kinds"]]
            if a.get("vs_start"):
                lines.append(_paired_row(a["vs_start"]))
        others = [k for k in after["per_kind"] if k not in g["kinds"]]
        if others:
            drops = ", ".join(f"{k} {before['per_kind'].get(k, 0):.2f} → {after['per_kind'][k]:.2f}" for k in others)
            lines.append(f"| kinds GRPO did not train, greedy, thinking off | {drops} | |")
        if g.get("untrained_reply_kl"):
            kls = ", ".join(f"{k} {v:.5f}" for k, v in g["untrained_reply_kl"].items())
            lines.append(f"| … their drift before it flips an answer: KL(start ‖ GRPO) per reply token, "
                         f"held-out items | | {kls} |")
        lines.append("")
    metrics = ctx.artifacts.get("grpo_metrics")
    if metrics is not None and Path(metrics).exists():
        png = plot_metrics([metrics], ctx.out / "grpo.png", keys=("reward", "completion_len", "entropy"),
                           title="GRPO: mean reward of the sampled answers per step")
        lines += [f"![GRPO reward]({png.name})", ""]
    return lines


def _paired_row(c: dict[str, Any]) -> str:
    """The item-by-item change as a table row: how far the lift stands from noise."""
    return (f"| … item by item: fixed / broken of {c['n']}, change ± standard error in points (items as "
            f"draws / the {c['problems']} distinct problems as draws), exact McNemar p | | {c['fixed']} / "
            f"{c['broken']}: {100 * c['delta']:+.1f} ± {100 * c['se']:.1f} / ± {100 * c['se_problems']:.1f}, "
            f"p {c['mcnemar_p']:.3f} |")


def _thinking_table(t: dict[str, Any]) -> list[str]:
    """Held-out exact accuracy per kind with thinking off (empty think block) and on (open ``<think>``)."""
    labels = [label for label, v in t.items() if "thinking" in v]
    if not labels:
        return []
    intro = ("The same held-out prompts, greedy, rendered with the default generation prompt (an empty, closed "
             "think block) and with `open_thinking` (an open `<think>` block: the model writes its reasoning, "
             "closes the block and answers; graded on the answer after `</think>`).")
    lines = ["### Thinking off vs on", "", intro, "",
             "| kind | " + " | ".join(f"{lb} off | {lb} on" for lb in labels) + " |",
             "|---|" + "---:|---:|" * len(labels)]
    kinds = sorted({k for lb in labels for k in t[lb]["per_kind"]})
    for k in kinds:
        cells = [f"{t[lb]['per_kind'].get(k, 0):.2f} | {t[lb]['thinking']['per_kind'].get(k, 0):.2f}" for lb in labels]
        n, distinct = t[labels[0]]["n_per_kind"].get(k, 0), t[labels[0]].get("distinct_per_kind", {}).get(k)
        shown = f"n={n}" if distinct in (None, n) else f"n={n}, {distinct} distinct"
        lines.append(f"| {k} ({shown}) | " + " | ".join(cells) + " |")
    lines.append("| **all** | " + " | ".join(f"**{t[lb]['accuracy']:.2f}** | **{t[lb]['thinking']['accuracy']:.2f}**"
                                          for lb in labels) + " |")
    lines.append("| think block closed (on) | " + " | ".join(f"– | {t[lb]['thinking']['think_closed']:.2f}"
                                                          for lb in labels) + " |")
    lines.append("")
    for lb in labels[:1]:
        shown: set[str] = set()
        for smp in t[lb]["thinking"]["samples"]:
            if smp["kind"] in shown:
                continue
            shown.add(smp["kind"])
            mark = "✓" if smp["correct"] else "✗"
            lines.append(f"- {lb}, thinking on: {mark} `{smp['kind']}` — {smp['prompt'][:100]!r} → {smp['output'][:200]!r}")
        lines.append("")
    return lines


def write_report(ctx: Any) -> Path:
    out: Path = ctx.out
    r = ctx.results
    lines = ["# MiniMind demo report", ""]
    lines += ["Everything below was built and trained on this machine by `minimind demo`.", ""]

    if "corpus" in r:
        lines += ["## Corpus", "", "```json", json.dumps(r["corpus"], ensure_ascii=False, indent=1)[:3000],
                  "```", ""]

    if "pretrain" in r:
        p = r["pretrain"]
        lines += ["## Pretraining", "",
                  "| held-out bits per byte | value |", "|---|---|",
                  f"| random init | {_fmt(p['heldout_bpb_before'])} |",
                  f"| unigram baseline | {_fmt(p['unigram_bpb'])} |",
                  f"| after pretraining | **{_fmt(p['heldout_bpb_after'])}** |", "",
                  (f"{p['steps']} steps in {p['seconds']} s, {p['useful_tokens_per_s']} useful tokens/s, "
                   f"final loss {_fmt(p['final_loss'])}."), ""]
        plots = [ctx.artifacts[k] for k in ("pretrain_metrics", "sft_metrics") if k in ctx.artifacts]
        if plots:
            png = plot_metrics(plots, out / "loss.png", keys=("loss", "lr"), title="training loss")
            lines += [f"![loss curves]({png.name})", ""]

    if "sft" in r:
        s = r["sft"]
        lines += ["## SFT", "", f"{s['steps']} steps in {s['seconds']} s, final loss {_fmt(s['final_loss'])}.", ""]

    if "dpo" in r:
        lines += _dpo_section(ctx, r["dpo"])

    if "grpo" in r:
        lines += _grpo_section(ctx, r["grpo"], r.get("task_eval", {}))

    if "task_eval" in r:
        t = r["task_eval"]
        lines += ["## Held-out tasks (greedy decoding, same prompts)", "",
                  "| kind | " + " | ".join(t) + " |", "|---|" + "---|" * len(t)]
        kinds = sorted({k for v in t.values() for k in v["per_kind"]})
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(f"{v['per_kind'].get(k, 0):.2f}" for v in t.values()) + " |")
        lines.append("| **all** | " + " | ".join(f"**{v['accuracy']:.2f}**" for v in t.values()) + " |")
        for key, text in (("accuracy_non_knowledge", "answerable from the prompt (all but idioms, dictionary)"),
                          ("accuracy_knowledge", "needing memorised facts (idioms, dictionary)"),
                          ("tool_call_exact", "tool call: right tool, exactly the right arguments"),
                          ("tool_final_accuracy", "tool task, final answer after the executed call (2 rounds)")):
            if any(key in v for v in t.values()):
                lines.append(f"| {text} | " + " | ".join(f"{v[key]:.2f}" if key in v else "–" for v in t.values())
                             + " |")
        n = next(iter(t.values())).get("n")
        lines += ["", f"Exact accuracy on {n} held-out tasks (items never trained on)." if n else ""]
        lines.append("")
        if all("format_per_kind" in v for v in t.values()):
            lines += ["Well-formed answers (the reply has the answer's shape, right or wrong):", "",
                      "| kind | " + " | ".join(t) + " |", "|---|" + "---|" * len(t)]
            for k in kinds:
                lines.append(f"| {k} | " + " | ".join(f"{v['format_per_kind'].get(k, 0):.2f}" for v in t.values()) + " |")
            lines.append("| **all** | " + " | ".join(f"**{v['format_rate']:.2f}**" for v in t.values()) + " |")
            lines.append("")
        lines += _thinking_table(t)
        bars = {f"{label} correct": v["per_kind"] for label, v in t.items()}
        bars.update({f"{label} well-formed": v["format_per_kind"] for label, v in t.items()
                     if "format_per_kind" in v})
        png = _bar_chart(bars, out / "tasks.png", "held-out tasks: correct and well-formed answers")
        lines += [f"![task accuracy]({png.name})", "", "### Samples", ""]
        for label, v in t.items():
            lines += [f"**{label}**", ""]
            seen: set[str] = set()
            for smp in v["samples"]:
                if smp["kind"] in seen:
                    continue
                seen.add(smp["kind"])
                mark = "✓" if smp["correct"] else "✗"
                lines += [f"- {mark} `{smp['kind']}` — {smp['prompt'][:120]!r} → {smp['output'][:160]!r}"]
            for smp in v.get("tool_final_samples", [])[:2]:
                mark = "✓" if smp["correct"] else "✗"
                lines.append(f"- {mark} `tool_call` final answer after the tool result — {smp['prompt'][:120]!r} → "
                             f"{smp['final'][:160]!r}")
            lines.append("")

    # the same "Training runs" section `minimind report` writes, for every stage that trained
    from minimind.eval.report import training_sections
    runs = [Path(ctx.artifacts[k]) for k in ("pretrain_metrics", "sft_metrics", "dpo_metrics", "grpo_metrics")
            if k in ctx.artifacts and Path(ctx.artifacts[k]).exists()]
    lines += training_sections(runs, out, out / "report_files")

    lines += ["## Timings (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ctx.timings.items()]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"results": r, "timings": ctx.timings}, ensure_ascii=False,
                                                 indent=1, default=str), encoding="utf-8")
    return report


def _rpo(d: dict) -> str:
    """``RPO α 0.3, `` when the chosen answers' NLL was added to the DPO loss."""
    return f"RPO α {d['rpo_alpha']} (the chosen answers' NLL added), " if d.get("rpo_alpha") else ""
