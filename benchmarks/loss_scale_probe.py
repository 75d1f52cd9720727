#!/usr/bin/env python
"""Probe (not a method): would AutoWU choose better LRs if it read the logarithm of the loss instead of the loss?

A loss that falls by decades (a regression's squared error on unscaled targets: `holdout_tasks.friedman_mlp_adamw`)
puts almost all of its descent in the first drop, so on the loss's own scale a later, slower fall that still halves
it looks flat. On a log scale every halving weighs the same. This replays every recorded ramp twice through the real
`hf_autowu.AutoWU`, as `decisions.py` does (rewind off, the defaults otherwise): once fed each loss, once fed its
natural logarithm (what a user gets with `scheduler.step(loss.log())`). The chosen LRs are scored as `decisions.py`
scores them (the suite's with AutoWU's own schedule at each grid peak, `autowu_at`; the held-out tasks' with their
oracle's grid), as regret in units of 0.5 pp or 1% of the oracle's loss, and leaving one task out picks the scale
with the lower mean validation regret on the other tasks. The held-out tasks of role ``unseen`` are scored but take
no part in that choice.

Usage: `python benchmarks/loss_scale_probe.py` (about a minute; needs the `ramp` and `oracle` runs of `quality.py`
and `holdout.py`); prints a Markdown table and writes `results/loss_scale_probe.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import decisions as d
import numpy as np
import torch
from common import RESULTS_DIR
from report import regret
from runner import recorded_runs

SCALES = ("loss", "log")


def fed(losses: list[float | None], scale: str) -> list[float]:
    """The ramp's losses as AutoWU is fed them on `scale` (NaN for a missing loss, as `decisions.replay` reads it)."""
    values = [math.nan if x is None else float(x) for x in losses]
    if scale == "log":
        return [math.log(x) if x > 0 else math.nan for x in values]
    return values


def probe_case(case: dict[str, Any]) -> dict[str, Any]:
    """Per scale: the LR chosen on each seed's ramp, its switch step, and the mean validation and test regret."""
    best = d.best_metric(case["curves"], case["metric"])
    row: dict[str, Any] = {"group": case["group"]}
    for scale in SCALES:
        switched = [case["replay"](fed(losses, scale)) for losses in case["ramps"]]
        lrs = [s.peak_lr for s in switched]
        row[scale] = {
            split: float(
                np.mean([regret(d.proxy(case["scoring"][split], lr), best[split], case["metric"]) for lr in lrs])
            )
            for split in ("val", "test")
        } | {"lrs": lrs, "switch": [s.switch_step for s in switched]}
    return row


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The per-task table, the means per group and over the tasks that choose, and the leave-one-task-out result."""
    lines = [
        "| task | group | test regret, loss | test regret, log | LRs, loss | LRs, log |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, row in rows.items():
        lines.append(
            f"| {task} | {row['group']} | {row['loss']['test']:+.2f} | {row['log']['test']:+.2f} | "
            + " ".join(f"{lr:.2g}" for lr in row["loss"]["lrs"])
            + " | "
            + " ".join(f"{lr:.2g}" for lr in row["log"]["lrs"])
            + " |"
        )
    lines.append("")
    for group in dict.fromkeys(row["group"] for row in rows.values()):
        members = [row for row in rows.values() if row["group"] == group]
        means = {scale: np.mean([row[scale]["test"] for row in members]) for scale in SCALES}
        lines.append(
            f"- {group} ({len(members)} tasks): mean test regret {means['loss']:.2f} on the loss, "
            f"{means['log']:.2f} on its log"
        )
    choosing = [task for task, row in rows.items() if row["group"] != "unseen"]
    folds = []
    for left_out in choosing:
        others = [t for t in choosing if t != left_out]
        pick = min(SCALES, key=lambda scale: np.mean([rows[t][scale]["val"] for t in others]))
        folds.append((pick, rows[left_out][pick]["test"]))
    if folds:
        picks = sorted({pick for pick, _ in folds})
        lines.append(
            f"- leaving one of {len(choosing)} tasks out: picks {', '.join(picks)}; mean test regret on the left-out "
            f"tasks {np.mean([value for _, value in folds]):.2f} (the loss's own scale held fixed: "
            f"{np.mean([rows[t]['loss']['test'] for t in choosing]):.2f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quality.json", help="quality.py's results")
    parser.add_argument("--holdout", type=Path, default=RESULTS_DIR / "holdout.json", help="holdout.py's results")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "loss_scale_probe.json", help="where to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    held_out = d.held_out_cases(args.holdout, roles=("chosen-on", "fresh", "unseen"))
    cases = d.suite_cases(recorded_runs(args.results)) + held_out
    if not cases:
        print("no task has both ramp and oracle runs yet", file=sys.stderr)
        return 2
    rows = {case["task"]: probe_case(case) for case in cases}
    print("\n".join(table(rows)))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
