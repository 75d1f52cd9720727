#!/usr/bin/env python
"""Could the loss just after the switch tell AutoWU that the LR it chose is more than the model can sustain?

Issue 10 names a lever for the LR choice: keep testing for a short window after the switch, and back off (rewind to
the switch, lower the LR) when the loss confidently stops improving or rises at the chosen LR. Whether that signal
exists can be read off runs already recorded, without training again: the ``autowu_at`` runs of ``quality.py`` are
AutoWU's own schedule with its peak forced to each point of the oracle's grid (3 seeds), every step's loss recorded,
so they show what the training loss does in the first `W` steps at each peak LR, on every task of the suite.

The rule replayed: over the `W` steps after the switch, fit a straight line to the training loss (least squares) and
take its slope in standard errors, ``t``; the rule fires when ``t > z``. ``z`` = 2 reads "the loss confidently
rises", ``z`` = 0 "it does not fall", ``z`` = -1 "it does not confidently fall". When it fires at a grid LR, the LR
backs off one grid step (a factor 2), at most twice. Each real default run of the suite (``autowu``, 5 seeds) is
replayed: its chosen LR is placed on the grid (nearest point in log2), the rule is read off the ``autowu_at`` run of
the same seed (seeds 3 and 4 read those of seeds 0 and 1) at that point, and the LR it ends at is scored with the
``autowu_at`` curve of metric against peak LR, as `decisions.py` does. The score is optimistic for the rule: the `W`
steps that a back-off spends again are not counted.

A second rule, a trial that compares: from the switch, train `k` steps at each of the chosen LR's grid neighbours
(x1/2, x1, x2, or a pair of them) and keep the one whose mean training loss over those steps is lowest. Replayed the
same way, reading each candidate's first `k` post-switch losses: on the same seed's runs (the same batches after the
same state, optimistic, since a real trial would see other batches) or on another seed's (another state too,
pessimistic). The steps the trials spend are not counted either.

    python benchmarks/post_switch.py      # writes the `post_switch` section of RESULTS.md
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from common import RESULTS_DIR, RESULTS_MD, update_section  # noqa: E402
from decisions import best_metric, proxy, quality_curves  # noqa: E402
from report import regret  # noqa: E402
from runner import decision_code_line, has_current_decisions, recorded_runs  # noqa: E402
from tasks import TASKS  # noqa: E402

WINDOWS = (10, 20, 40)
THRESHOLDS = (2.0, 1.0, 0.0, -1.0)
MAX_BACK_OFFS = 2
TRIAL_STEPS = (5, 10, 20, 40)
TRIAL_CANDIDATES = ((-1, 0, 1), (-1, 0), (0, 1))
"""The grid neighbours a trial compares, in grid steps (factors of 2) from the chosen LR."""


def slope_t(losses: list[float | None], start: int, window: int) -> float:
    """The least-squares slope of `losses[start:start + window]` (non-finite entries dropped) in standard errors."""
    y = np.array([math.nan if x is None else x for x in losses[start : start + window]], dtype=float)
    t = np.arange(len(y), dtype=float)
    keep = np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(y) < 4:
        return math.nan
    centred = t - t.mean()
    slope = float(centred @ (y - y.mean()) / (centred @ centred))
    residual = y - y.mean() - slope * centred
    error = math.sqrt(float(residual @ residual) / (len(y) - 2) / float(centred @ centred))
    return slope / error if error > 0 else math.copysign(math.inf, slope)


def grid_index(grid: np.ndarray, lr: float) -> int:
    """The point of `grid` (log2 LRs) nearest to `lr` in log2."""
    return int(np.argmin(abs(grid - math.log2(lr))))


def task_case(runs: list[dict], task: str) -> dict | None:
    """Per task: the grid (log2 LRs), per (seed, grid index) the post-switch loss and switch step of the
    ``autowu_at`` run, the default's chosen LRs by seed, the scoring curves and the oracle's best per split."""
    current = [r for r in runs if r["task"] == task and has_current_decisions(r)]
    at = [r for r in current if r["method"] == "autowu_at"]
    default = [r for r in current if r["method"] == "autowu"]
    scoring, oracle = quality_curves(runs, task, "autowu_at"), quality_curves(runs, task)
    if not at or not default or scoring is None or oracle is None:
        return None
    grid = scoring["test"][0]
    metric = TASKS[task].metric
    return {
        "grid": grid,
        "at": {(r["seed"], grid_index(grid, r["grid_lr"])): r for r in at},
        "seeds": sorted({r["seed"] for r in at}),
        "chosen": {r["seed"]: r["info"]["peak_lr"] for r in default},
        "scoring": scoring,
        "best": best_metric(oracle, metric),
        "metric": metric,
    }


def replay_rule(case: dict, window: int | None, threshold: float) -> dict[str, float]:
    """Mean regret (val, test) of the default's runs on one task with the back-off rule (`window` None: off), and
    how many of them backed off."""
    regrets: dict[str, list[float]] = {"val": [], "test": []}
    backed_off = 0
    for seed, lr in case["chosen"].items():
        source = case["seeds"][seed % len(case["seeds"])]
        index = grid_index(case["grid"], lr)
        steps = 0
        while window is not None and steps < MAX_BACK_OFFS and index - steps >= 0:
            run = case["at"].get((source, index - steps))
            if run is None or not slope_t(run["losses"], run["info"]["switch_step"], window) > threshold:
                break
            steps += 1
        backed_off += steps > 0
        for split in regrets:
            regrets[split].append(
                regret(proxy(case["scoring"][split], lr / 2.0**steps), case["best"][split], case["metric"])
            )
    return {split: float(np.mean(v)) for split, v in regrets.items()} | {
        "backed_off": backed_off,
        "runs": len(case["chosen"]),
    }


def mean_loss(losses: list[float | None], start: int, steps: int) -> float:
    """The mean of the finite entries of `losses[start:start + steps]`, or inf when there is none."""
    y = np.array([math.nan if x is None else x for x in losses[start : start + steps]], dtype=float)
    return float(np.mean(y[np.isfinite(y)])) if np.isfinite(y).any() else math.inf


def replay_trial(case: dict, steps: int | None, candidates: tuple[int, ...], other_seeds: bool) -> dict[str, float]:
    """Mean regret (val, test) of the default's runs on one task when a trial of `steps` steps at each of
    `candidates` (grid steps from the chosen LR) keeps the LR with the lowest mean loss (`steps` None: no trial), and
    how many of them moved. `other_seeds`: the candidates are read on the runs of successive seeds, else all on the
    run's own."""
    regrets: dict[str, list[float]] = {"val": [], "test": []}
    moved = 0
    for seed, lr in case["chosen"].items():
        first = seed % len(case["seeds"])
        index = grid_index(case["grid"], lr)
        scored = []
        for n, offset in enumerate(candidates if steps is not None else ()):
            source = case["seeds"][(first + n) % len(case["seeds"]) if other_seeds else first]
            run = case["at"].get((source, index + offset))
            if run is not None:
                scored.append((mean_loss(run["losses"], run["info"]["switch_step"], steps), offset))
        offset = min(scored)[1] if scored else 0
        moved += offset != 0
        for split in regrets:
            regrets[split].append(
                regret(proxy(case["scoring"][split], lr * 2.0**offset), case["best"][split], case["metric"])
            )
    return {split: float(np.mean(v)) for split, v in regrets.items()} | {"moved": moved, "runs": len(case["chosen"])}


