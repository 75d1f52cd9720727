#!/usr/bin/env python
"""Probes (not methods): LR rules replayed on every recorded ramp, the unseen tasks included, and scored.

Each variant changes one thing about how AutoWU reads the warmup, and every recorded ramp (the suite's, the held-out
tasks' and the unseen ones') is replayed through the real `hf_autowu.AutoWU` under it, as `decisions.py` replays its
settings (rewind off, the defaults otherwise):

- ``loss``: the defaults, fed each loss;
- ``log``: fed the natural logarithm of each loss (what a user gets with `scheduler.step(loss.log())`). A loss that
  falls by decades (a regression's squared error on unscaled targets: `holdout_tasks.friedman_mlp_adamw`) puts
  almost all of its descent in its first drop, so on the loss's own scale a later, slower fall that still halves it
  looks flat; on a log scale every halving weighs the same;
- ``cap K``: after a blow-up (the spike watch, a non-finite loss, a rise above the start), decay from at most
  `1/K` of the LR that blew up, the LR range test's margin, instead of the GP's estimate capped at that LR (a
  patch of `AutoWU._lr_after_blow_up`, undone after the replay);
- ``descended``: a passed test counts toward the switch only when the smoothed loss has really fallen (its minimum
  three noise standard deviations below its start, `SwitchTestOutcome.descended`, which the blow-up rule already
  reads): on a flat, noisy curve (a fine-tune whose loss barely moves) the minimum is noise, so the ramp goes on
  until the loss falls, blows up or the ramp ends (a patch of `SwitchTester.run`, undone after the replay);
- ``x K``: the defaults' LR times `K`, a uniform bias (0.5, 0.7, 1.4, 2): whether the rule's choices sit on the
  right side of the best peak on average, or only stray from it between seeds;
- ``lag K``: the LR estimate read `K` steps earlier on the ramp (2, 4, 8): a correction for the ramp's lag, since
  the loss at a step reflects the LRs of the steps before it (the optimizer's moments, the weights those LRs
  moved), which on a fast ramp are several times smaller. Unlike ``x K`` its factor depends on the ramp's speed:
  large on a short budget's fast ramp, small on a long one's (a patch of `switch_test.lr_at_fraction` inside
  `SwitchTester.run`, undone after the replay);
- ``mean K``: a switch by the test decays from the geometric mean of the estimates of the last `K` tests (3, 5, 8;
  those that did not count toward the switch included) instead of the last one's: each test's GP is fitted to
  another subsample of a history a few steps longer, so their estimates scatter about the curve's (a patch of
  `AutoWU._switch`, undone after the replay);
- ``agree F``: a passed test counts toward the switch only when its LR estimate lies within a factor `F` (1.5, 2,
  3) of those of the tests before it that counted (at most `patience - 1` of them): the switch waits until
  consecutive tests agree on the LR, not only on "the minimum is past" (a patch of `SwitchTester.run`, undone
  after the replay);
- ``median``: a switch by the test decays from the median of the estimates of the `patience` tests that made it
  (all of them passed), instead of the last one's (a patch of `AutoWU._switch`, undone after the replay).
- ``early K``: ``descended`` only while the history holds fewer than `K` losses (30, 60): the first tests, whose GP
  sees 20-30 losses and a lengthscale of 4-6 steps, can pass on the noise of a fine-tune's flat start (LoRA's seed 0
  at step 25), while later tests decide as now (a patch of `SwitchTester.run`, undone after the replay). Since
  27a4544fdf75 the defaults do this at K 30 (`descent_required_below`), so ``early 30`` replays as ``loss`` does;
  the rows recorded before it keep their figures.
- ``fell``: a passed test counts toward the switch only when the loss has really fallen as the blow-up rule judges
  it (`SwitchTestOutcome.fell`: the losses' level, medians of ten in a row, three standard deviations of the first
  losses' noise below where it started), at every test: ``descended`` with the blow-up rule's measure of the fall,
  which a loss whose noise grows as it falls (DPO's) passes where the GP's one noise level does not. On a flat, noisy
  start (a fine-tune whose loss barely moves) the ramp goes on until the loss falls or blows up (a patch of
  `SwitchTester.run`, undone after the replay).
- ``swing K`` and ``swing K C``: a prediction votes "past" only when the curve now lies more than `K` times the
  largest rise-back its posterior mean shows before its minimum above that minimum (the bumps of the smoothed loss
  while it was still falling, measured from the lowest point before each), counting rise-backs of more than `C` GP
  noise standard deviations (0 without `C`): a loss with structure the GP does not model (a periodic swing, data in a
  fixed order; noise correlated over many steps, streamed data in runs of one domain) rises and falls on its own, and
  a rise no larger than the swings seen before it is no evidence that the minimum is past (`structured_noise.py`).
  The defaults do this at ``swing 2 1`` (`swing_margin`, `switch_test.SWING_FLOOR_SD`) since decision code
  3cb347f3b064; ``swing 0`` replays the rows as the code before it decided (a patch of `SwitchTester.run` and of the
  floor, undone after the replay).

The probes ``start-noise`` (after a blow-up, the descent judged against the first losses' noise) and ``pre-rise``
(after a rise a test found, the estimate of the latest test that saw no rise) were adopted together as the defaults'
blow-up rule at decision code 55b3ef67d22c (`SwitchTestOutcome.descended_from_start`, `AutoWU._lr_after_blow_up`):
``loss`` replays them now. The probe ``watch-once`` (each loss checked once by the spike watch: in one process the
loss that arrived at a switch test was checked by the test's scan and again at the next step, so one high loss there
confirmed a spike) is a fix of the watch at decision code d1e2362b1f19.

The chosen LRs are scored as `decisions.py` scores them (with AutoWU's own schedule at each grid peak, `autowu_at`,
where it is recorded, else with the oracle's grid), as regret in units of 0.5 pp or 1% of the oracle's loss,
and leaving one task out picks the variant with the lowest mean validation regret on the other tasks. The held-out
tasks of role ``unseen`` are scored but take no part in that choice.

Usage: `python benchmarks/rule_probes.py` (about two minutes; needs the `ramp` and `oracle` runs of `quality.py` and
`holdout.py`); prints a Markdown table and writes `results/rule_probes.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from collections.abc import Iterator
from typing import Any
from unittest import mock

import decisions as d
import numpy as np
import torch
from report import regret

from hf_autowu import AutoWU, AutoWUConfig, switch_test
from hf_autowu.switch_test import SwitchTester, SwitchTestOutcome

DEFAULT = "loss"
VARIANTS = (
    DEFAULT,
    "log",
    "cap 2",
    "cap 3",
    "cap 5",
    "cap 10",
    "descended",
    "x 0.5",
    "x 0.7",
    "x 1.4",
    "x 2",
    "lag 2",
    "lag 4",
    "lag 8",
    "mean 3",
    "mean 5",
    "mean 8",
    "agree 1.5",
    "agree 2",
    "agree 3",
    "median",
    "early 30",
    "early 60",
    "fell",
    "swing 0",
    "swing 1 1",
    "swing 2",
    "swing 2 3",
    "swing 3 1",
)
PATCH_KINDS = ("cap", "descended", "lag", "mean", "agree", "median", "early", "fell", "swing")
PATCHES = tuple(v for v in VARIANTS if v.split()[0] in PATCH_KINDS)
"""The variants that patch the decision code (the others change what AutoWU is fed, or scale what it chose): the ones
real runs can be made under (`short_budget.py --probe`, `probe_runs.py`)."""


def fed(losses: list[float | None], variant: str) -> list[float]:
    """The ramp's losses as AutoWU is fed them under `variant` (NaN for a missing loss, as `decisions.replay` reads
    it; the log of a loss that is not positive is NaN too)."""
    values = [math.nan if x is None else float(x) for x in losses]
    if variant == "log":
        return [math.log(x) if x > 0 else math.nan for x in values]
    return values


def scale(variant: str) -> float:
    """The factor an ``x K`` variant multiplies the chosen LR by (1 for the others)."""
    return float(variant.split()[1]) if variant.startswith("x ") else 1.0


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    """The patch `variant` needs (`blow_up_cap`, `descent_required`, `lagged`, `averaged`, `agreeing`,
    `median_of_passes`), if any, for the time of the context."""
    with blow_up_cap(variant), descent_required(variant), lagged(variant), averaged(variant):
        with agreeing(variant), median_of_passes(variant), swing_margin(variant):
            yield


@contextlib.contextmanager
def swing_margin(variant: str) -> Iterator[None]:
    """Under ``swing K`` (or ``swing K C``), the switch test runs with `swing_margin` `K` and counts rise-backs of
    more than `C` GP noise standard deviations (`switch_test.SWING_FLOOR_SD`; 0 without `C`); restored on exit. The
    defaults are ``swing 2 1``; ``swing 0`` turns the rule off, as the decision code before 3cb347f3b064 had it."""
    if not variant.startswith("swing "):
        yield
        return
    words = variant.split()
    factor, floor = float(words[1]), float(words[2]) if len(words) > 2 else 0.0
    original = SwitchTester.run

    def run(self: SwitchTester, *args: Any, **kwargs: Any) -> SwitchTestOutcome | None:
        self.swing_margin = factor
        return original(self, *args, **kwargs)

    with mock.patch.object(switch_test, "SWING_FLOOR_SD", floor), mock.patch.object(SwitchTester, "run", run):
        yield


@contextlib.contextmanager
def agreeing(variant: str) -> Iterator[None]:
    """Under ``agree F``, a test counts toward the switch only when its LR estimate is within a factor `F` of those of
    the counted tests just before it (a test that does not count clears them); restored on exit."""
    if not variant.startswith("agree "):
        yield
        return
    factor, original = float(variant.split()[1]), SwitchTester.run
    earlier = AutoWUConfig().patience - 1  # the replays run with the default patience

    def run(self: SwitchTester, *args: Any, **kwargs: Any) -> SwitchTestOutcome | None:
        outcome = original(self, *args, **kwargs)
        if outcome is None:
            return outcome
        before, estimate = getattr(self, "_counted_estimates", []), outcome.lr_estimate
        agrees = all(max(estimate, e) / min(estimate, e) <= factor for e in before if 0 < e < math.inf)
        outcome.resolved = outcome.resolved and (0 < estimate < math.inf) and agrees
        counted = outcome.passed and outcome.resolved
        self._counted_estimates = [*before, estimate][-earlier:] if counted else []
        return outcome

    with mock.patch.object(SwitchTester, "run", run):
        yield


@contextlib.contextmanager
def median_of_passes(variant: str) -> Iterator[None]:
    """Under ``median``, `AutoWU._switch` with reason ``"test"`` decays from the median of the LR estimates of the
    last `patience` tests in `AutoWU.tests`; restored on exit."""
    if variant != "median":
        yield
        return
    original = AutoWU._switch

    def switch(self: AutoWU, t: int, lr: float, reason: str, damaged_from: int | None = None) -> None:
        if reason == "test":
            lr = float(np.median([r.lr_estimate for r in self.tests[-self.config.patience :]]))
        original(self, t, lr, reason, damaged_from)

    with mock.patch.object(AutoWU, "_switch", switch):
        yield


@contextlib.contextmanager
def averaged(variant: str) -> Iterator[None]:
    """Under ``mean K``, `AutoWU._switch` with reason ``"test"`` decays from the geometric mean of the finite,
    positive LR estimates of the last `K` tests in `AutoWU.tests`; restored on exit."""
    if not variant.startswith("mean "):
        yield
        return
    count, original = int(variant.split()[1]), AutoWU._switch

    def switch(self: AutoWU, t: int, lr: float, reason: str, damaged_from: int | None = None) -> None:
        if reason == "test":
            logs = [math.log(r.lr_estimate) for r in self.tests[-count:] if 0 < r.lr_estimate < math.inf]
            lr = math.exp(sum(logs) / len(logs)) if logs else lr
        original(self, t, lr, reason, damaged_from)

    with mock.patch.object(AutoWU, "_switch", switch):
        yield


@contextlib.contextmanager
def lagged(variant: str) -> Iterator[None]:
    """Under ``lag K``, each test maps its chosen point on the time axis `K` steps earlier (never before the start)
    to an LR; restored on exit."""
    if not variant.startswith("lag "):
        yield
        return
    steps, original_run, original_at = float(variant.split()[1]), SwitchTester.run, switch_test.lr_at_fraction

    def run(self: SwitchTester, losses: torch.Tensor, **kwargs: Any) -> SwitchTestOutcome | None:
        earlier = steps / losses.numel()  # the time axis runs over the losses recorded so far

        def lr_at(x: float, **at: Any) -> float:
            return original_at(max(0.0, x - earlier), **at)

        with mock.patch.object(switch_test, "lr_at_fraction", lr_at):
            return original_run(self, losses, **kwargs)

    with mock.patch.object(SwitchTester, "run", run):
        yield


@contextlib.contextmanager
def descent_required(variant: str) -> Iterator[None]:
    """Under ``descended``, a test counts toward the switch only when `SwitchTestOutcome.descended` (its outcome is
    `resolved` only then); under ``early K``, so only while the history holds fewer than `K` losses; under ``fell``,
    only when `SwitchTestOutcome.fell`; restored on exit."""
    if variant not in ("descended", "fell") and not variant.startswith("early "):
        yield
        return
    below = int(variant.split()[1]) if variant.startswith("early ") else math.inf
    original = SwitchTester.run

    def run(self: SwitchTester, losses: torch.Tensor, **kwargs: Any) -> SwitchTestOutcome | None:
        outcome = original(self, losses, **kwargs)
        if outcome is not None and losses.numel() < below:
            outcome.resolved = outcome.resolved and (outcome.fell if variant == "fell" else outcome.descended)
        return outcome

    with mock.patch.object(SwitchTester, "run", run):
        yield


@contextlib.contextmanager
def blow_up_cap(variant: str) -> Iterator[None]:
    """Under ``cap K``, `AutoWU._lr_after_blow_up` returns at most `ceiling / K`; restored on exit."""
    if not variant.startswith("cap "):
        yield
        return
    divisor, original = float(variant.split()[1]), AutoWU._lr_after_blow_up

    def capped(self: AutoWU, ceiling: float) -> float:
        return min(original(self, ceiling), ceiling / divisor)

    with mock.patch.object(AutoWU, "_lr_after_blow_up", capped):
        yield


def probe_case(case: dict[str, Any], variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Per variant: the LR chosen on each seed's ramp, why it switched, and the mean validation and test regret."""
    best = d.best_metric(case["curves"], case["metric"])
    row: dict[str, Any] = {"group": case["group"]}
    for variant in variants:
        with patched(variant):
            switched = [case["replay"](fed(losses, variant)) for losses in case["ramps"]]
        lrs = [s.peak_lr * scale(variant) for s in switched]
        row[variant] = {
            split: float(
                np.mean([regret(d.proxy(case["scoring"][split], lr), best[split], case["metric"]) for lr in lrs])
            )
            for split in ("val", "test")
        } | {"lrs": lrs, "reasons": [s.switch_reason for s in switched]}
    return row


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Per task the test regret of each variant and the LRs of the default and the log; the means per group; the
    leave-one-task-out result over the tasks that are not unseen."""
    variants = [key for key in next(iter(rows.values())) if key != "group"]
    lines = [
        "| task | group | " + " | ".join(variants) + " | LRs, loss | LRs, log |",
        "| --- | --- | " + " | ".join("---" for _ in variants) + " | --- | --- |",
    ]
    for task, row in rows.items():
        lrs = [" ".join(f"{lr:.2g}" for lr in row[v]["lrs"]) if v in row else "" for v in (DEFAULT, "log")]
        cells = " | ".join(f"{row[v]['test']:+.2f}" for v in variants)
        lines.append(f"| {task} | {row['group']} | {cells} | {lrs[0]} | {lrs[1]} |")
    lines.append("")
    for group in dict.fromkeys(row["group"] for row in rows.values()):
        members = [row for row in rows.values() if row["group"] == group]
        means = ", ".join(f"{v} {np.mean([row[v]['test'] for row in members]):.2f}" for v in variants)
        lines.append(f"- {group} ({len(members)} tasks), mean test regret: {means}")
    choosing = [task for task, row in rows.items() if row["group"] != "unseen"]
    folds = d.leave_one_out({"settings": variants, "table": {task: rows[task] for task in choosing}})
    if folds:
        picks = sorted({pick for _, pick, _, _ in folds})
        lines.append(
            f"- leaving one of {len(choosing)} tasks out: picks {', '.join(picks)}; mean test regret on the left-out "
            f"tasks {np.mean([value for _, _, value, _ in folds]):.2f} (the defaults held fixed: "
            f"{np.mean([rows[t][DEFAULT]['test'] for t in choosing]):.2f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = d.probe_parser(__doc__.split("\n\n")[0], "rule_probes.json")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}"
    )
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    if DEFAULT not in variants:
        parser.error(f"--variants must include {DEFAULT!r}, the defaults every variant is compared with")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    cases = d.every_case(args.results, args.holdout)
    if not cases:
        print("no task has both ramp and oracle runs yet", file=sys.stderr)
        return 2
    rows = {case["task"]: probe_case(case, variants) for case in cases}
    print("\n".join(table(rows)))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
