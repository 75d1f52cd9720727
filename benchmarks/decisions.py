#!/usr/bin/env python
"""How AutoWU's decision settings would fare on every task, and which ones a leave-one-task-out choice picks.

AutoWU's decisions up to the switch are a function of the warmup losses alone, and before the switch its LR is the
ramp's. So the ``ramp`` runs of ``quality.py`` (AutoWU's ramp with no switch, every loss recorded) let any setting
be replayed through the real `hf_autowu.AutoWU`, exactly, without training again: the replay gives the switch step
and the LR chosen. What that LR would then reach is read off a curve of metric against peak LR (mean over seeds at
each grid LR, interpolated linearly in log2 of the LR, clamped at the grid's ends): where the ``autowu_at`` runs are
recorded, AutoWU's own schedule (same ramp, switch step, rewind, hold and cooldown) with its peak forced to each point
of the oracle's grid; elsewhere the oracle's grid, a rougher proxy since its schedule (5% warmup, cosine) is not
AutoWU's. Regret is always measured from the oracle's best point.

Settings replayed, in three families (see `AutoWUConfig`), every other option at its default: ``rise_margin`` x
``slowed_fraction`` (when a test votes "past", and where the LR is chosen), ``min_past_lengthscales`` x
``max_descent_left`` (when a passed test counts, and how far the choice follows a descent that goes on), and
``confidence`` x ``patience`` (how sure each test must be, and how many in a row).

The tasks: the suite's, and those of ``holdout.py`` (other model families and optimizers, in plain loops), whose
ramps and ``autowu_at`` runs (``holdout.py --at``) it records the same way. The held-out tasks of role ``unseen``
are left out, so that they stay tasks no setting was picked on. Leave-one-task-out, per family: for each task, the
setting with the lowest mean regret on all the other tasks (validation metric) is picked, and its regret on the
left-out task (test metric) is reported; the setting picked on all tasks should be the default, and is flagged when
it is not.

    python benchmarks/decisions.py                 # writes the `decisions` section of RESULTS.md
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import holdout  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS_DIR, RESULTS_MD, locked_json, update_section  # noqa: E402
from methods import ramp_steps  # noqa: E402
from report import regret  # noqa: E402
from runner import decision_code_line, has_current_decisions, recorded_runs  # noqa: E402
from tasks import TASKS, TaskSpec, smoke_task  # noqa: E402

from hf_autowu import AutoWU, AutoWUConfig  # noqa: E402

RISE_MARGINS = (0.0, 0.5, 1.0, 2.0)
SLOWED_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5)
MIN_PAST_LENGTHSCALES = (0.0, 0.5, 1.0, 1.5)
MAX_DESCENT_LEFT = (1.0, 0.3, 0.15, 0.1, 0.06, 0.04)
CONFIDENCES = (0.9, 0.95, 0.99, 0.999)
PATIENCES = (2, 3, 5, 8)
FAMILIES: dict[str, tuple[tuple[str, tuple[float, ...]], tuple[str, tuple[float, ...]]]] = {
    "switch test and LR rule": (("rise_margin", RISE_MARGINS), ("slowed_fraction", SLOWED_FRACTIONS)),
    "resolution and descent": (
        ("min_past_lengthscales", MIN_PAST_LENGTHSCALES),
        ("max_descent_left", MAX_DESCENT_LEFT),
    ),
    "switch confidence": (("confidence", CONFIDENCES), ("patience", PATIENCES)),
}
"""Each family: two options, the rows and the columns of its table; the settings are their products."""


def recorded_spec(task: str, ramps: list[dict[str, Any]]) -> TaskSpec:
    """The task as its ramps were recorded: the `--smoke` version when they have the smoke ramp's length."""
    spec, smoke = TASKS[task], smoke_task(TASKS[task])
    smoke_length = ramp_steps(smoke.steps)
    if smoke_length != ramp_steps(spec.steps) and all(len(r["losses"]) == smoke_length for r in ramps):
        return smoke
    return spec