def mean_regret(table: dict[str, dict], setting: tuple, split: str, among: list[str]) -> float:
    """The mean over the tasks `among` of `setting`'s regret on `split`."""
    return float(np.mean([table[t][setting][split] for t in among]))


def regret_rows(
    table: dict[str, dict], settings: list[tuple], label: Callable[[tuple], str], counted: str
) -> list[str]:
    """One Markdown row per setting: its label, mean regrets, how many runs it changed (`counted`), and the test
    regret per task."""
    tasks, rows = list(table), []
    for s in settings:
        changed = sum(table[t][s][counted] for t in tasks)
        total = sum(table[t][s]["runs"] for t in tasks)
        cells = " | ".join(f"{table[t][s]['test']:.2f}" for t in tasks)
        val, test = mean_regret(table, s, "val", tasks), mean_regret(table, s, "test", tasks)
        rows.append(f"| {label(s)} | {val:.2f} | {test:.2f} | {changed}/{total} | {cells} |")
    return rows


def leave_one_out(table: dict[str, dict], settings: list[tuple]) -> list[tuple[str, tuple, float, float]]:
    """Per task: the setting with the lowest mean validation regret on the other tasks, its test regret on the task,
    and the test regret there of `settings[0]` (the rule off)."""
    rows = []
    for held_out in table:
        others = [t for t in table if t != held_out]
        pick = min(settings, key=lambda s: mean_regret(table, s, "val", others))
        rows.append((held_out, pick, table[held_out][pick]["test"], table[held_out][settings[0]]["test"]))
    return rows


