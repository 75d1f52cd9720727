#!/usr/bin/env python
"""Held-out checks of AutoWU's decisions: model families and optimizers outside the benchmark suite.

The tasks are in ``holdout_tasks.py``: six whose ramps helped choose the rules of 19c648e (role ``chosen-on``),
three added after those rules were fixed (role ``fresh``) and seven added after every setting was fixed (role
``unseen``), every one in a plain hand-written loop with ``AutoWU(optimizer, total_steps=..., model=model)``.

The oracle is ``quality.py``'s: a grid of peak LRs a factor 2 apart (`methods.grid_lr`), 5% linear warmup + cosine,
the best point chosen on the validation split and reported on test (the grid grows while its best point is at an
end). AutoWU runs with its defaults; to check the rewind gate, with ``rewind_min_shift`` 0 (always restore at the
switch) and 1e9 (never restore unless a blow-up forces it); with ``preset="paper"`` for reference; and with the
``slowed_fraction`` values of ``--fractions``. With ``--baselines``, the two baselines HF users reach for: the LR
range test (torch-lr-finder, as ``quality.py`` runs it, but with the task's own optimizer) with both rules, then the
oracle's schedule to the LR suggested; and Schedule-Free AdamW at its package defaults in place of the task's
optimizer, as ``quality.py`` runs it. Runs are recorded in ``results/holdout.json`` (AutoWU's with the
decision fingerprint, so a change to the decision code re-runs them), with each task's ramp for ``--replay``, so
the script resumes.

    python benchmarks/holdout.py                      # writes the `holdout` section of RESULTS.md
    python benchmarks/holdout.py --fractions 0.1,0.3  # also AutoWU with these slowed_fraction values
    python benchmarks/holdout.py --at friedman_mlp_adamw  # also AutoWU's schedule at each grid peak there
    python benchmarks/holdout.py --default-seeds 5 --fractions 0.1 --at all --baselines  # the section in RESULTS.md
    python benchmarks/holdout.py --replay '{"rise_margin": 3}'  # the recorded ramps under other options (stdout)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import holdout_tasks  # noqa: E402
import methods as m  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import cpu_name, cpus_line, locked_json, resolve_output_paths, update_section  # noqa: E402
from holdout_tasks import TASKS, HoldoutTask  # noqa: E402
from report import failed, regret, regret_with_error, summarize  # noqa: E402
from runner import decision_code_line, decision_fingerprint, has_current_decisions  # noqa: E402
from tasks import TaskSpec  # noqa: E402
from torch import nn  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from hf_autowu import AutoWU, AutoWUConfig  # noqa: E402

RAMP = "ramp"
RAMP_OPTIONS = {"patience": 10**6, "divergence_guard": False, "spike_watch": False, "rewind": False}
"""The warmup ramp to its cap with nothing that can end it early: every loss of the ramp is recorded, and up to the
default's switch the ramp trains exactly as the default run does (same seed, same LRs), so `--replay` can feed it to
the real scheduler under any options, as `decisions.py` does with `quality.py`'s ramps."""
REWIND_SETTINGS = {"always restore (rewind_min_shift 0)": 0.0, "never restore (rewind_min_shift 1e9)": 1e9}
BASELINES = {
    "range test (steepest)": "lr_finder",
    "range test (min/10)": "lr_finder_min10",
    "Schedule-Free AdamW": "schedulefree",
}
"""`--baselines`: the LR range test with each rule (`methods.FINDER_METHODS`) and Schedule-Free AdamW, as methods of
`methods.py`, by label."""
BN_RECALIBRATION_BATCHES = 50
"""Training batches run forward under Schedule-Free's eval weights, so that BatchNorm's statistics are theirs (the
schedulefree package's recommendation for BatchNorm models)."""
FINDER_ITERS, FINDER_SKIP = TaskSpec.finder_iters, TaskSpec.finder_skip
"""The range test's steps and the steps its suggestion skips at each end: those of `quality.py`'s tasks."""


