#!/usr/bin/env python
"""A held-out check of AutoWU's LR rule: a model family and optimizer that no decision setting was chosen on.

An MLP (64-128-128-10) on the digits of ``quality.py`` (same splits, `tasks.digits_splits`), trained with SGD and
momentum 0.9 (every task of ``quality.py`` uses AdamW), batch 32, 400 steps. The oracle is ``quality.py``'s: its
grid of peak LRs a factor 2 apart (`methods.grid_lr`), 5% linear warmup + cosine, the best point chosen on the
validation split; AutoWU runs with its defaults and with each ``slowed_fraction`` asked for. Metric: test accuracy,
mean over seeds.

    python benchmarks/holdout.py                      # writes the `holdout` section of RESULTS.md
    python benchmarks/holdout.py --fractions 0.1,0.3  # also AutoWU with these slowed_fraction values
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import methods as m  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import resolve_output_paths, update_section  # noqa: E402
from tasks import digits_splits  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from hf_autowu import AutoWU, AutoWUConfig  # noqa: E402

BATCH = 32
GRID = tuple(m.grid_lr(k) for k in range(7, 16))  # 0.0128 .. 3.28, a factor 2 apart


def batches(n: int, seed: int) -> Iterator[torch.Tensor]:
    """Indices of shuffled batches of `BATCH`, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        yield from (order[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH))


def run(steps: int, seed: int, peak_lr: float | None = None, **options: float) -> tuple[float, float, float]:
    """Train once; AutoWU (with `options`) when `peak_lr` is None, else the oracle's schedule to `peak_lr`.

    Returns:
        The validation and test accuracy, and the peak LR used.
    """
    splits = {name: (x.flatten(1), y) for name, (x, y) in digits_splits().items()}
    x, y = splits["train"]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr or 1.0, momentum=0.9)
    if peak_lr is None:
        scheduler = AutoWU(optimizer, total_steps=steps, model=model, **options)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, m.warmup_steps(steps), steps)
    stream = batches(len(x), seed)
    for _ in range(steps):
        index = next(stream)
        loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        m.step_scheduler("autowu" if peak_lr is None else "oracle", scheduler, loss)
    with torch.no_grad():
        val, test = ((model(xs).argmax(1) == ys).float().mean().item() for xs, ys in (splits["val"], splits["test"]))
    return val, test, peak_lr if peak_lr is not None else scheduler.peak_lr


def report(grid: dict[float, list[tuple]], autowu: dict[str, list[tuple]], steps: int) -> str:
    """The Markdown section: test accuracy; the grid's best point chosen on validation accuracy."""
    best = max(grid, key=lambda lr: np.mean([val for val, _, _ in grid[lr]]))
    oracle = 100 * np.mean([test for _, test, _ in grid[best]])
    lines = [
        "## Held-out check (`benchmarks/holdout.py`)",
        "",
        f"An MLP on the digits with SGD + momentum 0.9, batch {BATCH}, {steps} steps: a model family and optimizer "
        "no decision setting was chosen on (every `quality.py` task uses AdamW). Test accuracy (%), mean ± std over "
        f"{len(grid[best])} seeds; the oracle is `quality.py`'s (5% warmup + cosine, best grid point on validation).",
        "",
        "Grid (test): "
        + " · ".join(f"{lr:.3g}: {100 * np.mean([t for _, t, _ in v]):.2f}" for lr, v in grid.items())
        + f" (best on validation: {best:.3g}, {oracle:.2f}).",
        "",
        "| AutoWU | accuracy | gap to the oracle (pp) | peak LR per seed |",
        "| --- | --- | --- | --- |",
    ]
    for name, runs in autowu.items():
        accuracies = [100 * test for _, test, _ in runs]
        spread = np.std(accuracies, ddof=1) if len(accuracies) > 1 else 0.0
        lrs = ", ".join(f"{lr:.3g}" for _, _, lr in runs)
        mean = np.mean(accuracies)
        lines.append(f"| {name} | {mean:.2f} ± {spread:.2f} | {mean - oracle:+.2f} | {lrs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument(
        "--fractions", default="", help="comma-separated slowed_fraction values to run besides the default"
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="unused except with --smoke (a temp dir)")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--smoke", action="store_true", help="40 steps, 1 seed, 2 grid points: checks that it runs")
    args = resolve_output_paths(parser.parse_args(argv), "holdout_smoke_")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    steps, seeds, grid = (40, 1, GRID[3:5]) if args.smoke else (400, args.seeds, GRID)
    grid_results = {lr: [run(steps, s, lr) for s in range(seeds)] for lr in grid}
    default = AutoWUConfig().preset_setting("slowed_fraction")
    autowu = {f"defaults (slowed_fraction {default})": [run(steps, s) for s in range(seeds)]}
    for fraction in (float(f) for f in args.fractions.split(",") if f):
        autowu[f"slowed_fraction {fraction}"] = [run(steps, s, slowed_fraction=fraction) for s in range(seeds)]
    update_section(args.results_md, "holdout", report(grid_results, autowu, steps))
    print(f"wrote the holdout section of {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
