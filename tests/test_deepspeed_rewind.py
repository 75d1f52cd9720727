"""Rewind with DeepSpeed ZeRO stages 0 to 3 across two processes (torchrun, gloo on CPU), in a hand-written loop
with AutoWU's defaults built on DeepSpeed's optimizer: every process snapshots and restores its own fp32 master
partitions and their AdamW state, and the model's weights are refreshed from them (ZeRO 1 and 2: every parameter
in full on every process; ZeRO 3: each process's partitions and the persistent parameters it keeps gathered).
Without ZeRO (stage 0) the processes are replicas: the main process snapshots, and at the switch broadcasts the
restored masters (fp32, or DeepSpeed's fp32 copies of bf16 weights) before the weights are refreshed. A NaN loss on
one process is rewound on both, and the run ends finite."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import same_tensors, torchrun

pytest.importorskip("deepspeed")
SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from deepspeed_rewind import NAN_LOSS_AT, RESUME_AT, STAGES, TOTAL  # noqa: E402

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_rewind")
    torchrun("deepspeed_rewind.py", str(out), cwd=str(SCRIPTS))
    return lambda run: [torch.load(out / f"{run}_rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.mark.parametrize("stage", STAGES)
def test_every_process_applies_the_same_lr_and_rewinds_to_the_same_snapshot(load, stage):
    first, second = load(f"zero{stage}")
    assert first["optimizer"].startswith("DeepSpeedZeroOptimizer")
    assert first["lrs"] == second["lrs"] and len(first["lrs"]) == TOTAL
    assert first["switch_step"] == second["switch_step"] is not None
    assert first["peak_lr"] == second["peak_lr"] and first["rewound_to"] == second["rewound_to"] is not None
    for record in (first, second):
        assert record["enabled"] and record["mode"] == "sharded" and record["holds_snapshots"]


BIT_FOR_BIT_RUNS = [*(f"zero{stage}" for stage in STAGES), "zero2-bf16", "zero2-offload", "zero3-offload"]


@pytest.mark.parametrize("run", BIT_FOR_BIT_RUNS)
def test_rewind_restores_masters_state_and_weights_bit_for_bit(load, run):
    """Right after the switch each process's master partitions, their AdamW state and the model's weights (bf16
    ones included; with ZeRO-Offload too) are exactly those it had after the snapshot's step; the processes'
    partitions differ, so each restored its own."""
    records = load(run)
    stage = int(run[4])
    dtype = torch.bfloat16 if run.endswith("bf16") else torch.float32
    assert all(weight.dtype == dtype for weight in records[0]["weights"][1])
    for record in records:
        switch, target = record["switch_step"], record["rewound_to"]
        assert target["lr"] <= record["peak_lr"] and target["step"] < switch - 1
        assert same_tensors(record["states"][switch], record["states"][target["step"]])
        assert same_tensors(record["weights"][switch], record["weights"][target["step"]])
        assert not same_tensors(record["states"][switch - 1], record["states"][switch]), "the rewind changed nothing"
    assert not same_tensors(records[0]["states"][1], records[1]["states"][1]), "the processes hold the same partition"
    if stage < 3:  # every process computes with the full weights, the same on each
        switch = records[0]["switch_step"]
        assert same_tensors(records[0]["weights"][switch], records[1]["weights"][switch])


@pytest.mark.parametrize("stage", STAGES)
def test_resume_from_deepspeed_checkpoint_and_scheduler_state_is_exact(load, stage):
    """Saved late in warmup, after the snapshot the switch restores: it comes back from each process's own file in
    the checkpoint's tag folder (`hf_autowu.save_scheduler_state` / `load_scheduler_state`), and the resumed run gives
    the uninterrupted run's LRs and final state bit for bit."""
    for rank, (full, resumed) in enumerate(zip(load(f"zero{stage}"), load(f"zero{stage}-resumed"), strict=True)):
        assert resumed["scheduler_file"] == f"autowu_rank{rank}.pt"
        assert full["rewound_to"]["step"] < RESUME_AT < full["switch_step"]
        assert resumed["rewound_to"] == full["rewound_to"] and resumed["switch_step"] == full["switch_step"]
        assert {k: v for k, v in full["lrs"].items() if k >= RESUME_AT} == resumed["lrs"]
        assert same_tensors(resumed["states"][TOTAL], full["states"][TOTAL])
        assert same_tensors(resumed["weights"][TOTAL], full["weights"][TOTAL])


@pytest.mark.parametrize(("stage", "built_after"), [(2, "zero2"), (3, "zero3"), (0, "zero0")])
def test_autowu_built_before_deepspeed_initialize_rewinds_as_on_deepspeeds_optimizer(load, stage, built_after):
    """AutoWU built on AdamW before `deepspeed.initialize` (as before `accelerator.prepare`), without `model`:
    DeepSpeed replaces AdamW's parameters with its master partitions and wraps AdamW (stage 0 in fp32: its engine
    steps AdamW). Rewind finds the wrapper or the engine and runs as with AutoWU on `engine.optimizer`: no warning,
    and the same LRs, switch, restored snapshot and final state, bit for bit, as the run built after."""
    early, after = load(f"zero{stage}-before-initialize"), load(built_after)
    for record, reference in zip(early, after, strict=True):
        assert record["warnings"] == [] and record["enabled"] and record["disabled_reason"] is None
        assert record["mode"] == reference["mode"] == ("replicated" if stage == 0 else "sharded")
        assert record["lrs"] == reference["lrs"] and record["switch_step"] == reference["switch_step"] is not None
        assert record["rewound_to"] == reference["rewound_to"] is not None
        switch, target = record["switch_step"], record["rewound_to"]["step"]
        assert same_tensors(record["states"][switch], record["states"][target])
        assert same_tensors(record["states"][TOTAL], reference["states"][TOTAL])
        assert same_tensors(record["weights"][TOTAL], reference["weights"][TOTAL])