def run(
    task: HoldoutTask,
    steps: int,
    seed: int,
    peak_lr: float | None,
    forced_peak: float | None = None,
    baseline: str | None = None,
    **options: float,
) -> dict[str, Any]:
    """Train once: AutoWU (with `options`) when `peak_lr` is None, else the oracle's schedule to `peak_lr`. With
    `forced_peak`, AutoWU decays from that LR at its switch instead of the LR it chose (`quality.py`'s ``autowu_at``).
    With `baseline` (a value of `BASELINES`): a range test's, the oracle's schedule to the LR the test suggests;
    ``"schedulefree"``, Schedule-Free AdamW at its package defaults and warmup in place of the task's optimizer.

    Returns:
        The validation and test metric, the peak LR, and for AutoWU the switch and what rewind did there.
    """
    if forced_peak is not None:
        with m.forced_peak_lr(forced_peak):
            return run(task, steps, seed, peak_lr, **options)
    if baseline in m.FINDER_METHODS:
        suggestion, sweep_steps = range_test_peak(task, seed, baseline)
        return run(task, steps, seed, suggestion) | {"sweep_steps": sweep_steps}
    method = baseline or ("autowu" if peak_lr is None else "oracle")
    torch.manual_seed(seed)
    model, optimizer = task.build(peak_lr or 1.0)
    if method == "schedulefree":
        optimizer, scheduler = m.loop_optimizer(method, model, SimpleNamespace(steps=steps), None)
        peak_lr = m.SCHEDULEFREE_LR
    elif method == "autowu":
        scheduler = AutoWU(optimizer, total_steps=steps, model=model, **options)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, m.warmup_steps(steps), steps)
    stream = task.batches(seed)
    model.train()
    m.set_optimizer_mode(optimizer, train=True)
    losses = []
    for _ in range(steps):
        loss = task.loss(model, next(stream))
        losses.append(loss.detach())  # read once at the end, not every step
        optimizer.zero_grad()
        loss.backward()
        if task.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.max_grad_norm)
        optimizer.step()
        m.step_scheduler(method, scheduler, loss)
    m.set_optimizer_mode(optimizer, train=False)
    if method == "schedulefree":
        recalibrate_batchnorm(model, task, stream)
    model.eval()
    with torch.no_grad():
        val, test = task.score(model)
    result: dict[str, Any] = {"val": val, "test": test, "lr": peak_lr, "machine": cpu_name()}
    if method == "autowu":
        rewinder = scheduler.rewinder
        result |= {
            "lr": scheduler.peak_lr,
            "switch_step": scheduler.switch_step,
            "switch_reason": scheduler.switch_reason,
            "rewind_off": rewinder is None or not rewinder.enabled,
            "rewound": rewinder is not None and rewinder.rewound_to is not None,
            "shift": None if rewinder is None or rewinder.kept is None else rewinder.kept["shift"],
            "decision_fingerprint": decision_fingerprint(),
            "losses": torch.stack(losses).tolist(),
        }
    return result


def recalibrate_batchnorm(
    model: nn.Module, task: HoldoutTask, stream: Iterator[Any], batches: int = BN_RECALIBRATION_BATCHES
) -> None:
    """Recompute the running statistics of `model`'s normalization layers (BatchNorm and any layer that tracks them)
    under the weights it now has, with `batches` forward passes in training mode on the next batches of `stream`;
    nothing when it has none. Schedule-Free evaluates other weights than it trains, so the statistics gathered in
    training do not fit them."""
    if not any(getattr(module, "running_mean", None) is not None for module in model.modules()):
        return
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            task.loss(model, next(stream))


