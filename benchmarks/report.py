"""The quality report: one table per task, where AutoWU stands against each method, and the plots.

AutoWU rows recorded with other decision code than the current one (see `runner.decision_fingerprint`, and
`runner.SAME_DECISIONS_AS` for older code shown to decide the same) are refused: they are listed as stale instead of
being reported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import methods as m
import numpy as np
from common import cpus_line, machine_info
from runner import decision_code_line, has_current_decisions, library_revision, score
from tasks import TASKS

ACCURACY_TOLERANCE_PP = 0.5
LOSS_TOLERANCE_RELATIVE = 0.01
CHANCE_LEVEL = {"accuracy": 0.1, "loss": math.log(256)}
"""The suite's chance levels, by metric: a tenth for the ten digit classes, ln 256 for a uniform byte."""


def counted(value: float | None, metric: str) -> float:
    """A run's metric as the report counts it: a missing or non-finite one (a run that diverged; the results file
    stores it as null) counts at the suite's chance level (`CHANCE_LEVEL`), so that means over seeds and tasks stay
    finite and pay for the failure."""
    return value if value is not None and math.isfinite(value) else CHANCE_LEVEL[metric]


def summarize(runs: list[dict[str, Any]]) -> tuple[dict[str, dict[str, dict[str, Any]]], list[dict[str, Any]]]:
    """Per task and method: the runs that count (the oracle's best grid LR), their metrics and compute.

    Returns:
        The summary, and the AutoWU runs refused as stale (recorded with other decision code).
    """
    stale = [r for r in runs if r["method"] in m.AUTOWU_METHODS and not has_current_decisions(r)]
    runs = [r for r in runs if r not in stale and r["method"] in m.METHODS]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in [t for t in TASKS if any(r["task"] == t for r in runs)]:
        task_runs = [r for r in runs if r["task"] == task]
        metric = task_runs[0]["metric"]
        out[task] = {}
        for method in m.METHODS:
            chosen = [r for r in task_runs if r["method"] == method]
            if not chosen:
                continue
            extra: dict[str, Any] = {}
            compute = [r["compute"] for r in chosen]
            if method == "oracle":
                by_lr: dict[float, list[dict]] = {}
                for r in chosen:
                    by_lr.setdefault(r["grid_lr"], []).append(r)
                best = max(by_lr, key=lambda lr: np.mean([score(r["val"], metric) for r in by_lr[lr]]))
                per_seed_compute: dict[int, int] = {}
                for r in chosen:
                    per_seed_compute[r["seed"]] = per_seed_compute.get(r["seed"], 0) + r["compute"]
                compute = list(per_seed_compute.values())
                extra = {
                    "lr": best,
                    "grid": {lr: [r["val"] for r in rs] for lr, rs in sorted(by_lr.items())},
                    "grid_test": {lr: [r["test"] for r in rs] for lr, rs in sorted(by_lr.items())},
                }
                chosen = by_lr[best]
            elif method in m.AUTOWU_METHODS:
                extra = {"lr": geo_mean([r["info"].get("peak_lr") for r in chosen])}
            elif method in m.FINDER_METHODS:
                extra = {"lr": geo_mean([r["info"].get("suggested_lr") for r in chosen])}
            out[task][method] = {
                "metric": metric,
                "runs": sorted(chosen, key=lambda r: r["seed"]),
                "test": [counted(r["test"], metric) for r in chosen],
                "val": [counted(r["val"], metric) for r in chosen],
                "compute": float(np.mean(compute)),
                "wall_s": sum(r["wall_s"] for r in task_runs if r["method"] == method),
                **extra,
            }
    return out, stale


def geo_mean(values: list[float | None]) -> float | None:
    """Geometric mean of the positive finite values (None if there are none)."""
    good = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return float(np.exp(np.mean(np.log(good)))) if good else None


