#!/usr/bin/env python
"""Real runs of a rule probe: AutoWU's defaults and one of ``rule_probes.py``'s patches, side by side on this CPU.

``rule_probes.py`` replays recorded ramps and scores the LRs a rule would choose by interpolating forced-peak runs;
this script trains with the rule instead. Each task (of ``quality.py`` or ``holdout.py``) and seed is trained twice
on the same machine, with AutoWU's defaults and under the patch, so float rounding that differs between CPUs does
not enter the comparison.

    python benchmarks/probe_runs.py --probe "mean 5" --tasks gru_adafactor,gpt2_classifier
    python benchmarks/probe_runs.py --probe "mean 5" --tasks vit_digits --seeds 0,1,2,3,4

Runs are recorded in ``results/probe_runs.json`` as they finish (a rerun skips them: resumable, and several
processes can share the work); the printed table gives, per task, each side's mean test metric and LR chosen and
the difference in tolerance units (0.5 pp of accuracy, or 1% of the defaults' mean loss; negative: the probe is
better).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import holdout
import rule_probes
from common import RESULTS_DIR, cpu_name, locked_json
from runner import _alive, decision_fingerprint, library_revision
from tasks import TASKS as SUITE_TASKS

DEFAULTS = "defaults"
TASK_NAMES = (*SUITE_TASKS, *holdout.TASKS)


def run(task_name: str, seed: int, probe: str | None) -> dict[str, Any]:
    """Train `task_name` once with AutoWU's defaults, under `probe`'s patch when given."""
    with rule_probes.patched(probe or rule_probes.DEFAULT):  # the defaults' variant patches nothing
        if task_name in SUITE_TASKS:
            task = SUITE_TASKS[task_name]
            result = task.runner(task, "autowu", seed, None)
            info = result.info or {}
            row = {"val": result.val, "test": result.test, "metric": task.metric}
            row |= {"lr": info.get("peak_lr"), "switch_step": info.get("switch_step")}
            row["switch_reason"] = info.get("switch_reason")
        else:
            task = holdout.TASKS[task_name]
            result = holdout.run(task, task.steps, seed, None)
            row = {key: result[key] for key in ("val", "test", "lr", "switch_step", "switch_reason")}
            row["metric"] = task.metric
    return row | {"machine": cpu_name(), "revision": library_revision(), "fingerprint": decision_fingerprint()}


def difference(task_rows: dict[str, list[dict[str, Any]]], probe: str) -> float:
    """The probe's mean test metric minus the defaults', in tolerance units (positive: the probe is worse)."""
    default, patched = (statistics.mean(r["test"] for r in task_rows[label]) for label in (DEFAULTS, probe))
    if task_rows[DEFAULTS][0]["metric"] == "accuracy":
        return (default - patched) * 100 / 0.5
    return (patched - default) / (0.01 * default)


def table(runs: dict[str, dict[str, Any]], probe: str, tasks: list[str], seeds: list[int]) -> list[str]:
    """A row per task with both sides recorded for every seed; the mean difference over those tasks."""
    lines = [
        f"| task | defaults: test | `{probe}`: test | defaults: LR | `{probe}`: LR | runs changed | difference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    differences = []
    for task in tasks:
        rows = {label: [runs.get(f"{label}|{task}|{s}") for s in seeds] for label in (DEFAULTS, probe)}
        if any(r is None for side in rows.values() for r in side):
            continue
        scale = 100 if rows[DEFAULTS][0]["metric"] == "accuracy" else 1
        cells = [f"{scale * statistics.mean(r['test'] for r in rows[label]):.4g}" for label in (DEFAULTS, probe)]
        cells += [f"{statistics.geometric_mean(r['lr'] for r in rows[label]):.3g}" for label in (DEFAULTS, probe)]
        changed = sum(a["test"] != b["test"] for a, b in zip(rows[DEFAULTS], rows[probe], strict=True))
        differences.append(difference(rows, probe))
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {changed}/{len(seeds)} | {differences[-1]:+.2f} |")
    if differences:
        lines += ["", f"Mean difference over {len(differences)} tasks: {statistics.mean(differences):+.2f}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", required=True, help=f"one of: {', '.join(rule_probes.PATCHES)}")
    parser.add_argument("--tasks", required=True, help="comma-separated tasks of quality.py or holdout.py")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "probe_runs.json", help="where runs are recorded")
    parser.add_argument("--report-only", action="store_true", help="only print the table from recorded runs")
    args = parser.parse_args(argv)
    if args.probe not in rule_probes.PATCHES:
        parser.error(f"--probe must be one of {', '.join(rule_probes.PATCHES)}, got {args.probe!r}")
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or set(tasks) - set(TASK_NAMES):
        parser.error(f"--tasks must name tasks of {', '.join(TASK_NAMES)}, got {args.tasks!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be integers, comma-separated, got {args.seeds!r}")
    for task in [] if args.report_only else tasks:
        for seed in seeds:
            for label in (DEFAULTS, args.probe):
                key = f"{label}|{task}|{seed}"
                with locked_json(args.out, {"runs": {}}) as data:
                    claims = data.setdefault("claims", {})  # as `runner.claim` keeps them: key -> process id
                    if key in data["runs"] or (key in claims and _alive(claims[key])):
                        continue
                    claims[key] = os.getpid()  # another process skips it while this one lives
                row = run(task, seed, None if label == DEFAULTS else args.probe)
                print(f"{key}: test {row['test']:.4f}, LR {row['lr']:.3g} ({row['switch_reason']})", flush=True)
                with locked_json(args.out, {"runs": {}}) as data:
                    data["runs"][key] = row
                    data["claims"].pop(key, None)
    with locked_json(args.out, {"runs": {}}) as data:
        runs = dict(data["runs"])
    print("\n".join(table(runs, args.probe, tasks, seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
