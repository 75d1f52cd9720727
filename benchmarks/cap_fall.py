#!/usr/bin/env python
"""When warmup reaches its cap, does AutoWU tell a noisy real fall from a loss that carries no signal?

Two synthetic losses fed to the real `hf_autowu.AutoWU` (an SGD stand-in optimizer, nothing trained), over a range of
budgets, 10 seeds each:

- a fall of 2.8 (from 3.2, a sigmoid in log-LR centred at 1e-3) that stays down and never rises, with Gaussian noise
  of standard deviation 0.3 to 1.2 per loss: every run should decay from the GP's estimate, never from `min_lr`;
- zero-mean noise (a policy-gradient loss that is about 0 by construction): every run that reaches its cap should
  decay from `min_lr`, not from the GP's lowest point of that noise.

    python benchmarks/cap_fall.py
    python benchmarks/cap_fall.py --smoke   # one budget, one noise, two seeds

Prints, per budget and noise, how many of the 10 seeds decayed from `min_lr` (the entry "A real fall that medians of
ten miss" of ``HISTORY.md``). About a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from collections.abc import Iterable

import torch

from hf_autowu import AutoWU

BUDGETS = (100, 160, 300, 600)
FALL_NOISE = (0.3, 0.6, 0.9, 1.2)
SEEDS = range(10)


def run(total: int, seed: int, loss_at) -> AutoWU:
    """Drive a fresh AutoWU over `total` steps with `loss_at(lr, draw)`; return it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=total)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(total):
        draw = float(torch.randn((), generator=generator))
        scheduler.step(loss_at(optimizer.param_groups[0]["lr"], draw))
    return scheduler


def falling(noise: float):
    """3.2 at a tiny LR, 0.4 past 1e-2, flat beyond: a loss that fell for good, plus `noise` per loss."""
    return lambda lr, draw: 3.2 - 2.8 / (1.0 + math.exp(-math.log10(lr / 1e-3) / 0.3)) + noise * draw


def zero_mean(lr: float, draw: float) -> float:
    """Noise around 0 whatever the LR: a loss that carries no signal of it."""
    return 0.1 * draw


def from_min_lr(total: int, loss_at, seeds: Iterable[int] = SEEDS) -> int:
    """How many of `seeds` decayed from `min_lr`."""
    count = 0
    for seed in seeds:
        scheduler = run(total, seed, loss_at)
        count += scheduler.peak_lr == scheduler.config.min_lr
    return count


def main(argv: list[str] | None = None) -> dict[tuple[int, str], int]:
    """Entry point. Returns the table: per (budget, column), the seeds that decayed from `min_lr`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="budget 160, noise 1.2, seeds 0 and 1 (a few seconds)")
    args = parser.parse_args(argv)
    budgets, noises, seeds = ((160,), (1.2,), range(2)) if args.smoke else (BUDGETS, FALL_NOISE, SEEDS)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    columns = [f"fall, noise {n}" for n in noises] + ["zero-mean noise"]
    print(f"decays from min_lr, of {len(seeds)} seeds")
    print("budget | " + " | ".join(columns))
    table = {}
    for total in budgets:
        losses = [falling(noise) for noise in noises] + [zero_mean]
        for column, loss_at in zip(columns, losses, strict=True):
            table[(total, column)] = from_min_lr(total, loss_at, seeds)
        print(f"{total} | " + " | ".join(str(table[(total, c)]) for c in columns), flush=True)
    logging.disable(logging.NOTSET)
    return table


if __name__ == "__main__":
    main()
