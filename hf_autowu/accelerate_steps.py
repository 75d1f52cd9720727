"""Which `AutoWU.step(loss)` calls follow an optimizer update when Accelerate steps the optimizer.

Accelerate's own loop calls the scheduler on every micro-batch, inside `accelerator.accumulate(model)`, and the
scheduler wrapper `accelerator.prepare` returns steps a torch scheduler only after a real update: not on a
micro-batch whose gradients are only accumulated, not after an update that fp16 overflow skipped. `AutoWU` is not a
torch scheduler, so `prepare` hands it back as it is; it reads the same two facts from the `AcceleratedOptimizer`
that drives its optimizer, so that the same loop runs AutoWU one step per update. A micro-batch's loss goes into the
update's loss (the mean over its micro-batches, as the Trainer's); a skipped update is not a step, and its losses are
dropped.
"""

from __future__ import annotations

import enum
import sys
import warnings
from typing import Any

from .optimizer_wrappers import outer_wrapper

UPDATE, MICRO_BATCH, SKIPPED = "update", "micro_batch", "skipped"


class _Sentinel(enum.Enum):
    """An enum member, not a bare `object()`: it stays itself through `copy.deepcopy` and pickling of a scheduler."""

    UNRESOLVED = "unresolved"


_UNRESOLVED = _Sentinel.UNRESOLVED


class AccelerateSteps:
    """What the optimizer step that a `step(loss)` call follows did, as Accelerate's wrapper of the optimizer says.

    The wrapper is the optimizer itself (AutoWU built on what `accelerator.prepare` returned) or is found among the
    objects that wrap it (AutoWU built before `prepare`), once, at the first call. Without Accelerate every call is
    an update. Each later call reads two attributes: no device sync, no collective.

    Args:
        optimizer: The optimizer AutoWU drives.
    """

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        self._wrapper: Any = _UNRESOLVED

    def classify(self) -> str:
        """`UPDATE`, `MICRO_BATCH` (gradients only accumulated: Accelerate's `sync_gradients` is False) or `SKIPPED`
        (Accelerate's `step_was_skipped`: fp16 overflow)."""
        if self._wrapper is _UNRESOLVED:
            self._wrapper = _accelerated_optimizer(self._optimizer)
        wrapper = self._wrapper
        if wrapper is None:
            return UPDATE
        try:
            if not wrapper.gradient_state.sync_gradients:
                return MICRO_BATCH
            return SKIPPED if wrapper.step_was_skipped else UPDATE
        except Exception as error:  # a wrapper of another make: every call is an update, as without Accelerate
            self._wrapper = None
            warnings.warn(
                f"AutoWU: cannot read whether Accelerate's {type(wrapper).__name__} stepped ({error!r}); every "
                "`step(loss)` call now counts as an optimizer step.",
                stacklevel=3,
            )
            return UPDATE


def _accelerated_optimizer(optimizer: Any) -> Any | None:
    """The `AcceleratedOptimizer` that steps `optimizer` (itself, or a wrapper of it or of DeepSpeed's wrapper of it),
    or None."""
    if "accelerate" not in sys.modules:
        return None
    try:
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.state import is_initialized
    except ImportError:  # an accelerate too broken to import: no loop of its own runs
        return None
    if not is_initialized():
        return None  # no `Accelerator` was made in this process: nothing to look for

    def is_wrapper(obj: Any) -> bool:
        return isinstance(obj, AcceleratedOptimizer) and hasattr(obj, "gradient_state")

    return outer_wrapper(optimizer, is_wrapper)
