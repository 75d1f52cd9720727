"""Two-process TRL runs for `tests/test_trl_multiprocess.py`.

Run with `torchrun --standalone --nproc_per_node 2 tests/multiprocess/trl_two_processes.py OUT_DIR`: each process
fine-tunes a LoRA adapter with TRL's `SFTTrainer` and AutoWU (callback and mixin), on its own shard of the data, then
resumes from a checkpoint written between the snapshot the switch restores and the switch; it writes what it saw to
`OUT_DIR/rank{rank}.pt`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lm_toy import byte_tokenizer, lm_dataset, lora_adapter, sft_config, tiny_llama
from process_exit import leave
from transformers import TrainerCallback
from trl import SFTTrainer

import hf_autowu.trainer
from hf_autowu import AutoWUCallback, AutoWUConfig, AutoWUTrainerMixin

hf_autowu.trainer.SAVE_FIGURE = False  # drawing autowu.png is tested in one process
OPTIONS = {"min_lr": 1e-4, "max_lr": 10.0}  # the loss falls, then blows up inside the 30-step warmup
STEPS, SAVE_STEPS = 60, 3


class RecordingSFTTrainer(SFTTrainer):
    """Keeps what `training_step` returns (this process's micro-batch losses), per optimizer step."""

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self.returned.setdefault(self.state.global_step, []).append(float(loss))
        return loss


class AutoWUSFTTrainer(AutoWUTrainerMixin, RecordingSFTTrainer):
    pass


class LRRecorder(TrainerCallback):
    """The LR of the first parameter group just before each optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def train(entry_point: str, output_dir: str, resume: str | None = None) -> dict[str, Any]:
    args = sft_config(output_dir, STEPS, SAVE_STEPS, save=resume is None)
    recorder = LRRecorder()
    common = {
        "model": tiny_llama(),
        "args": args,
        "train_dataset": lm_dataset(n=128),
        "processing_class": byte_tokenizer(),
        "peft_config": lora_adapter(),
        "callbacks": [recorder],
    }
    config = AutoWUConfig(**OPTIONS)
    if entry_point == "callback":
        trainer = RecordingSFTTrainer(**common)
        callback = AutoWUCallback(config)
        trainer.add_callback(callback)
    else:
        trainer = AutoWUSFTTrainer(**common, autowu_config=config)
    trainer.returned = {}
    trainer.train(resume_from_checkpoint=resume)
    scheduler = callback.scheduler if entry_point == "callback" else trainer.lr_scheduler
    return {
        "world_size": args.world_size,
        "lrs": recorder.lrs,
        "step_losses": [sum(trainer.returned[step]) for step in sorted(trainer.returned)],
        "autowu_losses": scheduler.losses.tolist(),
        "switch_step": scheduler.switch_step,
        "peak_lr": scheduler.peak_lr,
        "rewound_to": scheduler.rewinder.rewound_to,
        "final": {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad},
    }


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    for entry_point in ("callback", "mixin"):
        full = train(entry_point, str(out / entry_point))
        rewound, switch = full["rewound_to"]["step"], full["switch_step"]
        start = max(s for s in range(SAVE_STEPS, STEPS, SAVE_STEPS) if rewound < s < switch)
        checkpoint = str(out / entry_point / f"checkpoint-{start}")
        results[entry_point] = {**full, "start": start, "resumed": train(entry_point, checkpoint + "-run", checkpoint)}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    leave()  # the last statement: skips finalization, see process_exit.leave


if __name__ == "__main__":
    main()
