"""AutoWU under `torch.distributed.algorithms.Join` with uneven inputs, two processes (torchrun, gloo).

Run with `torchrun --standalone --nproc_per_node 2 join_uneven_inputs.py OUT_DIR`; writes `OUT_DIR/rank{rank}.json`
for `tests/test_join.py`. A small MLP under DDP with AdamW and AutoWU's defaults (rewind and the spike watch's
relay on), trained in `with Join([model, scheduler])`:

- `rank1_short`: rank 1 runs out of batches after `JOIN_AT` steps, during warmup; rank 0 trains all `TOTAL`;
- `rank0_short`: the same with the main process (the one that holds rewind's snapshots) running out instead;
- `accumulate`: Accelerate's gradient-accumulation loop inside the `Join`, which AutoWU refuses at the first
  micro-batch, on both processes alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from process_exit import leave
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from hf_autowu import AutoWU

TOTAL = 240
JOIN_AT = 60
BATCH = 32


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s batch of step `step`: a noisy nonlinear regression, different data on each process."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(BATCH, 8, generator=g)
    w = torch.linspace(-1.0, 1.0, 8).unsqueeze(1)
    return x, torch.sin(2 * x @ w) + 0.1 * torch.randn(BATCH, 1, generator=g)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def uneven_run(rank: int, steps: int) -> dict:
    """Train `steps` steps on this process inside `Join([model, scheduler])`."""
    ddp = DistributedDataParallel(model())
    optimizer = torch.optim.AdamW(ddp.parameters())
    scheduler = AutoWU(optimizer, total_steps=TOTAL, model=ddp)
    losses, lrs = [], []
    with Join([ddp, scheduler]):
        for step in range(steps):
            x, y = batch(rank, step)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step(loss)
            losses.append(loss.item())
    return {
        "losses": losses,
        "lrs": lrs,
        "schedule": [scheduler.lr_at(step) for step in range(TOTAL)],
        "last_step": scheduler.last_step,
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "history": scheduler.losses.tolist(),
        "rewound_to": scheduler.rewinder.rewound_to,
        "joined": scheduler.joined,
        "params": torch.cat([p.detach().flatten() for p in ddp.parameters()]).tolist(),
        "state_keys": sorted(scheduler.state_dict()),
    }


def accumulate_run(rank: int, accelerator: Accelerator) -> dict:
    """Accelerate's accumulation loop inside a `Join`: refused by `AutoWU.step` at the first micro-batch."""
    net = model()
    prepared, optimizer = accelerator.prepare(net, torch.optim.AdamW(net.parameters()))
    scheduler = AutoWU(optimizer, total_steps=TOTAL)
    try:
        with Join([prepared, scheduler]):
            for step in range(8 - 2 * rank):
                with accelerator.accumulate(prepared):
                    x, y = batch(rank, step)
                    loss = torch.nn.functional.mse_loss(prepared(x), y)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step(loss)
                    optimizer.zero_grad()
    except RuntimeError as error:
        return {"error": str(error), "last_step": scheduler.last_step}
    return {"error": None, "last_step": scheduler.last_step}


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    rank = dist.get_rank()
    result = {
        "rank1_short": uneven_run(rank, JOIN_AT if rank == 1 else TOTAL),
        "rank0_short": uneven_run(rank, JOIN_AT if rank == 0 else TOTAL),
        "accumulate": accumulate_run(rank, accelerator),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    leave()


if __name__ == "__main__":
    main()
