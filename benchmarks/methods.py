"""The methods compared: how each one sets the learning rate, in a hand-written loop and in the Trainer.

AdamW means betas (0.9, 0.999), eps 1e-8, weight decay 0 (the Trainer's defaults) everywhere.

- ``autowu``: AdamW + ``hf_autowu`` with its defaults (no LR given, nothing attached: in a hand-written loop
  ``AutoWU(optimizer, ...)`` and ``scheduler.step(loss)``; in the Trainer ``AutoWUCallback()`` or
  ``AutoWUTrainer``; with TRL ``AutoWUTrainerMixin``).
- ``autowu_paper``: the same with ``preset="paper"`` (the published behaviour).
- ``oracle``: AdamW, linear warmup over 5% of the steps then cosine to 0; peak LR from a grid with a factor 2
  between neighbours, at least 8 points, grown while the best point (mean validation metric over seeds) is at an
  edge; the best grid point is reported on the test split. Compute: the whole grid.
- ``schedulefree``: Schedule-Free AdamW at its package defaults (LR 2.5e-3) with its recommended warmup (5% of
  the steps, the optimizer's ``warmup_steps``), constant schedule; ``optim="schedule_free_adamw"`` in the Trainer.
- ``lr_finder`` / ``lr_finder_min10``: an LR range test (torch-lr-finder: AdamW, LR 1e-7 to 10 exponentially
  over 100 steps), then the oracle's schedule at the suggested peak: the steepest descent of the smoothed loss
  (``lr_finder``), or the LR at the minimum of the smoothed loss divided by 10 (``lr_finder_min10``). Compute
  includes the sweep.
- ``hf_default``: the Trainer's defaults: AdamW, LR 5e-5, linear decay to 0, no warmup.
- ``prodigy``: Prodigy (LR 1.0, package defaults) with cosine decay to 0, no warmup.
- ``ramp``: not a method to compare: AutoWU's warmup ramp alone (exponential from 1e-5 towards 1.0 over half
  the budget), run until the ramp's end, recording the loss every step. AutoWU's decisions are a function of this
  curve up to the switch, so it lets the decision rules be replayed offline (`benchmarks/decisions.py`).
- ``autowu_at``: not a method to compare either: ``autowu`` with the LR chosen at the switch replaced by each point
  of the oracle's grid (same ramp, switch step, hold and cooldown; the rewind restores the snapshot at or below that
  LR among those kept, which follow AutoWU's own estimate, so far below it the lowest one kept). It tells what
  AutoWU's own schedule reaches at each peak LR, which scores a replayed decision better than the oracle's schedule
  can (`benchmarks/decisions.py`).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch
from torch import nn

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
"""AdamW settings of every AdamW-based method (the Trainer's defaults)."""

WARMUP_FRACTION = 0.05
HF_DEFAULT_LR = 5e-5
SCHEDULEFREE_LR = 2.5e-3
PRODIGY_LR = 1.0
FINDER_START_LR, FINDER_END_LR = 1e-7, 10.0
GRID_BASE, GRID_FACTOR, GRID_MIN_POINTS = 1e-4, 2.0, 8

METHODS: dict[str, str] = {
    "autowu": "AdamW + AutoWU defaults (no LR given, nothing attached)",
    "autowu_paper": 'AdamW + AutoWU(preset="paper")',
    "oracle": "AdamW, 5% linear warmup + cosine, best peak LR of a 2x-spaced grid (>= 8 points) on val",
    "schedulefree": "Schedule-Free AdamW, package defaults (lr 2.5e-3), 5% warmup",
    "lr_finder": "LR range test (1e-7..10, 100 steps), steepest slope, + 5% warmup + cosine",
    "lr_finder_min10": "LR range test (1e-7..10, 100 steps), LR at the minimum / 10, + 5% warmup + cosine",
    "hf_default": "Trainer defaults: AdamW lr 5e-5, linear decay, no warmup",
    "prodigy": "Prodigy lr 1.0 (defaults) + cosine, no warmup",
}
HIDDEN_METHODS = ("ramp", "autowu_at")
AUTOWU_METHODS = ("autowu", "autowu_paper", "autowu_at")
GRID_METHODS = ("oracle", "autowu_at")
"""Methods run at every point of the oracle's grid."""
FINDER_METHODS = ("lr_finder", "lr_finder_min10")


def grid_lr(k: int) -> float:
    """The oracle grid's k-th point: `GRID_BASE * GRID_FACTOR**k` (k may be negative), rounded to 3 digits."""
    return float(f"{GRID_BASE * GRID_FACTOR**k:.3g}")


def grid_index(lr: float) -> int:
    """The k with `grid_lr(k) == lr`."""
    return round(math.log(lr / GRID_BASE) / math.log(GRID_FACTOR))


def warmup_steps(total_steps: int) -> int:
    """Linear-warmup length of the oracle schedule (and Schedule-Free's warmup)."""
    return max(1, round(WARMUP_FRACTION * total_steps))


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first group's step size: ``lr`` (times Prodigy's distance estimate ``d`` where present)."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))


