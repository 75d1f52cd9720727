"""Two processes (torchrun, gloo) drive one AutoWU each with different local losses, one of them NaN once.

Run with `torchrun --standalone --nproc_per_node 2 scheduler_two_processes.py OUT_DIR`; writes the LR of every
step and the decisions to `OUT_DIR/rank{rank}.json` for `tests/test_scheduler_multiprocess.py`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_autowu import AutoWU

TOTAL = 240
NAN_STEP = 37


def local_loss(rank: int, step: int, lr: float) -> float:
    """A valley in log-LR around 3e-3, with noise and an offset that differ per process; NaN once on rank 1."""
    if rank == 1 and step == NAN_STEP:
        return math.nan
    g = torch.Generator().manual_seed(1000 * rank + step)
    return 1.0 + rank + 0.5 * math.log10(lr / 3e-3) ** 2 + 0.05 * float(torch.randn((), generator=g))


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=TOTAL, immediate_cooldown=True, divergence_guard=False)
    lrs = []
    for step in range(TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(torch.tensor(local_loss(rank, step, lrs[-1])))
    result = {
        "lrs": lrs,
        "switch_step": scheduler.switch_step,
        "peak_lr": scheduler.peak_lr,
        "tests": [record.step for record in scheduler.tests],
        "losses": [v if math.isfinite(v) else None for v in scheduler.losses.tolist()],
    }
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