def range_test_peak(task: HoldoutTask, seed: int, finder: str) -> tuple[float, int]:
    """The LR range test as `quality.py` runs it (torch-lr-finder, 1e-7 to 10 in 100 steps, rule `finder`), with
    the task's own optimizer and loss (no gradient clipping: torch-lr-finder has none), from the model the training
    run of `seed` starts from, on batches of another seed.

    Returns:
        The suggested peak LR and the steps the test took.
    """
    from torch_lr_finder import TrainDataLoaderIter

    class Stream(TrainDataLoaderIter):
        """The task's endless batches, each as (batch, no labels)."""

        def __init__(self, batches: Iterator[Any]) -> None:
            self.batches, self.auto_reset = batches, True

        def __next__(self) -> tuple[Any, None]:
            return next(self.batches), None

    class LossOf(nn.Module):
        """The task's loss as the module the range test calls."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: Any) -> torch.Tensor:
            return task.loss(self.model, batch)

    torch.manual_seed(seed)
    model, optimizer = task.build(m.FINDER_START_LR)
    settings = SimpleNamespace(finder_iters=FINDER_ITERS, finder_skip=FINDER_SKIP)
    suggestion, sweep_steps, _ = m.lr_range_test(
        finder, LossOf(model), lambda loss, _labels: loss, Stream(task.batches(seed + 10_000)), settings, optimizer
    )
    return suggestion, sweep_steps


def run_key(name: str, setting: str, seed: int, steps: int) -> str:
    """Where `holdout.json` records the run of task `name` under `setting` (``RAMP``, ``oracle <lr>`` or an AutoWU
    setting's label) for `seed` and a budget of `steps`."""
    return f"{name}|{setting}|{seed}|{steps}"


def recorded_by_budget(runs: dict[str, dict], name: str) -> dict[int, tuple[dict[float, list[dict]], list[list]]]:
    """Task `name`'s oracle grid (grid LR to its runs) and ramps (their losses) among `runs` (`holdout.json`'s),
    per step budget (the task's own, or the ``--smoke`` one)."""
    by_budget: dict[int, tuple[dict[float, list[dict]], list[list]]] = {}
    for key, run in runs.items():
        task_name, setting, _, steps = key.split("|")
        if task_name != name:
            continue
        grid, ramps = by_budget.setdefault(int(steps), ({}, []))
        if setting.startswith("oracle "):
            grid.setdefault(float(setting.split()[1]), []).append(run)
        elif setting == RAMP:
            ramps.append(run["losses"])
    return by_budget


def recorded_run(
    path: Path,
    redo: bool,
    name: str,
    task: HoldoutTask,
    steps: int,
    setting: str,
    seed: int,
    lr: float | None = None,
    forced_peak: float | None = None,
    baseline: str | None = None,
    **options: float,
) -> dict[str, Any]:
    """`run` for task `name` under `setting` (a grid point when `lr` is given, the method `baseline` when given,
    else AutoWU with `options`, decaying from `forced_peak` when given): the run recorded in `path` (an AutoWU run only
    if recorded with today's decision code), else a new one, recorded."""
    key = run_key(name, setting, seed, steps)
    with locked_json(path, {"runs": {}}) as data:
        found = data["runs"].get(key)
    current = found is not None and ("decision_fingerprint" not in found or has_current_decisions(found))
    if current and not redo:
        return found
    result = run(task, steps, seed, lr, forced_peak, baseline, **options)
    with locked_json(path, {"runs": {}}) as data:
        data["runs"][key] = result
    return result


def best_point(task: HoldoutTask, grid_runs: dict[float, list]) -> float:
    """The grid LR with the best mean validation metric."""
    better = max if task.metric == "accuracy" else min
    return better(grid_runs, key=lambda lr: np.mean([counted(task, r, "val") for r in grid_runs[lr]]))


def best_at_edge(task: HoldoutTask, grid_runs: dict[float, list]) -> float | None:
    """The grid point beyond the best one when that is at an end of the grid (the grid then grows), else None."""
    best = best_point(task, grid_runs)
    k = m.grid_index(best)
    if best == max(grid_runs):
        return m.grid_lr(k + 1)
    return m.grid_lr(k - 1) if best == min(grid_runs) else None


def fmt(value: float, metric: str) -> str:
    """A metric as the report prints it: accuracy in %, loss with 4 decimals."""
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4f}"


def oracle_test(task: HoldoutTask, grid_runs: dict[float, list]) -> float:
    """The oracle's test metric: the mean over seeds at the grid point best on validation."""
    return float(np.mean([counted(task, r) for r in grid_runs[best_point(task, grid_runs)]]))