ABLATION_OPTIONS: dict[str, Any] = {}
"""Extra `AutoWUConfig` options for the ``autowu`` and ``autowu_at`` methods, set by ``quality.py --autowu-options``
(ablations, written to their own ``--out-dir`` only)."""


def autowu_options(method: str) -> dict[str, Any]:
    """Keyword arguments that select the AutoWU behaviour of ``method``."""
    return {"preset": "paper"} if method == "autowu_paper" else dict(ABLATION_OPTIONS)


@contextlib.contextmanager
def forced_peak_lr(lr: float) -> Any:
    """Within the block, every `AutoWU` decays from `lr` at its switch instead of the LR it chose (method
    ``autowu_at``); everything else (when it switches, the rewind to a snapshot at or below the LR, hold, cooldown)
    is AutoWU's own."""
    from hf_autowu import AutoWU

    original = AutoWU._switch

    def switch(self: Any, t: int, chosen: float, reason: str, damaged_from: int | None = None) -> None:
        original(self, t, lr, reason, damaged_from)

    AutoWU._switch = switch
    try:
        yield
    finally:
        AutoWU._switch = original


def autowu_info(scheduler: Any) -> dict[str, Any]:
    """The AutoWU decisions worth keeping: switch step and reason, chosen peak LR, rewind, number of tests."""
    rewinder = getattr(scheduler, "rewinder", None)
    return {
        "switch_step": scheduler.switch_step,
        "peak_lr": scheduler.peak_lr,
        "switch_reason": scheduler.switch_reason,
        "rewound_to": getattr(rewinder, "rewound_to", None),
        "kept": getattr(rewinder, "kept", None),
        "n_tests": len(scheduler.tests),
        "phase": scheduler.phase,
    }


def _ramp_plan(total_steps: int) -> Any:
    """An AutoWU with the default options that has seen no loss: its `lr_at` is the warmup ramp."""
    from hf_autowu import AutoWU

    return AutoWU(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=total_steps, rewind=False)


def ramp_lr_lambda(total_steps: int) -> Any:
    """AutoWU's default warmup ramp (its own `lr_at`) as a `LambdaLR` factor of a base LR of 1."""
    return _ramp_plan(total_steps).lr_at


