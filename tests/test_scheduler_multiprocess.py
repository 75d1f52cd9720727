"""AutoWU in a hand-written two-process loop: every process applies the same LRs, equal to those of one
process fed the cross-process mean loss; a blow-up between two tests is caught by both at most `RELAY_EVERY - 1`
steps after one process would, and rewound, with collectives only at tests, at the switch and every `RELAY_EVERY`
warmup steps; a state saved from the main process between two tests resumes exactly once the losses are synced, and
says so when they are not; a NaN on one process is retried by both; a budget too short for a switch test decays alike
on both; a loss that never falls decays from `min_lr` on both."""

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun_ranks

SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from scheduler_two_processes import (  # noqa: E402
    DAMAGE_AT,
    DAMAGE_INTERVAL,
    FLAT_TOTAL,
    NAN_STEP,
    RETRY_STEP,
    SAVE_STEP,
    SHORT_TOTAL,
    SPIKE_INTERVAL,
    SPIKE_STEP,
    TOTAL,
    local_loss,
)

from hf_autowu import AutoWU  # noqa: E402
from hf_autowu.watch import RELAY_EVERY  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun_ranks(
        "scheduler_two_processes.py", tmp_path_factory.mktemp("scheduler_two_processes"), SCRIPTS, timeout=300
    )


