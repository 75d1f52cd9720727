"""Where AutoWU's saved state lives in a Trainer checkpoint, and how a state saved by an older version is read."""

from __future__ import annotations

import math
import numbers
from dataclasses import fields
from typing import Any, NoReturn

import torch

from .config import AutoWUConfig

TRAINER_STATE_KEY = "autowu_state"
"""Where a Trainer checkpoint's `scheduler.pt` holds AutoWU's state (inside the state of the plain Trainer's own
scheduler with `AutoWUCallback`, and beside what that scheduler needs to load it with `AutoWUTrainer`)."""

DECIDED_BEFORE_SAVED = {
    "min_past_lengthscales": 0.0,
    "max_descent_left": 1.0,
    "descent_required_below": 0,
    "swing_margin": 0.0,
}
"""Options added to the decision after states were saved without them, with the values that reproduce how those
states decided: a run saved before they existed resumes as it would have gone on."""


def autowu_state_of(state: Any) -> Any:
    """AutoWU's state inside a Trainer checkpoint's scheduler state (under `TRAINER_STATE_KEY`), else `state`.

    Args:
        state (`Any`): A scheduler state as a checkpoint holds it.

    Returns:
        `Any`: the AutoWU state found in it, or `state` itself.
    """
    if isinstance(state, dict) and "config" not in state and isinstance(state.get(TRAINER_STATE_KEY), dict):
        return state[TRAINER_STATE_KEY]
    return state


def config_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config's fields that `AutoWUConfig` still has; the deprecated `device` is dropped, and options the
    saved config predates take the values it decided with (`DECIDED_BEFORE_SAVED`).

    Args:
        saved (`dict`): The `config` entry of a saved AutoWU state.

    Returns:
        `dict`: keyword arguments for `AutoWUConfig`.
    """
    names = {f.name for f in fields(AutoWUConfig)}
    kept = {k: v for k, v in saved.items() if k in names and not (k == "device" and v in (None, "cpu"))}
    return {**{k: v for k, v in DECIDED_BEFORE_SAVED.items() if k not in saved}, **kept}


def check_saved_schedule(state: dict[str, Any]) -> None:
    """Refuse a saved state whose schedule no run can have written (an edited or damaged file), before any of it is
    used: a budget or step that is not a count, a switch after the last step, a warmup past its budget, a learning
    rate or group ratio that is negative or not finite, a loss history that is not one row of numbers.

    Args:
        state (`dict`): An AutoWU `state_dict()`.

    Raises:
        `ValueError`: naming the first entry that is wrong.
    """

    def damaged(problem: str) -> NoReturn:
        raise ValueError(f"AutoWU.load_state_dict: a damaged state: {problem}.")

    def count(name: str, minimum: int) -> int:
        value = state[name]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
            damaged(f"`{name}` must be an int >= {minimum}, got {value!r}")
        return int(value)

    def rate(name: str, value: Any) -> None:
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value < math.inf):
            damaged(f"`{name}` must be a finite number >= 0, got {value!r}")

    total, last = count("total_steps", 1), count("last_step", 0)
    if "warmup_steps" in state:
        count("warmup_steps", 0)
    phase, switch = state["phase"], state["switch_step"]
    if phase not in ("warmup", "decay", "cooldown"):
        damaged(f"`phase` must be 'warmup', 'decay' or 'cooldown', got {phase!r}")
    if phase == "warmup" and last > total:
        damaged(f"`last_step` ({last}) is past the budget (`total_steps` {total}) in warmup")
    if switch is not None and not (
        isinstance(switch, numbers.Integral) and not isinstance(switch, bool) and 0 <= switch <= last
    ):
        damaged(f"`switch_step` must be None or an int in [0, last_step={last}], got {switch!r}")
    rate("lr", state["lr"])
    if state["peak_lr"] is not None:
        rate("peak_lr", state["peak_lr"])
    ratios = state["group_ratios"]
    if not isinstance(ratios, (list, tuple)):
        damaged(f"`group_ratios` must be a list, got {type(ratios).__name__}")
    for ratio in ratios:
        rate("group_ratios", ratio)
    history = state["history"]
    if not (isinstance(history, torch.Tensor) and history.dim() == 1 and history.is_floating_point()):
        damaged("`history` must be a 1-D tensor of floats")
    if state.get("retried") is not None and not isinstance(state["retried"], dict):
        damaged(f"`retried` must be None or a dict, got {type(state['retried']).__name__}")
