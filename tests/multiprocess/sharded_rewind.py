"""Rewind with sharded (FSDP2, FSDP1) and replicated (DDP) state in two processes, for `tests/test_fsdp_rewind.py`.

Run with `torchrun --standalone --nproc_per_node 2 tests/multiprocess/sharded_rewind.py OUT_DIR`. For each layout,
a hand-written loop drives `AutoWU(optimizer, total_steps=TOTAL)` with its defaults (rewind on) over per-process
data, and each process writes `OUT_DIR/{run}_rank{rank}.pt`: the LR of every step, this process's local shards
(parameters and optimizer state) after every step, and the rewind bookkeeping. Runs:

- `{layout}`: uninterrupted; it also saves a checkpoint after `RESUME_AT` steps (late warmup, after the snapshot
  the switch restores): model and optimizer with `torch.distributed.checkpoint` (FSDP2) or each process's local
  tensors (FSDP1, DDP), and each process's scheduler state, which holds its own rewind snapshots
  (`hf_autowu.save_scheduler_state`);
- `{layout}-resumed`: rebuilt from another initialisation, loaded from that checkpoint
  (`hf_autowu.load_scheduler_state`), continued to the end;
- `{layout}-accelerate` and `{layout}-accelerate-resumed`: the same two runs with AutoWU's state saved and loaded by
  `accelerator.save_state`/`load_state` (`hf_autowu.register_for_checkpointing`);
- `{layout}-resumed-main`: the same, but every process loads the main process's `scheduler.state_dict()`, as
  `accelerator.register_for_checkpointing(scheduler)` does (with AutoWU's warnings);
- `{layout}-kept`: `rewind_min_shift=1e9`, so the switch keeps the state it reached (and records the shift);
- `{layout}-poisoned` (sharded layouts): a NaN sits in process 1's local shard only while the snapshot the
  uninterrupted run restored is taken, so only process 1's copy of it is non-finite;
- `{layout}-nan` (sharded layouts): process 1's loss is NaN once, and the NaN reaches every shard.

`--hidden` sets the model's width, `--layouts` a subset; with `--memory-only` only the uninterrupted runs are made
and each process prints its rewind memory as one JSON line (for the memory figures of the documentation):

    cd tests/multiprocess && torchrun --standalone --nproc_per_node 2 sharded_rewind.py /tmp/mem --hidden 1024 \
        --memory-only --layouts ddp,fsdp2
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from process_exit import leave
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from hf_autowu import AutoWU, load_scheduler_state, register_for_checkpointing, save_scheduler_state
from hf_autowu.process_files import SCHEDULER_STATE_FILE
from hf_autowu.rewind import sharding_of

TOTAL = 200
RESUME_AT = 70
NAN_LOSS_AT = 60
DIM = 8
LAYOUTS = ("fsdp2", "fsdp1", "ddp")


def make_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def wrap(layout: str, model: nn.Module) -> nn.Module:
    """The model as `layout` trains it (gloo, CPU)."""
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for index in (0, 2, 4):
            fully_shard(model[index], mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    return nn.parallel.DistributedDataParallel(model)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's batch of optimizer step `step`: a fixed teacher, different samples on every process."""
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    x = torch.randn(32, DIM, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor` (the local shard of a DTensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_state(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Copies of this process's parameter shards and their optimizer state, in the optimizer's order."""
    result = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            tensors = [local(p)] + [local(state[k]) for k in sorted(state) if isinstance(state[k], torch.Tensor)]
            result.append([t.detach().clone() for t in tensors])
    return result


def switch_record(scheduler: AutoWU) -> dict[str, Any]:
    """The scheduler's switch and its rewinder's bookkeeping, as every run records them."""
    rewinder = scheduler.rewinder
    return {
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "retried": scheduler.retried,
        "rewound_to": rewinder.rewound_to,
        "kept": rewinder.kept,
        "enabled": rewinder.enabled,
        "disabled_reason": rewinder.disabled_reason,
        "mode": rewinder.mode,
        "holds_snapshots": rewinder.holds_snapshots,
        "planned_bytes": rewinder.planned_bytes,
    }


def nbytes(tensors: list[list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for row in tensors for t in row)


class Run:
    """A model, AdamW and AutoWU with its defaults, stepped by hand; records what the tests compare."""

    def __init__(self, layout: str, hidden: int, seed: int = 0, accelerate: bool = False, **options: Any):
        self.layout = layout
        self.model = wrap(layout, make_model(hidden, seed))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1.0)
        self.scheduler = AutoWU(self.optimizer, total_steps=TOTAL, **options)
        self.accelerator = None
        if accelerate:  # checkpoints through Accelerate's `save_state`/`load_state` (it prepares nothing here)
            self.accelerator = Accelerator(cpu=True)
            register_for_checkpointing(self.accelerator, self.scheduler)
        self.record: dict[str, Any] = {
            "sharding": sharding_of(self.optimizer, self.model),
            "lrs": {},
            "states": {},
            "memory_bytes": {},
            "snapshot_steps": [],
            "held_before_switch": [],
        }

    def train(
        self,
        start: int,
        stop: int,
        save_at: tuple[int, Path] | None = None,
        poison_snapshot_at: int | None = None,
        nan_loss_at: int | None = None,
    ) -> None:
        """Optimizer steps `start` to `stop - 1`. `save_at=(step, folder)`: save after that many steps.
        `poison_snapshot_at`: on process 1, a NaN in its local shard while the scheduler takes that step's
        snapshot (undone right after, so that training goes on as without it). `nan_loss_at`: process 1's loss of
        that step (0-based) is NaN, so the NaN reaches every shard through the gradients. The poisoned and NaN
        runs stop 3 steps after the switch."""
        rewinder = self.scheduler.rewinder
        rank = dist.get_rank()
        for step in range(start, stop):
            x, y = batch(step)
            loss = nn.functional.mse_loss(self.model(x), y)
            if step == nan_loss_at and rank == 1:
                loss = loss * math.nan
            loss.backward()
            self.record["lrs"][step] = self.optimizer.param_groups[0]["lr"]
            if self.scheduler.phase == "warmup":  # what this process holds (its own finite flags) before the switch
                self.record["held_before_switch"] = [(s["step"], s["lr"], s["finite"]) for s in rewinder.snapshots]
            self.optimizer.step()
            self.optimizer.zero_grad()
            poisoned = None
            if step + 1 == poison_snapshot_at and rank == 1:
                poisoned = next(local(p) for p in self.optimizer.param_groups[0]["params"] if local(p).numel())
                kept = poisoned.view(-1)[0].item()
                with torch.no_grad():
                    poisoned.view(-1)[0] = math.nan
            self.scheduler.step(loss.detach())
            if poisoned is not None:
                with torch.no_grad():
                    poisoned.view(-1)[0] = kept
            # after `step + 1` optimizer steps (and, at the switch, the rewind)
            self.record["states"][step + 1] = local_state(self.optimizer)
            self.record["memory_bytes"][step + 1] = rewinder.memory_bytes
            if rewinder.snapshots and rewinder.snapshots[-1]["step"] == step + 1:
                self.record["snapshot_steps"].append(step + 1)
            if save_at is not None and step + 1 == save_at[0]:
                self.save(save_at[1])
            switch = self.scheduler.switch_step
            if (poison_snapshot_at or nan_loss_at) and switch is not None and step + 1 >= switch + 3:
                break

    def finish(self) -> dict[str, Any]:
        self.record.update(switch_record(self.scheduler), local_bytes=nbytes(local_state(self.optimizer)))
        return self.record

    def save(self, folder: Path) -> None:
        """Model and optimizer (FSDP2: with `torch.distributed.checkpoint`; FSDP1 and DDP, whose local parts are
        plain tensors: each process's own), and each process's scheduler state with its rewind snapshots
        (`hf_autowu.save_scheduler_state`; with an accelerator: its `save_state`, in `folder / "accelerate"`)."""
        rank = dist.get_rank()
        if self.layout == "fsdp2":
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            params = [p.detach().clone() for p in self.model.parameters()]
            torch.save({"params": params, "optimizer": self.optimizer.state_dict()}, folder / f"local_rank{rank}.pt")
        if self.accelerator is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.accelerator.save_state(str(folder / "accelerate"))
            self.record["save_warnings"] = [str(w.message) for w in caught if "AutoWU" in str(w.message)]
        else:
            save_scheduler_state(self.scheduler, folder)

    def load(self, folder: Path, scheduler_of: int | None = None) -> None:
        """Model and optimizer as `save` wrote them, and the scheduler state of process `scheduler_of` (by default
        this process's own)."""
        rank = dist.get_rank()
        if self.layout == "fsdp2":
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(state, checkpoint_id=str(folder))
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
            )
        else:
            saved = torch.load(folder / f"local_rank{rank}.pt", weights_only=True)
            with torch.no_grad():
                for p, value in zip(self.model.parameters(), saved["params"], strict=True):
                    p.copy_(value)
            self.optimizer.load_state_dict(saved["optimizer"])
        if self.accelerator is not None:
            self.accelerator.load_state(str(folder / "accelerate"))
            return
        if scheduler_of is None:
            self.record["scheduler_file"] = load_scheduler_state(self.scheduler, folder).name
        else:
            main_file = folder / SCHEDULER_STATE_FILE.format(rank=scheduler_of)
            self.scheduler.load_state_dict(torch.load(main_file, weights_only=True))


def through_accelerate(layout: str, hidden: int, folder: Path, out_dir: Path) -> None:
    """The uninterrupted run and its resume again, with AutoWU's state in `accelerator.save_state`/`load_state`
    (`hf_autowu.register_for_checkpointing`) instead of a file per process written by hand."""
    rank = dist.get_rank()
    full = Run(layout, hidden, accelerate=True)
    full.train(0, TOTAL, save_at=(RESUME_AT, folder))
    torch.save(full.finish(), out_dir / f"{layout}-accelerate_rank{rank}.pt")
    dist.barrier()
    resumed = Run(layout, hidden, seed=123, accelerate=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load(folder)
        resumed.train(RESUME_AT, TOTAL)
    record = resumed.finish()
    record["warnings"] = [str(w.message) for w in caught if "AutoWU" in str(w.message)]
    torch.save(record, out_dir / f"{layout}-accelerate-resumed_rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for layout in args.layouts.split(","):
        folder = args.out_dir / f"{layout}-checkpoint"
        full = Run(layout, args.hidden)
        full.train(0, TOTAL, save_at=None if args.memory_only else (RESUME_AT, folder))
        record = full.finish()
        torch.save(record, args.out_dir / f"{layout}_rank{rank}.pt")
        if args.memory_only:
            summary = {
                "layout": layout,
                "rank": rank,
                "peak_memory_bytes": max(record["memory_bytes"].values()),
                "planned_bytes": record["planned_bytes"],
                "local_model_and_optimizer_bytes": record["local_bytes"],
            }
            print(json.dumps(summary), flush=True)
            continue
        dist.barrier()
        resumed = Run(layout, args.hidden, seed=123)  # a different initialisation: all must come from the checkpoint
        resumed.load(folder)
        resumed.train(RESUME_AT, TOTAL)
        torch.save(resumed.finish(), args.out_dir / f"{layout}-resumed_rank{rank}.pt")
        through_accelerate(layout, args.hidden, args.out_dir / f"{layout}-accelerate-checkpoint", args.out_dir)
        kept = Run(layout, args.hidden, rewind_min_shift=1e9)  # a threshold no run reaches: nothing is restored
        kept.train(0, TOTAL)
        torch.save(kept.finish(), args.out_dir / f"{layout}-kept_rank{rank}.pt")
        main_state = Run(layout, args.hidden, seed=123)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main_state.load(folder, scheduler_of=0)
            main_state.train(RESUME_AT, TOTAL)
        main_record = main_state.finish()
        main_record["warnings"] = [str(w.message) for w in caught if "AutoWU rewind" in str(w.message)]
        torch.save(main_record, args.out_dir / f"{layout}-resumed-main_rank{rank}.pt")
        if layout == "ddp":
            continue
        poisoned = Run(layout, args.hidden)
        poisoned.train(0, TOTAL, poison_snapshot_at=record["rewound_to"]["step"])  # the snapshot the clean run took
        torch.save(poisoned.finish(), args.out_dir / f"{layout}-poisoned_rank{rank}.pt")
        nan = Run(layout, args.hidden)
        nan.train(0, TOTAL, nan_loss_at=NAN_LOSS_AT)
        torch.save(nan.finish(), args.out_dir / f"{layout}-nan_rank{rank}.pt")
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
