"""The objects that wrap an optimizer (Accelerate's `AcceleratedOptimizer`, DeepSpeed's ZeRO and fp16 wrappers).

Nothing links an optimizer to what wraps it, so the wrappers are found among the objects that refer to it: a scan of
the garbage collector's referrers, done once per run (when the first snapshot is due, or at the first step), never
per step.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any


def holders_of(optimizer: Any) -> list[Any]:
    """The objects whose `optimizer` attribute is `optimizer`.

    Args:
        optimizer: Any object (an optimizer, or a wrapper of one).

    Returns:
        `list`: each holder once (the referrer itself, or the object whose `__dict__` refers to `optimizer`).
    """
    holders: dict[int, Any] = {}
    for ref in gc.get_referrers(optimizer):
        owners = [ref]
        if isinstance(ref, dict):
            if ref.get("optimizer") is not optimizer:
                continue
            owners = [obj for obj in gc.get_referrers(ref) if getattr(obj, "__dict__", None) is ref]
        for obj in owners:
            if getattr(obj, "optimizer", None) is optimizer:
                holders[id(obj)] = obj
    return list(holders.values())


def outer_wrapper(optimizer: Any, is_wrapper: Callable[[Any], bool], max_depth: int = 3) -> Any | None:
    """The nearest object that `is_wrapper` accepts among `optimizer`'s holders, their holders, and so on.

    Args:
        optimizer: The optimizer to start from (accepted itself when `is_wrapper` accepts it).
        is_wrapper (`Callable[[Any], bool]`): What is looked for.
        max_depth (`int`): How many levels of holders to climb (Accelerate's wrapper of DeepSpeed's wrapper of a
            torch optimizer is two).

    Returns:
        The wrapper, or None when there is none.
    """
    level, seen = [optimizer], {id(optimizer)}
    for _ in range(max_depth + 1):
        found = next((obj for obj in level if is_wrapper(obj)), None)
        if found is not None:
            return found
        above = []
        for obj in level:
            for holder in holders_of(obj):
                if id(holder) not in seen:
                    seen.add(id(holder))
                    above.append(holder)
        if not above:
            return None
        level = above
    return None
