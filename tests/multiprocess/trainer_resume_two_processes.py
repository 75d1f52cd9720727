"""Two-process Trainer runs saved with `save_strategy="best"` and resumed, for `tests/test_trainer_multiprocess.py`.

Run with `torchrun --standalone --nproc_per_node 2 tests/multiprocess/trainer_resume_two_processes.py OUT_DIR`. For
each entry point, an uninterrupted run evaluates every 3 steps and saves when the evaluation loss improves (after
evaluation, later in the step than `on_step_end`); every checkpoint is copied aside when written. The run is then
resumed from the last checkpoint written before the switch at a step between two switch tests (so that losses
were pending when it was written). Each process writes what it saw to `OUT_DIR/rank{rank}.pt`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from process_exit import leave
from trainer_toy import AUTOWU_OPTIONS, StepRecorder, ToyRegressor, regression_data, training_args
from transformers import Trainer, TrainerCallback

import hf_autowu.trainer
from hf_autowu import AutoWUCallback, AutoWUConfig, AutoWUTrainer

hf_autowu.trainer.SAVE_FIGURE = False
TEST_INTERVAL = 4
SAVE_OPTIONS = {
    "save_strategy": "best",
    "eval_strategy": "steps",
    "eval_steps": 3,
    "metric_for_best_model": "loss",
}


class KeepCheckpoints(TrainerCallback):
    """The main process copies every checkpoint aside once every process has written its part."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        dist.barrier()
        name = f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:
            shutil.copytree(Path(args.output_dir) / name, self.folder / name)
        self.steps.append(state.global_step)
        dist.barrier()


class SchedulerStateAtFirstStep(TrainerCallback):
    """This process's AutoWU state at the first step of a (resumed) run, after everything was loaded."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.state: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.state is None:
            self.state = scheduler_of(self.trainer).state_dict()


def build(entry_point: str, output_dir: Path, callbacks: list, save: bool) -> Trainer:
    torch.manual_seed(0)
    options = SAVE_OPTIONS if save else {**SAVE_OPTIONS, "save_strategy": "no"}
    args = training_args(str(output_dir), per_device_train_batch_size=2, num_train_epochs=15, **options)
    common = {"model": ToyRegressor(), "args": args, "train_dataset": regression_data()}
    common["eval_dataset"] = regression_data(8, seed=1)
    config = AutoWUConfig(**AUTOWU_OPTIONS, test_interval=TEST_INTERVAL)
    if entry_point == "callback":
        trainer = Trainer(**common, callbacks=[*callbacks, AutoWUCallback(config)])
    else:
        trainer = AutoWUTrainer(**common, callbacks=callbacks, autowu_config=config)
    return trainer


def scheduler_of(trainer: Trainer):
    if isinstance(trainer, AutoWUTrainer):
        return trainer.lr_scheduler
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoWUCallback)).scheduler


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for entry_point in ("callback", "trainer"):
        recorder, kept = StepRecorder(), KeepCheckpoints(out / f"{entry_point}-kept")
        full = build(entry_point, out / entry_point, [recorder, kept], save=True)
        full.train()
        reference = scheduler_of(full)
        start = max(s for s in kept.steps if s < reference.switch_step and s % TEST_INTERVAL)
        checkpoint = out / f"{entry_point}-kept" / f"checkpoint-{start}"
        resumed_recorder = StepRecorder()
        at_start = SchedulerStateAtFirstStep()
        resumed = build(entry_point, out / f"{entry_point}-resumed", [resumed_recorder, at_start], save=False)
        at_start.trainer = resumed
        resumed.train(resume_from_checkpoint=str(checkpoint))
        again = scheduler_of(resumed)
        results[entry_point] = {
            "written": kept.steps,
            "start": start,
            "saved_scheduler": torch.load(checkpoint / "scheduler.pt", weights_only=False),
            "lrs": [lrs[0] for lrs in recorder.lrs],
            "local_losses": [float(loss) for loss in recorder.step_losses()],
            "autowu_losses": reference.losses,
            "switch_step": reference.switch_step,
            "rewound_to": reference.rewinder.rewound_to,
            "final": recorder.states[-1],
            "resumed_lrs": [lrs[0] for lrs in resumed_recorder.lrs],
            "resumed_state_at_start": at_start.state,
            "resumed_autowu_losses": again.losses,
            "resumed_switch_step": again.switch_step,
            "resumed_rewound_to": again.rewinder.rewound_to,
            "resumed_final": resumed_recorder.states[-1],
        }
    torch.save(results, out / f"rank{rank}.pt")
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