def ramp_optimizers(model: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW at a base LR of 1 and AutoWU's ramp as its `LambdaLR`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, **ADAMW)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, ramp_lr_lambda(total_steps))


def run_steps(method: str, task: Any) -> int:
    """Optimizer steps one run of ``method`` trains (the ``ramp`` stops at the end of the longest warmup)."""
    return ramp_steps(task.steps) if method == "ramp" else task.steps


def ramp_steps(total_steps: int) -> int:
    """How long the ``ramp`` method trains: to the end of AutoWU's longest warmup."""
    return _ramp_plan(total_steps).warmup_steps


def lr_range_test(
    method: str,
    model: nn.Module,
    criterion: Any,
    batches: Any,
    task: Any,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[float, int, dict[str, Any]]:
    """Run torch-lr-finder's exponential range test, then restore the model to its initial weights.

    Args:
        method: ``"lr_finder"`` (steepest descent) or ``"lr_finder_min10"`` (minimum / 10).
        model: module called as ``model(inputs)``.
        criterion: ``criterion(outputs, labels)`` -> scalar loss.
        batches: a DataLoader or a ``TrainDataLoaderIter``.
        task: gives the number of steps and the skips for the suggestion (``finder_iters``, ``finder_skip``).
        optimizer: the optimizer to sweep with (its state is restored too); the suite's AdamW when None.

    Returns:
        (suggested LR, steps taken (the test may stop early on divergence), info with the sweep and both rules).
    """
    from torch_lr_finder import LRFinder

    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=FINDER_START_LR, **ADAMW)
    finder = LRFinder(model, optimizer, criterion)
    with contextlib.redirect_stdout(io.StringIO()):
        finder.range_test(batches, start_lr=FINDER_START_LR, end_lr=FINDER_END_LR, num_iter=task.finder_iters)
    finder.reset()
    lrs = np.array(finder.history["lr"], dtype=float)
    losses = np.array(finder.history["loss"], dtype=float)
    skip_start, skip_end = task.finder_skip
    window = slice(skip_start, max(len(lrs) - skip_end, skip_start + 2))
    w_lrs, w_losses = lrs[window], losses[window]
    steepest = float(w_lrs[int(np.gradient(w_losses).argmin())])  # torch-lr-finder's own "suggest_lr" rule
    min10 = float(w_lrs[int(np.nanargmin(w_losses))]) / 10.0
    info = {
        "sweep": {"lrs": lrs.tolist(), "losses": losses.tolist()},
        "suggested_lr_steepest": steepest,
        "suggested_lr_min10": min10,
    }
    suggestion = steepest if method == "lr_finder" else min10
    info["suggested_lr"] = suggestion
    return suggestion, len(lrs), info


def loop_optimizer(method: str, model: nn.Module, task: Any, peak_lr: float | None) -> tuple[Any, Any]:
    """Optimizer and scheduler of ``method`` for a hand-written loop (scheduler None: constant LR)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    params = list(model.parameters())
    if method in AUTOWU_METHODS:
        from hf_autowu import AutoWU

        optimizer = torch.optim.AdamW(params, **ADAMW)
        epochs = task.steps // task.steps_per_epoch
        if epochs * task.steps_per_epoch == task.steps:
            return optimizer, AutoWU(optimizer, task.steps_per_epoch, epochs, **autowu_options(method))
        return optimizer, AutoWU(optimizer, total_steps=task.steps, **autowu_options(method))
    if method == "ramp":
        return ramp_optimizers(model, task.steps)
    if method in ("oracle", *FINDER_METHODS):
        assert peak_lr is not None
        optimizer = torch.optim.AdamW(params, lr=peak_lr, **ADAMW)
        return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps(task.steps), task.steps)
    if method == "hf_default":
        optimizer = torch.optim.AdamW(params, lr=HF_DEFAULT_LR, **ADAMW)
        return optimizer, get_linear_schedule_with_warmup(optimizer, 0, task.steps)
    if method == "schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=SCHEDULEFREE_LR, warmup_steps=warmup_steps(task.steps)), None
    if method == "prodigy":
        from prodigyopt import Prodigy

        optimizer = Prodigy(params, lr=PRODIGY_LR)
        return optimizer, get_cosine_schedule_with_warmup(optimizer, 0, task.steps)
    raise ValueError(f"unknown method {method!r}")


def step_scheduler(method: str, scheduler: Any, loss: torch.Tensor) -> None:
    """One scheduler step after an optimizer step: AutoWU takes the loss, the others nothing."""
    if method in AUTOWU_METHODS:
        scheduler.step(loss)
    elif scheduler is not None:
        scheduler.step()


def set_optimizer_mode(optimizer: Any, train: bool) -> None:
    """Switch a Schedule-Free optimizer between its train and eval weights (no-op for others)."""
    mode = getattr(optimizer, "train" if train else "eval", None)
    if callable(mode):
        mode()


def trainer_method_settings(
    method: str, task: Any, peak_lr: float | None
) -> tuple[type, dict[str, Any], dict[str, Any], list[Any]]:
    """The trainer class, TrainingArguments overrides, extra trainer kwargs and extra callbacks of ``method``."""
    from transformers import Trainer

    base: type = Trainer
    if task.entry == "trl":
        from trl import SFTTrainer

        base = SFTTrainer
    if method in AUTOWU_METHODS:
        from hf_autowu import AutoWUCallback, AutoWUConfig, AutoWUTrainer, AutoWUTrainerMixin

        config = AutoWUConfig(**autowu_options(method))
        if task.entry == "trainer":
            return base, {}, {}, [AutoWUCallback(config)]
        trainer_cls = (
            AutoWUTrainer
            if task.entry == "autowu_trainer"
            else type("AutoWUSFTTrainer", (AutoWUTrainerMixin, base), {})
        )
        return trainer_cls, {}, {"autowu_config": config}, []
    if method == "ramp":  # the optimizer and the ramp come in `optimizers` (see `ramp_optimizers`)
        return base, {"max_steps": ramp_steps(task.steps)}, {}, []
    if method in ("oracle", *FINDER_METHODS):
        return (
            base,
            {"learning_rate": peak_lr, "lr_scheduler_type": "cosine", "warmup_steps": warmup_steps(task.steps)},
            {},
            [],
        )
    if method == "hf_default":
        return base, {}, {}, []
    if method == "schedulefree":
        return (
            base,
            {
                "optim": "schedule_free_adamw",
                "learning_rate": SCHEDULEFREE_LR,
                "warmup_steps": warmup_steps(task.steps),
                "lr_scheduler_type": "constant",
            },
            {},
            [],
        )
    if method == "prodigy":
        from prodigyopt import Prodigy

        return (
            base,
            {"learning_rate": PRODIGY_LR, "lr_scheduler_type": "cosine"},
            {"optimizer_cls_and_kwargs": (Prodigy, {"lr": PRODIGY_LR})},
            [],
        )
    raise ValueError(f"unknown method {method!r}")


def trainer_autowu_scheduler(trainer: Any, callbacks: list[Any]) -> Any:
    """The AutoWU scheduler that drove ``trainer`` (the subclass's `lr_scheduler`, or the callback's), if any."""
    from hf_autowu import AutoWU

    if isinstance(trainer.lr_scheduler, AutoWU):
        return trainer.lr_scheduler
    for callback in callbacks:
        scheduler = getattr(callback, "scheduler", None)
        if scheduler is not None:
            return scheduler
    return None
