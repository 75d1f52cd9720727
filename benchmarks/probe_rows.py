#!/usr/bin/env python
"""Which recorded AutoWU rows a rule probe's patch can alter: the first step before adopting a probe as the default.

Every AutoWU row whose losses are recorded (``quality.py``'s defaults; ``holdout.py``'s defaults, its two rewind rows
and its ``slowed_fraction`` rows) is replayed through the real `hf_autowu.AutoWU`, first as it is, which must
reproduce the row's recorded switch step, reason and LR exactly (a row that does not is a mismatch: its decisions
cannot be read off its losses), then under the patch of ``rule_probes.py``'s `--probe`. A row whose switch step,
reason or LR changes under the patch is one that would have to be run again; every other row decides as now, bit for
bit, since a run's training up to its switch depends only on the ramp, and after it only on the switch.

    python benchmarks/probe_rows.py --probe "mean 3"

With ``--at`` the ``autowu_at`` rows (AutoWU's schedule with its peak forced to a grid LR) are replayed too: their
LR is forced, so only their switch step and reason must reproduce and count as altered. Once a probe is adopted
(the decision code changed), ``--drop`` removes the rows the code no longer reproduces from the results files, so
that ``quality.py`` and ``holdout.py`` (resumable) run them again; run without ``--probe`` it replays them as they
are, nothing else::

    python benchmarks/probe_rows.py --probe "swing 2 1" --at   # before: the rows the probe alters
    python benchmarks/probe_rows.py --at --drop                 # after adopting it: the same rows, removed

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
from common import RESULTS_DIR, locked_json

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


def recorded_rows(quality_path: Path, holdout_path: Path, forced: bool = False) -> list[dict[str, Any]]:
    """The AutoWU rows with recorded losses: each with its file, key, losses, budget, options, recorded decision and
    whether its LR was forced (then only the switch step and reason are compared). With `forced`, the
    ``autowu_at`` rows too (the defaults, their peak forced to a grid LR)."""
    rows = []
    if quality_path.exists():
        for key, run in json.loads(quality_path.read_text())["runs"].items():
            at = run.get("method") == "autowu_at"
            if (run.get("method") == "autowu" or (forced and at)) and run.get("losses"):
                info = run["info"]
                decision = (info["switch_step"], info["switch_reason"], info["peak_lr"])
                rows.append(
                    {
                        "file": quality_path,
                        "key": key,
                        "losses": run["losses"],
                        "steps": run["steps"],
                        "options": {},
                        "decision": decision,
                        "forced": at,
                    }
                )
    if holdout_path.exists():
        for key, run in json.loads(holdout_path.read_text())["runs"].items():
            _, setting, _, steps = key.split("|")
            at = setting.startswith("autowu_at ")
            options = {} if forced and at else holdout_options(setting)
            if options is not None and run.get("losses"):
                decision = (run["switch_step"], run["switch_reason"], run["lr"])
                rows.append(
                    {
                        "file": holdout_path,
                        "key": key,
                        "losses": run["losses"],
                        "steps": int(steps),
                        "options": options,
                        "decision": decision,
                        "forced": at,
                    }
                )
    return rows


def replayed(row: dict[str, Any], variant: str) -> Decision:
    """The switch step, reason and LR of `row`'s losses replayed under `variant` (``rule_probes.DEFAULT``: as is)."""
    with rule_probes.patched(variant):
        scheduler = holdout.replay(row["losses"], row["steps"], **row["options"])
    return scheduler.switch_step, scheduler.switch_reason, scheduler.peak_lr


def same(a: Decision, b: Decision, forced: bool = False) -> bool:
    """Whether two decisions are the same (the LRs to float rounding of their logs; with `forced`, the switch step and
    reason alone)."""
    return a[:2] == b[:2] and (forced or math.isclose(a[2], b[2], rel_tol=1e-9))


def drop(rows: list[dict[str, Any]]) -> None:
    """Remove `rows` from the results files they were read from."""
    for path in {row["file"] for row in rows}:
        with locked_json(path, {"runs": {}}) as data:
            for row in rows:
                if row["file"] == path:
                    del data["runs"][row["key"]]


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", default=None, help=f"one of: {', '.join(rule_probes.PATCHES)}")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quality.json", help="quality.py's results")
    parser.add_argument("--holdout", type=Path, default=RESULTS_DIR / "holdout.json", help="holdout.py's results")
    parser.add_argument("--at", action="store_true", help="replay the autowu_at rows too (switch step and reason)")
    parser.add_argument("--drop", action="store_true", help="remove the rows the code as it is does not reproduce")
    args = parser.parse_args(argv)
    if args.probe is not None and args.probe not in rule_probes.PATCHES:
        parser.error(f"--probe must be one of {', '.join(rule_probes.PATCHES)}, got {args.probe!r}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    rows = recorded_rows(args.results, args.holdout, forced=args.at)
    mismatches, altered = [], []
    for row in rows:
        now = replayed(row, rule_probes.DEFAULT)
        if not same(now, tuple(row["decision"]), row["forced"]):
            mismatches.append((row, row["decision"], now))
        if args.probe is not None and not same(under := replayed(row, args.probe), now, row["forced"]):
            altered.append((row, now, under))
    print(f"{len(rows)} rows replayed; {len(mismatches)} do not reproduce their recorded decision")
    for row, recorded, now in mismatches:
        print(f"- mismatch {row['key']}: recorded {recorded}, replayed {now}")
    if args.probe is not None:
        print(f"{len(altered)} rows altered by {args.probe!r} (switch step, reason, LR: now -> under the probe):")
        for row, now, under in altered:
            print(f"- {row['key']}: {now[0]} {now[1]} {now[2]:.3g} -> {under[0]} {under[1]} {under[2]:.3g}")
    if args.drop:
        drop([row for row, _, _ in mismatches])
        print(f"removed the {len(mismatches)} rows that do not reproduce; quality.py and holdout.py run them again")
        return 0
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