def chance_level(task: HoldoutTask) -> float:
    """The test metric of a model that learned nothing: the task's `chance`, else ln 256 for a loss (a uniform byte)
    and 0 for an accuracy."""
    if task.chance is not None:
        return task.chance()
    return float(np.log(256)) if task.metric == "loss" else 0.0


def at_chance(task: HoldoutTask, value: float | None) -> bool:
    """Whether a run's test metric says it learned nothing: a missing or non-finite value (a run that diverged; the
    results file stores it as null), a loss of 0.95 times the task's chance level or more (ln 256 for the byte-level
    models, as `quality.py` counts), or an accuracy of at most 20% (as `quality.py` counts) or within 0.5 pp of
    always answering the most common class."""
    if value is None or not np.isfinite(value):
        return True
    if task.metric == "loss":
        return value >= 0.95 * chance_level(task)
    return value <= max(0.2, chance_level(task) + 0.005)


def counted(task: HoldoutTask, run: dict[str, Any], split: str = "test") -> float:
    """A run's metric on `split` as the report counts it: a missing or non-finite one (a run that diverged) counts at
    the task's chance level (`chance_level`), so that a mean over seeds stays finite and pays for the failure."""
    value = run[split]
    return value if value is not None and np.isfinite(value) else chance_level(task)


def setting_outcome(task: HoldoutTask, runs: list[dict[str, Any]], oracle: float) -> tuple[float, int]:
    """A setting's regret (its mean test metric, `counted`, against the oracle's `oracle`) and how many of its
    runs are at chance."""
    values = [counted(task, r) for r in runs]
    return regret(float(np.mean(values)), oracle, task.metric), sum(at_chance(task, r["test"]) for r in runs)


def summary_table(summary: dict[str, tuple[str, dict[str, tuple[float, int]]]]) -> list[str]:
    """Per task (name -> role, {setting: (regret, runs at chance)} for the default, the paper preset and the
    baselines where recorded), then the mean regret over each role's tasks and how many of their runs learned nothing
    (a setting recorded on only some of them: over those, and says how many), then `all_task_comparison`."""

    def cell(regret_value: float, failed: int) -> str:
        return f"{regret_value:+.2f}" + (f" ({failed} at chance)" if failed else "")

    settings = setting_labels(summary)
    headers = ["default", "paper preset", *settings[2:]]
    rule = " | ".join("---" for _ in headers)
    lines = ["| task | role | " + " | ".join(headers) + " |", f"| --- | --- | {rule} |"]
    lines += [
        f"| {name} | {role} | " + " | ".join(cell(*cells[s]) if s in cells else "-" for s in settings) + " |"
        for name, (role, cells) in summary.items()
    ]
    for role in sorted({role for role, _ in summary.values()}):
        rows = [cells for r, cells in summary.values() if r == role]
        means = []
        for setting in settings:
            have = [row[setting] for row in rows if setting in row]
            mean = cell(float(np.mean([v[0] for v in have])), sum(v[1] for v in have)) if have else "-"
            means.append(mean + (f" ({len(have)} tasks)" if have and len(have) < len(rows) else ""))
        lines.append(f"| mean of {len(rows)} | {role} | " + " | ".join(means) + " |")
    return lines + ["", *all_task_comparison(summary, settings)]


def setting_labels(summary: dict[str, tuple[str, dict[str, tuple[float, int]]]]) -> list[str]:
    """The settings of `summary`'s rows in order of first appearance (the default first)."""
    return list(dict.fromkeys(setting for _, cells in summary.values() for setting in cells))


