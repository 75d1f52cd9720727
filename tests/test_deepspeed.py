"""The Trainer with DeepSpeed on CPU (one process, `DS_ACCELERATOR=cpu`), both entry points, DeepSpeed configs
without a `scheduler` section: ZeRO-2 with an `optimizer` section (DeepSpeed's engine builds the scheduler through
`create_scheduler` on a shallow copy of the trainer and steps it inside the backward pass) and without one (the
Trainer steps it), and ZeRO-3. AutoWU's LR is applied (read inside DeepSpeed's optimizer step) and logged, updates
DeepSpeed skips on a non-finite gradient norm (its fp16 overflow path) are not steps, rewind restores DeepSpeed's
master partitions, their optimizer state and the model's weights, resume is exact; a `scheduler` section is
refused. `tests/test_deepspeed_rewind.py` runs ZeRO 1 to 3 in two processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import same_tensors, torchrun

from hf_autowu import AutoWU

pytest.importorskip("deepspeed")
SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from deepspeed_trainer import MAX_STEPS, OVERFLOW_STEPS, RESUME_AT  # noqa: E402
from trainer_toy import AUTOWU_OPTIONS  # noqa: E402

pytestmark = pytest.mark.multiprocess
ENTRY_POINTS, CONFIGS = ("callback", "trainer"), ("optimizer", "no_optimizer", "zero3")
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


def after_scheduler_steps(count: int) -> int:
    """The first global step after which the scheduler has taken `count` steps (skipped updates are not steps)."""
    return next(g for g in range(count, MAX_STEPS + 1) if g - sum(o < g for o in OVERFLOW_STEPS) == count)


@pytest.mark.parametrize("run", RUNS)
def test_rewind_restores_deepspeed_masters_state_and_weights(results, run):
    """Right after the switch, DeepSpeed's fp32 master partitions, their AdamW state and the weights the model
    computes with (ZeRO-3: its partitions) are bit for bit those after the snapshot's step, with no warning; the
    resumed run restores the same snapshot from the checkpoint's rewind file."""
    full, resumed = results[run], results[f"{run}-resumed"]
    for record in (full, resumed):
        assert record["rewind_enabled"] and record["rewind_mode"] == "sharded" and record["rewind_warnings"] == []
        assert record["rewound_to"] is not None and record["rewound_to"]["step"] < record["switch_step"]
    assert resumed["rewound_to"] == full["rewound_to"]
    switch = after_scheduler_steps(full["switch_step"])
    target = after_scheduler_steps(full["rewound_to"]["step"])
    assert target < RESUME_AT < switch
    assert same_tensors(full["states"][switch], full["states"][target])
    assert not same_tensors(full["states"][switch - 1], full["states"][switch]), "the rewind changed nothing"
    assert same_tensors(resumed["states"][switch], full["states"][target])


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
