#!/usr/bin/env python
"""How the switch test reads a loss whose noise is not independent from step to step.

The GP models the loss as a smooth curve plus independent noise. Real losses can carry structure the model does not
have: a periodic component (data in a fixed order, an epoch of a few dozen steps, a sampler cycling through
domains) or noise correlated over many steps (streamed data in runs of one domain). Each is added here to
`tests/helpers.valley_loss` (a valley in log-LR, lowest at 3e-3, 3.07 above its floor at the ramp's start) and fed
to the real `hf_autowu.AutoWU` (an SGD stand-in optimizer, nothing trained), 6 seeds per row.

    python benchmarks/structured_noise.py
    python benchmarks/structured_noise.py --smoke   # 300 steps, seed 0, independent noise and one periodic row
    python benchmarks/structured_noise.py --probe "swing 2"   # under one of rule_probes.py's patches

Prints, per budget and structure, each seed's switch reason and peak LR as a multiple of the valley's best LR (with
independent noise the default chooses about 0.25 of it, the point where the descent slowed). About two minutes on
one CPU core. Section "Structured noise" of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import rule_probes  # noqa: E402
from helpers import make_optimizer, valley_loss  # noqa: E402

from hf_autowu import AutoWU  # noqa: E402

BEST_LR = 3e-3
BUDGETS = (300, 1000)
SEEDS = range(6)
PERIODIC = ((8, 0.1), (8, 0.3), (25, 0.1), (25, 0.3), (60, 0.3))
"""(period in steps, amplitude) of a sine added to the valley, over independent noise of 0.05."""
CORRELATED = ((0.5, 0.1), (0.9, 0.1), (0.9, 0.3), (0.97, 0.3))
"""(step-to-step correlation, standard deviation) of AR(1) noise, the valley's only noise."""


def run(total: int, seed: int, structure: str, a: float, b: float) -> tuple[str, float]:
    """One run; `structure` is "independent", "periodic" (`a` the period, `b` the amplitude) or "correlated"
    (`a` the correlation, `b` the standard deviation). Returns the switch reason and peak LR / `BEST_LR`."""
    optimizer = make_optimizer()
    scheduler = AutoWU(optimizer, total_steps=total)
    generator = torch.Generator().manual_seed(seed)
    correlated = 0.0
    for step in range(total):
        lr = optimizer.param_groups[0]["lr"]
        if structure == "correlated":
            draw = float(torch.randn((), generator=generator))
            correlated = a * correlated + math.sqrt(1.0 - a * a) * b * draw
            loss = valley_loss(lr, BEST_LR, 0.0, generator) + correlated
        else:
            extra = b * math.sin(2.0 * math.pi * step / a) if structure == "periodic" else 0.0
            loss = valley_loss(lr, BEST_LR, 0.05, generator) + extra
        scheduler.step(loss)
    return scheduler.switch_reason, scheduler.peak_lr / BEST_LR


def main(argv: list[str] | None = None) -> dict[tuple[int, str], list[tuple[str, float]]]:
    """Entry point. Returns, per (budget, structure), each seed's switch reason and peak LR / `BEST_LR`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="300 steps, seed 0, two rows (a second)")
    parser.add_argument("--probe", help=f"run under one of rule_probes.py's patches: {', '.join(rule_probes.PATCHES)}")
    args = parser.parse_args(argv)
    if args.probe is not None and args.probe not in rule_probes.PATCHES:
        parser.error(f"--probe must be one of {', '.join(rule_probes.PATCHES)}, got {args.probe!r}")
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    rows = [("independent", 0.0, 0.0, "independent noise 0.05")]
    rows += [("periodic", p, amp, f"period {p}, amplitude {amp}") for p, amp in PERIODIC]
    rows += [("correlated", rho, sd, f"AR(1) {rho}, sd {sd}") for rho, sd in CORRELATED]
    budgets, seeds = (BUDGETS, SEEDS) if not args.smoke else ((300,), range(1))
    if args.smoke:
        rows = rows[:1] + [row for row in rows if row[3] == "period 25, amplitude 0.3"]
    print("budget | structure | per seed: switch reason, peak LR / best LR")
    table = {}
    for total in budgets:
        for structure, a, b, label in rows:
            with rule_probes.patched(args.probe or rule_probes.DEFAULT):
                table[(total, label)] = [run(total, seed, structure, a, b) for seed in seeds]
            cells = " ".join(f"{r}:{x:.2f}" for r, x in table[(total, label)])
            print(f"{total} | {label} | {cells}", flush=True)
    logging.disable(logging.NOTSET)
    return table


if __name__ == "__main__":
    main()
