#!/usr/bin/env python
"""One bad batch in warmup: the digits CNN tasks of ``quality.py`` in the README's hand-written loop, with every label
of one step's batch masked (``ignore_index``, as a batch of prompts whose completions were all truncated away), so
that step's loss is 0/0, NaN (its gradients are zero: the weights stay finite, only AutoWU reads the NaN).

    python benchmarks/bad_batch.py                 # this checkout's AutoWU
    python benchmarks/bad_batch.py --label 04b9aae  # rows of another revision, run with its hf_autowu importable

Each run records when and why warmup ended, the peak LR, the retry (if any) and the test accuracy; the report puts
every label's rows side by side (section "One bad batch" of ``RESULTS.md``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS_DIR, RESULTS_MD, locked_json, update_section
from tasks import TASKS, DigitsCNN, _classify, _endless, classifier_loop_setup, digits_splits

import hf_autowu

TASK_NAMES = ("digits_cnn", "digits_cnn_short")
MASKED_STEPS = (None, 5, 40, 90)
SEEDS = (0, 1, 2)


def run(task_name: str, masked_step: int | None, seed: int) -> dict:
    """One AutoWU run of `task_name` with the labels of step `masked_step` (0-based; None: none) masked."""
    task = TASKS[task_name]
    splits = digits_splits()
    torch.manual_seed(seed)
    model = DigitsCNN()
    model, optimizer, scheduler, loader, _ = classifier_loop_setup(task, "autowu", seed, None, model, *splits["train"])
    batches = _endless(loader)
    model.train()
    for step in range(task.steps):
        x, y = next(batches)
        if step == masked_step:
            y = torch.full_like(y, -100)  # cross_entropy's ignore_index: a mean over no label
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step(loss.detach())
    model.eval()
    test, _ = _classify(model, *splits["test"])
    retried = getattr(scheduler, "retried", None)
    return {
        "task": task_name,
        "masked_step": masked_step,
        "seed": seed,
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "retried": retried,
        "test": test,
    }


def revision() -> str:
    """The short commit of the `hf_autowu` that was imported (its checkout's HEAD)."""
    folder = Path(hf_autowu.__file__).parent
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def report(runs: dict[str, dict], tasks: tuple[str, ...] = TASK_NAMES, seeds: tuple[int, ...] = SEEDS) -> str:
    """The section's text: a row per task and masked step, a column per label."""
    first_run = {}
    for row in runs.values():
        first_run[row["label"]] = min(first_run.get(row["label"], row["order"]), row["order"])
    labels = sorted(first_run, key=first_run.get)  # in the order they were first recorded
    lines = [
        "One step's batch with every label masked (its loss 0/0, NaN; its gradients zero) in the "
        "README's hand-written loop, AutoWU's defaults, seeds " + ", ".join(map(str, seeds)) + ". Per cell: test "
        "accuracy by seed; how warmup ended (switch step and reason); peak LR, median over seeds.",
        "",
        "| task | masked step | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for task in tasks:
        for masked in MASKED_STEPS:
            cells = []
            if not any((r["task"], r["masked_step"]) == (task, masked) for r in runs.values()):
                continue
            for label in labels:
                rows = [r for r in runs.values() if (r["label"], r["task"], r["masked_step"]) == (label, task, masked)]
                rows.sort(key=lambda r: r["seed"])
                if not rows:
                    cells.append("-")
                    continue
                accuracy = " / ".join(f"{100 * r['test']:.1f}" for r in rows)
                ends = ", ".join(f"{r['switch_step']} {r['switch_reason']}" for r in rows)
                peak = statistics.median(r["peak_lr"] for r in rows)
                cells.append(f"{accuracy}% ({ends}; {peak:.2g})")
            lines.append(f"| {task} | {'none' if masked is None else masked} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Reproduce: `python benchmarks/bad_batch.py` (about 2 minutes on 2 CPU cores); the rows of an older "
        "revision come from the same script run where that revision's `hf_autowu` is the one imported, with "
        "`--label`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default=None, help="the column these rows go in (default: the revision)")
    parser.add_argument("--report-only", action="store_true", help="only write the section from recorded rows")
    parser.add_argument("--smoke", action="store_true", help="digits_cnn_short, no mask and step 5, seed 0")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the JSON and RESULTS.md go")
    args = parser.parse_args(argv)
    label = args.label or revision()
    out = (args.out_dir or RESULTS_DIR) / "bad_batch.json"
    md = RESULTS_MD if args.out_dir is None else args.out_dir / "RESULTS.md"
    tasks, masks, seeds = (("digits_cnn_short",), (None, 5), (0,)) if args.smoke else (TASK_NAMES, MASKED_STEPS, SEEDS)
    if not args.report_only:
        with locked_json(out, {"runs": {}}) as data:
            order = max((r["order"] for r in data["runs"].values()), default=-1) + 1
        for task in tasks:
            for masked in masks:
                for seed in seeds:
                    row = {**run(task, masked, seed), "label": label, "order": order}
                    print(
                        f"{label} {task} masked={masked} seed={seed}: {row['test']:.4f} "
                        f"{row['switch_step']} {row['switch_reason']} {row['peak_lr']:.3g}",
                        flush=True,
                    )
                    with locked_json(out, {"runs": {}}) as data:
                        data["runs"][f"{label}|{task}|{masked}|{seed}"] = row
    with locked_json(out, {"runs": {}}) as data:
        runs = dict(data["runs"])
    body = report(runs, tasks, seeds)
    update_section(md, "bad-batch", "## One bad batch (`benchmarks/bad_batch.py`)\n\n" + body)
    print(f"wrote the bad-batch section of {md}")


if __name__ == "__main__":
    sys.exit(main())
