#!/usr/bin/env python
"""The rewind gate's threshold, `rewind_min_shift`: every default run's two outcomes at its switch, and what each
threshold between them would score on the suite.

At the switch the default restores its snapshot only when the parameters have moved since it by at least
`rewind_min_shift` of its norm. Each run is deterministic up to that point, so both outcomes of every run can be
recorded as two ablations of ``quality.py``, and any threshold replayed exactly from them:

    python benchmarks/quality.py --methods autowu --out-dir /tmp/kept --autowu-options '{"rewind_min_shift": 1e9}'
    python benchmarks/quality.py --methods autowu --out-dir /tmp/restored --autowu-options '{"rewind_min_shift": 0}'
    python benchmarks/rewind_gate.py --kept /tmp/kept --restored /tmp/restored

The first never restores (unless a blow-up marked the states damaged) and records the shift at the switch; the
second always restores. For each threshold a run takes the kept outcome when its shift is below it. Regret is
``quality.py``'s (against its oracle rows, in ``benchmarks/results/quality.json``); the threshold is picked on
validation, on all tasks and leaving one task out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import update_section
from report import mean_std, regret, summarize

from hf_autowu import AutoWUConfig

HERE = Path(__file__).parent
THRESHOLDS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.8, 1.0, 2.0, float("inf"))


def load_runs(folder: Path) -> dict[tuple[str, int], dict]:
    """The ``autowu`` runs of an ablation's ``quality.json``, by (task, seed)."""
    runs = json.loads((folder / "quality.json").read_text())["runs"].values()
    return {(r["task"], r["seed"]): r for r in runs if r["method"] == "autowu"}


def shift_of(run: dict) -> float:
    """The shift recorded at the switch; -inf when the run restored anyway (a blow-up), so both outcomes agree."""
    kept = run["info"].get("kept")
    return kept["shift"] if kept is not None else float("-inf")


def task_regret(task, threshold, kept, restored, oracle, split) -> float:
    """Mean regret over seeds on `split` when runs with a shift below `threshold` keep their steps."""
    values = []
    for (name, seed), run in kept.items():
        if name == task:
            values.append((run if shift_of(run) < threshold else restored[(name, seed)])[split])
    best, metric = oracle[task]
    return regret(float(np.mean(values)), best[split], metric)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kept", type=Path, required=True, help="out-dir of the never-restore ablation")
    parser.add_argument("--restored", type=Path, required=True, help="out-dir of the always-restore ablation")
    parser.add_argument("--quality", type=Path, default=HERE / "results" / "quality.json", help="the oracle rows")
    parser.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    kept, restored = load_runs(args.kept), load_runs(args.restored)
    if kept.keys() != restored.keys():
        sys.exit("--kept and --restored must hold the same tasks and seeds")
    summary, _ = summarize(list(json.loads(args.quality.read_text())["runs"].values()))
    tasks = sorted({task for task, _ in kept}, key=list(summary).index)
    oracle = {
        t: ({s: mean_std(summary[t]["oracle"][s])[0] for s in ("val", "test")}, summary[t]["oracle"]["metric"])
        for t in tasks
    }

    def mean_regret(threshold, split, among):
        return float(np.mean([task_regret(t, threshold, kept, restored, oracle, split) for t in among]))

    def pick(among):
        return min(THRESHOLDS, key=lambda th: (round(mean_regret(th, "val", among), 6), th))

    lines = [
        "## The rewind gate's threshold against the suite (`benchmarks/rewind_gate.py`)",
        "",
        f"Reproduce: see the script's docstring. {len(kept)} runs, each with both outcomes at its switch. Shift at "
        "the switch (`||now - snapshot|| / ||snapshot||`), per task: "
        + "; ".join(
            f"{t} " + ", ".join(f"{shift_of(r):.2f}" for (n, _), r in sorted(kept.items()) if n == t) for t in tasks
        )
        + " (-inf: a blow-up, always restored).",
        "",
        "| threshold | mean regret (val) | mean regret (test) | " + " | ".join(tasks) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |",
    ]
    for th in THRESHOLDS:
        per_task = [task_regret(t, th, kept, restored, oracle, "test") for t in tasks]
        lines.append(
            f"| {th:g} | {mean_regret(th, 'val', tasks):.2f} | {np.mean(per_task):.2f} | "
            + " | ".join(f"{r:.2f}" for r in per_task)
            + " |"
        )
    default = AutoWUConfig().preset_setting("rewind_min_shift")
    lines += [
        "",
        f"Picked on all tasks (validation): {pick(tasks):g}. The default, {default:g}: mean regret "
        f"{mean_regret(default, 'val', tasks):.2f} (val), {mean_regret(default, 'test', tasks):.2f} (test); it is set "
        "for the runs a kept state can wreck, which this suite's regret does not weigh (RESULTS, step 9).",
        "",
        "Leave one task out:",
        "",
    ]
    lines += [
        "| left out | picked on the others | its test regret there | always restore there |",
        "| --- | --- | --- | --- |",
    ]
    loto = []
    for left in tasks:
        chosen = pick([t for t in tasks if t != left])
        loto.append(task_regret(left, chosen, kept, restored, oracle, "test"))
        always = task_regret(left, 0.0, kept, restored, oracle, "test")
        lines.append(f"| {left} | {chosen:g} | {loto[-1]:.2f} | {always:.2f} |")
    lines += ["", f"Mean test regret over the left-out tasks: {np.mean(loto):.2f}."]
    update_section(args.results_md, "rewind_gate", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
