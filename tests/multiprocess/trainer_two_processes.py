"""Two-process Trainer runs for `tests/test_trainer_multiprocess.py`.

Run with `torchrun --standalone --nproc_per_node 2 tests/multiprocess/trainer_two_processes.py OUT_DIR`: each
process trains on its own shard with AutoWU (callback and subclass; a clean run and one where process 1's loss
is NaN at step 6) and writes what it saw to `OUT_DIR/rank{rank}.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from collective_counter import CollectiveCounter
from process_exit import leave
from trainer_toy import AUTOWU_OPTIONS, NanLossAt, StepRecorder, ToyRegressor, regression_data, training_args
from transformers import Trainer

import hf_autowu.trainer
from hf_autowu import AutoWUCallback, AutoWUConfig, AutoWUTrainer

hf_autowu.trainer.SAVE_FIGURE = False  # drawing autowu.png is tested in one process
NAN_STEP = 6
TEST_INTERVAL = 4  # switch tests at steps 4, 8, ... (the robust preset tests from 20 losses on)


def train(entry_point: str, nan: bool, output_dir: str) -> dict:
    torch.manual_seed(0)
    recorder = StepRecorder()
    callbacks = [recorder] + ([NanLossAt(NAN_STEP, rank=1)] if nan else [])
    # 7 batches a process: 4 steps an epoch; the NaN run is shorter (it only has to show the processes agree)
    args = training_args(output_dir, per_device_train_batch_size=2, num_train_epochs=8 if nan else 15)
    common = {"model": ToyRegressor(), "args": args, "train_dataset": regression_data()}
    config = AutoWUConfig(**AUTOWU_OPTIONS, test_interval=TEST_INTERVAL)
    if entry_point == "callback":
        callback = AutoWUCallback(config)
        trainer = Trainer(**common, callbacks=[*callbacks, callback])
    else:
        trainer = AutoWUTrainer(**common, callbacks=callbacks, autowu_config=config)
    counter = CollectiveCounter(lambda: trainer.state.global_step + 1)  # the optimizer step under way (1-based)
    try:
        trainer.train()
    finally:
        counter.remove()
    autowu = callback.scheduler if entry_point == "callback" else trainer.lr_scheduler
    return {
        "lrs": recorder.lrs,
        "local_losses": [float(loss) for loss in recorder.step_losses()],
        "autowu_losses": autowu.losses.tolist(),
        "logged_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "switch_step": autowu.switch_step,
        "retried": autowu.retried,
        "tests": [record.step for record in autowu.tests],
        "collective_steps": counter.steps,
        "world_size": args.world_size,
        "rewound_to": autowu.rewinder.rewound_to if autowu.rewinder is not None else None,
        "final_weights": [p.detach().double().flatten().tolist() for p in trainer.model.parameters()],
    }


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    for entry_point in ("callback", "trainer"):
        for nan in (False, True):
            name = f"{entry_point}-{'nan' if nan else 'clean'}"
            results[name] = train(entry_point, nan, str(out / name))
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