def replay(spec: TaskSpec, losses: list[float | None], **options: Any) -> AutoWU:
    """Feed a recorded ramp's losses to an AutoWU for task `spec` with `options` (rewind off) until it switches."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, spec.steps_per_epoch, total_steps=spec.steps, rewind=False, **options)
    for loss in losses:
        if scheduler.phase != "warmup":
            break
        scheduler.step(math.nan if loss is None else float(loss))
    return scheduler


def quality_curves(
    runs: list[dict[str, Any]], task: str, method: str = "oracle"
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Mean validation and test metric of ``method`` (``oracle`` or ``autowu_at``) per grid LR, over the LRs run
    for every seed (``autowu_at``: with the current decision code only), or None."""
    by_lr: dict[float, list[dict]] = {}
    for run in runs:
        if run["task"] == task and run["method"] == method:
            if method == "autowu_at" and not has_current_decisions(run):
                continue
            by_lr.setdefault(run["grid_lr"], []).append(run)
    if not by_lr:
        return None
    seeds = max(len(v) for v in by_lr.values())
    lrs = np.array(sorted(lr for lr, v in by_lr.items() if len(v) == seeds))
    return {
        split: (np.log2(lrs), np.array([np.mean([r[split] for r in by_lr[lr]]) for lr in lrs]))
        for split in ("val", "test")
    }