def mean_std(values: list[float | None], scale: float = 1.0) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of ``values`` times ``scale``; non-finite values propagate as NaN."""
    arr = np.array([math.nan if v is None else v for v in values], dtype=float) * scale
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def failed(run: dict[str, Any]) -> bool:
    """A run that ended at chance level (accuracy <= 20%) or with a non-finite / chance-level (ln 256) loss."""
    value = run["test"]
    if value is None or not math.isfinite(value):
        return True
    return value <= 0.2 if run["metric"] == "accuracy" else value >= 0.95 * math.log(256)


def regret(value: float, oracle: float, metric: str) -> float:
    """How far ``value`` is behind the oracle's ``oracle``, in units of the tolerance (0.5 pp of accuracy, or 1%
    of the oracle's loss); negative when ahead."""
    if metric == "accuracy":
        return (oracle - value) * 100.0 / ACCURACY_TOLERANCE_PP
    return (value - oracle) / (LOSS_TOLERANCE_RELATIVE * oracle)


def within_band(row: dict[str, Any], oracle_row: dict[str, Any]) -> tuple[bool, float]:
    """Whether a method is within the oracle's band (one std of the oracle's seeds, or the tolerance, whichever is
    larger; a method's own spread does not widen it), and its gap in the metric's units (positive = behind)."""
    metric = row["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0
    mean = mean_std(row["test"], scale)[0]
    oracle_mean, oracle_std = mean_std(oracle_row["test"], scale)
    gap = (oracle_mean - mean) if metric == "accuracy" else (mean - oracle_mean)
    tolerance = ACCURACY_TOLERANCE_PP if metric == "accuracy" else LOSS_TOLERANCE_RELATIVE * oracle_mean
    return gap <= max(oracle_std, tolerance), gap


def notes(method: str, row: dict[str, Any]) -> str:
    """Per-method notes: AutoWU's switch (mean step, reasons, rewinds) and the code revision(s) of its runs."""
    if method == "oracle":
        return f"grid {min(row['grid']):.3g}..{max(row['grid']):.3g} ({len(row['grid'])} points)"
    if method not in m.AUTOWU_METHODS:
        return ""
    steps = [r["info"].get("switch_step") for r in row["runs"]]
    steps = [s for s in steps if s is not None]
    reasons = sorted({str(r["info"].get("switch_reason")) for r in row["runs"]})
    revisions = sorted({r.get("revision", "?") for r in row["runs"]})
    switch = f"switch at step {np.mean(steps):.0f}" if steps else "no switch"
    rewound = sum(r["info"].get("rewound_to") is not None for r in row["runs"])
    return f"{switch} ({', '.join(reasons)}); rewound {rewound}/{len(row['runs'])}; rev {', '.join(revisions)}"


def task_table(task: str, methods: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table of one task."""
    spec = TASKS[task]
    is_acc = spec.metric == "accuracy"
    scale, digits = (100.0, 2) if is_acc else (1.0, 4)
    steps = spec.steps
    lines = [
        f"### {task}: {spec.title}, {steps} steps per run",
        "",
        "| method | settings | test | val | n | failed | compute (steps) | gap to oracle | LR | wall (s) | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    oracle_mean = mean_std(methods["oracle"]["test"], scale)[0] if "oracle" in methods else math.nan
    for method, row in methods.items():
        test_m, test_s = mean_std(row["test"], scale)
        val_m, val_s = mean_std(row["val"], scale)
        gap = "" if method == "oracle" or math.isnan(oracle_mean) else f"{test_m - oracle_mean:+.{digits}f}"
        lr = "" if row.get("lr") is None else f"{row['lr']:.2e}"
        lines.append(
            f"| {method} | {m.METHODS[method]} | {test_m:.{digits}f} ± {test_s:.{digits}f} | "
            f"{val_m:.{digits}f} ± {val_s:.{digits}f} | {len(row['test'])} | "
            f"{sum(failed(r) for r in row['runs'])} | {row['compute']:.0f} | {gap} | {lr} | "
            f"{row['wall_s']:.0f} | {notes(method, row)} |"
        )
    if "oracle" in methods:
        grid = methods["oracle"]["grid"]
        cells = " · ".join(f"{lr:.3g}: {mean_std(v, scale)[0]:.{digits}f}" for lr, v in grid.items())
        lines += ["", f"Oracle grid (peak LR: mean val over seeds): {cells}."]
    lines += ["", f"![LR and training loss per step, {task}](results/{task}.png)", ""]
    return lines


def standing(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Per task: the default's gap to the oracle (and whether it is within the band), to Schedule-Free and to the
    range tests; then each method's mean regret over the tasks."""
    lines = [
        "### Where the default stands",
        "",
        "Band: within one std of the oracle's seeds or the tolerance (0.5 pp accuracy, 1% relative loss) of the "
        "oracle, whichever is larger (a method's own spread does not widen it). Regret: distance behind the oracle "
        "in units of that tolerance (negative = ahead), "
        "so that tasks with different metrics can be averaged.",
        "",
        "| task | metric | default | oracle | gap | in band | Schedule-Free | range test (steepest) | "
        "range test (min/10) | paper preset |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    regrets: dict[str, dict[str, tuple[float, float]]] = {}  # method -> task -> (regret, its standard error)
    for task, methods in summary.items():
        if "oracle" not in methods:
            continue
        metric = methods["oracle"]["metric"]
        scale, unit = (100.0, "pp") if metric == "accuracy" else (1.0, "")
        oracle_mean = mean_std(methods["oracle"]["test"], scale)[0]
        for method, row in methods.items():
            regrets.setdefault(method, {})[task] = regret_with_error(row["test"], methods["oracle"]["test"], metric)
        cells = []
        for method in ("schedulefree", "lr_finder", "lr_finder_min10", "autowu_paper"):
            row = methods.get(method)
            cells.append("" if row is None else f"{mean_std(row['test'], scale)[0]:.4g}")
        if "autowu" in methods:
            ok, gap = within_band(methods["autowu"], methods["oracle"])
            default = f"{mean_std(methods['autowu']['test'], scale)[0]:.4g}"
            lines.append(
                f"| {task} | {metric} | {default} | {oracle_mean:.4g} | {gap:+.3g}{unit} | "
                f"{'yes' if ok else 'no'} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "Mean regret over the tasks each method ran (lower is better; tasks: "
        f"{len([t for t in summary if 'oracle' in summary[t]])}; ± one standard error from the seeds' spread, the "
        "oracle's own spread left out since it moves every method alike):",
        "",
    ]
    ranked = sorted(regrets.items(), key=lambda item: mean_regret(item[1])[0])
    for method, per_task in ranked:
        mean, error = mean_regret(per_task)
        spread = "" if method == "oracle" else f" ± {error:.2f}"  # 0 by definition
        lines.append(f"- {method}: {mean:+.2f}{spread} ({len(per_task)} tasks)")
    if "autowu" in regrets:
        lines += ["", "The default against each method, on the tasks both ran (mean of the per-task differences):", ""]
        for method, per_task in ranked:
            if method in ("autowu", "oracle") or not (shared := [t for t in per_task if t in regrets["autowu"]]):
                continue
            differences = {
                t: (regrets["autowu"][t][0] - per_task[t][0], math.hypot(regrets["autowu"][t][1], per_task[t][1]))
                for t in shared
            }
            mean, error = mean_regret(differences)
            ahead = sum(d < 0 for d, _ in differences.values())
            behind = sum(d > 0 for d, _ in differences.values())
            lines.append(
                f"- default minus {method}: {mean:+.2f} ± {error:.2f} ({len(shared)} tasks: ahead on {ahead}, "
                f"behind on {behind})"
            )
    return lines + [""]


def regret_with_error(
    values: list[float | None], oracle_values: list[float | None], metric: str
) -> tuple[float, float]:
    """A method's regret on one task (its mean test metric against the oracle's) and the standard error of that regret
    from the spread of its seeds (std / sqrt(n), in regret units; 0 for one seed)."""
    mean, std = mean_std(values)
    oracle = mean_std(oracle_values)[0]
    error = std / math.sqrt(len(values))
    value = regret(mean, oracle, metric)
    return value, abs(regret(mean + error, oracle, metric) - value)


def mean_regret(per_task: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The mean of per-task (regret, standard error) pairs and its standard error (the tasks' errors combined as
    independent)."""
    values = list(per_task.values())
    return (
        float(np.mean([r for r, _ in values])),
        math.sqrt(sum(e * e for _, e in values)) / len(values),
    )


def report(
    summary: dict[str, dict[str, dict[str, Any]]],
    stale: list[dict[str, Any]],
    commands: list[str],
    runs: list[dict[str, Any]],
) -> str:
    """The Markdown section of `quality.py` (`runs`: every recorded run, for the CPUs they ran on)."""
    lines = [
        "## Quality per compute (`benchmarks/quality.py`)",
        "",
        "Reproduce: `python benchmarks/quality.py` (every task, method and seed; resumable, and several "
        "processes can share the work). The runs below came from these invocations: "
        + "; ".join(f"`{c}`" for c in commands),
        "",
        f"Machine: {machine_info()}. Wall times depend on what else ran on the machine; they are only roughly "
        "comparable.",
        "",
        cpus_line((run.get("machine"), run["method"]) for run in runs),
        "",
        f"AutoWU rows (`runner.decision_fingerprint`): decision code {decision_code_line()}, at revision "
        f"{library_revision()} of this report; rows recorded with other decision code are refused.",
        "",
        "Metric: test accuracy (%) or test loss (nats per byte, masked bytes for the masked LM); mean ± std over "
        "seeds (n). Failed: runs that ended at chance level (accuracy <= 20%, or loss >= 0.95 ln 256, or non-finite; "
        "a non-finite metric counts in the means at chance level, 10% or ln 256). Compute: optimizer steps per seed, "
        "every grid point and LR sweep included. Gap: method minus oracle on test. LR: peak LR used (oracle: chosen "
        "grid point; AutoWU: LR chosen at the switch; range tests: suggestion; geometric mean over seeds). Wall: "
        "seconds for all seeds together.",
        "",
    ]
    lines += standing(summary)
    for task, methods in summary.items():
        lines += task_table(task, methods)
    if stale:
        names = sorted({f"{r['task']}/{r['method']}" for r in stale})
        lines += [
            f"Refused as stale (other decision code; re-run them): {len(stale)} runs of " + ", ".join(names) + ".",
            "",
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, dict[str, Any]]], out_dir: Path, tasks: list[str]) -> None:
    """One PNG per task in ``tasks``: LR and training loss versus step of each method (lowest seed; oracle: chosen
    LR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task, methods in summary.items():
        if task not in tasks:
            continue
        fig, (ax_lr, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.5))
        for method, row in methods.items():
            run = row["runs"][0]
            lrs = np.array([math.nan if v is None else v for v in run["lrs"]], dtype=float)
            losses = np.array([math.nan if v is None else v for v in run["losses"]], dtype=float)
            ax_lr.plot(np.arange(1, len(lrs) + 1), lrs, label=method)
            ax_loss.plot(np.arange(1, len(losses) + 1), losses, label=method, lw=0.8)
        ax_lr.set(
            yscale="log",
            xlabel="optimizer step",
            ylabel="learning rate (Prodigy: lr x d)",
            title=f"{task}: learning rate (seed {min(r['runs'][0]['seed'] for r in methods.values())})",
        )
        ax_loss.set(yscale="log", xlabel="optimizer step", ylabel="training loss", title=f"{task}: training loss")
        ax_lr.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{task}.png", dpi=80)
        plt.close(fig)
