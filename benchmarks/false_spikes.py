#!/usr/bin/env python
"""How often the spike watch ends a long warmup on a loss that never blew up (a known limit).

The watch's reference (the median of the latest 5 losses, the noise of as many of the latest as it will judge, at
least 20) is set at each switch test and every loss until the next test is checked against it; with the 1.1x LR
growth between tests, a budget of 1e6 steps has about 90 steps between tests, 1e7 about 290, and a warmup of 11,000
or 35,000 losses is checked in all. A loss that falls steadily over the whole ramp (0.1 per decade of LR, never
rising) with independent noise of 0.02, Gaussian or Student-t with 3 degrees of freedom (heavy tails: rare single
losses far out), is fed to the real `hf_autowu.AutoWU` (an SGD stand-in optimizer, nothing trained, rewind off); any
switch by "spike" is a false one.

    python benchmarks/false_spikes.py
    python benchmarks/false_spikes.py --smoke   # 1e4 steps, seeds 0-1, both noises (seconds)

Prints, per budget and noise, how the runs ended (switch reasons counted) and the median peak LR of those that the
watch ended. About 4 minutes on one CPU core. Section "False spikes at long budgets" of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import make_optimizer  # noqa: E402

from hf_autowu import AutoWU  # noqa: E402

BUDGETS = (10**4, 10**5, 10**6, 10**7)
SEEDS = range(20)
NOISES = ("gaussian", "student-t3")
NOISE_SD = 0.02


def run(total: int, seed: int, noise: str) -> tuple[str, float]:
    """One warmup on the falling loss; returns the switch reason and the peak LR."""
    optimizer = make_optimizer()
    scheduler = AutoWU(optimizer, total_steps=total, rewind=False)
    generator = torch.Generator().manual_seed(seed)
    count = scheduler.warmup_steps + 1
    draws = torch.randn(count, generator=generator, dtype=torch.float64)
    if noise == "student-t3":  # a normal over the root of a chi-squared with 3 degrees of freedom, over 3
        chi2 = torch.randn(3, count, generator=generator, dtype=torch.float64).square().sum(0)
        draws = draws / (chi2 / 3.0).sqrt()
    for draw in draws.tolist():
        if scheduler.phase != "warmup":
            break
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(2.0 - 0.1 * math.log10(lr / 1e-5) + NOISE_SD * draw)
    return scheduler.switch_reason, scheduler.peak_lr


def main(argv: list[str] | None = None) -> dict[tuple[int, str], list[tuple[str, float]]]:
    """Entry point. Returns, per (budget, noise), each seed's switch reason and peak LR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1e4 steps, seeds 0-1")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    budgets, seeds = ((10**4,), range(2)) if args.smoke else (BUDGETS, SEEDS)
    print("budget | noise | runs by switch reason | median peak LR of the runs the watch ended")
    table = {}
    for total in budgets:
        for noise in NOISES:
            table[(total, noise)] = results = [run(total, seed, noise) for seed in seeds]
            counts = Counter(reason for reason, _ in results)
            spiked = [peak for reason, peak in results if reason == "spike"]
            median = f"{statistics.median(spiked):.2g}" if spiked else "-"
            print(f"{total:.0e} | {noise} | {dict(sorted(counts.items()))} | {median}", flush=True)
    logging.disable(logging.NOTSET)
    return table


if __name__ == "__main__":
    main()
