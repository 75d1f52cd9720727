"""Two processes (torchrun, gloo) drive one AutoWU each with different local losses: one of them NaN once (spike
watch off), or both blowing up between two switch tests (spike watch on); and the first run saved between two tests
from the main process's state, as `accelerator.register_for_checkpointing` saves it, then resumed on both; saved
with `hf_autowu.register_for_checkpointing` and with `hf_autowu.save_scheduler_state` (then resumed from the main
process's file on both); and a 30-step budget, too short for a switch test; and a loss that never moves, to the
cap. And a small model trained alike on both with AutoWU's defaults, whose loss and gradients turn NaN once on one
process only: warmup goes on from the main process's snapshot, on both. And a model under DDP that one update wrecks
between two switch tests, with the steps at which AutoWU calls a collective.

Run with `torchrun --standalone --nproc_per_node 2 scheduler_two_processes.py OUT_DIR`; writes the LR of every
step and the decisions to `OUT_DIR/rank{rank}.json` for `tests/test_scheduler_multiprocess.py`.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from collective_counter import CollectiveCounter
from process_exit import leave

from hf_autowu import AutoWU, load_scheduler_state, register_for_checkpointing, save_scheduler_state
from hf_autowu.distributed import MeanInFlight, mean_over_processes

TOTAL = 240
NAN_STEP = 37
SPIKE_STEP, SPIKE_INTERVAL = 61, 20  # between the switch tests at steps 60 and 80
SAVE_STEP = 15  # before the first switch test (step 20): each process holds 15 losses of its own, not averaged
RELAY_SAVE_STEP = 16  # the spike watch's relay of steps 13-16 is under way (started at step 16, read at 17)
NAN_OPTIONS = {"divergence_guard": False, "spike_watch": False}
RETRY_STEP = 10  # the model's loss and gradients are NaN at this step on rank 1 only
SHORT_TOTAL = 30  # warmup capped at 15 steps, before any switch test: the LR comes from the range test's rule
FLAT_TOTAL = 300  # a loss that never moves reaches the cap at step 150
DAMAGE_AT, DAMAGE_INTERVAL = 120, 50  # one update under DDP wrecks the weights between the tests at 100 and 150


def local_loss(rank: int, step: int, lr: float) -> float:
    """A valley in log-LR around 3e-3, with noise and an offset that differ per process; NaN once on rank 1."""
    if rank == 1 and step == NAN_STEP:
        return math.nan
    g = torch.Generator().manual_seed(1000 * rank + step)
    return 1.0 + rank + 0.5 * math.log10(lr / 3e-3) ** 2 + 0.05 * float(torch.randn((), generator=g))


def blown_up_loss(rank: int, step: int) -> float:
    """A falling loss, different per process, that blows up on both (by different amounts) from `SPIKE_STEP`."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    base = 1.0 + 2.0 * math.exp(-step / 15) + 0.02 * float(torch.randn((), generator=g))
    return base * (30.0 + 10 * rank if step >= SPIKE_STEP else 1.0)


def flat_loss(rank: int, step: int) -> float:
    """Noise around a level that differs per process and never moves: a loss that carries no signal of the LR."""
    g = torch.Generator().manual_seed(1000 * rank + step + 10**6)
    return 1.0 + rank + 0.05 * float(torch.randn((), generator=g))


