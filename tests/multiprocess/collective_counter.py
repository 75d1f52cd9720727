"""`CollectiveCounter`: records at which step each collective of `torch.distributed` is called, for the tests that
check that AutoWU makes none on ordinary steps."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist


class CollectiveCounter:
    """While installed, records `step_of()` at every call of the `torch.distributed` functions named in `names`.

    Args:
        step_of (`Callable[[], int]`): The step to record for a call made now.
        names (`tuple[str, ...]`): The `torch.distributed` functions to count.
    """

    def __init__(self, step_of: Callable[[], int], names: tuple[str, ...] = ("all_reduce", "broadcast")) -> None:
        self.steps: list[int] = []
        self._step_of = step_of
        self._originals = {name: getattr(dist, name) for name in names}
        for name, original in self._originals.items():
            setattr(dist, name, self._counting(original))

    def _counting(self, original):
        def call(*args, **kwargs):
            self.steps.append(self._step_of())
            return original(*args, **kwargs)

        return call

    def remove(self) -> None:
        """Put the original functions back."""
        for name, original in self._originals.items():
            setattr(dist, name, original)
