#!/usr/bin/env python
"""Which recorded AutoWU rows a rule probe's patch can alter: the first step before adopting a probe as the default.

Every AutoWU row whose losses are recorded (``quality.py``'s defaults; ``holdout.py``'s defaults, its two rewind rows
and its ``slowed_fraction`` rows) is replayed through the real `hf_autowu.AutoWU`, first as it is, which must
reproduce the row's recorded switch step, reason and LR exactly (a row that does not is a mismatch: its decisions
cannot be read off its losses), then under the patch of ``rule_probes.py``'s `--probe`. A row whose switch step,
reason or LR changes under the patch is one that would have to be run again; every other row decides as now, bit for
bit, since a run's training up to its switch depends only on the ramp, and after it only on the switch.

    python benchmarks/probe_rows.py --probe "mean 3"

Prints the mismatches and the rows altered; exit code 1 when a row's replay does not reproduce it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import holdout
import rule_probes
import torch
from common import RESULTS_DIR

Decision = tuple[int | None, str | None, float]


def holdout_options(setting: str) -> dict[str, float] | None:
    """The options `holdout.py` trained its rows labelled `setting` with: the defaults, each of
    `holdout.REWIND_SETTINGS`, each ``slowed_fraction F``; None for the others (the paper preset, with no divergence
    guard and no spike watch, has no blow-up rule for a probe to alter; oracle, ramp and baseline rows are not
    AutoWU's defaults)."""
    if setting.startswith("defaults ("):
        return {}
    if setting in holdout.REWIND_SETTINGS:
        return {"rewind_min_shift": holdout.REWIND_SETTINGS[setting]}
    if setting.startswith("slowed_fraction "):
        return {"slowed_fraction": float(setting.split()[1])}
    return None


def recorded_rows(quality_path: Path, holdout_path: Path) -> list[dict[str, Any]]:
    """The AutoWU rows with recorded losses: each with its key, losses, budget, options and recorded decision."""
    rows = []
    if quality_path.exists():
        for key, run in json.loads(quality_path.read_text())["runs"].items():
            if run.get("method") == "autowu" and run.get("losses"):
                info = run["info"]
                decision = (info["switch_step"], info["switch_reason"], info["peak_lr"])
                rows.append(
                    {"key": key, "losses": run["losses"], "steps": run["steps"], "options": {}, "decision": decision}
                )
    if holdout_path.exists():
        for key, run in json.loads(holdout_path.read_text())["runs"].items():
            _, setting, _, steps = key.split("|")
            if (options := holdout_options(setting)) is not None and run.get("losses"):
                decision = (run["switch_step"], run["switch_reason"], run["lr"])
                rows.append(
                    {
                        "key": key,
                        "losses": run["losses"],
                        "steps": int(steps),
                        "options": options,
                        "decision": decision,
                    }
                )
    return rows


def replayed(row: dict[str, Any], variant: str) -> Decision:
    """The switch step, reason and LR of `row`'s losses replayed under `variant` (``rule_probes.DEFAULT``: as is)."""
    with rule_probes.patched(variant):
        scheduler = holdout.replay(row["losses"], row["steps"], **row["options"])
    return scheduler.switch_step, scheduler.switch_reason, scheduler.peak_lr


def same(a: Decision, b: Decision) -> bool:
    """Whether two decisions are the same (the LRs to float rounding of their logs)."""
    return a[:2] == b[:2] and math.isclose(a[2], b[2], rel_tol=1e-9)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", required=True, help=f"one of: {', '.join(rule_probes.PATCHES)}")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quality.json", help="quality.py's results")
    parser.add_argument("--holdout", type=Path, default=RESULTS_DIR / "holdout.json", help="holdout.py's results")
    args = parser.parse_args(argv)
    if args.probe not in rule_probes.PATCHES:
        parser.error(f"--probe must be one of {', '.join(rule_probes.PATCHES)}, got {args.probe!r}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    rows = recorded_rows(args.results, args.holdout)
    mismatches, altered = [], []
    for row in rows:
        now = replayed(row, rule_probes.DEFAULT)
        if not same(now, tuple(row["decision"])):
            mismatches.append((row["key"], row["decision"], now))
        under = replayed(row, args.probe)
        if not same(under, now):
            altered.append((row["key"], now, under))
    print(f"{len(rows)} rows replayed; {len(mismatches)} do not reproduce their recorded decision")
    for key, recorded, now in mismatches:
        print(f"- mismatch {key}: recorded {recorded}, replayed {now}")
    print(f"{len(altered)} rows altered by {args.probe!r} (switch step, reason, LR: now -> under the probe):")
    for key, now, under in altered:
        print(f"- {key}: {now[0]} {now[1]} {now[2]:.3g} -> {under[0]} {under[1]} {under[2]:.3g}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
