"""The Trainer with DeepSpeed ZeRO-2 on CPU (one process, `DS_ACCELERATOR=cpu`), both entry points, DeepSpeed
configs without a `scheduler` section, with an `optimizer` section (DeepSpeed's engine builds the scheduler through
`create_scheduler` on a shallow copy of the trainer and steps it inside the backward pass) and without one (the
Trainer steps it): AutoWU's LR is applied (read inside DeepSpeed's optimizer step) and logged, updates DeepSpeed
skips on a non-finite gradient norm (its fp16 overflow path) are not steps, resume is exact, and rewind is off with
one warning; a `scheduler` section is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun

from hf_autowu import AutoWU

pytest.importorskip("deepspeed")
SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from deepspeed_trainer import MAX_STEPS, OVERFLOW_STEPS, RESUME_AT  # noqa: E402
from trainer_toy import AUTOWU_OPTIONS  # noqa: E402

pytestmark = pytest.mark.multiprocess
ENTRY_POINTS, CONFIGS = ("callback", "trainer"), ("optimizer", "no_optimizer")
RUNS = [f"{entry_point}-{config}" for entry_point in ENTRY_POINTS for config in CONFIGS]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun("deepspeed_trainer.py", str(out), cwd=str(SCRIPTS), processes=1)
    return torch.load(out / "results.pt", weights_only=False)


def hand_fed_lrs(micro_losses: list[list[torch.Tensor]], skipped: set[int]) -> list[float]:
    """The LR of every step from an AutoWU fed by hand each step's loss as the Trainer computes it (the mean over
    its micro-batches), except on the skipped steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, 4, total_steps=MAX_STEPS, **AUTOWU_OPTIONS)
    lrs = []
    for step, losses in enumerate(micro_losses):
        lrs.append(optimizer.param_groups[0]["lr"])
        if step not in skipped:
            scheduler.step(sum(loss / len(losses) for loss in losses))
    return lrs


@pytest.mark.parametrize("run", RUNS)
def test_lr_applied_and_logged_and_skipped_updates_not_counted(results, run):
    record = results[run]
    engine_steps_it = run.endswith("-optimizer")
    assert (record["trainer_scheduler"] == "DeepSpeedSchedulerWrapper") == engine_steps_it
    assert (record["engine_scheduler"] != "NoneType") == engine_steps_it
    updates = record["updates"]
    assert len(updates) == MAX_STEPS and [i for i, (_, skipped) in enumerate(updates) if skipped] == [*OVERFLOW_STEPS]
    assert record["last_step"] == MAX_STEPS - len(OVERFLOW_STEPS)
    applied = [lrs[0] for lrs, _ in updates]
    assert all(len(set(lrs)) == 1 for lrs, _ in updates)
    expected = hand_fed_lrs(record["micro_losses"], set(OVERFLOW_STEPS))
    assert applied == expected
    assert applied[OVERFLOW_STEPS[0]] == applied[OVERFLOW_STEPS[0] + 1]  # a skipped update keeps its LR
    assert record["switch_step"] is not None and record["autowu_keys"]
    assert record["logged"] == [(step + 1, lr) for step, lr in enumerate(expected)]


@pytest.mark.parametrize("run", RUNS)
def test_rewind_is_off_with_one_warning(results, run):
    for record in (results[run], results[f"{run}-resumed"]):
        assert not record["rewind_enabled"]
        assert len(record["rewind_warnings"]) == 1 and "DeepSpeed" in record["rewind_warnings"][0]


@pytest.mark.parametrize("run", RUNS)
def test_resume_is_exact(results, run):
    full, resumed = results[run], results[f"{run}-resumed"]
    assert {"autowu_rewind_rank0.pt", f"global_step{RESUME_AT}"} <= set(full["checkpoint_files"])
    assert [lrs for lrs, _ in resumed["updates"]] == [lrs for lrs, _ in full["updates"][RESUME_AT:]]
    assert resumed["switch_step"] == full["switch_step"] and resumed["peak_lr"] == full["peak_lr"]
    assert torch.equal(resumed["losses"], full["losses"])
    assert resumed["weights"].keys() == full["weights"].keys()
    assert all(torch.equal(resumed["weights"][name], value) for name, value in full["weights"].items())


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_scheduler_section_is_refused(results, entry_point):
    assert "DeepSpeed owns" in results[f"{entry_point}-scheduler"]["refused"]
