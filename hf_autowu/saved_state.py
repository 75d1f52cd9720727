"""Where AutoWU's saved state lives in a Trainer checkpoint, and how a state saved by an older version is read."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

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