@pytest.mark.multiprocess
def test_two_processes_agree_with_the_mean_loss(ranks):
    ranks = [rank["nan"] for rank in ranks]
    assert ranks[0] == ranks[1], "the processes disagree"
    assert ranks[0]["switch_step"] is not None

    # one process fed the mean of both processes' losses makes the same decisions
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    single = AutoWU(
        optimizer, total_steps=TOTAL, immediate_cooldown=True, divergence_guard=False, spike_watch=False, rewind=False
    )
    lrs = []
    for step in range(TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        single.step((local_loss(0, step, lrs[-1]) + local_loss(1, step, lrs[-1])) / 2)
    assert lrs == ranks[0]["lrs"]
    assert ranks[0]["losses"][NAN_STEP] is None, "one NaN makes the step's mean NaN on every process"
    assert all(math.isfinite(lr) for lr in lrs)


def first_relay_check_after(first_bad: int) -> int:
    """The step at which two processes check loss number `first_bad` (0-based; the loss of step `first_bad + 1`): its
    average over them is started at the first step count that is a multiple of `RELAY_EVERY` and read a step later."""
    return math.ceil((first_bad + 1) / RELAY_EVERY) * RELAY_EVERY + 1


@pytest.mark.multiprocess
def test_a_blow_up_between_tests_is_caught_by_both_before_the_next_test(ranks):
    """Each process only sees its own loss: both act on the averaged losses, every `RELAY_EVERY` steps, not at the
    next test (step 80)."""
    first, second = ranks[0]["spike"], ranks[1]["spike"]
    assert first == second, "the processes disagree"
    next_test = (SPIKE_STEP // SPIKE_INTERVAL + 1) * SPIKE_INTERVAL
    assert first["switch_reason"] == "spike" and first["switch_step"] == first_relay_check_after(SPIKE_STEP)
    one_process = SPIKE_STEP + 2  # one process reads loss number SPIKE_STEP a step after it, and switches
    assert one_process <= first["switch_step"] <= one_process + RELAY_EVERY - 1 < next_test
    assert first["peak_lr"] <= first["lrs"][SPIKE_STEP - 1]


@pytest.mark.multiprocess
def test_a_mean_started_without_waiting_is_the_mean_over_processes(ranks):
    """The relay's `MeanInFlight`, read after another collective ran, and `mean_over_processes` equal the mean of the
    processes' gathered values bit for bit."""
    for rank in ranks:
        assert rank["in_flight"]["equal"] == [True] * 16


@pytest.mark.multiprocess
def test_an_update_that_wrecks_both_processes_is_caught_within_a_few_steps_and_rewound(ranks):
    """Under DDP rank 1's gradient wrecks the weights of both at step `DAMAGE_AT`: both switch at the first check of
    the averaged loss after it (long before the next test), restore a snapshot from before the damage, and train on
    from it; AutoWU's collectives come only at the switch tests, the switch, the first snapshot (its memory check)
    and the relay steps (every `RELAY_EVERY`-th step of warmup, one each), never on the steps in between."""
    first, second = ranks[0]["damaged"], ranks[1]["damaged"]
    assert first["switch_step"] == second["switch_step"] and first["weights"] == second["weights"]
    first_bad = DAMAGE_AT + 1  # the first loss computed with the wrecked weights
    assert first["losses"][first_bad] > 1e3 * first["losses"][DAMAGE_AT]
    assert first["tests"][-1] < first_bad < first["tests"][-1] + DAMAGE_INTERVAL
    assert first["switch_reason"] == "spike" and first["switch_step"] == first_relay_check_after(first_bad)
    assert first["peak_lr"] <= first["lr_at_damage"]
    rewound = first["rewound_step"]
    assert rewound is not None and rewound <= DAMAGE_AT
    switch = first["switch_step"]
    assert first["weights"][switch - 1] == first["weights"][rewound - 1]
    for rank in (first, second):  # training goes on from the snapshot's level, not the wrecked one
        assert rank["losses"][switch] < 10 * rank["losses"][rewound]
    for rank in (first, second):
        steps = rank["collective_steps"]  # the step count when each collective was called
        decision_points = {*rank["tests"], switch, rank["snapshot_steps"][0]}
        relays = [step for step in steps if step not in decision_points]
        assert relays, "no collective between the tests: the watch would wait for the next test"
        assert all(step % RELAY_EVERY == 0 and step < switch for step in relays), relays
        assert len(relays) == len(set(relays)), "one collective per relay step"


@pytest.mark.multiprocess
def test_a_state_saved_between_tests_from_the_main_process_resumes_exactly_after_a_sync(ranks):
    """As `accelerator.register_for_checkpointing` saves it: the main process's state, loaded on every process. Each
    process's losses since the last test are its own until `sync_pending_losses()` averages them; `state_dict()` warns
    (on the main process) when they are not, and after the sync the resumed run is the uninterrupted one."""
    for rank, result in enumerate(ranks):
        assert result["resumed"]["lrs"] == result["nan"]["lrs"], rank
        assert result["resumed"]["warnings_unsynced"] == (1 if rank == 0 else 0), rank
        assert result["resumed"]["warnings_synced"] == 0, rank


@pytest.mark.multiprocess
def test_accelerate_checkpoints_average_the_pending_losses_and_resume_exactly(ranks):
    """`hf_autowu.register_for_checkpointing(accelerator, scheduler)`, saved between tests by `save_state` alone:
    the main process's saved history holds the mean over the processes of every loss so far (computed here from
    each process's own losses), with no warning, each other process keeps its own file, and after `load_state` the
    run is the uninterrupted one on both."""
    saved = ranks[0]["accelerate"]["saved_history"]
    lrs = ranks[0]["nan"]["lrs"]
    mean = [(local_loss(0, step, lrs[step]) + local_loss(1, step, lrs[step])) / 2 for step in range(SAVE_STEP)]
    torch.testing.assert_close(
        torch.tensor(saved, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64), rtol=1e-6, atol=0
    )
    for rank, result in enumerate(ranks):
        accelerate = result["accelerate"]
        assert accelerate["pending_before_save"] == SAVE_STEP and accelerate["warnings"] == [], rank
        assert accelerate["own_file"] == (rank == 1)
        assert accelerate["lrs"] == result["nan"]["lrs"], rank


@pytest.mark.multiprocess
def test_states_saved_by_hand_average_the_pending_losses_and_resume_exactly(ranks):
    """`hf_autowu.save_scheduler_state` on both processes between tests, each to its own file, with no warning;
    process 1, its own file removed, loads the main process's, and the run resumed from it on both is the
    uninterrupted one: the main process's file holds the mean of both processes' losses, not its own."""
    for rank, result in enumerate(ranks):
        by_hand = result["by_hand"]
        assert by_hand["written"] == f"autowu_rank{rank}.pt" and by_hand["loaded"] == "autowu_rank0.pt", rank
        assert by_hand["warnings"] == [], rank
        assert by_hand["lrs"] == result["nan"]["lrs"], rank


@pytest.mark.multiprocess
def test_a_state_saved_by_the_main_process_alone_while_the_relay_runs_resumes_exactly(ranks):
    """With the spike watch on, a state taken on the main process alone, without a sync, while the relay started
    at that step is under way: `state_dict()` only waits for it (no collective: a call on one process does not hang),
    holds no loss of one process, and the run resumed from it on both is the uninterrupted one."""
    for rank, result in enumerate(ranks):
        resumed = result["resumed_mid_relay"]
        assert resumed["in_flight"], "the save must come while the relay is under way"
        assert resumed["lrs"] == result["watched"]["lrs"], rank
        if rank == 0:
            assert resumed["warnings"] == 0 and resumed["pending"] == []
    assert ranks[0]["watched"]["tests"], "the run goes on to its switch tests"


@pytest.mark.multiprocess
def test_a_non_finite_loss_on_one_process_is_retried_by_both(ranks):
    """Rank 1's loss and gradients turn NaN once (its weights with them): the mean loss is NaN on both, both go on
    with warmup from the main process's snapshot (broadcast), and they end with the same LRs and the same finite
    weights, warmup not ended by that NaN."""
    first, second = ranks[0]["retried"], ranks[1]["retried"]
    assert first == second, "the processes disagree"
    assert first["retried"]["loss_index"] == RETRY_STEP and first["retried"]["restored_step"] < RETRY_STEP
    assert first["switch_reason"] != "divergence"
    assert all(math.isfinite(w) for weights in first["weights"] for w in weights)


@pytest.mark.multiprocess
def test_a_budget_too_short_for_a_test_decays_alike_on_both(ranks):
    """30 steps, each process with its own losses: the cap comes before any switch test, and both decay from the
    range test's rule applied to the processes' mean losses, as one process fed that mean does."""
    first, second = ranks[0]["short"], ranks[1]["short"]
    assert first == second, "the processes disagree"
    assert first["switch_reason"] == "cap" and first["tests"] == []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    single = AutoWU(optimizer, total_steps=SHORT_TOTAL, immediate_cooldown=True, rewind=False)
    lrs = []
    for step in range(SHORT_TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        single.step((local_loss(0, step, lrs[-1]) + local_loss(1, step, lrs[-1])) / 2)
    assert lrs == first["lrs"]
    # each process alone would choose from its own noise: the mean's lowest loss is what both used
    warmup = SHORT_TOTAL // 2
    lowest = min(range(warmup), key=lambda i: first["losses"][i])
    assert first["peak_lr"] == pytest.approx(max((first["lrs"][lowest - 1] if lowest else 1e-5) / 10, 1e-5), rel=1e-12)


@pytest.mark.multiprocess
def test_a_loss_that_never_falls_decays_from_min_lr_on_both(ranks):
    """Each process's loss is its own noise around its own level: the mean never falls nor blows up, warmup reaches its
    cap on both, and both decay from `min_lr`, not from the GP's lowest point of that noise (which one process alone,
    fed the same mean, may place anywhere on the ramp)."""
    first, second = ranks[0]["flat"], ranks[1]["flat"]
    assert first == second, "the processes disagree"
    assert first["switch_reason"] == "cap" and first["switch_step"] == FLAT_TOTAL // 2
    assert first["peak_lr"] == 1e-5
    assert first["lrs"][FLAT_TOTAL // 2] == pytest.approx(1e-5, rel=1e-12)


@pytest.fixture(scope="module")
def fault_cases(tmp_path_factory):
    return torchrun_ranks(
        "fault_resume_two_processes.py", tmp_path_factory.mktemp("fault_resume_two_processes"), SCRIPTS, timeout=300
    )


@pytest.mark.multiprocess
def test_random_faults_on_either_process_never_split_the_lr_and_resume_exactly(fault_cases):
    """Seeded random cases (budgets, presets, faults on either process, a save at a random step): both processes
    apply the same finite, non-negative LR at every step, decide alike, and the run saved from the main process and
    resumed on both goes on exactly like the uninterrupted one, LRs and weights bit for bit."""
    first, second = fault_cases
    assert first.keys() == second.keys() and len(first) == 8
    reasons = set()
    for case in first:
        a, b = first[case], second[case]
        assert a["uninterrupted"] == b["uninterrupted"], f"case {case}: the processes' LRs differ"
        assert all(math.isfinite(lr) and lr >= 0.0 for lr in a["uninterrupted"])
        assert a["decision"] == b["decision"]
        for rank in (a, b):
            assert rank["resumed"] == rank["uninterrupted"], f"case {case}: resuming at {rank['stop']} changed the LRs"
            assert rank["resumed_decision"] == rank["decision"]
            assert rank["resumed_weights"] == rank["weights"], f"case {case}: resumed weights differ"
        reasons.add(a["decision"][1])
    assert {"divergence", "cap"} <= reasons, "the cases must reach a blow-up and a cap"
