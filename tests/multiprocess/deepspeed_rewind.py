"""Rewind with DeepSpeed ZeRO in two processes, a hand-written loop, for `tests/test_deepspeed_rewind.py`.

Run with `torchrun --standalone --nproc_per_node 2 tests/multiprocess/deepspeed_rewind.py OUT_DIR`
(`DS_ACCELERATOR=cpu`, gloo). For ZeRO stages 1, 2 and 3, `deepspeed.initialize` wraps AdamW and the loop drives
`AutoWU(engine.optimizer, total_steps=TOTAL, model=engine.module)` with its defaults (rewind on): `engine.backward`,
`engine.step`, `scheduler.step(loss)`, each process on its own data. Each process writes
`OUT_DIR/zero{stage}[-resumed]_rank{rank}.pt`: the LR of every step and, after every step, this process's fp32
master partitions with their AdamW state (what DeepSpeed's optimizer steps) and the weights the model computes with
(ZeRO 1 and 2: every parameter in full; ZeRO 3: this process's partition of each, and the full tensor of the
persistent ones), plus the rewind bookkeeping. The uninterrupted run saves after `RESUME_AT` steps (late warmup)
with `engine.save_checkpoint` and each process's scheduler state (`hf_autowu.save_scheduler_state` in the checkpoint's
tag folder); the resumed run starts from another
initialisation, loads both and continues to the end. Runs of ZeRO 2, ZeRO 3 and stage 0 (fp32) build AutoWU on
AdamW before `deepspeed.initialize`, as a scheduler built before `accelerator.prepare` is, without `model`:
DeepSpeed replaces AdamW's parameters with its master partitions and wraps AdamW (or, in stage 0, steps it itself),
and rewind must find that wrapper or engine and run as with DeepSpeed's optimizer. One more AutoWU, on an AdamW
that DeepSpeed neither wraps nor steps, must turn rewind off. A ZeRO-2 run in bf16 checks the refresh of bf16
weights from the fp32 masters. Stage 0 (no ZeRO, replicas) runs in fp32, with the engine as `model`, and in bf16,
where DeepSpeed's `FP16_UnfusedOptimizer` keeps fp32 master weights (once with a NaN loss), and with DeepSpeed's
FusedAdam, where `FP16_Optimizer` keeps one flat fp32 master per group. Last, ZeRO-2 and ZeRO-3 runs with the
optimizer offloaded to the host (ZeRO-Offload), and runs in which process 1's loss is NaN once, at step
`NAN_LOSS_AT`.

With `--memory-only` each process only trains the uninterrupted runs and prints its peak rewind memory as one JSON
line (for the memory figures of the documentation):

    cd tests/multiprocess && torchrun --standalone --nproc_per_node 2 deepspeed_rewind.py /tmp/mem --hidden 1024 \
        --memory-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from process_exit import leave  # noqa: E402
from sharded_rewind import batch, local_state, make_model, switch_record  # noqa: E402
from torch import nn  # noqa: E402

from hf_autowu import AutoWU, load_scheduler_state, save_scheduler_state  # noqa: E402

TOTAL, RESUME_AT, HIDDEN, NAN_LOSS_AT = 200, 70, 32, 60
STAGES = (1, 2, 3)


def real_part(partition: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The elements of this process's ZeRO 3 partition of `param` that hold values (the last processes' partitions
    run past the parameter's end, into padding DeepSpeed leaves uninitialised)."""
    size = partition.numel()
    start = dist.get_rank(group=param.ds_process_group) * size
    return partition[: min(max(param.ds_numel - start, 0), size)]


