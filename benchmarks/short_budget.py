#!/usr/bin/env python
"""Short budgets: four tasks of ``quality.py`` (hand loop, Trainer, TRL fine-tune) cut to 30 optimizer steps, so
that AutoWU's ramp (half the budget, from 1e-5 to 1 in 15 steps) reaches its cap before the 20 losses a switch
test needs; and, with ``--steps``, to other budgets (50-80 steps: the first test comes after 20 losses of a ramp
growing 1.3-1.6x per step).

    python benchmarks/short_budget.py                   # this checkout's AutoWU, and the fixed peaks, at 30 steps
    python benchmarks/short_budget.py --steps 50,64,80  # the same at other budgets (a table per budget)
    python benchmarks/short_budget.py --label 36fd963   # rows of another revision, run with its hf_autowu imported
    python benchmarks/short_budget.py --steps 50,64,80 --probe "lag 2" --autowu-only  # under a rule probe's patch

Each AutoWU run records how warmup ended, the peak LR and the test metric; the reference is the oracle's recipe
(5% warmup + cosine) at three fixed peaks around the task's oracle centre (/4, x1, x4), the best on validation.
The report puts every label beside it (section "Short budgets" of ``RESULTS.md``). With ``--probe``, AutoWU's runs
are made under one of ``rule_probes.py``'s patches of the decision code (``lag K``, ``cap K``, ``descended``,
``mean K``), labelled ``REVISION VARIANT``: real runs of a rule that ``rule_probes.py`` only replays.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import rule_probes
from common import RESULTS_DIR, RESULTS_MD, locked_json, update_section
from runner import library_revision
from tasks import TASKS

TASK_NAMES = ("digits_cnn_short", "timm_digits", "gpt2_stdlib", "gpt2_finetune_docs")
STEPS = 30
SEEDS = (0, 1)
PEAK_FACTORS = (0.25, 1.0, 4.0)


def run(task_name: str, method: str, seed: int, peak_lr: float | None, steps: int = STEPS) -> dict:
    """One run of `task_name` cut to `steps` optimizer steps: AutoWU's defaults (`method="autowu"`) or the oracle's
    recipe at `peak_lr` (`method="oracle"`)."""
    task = dataclasses.replace(TASKS[task_name], steps=steps)
    result = task.runner(task, method, seed, peak_lr)
    info = result.info or {}
    return {
        "task": task_name,
        "steps": steps,
        "metric": task.metric,
        "method": method,
        "seed": seed,
        "peak_lr": info.get("peak_lr", peak_lr),
        "switch_step": info.get("switch_step"),
        "switch_reason": info.get("switch_reason"),
        "val": result.val,
        "test": result.test,
    }


def _format(metric: str, values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}%" if metric == "accuracy" else f"{v:.3f}" for v in values)


def _steps(row: dict) -> int:
    return row.get("steps", STEPS)  # rows recorded before budgets other than 30 were run have no "steps"


def _key(row: dict, label: str) -> str:
    """The row's key in the JSON: `label|task|seed` (AutoWU) or `fixed|task|peak|seed`, then `@steps` unless 30."""
    head = (
        f"{label}|{row['task']}|{row['seed']}"
        if row["method"] == "autowu"
        else f"fixed|{row['task']}|{row['peak_lr']:.3g}|{row['seed']}"
    )
    return head if row["steps"] == STEPS else f"{head}@{row['steps']}"


def report(runs: dict[str, dict], tasks: tuple[str, ...] = TASK_NAMES, seeds: tuple[int, ...] = SEEDS) -> str:
    """The section's text: a table per budget, each with a row per task, a column per label and one for the best
    fixed peak."""
    lines = [
        "Each task cut to a few dozen optimizer steps, seeds " + ", ".join(map(str, seeds)) + ": AutoWU's defaults "
        "(per cell: test metric by seed; how warmup ended; peak LR, median over seeds) and the oracle's recipe "
        "(5% warmup + cosine) at the best on validation of three fixed peaks (the task's oracle centre /4, x1, x4). "
        "Accuracy higher is better, loss (nats per byte) lower; chance level: 10% on the digits, 5.27 nats. At 30 "
        "steps the ramp reaches its cap before the 20 losses a switch test needs; at 50-80 steps the first test "
        "comes after 20 losses, when the ramp (1.3-1.6x per step) has passed the LRs these tasks train best at.",
    ]
    for steps in sorted({_steps(r) for r in runs.values()}):
        lines += [
            "",
            f"**{steps} steps**",
            "",
            *_budget_table({k: r for k, r in runs.items() if _steps(r) == steps}, tasks),
        ]
    lines += [
        "",
        "Reproduce: `python benchmarks/short_budget.py` (30 steps; about 5 minutes on 2 CPU cores) and `python "
        "benchmarks/short_budget.py --steps 50,64,80` (about 8 minutes); the rows of an older revision come from "
        "the same script run where that revision's `hf_autowu` is the one imported, with `--label` and "
        "`--autowu-only`; a label with a rule probe's name after the revision (`lag 2`) comes from `--probe`.",
    ]
    return "\n".join(lines)