def scoring_curves(
    runs: list[dict[str, Any]], task: str, oracle: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """The curves a replayed LR is scored with: ``autowu_at``'s when it covers the oracle's whole grid, else the
    oracle's; and the name of the method they come from."""
    own = quality_curves(runs, task, "autowu_at")
    if own is not None and np.array_equal(own["val"][0], oracle["val"][0]):
        return own, "autowu_at"
    return oracle, "oracle"


def proxy(curve: tuple[np.ndarray, np.ndarray], lr: float) -> float:
    """The metric `curve` (log2 of the peak LR, metric) suggests for peak LR `lr`."""
    return float(np.interp(math.log2(lr), *curve))


def best_metric(curves: dict[str, tuple[np.ndarray, np.ndarray]], metric: str) -> dict[str, float]:
    """Per split, the best mean metric on `curves` (`quality_curves`): the oracle's best grid point."""
    return {split: (max if metric == "accuracy" else min)(curves[split][1]) for split in curves}


def suite_cases(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The suite's tasks that have ``ramp`` runs and an oracle grid in `runs`: per task, its group (``suite``), the
    ramps' losses, how to replay them, the metric, the oracle's curves, the curves that score a replayed LR and where
    those come from (`scoring_curves`)."""
    ramps: dict[str, list[dict]] = {}
    for run in runs:
        if run["method"] == "ramp":
            ramps.setdefault(run["task"], []).append(run)
    cases = []
    for task in TASKS:
        curves = quality_curves(runs, task)
        if task not in ramps or curves is None:
            continue
        spec = recorded_spec(task, ramps[task])
        scoring, source = scoring_curves(runs, task, curves)
        cases.append(
            {
                "task": task,
                "group": "suite",
                "ramps": [r["losses"] for r in ramps[task]],
                "replay": partial(replay, spec),
                "steps": spec.steps,
                "metric": spec.metric,
                "curves": curves,
                "scoring": scoring,
                "source": source,
            }
        )
    return cases


def held_out_cases(path: Path, roles: tuple[str, ...] = ("chosen-on", "fresh")) -> list[dict[str, Any]]:
    """The tasks of ``holdout.py`` of one of `roles` whose ramps and oracle grid are recorded in `path` (at the task's
    budget when recorded there, else at the `--smoke` one), as `suite_cases` describes them (group ``held out``, or
    ``unseen`` for that role); a replayed LR is scored with the curves of `scoring_curves` (the task's ``autowu_at``
    runs, ``holdout.py --at``, where they cover its grid). By default the tasks of role
    ``unseen`` are left out, so that no setting is picked on them."""
    if not path.exists():
        return []
    with locked_json(path, {"runs": {}}) as data:
        recorded = dict(data["runs"])
    cases = []
    for name, task in holdout.TASKS.items():
        if task.role not in roles:
            continue
        by_budget = holdout.recorded_by_budget(recorded, name)
        budgets = [s for s, (grid, ramps) in by_budget.items() if grid and ramps]
        if not budgets:
            continue
        steps = task.steps if task.steps in budgets else max(budgets)
        grid, ramps = by_budget[steps]
        seeds = max(len(v) for v in grid.values())
        lrs = [lr for lr in sorted(grid) if len(grid[lr]) == seeds]
        curves = {
            split: (np.log2(lrs), np.array([np.mean([r[split] for r in grid[lr]]) for lr in lrs]))
            for split in ("val", "test")
        }
        scoring, source = scoring_curves(forced_peak_runs(recorded, name, steps), name, curves)
        cases.append(
            {
                "task": name,
                "group": "unseen" if task.role == "unseen" else "held out",
                "ramps": ramps,
                "replay": partial(holdout.replay, steps=steps),
                "steps": steps,
                "metric": task.metric,
                "curves": curves,
                "scoring": scoring,
                "source": source,
            }
        )
    return cases


def probe_parser(description: str, out_name: str) -> argparse.ArgumentParser:
    """The options of a probe that replays every recorded ramp (`rule_probes.py`, `ideal_multiplier.py`): where the
    results of `quality.py` and `holdout.py` are, and where its own JSON goes (`results/out_name` by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quality.json", help="quality.py's results")
    parser.add_argument("--holdout", type=Path, default=RESULTS_DIR / "holdout.json", help="holdout.py's results")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / out_name, help="where to write")
    return parser


def every_case(results: Path, holdout_path: Path) -> list[dict[str, Any]]:
    """The suite's cases and every held-out task's, the unseen ones included (`suite_cases`, `held_out_cases`)."""
    return suite_cases(recorded_runs(results)) + held_out_cases(holdout_path, roles=("chosen-on", "fresh", "unseen"))


def forced_peak_runs(recorded: dict[str, dict], name: str, steps: int) -> list[dict[str, Any]]:
    """Task `name`'s ``autowu_at`` runs at a budget of `steps` among `recorded` (``holdout.json``'s runs), in the
    form of ``quality.json``'s runs that `quality_curves` reads."""
    runs = []
    for key, run in recorded.items():
        task_name, setting, _, budget = key.split("|")
        if task_name == name and int(budget) == steps and setting.startswith("autowu_at "):
            runs.append(run | {"task": name, "method": "autowu_at", "grid_lr": float(setting.split()[1])})
    return runs


def evaluate(cases: list[dict[str, Any]], family: str = "switch test and LR rule") -> dict[str, Any]:
    """Replay every setting of `family` (a key of `FAMILIES`) on every task of `cases` (`suite_cases`,
    `held_out_cases`); regrets per task and setting."""
    (row_name, row_values), (column_name, column_values) = FAMILIES[family]
    settings = list(itertools.product(row_values, column_values))
    table: dict[str, dict[tuple, dict[str, float]]] = {}
    for case in cases:
        task, metric, curves, scoring = case["task"], case["metric"], case["curves"], case["scoring"]
        best = best_metric(curves, metric)
        ramps = [[math.nan if x is None else float(x) for x in losses] for losses in case["ramps"]]
        table[task] = {}
        for row, column in settings:
            switched = [case["replay"](losses, **{row_name: row, column_name: column}) for losses in ramps]
            lrs = [s.peak_lr for s in switched]
            table[task][(row, column)] = {
                split: float(np.mean([regret(proxy(scoring[split], lr), best[split], metric) for lr in lrs]))
                for split in ("val", "test")
            } | {
                "lr": float(np.exp(np.mean(np.log(lrs)))),
                "switch": float(np.mean([s.switch_step / case["steps"] for s in switched])),
            }
    return {
        "family": family,
        "settings": settings,
        "table": table,
        "groups": {case["task"]: case["group"] for case in cases},
        "sources": {case["task"]: case["source"] for case in cases},
        "ceilings": {case["task"]: ceiling(case["scoring"], case["curves"], case["metric"]) for case in cases},
    }


def ceiling(
    scoring: dict[str, tuple[np.ndarray, np.ndarray]], oracle: dict[str, tuple[np.ndarray, np.ndarray]], metric: str
) -> dict[str, float]:
    """The scoring curve's best grid point on validation (``lr``), the oracle's (``oracle_lr``), and the scoring
    curve's regret there to the oracle's best on test (``test``: the least regret any choice of peak LR can reach
    with that schedule)."""
    best_index = np.argmax if metric == "accuracy" else np.argmin
    pick, oracle_pick = best_index(scoring["val"][1]), best_index(oracle["val"][1])
    best_test = oracle["test"][1][best_index(oracle["test"][1])]
    return {
        "lr": float(2.0 ** scoring["val"][0][pick]),
        "oracle_lr": float(2.0 ** oracle["val"][0][oracle_pick]),
        "test": regret(scoring["test"][1][pick], best_test, metric),
    }


def leave_one_out(result: dict[str, Any]) -> list[tuple[str, tuple, float, float]]:
    """Per task: the setting picked on the other tasks (lowest mean validation regret), its test regret on the task,
    and the best test regret any setting reaches there."""
    table, rows = result["table"], []
    for held_out in table if len(table) > 1 else ():  # one task leaves nothing to pick on
        others = [t for t in table if t != held_out]
        pick = min(result["settings"], key=lambda s: np.mean([table[t][s]["val"] for t in others]))
        best_here = min(table[held_out][s]["test"] for s in result["settings"])
        rows.append((held_out, pick, table[held_out][pick]["test"], best_here))
    return rows


def default_setting(family: str) -> tuple:
    """The default's values of `family`'s two options."""
    (row_name, _), (column_name, _) = FAMILIES[family]
    default = AutoWUConfig()
    return default.preset_setting(row_name), default.preset_setting(column_name)


def report(results: list[dict[str, Any]]) -> str:
    """The Markdown section: per family, the pick on all tasks, leave one task out and the mean validation regret
    of every setting; then, per task, the default and the paper's choice."""
    groups = results[0]["groups"]
    counts = {g: sum(1 for v in groups.values() if v == g) for g in ("suite", "held out")}
    lines = [
        "## Decision settings, replayed (`benchmarks/decisions.py`)",
        "",
        "Reproduce: `python benchmarks/decisions.py` (needs the `ramp` and `oracle` runs of `quality.py`, and where "
        "recorded its `autowu_at` runs; and those of `holdout.py`, where recorded). Each recorded warmup ramp is "
        "replayed through the real `AutoWU` under each setting; the LR it chooses is scored with the mean metric at "
        "that peak LR (log-linear interpolation) of AutoWU's own schedule with its peak forced to each grid point "
        "(`autowu_at`), or, for tasks without those runs, of the oracle's schedule: a proxy, used to choose the rule, "
        "which the real runs above then check. It scores the LR chosen, not the switch step: steps a later switch "
        "spends on the ramp are not counted. Regret: distance behind the oracle's best grid point, in units of 0.5 pp "
        "accuracy or 1% loss; mean over seeds. "
        f"Tasks: the suite's {counts['suite']} and the {counts['held out']} of `holdout.py` (other model families "
        "and optimizers, in plain loops), pooled: a setting is picked on all of them, so none is held out from that "
        "choice except in the leave-one-task-out tables.",
        "",
        f"Decision code {decision_code_line()}.",
        "",
    ]
    for result in results:
        lines += family_report(result)
    first = results[0]
    table, current = first["table"], default_setting(first["family"])
    lines += [
        "### Per task, the default and the paper's choice (LR at the minimum, no margin)",
        "",
        "Scored with: the schedule whose metric-against-peak-LR curve scores the replayed LRs. Its best peak: that "
        "curve's best grid point on validation, and its regret on test, the least any LR rule can reach with it.",
        "",
        "| task | scored with | its best peak (oracle's best), regret there | default: regret (val), LR, switch at "
        "| margin 0, argmin: regret (val), LR, switch at |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task in table:
        top = first["ceilings"][task]
        cells = [
            first["sources"][task],
            f"{top['lr']:.2g} ({top['oracle_lr']:.2g}), {top['test']:.2f}",
        ]
        for setting in (current, (0.0, 0.0)):
            row = table[task][setting]
            cells.append(f"{row['val']:.2f}, {row['lr']:.2e}, {row['switch']:.0%} of the budget")
        lines.append(f"| {task_label(first, task)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def task_label(result: dict[str, Any], task: str) -> str:
    """`task`, marked when it is one of `holdout.py`'s."""
    return task + (" (held out)" if result["groups"][task] == "held out" else "")


def family_report(result: dict[str, Any]) -> list[str]:
    """One family's part of the section: its pick on all tasks, leave one task out, and its table."""
    table, current = result["table"], default_setting(result["family"])
    (row_name, rows), (column_name, columns) = FAMILIES[result["family"]]
    tasks = list(table)
    groups = [[t for t in tasks if result["groups"][t] == g] for g in ("suite", "held out")]

    def mean_val(setting: tuple, among: list[str] = tasks) -> float:
        return float(np.mean([table[t][setting]["val"] for t in among])) if among else math.nan

    overall = min(result["settings"], key=mean_val)
    lines = [
        f"### {result['family'].capitalize()}: `{row_name}` x `{column_name}`",
        "",
        f"Default setting: {row_name}={current[0]}, {column_name}={current[1]}; picked on all tasks: "
        f"{row_name}={overall[0]}, {column_name}={overall[1]}"
        + (
            ""
            if overall == current
            else f" (**differs from the default**: mean validation regret {mean_val(overall):.2f}, the default's "
            f"{mean_val(current):.2f})"
        )
        + ".",
        "",
        "Leave one task out:",
        "",
        f"| left out | setting picked on the others ({row_name}, {column_name}) | its regret there (test) | best any "
        "setting reaches there | default's regret there |",
        "| --- | --- | --- | --- | --- |",
    ]
    loo = leave_one_out(result)
    for task, pick, held, best_here in loo:
        lines.append(
            f"| {task_label(result, task)} | {pick[0]}, {pick[1]} | {held:.2f} | {best_here:.2f} "
            f"| {table[task][current]['test']:.2f} |"
        )
    if loo:
        lines.append(
            f"| mean | | {np.mean([row[2] for row in loo]):.2f} | {np.mean([row[3] for row in loo]):.2f} "
            f"| {np.mean([table[row[0]][current]['test'] for row in loo]):.2f} |"
        )
    lines += [
        "",
        "Mean validation regret per setting: over all tasks (the suite's; the held-out ones):",
        "",
        f"| {row_name} \\ {column_name} | " + " | ".join(str(c) for c in columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        cells = [
            f"{mean_val((row, c)):.2f} ("
            + "; ".join("-" if not among else f"{mean_val((row, c), among):.2f}" for among in groups)
            + ")"
            for c in columns
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quality.json", help="quality.py's results")
    parser.add_argument(
        "--holdout", type=Path, default=RESULTS_DIR / "holdout.json", help="holdout.py's results (used if present)"
    )
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="Markdown file to update")
    args = parser.parse_args(argv)
    runs = recorded_runs(args.results)
    cases = suite_cases(runs) + held_out_cases(args.holdout)
    results = [evaluate(cases, family) for family in FAMILIES]
    if not results[0]["table"]:
        print("no task has both ramp and oracle runs yet", file=sys.stderr)
        return 2
    update_section(args.results_md, "decisions", report(results))
    print(f"wrote the decisions section of {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
