#!/usr/bin/env python
"""Does anything AutoWU sees on the ramp tell how far its LR lies from the best one? A probe, not a method.

Every recorded ramp (the suite's, the held-out tasks' and the unseen ones', as `rule_probes.py` reads them) is
replayed through the real `hf_autowu.AutoWU` with the defaults (rewind off), and the LR it chose is scaled by each
multiplier `2 ** k` (`k` from -4 to 4 in quarters) and scored as `decisions.py` scores a replayed LR. Per task: the
multiplier with the lowest mean validation regret over its seeds (the one a perfect correction would apply), and
three features of the ramp, medians over its seeds:

- ``noise_over_fall``: the first losses' noise (`switch_test.start_noise_sd`) over the fall of the losses' level
  (`switch_test.level_fall`, medians of ten, as the blow-up rule reads it): how noisy the descent is;
- ``relative_fall``: that fall over the first level: how much of the loss the ramp removed (small for a fine-tune);
- ``growth_per_step``: the ramp's log-LR growth per step (large on a short budget);
- the descent's shape in LR, from the medians of ten consecutive losses (the level) and the geometric mean of their
  LRs: ``descent_width``, the LR where the level has made 90% of its fall over the LR where it made 10%;
  ``min_over_half``, the LR of the lowest level over the LR of half the fall; ``rise_after``, how far the level at
  the switch lies above its lowest, as a share of the fall.

Printed: the table, the correlation of each feature's log with the best multiplier's log2, and, leaving one of the
tasks that are not unseen out at a time, a least-squares line of the best log2 multiplier on each feature's log (or
its mean alone: a uniform bias) fitted on the others and applied to the one left out: its mean test regret against
the defaults' (multiplier 1). The unseen tasks are scored with the line fitted on all the others.

Usage: `python benchmarks/ideal_multiplier.py` (about 20 seconds; needs the `ramp`, `oracle` and `autowu_at` runs
of `quality.py` and `holdout.py`); writes `results/ideal_multiplier.json`.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from typing import Any

import decisions as d
import numpy as np
import torch
from report import regret

from hf_autowu import AutoWU
from hf_autowu.switch_test import LEVEL_WINDOW, level_fall, start_noise_sd

LOG2_MULTIPLIERS = np.arange(-4.0, 4.01, 0.25)
FEATURES = ("noise_over_fall", "relative_fall", "growth_per_step", "descent_width", "min_over_half", "rise_after")
SHAPE_FEATURES = FEATURES[3:]


def ramp_features(scheduler: AutoWU) -> dict[str, float]:
    """The `FEATURES` of the ramp a scheduler has seen (its losses up to the switch).

    Args:
        scheduler (`AutoWU`): A scheduler that has switched.

    Returns:
        `dict`: feature name to value (NaN when the ramp has fewer than `LEVEL_WINDOW` finite losses).
    """
    history = scheduler.losses.numpy()
    finite = history[np.isfinite(history)]
    growth = math.log(scheduler.config.max_lr / scheduler.config.min_lr) / scheduler.warmup_steps
    if finite.size < LEVEL_WINDOW:
        return {"noise_over_fall": math.nan, "relative_fall": math.nan, "growth_per_step": growth} | dict.fromkeys(
            SHAPE_FEATURES, math.nan
        )
    start = float(np.median(finite[:LEVEL_WINDOW]))
    fall = level_fall(history)
    return {
        "noise_over_fall": start_noise_sd(history) / fall if fall > 0 else math.inf,
        "relative_fall": fall / abs(start) if start != 0 else math.nan,
        "growth_per_step": growth,
    } | descent_shape(scheduler, history)


def descent_shape(scheduler: AutoWU, history: np.ndarray) -> dict[str, float]:
    """`SHAPE_FEATURES`: where in LR the level (medians of `LEVEL_WINDOW` consecutive finite losses, at the geometric
    mean of their LRs) made 10%, 50% and 90% of its fall, where it was lowest, and how far it rose after."""
    finite = np.isfinite(history)
    losses = history[finite]
    lrs = np.array([scheduler._ramp(i) for i in range(len(history))])[finite]
    windows = range(len(losses) - LEVEL_WINDOW + 1)
    level = np.array([np.median(losses[i : i + LEVEL_WINDOW]) for i in windows])
    at = np.array([math.exp(np.mean(np.log(lrs[i : i + LEVEL_WINDOW]))) for i in windows])
    lowest = int(np.argmin(level))
    fall = level[0] - level[lowest]
    if len(level) < 2 or fall <= 0:
        return dict.fromkeys(SHAPE_FEATURES, math.nan)

    def lr_at_share(share: float) -> float:
        return float(at[np.nonzero(level[: lowest + 1] <= level[0] - share * fall)[0][0]])

    return {
        "descent_width": lr_at_share(0.9) / lr_at_share(0.1),
        "min_over_half": float(at[lowest]) / lr_at_share(0.5),
        "rise_after": float(level[-1] - level[lowest]) / fall,
    }


def probe_case(case: dict[str, Any]) -> dict[str, Any]:
    """Per seed's ramp: the LR chosen, the features, and the regret at every multiplier (validation and test)."""
    best = d.best_metric(case["curves"], case["metric"])
    seeds = []
    for losses in case["ramps"]:
        scheduler = case["replay"](losses)
        lrs = [scheduler.peak_lr * 2.0**k for k in LOG2_MULTIPLIERS]
        seeds.append(
            {"lr": scheduler.peak_lr, "reason": scheduler.switch_reason, **ramp_features(scheduler)}
            | {
                split: [regret(d.proxy(case["scoring"][split], lr), best[split], case["metric"]) for lr in lrs]
                for split in ("val", "test")
            }
        )
    return {"group": case["group"], "seeds": seeds}


