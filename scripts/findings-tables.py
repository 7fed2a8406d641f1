#!/usr/bin/env python3
"""Turns what scripts/findings.sh saved (docs/findings/*.json) into the Markdown tables of
docs/cpt-findings.md, written to docs/findings/tables.md."""

import json
import pathlib
import sys

OUT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/findings")
lr = json.loads((OUT / "lr-sweep.json").read_text())
replay = json.loads((OUT / "replay-sweep.json").read_text())
series = json.loads((OUT / "series.json").read_text())


def pct(x):
    return f"{100 * x:+.1f}%"


def sweep_table(sweep, label):
    general_set = sweep["base"]["eval_data"]["general"]
    rows = [f"| {label} | domain ppl 0 → final (Δ) | best (step) | general ppl 0 → final (Δ) | domain bits/byte | general bits/byte | tokens | wall |",
            "| --- | --- | --- | --- | --- | --- | ---: | ---: |"]
    for job in sweep["jobs"]:
        d, g = job["eval"]["domain"], job["eval"]["general"]
        rows.append(
            f"| {point(job, general_set)} | {d['initial']:.2f} → {d['final']:.2f} ({pct(d['change'])}) | {d['best']:.2f} ({d['best_step']}) "
            f"| {g['initial']:.2f} → {g['final']:.2f} ({pct(g['change'])}) "
            f"| {d['bits_per_byte_initial']:.3f} → {d['bits_per_byte_final']:.3f} | {g['bits_per_byte_initial']:.3f} → {g['bits_per_byte_final']:.3f} "
            f"| {job['tokens_total']} | {job['wall_seconds'] / 60:.1f} min |")
    return "\n".join(rows)


def point(job, general_set):
    """A job's grid point: its peak lr, or the share of general text in its training mixture."""
    value = job["point"]
    if "lr" in value:
        return f"peak lr {value['lr']:g}"
    sources = value["train_data"]
    general = sum(s.get("weight", 1.0) for s in sources if s["dataset"] == general_set)
    return f"replay {100 * general / sum(s.get('weight', 1.0) for s in sources):.0f}%"


def curve(name, set_name):
    return {step: ppl for step, s, ppl, _ in series[name]["eval"] if s == set_name}


def course_table(names, steps):
    rows = ["| job | set | " + " | ".join(f"step {s}" for s in steps) + " | max train loss, steps 1–6 (step 1) |",
            "| --- | --- | " + " | ".join("---:" for _ in steps) + " | ---: |"]
    for name in names:
        losses = [loss for step, loss, _ in series[name]["loss"] if step <= 6]
        for set_name in ("domain", "general"):
            c = curve(name, set_name)
            cells = " | ".join(f"{c[s]:.1f}" if s in c else "–" for s in steps)
            loss = f"{max(losses):.2f} ({losses[0]:.2f})" if set_name == "domain" else ""
            rows.append(f"| {name} | {set_name} | {cells} | {loss} |")
    return "\n".join(rows)


def find(prefix):
    return next(name for name in series if name.startswith(prefix))


lines = ["## Re-warming: the first steps", "",
         course_table([find("constant lr"), find("peak lr [lr=0.0003]"), find("peak lr [lr=0.001]"), find("peak lr [lr=0.003]")],
                      [0, 3, 6, 9, 12, 30]),
         "", "## Peak learning rate (warmup 3 steps, cosine to 10%, 10% replay)", "", sweep_table(lr, "job"),
         "", "## Replay of general text (peak lr 1e-3)", "", sweep_table(replay, "job")]

budget = series[find("lr 3e-3, general budget")]
crossing = budget["forgetting_budget"][0] if budget["forgetting_budget"] else None
unbudgeted = curve(find("peak lr [lr=0.003]"), "general")
lines += ["", "## A forgetting budget that pauses (peak lr 3e-3, general +10%)", ""]
if crossing:
    lines.append(f"The job ended **{budget['state']}** at step {crossing['step']}, its first eval past the bound: general perplexity "
                 f"{crossing['perplexity']:.1f} against {crossing['baseline']:.2f} at step 0, a rise of {pct(crossing['rise'])} "
                 f"(bound {pct(crossing['max_rise'])}); its last step event is step {max(s for s, _, _ in budget['loss'])}. "
                 f"Without the budget the same run went on to general perplexity "
                 f"{max(unbudgeted.values()):.0f} (step {max(unbudgeted, key=unbudgeted.get)}) and ended at {unbudgeted[max(unbudgeted)]:.1f}.")
else:
    lines.append(f"No crossing recorded; the job is {budget['state']}.")

child = series[find("constant lr 3e-5 (continued)")]
parent = series[find("constant lr 3e-5")]
lineage = child["lineage"]
parent_end = {s: p for step, s, p, _ in parent["eval"] if step == max(x[0] for x in parent["eval"])}
child_start = {s: p for step, s, p, _ in child["eval"] if step == 0}
child_end_step = max(x[0] for x in child["eval"])
child_end = {s: p for step, s, p, _ in child["eval"] if step == child_end_step}
lines += ["", "## A continued job", "",
          f"`POST /v1/jobs/{{constant}}/continue {{\"max_steps\": 15}}` made job {child['job_id']} (state {child['state']}): "
          f"lineage step offset {lineage['step_offset']}, tokens {lineage['tokens_offset']} + {lineage['tokens_total'] - lineage['tokens_offset']} "
          f"= {lineage['tokens_total']}. Its step-0 eval equals its parent's final one "
          f"(domain {parent_end['domain']:.3f} → {child_start['domain']:.3f}, general {parent_end['general']:.3f} → {child_start['general']:.3f}), "
          f"and at lineage step {lineage['step_offset'] + child_end_step} it reads domain {child_end['domain']:.2f}, general {child_end['general']:.2f}."]
(OUT / "tables.md").write_text("\n".join(lines) + "\n")
print((OUT / "tables.md").read_text())