def suite_outcomes(path: Path, default_label: str) -> dict[str, tuple[str, dict[str, tuple[float, int]]]]:
    """The benchmark suite's tasks as rows of this report's summary (role `suite`): from `quality.py`'s runs in `path`
    (AutoWU rows of other decision code refused, as its report refuses them), each method that has a label here (the
    default, the paper preset, the baselines) with its regret against the suite's oracle, as `quality.py` reports it,
    and its runs at chance. Empty when `path` does not exist.

    Args:
        path: `quality.py`'s results file.
        default_label: the label of the default setting in this report.

    Returns:
        Task -> ("suite", {label: (regret, runs at chance)}), for the tasks with both the oracle and the default.
    """
    if not path.exists():
        return {}
    with locked_json(path, {"runs": {}}) as data:
        runs = list(data["runs"].values())
    labels = {"autowu": default_label, "autowu_paper": "paper preset"}
    labels |= {method: label for label, method in BASELINES.items()}
    outcomes = {}
    for name, methods in summarize(runs)[0].items():
        if "oracle" in methods and "autowu" in methods:
            oracle = methods["oracle"]["test"]
            outcomes[name] = (
                "suite",
                {
                    labels[method]: (
                        regret_with_error(row["test"], oracle, row["metric"])[0],
                        sum(failed(r) for r in row["runs"]),
                    )
                    for method, row in methods.items()
                    if method in labels
                },
            )
    return outcomes


def all_task_comparison(
    summary: dict[str, tuple[str, dict[str, tuple[float, int]]]], settings: list[str]
) -> list[str]:
    """Over every task of `summary`, each setting's mean and median regret, then the default minus each other setting,
    task by task on the tasks both have: the mean of the differences, its standard error over those tasks, and on how
    many the default is ahead and behind."""
    regrets = {s: {name: cells[s][0] for name, (_, cells) in summary.items() if s in cells} for s in settings}
    lines = [f"Over all {len(summary)} tasks, mean regret (median):", ""]
    lines += [
        f"- {s}: {np.mean(list(v.values())):+.2f} ({np.median(list(v.values())):+.2f})"
        + (f" ({len(v)} tasks)" if len(v) < len(summary) else "")
        for s, v in regrets.items()
    ]
    lines += [
        "",
        "The default minus each, task by task (mean of the differences ± its standard error over tasks):",
        "",
    ]
    default = regrets[settings[0]]
    for s in settings[1:]:
        differences = np.array([default[name] - value for name, value in regrets[s].items() if name in default])
        if len(differences) < 2:
            continue
        error = differences.std(ddof=1) / np.sqrt(len(differences))
        lines.append(
            f"- default minus {s}: {differences.mean():+.2f} ± {error:.2f} ({len(differences)} tasks: ahead on "
            f"{int((differences < 0).sum())}, behind on {int((differences > 0).sum())})"
        )
    return lines + [""]


def recorded_settings(
    path: Path, name: str, labels: list[str], seeds: int, steps: int
) -> dict[str, list[dict[str, Any]]]:
    """The runs of task `name` under each of `labels` recorded in `path` for all `seeds` seeds (none of its own
    decision code, so always current), by label; a label with a seed missing is left out."""
    with locked_json(path, {"runs": {}}) as data:
        recorded = dict(data["runs"])
    found = {label: [recorded.get(run_key(name, label, s, steps)) for s in range(seeds)] for label in labels}
    return {label: runs for label, runs in found.items() if all(r is not None for r in runs)}


def grid_line(task: HoldoutTask, grid_runs: dict[float, list]) -> str:
    """Mean test metric at each grid LR, and the point best on validation."""
    best, at_best = best_point(task, grid_runs), fmt(oracle_test(task, grid_runs), task.metric)
    return (
        " · ".join(
            f"{lr:.3g}: {fmt(np.mean([counted(task, r) for r in v]), task.metric)}" for lr, v in grid_runs.items()
        )
        + f" (best on validation: {best:.3g}, {at_best})."
    )


