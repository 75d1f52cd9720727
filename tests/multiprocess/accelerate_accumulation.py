"""AutoWU in Accelerate's gradient-accumulation loop, two processes (torchrun, gloo, `Accelerator(cpu=True)`).

Run with `torchrun --standalone --nproc_per_node 2 accelerate_accumulation.py OUT_DIR`; writes
`OUT_DIR/rank{rank}.json` for `tests/test_accelerate_accumulation.py`. One MLP regression, trained three times with
the same data, `gradient_accumulation_steps=ACCUMULATION` and a real `torch.amp.GradScaler` on the CPU (Accelerate
makes none there; it is set on the `Accelerator` before `prepare`). On update `SKIPPED_UPDATE` the last micro-batch's
loss is multiplied by inf, so the scaler skips that update on both processes (the gradients are all-reduced):

- `idiom`: Accelerate's documented loop: `optimizer.step()` and `scheduler.step(loss)` on every micro-batch, inside
  `accelerator.accumulate(model)`, AutoWU built on the optimizer `prepare` returned;
- `before`: the same loop with AutoWU built on the optimizer before `prepare` (and handed to it);
- `reference`: `scheduler.step` only after an update that happened (`accelerator.sync_gradients` and not
  `accelerator.optimizer_step_was_skipped`), with the mean of the update's micro-batch losses as Python floats.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from process_exit import leave
from torch.utils.data import DataLoader, TensorDataset

from hf_autowu import AutoWU

ACCUMULATION = 2
UPDATES = 120
BATCH = 16
SKIPPED_UPDATE = 30


def data() -> TensorDataset:
    """Every process's micro-batches for the whole budget: `UPDATES * ACCUMULATION` per process."""
    g = torch.Generator().manual_seed(0)
    n = UPDATES * ACCUMULATION * BATCH * 2
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def run(accelerator: Accelerator, variant: str) -> dict:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    loader = DataLoader(data(), batch_size=BATCH, shuffle=False)
    if variant == "before":
        scheduler = AutoWU(optimizer, total_steps=UPDATES)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        scheduler = AutoWU(optimizer, total_steps=UPDATES)
    lrs, micro_losses, updates = [], [], 0
    for index, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            last_micro_batch = index % ACCUMULATION == ACCUMULATION - 1
            if last_micro_batch and updates == SKIPPED_UPDATE:
                loss = loss * math.inf
            if accelerator.sync_gradients:
                lrs.append(optimizer.param_groups[0]["lr"])
            accelerator.backward(loss)
            optimizer.step()
            if variant != "reference":
                scheduler.step(loss)
            optimizer.zero_grad()
        micro_losses.append(float(loss.detach()))
        if accelerator.sync_gradients:
            if variant == "reference" and not accelerator.optimizer_step_was_skipped:
                scheduler.step(sum(micro_losses) / len(micro_losses))
            micro_losses, updates = [], updates + 1
    return {
        "lrs": lrs,
        "updates": updates,
        "last_step": scheduler.last_step,
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "rewound_to": scheduler.rewinder.rewound_to if scheduler.rewinder is not None else None,
        "params": [v for p in model.parameters() for v in p.detach().flatten().tolist()],
    }


def main() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # Accelerate makes none on the CPU: fp16 overflow skips
    result = {variant: run(accelerator, variant) for variant in ("idiom", "before", "reference")}
    Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
