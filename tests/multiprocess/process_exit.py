"""How the torchrun test scripts end: without interpreter finalization."""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist


def leave() -> None:
    """Wait for every process, destroy the process group if it exists, flush, and exit with status 0 via `os._exit`.

    Gloo's worker threads can still be releasing the tensors of the last collectives when the interpreter finalizes;
    a release that needs the GIL then aborts a process that has done its work ("terminate called without an active
    exception", pytorch/pytorch#190489). Destroying the group does not prevent it; skipping finalization does (the
    examples end the same way, `examples/timm_data.leave_process_group`). Call it last, after every result is written
    and closed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