def task_report(
    name: str,
    task: HoldoutTask,
    grid_runs: dict[float, list],
    autowu: dict[str, list],
    peaks: dict[float, list] | None = None,
    baselines: dict[str, list] | None = None,
) -> list[str]:
    """One task's table: the grid (and AutoWU's schedule at each grid peak, `peaks`, when run), then each AutoWU
    setting's metric, regret, LRs and rewind outcome; then each baseline's (`baselines`, when recorded)."""
    oracle = oracle_test(task, grid_runs)
    lines = [f"### {name}: {task.description}", "", "Grid (test): " + grid_line(task, grid_runs), ""]
    if peaks:
        forced = "AutoWU's schedule with its peak forced to each grid LR (`--at`; test): "
        lines += [forced + grid_line(task, peaks), ""]
    lines += [
        "| AutoWU | test | regret | at chance | peak LR per seed | switch (step, reason) | "
        "rewind: shift at the switch, outcome |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting, runs in autowu.items():
        values = [counted(task, r) for r in runs]
        setting_regret, failed = setting_outcome(task, runs, oracle)
        spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
        scale = 100 if task.metric == "accuracy" else 1
        outcome = ", ".join(
            "off"
            if r.get("rewind_off")
            else ("restored" if r["rewound"] else "kept") + ("" if r["shift"] is None else f" ({r['shift']:.2f})")
            for r in runs
        )
        lines.append(
            f"| {setting} | {fmt(np.mean(values), task.metric)} ± {scale * spread:.{2 if scale == 100 else 4}f} | "
            f"{setting_regret:+.2f} | {failed}/{len(values)} | "
            + ", ".join(f"{r['lr']:.3g}" for r in runs)
            + " | "
            + ", ".join(f"{r['switch_step']} {r['switch_reason']}" for r in runs)
            + f" | {outcome} |"
        )
    lines.append("")
    for label, runs in (baselines or {}).items():
        values = [counted(task, r) for r in runs]
        setting_regret, failed = setting_outcome(task, runs, oracle)
        mean = fmt(np.mean(values), task.metric)
        outcome = f"{mean}, regret {setting_regret:+.2f}, {failed}/{len(values)} at chance"
        if BASELINES[label] in m.FINDER_METHODS:
            what = f"LR {label}, with the task's optimizer, then the oracle's schedule to the LR suggested"
            outcome += ", LRs " + ", ".join(f"{r['lr']:.3g}" for r in runs)
        else:
            what = f"{label} at its package defaults (LR {m.SCHEDULEFREE_LR:g}, 5% warmup), not the task's optimizer"
        lines.append(f"- {what}: {outcome}.")
    return lines + ([""] if baselines else [])


def replay(losses: list[float], steps: int, **options: Any) -> AutoWU:
    """Feed a recorded ramp's losses to an `AutoWU` for `steps` with `options` (rewind off) until it switches."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=steps, rewind=False, **options)
    for loss in losses:
        if scheduler.phase != "warmup":
            break
        scheduler.step(loss)
    return scheduler


def replay_report(
    name: str, task: HoldoutTask, steps: int, ramps: list[dict], grid_runs: dict[float, list], options: dict
) -> str:
    """One line per task: where the replayed scheduler switches, the LR it chooses, and the regret the oracle's grid
    suggests for that LR (its mean test metric interpolated in log2 of the LR: a proxy, as in `decisions.py`)."""
    lrs = np.log2(sorted(grid_runs))
    curve = [np.mean([counted(task, r) for r in grid_runs[lr]]) for lr in sorted(grid_runs)]
    oracle = oracle_test(task, grid_runs)
    switched = [replay(ramp["losses"], steps, **options) for ramp in ramps]
    proxies = [regret(float(np.interp(np.log2(s.peak_lr), lrs, curve)), oracle, task.metric) for s in switched]
    return (
        f"{name}: "
        + ", ".join(f"switch {s.switch_step} ({s.switch_reason}) at LR {s.peak_lr:.3g}" for s in switched)
        + f"; proxy regret {np.mean(proxies):+.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument(
        "--default-seeds",
        type=int,
        default=None,
        help="seeds of the default setting alone (default: --seeds): more of them sample its failures better",
    )
    parser.add_argument(
        "--fractions", default="", help="comma-separated slowed_fraction values to run besides the default"
    )
    parser.add_argument(
        "--at",
        default="",
        help="comma-separated tasks on which AutoWU's schedule also runs with its peak forced to each grid LR "
        "(quality.py's autowu_at), to tell a miss of the LR choice from one of the schedule ('all': every task of "
        "--tasks); decisions.py scores a task's replayed LRs with these runs",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also run the LR range test with both rules (torch-lr-finder with the task's optimizer, then the "
        "oracle's schedule at the suggestion) and Schedule-Free AdamW at its package defaults, --seeds seeds; the "
        "report shows them wherever they are recorded",
    )
    parser.add_argument("--redo", action="store_true", help="re-run the selected runs even if recorded")
    parser.add_argument("--out-dir", type=Path, default=None, help="where holdout.json goes (default results/)")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="30 steps, 1 seed, 2 grid points, the other settings than the default and the paper preset on the first "
        "task only: checks that it runs",
    )
    parser.add_argument(
        "--replay",
        default=None,
        metavar="JSON",
        help="instead of writing the report, replay the recorded ramps under these AutoWUConfig options ('{}': the "
        "defaults) and print each task's switches, LRs and proxy regret",
    )
    args = resolve_output_paths(parser.parse_args(argv), "holdout_smoke_")
    base_seeds = 1 if args.smoke else args.seeds
    if args.default_seeds is None or args.smoke:
        args.default_seeds = base_seeds
    elif args.default_seeds < args.seeds:
        parser.error(f"--default-seeds must be at least --seeds ({args.seeds}), got {args.default_seeds}")
    holdout_tasks.PRETRAINED = not args.smoke
    names = [t for t in args.tasks.split(",") if t]
    if unknown := sorted(set(names) - set(TASKS)):
        parser.error(f"unknown --tasks {unknown}; choose from {list(TASKS)}")
    at_tasks = set(names) if args.at == "all" else {t for t in args.at.split(",") if t}
    if stray := sorted(at_tasks - set(names)):
        parser.error(f"--at {stray} must be among --tasks {names}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    results = args.out_dir / "holdout.json"
    default = AutoWUConfig().preset_setting("slowed_fraction")
    default_label = f"defaults (slowed_fraction {default})"
    settings: dict[str, dict[str, float]] = {default_label: {}}
    settings |= {label: {"rewind_min_shift": shift} for label, shift in REWIND_SETTINGS.items()}
    settings |= {f"slowed_fraction {float(f)}": {"slowed_fraction": float(f)} for f in args.fractions.split(",") if f}
    settings["paper preset"] = {"preset": "paper"}
    lines = [
        "## Held-out checks (`benchmarks/holdout.py`)",
        "",
        "Model families and optimizers outside the suite (every `quality.py` task uses AdamW), each in a hand-written "
        "loop with `AutoWU(optimizer, total_steps=..., model=model)`. Role `chosen-on`: no setting was chosen on "
        "these up to 64f9e55, but their ramps helped choose the two rules of 19c648e; role `fresh`: added after "
        "those rules were fixed, never used to choose anything until `max_descent_left` 0.06, which `decisions.py` "
        "picked on the ramps of the suite and of the nine tasks then here (its leave-one-task-out table is the "
        "held-out check); role `unseen`: added after every setting was fixed (four at decision code 55fe3620b1a3, "
        "`timm_transfer_adamw`, `mlp_fullbatch_adamw` and `gpt2_wide_finetune_adamw` at c727c8c944ee, "
        "`digits_unet_adamw` at 27a4544fdf75, `mixtral_moe_adamw`, `clip_adamw`, `code_tagger_adamw` and "
        "`gpt2_dpo_adamw` at 001b84b46859) and run once. "
        "Test metric, mean ± std over "
        f"{base_seeds} seeds"
        + ("" if args.default_seeds == base_seeds else f" ({args.default_seeds} for the defaults)")
        + " (accuracy in %, loss in nats per byte, a squared error or DPO's loss); regret in units of 0.5 pp "
        "or 1% of the oracle's loss, as in `quality.py`. The oracle is `quality.py`'s (5% warmup + cosine, best grid "
        "point on validation). Rewind: the shift `||now - snapshot|| / ||snapshot||` where the run kept its steps "
        "(below `rewind_min_shift`); the two rewind rows force each outcome, so they show what the gate's choice "
        "was worth. Baselines, where recorded (`--baselines`): the LR range test, torch-lr-finder's sweep from 1e-7 "
        "to 10 in 100 steps with the task's own optimizer (no clipping), the steepest-slope or the minimum/10 rule, "
        "then the oracle's schedule to the LR suggested, as `quality.py`'s range tests but not its AdamW; "
        "Schedule-Free AdamW at its package defaults (LR 2.5e-3, no weight decay) with 5% warmup in place of the "
        "task's optimizer, as in `quality.py`, the task's clipping kept, scored with its eval weights and, in "
        f"models with BatchNorm, their own statistics ({BN_RECALIBRATION_BATCHES} training batches forward, as "
        "the schedulefree package recommends). "
        f"AutoWU rows at decision code {decision_code_line()}.",
        "",
    ]
    task_lines: list[str] = []
    cpus: list[tuple[str | None, str]] = []  # (CPU, kind) of every run the report uses
    summary: dict[str, tuple[str, dict[str, tuple[float, int]]]] = {}
    for name in names:
        task = TASKS[name]
        steps, seeds, lrs = (30, 1, task.grid[3:5]) if args.smoke else (task.steps, args.seeds, task.grid)
        one = partial(recorded_run, results, args.redo, name, task, steps)
        grid_runs = {lr: [one(f"oracle {lr:g}", s, lr) for s in range(seeds)] for lr in lrs}
        while not args.smoke and (edge := best_at_edge(task, grid_runs)) is not None:  # as quality.py's oracle
            grid_runs[edge] = [one(f"oracle {edge:g}", s, edge) for s in range(seeds)]
            grid_runs = dict(sorted(grid_runs.items()))
        ramps = [one(RAMP, s, **RAMP_OPTIONS) for s in range(seeds)]
        peaks = (
            {lr: [one(f"autowu_at {lr:g}", s, forced_peak=lr) for s in range(seeds)] for lr in grid_runs}
            if name in at_tasks
            else None
        )
        if args.replay is not None:
            print(replay_report(name, task, steps, ramps, grid_runs, json.loads(args.replay)))
            continue
        autowu = {
            label: [one(label, s, **options) for s in range(args.default_seeds if label == default_label else seeds)]
            for label, options in settings.items()
            if not args.smoke or name == names[0] or label in (default_label, "paper preset")
        }
        if args.baselines:
            baselines = {label: [one(label, s, baseline=b) for s in range(seeds)] for label, b in BASELINES.items()}
        else:
            baselines = recorded_settings(results, name, list(BASELINES), seeds, steps)
        oracle = oracle_test(task, grid_runs)
        compared = {label: autowu[label] for label in (default_label, "paper preset")} | baselines
        summary[name] = (task.role, {label: setting_outcome(task, runs, oracle) for label, runs in compared.items()})
        task_lines += task_report(name, task, grid_runs, autowu, peaks, baselines)
        cpus += [(r.get("machine"), "oracle") for runs in grid_runs.values() for r in runs]
        cpus += [(r.get("machine"), "ramp") for r in ramps]
        cpus += [(r.get("machine"), "AutoWU") for runs in [*autowu.values(), *(peaks or {}).values()] for r in runs]
        cpus += [
            (r.get("machine"), "range test" if BASELINES[label] in m.FINDER_METHODS else label)
            for label, runs in baselines.items()
            for r in runs
        ]
        print(f"{name}: done")
    if args.replay is None:
        lines += [cpus_line(cpus), "", "Regret per task (role: see `holdout_tasks.py`):", "", *summary_table(summary)]
        if not args.smoke and (suite := suite_outcomes(args.out_dir / "quality.json", default_label)):
            lines += [
                f"The benchmark suite's {len(suite)} tasks and these together (the suite's rows from `quality.py`: "
                "its default, paper preset and baselines, each against its own oracle, as in its section):",
                "",
                *all_task_comparison(suite | summary, setting_labels(summary)),
            ]
        lines += task_lines
        update_section(args.results_md, "holdout", "\n".join(lines))
        print(f"wrote the holdout section of {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
