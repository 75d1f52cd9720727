"""Rewind across two processes (torchrun, gloo on CPU) with a hand-written loop and AutoWU's defaults: sharded
state (FSDP2 `fully_shard`, FSDP1 with `use_orig_params`), where every process snapshots and restores its own
shards, and replicated state (DDP), where only the main process holds snapshots and broadcasts the one it restores.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import same_tensors, torchrun

SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from sharded_rewind import DIM, NAN_LOSS_AT, RESUME_AT, TOTAL, make_model  # noqa: E402

pytestmark = pytest.mark.multiprocess

SHARDED = ("fsdp2", "fsdp1")
LAYOUTS = (*SHARDED, "ddp")
RUNS = [*LAYOUTS, *(f"{layout}-{kind}" for layout in SHARDED for kind in ("poisoned", "nan"))]
SNAPSHOTS = 3  # AutoWU's default `rewind_snapshots`


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_rewind")
    torchrun("sharded_rewind.py", str(out), cwd=str(SCRIPTS))
    return lambda run: [torch.load(out / f"{run}_rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def full_state_bytes() -> tuple[int, int]:
    """Bytes of the unsharded model's parameters and AdamW's two moments, and the number of parameter tensors."""
    params = list(make_model(32, 0).parameters())
    assert params[0].shape[1] == DIM
    return 3 * sum(p.numel() * p.element_size() for p in params), len(params)


def test_layouts_are_classified(load):
    for layout, expected in (("fsdp2", "sharded"), ("fsdp1", "sharded"), ("ddp", "replicated")):
        for record in load(layout):
            assert record["sharding"] == record["mode"] == expected, layout


@pytest.mark.parametrize("run", RUNS)
def test_every_process_applies_the_same_lr(load, run):
    first, second = load(run)
    assert first["lrs"] == second["lrs"] and len(first["lrs"]) > 60
    assert first["switch_step"] == second["switch_step"] is not None
    assert first["peak_lr"] == second["peak_lr"] and first["rewound_to"] == second["rewound_to"] is not None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rewind_restores_every_shard_bit_for_bit(load, layout):
    """Right after the switch each process's local shards (parameters and optimizer state) are exactly those it
    had after the snapshot's step; with DDP that includes process 1, which holds no snapshot."""
    for record in load(layout):
        switch, target = record["switch_step"], record["rewound_to"]
        assert target["step"] in record["snapshot_steps"] and target["lr"] <= record["peak_lr"]
        assert target["step"] < switch - 1
        assert same_tensors(record["states"][switch], record["states"][target["step"]])
        before, after = ([t for row in record["states"][step] for t in row] for step in (switch - 1, switch))
        assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "the rewind changed nothing"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_from_saved_per_process_state_is_exact(load, layout):
    """Saved late in warmup, after the snapshot the switch restores: it must come back from each process's own file
    (`hf_autowu.save_scheduler_state` / `load_scheduler_state`), and the resumed run gives the uninterrupted run's LRs
    and final shards bit for bit."""
    for rank, (full, resumed) in enumerate(zip(load(layout), load(f"{layout}-resumed"), strict=True)):
        assert resumed["scheduler_file"] == f"autowu_rank{rank}.pt"
        assert full["snapshot_steps"][0] < RESUME_AT < full["switch_step"]
        assert full["rewound_to"]["step"] < RESUME_AT and full["rewound_to"]["step"] not in resumed["snapshot_steps"]
        assert sorted(resumed["lrs"]) == list(range(RESUME_AT, TOTAL))
        assert resumed["lrs"] == {step: lr for step, lr in full["lrs"].items() if step >= RESUME_AT}
        assert resumed["rewound_to"] == full["rewound_to"] and resumed["switch_step"] == full["switch_step"]
        assert same_tensors(resumed["states"][TOTAL], full["states"][TOTAL])
        assert same_tensors(resumed["states"][full["switch_step"]], full["states"][full["rewound_to"]["step"]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_accelerate_checkpoints_resume_every_process_exactly(load, layout):
    """`hf_autowu.register_for_checkpointing(accelerator, scheduler)`: `accelerator.save_state` keeps each process's
    own AutoWU state (saving changes nothing in the run, and says nothing), and after `load_state` each process
    restores its own snapshot at the switch: the resumed run gives the uninterrupted run's LRs and final shards bit
    for bit, with no warning. (The losses are averaged at every step here, so pending losses are checked in
    `tests/test_scheduler_multiprocess.py`.)"""
    for full, saved, resumed in zip(
        load(layout), load(f"{layout}-accelerate"), load(f"{layout}-accelerate-resumed"), strict=True
    ):
        assert saved["save_warnings"] == []
        assert saved["lrs"] == full["lrs"] and same_tensors(saved["states"][TOTAL], full["states"][TOTAL])
        assert full["rewound_to"]["step"] < RESUME_AT < full["switch_step"]
        assert resumed["warnings"] == []
        assert resumed["lrs"] == {step: lr for step, lr in full["lrs"].items() if step >= RESUME_AT}
        assert resumed["rewound_to"] == full["rewound_to"] and resumed["switch_step"] == full["switch_step"]
        assert same_tensors(resumed["states"][full["switch_step"]], full["states"][full["rewound_to"]["step"]])
        assert same_tensors(resumed["states"][TOTAL], full["states"][TOTAL])


@pytest.mark.parametrize("layout", SHARDED)
def test_another_processs_snapshots_are_never_restored(load, layout):
    """Every process loads the main process's scheduler state (as `accelerator.register_for_checkpointing` does):
    process 1's copy holds process 0's shards. No process restores (restoring on one only would mix steps), the main
    process says so once, and the run goes on as one whose switch restores nothing: the LRs and the final shards
    are those of the uninterrupted `rewind_min_shift=1e9` run, bit for bit."""
    for rank, (full, kept, resumed) in enumerate(
        zip(load(layout), load(f"{layout}-kept"), load(f"{layout}-resumed-main"), strict=True)
    ):
        assert full["rewound_to"]["step"] < RESUME_AT < full["switch_step"] and kept["rewound_to"] is None
        assert resumed["switch_step"] == full["switch_step"] and resumed["rewound_to"] is None
        assert resumed["lrs"] == {step: lr for step, lr in kept["lrs"].items() if step >= RESUME_AT}
        assert same_tensors(resumed["states"][TOTAL], kept["states"][TOTAL])
        expected = ["another process's state"] if rank == 0 else []
        assert [w for w in expected if any(w in message for message in resumed["warnings"])] == expected
        assert len(resumed["warnings"]) == len(expected)


def test_with_replicated_state_the_main_processs_scheduler_state_resumes_every_process_exactly(load):
    """DDP: only the main process holds snapshots, so its state, loaded on every process, resumes exactly."""
    for full, resumed in zip(load("ddp"), load("ddp-resumed-main"), strict=True):
        assert resumed["warnings"] == [] and resumed["rewound_to"] == full["rewound_to"] is not None
        assert resumed["lrs"] == {step: lr for step, lr in full["lrs"].items() if step >= RESUME_AT}
        assert same_tensors(resumed["states"][TOTAL], full["states"][TOTAL])


@pytest.mark.parametrize("layout", SHARDED)
def test_each_process_holds_snapshots_of_its_own_shard(load, layout):
    full_bytes, tensors = full_state_bytes()
    records = load(layout)
    # each process's shard is about half of the state (plus AdamW's 4-byte step counters), not all of it
    assert full_bytes <= sum(r["local_bytes"] for r in records) <= full_bytes + 2 * 4 * tensors
    for record in records:
        assert record["holds_snapshots"] and record["local_bytes"] < 0.55 * full_bytes
        assert max(record["memory_bytes"].values()) == SNAPSHOTS * record["local_bytes"]
        # the budget counts every process of the node as a holder of a shard of this size
        assert record["planned_bytes"] == SNAPSHOTS * record["local_bytes"] * 2


def test_ddp_keeps_one_snapshot_set_in_the_job(load):
    full_bytes, tensors = full_state_bytes()
    main, other = load("ddp")
    assert main["local_bytes"] == other["local_bytes"] == full_bytes + 4 * tensors  # every replica: everything
    assert main["holds_snapshots"] and not other["holds_snapshots"]
    assert max(main["memory_bytes"].values()) == main["planned_bytes"] == SNAPSHOTS * main["local_bytes"]
    assert set(other["memory_bytes"].values()) == {0} and other["planned_bytes"] == 0
    # both restored the main process's snapshot: the same state after the switch, and the same final weights
    assert same_tensors(main["states"][main["switch_step"]], other["states"][other["switch_step"]])
    assert same_tensors(main["states"][TOTAL], other["states"][TOTAL])


@pytest.mark.parametrize("layout", SHARDED)
def test_a_snapshot_non_finite_on_one_process_is_skipped_by_all(load, layout):
    """Process 1's copy of the snapshot the clean run restored holds a NaN; process 0's is finite. Alone, process 0
    would restore it: both must skip it, restore the same other snapshot, and go on finite."""
    clean = load(layout)[0]
    first, second = load(f"{layout}-poisoned")
    poisoned = clean["rewound_to"]["step"]
    assert (poisoned, clean["rewound_to"]["lr"], True) in first["held_before_switch"]
    assert (poisoned, clean["rewound_to"]["lr"], False) in second["held_before_switch"]
    alone = [step for step, lr, finite in first["held_before_switch"] if finite and lr <= first["peak_lr"]]
    assert alone[-1] == poisoned, "without agreeing, process 0 would restore the poisoned snapshot"
    assert first["rewound_to"] == second["rewound_to"] and first["rewound_to"]["step"] != poisoned
    for record in (first, second):
        assert same_tensors(record["states"][record["switch_step"]], record["states"][record["rewound_to"]["step"]])
        assert all(bool(torch.isfinite(t).all()) for row in record["states"][max(record["states"])] for t in row)


@pytest.mark.parametrize("layout", SHARDED)
def test_nan_loss_on_one_process(load, layout):
    """Process 1's loss is NaN once, and the NaN reaches every shard through the gradients. Both retry at the same
    step (warmup goes on): each restores its shards of the same snapshot, taken before the NaN, bit for bit; they
    switch at the same step and go on finite."""
    first, second = load(f"{layout}-nan")
    assert first["retried"] == second["retried"] is not None
    assert first["switch_step"] == second["switch_step"] and first["switch_reason"] == second["switch_reason"]
    retried = first["retried"]
    assert retried["loss_index"] == NAN_LOSS_AT and retried["restored_step"] < NAN_LOSS_AT < retried["step"]
    assert first["switch_step"] > retried["step"]
    for record in (first, second):
        last = max(record["states"])
        assert math.isfinite(record["lrs"][last - 1])
        assert same_tensors(record["states"][retried["step"]], record["states"][retried["restored_step"]])
        assert same_tensors(record["states"][record["switch_step"]], record["states"][record["rewound_to"]["step"]])
        assert all(bool(torch.isfinite(t).all()) for row in record["states"][last] for t in row)


def test_the_shift_that_decides_a_rewind_is_the_whole_models_on_every_process(load):
    """With a threshold no run reaches nothing is restored. Every process, in every layout, gets the same shift:
    `||now - snapshot|| / ||snapshot||` over the whole model's parameters, which the test recomputes from the
    processes' recorded local shards (summed over both for the sharded layouts, one replica for DDP)."""
    shifts = {}
    for layout in LAYOUTS:
        records = load(f"{layout}-kept")
        assert records[0]["kept"] == records[1]["kept"] is not None
        assert all(r["rewound_to"] is None for r in records)
        switch, step = records[0]["switch_step"], records[0]["kept"]["step"]
        holders = records if layout in SHARDED else records[:1]
        moved = sum(
            float((a[0].double() - b[0].double()).square().sum())
            for r in holders
            for a, b in zip(r["states"][switch], r["states"][step], strict=True)
        )
        size = sum(float(b[0].double().square().sum()) for r in holders for b in r["states"][step])
        assert records[0]["kept"]["shift"] == pytest.approx(math.sqrt(moved / size), rel=1e-9)
        shifts[layout] = records[0]["kept"]["shift"]
        clean = load(layout)[0]
        assert records[0]["switch_step"] == clean["switch_step"] and records[0]["lrs"] == clean["lrs"]
    assert shifts["fsdp2"] == pytest.approx(shifts["ddp"], rel=1e-5)
    assert shifts["fsdp1"] == pytest.approx(shifts["ddp"], rel=1e-5)
