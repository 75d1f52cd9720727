"""`hf_autowu.save_scheduler_state` / `load_scheduler_state` in one process: a hand-written loop saved in late warmup
(rewind snapshots held) and resumed into a rebuilt model, optimizer and scheduler continues the uninterrupted run bit
for bit; a process with no file of its own takes the main process's; bad input is refused. (Two processes, with
DDP, FSDP1, FSDP2 and DeepSpeed ZeRO 1-3: `tests/test_fsdp_rewind.py` and `tests/test_deepspeed_rewind.py`.)"""

from __future__ import annotations

import pytest
import torch
from helpers import regression_mlp, train_regression

import hf_autowu.process_files as process_files
from hf_autowu import AutoWU, load_scheduler_state, save_scheduler_state

TOTAL, SAVE_AT = 120, 55  # the switch restores the snapshot of step 49 at step 60


def train(folder, save: bool, resume: bool) -> dict:
    """The README's hand-written loop with AutoWU's defaults (rewind on): model, optimizer and AutoWU's state saved
    after `SAVE_AT` steps, or loaded there into a model of another initialisation."""
    model = regression_mlp(seed=1 if resume else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=TOTAL, model=model)
    loaded = None
    if resume:
        saved = torch.load(folder / "model_and_optimizer.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        loaded = load_scheduler_state(scheduler, folder)

    def save_at(steps_done: int, record: dict) -> None:
        if save and steps_done == SAVE_AT:
            record["snapshots"] = len(scheduler.rewinder.snapshots)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save(state, folder / "model_and_optimizer.pt")
            record["saved"] = save_scheduler_state(scheduler, folder)

    record = train_regression(model, optimizer, scheduler, range(SAVE_AT if resume else 0, TOTAL), after_step=save_at)
    return record | {"loaded": loaded}


def test_a_saved_state_resumes_the_uninterrupted_run_exactly(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    full = train(folder, save=True, resume=False)
    assert full["snapshots"] > 0  # saved with snapshots to restore
    assert full["rewound_to"] is not None and full["rewound_to"]["step"] < SAVE_AT < full["switch_step"]
    assert full["saved"] == folder / "autowu_rank0.pt"
    assert sorted(path.name for path in folder.iterdir()) == ["autowu_rank0.pt", "model_and_optimizer.pt"]
    resumed = train(folder, save=False, resume=True)
    assert resumed["loaded"] == folder / "autowu_rank0.pt"
    assert resumed["lrs"] == full["lrs"][SAVE_AT:]
    assert resumed["switch_step"] == full["switch_step"] and resumed["rewound_to"] == full["rewound_to"]
    assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], full["weights"], strict=True))


def scheduler_after(steps: int) -> AutoWU:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = AutoWU(optimizer, total_steps=100)
    for step in range(steps):
        optimizer.step()
        scheduler.step(1.0 / (step + 1))
    return scheduler


def test_a_process_without_its_own_file_loads_the_main_processs(tmp_path, monkeypatch):
    """A checkpoint written by one process, loaded by the process of rank 1 of a larger job."""
    save_scheduler_state(scheduler_after(7), tmp_path / "created")  # the folder is created
    monkeypatch.setattr(process_files, "process_rank", lambda: 1)
    fresh = scheduler_after(0)
    assert load_scheduler_state(fresh, tmp_path / "created") == tmp_path / "created" / "autowu_rank0.pt"
    assert fresh.last_step == 7 and fresh.get_last_lr() == scheduler_after(7).get_last_lr()
    save_scheduler_state(scheduler_after(9), tmp_path / "created")  # now rank 1's own file is there, and preferred
    assert sorted(path.name for path in (tmp_path / "created").iterdir()) == ["autowu_rank0.pt", "autowu_rank1.pt"]
    assert load_scheduler_state(fresh, tmp_path / "created").name == "autowu_rank1.pt" and fresh.last_step == 9


def test_a_folder_without_a_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no AutoWU state in .* \(no autowu_rank0.pt\)"):
        load_scheduler_state(scheduler_after(0), tmp_path)


def test_anything_but_an_autowu_is_refused(tmp_path):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    other = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(
        ValueError, match="save_scheduler_state: `scheduler` must be an AutoWU scheduler, got LambdaLR"
    ):
        save_scheduler_state(other, tmp_path)
    with pytest.raises(
        ValueError, match="load_scheduler_state: `scheduler` must be an AutoWU scheduler, got LambdaLR"
    ):
        load_scheduler_state(other, tmp_path)
    assert list(tmp_path.iterdir()) == []