def _budget_table(runs: dict[str, dict], tasks: tuple[str, ...]) -> list[str]:
    """One budget's table: a row per task, a column per label and one for the best fixed peak."""
    first_run: dict[str, int] = {}
    for row in runs.values():
        if row["method"] == "autowu":
            first_run[row["label"]] = min(first_run.get(row["label"], row["order"]), row["order"])
    labels = sorted(first_run, key=first_run.get)
    lines = [
        "| task | " + " | ".join(f"AutoWU {label}" for label in labels) + " | best fixed peak |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for task in tasks:
        rows_of = [r for r in runs.values() if r["task"] == task]
        if not rows_of:
            continue
        metric = rows_of[0]["metric"]
        cells = []
        for label in labels:
            rows = sorted(
                (r for r in rows_of if r["method"] == "autowu" and r["label"] == label), key=lambda r: r["seed"]
            )
            if not rows:
                cells.append("-")
                continue
            ends = ", ".join(f"{r['switch_step']} {r['switch_reason']}" for r in rows)
            peak = statistics.median(r["peak_lr"] for r in rows)
            cells.append(f"{_format(metric, [r['test'] for r in rows])} ({ends}; {peak:.2g})")
        fixed: dict[float, list[dict]] = {}
        for r in rows_of:
            if r["method"] == "oracle":
                fixed.setdefault(r["peak_lr"], []).append(r)
        if fixed:
            sign = 1 if metric == "accuracy" else -1
            best = max(fixed, key=lambda lr: sign * statistics.mean(r["val"] for r in fixed[lr]))
            rows = sorted(fixed[best], key=lambda r: r["seed"])
            cells.append(f"{_format(metric, [r['test'] for r in rows])} (peak {best:.2g})")
        else:
            cells.append("-")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default=None, help="the column AutoWU's rows go in (default: the revision)")
    parser.add_argument("--autowu-only", action="store_true", help="skip the fixed peaks")
    parser.add_argument("--report-only", action="store_true", help="only write the section from recorded rows")
    parser.add_argument("--smoke", action="store_true", help="digits_cnn_short, seed 0, AutoWU only")
    parser.add_argument(
        "--probe",
        default=None,
        help=f"run AutoWU under this rule probe's patch, one of: {', '.join(rule_probes.PATCHES)}",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="where the JSON and RESULTS.md go")
    parser.add_argument(
        "--steps", default=str(STEPS), help="budgets to cut the tasks to, comma-separated (default 30)"
    )
    args = parser.parse_args(argv)
    try:
        budgets = [int(value) for value in args.steps.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        parser.error(f"--steps must be positive integers, comma-separated, got {args.steps!r}")
    if args.probe is not None and args.probe not in rule_probes.PATCHES:
        parser.error(f"--probe must be one of {', '.join(rule_probes.PATCHES)}, got {args.probe!r}")
    label = args.label or " ".join(filter(None, (library_revision(), args.probe)))
    out = (args.out_dir or RESULTS_DIR) / "short_budget.json"
    md = RESULTS_MD if args.out_dir is None else args.out_dir / "RESULTS.md"
    tasks, seeds = (("digits_cnn_short",), (0,)) if args.smoke else (TASK_NAMES, SEEDS)
    if not args.report_only:
        with locked_json(out, {"runs": {}}) as data:
            order = max((r["order"] for r in data["runs"].values()), default=-1) + 1
        for steps in budgets:
            for task in tasks:
                plans = [("autowu", None)]
                if not (args.autowu_only or args.smoke):
                    plans += [("oracle", TASKS[task].oracle_center * f) for f in PEAK_FACTORS]
                for method, peak in plans:
                    for seed in seeds:
                        probe = args.probe if method == "autowu" and args.probe else rule_probes.DEFAULT
                        with rule_probes.patched(probe):  # the defaults' variant patches nothing
                            row = {**run(task, method, seed, peak, steps), "label": label, "order": order}
                        print(
                            f"{label} {task} @{steps} {method} peak={row['peak_lr']:.3g} seed={seed}: test "
                            f"{row['test']:.4f} ({row['switch_step']} {row['switch_reason']})",
                            flush=True,
                        )
                        with locked_json(out, {"runs": {}}) as data:
                            data["runs"][_key({**row, "peak_lr": peak}, label)] = row
    with locked_json(out, {"runs": {}}) as data:
        runs = dict(data["runs"])
    update_section(
        md,
        "short-budget",
        "## Short budgets (`benchmarks/short_budget.py`)\n\n" + report(runs, tasks, seeds),
    )
    print(f"wrote the short-budget section of {md}")


if __name__ == "__main__":
    sys.exit(main())
