"""Uneven inputs under `torch.distributed.algorithms.Join`: a process that runs out of batches shadows the steps
the others still take, so that AutoWU's collectives keep lining up.

`AutoWU` is a `Joinable`: pass it beside the model, `with Join([ddp_model, scheduler]):` (or
`accelerator.join_uneven_inputs([ddp_model, scheduler], even_batches=False)`), after the model, since the scheduler
steps after the backward pass. Once a process has joined, `Join` runs the `main_hook` of each joinable once for every
iteration the others still run; AutoWU's (`JoinedSteps`) takes one step without a loss of its own, making the
collectives a step makes (the switch tests' averages, the spike watch's relay, the switch and rewind), so every
process keeps the same step count, history and LR. Loss averages are then over the processes that hold the step's
loss. At the end (`post_hook`) the losses still held per process are averaged, as before a checkpoint.

One iteration is one `scheduler.step(loss)` call per forward of the model: as for torch's `ZeroRedundancyOptimizer`,
the loop may not accumulate gradients over several forwards inside the `Join`, and under Accelerate an update that
fp16 overflow skipped cannot be told apart from a step by the process that joined; `AutoWU.step` raises in both cases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .distributed import collective_device

try:
    from torch.distributed.algorithms.join import Join, Joinable, JoinHook, _JoinConfig
except ImportError:  # a torch built without distributed support: nothing can join
    Join = None
    Joinable = object  # type: ignore[assignment, misc]
    JoinHook = object  # type: ignore[assignment, misc]
    _JoinConfig = None

if TYPE_CHECKING:
    from .scheduler import AutoWU


class JoinedSteps(JoinHook):
    """The hooks `Join` runs on a process that has run out of inputs (`AutoWU.join_hook`).

    Args:
        scheduler (`AutoWU`): The scheduler of this process.
    """

    def __init__(self, scheduler: AutoWU):
        self.scheduler = scheduler

    def main_hook(self) -> None:
        """One step of the processes still training, shadowed: a step without a loss of this process's own."""
        self.scheduler._step_while_joined()

    def post_hook(self, is_last_joiner: bool) -> None:
        """Every process has joined: average the losses still held per process (a collective, on every process)."""
        self.scheduler._leave_join()


def join_enabled(joinable: Any) -> bool:
    """Whether `joinable` is in an enabled `Join` context (set on every process alike)."""
    config = getattr(joinable, "_join_config", None)
    return config is not None and bool(config.enable)


def notify_join(joinable: Any) -> None:
    """Tell the `Join` context that this process has not joined (an all-reduce only when `joinable` is the first
    joinable; none otherwise, the model's forward did)."""
    if Join is not None and join_enabled(joinable):
        Join.notify_join_context(joinable)


def leave_join(joinable: Any) -> None:
    """Mark `joinable` as outside any `Join` context again (the context manager leaves its config set)."""
    if _JoinConfig is not None:
        joinable._join_config = _JoinConfig.construct_disabled_join_config()


def join_device() -> torch.device:
    """The device the `Join` context's own all-reduces use when AutoWU is the first joinable."""
    return collective_device(torch.empty(0))


def join_process_group() -> Any:
    """The process group of AutoWU's collectives: the default one."""
    return dist.group.WORLD
