"""Closed-form learning-rate curves used by AutoWU: the warmup ramp and the cooldown shapes."""

from __future__ import annotations

import math

WARMUP_TYPES = ("exp", "linear")
COOLDOWN_TYPES = ("cosine", "half_cosine", "linear")


def warmup_lr(position: float, *, min_lr: float, max_lr: float, length: float, warmup_type: str) -> float:
    """The warmup ramp: `min_lr` at position 0, `max_lr` at position `length`.

    Args:
        position (`float`): Where on the ramp (steps, or epochs for `warmup_unit="epoch"`).
        min_lr (`float`): LR at position 0.
        max_lr (`float`): LR at position `length`.
        length (`float`): Ramp length; must be positive.
        warmup_type (`str`): `"exp"` (geometric growth) or `"linear"`.

    Returns:
        `float`: the learning rate.
    """
    fraction = position / length
    if warmup_type == "exp":
        return min_lr * (max_lr / min_lr) ** fraction
    return min_lr + (max_lr - min_lr) * fraction


def lr_at_fraction(fraction: float, *, min_lr: float, current_lr: float, warmup_type: str) -> float:
    """Map a point `fraction` in [0, 1] of the recorded history back to an LR on the warmup ramp.

    The history's time axis runs from the first recorded step (LR `min_lr`) to now (LR `current_lr`).

    Args:
        fraction (`float`): Position on the normalised time axis.
        min_lr (`float`): LR at the start of warmup.
        current_lr (`float`): LR of the most recent step.
        warmup_type (`str`): `"exp"` or `"linear"`.

    Returns:
        `float`: the learning rate at that point of the ramp.
    """
    if warmup_type == "exp":
        return min_lr * (current_lr / min_lr) ** fraction
    return min_lr + (current_lr - min_lr) * fraction


def cooldown_factor(progress: float, cooldown_type: str) -> float:
    """Multiplier of the cooldown's starting LR after `progress` (0 at the start, 1 at the end) of the cooldown.

    `"cosine"` starts at 1 and reaches 0 at progress 1; `"half_cosine"` is the second half of a cosine: it
    starts at 0.5 and reaches 0 at progress 1; `"linear"` falls in a straight line from 1 to 0. Progress < 1
    always gives a positive factor, so every step of the budget trains with a positive LR.

    Args:
        progress (`float`): Fraction of the cooldown elapsed, in [0, 1].
        cooldown_type (`str`): `"cosine"`, `"half_cosine"` or `"linear"`.

    Returns:
        `float`: the multiplier, in [0, 1].
    """
    if cooldown_type == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cooldown_type == "linear":
        return 1.0 - progress
    return 0.5 + 0.5 * math.cos(0.5 * math.pi * (1.0 + progress))
