"""`hf_autowu.register_for_checkpointing` in one process: `accelerator.save_state` in late warmup (rewind snapshots
held) and `load_state` into a rebuilt model, optimizer and scheduler continue the uninterrupted run bit for bit;
anything but an AutoWU, or a scheduler registered twice, is refused. (Two processes:
`tests/test_scheduler_multiprocess.py` and `tests/test_fsdp_rewind.py`.)"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from helpers import regression_mlp, train_regression

from hf_autowu import AutoWU, register_for_checkpointing

TOTAL, SAVE_AT = 120, 55  # the switch restores the snapshot of step 49 at step 60


def train(folder, save: bool, resume: bool) -> dict:
    """A hand-written Accelerate loop with AutoWU's defaults (rewind on): save after `SAVE_AT` steps, or resume there
    from a model of another initialisation."""
    accelerator = Accelerator(cpu=True)
    model = regression_mlp(seed=1 if resume else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = AutoWU(optimizer, total_steps=TOTAL, model=model)
    register_for_checkpointing(accelerator, scheduler)
    if resume:
        accelerator.load_state(str(folder))

    def save_at(steps_done: int, record: dict) -> None:
        if save and steps_done == SAVE_AT:
            record["snapshots"] = len(scheduler.rewinder.snapshots)
            accelerator.save_state(str(folder))

    steps = range(SAVE_AT if resume else 0, TOTAL)
    return train_regression(model, optimizer, scheduler, steps, backward=accelerator.backward, after_step=save_at)


def test_save_state_and_load_state_resume_exactly(tmp_path):
    full = train(tmp_path, save=True, resume=False)
    assert full["snapshots"] > 0  # saved with snapshots to restore
    assert full["rewound_to"] is not None and full["rewound_to"]["step"] < SAVE_AT < full["switch_step"]
    assert not any(path.name.startswith("autowu_rank") for path in tmp_path.iterdir())  # one process: one state
    resumed = train(tmp_path, save=False, resume=True)
    assert resumed["lrs"] == full["lrs"][SAVE_AT:]
    assert resumed["switch_step"] == full["switch_step"] and resumed["rewound_to"] == full["rewound_to"]
    assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], full["weights"], strict=True))


def test_anything_but_an_autowu_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    other = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match="`scheduler` must be an AutoWU scheduler, got LambdaLR"):
        register_for_checkpointing(Accelerator(cpu=True), other)


@pytest.mark.parametrize("first", ["accelerate", "hf_autowu"])
def test_a_scheduler_registered_twice_is_refused(first):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = AutoWU(optimizer, total_steps=100)
    accelerator = Accelerator(cpu=True)
    if first == "accelerate":
        accelerator.register_for_checkpointing(scheduler)
    else:
        register_for_checkpointing(accelerator, scheduler)
    with pytest.raises(ValueError, match="`scheduler` is already registered with this accelerator"):
        register_for_checkpointing(accelerator, scheduler)
    assert len(accelerator._custom_objects) == 1
