"""Each process's own AutoWU state in a checkpoint folder: written by every process, read back by each process (the
main process's where a process finds none).

With several processes each process holds its own losses since they were last averaged, and with sharded state
(FSDP, DeepSpeed ZeRO) its rewind snapshots hold its own shards. A checkpoint that keeps only the main process's
`state_dict()` resumes the others with the main process's losses and snapshots (which are then never restored: rewind
is lost at the switch). `save_scheduler_state` / `load_scheduler_state` are for loops that checkpoint by hand (raw
torch DDP or FSDP, DeepSpeed's `engine.save_checkpoint`); Accelerate's checkpoints have
`hf_autowu.register_for_checkpointing`, the Trainer's need nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .distributed import process_rank

if TYPE_CHECKING:
    from .scheduler import AutoWU

SCHEDULER_STATE_FILE = "autowu_rank{rank}.pt"
"""Each process's AutoWU state in a checkpoint folder (`save_scheduler_state`; with Accelerate, every process's but
the main one's, which Accelerate keeps)."""


def own_file(folder: str | os.PathLike, pattern: str) -> str:
    """This process's file in `folder`: `pattern` with its rank."""
    return os.path.join(os.fspath(folder), pattern.format(rank=process_rank()))


def own_or_main_file(folder: str | os.PathLike, pattern: str) -> str | None:
    """This process's file in `folder`, else the main process's (a checkpoint written by fewer processes), else
    None."""
    for rank in dict.fromkeys((process_rank(), 0)):
        path = os.path.join(os.fspath(folder), pattern.format(rank=rank))
        if os.path.exists(path):
            return path
    return None


def write_own_file(obj: Any, folder: str | os.PathLike, pattern: str) -> str:
    """`torch.save` `obj` to this process's file in `folder` (created if missing) through a temporary file, so that a
    job stopped while writing leaves the previous file whole. Returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = own_file(folder, pattern)
    partial = f"{path}.partial"
    torch.save(obj, partial)
    os.replace(partial, path)
    return path


def save_scheduler_state(scheduler: AutoWU, output_dir: str | os.PathLike) -> Path:
    """Save `scheduler`'s state on every process, each to its own file in `output_dir` (`autowu_rank<N>.pt`), so that
    `load_scheduler_state` resumes every process exactly.

    Call it on every process (not under `if rank == 0:`): it first averages the losses each process holds since the
    last average (`AutoWU.sync_pending_losses`, a collective). For a loop that checkpoints by hand: beside
    `engine.save_checkpoint(folder, tag)` under DeepSpeed (`os.path.join(folder, tag)`), or beside a raw torch DDP or
    FSDP checkpoint. Before reading the files back in the same job, wait for every process
    (`torch.distributed.barrier()`).

    Args:
        scheduler (`AutoWU`): The scheduler.
        output_dir (`str` or `os.PathLike`): The checkpoint folder (created if missing).

    Returns:
        `pathlib.Path`: the file this process wrote.

    Raises:
        `ValueError`: when `scheduler` is not an `AutoWU`.
    """
    _check_scheduler("save_scheduler_state", scheduler)
    scheduler.sync_pending_losses()
    return Path(write_own_file(scheduler.state_dict(), output_dir, SCHEDULER_STATE_FILE))


def load_scheduler_state(scheduler: AutoWU, input_dir: str | os.PathLike) -> Path:
    """Load into `scheduler` this process's state from a folder written by `save_scheduler_state`: its own file, or
    the main process's where it has none (a checkpoint written by fewer processes; with sharded state its rewind
    snapshots are then not this process's, and are not restored).

    Args:
        scheduler (`AutoWU`): The scheduler, built as for the run that saved (same optimizer and parameter groups).
        input_dir (`str` or `os.PathLike`): The checkpoint folder.

    Returns:
        `pathlib.Path`: the file loaded.

    Raises:
        `ValueError`: when `scheduler` is not an `AutoWU`, or the file holds no state it can load.
        `FileNotFoundError`: when `input_dir` holds neither this process's file nor the main process's.
    """
    _check_scheduler("load_scheduler_state", scheduler)
    path = own_or_main_file(input_dir, SCHEDULER_STATE_FILE)
    if path is None:
        looked_for = " or ".join(dict.fromkeys(SCHEDULER_STATE_FILE.format(rank=r) for r in (process_rank(), 0)))
        raise FileNotFoundError(
            f"load_scheduler_state: no AutoWU state in {os.fspath(input_dir)!r} (no {looked_for}); write it with "
            "`hf_autowu.save_scheduler_state`."
        )
    scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return Path(path)


def _check_scheduler(caller: str, scheduler: Any) -> None:
    from .scheduler import AutoWU

    if not isinstance(scheduler, AutoWU):
        raise ValueError(f"{caller}: `scheduler` must be an AutoWU scheduler, got {type(scheduler).__name__}.")