def best_log2_multiplier(row: dict[str, Any]) -> float:
    """The log2 multiplier with the lowest mean validation regret over a task's seeds."""
    return float(LOG2_MULTIPLIERS[int(np.argmin(np.mean([s["val"] for s in row["seeds"]], axis=0)))])


def test_regret_at(row: dict[str, Any], log2_multiplier: float) -> float:
    """A task's mean test regret over its seeds with their LRs times `2 ** log2_multiplier` (interpolated)."""
    return float(np.mean([np.interp(log2_multiplier, LOG2_MULTIPLIERS, s["test"]) for s in row["seeds"]]))


def log_feature(row: dict[str, Any], name: str) -> float:
    """The log of a task's median feature over its seeds."""
    return math.log(max(float(np.nanmedian([s[name] for s in row["seeds"]])), 1e-12))


def fitted_line(rows: dict[str, dict[str, Any]], feature: str | None) -> tuple[float, float]:
    """Least squares of the best log2 multiplier on `feature`'s log over `rows` (slope 0 for `None`, the mean)."""
    y = np.array([best_log2_multiplier(row) for row in rows.values()])
    if feature is None:
        return float(y.mean()), 0.0
    x = np.array([log_feature(row, feature) for row in rows.values()])
    intercept, slope = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), y, rcond=None)[0]
    return float(intercept), float(slope)


def predicted(row: dict[str, Any], feature: str | None, line: tuple[float, float]) -> float:
    """The log2 multiplier a fitted line gives a task."""
    return line[0] + (line[1] * log_feature(row, feature) if feature is not None else 0.0)


def summary(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The table, the correlations and the leave-one-task-out scores, as Markdown lines."""
    lines = [
        "| task | group | best multiplier | regret at 1 | regret at best | " + " | ".join(FEATURES) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in FEATURES) + " |",
    ]
    for task, row in sorted(rows.items(), key=lambda item: best_log2_multiplier(item[1])):
        best = best_log2_multiplier(row)
        features = " | ".join(f"{math.exp(log_feature(row, f)):.3g}" for f in FEATURES)
        lines.append(
            f"| {task} | {row['group']} | {2.0**best:.2f} | {test_regret_at(row, 0.0):+.2f} | "
            f"{test_regret_at(row, best):+.2f} | {features} |"
        )
    lines.append("")
    best = np.array([best_log2_multiplier(row) for row in rows.values()])
    for feature in FEATURES:
        x = np.array([log_feature(row, feature) for row in rows.values()])
        r = np.corrcoef(x, best)[0, 1] if x.std() > 0 and best.std() > 0 else math.nan
        lines.append(f"- correlation of log {feature} with log2 of the best multiplier: {r:+.2f}")
    choosing = {task: row for task, row in rows.items() if row["group"] != "unseen"}
    unseen = {task: row for task, row in rows.items() if row["group"] == "unseen"}
    default = np.mean([test_regret_at(row, 0.0) for row in choosing.values()])
    for feature in (None, *FEATURES):
        left_out = [
            test_regret_at(
                row, predicted(row, feature, fitted_line({t: r for t, r in choosing.items() if t != task}, feature))
            )
            for task, row in choosing.items()
        ]
        line = fitted_line(choosing, feature)
        on_unseen = np.mean([test_regret_at(row, predicted(row, feature, line)) for row in unseen.values()])
        lines.append(
            f"- {feature or 'uniform bias'}: leaving one of {len(choosing)} tasks out, mean test regret "
            f"{np.mean(left_out):.2f} (defaults {default:.2f}); unseen ({len(unseen)} tasks) {on_unseen:.2f} "
            f"(defaults {np.mean([test_regret_at(row, 0.0) for row in unseen.values()]):.2f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = d.probe_parser(__doc__.split("\n\n")[0], "ideal_multiplier.json").parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    cases = d.every_case(args.results, args.holdout)
    if len(cases) < 3:
        print("fewer than three tasks have both ramp and oracle runs", file=sys.stderr)
        return 2
    rows = {case["task"]: probe_case(case) for case in cases}
    print("\n".join(summary(rows)))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
