"""The Trainer with DeepSpeed ZeRO-2 on CPU (`DS_ACCELERATOR=cpu`, gloo), for `tests/test_deepspeed.py`.

Run with `torchrun --standalone --nproc_per_node 1 tests/multiprocess/deepspeed_trainer.py OUT_DIR`. One process:
on a CPU, Accelerate's state only takes the DeepSpeed path without `use_cpu`, and then finds no accelerator backend
and counts one process whatever torchrun started (DeepSpeed's own group would have two: each process would train
on all the data and write the same checkpoint files). For each entry point (AutoWUCallback, AutoWUTrainer) and each
DeepSpeed config without a `scheduler` section (with an `optimizer` section, whose engine then steps the scheduler
itself inside the backward pass, and without one, where the Trainer steps it), an uninterrupted run saves every
`SAVE_STEPS` steps; the loss is NaN at `OVERFLOW_STEPS`, so DeepSpeed skips those updates (its overflow check on
the gradient norm, as with fp16); then the run is resumed from the checkpoint at `RESUME_AT` (warmup). The script
writes what it saw to `OUT_DIR/results.pt`: the LR of every parameter group at each update (read inside DeepSpeed's
optimizer step) and whether DeepSpeed skipped it, each step's loss (from the model's outputs), the logged learning
rates, AutoWU's decisions and the rewind warnings; and, for each entry point, the error a config with a
`scheduler` section raises.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed_rewind import master_state, model_weights  # noqa: E402
from process_exit import leave  # noqa: E402
from trainer_toy import AUTOWU_OPTIONS, ToyRegressor, regression_data, training_args  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import hf_autowu.trainer  # noqa: E402
from hf_autowu import AutoWUCallback, AutoWUConfig, AutoWUTrainer  # noqa: E402

hf_autowu.trainer.SAVE_FIGURE = False
OVERFLOW_STEPS = (2, 5)
SAVE_STEPS, RESUME_AT, MAX_STEPS = 20, 20, 60
CONFIGS = {
    "optimizer": {
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    },
    "no_optimizer": {},
    "zero3": {"zero_optimization": {"stage": 3}},
}


class RecordUpdates(TrainerCallback):
    """Wraps DeepSpeed's ZeRO optimizer `step` (called by the engine inside the backward of the step's last
    micro-batch) to record the LRs it updates with and whether it skipped the update; records each micro-batch's
    loss from the model's outputs; makes the loss NaN at `OVERFLOW_STEPS` (so that the gradient norm is NaN and
    DeepSpeed skips the update)."""

    def __init__(self) -> None:
        self.updates: list[tuple[list[float], bool]] = []
        self.micro_losses: list[list[torch.Tensor]] = []
        self.model_weights: dict[str, torch.Tensor] | None = None
        self.states: dict[int, tuple[list[list[torch.Tensor]], list[torch.Tensor]]] = {}
        self._hooked = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._hooked:
            model.register_forward_hook(
                lambda module, args, output: self.micro_losses[-1].append(output["loss"].detach())
            )
            self._hooked = True
        zero = optimizer.optimizer  # Accelerate's DeepSpeedOptimizerWrapper > DeepSpeed's ZeRO optimizer
        assert type(zero).__name__.startswith("DeepSpeedZeroOptimizer"), type(zero)
        self.zero = zero
        original = zero.step

        def step(*a, **k):
            lrs = [group["lr"] for group in zero.param_groups]
            result = original(*a, **k)
            self.updates.append((lrs, bool(zero.overflow)))
            return result

        zero.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.nan_loss = state.global_step in OVERFLOW_STEPS
        self.micro_losses.append([])
        self.record_state(state.global_step, model)

    def record_state(self, updates: int, model) -> None:
        """After `updates` updates (and, at the switch, the rewind, which `AutoWUTrainer` does at `on_step_end`):
        the fp32 master partitions with their AdamW state, and the weights the model computes with."""
        self.states[updates] = (master_state(self.zero), model_weights(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.record_state(state.global_step, model)
        zero3 = hasattr(self.zero, "fp32_partitioned_groups_flat")  # the weights are this process's partitions
        self.model_weights = {
            name: (p.ds_tensor if zero3 else p).detach().clone() for name, p in model.named_parameters()
        }


def run(entry_point: str, config: str, output_dir: Path, resume: str | None = None) -> dict:
    torch.manual_seed(0)
    deepspeed = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        **CONFIGS.get(config, {}),
    }
    if config == "scheduler":
        params = {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}
        deepspeed["scheduler"] = {"type": "WarmupLR", "params": params}
        try:
            run_with(entry_point, deepspeed, output_dir, None, RecordUpdates())
        except ValueError as error:
            return {"refused": str(error)}
        return {"refused": None}
    recorder = RecordUpdates()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run_with(entry_point, deepspeed, output_dir, resume, recorder)
    if entry_point == "callback":
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoWUCallback))
        scheduler = callback.scheduler
    else:
        scheduler = hf_autowu.trainer._unwrap_scheduler(trainer.lr_scheduler)
    return {
        "trainer_scheduler": type(trainer.lr_scheduler).__name__,
        "engine_scheduler": type(trainer.model_wrapped.lr_scheduler).__name__,
        "updates": recorder.updates,
        "micro_losses": recorder.micro_losses,
        "logged": [(e["step"], e["learning_rate"]) for e in trainer.state.log_history if "learning_rate" in e],
        "autowu_keys": all("autowu/lr" in e for e in trainer.state.log_history if "loss" in e),
        "last_step": scheduler.last_step,
        "losses": scheduler.losses,
        "switch_step": scheduler.switch_step,
        "peak_lr": scheduler.peak_lr,
        "rewind_enabled": scheduler.rewinder.enabled,
        "rewind_mode": scheduler.rewinder.mode,
        "rewound_to": scheduler.rewinder.rewound_to,
        "states": recorder.states,
        "rewind_warnings": [str(w.message) for w in caught if "AutoWU rewind" in str(w.message)],
        "weights": recorder.model_weights,
        "checkpoint_files": sorted(os.listdir(output_dir / f"checkpoint-{RESUME_AT}")) if resume is None else None,
    }


def run_with(entry_point: str, deepspeed: dict, output_dir: Path, resume: str | None, recorder) -> Trainer:
    args = training_args(
        str(output_dir),
        max_steps=MAX_STEPS,
        deepspeed=deepspeed,
        use_cpu=False,
        save_strategy="steps" if resume is None else "no",
        save_steps=SAVE_STEPS,
        logging_steps=1,
    )
    common = {"model": ToyRegressor(), "args": args, "train_dataset": regression_data()}
    options = AutoWUConfig(**AUTOWU_OPTIONS)
    if entry_point == "callback":
        trainer = Trainer(**common, callbacks=[recorder, AutoWUCallback(options)])
    else:
        trainer = AutoWUTrainer(**common, callbacks=[recorder], autowu_config=options)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    for entry_point in ("callback", "trainer"):
        for config in CONFIGS:
            name = f"{entry_point}-{config}"
            results[name] = run(entry_point, config, out / name)
            checkpoint = str(out / name / f"checkpoint-{RESUME_AT}")
            results[f"{name}-resumed"] = run(entry_point, config, out / f"{name}-resumed", resume=checkpoint)
        results[f"{entry_point}-scheduler"] = run(entry_point, "scheduler", out / f"{entry_point}-scheduler")
    assert dist.get_world_size() == 1
    torch.save(results, out / "results.pt")
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
