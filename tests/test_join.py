"""AutoWU under `torch.distributed.algorithms.Join` (uneven inputs), two processes: the process that runs out of
batches during warmup shadows the steps of the other, so the run ends on both with the same decisions, LRs and
weights; each step's loss is the mean over the processes that trained it; rewind restores on both, also when the main
process (which holds the snapshots) ran out; gradient accumulation inside the `Join` is refused on both alike."""

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun_ranks

SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from join_uneven_inputs import JOIN_AT, TOTAL  # noqa: E402

from hf_autowu import AutoWU  # noqa: E402

CASES = {"rank1_short": 1, "rank0_short": 0}  # the case and the rank that runs out of batches


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun_ranks("join_uneven_inputs.py", tmp_path_factory.mktemp("join_uneven_inputs"), SCRIPTS, timeout=300)


def expected_history(runs: list[dict], short: int) -> list[float]:
    """Each warmup step's loss averaged over the processes that trained it: both before `JOIN_AT`, one after."""
    long = 1 - short
    steps = runs[0]["switch_step"]
    return [
        (runs[0]["losses"][k] + runs[1]["losses"][k]) / 2 if k < JOIN_AT else runs[long]["losses"][k]
        for k in range(steps)
    ]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_a_process_out_of_batches_keeps_stepping_with_the_others(ranks, case):
    runs = [rank[case] for rank in ranks]
    short = CASES[case]
    assert len(runs[short]["losses"]) == JOIN_AT and len(runs[1 - short]["losses"]) == TOTAL
    assert JOIN_AT < runs[0]["switch_step"] < TOTAL, "the process joined during warmup"
    for key in ("last_step", "switch_step", "switch_reason", "peak_lr", "history", "schedule", "rewound_to", "params"):
        assert runs[0][key] == runs[1][key], key
    assert runs[0]["last_step"] == TOTAL
    assert not runs[0]["joined"] and not runs[1]["joined"]
    assert all(math.isfinite(lr) and lr >= 0 for lr in runs[0]["schedule"])
    # the LRs the process still training used are the schedule both hold
    assert runs[1 - short]["lrs"] == runs[0]["schedule"]
    assert runs[short]["lrs"] == runs[0]["schedule"][:JOIN_AT]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_each_step_is_averaged_over_the_processes_that_trained_it(ranks, case):
    runs = [rank[case] for rank in ranks]
    assert runs[0]["history"] == expected_history(runs, CASES[case])


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_one_process_fed_those_means_decides_alike(ranks, case):
    """The decisions are those of one process fed the mean losses (the switch comes by a test: the spike watch,
    which reads losses at other steps with one process, finds nothing on either)."""
    runs = [rank[case] for rank in ranks]
    assert runs[0]["switch_reason"] == "test"
    history = expected_history(runs, CASES[case])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    single = AutoWU(optimizer, total_steps=TOTAL)
    for loss in history:
        single.step(loss)
    assert (single.switch_step, single.switch_reason, single.peak_lr) == (
        runs[0]["switch_step"],
        "test",
        runs[0]["peak_lr"],
    )
    assert [single.lr_at(step) for step in range(TOTAL)] == runs[0]["schedule"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_rewind_restores_on_both_processes(ranks, case):
    """Rewind restores a snapshot at the switch. When the main process ran out of batches, its parameters stopped
    where it joined, so it cannot read how far the others moved since the snapshot: it restores (the gate would
    read a shift of about 0 and keep the others' weights)."""
    runs = [rank[case] for rank in ranks]
    assert runs[0]["rewound_to"] is not None
    if case == "rank0_short":
        assert runs[0]["rewound_to"]["step"] <= runs[0]["switch_step"]


@pytest.mark.multiprocess
def test_gradient_accumulation_inside_a_join_is_refused_on_both(ranks):
    for rank in ranks:
        error = rank["accumulate"]["error"]
        assert error is not None and "gradient accumulation" in error and "`Join`" in error
        assert rank["accumulate"]["last_step"] == 0