def test_an_optimizer_that_deepspeed_neither_wraps_nor_steps_turns_rewind_off_with_one_warning(load):
    """While DeepSpeed runs, AutoWU on an AdamW outside it (no `model`): its parameters could be master partitions
    that differ between processes, and treating them as replicas would broadcast one process's over the others'.
    Rewind is off on both processes, said once, on the main process."""
    first, second = load("unrelated")
    for record in (first, second):
        assert not record["enabled"] and "neither wraps nor steps" in record["disabled_reason"]
    assert len(first["warnings"]) == 1 and "rewind is off" in first["warnings"][0] and second["warnings"] == []


@pytest.mark.parametrize("stage", (2, 3))
def test_a_nan_loss_on_one_process_is_retried_and_the_run_ends_finite(load, stage):
    """Process 1's loss is NaN once: DeepSpeed's overflow check skips that update on both (their partitions stay as
    they were), so both retry at the same step without a restore (the state is finite everywhere: one collective
    says so); they switch at the same step, and every LR and every state from the retry to the end is finite."""
    first, second = load(f"zero{stage}-nan")
    assert first["lrs"] == second["lrs"] and all(math.isfinite(lr) and lr >= 0.0 for lr in first["lrs"].values())
    assert first["retried"] == second["retried"] is not None
    assert first["switch_step"] == second["switch_step"] and first["rewound_to"] == second["rewound_to"] is not None
    for record in (first, second):
        retry = record["retried"]["step"]
        assert record["retried"]["loss_index"] == NAN_LOSS_AT < retry and record["retried"]["restored_step"] is None
        assert same_tensors(record["states"][NAN_LOSS_AT + 1], record["states"][NAN_LOSS_AT])  # the update skipped
        after = [t for step in range(retry, TOTAL + 1) for row in record["states"][step] for t in row]
        assert all(bool(torch.isfinite(t).all()) for t in after)
        assert all(bool(torch.isfinite(w).all()) for w in record["weights"][TOTAL])


@pytest.mark.parametrize("run", ["zero0", "zero0-bf16", "zero0-bf16-nan", "zero0-bf16-fused"])
def test_without_zero_the_replicas_rewind_from_the_main_process_and_bf16_weights_from_the_fp32_masters(load, run):
    """ZeRO stage 0: every process holds the whole model. In fp32 the optimizer is AdamW itself (and `model` is the
    engine); in bf16 DeepSpeed's `FP16_UnfusedOptimizer` steps fp32 master weights and copies them into the bf16
    model (with DeepSpeed's FusedAdam, `FP16_Optimizer`: one flat fp32 master per group). Only the main process
    keeps snapshots; at the switch both processes hold the snapshot's masters, AdamW state and weights bit for bit,
    and the same ones (with a NaN loss on process 1 too, whose step DeepSpeed skips: warmup goes on from where it
    is, nothing restored, on both)."""
    records = load(run)
    wrapper = "FP16_Optimizer" if run.endswith("fused") else "FP16_UnfusedOptimizer" if "bf16" in run else "AdamW"
    assert [r["optimizer"] for r in records] == [wrapper] * 2
    assert [(r["enabled"], r["mode"], r["holds_snapshots"]) for r in records] == [
        (True, "replicated", True),
        (True, "replicated", False),
    ]
    first, second = records
    assert first["lrs"] == second["lrs"] and all(math.isfinite(lr) and lr >= 0.0 for lr in first["lrs"].values())
    switch, target = first["switch_step"], first["rewound_to"]
    assert second["switch_step"] == switch and second["rewound_to"] == target is not None
    if run.endswith("nan"):  # DeepSpeed skipped the NaN's update: the state stayed finite, nothing to restore
        retried = first["retried"]
        assert retried == second["retried"] and retried["step"] == NAN_LOSS_AT + 1
        assert retried["loss_index"] == NAN_LOSS_AT and retried["restored_step"] is None
        for record in records:
            assert same_tensors(record["states"][NAN_LOSS_AT + 1], record["states"][NAN_LOSS_AT])
    dtype = torch.bfloat16 if "bf16" in run else torch.float32
    for record in records:
        assert all(weight.dtype == dtype for weight in record["weights"][switch])
        assert same_tensors(record["states"][switch], record["states"][target["step"]])
        assert same_tensors(record["weights"][switch], record["weights"][target["step"]])
        assert not same_tensors(record["states"][switch - 1], record["states"][switch]), "the rewind changed nothing"
    assert same_tensors(first["states"][switch], second["states"][switch])
    assert same_tensors(first["weights"][TOTAL], second["weights"][TOTAL])
    assert all(bool(torch.isfinite(w).all()) for w in first["weights"][TOTAL])