def report(cases: dict[str, dict]) -> str:
    """Replay every rule on every task of `cases` (`task_case`), pick one on validation (on all tasks, and leaving
    one task out); the Markdown section."""
    settings = [(None, math.inf)] + list(itertools.product(WINDOWS, THRESHOLDS))
    table = {task: {s: replay_rule(case, *s) for s in settings} for task, case in cases.items()}
    tasks = list(table)
    names = {s: "off" if s[0] is None else f"W={s[0]}, t > {s[1]:g}" for s in settings}
    lines = [
        "## Back-off after the switch, replayed (`benchmarks/post_switch.py`)",
        "",
        "Reproduce: `python benchmarks/post_switch.py` (needs the `autowu`, `autowu_at` and `oracle` runs of "
        "`quality.py`). The rule: over the `W` steps after the switch, the training loss's least-squares slope in "
        "standard errors, `t`; when `t > z` the LR backs off a factor 2 (at most twice). Each default run's chosen LR "
        "is replayed against the `autowu_at` run of its seed (seeds 3, 4: those of 0, 1) at the nearest grid point, "
        "and scored with the `autowu_at` curve of metric against peak LR, as `decisions.py` scores; optimistic for "
        f"the rule (the `W` steps spent again are not counted). Regret in tolerance units. Decision code "
        f"{decision_code_line()}.",
        "",
        "| rule | mean regret, val | mean regret, test | runs backed off | " + " | ".join(tasks) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |",
        *regret_rows(table, settings, names.get, "backed_off"),
    ]
    overall = min(settings, key=lambda s: mean_regret(table, s, "val", tasks))
    loo = leave_one_out(table, settings)
    lines += [
        "",
        f"Picked on all tasks (validation): {names[overall]}. Leaving one task out, the rule picked on the other "
        f"{len(tasks) - 1} scores mean test regret {np.mean([r[2] for r in loo]):.2f} on the left-out task, against "
        f"{np.mean([r[3] for r in loo]):.2f} with no back-off:",
        "",
        "| left out | picked on the others | its test regret there | no back-off |",
        "| --- | --- | --- | --- |",
    ] + [f"| {t} | {names[p]} | {r:.2f} | {off:.2f} |" for t, p, r, off in loo]
    return "\n".join(lines + trial_report(cases)) + "\n"


def trial_report(cases: dict[str, dict]) -> list[str]:
    """The Markdown lines of the comparing trial: every setting on every task, and the leave-one-task-out pick."""
    settings = [(None, (0,), False)] + [
        (steps, candidates, other)
        for other in (False, True)
        for steps in TRIAL_STEPS
        for candidates in TRIAL_CANDIDATES
    ]
    table = {task: {s: replay_trial(case, *s) for s in settings} for task, case in cases.items()}
    tasks = list(table)

    def label(setting: tuple) -> str:
        steps, candidates, other = setting
        if steps is None:
            return "no trial"
        factors = "/".join({-1: "x1/2", 0: "x1", 1: "x2"}[c] for c in candidates)
        return f"k={steps}, {factors}, " + ("other seeds" if other else "same batches")

    lines = [
        "",
        "### A trial that compares the chosen LR's neighbours",
        "",
        "From the switch, `k` steps at each candidate (grid neighbours of the chosen LR); the one with the lowest "
        "mean training loss is kept. Read on the run's own seed (the same batches: optimistic) or on successive "
        "seeds' runs (other batches and another state: pessimistic); the trials' steps are not counted. Test regret "
        "per task.",
        "",
        "| trial | mean regret, val | mean regret, test | runs moved | " + " | ".join(tasks) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |",
        *regret_rows(table, settings, label, "moved"),
    ]
    for other in (False, True):  # a pick among the settings a real trial could be: one reading, plus no trial
        loo = leave_one_out(table, [settings[0]] + [s for s in settings[1:] if s[2] == other])
        lines += [
            "",
            f"Read on {'other seeds' if other else 'the same batches'}, leaving one task out: mean test regret "
            f"{np.mean([r[2] for r in loo]):.2f} on the left-out tasks against {np.mean([r[3] for r in loo]):.2f} "
            "with no trial; picks: " + ", ".join(f"{t}: {label(p)} ({r:.2f})" for t, p, r, _ in loo) + ".",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quality.json", help="quality.py's results")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="Markdown file to update")
    args = parser.parse_args(argv)
    runs = recorded_runs(args.results)
    cases = {task: case for task in TASKS if (case := task_case(runs, task)) is not None}
    if not cases:
        print("no task has autowu, autowu_at and oracle runs at the current decision code", file=sys.stderr)
        return 2
    update_section(args.results_md, "post_switch", report(cases))
    print(f"wrote the post_switch section of {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
