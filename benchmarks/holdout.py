#!/usr/bin/env python
"""A held-out check of AutoWU's LR rule: a model family and optimizer that no decision setting was chosen on.

An MLP (64-128-128-10) on scikit-learn's digits, trained with SGD and momentum 0.9 (every task of ``quality.py``
uses AdamW), batch 32, 400 steps. A grid of peak LRs a factor 2 apart (5% linear warmup + cosine) gives the best
reachable accuracy; AutoWU runs with its defaults and with each ``slowed_fraction`` asked for. Metric: accuracy on
397 held-out digits, mean over seeds; the grid's best point is chosen on that same set, so it is an optimistic
reference.

    python benchmarks/holdout.py                      # writes the `holdout` section of RESULTS.md
    python benchmarks/holdout.py --fractions 0.1,0.3  # also AutoWU with these slowed_fraction values
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import resolve_output_paths, update_section  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from hf_autowu import AutoWU, AutoWUConfig  # noqa: E402

BATCH = 32
GRID = tuple(0.0125 * 2**k for k in range(9))


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1]: a fixed split of 1400 training and 397 held-out images."""
    features, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(features / 16.0, dtype=torch.float32), torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]]


def batches(n: int, seed: int) -> Iterator[torch.Tensor]:
    """Indices of shuffled batches of `BATCH`, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        yield from (order[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH))


def run(data: tuple, steps: int, seed: int, peak_lr: float | None = None, **options: float) -> tuple[float, float]:
    """Train once; AutoWU (with `options`) when `peak_lr` is None, else warmup + cosine to `peak_lr`.

    Returns:
        The held-out accuracy and the peak LR used.
    """
    x, y, x_val, y_val = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr or 1.0, momentum=0.9)
    if peak_lr is None:
        scheduler = AutoWU(optimizer, total_steps=steps, model=model, **options)
    else:
        warm = max(int(0.05 * steps), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / (steps - warm))),
        )
    stream = batches(len(x), seed)
    for _ in range(steps):
        index = next(stream)
        loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if peak_lr is None:
            scheduler.step(loss)
        else:
            scheduler.step()
    with torch.no_grad():
        accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    return accuracy, peak_lr if peak_lr is not None else scheduler.peak_lr


def report(grid: dict[float, list[float]], autowu: dict[str, list[tuple[float, float]]], steps: int) -> str:
    """The Markdown section."""
    best = max(grid, key=lambda lr: np.mean(grid[lr]))
    lines = [
        "## Held-out check (`benchmarks/holdout.py`)",
        "",
        f"An MLP on the digits with SGD + momentum 0.9, batch {BATCH}, {steps} steps: a model family and optimizer "
        "no decision setting was chosen on (every `quality.py` task uses AdamW). Held-out accuracy (%), mean ± std "
        f"over {len(next(iter(grid.values())))} seeds; the grid (5% warmup + cosine) picks its best point on the "
        "same set, so it is an optimistic reference.",
        "",
        "Grid: " + " · ".join(f"{lr:.3g}: {100 * np.mean(v):.2f}" for lr, v in grid.items()) + f" (best {best:.3g}).",
        "",
        "| AutoWU | accuracy | gap to the grid's best (pp) | peak LR per seed |",
        "| --- | --- | --- | --- |",
    ]
    for name, runs in autowu.items():
        accuracies = [100 * a for a, _ in runs]
        gap = np.mean(accuracies) - 100 * np.mean(grid[best])
        lrs = ", ".join(f"{lr:.3g}" for _, lr in runs)
        spread = np.std(accuracies, ddof=1) if len(accuracies) > 1 else 0.0
        lines.append(f"| {name} | {np.mean(accuracies):.2f} ± {spread:.2f} | {gap:+.2f} | {lrs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument("--fractions", default="", help="comma-separated slowed_fraction values to run besides the "
                        "default")
    parser.add_argument("--out-dir", type=Path, default=None, help="unused except with --smoke (a temp dir)")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--smoke", action="store_true", help="40 steps, 1 seed, 2 grid points: checks that it runs")
    args = resolve_output_paths(parser.parse_args(argv), "holdout_smoke_")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    steps, seeds, grid = (40, 1, GRID[3:5]) if args.smoke else (400, args.seeds, GRID)
    data = load()
    grid_results = {lr: [run(data, steps, s, lr)[0] for s in range(seeds)] for lr in grid}
    default = AutoWUConfig().preset_setting("slowed_fraction")
    autowu = {f"defaults (slowed_fraction {default})": [run(data, steps, s) for s in range(seeds)]}
    for fraction in (float(f) for f in args.fractions.split(",") if f):
        autowu[f"slowed_fraction {fraction}"] = [run(data, steps, s, slowed_fraction=fraction) for s in range(seeds)]
    update_section(args.results_md, "holdout", report(grid_results, autowu, steps))
    print(f"wrote the holdout section of {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
