"""Two processes (torchrun, gloo) train a small DDP model with AdamW and AutoWU's defaults (rewind on) through a set
of seeded random cases: budgets of 30-250 steps, the robust or paper preset, up to four faults on either process
(a NaN, inf, 1000x or zero loss fed to AutoWU, or NaN targets whose gradients reach both processes' weights through
the all-reduce). Each case runs once uninterrupted and once saved at a random step (`sync_pending_losses()` on both,
the main process's model, optimizer and scheduler state broadcast, as `accelerator.save_state` keeps them) and
resumed into new objects on both.

Run with `torchrun --standalone --nproc_per_node 2 fault_resume_two_processes.py OUT_DIR`; writes, per case, the LR
of every step of both runs and the final weights' bytes (hex) to `OUT_DIR/rank{rank}.json` for
`tests/test_scheduler_multiprocess.py`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from process_exit import leave

from hf_autowu import AutoWU

CASES = 8
FAULTS = ("nan_loss", "inf_loss", "spike", "drop", "nan_gradients")


def case_plan(case: int) -> dict:
    """The budget, preset, faults (process, step) -> kind, and save step of one case; the same on every process."""
    rnd = random.Random(case)
    total = rnd.randint(30, 250)
    preset = rnd.choice(["robust", "robust", "paper"])
    faults = {(rnd.randint(0, 1), rnd.randint(0, total - 1)): rnd.choice(FAULTS) for _ in range(rnd.randint(0, 4))}
    return {"total": total, "preset": preset, "faults": faults, "stop": rnd.randint(1, total - 1)}


def build(total: int, preset: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1.0)
    return model, ddp, optimizer, AutoWU(optimizer, total_steps=total, preset=preset, model=model)


def train(rank: int, ddp, optimizer, scheduler, start: int, stop: int, faults: dict, lrs: list[float]) -> None:
    """Each process its own batches; a fault on this process at a step changes what it feeds AutoWU, or its
    targets."""
    for step in range(start, stop):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(7 * step + rank))
        y = x[:, :3].sum(dim=1, keepdim=True)
        kind = faults.get((rank, step))
        if kind == "nan_gradients":
            y = y * math.nan
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lrs.append(optimizer.param_groups[0]["lr"])
        fed = {"nan_loss": loss * math.nan, "inf_loss": loss * math.inf, "spike": loss * 1e3, "drop": loss * 0}
        scheduler.step(fed.get(kind, loss).detach())


def run_case(rank: int, case: int) -> dict:
    plan = case_plan(case)
    total, preset, faults, stop = plan["total"], plan["preset"], plan["faults"], plan["stop"]
    model, ddp, optimizer, scheduler = build(total, preset)
    expected: list[float] = []
    train(rank, ddp, optimizer, scheduler, 0, total, faults, expected)

    model1, ddp1, optimizer1, scheduler1 = build(total, preset)
    lrs: list[float] = []
    train(rank, ddp1, optimizer1, scheduler1, 0, stop, faults, lrs)
    scheduler1.sync_pending_losses()
    state = [{"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()}]
    dist.broadcast_object_list(state, src=0)
    model2, ddp2, optimizer2, scheduler2 = build(total, preset)
    model2.load_state_dict(state[0]["model"])
    optimizer2.load_state_dict(state[0]["opt"])
    scheduler2.load_state_dict(state[0]["sched"])
    train(rank, ddp2, optimizer2, scheduler2, stop, total, faults, lrs)
    weights = [p.detach().numpy().tobytes().hex() for p in model.parameters()]
    resumed_weights = [p.detach().numpy().tobytes().hex() for p in model2.parameters()]
    return {
        "stop": stop,
        "uninterrupted": expected,
        "resumed": lrs,
        "decision": [scheduler.switch_step, scheduler.switch_reason, scheduler.peak_lr],
        "resumed_decision": [scheduler2.switch_step, scheduler2.switch_reason, scheduler2.peak_lr],
        "weights": weights,
        "resumed_weights": resumed_weights,
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = {str(case): run_case(rank, case) for case in range(CASES)}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
    leave()


if __name__ == "__main__":
    main()
