"""Two processes (torchrun, gloo on CPU), each on its own shard: every process applies the same LR at every
step, AutoWU sees the cross-process mean loss, and collectives happen only at switch tests and the spike watch's
relay steps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_state_equal, torchrun, torchrun_ranks

SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from trainer_two_processes import NAN_STEP, TEST_INTERVAL  # noqa: E402

from hf_autowu.watch import RELAY_EVERY  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun_ranks("trainer_two_processes.py", tmp_path_factory.mktemp("two_processes"), SCRIPTS)


RUNS = ("callback-clean", "callback-nan", "trainer-clean", "trainer-nan")


@pytest.mark.parametrize("run", RUNS)
def test_every_process_applies_the_same_lr(ranks, run):
    first, second = ranks[0][run], ranks[1][run]
    assert first["world_size"] == second["world_size"] == 2
    assert len(first["lrs"]) == (32 if run.endswith("nan") else 60)
    assert first["lrs"] == second["lrs"]
    assert first["switch_step"] == second["switch_step"] is not None
    assert first["autowu_losses"] == second["autowu_losses"]  # json decodes every NaN to one object: NaN is NaN
    # both processes rewound to the same snapshot at the switch and ended with the same weights
    assert first["rewound_to"] == second["rewound_to"] is not None
    assert first["final_weights"] == second["final_weights"]
    # collectives only at switch tests (every TEST_INTERVAL steps), at the switch, once at the first rewind
    # snapshot (the memory budget check, step 1), at the retry after a NaN, and one at each of the spike watch's
    # relay steps in warmup (every RELAY_EVERY-th), not on the steps between. (AutoWUTrainer steps AutoWU in
    # `on_step_end`, after the Trainer has counted the step: its collectives are seen one step later.)
    offset = 1 if run.startswith("trainer") else 0
    switch = first["switch_step"]
    relays = {step for step in range(1, switch) if step % RELAY_EVERY == 0}
    tests = {step for step in range(1, 61) if step % TEST_INTERVAL == 0}
    retry = {first["retried"]["step"]} if first["retried"] else set()
    allowed = tests | relays | retry | {switch, 1}
    assert set(first["collective_steps"]) <= {step + offset for step in allowed}
    assert len(first["collective_steps"]) <= len(first["lrs"]) // 2


@pytest.mark.parametrize("entry_point", ("callback", "trainer"))
def test_loss_is_the_mean_over_processes(ranks, entry_point):
    first, second = ranks[0][f"{entry_point}-clean"], ranks[1][f"{entry_point}-clean"]
    assert first["local_losses"] != second["local_losses"]  # each process trains on its own data
    warmup = len(first["autowu_losses"])
    assert warmup == first["switch_step"]
    mean = [(a + b) / 2 for a, b in zip(first["local_losses"], second["local_losses"], strict=True)][:warmup]
    torch.testing.assert_close(torch.tensor(first["autowu_losses"]), torch.tensor(mean), rtol=1e-12, atol=0)
    # the Trainer's own logged loss (logging_steps=1) is the same cross-process mean
    logged = torch.tensor(first["logged_losses"][:warmup])
    torch.testing.assert_close(logged, torch.tensor(first["autowu_losses"]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("entry_point", ("callback", "trainer"))
def test_nan_on_one_process(ranks, entry_point):
    """Process 1's loss is NaN at `NAN_STEP`: the mean is NaN on both; both see it a few steps later (the spike
    watch's relay) and retry it alike, from the same snapshot, whose later losses leave the history (NaN)."""
    first, second = ranks[0][f"{entry_point}-nan"], ranks[1][f"{entry_point}-nan"]
    assert math.isfinite(first["local_losses"][NAN_STEP]) and math.isnan(second["local_losses"][NAN_STEP])
    assert math.isnan(first["autowu_losses"][NAN_STEP]) and math.isnan(second["autowu_losses"][NAN_STEP])
    retried = first["retried"]
    assert retried == second["retried"] and retried["loss_index"] == NAN_STEP
    # one process reads loss NAN_STEP at step NAN_STEP + 2; two, at most RELAY_EVERY - 1 steps later (not at the cap)
    assert NAN_STEP + 2 <= retried["step"] <= NAN_STEP + 1 + RELAY_EVERY
    restored = retried["restored_step"]
    assert restored is not None and restored <= NAN_STEP
    assert all(math.isfinite(v) for v in first["autowu_losses"][:restored])
    assert all(math.isnan(v) for v in first["autowu_losses"][restored : NAN_STEP + 1])
    assert all(math.isfinite(v) for v in first["autowu_losses"][retried["step"] :])


def test_both_entry_points_agree(ranks):
    for condition in ("clean", "nan"):
        assert ranks[0][f"callback-{condition}"]["lrs"] == ranks[0][f"trainer-{condition}"]["lrs"]


@pytest.fixture(scope="module")
def resumed_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("resume_two_processes")
    torchrun("trainer_resume_two_processes.py", str(out), cwd=str(SCRIPTS))
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.parametrize("entry_point", ("callback", "trainer"))
def test_best_checkpoint_holds_the_cross_process_mean_and_resumes_exactly(resumed_ranks, entry_point):
    """`save_strategy="best"` (saved after evaluation): the checkpoint, written by the main process, holds the
    mean over processes of the losses not yet tested; both processes resume from it in the same state and continue
    the uninterrupted run exactly."""
    first, second = resumed_ranks[0][entry_point], resumed_ranks[1][entry_point]
    start = first["start"]
    assert start < first["switch_step"] and start % TEST_INTERVAL, "losses were pending when it was written"
    assert set(first["written"]) < set(range(3, 61, 3)), "checkpoints only where the evaluation loss improved"
    saved = first["saved_scheduler"]["autowu_state"]  # both entry points keep AutoWU's state there in scheduler.pt
    assert saved["pending"].numel() == 0 and saved["last_step"] == start
    assert first["local_losses"] != second["local_losses"]
    mean = [(a + b) / 2 for a, b in zip(first["local_losses"], second["local_losses"], strict=True)][:start]
    torch.testing.assert_close(saved["history"], torch.tensor(mean, dtype=torch.float64), rtol=1e-12, atol=0)
    assert_state_equal(first["resumed_state_at_start"], second["resumed_state_at_start"])
    for record in (first, second):
        assert record["resumed_lrs"] == record["lrs"][start:]
        assert torch.equal(record["resumed_autowu_losses"], record["autowu_losses"])
        assert record["resumed_switch_step"] == record["switch_step"]
        assert record["resumed_rewound_to"] == record["rewound_to"] is not None
        assert all(torch.equal(record["resumed_final"][key], value) for key, value in record["final"].items())
