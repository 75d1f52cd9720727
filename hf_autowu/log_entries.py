"""The values AutoWU reports at its decision points, as a flat dict for loggers and trackers."""

from __future__ import annotations

import math

from .scheduler import PHASES, AutoWU

LOG_KEYS = (
    "autowu/phase",
    "autowu/lr",
    "autowu/p_min_in_past",
    "autowu/votes",
    "autowu/passed",
    "autowu/switch_step",
    "autowu/peak_lr",
)


def autowu_log_entries(scheduler: AutoWU) -> dict[str, float]:
    """The values logged at a switch test or at the switch, keyed by `LOG_KEYS`.

    `autowu/phase` is the index of the phase in ("warmup", "decay", "cooldown"); `autowu/lr` is the LR (of the
    largest group) for the next step; `autowu/p_min_in_past`, `autowu/votes` and `autowu/passed` (1 when the test
    counted toward the switch, else 0: with the robust preset a test whose votes pass still waits until the LR it
    would choose is resolved) are the latest test's (NaN, 0 and 0 before any test); `autowu/switch_step` is -1 and
    `autowu/peak_lr` 0 before the switch.

    Args:
        scheduler (`AutoWU`): The scheduler.

    Returns:
        `dict[str, float]`: one value per key of `LOG_KEYS`.
    """
    record = scheduler.tests[-1] if scheduler.tests else None
    return {
        "autowu/phase": PHASES.index(scheduler.phase),
        "autowu/lr": max(scheduler.get_last_lr()),
        "autowu/p_min_in_past": record.probability if record is not None else math.nan,
        "autowu/votes": record.votes if record is not None else 0,
        "autowu/passed": int(record.passed) if record is not None else 0,
        "autowu/switch_step": scheduler.switch_step if scheduler.switch_step is not None else -1,
        "autowu/peak_lr": scheduler.peak_lr if scheduler.peak_lr is not None else 0.0,
    }


def blew_up_without_descent(scheduler: AutoWU) -> bool:
    """Whether warmup ended on a blow-up of a loss that had not really fallen before it, as the blow-up rule judges
    that (`SwitchTestOutcome.fell`), so the peak LR is a decade below the blow-up's LR, not the GP's estimate."""
    outcome = scheduler.last_outcome
    return scheduler.switch_reason in ("divergence", "spike") and outcome is not None and not outcome.fell


def capped_without_descent(scheduler: AutoWU) -> bool:
    """Whether the robust preset's warmup reached its cap with a GP estimate although the loss had not really fallen
    over the whole ramp (neither `SwitchTestOutcome.fell` nor its `fell_over_ramp`), so the peak LR is `min_lr`: the
    lowest point of such a curve is noise (a loss that does not track training, or a model whose trained weights
    are frozen)."""
    outcome = scheduler.last_outcome
    return (
        scheduler.switch_reason == "cap"
        and outcome is not None
        and scheduler.config.effective_estimate_at_cap
        and not outcome.fell
        and not outcome.fell_over_ramp
    )


def capped_without_estimate(scheduler: AutoWU) -> bool:
    """Whether the robust preset's warmup reached its cap with no GP estimate ever made (too few losses: a budget
    too short for a switch test), so the peak LR is the LR range test's rule, a tenth of the LR at the lowest loss.
    A cap with enough losses has its estimate (`last_outcome`) even when no test ran before it."""
    return (
        scheduler.switch_reason == "cap"
        and scheduler.last_outcome is None
        and scheduler.config.effective_estimate_at_cap
    )


def switch_message(scheduler: AutoWU) -> str:
    """The line integrations print at the switch: when and why warmup ended, the peak LR, and the rewind."""
    message = (
        f"AutoWU: warmup ended after {scheduler.switch_step} steps ({scheduler.switch_reason}); peak LR "
        f"{scheduler.peak_lr:.4g}, decaying to 0 by step {scheduler.total_steps}."
    )
    if blew_up_without_descent(scheduler):
        message += " The loss had not really fallen before it blew up: the peak is a decade below the blow-up's LR."
    if capped_without_estimate(scheduler):
        message += " No switch test could run first: the peak is a tenth of the LR at the lowest warmup loss."
    if capped_without_descent(scheduler):
        message += (
            " The loss had not really fallen over the whole warmup, so the peak is the ramp's first LR, not read from "
            "a descent: check that the loss passed to AutoWU tracks training, or set the LR yourself."
        )
    retried = scheduler.retried
    if retried is not None:
        restored = retried["restored_step"]
        message += (
            f" Warmup had gone on after the non-finite loss of step {retried['loss_index'] + 1} (LR "
            f"{retried['lr']:.4g})" + (f", from the state after step {restored}." if restored is not None else ".")
        )
    rewinder = scheduler.rewinder
    if rewinder is not None and rewinder.rewound_to is not None:
        message += (
            f" Rewound to the state of step {rewinder.rewound_to['step']} (trained with LRs up to "
            f"{rewinder.rewound_to['lr']:.4g})."
        )
    elif rewinder is not None and rewinder.kept is not None:
        message += (
            f" Not rewound: the parameters moved {rewinder.kept['shift']:.3g} of their norm since step "
            f"{rewinder.kept['step']} (below rewind_min_shift)."
        )
    return message