def build(total: int = TOTAL, **options) -> tuple[torch.optim.Optimizer, AutoWU]:
    """A one-parameter SGD and AutoWU on it, straight to cooldown at the switch, without rewind."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return optimizer, AutoWU(optimizer, total_steps=total, immediate_cooldown=True, rewind=False, **options)


def run(rank: int, losses, total: int = TOTAL, **options) -> dict:
    optimizer, scheduler = build(total, **options)
    lrs = []
    for step in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(torch.tensor(losses(step, lrs[-1])))
    return {
        "lrs": lrs,
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "tests": [record.step for record in scheduler.tests],
        "losses": [v if math.isfinite(v) else None for v in scheduler.losses.tolist()],
    }


def resumed_run(losses, save_step: int, resume, **options) -> list[float]:
    """`run`'s loop (with `options`) in which, before step `save_step`, `resume(scheduler)` saves the scheduler and
    returns the optimizer and scheduler the run goes on with. The LR of every step."""
    optimizer, scheduler = build(**options)
    lrs = []
    for step in range(TOTAL):
        if step == save_step:
            optimizer, scheduler = resume(scheduler)
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(torch.tensor(losses(step, lrs[-1])))
    return lrs


def saved_and_resumed(rank: int, losses) -> dict:
    """`run` under `NAN_OPTIONS`, saved at `SAVE_STEP` from the main process's `state_dict()` (after
    `sync_pending_losses()` on every process) and loaded into a new scheduler on both; with how many warnings
    `state_dict()` gave before and after the sync."""
    result = {}

    def resume(scheduler: AutoWU) -> tuple[torch.optim.Optimizer, AutoWU]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scheduler.state_dict()
            result["warnings_unsynced"] = len(caught)
            scheduler.sync_pending_losses()
            state = [scheduler.state_dict()]
            result["warnings_synced"] = len(caught) - result["warnings_unsynced"]
        dist.broadcast_object_list(state, src=0)
        optimizer, scheduler = build(**NAN_OPTIONS)
        scheduler.load_state_dict(state[0])
        return optimizer, scheduler

    return result | {"lrs": resumed_run(losses, SAVE_STEP, resume, **NAN_OPTIONS)}


def saved_by_hand(rank: int, losses, folder: Path) -> dict:
    """`run` under `NAN_OPTIONS`, saved at `SAVE_STEP` by `hf_autowu.save_scheduler_state` on both processes (no
    explicit sync); process 1's file is then removed, so that `load_scheduler_state` gives it the main process's (as
    in a resume with fewer processes), and both go on in new schedulers. With the files each process loaded."""
    result = {}

    def resume(scheduler: AutoWU) -> tuple[torch.optim.Optimizer, AutoWU]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = save_scheduler_state(scheduler, folder)
        result.update(written=written.name, warnings=[str(w.message) for w in caught if "AutoWU" in str(w.message)])
        dist.barrier()
        if rank == 1:
            written.unlink()
        dist.barrier()
        optimizer, scheduler = build(**NAN_OPTIONS)
        result["loaded"] = load_scheduler_state(scheduler, folder).name
        return optimizer, scheduler

    return result | {"lrs": resumed_run(losses, SAVE_STEP, resume, **NAN_OPTIONS)}


def saved_with_accelerate(rank: int, losses, folder: Path) -> dict:
    """`run` under `NAN_OPTIONS`, saved at `SAVE_STEP` by `accelerator.save_state` with
    `hf_autowu.register_for_checkpointing` (no explicit sync) and resumed into a new scheduler with `load_state` on
    both; with the losses each process held before the save, the warnings, and the history the main process saved."""
    result = {}

    def registered(scheduler: AutoWU) -> Accelerator:
        accelerator = Accelerator(cpu=True)
        register_for_checkpointing(accelerator, scheduler)
        return accelerator

    def resume(scheduler: AutoWU) -> tuple[torch.optim.Optimizer, AutoWU]:
        result["pending_before_save"] = len(scheduler._pending)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registered(scheduler).save_state(str(folder))
        result["warnings"] = [str(w.message) for w in caught if "AutoWU" in str(w.message)]
        dist.barrier()  # the main process's file is written before any process reads it
        optimizer, scheduler = build(**NAN_OPTIONS)
        registered(scheduler).load_state(str(folder))
        return optimizer, scheduler

    result["lrs"] = resumed_run(losses, SAVE_STEP, resume, **NAN_OPTIONS)
    saved = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)
    return result | {
        "saved_history": saved["history"].tolist(),
        "own_file": (folder / f"autowu_rank{rank}.pt").exists(),
    }


def saved_mid_relay(rank: int, losses) -> dict:
    """`run` with the defaults (spike watch on), saved after `RELAY_SAVE_STEP` steps, while the relay started at that
    step is under way, from `state_dict()` called on the main process alone and without `sync_pending_losses()` (a
    collective there would hang), then loaded into a new scheduler on both."""
    result = {"warnings": 0}

    def resume(scheduler: AutoWU) -> tuple[torch.optim.Optimizer, AutoWU]:
        result["in_flight"] = scheduler._relay is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = [scheduler.state_dict() if rank == 0 else None]
        result["warnings"] = len(caught)
        dist.broadcast_object_list(state, src=0)
        optimizer, scheduler = build()
        scheduler.load_state_dict(state[0])
        result["pending"] = state[0]["pending"].tolist()
        return optimizer, scheduler

    return result | {"lrs": resumed_run(losses, RELAY_SAVE_STEP, resume)}


def retried_run(rank: int) -> dict:
    """A linear model trained with AdamW and AutoWU's defaults (rewind included), the same data on both processes;
    rank 1's loss and gradients are NaN at `RETRY_STEP` (its weights turn NaN). What each process ends with."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=TOTAL, model=model)
    lrs = []
    for step in range(TOTAL):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(32, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        if rank == 1 and step == RETRY_STEP:
            loss = loss * math.nan
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(loss.detach())
    return {
        "lrs": lrs,
        "retried": scheduler.retried,
        "switch_reason": scheduler.switch_reason,
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
    }


def damaged_ddp_run(rank: int) -> dict:
    """A linear regression under DDP (each process its own batches) with SGD and AutoWU's defaults (rewind included);
    at step `DAMAGE_AT` rank 1's gradient is multiplied by 1e4, so that one averaged update wrecks the weights of
    both and every later loss is huge, between the switch tests at steps 100 and 150. Records the losses, weights,
    decisions, the steps at which rewind took a snapshot, and those at which AutoWU called a collective of
    `torch.distributed`."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = AutoWU(
        optimizer, total_steps=2000, test_interval=DAMAGE_INTERVAL, min_lr=1e-3, max_lr=1e3, model=model
    )
    losses, weights, snapshot_steps = [], [], []
    counter = CollectiveCounter(lambda: scheduler.last_step, ("all_reduce", "broadcast", "broadcast_object_list"))
    try:
        for step in range(300):
            g = torch.Generator().manual_seed(10 * step + rank)
            x = torch.randn(64, 8, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), x @ torch.linspace(-1, 1, 8).unsqueeze(1))
            (loss * (1e4 if step == DAMAGE_AT and rank == 1 else 1.0)).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step(loss.detach())
            losses.append(loss.item())
            weights.append(model.module.weight.detach().flatten().tolist())
            snapshots = scheduler.rewinder.snapshots
            if snapshots and snapshots[-1]["step"] == scheduler.last_step:
                snapshot_steps.append(scheduler.last_step)
    finally:
        counter.remove()
    rewound = scheduler.rewinder.rewound_to
    return {
        "losses": losses,
        "weights": weights,
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "lr_at_damage": scheduler.lr_at(DAMAGE_AT),
        "tests": [record.step for record in scheduler.tests],
        "rewound_step": None if rewound is None else rewound["step"],
        "collective_steps": counter.steps,
        "snapshot_steps": snapshot_steps,
    }


def gathered_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of both processes' `values` computed here from their gathered copies, float64: with two processes a
    sum in any order is one rounding, so this is what a reduction must give bit for bit."""
    gathered = [torch.empty(values.shape, dtype=torch.float64) for _ in range(2)]
    dist.all_gather(gathered, values.to(torch.float64))
    return (gathered[0] + gathered[1]) / 2


def means_in_flight(rank: int) -> dict:
    """`MeanInFlight`, and `mean_over_processes` (the same waited for at once), against the mean of the gathered
    values (float32 and float64, several lengths), with an ordinary collective issued between the start and the wait,
    as a training step would."""
    equal = []
    for length in (1, 3, 4, 17):
        for dtype in (torch.float32, torch.float64):
            values = torch.randn(length, generator=torch.Generator().manual_seed(100 * rank + length), dtype=dtype)
            expected = gathered_mean(values)
            in_flight = MeanInFlight(values.clone())
            dist.all_reduce(torch.ones(2))  # another collective before the wait (a DDP step's, say)
            equal.append(torch.equal(in_flight.wait(), expected))
            equal.append(torch.equal(mean_over_processes(values.clone()), expected))
    return {"equal": equal}


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "nan": run(rank, lambda step, lr: local_loss(rank, step, lr), **NAN_OPTIONS),
        "resumed": saved_and_resumed(rank, lambda step, lr: local_loss(rank, step, lr)),
        "watched": run(rank, lambda step, lr: local_loss(rank, step, lr)),
        "accelerate": saved_with_accelerate(
            rank, lambda step, lr: local_loss(rank, step, lr), Path(sys.argv[1], "accelerate_checkpoint")
        ),
        "by_hand": saved_by_hand(rank, lambda step, lr: local_loss(rank, step, lr), Path(sys.argv[1], "by_hand")),
        "resumed_mid_relay": saved_mid_relay(rank, lambda step, lr: local_loss(rank, step, lr)),
        "spike": run(rank, lambda step, lr: blown_up_loss(rank, step), test_interval=SPIKE_INTERVAL),
        "retried": retried_run(rank),
        "short": run(rank, lambda step, lr: local_loss(rank, step, lr), total=SHORT_TOTAL),
        "flat": run(rank, lambda step, lr: flat_loss(rank, step), total=FLAT_TOTAL),
        "damaged": damaged_ddp_run(rank),
        "in_flight": means_in_flight(rank),
    }
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
