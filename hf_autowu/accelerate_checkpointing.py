"""AutoWU's state in Accelerate's checkpoints: `accelerator.save_state` / `load_state` resume it exactly on every
process.

`accelerator.register_for_checkpointing(scheduler)` alone saves the main process's `state_dict()` and loads it on
every process. That falls short in two ways with several processes: each process holds its own losses since they
were last averaged (`sync_pending_losses` must run on every process first, or the resumed run takes the main
process's losses instead of their mean), and with sharded state (FSDP, DeepSpeed ZeRO) each process's rewind
snapshots hold its own shards (another process's copy is never restored, so rewind is lost at the switch).
`register_for_checkpointing(accelerator, scheduler)` covers both with Accelerate's own hooks: before `save_state`
writes anything, every process averages its pending losses; the main process's state goes where Accelerate puts it,
and every other process writes its own beside it; `load_state` gives each process its own again (the main process's
where a process finds none: a checkpoint written by fewer processes).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from .process_files import SCHEDULER_STATE_FILE, own_file, write_own_file

if TYPE_CHECKING:
    from .scheduler import AutoWU


class _ProcessStates:
    """What Accelerate checkpoints in AutoWU's place: `state_dict()` on every process (Accelerate keeps the main
    process's), `load_state_dict(main_state)` on every process, and the two hooks that tell it the folder."""

    def __init__(self, scheduler: AutoWU, is_main_process: bool):
        self.scheduler = scheduler
        self.is_main_process = is_main_process
        self._folder: str | None = None  # of the `save_state` or `load_state` under way

    def before_save(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        """`save_state`'s pre-hook, on every process: average the pending losses (a collective), keep the folder."""
        self.scheduler.sync_pending_losses()
        self._folder = output_dir

    def before_load(self, models: list[Any], input_dir: str) -> None:
        """`load_state`'s pre-hook, on every process: keep the folder."""
        self._folder = input_dir

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state; a process other than the main one also writes it to its own file in the folder."""
        state = self.scheduler.state_dict()
        folder, self._folder = self._folder, None
        if folder is not None and not self.is_main_process:
            write_own_file(state, folder, SCHEDULER_STATE_FILE)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load this process's own state from the folder when it wrote one, else `state` (the main process's)."""
        folder, self._folder = self._folder, None
        own = own_file(folder, SCHEDULER_STATE_FILE) if folder is not None and not self.is_main_process else None
        if own is not None and os.path.exists(own):
            state = torch.load(own, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(state)


def register_for_checkpointing(accelerator: Any, scheduler: AutoWU) -> None:
    """Make `accelerator.save_state` and `accelerator.load_state` carry `scheduler`'s state, exactly, on every process.

    Use it instead of `accelerator.register_for_checkpointing(scheduler)` (not beside it). Before a checkpoint is
    written, every process averages the losses it holds since the last average (`AutoWU.sync_pending_losses`: call
    `save_state` on every process, as Accelerate asks); the main process's state is saved by Accelerate, every other
    process's in `autowu_rank<N>.pt` in the same folder, and `load_state` gives each process its own. With sharded
    state (FSDP, DeepSpeed ZeRO) each process's rewind snapshots hold its own shards, so a resume then keeps rewind;
    with replicated state it costs one small file per process. To load in the same job that saved, wait for every
    process first (`accelerator.wait_for_everyone()`): the main process writes what every process reads.

    Args:
        accelerator (`accelerate.Accelerator`): The accelerator whose `save_state`/`load_state` the loop calls.
        scheduler (`AutoWU`): The scheduler.

    Raises:
        `ValueError`: when `scheduler` is not an `AutoWU`, or is already registered with `accelerator` (by this
            function or by `accelerator.register_for_checkpointing`: its state would be loaded twice, the second
            time over the first).
    """
    from .scheduler import AutoWU

    if not isinstance(scheduler, AutoWU):
        raise ValueError(
            f"register_for_checkpointing: `scheduler` must be an AutoWU scheduler, got {type(scheduler).__name__} "
            "(for other objects use `accelerator.register_for_checkpointing`)."
        )
    registered = getattr(accelerator, "_custom_objects", [])
    if any(obj is scheduler or getattr(obj, "scheduler", None) is scheduler for obj in registered):
        raise ValueError(
            "register_for_checkpointing: `scheduler` is already registered with this accelerator; register it once, "
            "with `hf_autowu.register_for_checkpointing` only (not also `accelerator.register_for_checkpointing`)."
        )
    states = _ProcessStates(scheduler, accelerator.is_main_process)
    accelerator.register_for_checkpointing(states)
    accelerator.register_save_state_pre_hook(states.before_save)
    accelerator.register_load_state_pre_hook(states.before_load)
