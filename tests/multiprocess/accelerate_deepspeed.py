"""AutoWU in an Accelerate loop under DeepSpeed (one process on the CPU), for `tests/test_accelerate_deepspeed.py`.

Run with `torchrun --standalone --nproc_per_node 1 tests/multiprocess/accelerate_deepspeed.py OUT_DIR STAGE`
(`DS_ACCELERATOR=cpu`; Accelerate on the CPU counts DeepSpeed's processes as one, so two are not a faithful test:
`tests/test_deepspeed_rewind.py` runs two without Accelerate). The loop is the one Accelerate's documentation shows,
with AutoWU's defaults (rewind on): `accelerator.prepare`, `accelerator.backward(loss)`, `optimizer.step()`,
`scheduler.step(loss)`, under ZeRO stage `STAGE`. Runs, each with a new `Accelerator` (the first one takes the
DeepSpeed plugin, which Accelerate keeps for the process), written to `OUT_DIR/{run}.pt` (the LR of every step,
after every step DeepSpeed's fp32 master partitions with their AdamW state and the model's weights, the rewind
bookkeeping and AutoWU's rewind warnings):

- `zero{stage}-after`: AutoWU built on the optimizer `accelerator.prepare` returns, registered with
  `hf_autowu.register_for_checkpointing`, and the state saved with `accelerator.save_state` after `RESUME_AT` steps;
- `zero{stage}-after-resumed`: another initialisation, `accelerator.load_state` of that folder, trained to the end;
- `zero{stage}-before`: AutoWU built on AdamW before `accelerator.prepare(model, optimizer, scheduler)`, registered
  with `accelerator.register_for_checkpointing`, and the state saved with `accelerator.save_state` after
  `RESUME_AT` steps;
- `zero{stage}-before-resumed`: another initialisation, `accelerator.load_state` of that folder, trained to the end.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin  # noqa: E402
from deepspeed_rewind import master_state, model_weights  # noqa: E402
from process_exit import leave  # noqa: E402
from torch import nn  # noqa: E402

from hf_autowu import AutoWU, register_for_checkpointing  # noqa: E402

TOTAL, RESUME_AT, HIDDEN, DIM = 160, 60, 32, 8
STAGES = (2, 3)
_plugin: list[DeepSpeedPlugin] = []  # to the first Accelerator only


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, DIM, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def run(before: bool, folder: Path, resume: bool = False) -> dict[str, Any]:
    """One run (see the module's docstring); `folder`: where `save_state` writes, or `load_state` reads."""
    accelerator = Accelerator(deepspeed_plugin=_plugin.pop() if _plugin else None)
    torch.manual_seed(123 if resume else 0)
    model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
    model.append(nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    record: dict[str, Any] = {"lrs": {}, "states": {}, "weights": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if before:
            scheduler = AutoWU(optimizer, total_steps=TOTAL)
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
            accelerator.register_for_checkpointing(scheduler)
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
            scheduler = AutoWU(optimizer, total_steps=TOTAL)
            register_for_checkpointing(accelerator, scheduler)
        start = 0
        if resume:
            accelerator.load_state(str(folder))
            start = RESUME_AT
        for step in range(start, TOTAL):
            x, y = batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            record["lrs"][step] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step(loss.detach())
            record["states"][step + 1] = master_state(optimizer.optimizer)
            record["weights"][step + 1] = model_weights(model.module)
            if not resume and step + 1 == RESUME_AT:
                accelerator.save_state(str(folder))
    rewinder = scheduler.rewinder
    record.update(
        switch_step=scheduler.switch_step,
        peak_lr=scheduler.peak_lr,
        rewound_to=rewinder.rewound_to,
        enabled=rewinder.enabled,
        mode=rewinder.mode,
        disabled_reason=rewinder.disabled_reason,
        scheduler=type(scheduler).__name__,
        optimizer=type(optimizer.optimizer).__name__,
        warnings=[str(w.message) for w in caught if "AutoWU" in str(w.message)],
    )
    accelerator.free_memory()
    return record


def main() -> None:
    # here, not at import: the tests import this module's constants, and the variable makes every Accelerator
    # in a process use DeepSpeed
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1}
    _plugin.append(DeepSpeedPlugin(hf_ds_config={**config, "zero_optimization": {"stage": stage}}))
    for before, name in ((False, "after"), (True, "before")):
        folder = out / f"zero{stage}-{name}-state"
        torch.save(run(before=before, folder=folder), out / f"zero{stage}-{name}.pt")
        torch.save(run(before=before, folder=folder, resume=True), out / f"zero{stage}-{name}-resumed.pt")
    leave()


if __name__ == "__main__":
    main()
