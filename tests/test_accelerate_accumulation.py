"""AutoWU in Accelerate's documented gradient-accumulation loop, on two processes: `scheduler.step(loss)` on every
micro-batch inside `accelerator.accumulate(model)` is one AutoWU step per update, with the update's mean loss, and an
update that fp16 overflow skipped is no step, as for the schedulers `accelerator.prepare` wraps."""

import math
import sys
from pathlib import Path

import pytest
from helpers import torchrun_ranks

SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from accelerate_accumulation import SKIPPED_UPDATE, UPDATES  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun_ranks(
        "accelerate_accumulation.py", tmp_path_factory.mktemp("accelerate_accumulation"), SCRIPTS, timeout=300
    )


@pytest.mark.multiprocess
def test_the_accumulation_idiom_runs_as_one_step_per_update_with_the_mean_loss(ranks):
    """The loop that steps AutoWU on every micro-batch, with AutoWU built after `prepare` or before it, takes the LRs,
    decisions and weights of the loop that steps it once per update with the mean of the update's losses."""
    assert ranks[0] == ranks[1], "the processes disagree"
    run = ranks[0]
    reference = run["reference"]
    assert reference["switch_reason"] == "test"
    for variant in ("idiom", "before"):
        assert run[variant] == reference, variant


@pytest.mark.multiprocess
def test_a_skipped_update_is_no_step_and_its_loss_is_dropped(ranks):
    """Closed form: the ramp grows by one factor per update from `min_lr`, and holds still across the skipped update;
    its inf loss never reaches AutoWU (no blow-up switch), and the budget's end is the last update's."""
    run = ranks[0]["idiom"]
    lrs = run["lrs"]
    assert run["updates"] == UPDATES and run["last_step"] == UPDATES - 1
    assert lrs[0] == pytest.approx(1e-5, rel=1e-12)
    ramp = lrs[: run["switch_step"] + 1]  # the LRs of updates 0..switch step (one update skipped among them)
    assert ramp[SKIPPED_UPDATE + 1] == ramp[SKIPPED_UPDATE]
    held = ramp[: SKIPPED_UPDATE + 1] + ramp[SKIPPED_UPDATE + 2 :]
    growth = held[1] / held[0]
    assert growth > 1
    assert all(b / a == pytest.approx(growth, rel=1e-9) for a, b in zip(held[:-1], held[1:], strict=True))
    assert run["switch_reason"] == "test"
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)