def model_weights(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the weights the model computes with: with ZeRO 3 this process's partition of each parameter
    (`ds_tensor`) and the gathered tensor of those that stay gathered (persistent), else every parameter in full."""
    result = []
    for p in model.parameters():
        partition = getattr(p, "ds_tensor", None)
        if partition is not None:
            result.append(real_part(partition, p).detach().clone())
        if partition is None or p.numel() > 0:
            result.append(p.detach().clone())
    return result


def master_state(optimizer: Any) -> list[list[torch.Tensor]]:
    """Copies of this process's fp32 master partitions and their AdamW state, in the optimizer's order; ZeRO 3
    keeps its flat partitions out of `param_groups` between steps, and only their real elements are kept."""
    partitions = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if partitions is None:
        return local_state(optimizer)
    rows = []
    for flat, params in zip(partitions, optimizer.fp16_groups, strict=True):
        state = optimizer.state[flat]
        tensors = [flat, *(state[k] for k in sorted(state) if torch.is_tensor(state[k]) and state[k].dim())]
        for tensor in tensors:
            parts = tensor.split([p.ds_tensor.ds_numel for p in params])
            rows.append([real_part(part, p).clone() for part, p in zip(parts, params, strict=True)])
    return rows


class Run:
    """`deepspeed.initialize` on the model and AdamW, and AutoWU with its defaults on DeepSpeed's optimizer (with
    `before_initialize`: on AdamW, built before `deepspeed.initialize`, as a scheduler handed to
    `accelerator.prepare` is)."""

    def __init__(
        self,
        stage: int,
        seed: int = 0,
        before_initialize: bool = False,
        bf16: bool = False,
        hidden: int = HIDDEN,
        offload: bool = False,
        model_is_engine: bool = False,
        fused: bool = False,
    ):
        config = {
            "train_micro_batch_size_per_gpu": 32,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16},
        }
        if offload:  # ZeRO-Offload: the master partitions and AdamW's state on the host, stepped by torch's AdamW
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            config["zero_force_ds_cpu_optimizer"] = False
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        import deepspeed  # here, not at the top: the tests import this module's constants

        model = make_model(hidden, seed)
        if fused:  # DeepSpeed's FusedAdam (its CPU build here): in bf16 without ZeRO, the fused FP16_Optimizer
            from deepspeed.ops.adam import FusedAdam

            optimizer = FusedAdam(model.parameters(), lr=1.0)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
        if before_initialize:
            self.scheduler = AutoWU(optimizer, total_steps=TOTAL)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if not before_initialize:
            model = self.engine if model_is_engine else self.engine.module
            self.scheduler = AutoWU(self.optimizer, total_steps=TOTAL, model=model)
        self.record: dict[str, Any] = {"lrs": {}, "losses": {}, "states": {}, "weights": {}, "memory_bytes": 0}
        self.keep_states = True

    def train(self, start: int, stop: int, save_to: Path | None = None, nan_loss_at: int | None = None) -> None:
        """Steps `start` to `stop - 1`; `nan_loss_at`: process 1's loss of that step (0-based) is NaN, and through
        the gradients' reduction every process's gradients (DeepSpeed's overflow check then skips the update)."""
        for step in range(start, stop):
            x, y = batch(step)
            loss = nn.functional.mse_loss(self.engine(x.to(self.dtype)).float(), y)
            if step == nan_loss_at and dist.get_rank() == 1:
                loss = loss * math.nan
            self.engine.backward(loss)
            self.record["lrs"][step] = self.optimizer.param_groups[0]["lr"]
            self.record["losses"][step] = loss.item()
            self.engine.step()
            self.scheduler.step(loss.detach())
            self.record["memory_bytes"] = max(self.record["memory_bytes"], self.scheduler.rewinder.memory_bytes)
            if self.keep_states:  # after `step + 1` optimizer steps (and, at the switch, the rewind)
                self.record["states"][step + 1] = master_state(self.optimizer)
                self.record["weights"][step + 1] = model_weights(self.engine.module)
            if save_to is not None and step + 1 == RESUME_AT:
                self.engine.save_checkpoint(str(save_to), tag="warmup")
                save_scheduler_state(self.scheduler, save_to / "warmup")

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag="warmup")
        self.record["scheduler_file"] = load_scheduler_state(self.scheduler, folder / "warmup").name

    def finish(self) -> dict[str, Any]:
        self.record.update(switch_record(self.scheduler), optimizer=type(self.optimizer).__name__)
        return self.record


def unrelated_optimizer_record() -> dict[str, Any]:
    """While DeepSpeed runs, AutoWU with its defaults on an AdamW that DeepSpeed neither wraps nor steps, over a
    model that is not an engine's, a few steps until its first snapshot is due: the rewinder's bookkeeping and its
    warnings."""
    model = make_model(HIDDEN, seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=TOTAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x, y = batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step(loss.detach())
    record = switch_record(scheduler)
    record["warnings"] = [str(w.message) for w in caught if "AutoWU rewind" in str(w.message)]
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if args.memory_only:
        for stage in STAGES:
            run = Run(stage, hidden=args.hidden)
            run.keep_states = False
            run.train(0, TOTAL)
            record = run.finish()
            summary = {
                "stage": stage,
                "rank": rank,
                "peak_memory_bytes": record["memory_bytes"],
                "planned_bytes": run.scheduler.rewinder.planned_bytes,
            }
            print(json.dumps(summary), flush=True)
        leave()
    for stage in STAGES:
        folder = out / f"zero{stage}-checkpoint"
        full = Run(stage)
        full.train(0, TOTAL, save_to=folder)
        torch.save(full.finish(), out / f"zero{stage}_rank{rank}.pt")
        dist.barrier()
        resumed = Run(stage, seed=123)  # a different initialisation: all must come from the checkpoint
        resumed.load(folder)
        resumed.train(RESUME_AT, TOTAL)
        torch.save(resumed.finish(), out / f"zero{stage}-resumed_rank{rank}.pt")
    for stage in (2, 3, 0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            early = Run(stage, before_initialize=True)
            early.train(0, TOTAL)
        record = early.finish()
        record["warnings"] = [str(w.message) for w in caught if "AutoWU rewind" in str(w.message)]
        torch.save(record, out / f"zero{stage}-before-initialize_rank{rank}.pt")
    torch.save(unrelated_optimizer_record(), out / f"unrelated_rank{rank}.pt")
    bf16 = Run(2, bf16=True)
    bf16.train(0, TOTAL)
    torch.save(bf16.finish(), out / f"zero2-bf16_rank{rank}.pt")
    for name, bf16, nan_loss_at in (
        ("zero0", False, None),
        ("zero0-bf16", True, None),
        ("zero0-bf16-nan", True, NAN_LOSS_AT),
        ("zero0-bf16-fused", True, None),
    ):
        # no ZeRO: replicas; in bf16 with fp32 masters (one per weight, or one flat tensor per group when fused)
        replicated = Run(0, bf16=bf16, model_is_engine=not bf16, fused=name.endswith("fused"))
        replicated.train(0, TOTAL, nan_loss_at=nan_loss_at)
        torch.save(replicated.finish(), out / f"{name}_rank{rank}.pt")
    for stage in (2, 3):
        offload = Run(stage, offload=True)
        offload.train(0, TOTAL)
        torch.save(offload.finish(), out / f"zero{stage}-offload_rank{rank}.pt")
        nan = Run(stage)
        nan.train(0, TOTAL, nan_loss_at=NAN_LOSS_AT)
        torch.save(nan.finish(), out / f"zero{stage}-nan_rank{rank}.pt")
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
