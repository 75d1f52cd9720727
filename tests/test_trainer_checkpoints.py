"""AutoWU's state is captured when the Trainer writes a checkpoint, whatever decided it: `save_strategy` "steps",
"epoch" or "best" (decided after evaluation, later in the step than `on_step_end`), with `save_total_limit`
deleting old ones. Resuming from every checkpoint written (each copied aside as it is written) continues the
uninterrupted run exactly: the same LRs, switch and final weights (rewind included)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

import hf_autowu.trainer
from hf_autowu import AutoWU, AutoWUCallback, AutoWUConfig, AutoWUTrainer

sys.path.insert(0, str(Path(__file__).parent / "multiprocess"))
from trainer_toy import AUTOWU_OPTIONS, StepRecorder, ToyRegressor, regression_data, training_args  # noqa: E402

ENTRY_POINTS = ("callback", "trainer")
# 28 samples in batches of 4 with accumulation 2: 4 optimizer steps an epoch, 60 steps, the switch near step 23
STRATEGIES = {
    "steps": {"save_strategy": "steps", "save_steps": 7, "save_total_limit": 2},
    "epoch": {"save_strategy": "epoch", "save_total_limit": 3},
    "best": {
        "save_strategy": "best",
        "eval_strategy": "steps",
        "eval_steps": 3,
        "metric_for_best_model": "loss",
        "load_best_model_at_end": True,
        "save_total_limit": 1,
    },
}


@pytest.fixture(autouse=True)
def no_figure(monkeypatch):
    monkeypatch.setattr(hf_autowu.trainer, "SAVE_FIGURE", False)


class KeepCheckpoints(TrainerCallback):
    """Copies every checkpoint aside when it has been written (before `save_total_limit` can delete it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        shutil.copytree(Path(args.output_dir) / name, self.folder / name)
        self.steps.append(state.global_step)


def make_trainer(entry_point: str, output_dir: Path, strategy: str, callbacks: list, save: bool = True) -> Trainer:
    torch.manual_seed(0)
    options = {**STRATEGIES[strategy], **({} if save else {"save_strategy": "no", "load_best_model_at_end": False})}
    args = training_args(str(output_dir), logging_steps=100, **options)
    common = {
        "model": ToyRegressor(),
        "args": args,
        "train_dataset": regression_data(),
        "eval_dataset": regression_data(8, seed=1),
    }
    config = AutoWUConfig(**AUTOWU_OPTIONS)
    if entry_point == "callback":
        return Trainer(**common, callbacks=[*callbacks, AutoWUCallback(config)])
    return AutoWUTrainer(**common, callbacks=callbacks, autowu_config=config)


def scheduler_of(trainer: Trainer) -> AutoWU:
    if isinstance(trainer, AutoWUTrainer):
        return trainer.lr_scheduler
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoWUCallback)]
    return callback.scheduler


def assert_resumes_exactly(
    entry_point: str, strategy: str, tmp_path: Path, start: int, reference: AutoWU, recorder: StepRecorder
) -> None:
    """Resume `entry_point` from the checkpoint kept at `start`: the same LRs, switch, losses, rewind target and
    final weights as the uninterrupted run (`reference`, whose steps `recorder` recorded)."""
    resumed_recorder = StepRecorder()
    resumed = make_trainer(entry_point, tmp_path / f"resumed{start}", strategy, [resumed_recorder], save=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "kept" / f"checkpoint-{start}"))
    scheduler = scheduler_of(resumed)
    lrs = [group_lrs[0] for group_lrs in recorder.lrs]
    assert [group_lrs[0] for group_lrs in resumed_recorder.lrs] == lrs[start:], start
    assert scheduler.switch_step == reference.switch_step and scheduler.peak_lr == reference.peak_lr, start
    assert torch.equal(scheduler.losses, reference.losses), start
    assert scheduler.rewinder.rewound_to == reference.rewinder.rewound_to, start
    final, reference_final = resumed_recorder.states[-1], recorder.states[-1]
    assert all(torch.equal(final[key], value) for key, value in reference_final.items()), start


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_resume_from_every_checkpoint_written(entry_point, strategy, tmp_path):
    recorder, kept = StepRecorder(), KeepCheckpoints(tmp_path / "kept")
    full = make_trainer(entry_point, tmp_path / "full", strategy, [recorder, kept])
    full.train()
    reference = scheduler_of(full)
    switch = reference.switch_step
    assert switch is not None and reference.rewinder.rewound_to is not None

    written = kept.steps
    limit = STRATEGIES[strategy]["save_total_limit"]
    assert len(list((tmp_path / "full").glob("checkpoint-*"))) <= limit + 1 < len(written), "old ones were deleted"
    assert any(step < switch for step in written) and any(step > switch for step in written)
    if strategy == "epoch":
        assert written == list(range(4, 61, 4))
    if strategy == "best":
        # one checkpoint per new best evaluation loss: not every evaluation, and never an evaluation-free step
        assert set(written) < set(range(3, 61, 3)) and len(written) > 2

    for start in [step for step in written if step < 60]:  # (the last one has nothing left to train)
        assert_resumes_exactly(entry_point, strategy, tmp_path, start, reference, recorder)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_resume_with_a_longer_budget_moves_the_cooldown_to_its_end(entry_point, tmp_path, caplog):
    """Resumed after the switch with 24 epochs instead of 15 (96 optimizer steps instead of 60): the LR holds at the
    peak until the longer budget's cooldown (its last 20%, from step 96 - 19 = 77), then falls linearly to 0 at
    96, instead of training the 36 extra steps at LR 0."""
    kept = KeepCheckpoints(tmp_path / "kept")
    full = make_trainer(entry_point, tmp_path / "full", "steps", [kept])
    full.train()
    peak, switch = scheduler_of(full).peak_lr, scheduler_of(full).switch_step
    start = 35
    assert switch < start < 48, "resumed while holding the peak"

    torch.manual_seed(0)
    args = training_args(str(tmp_path / "longer"), logging_steps=100, num_train_epochs=24)
    common = {"model": ToyRegressor(), "args": args, "train_dataset": regression_data()}
    recorder = StepRecorder()
    config = AutoWUConfig(**AUTOWU_OPTIONS)
    if entry_point == "callback":
        resumed = Trainer(**common, callbacks=[recorder, AutoWUCallback(config)])
    else:
        resumed = AutoWUTrainer(**common, callbacks=[recorder], autowu_config=config)
    with caplog.at_level(logging.WARNING, logger="hf_autowu.scheduler"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "kept" / f"checkpoint-{start}"))
    assert any("re-planned for this run's 96" in record.getMessage() for record in caplog.records)
    lrs = [group_lrs[0] for group_lrs in recorder.lrs]
    expected = [peak if t < 77 else peak * (1.0 - (t - 77) / (96 - 77)) for t in range(start, 96)]
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("written_by", "resumed_by"), [("callback", "trainer"), ("trainer", "callback")])
def test_a_checkpoint_resumes_bit_exactly_with_the_other_entry_point(written_by, resumed_by, tmp_path):
    """A run moved from `AutoWUCallback` to `AutoWUTrainer` (or back) mid-training goes on as if it had not moved:
    the same LRs, switch, losses, rewind and final weights, from a checkpoint before and one after the switch."""
    recorder, kept = StepRecorder(), KeepCheckpoints(tmp_path / "kept")
    full = make_trainer(written_by, tmp_path / "full", "steps", [recorder, kept])
    full.train()
    reference = scheduler_of(full)
    starts = [max(s for s in kept.steps if s < reference.switch_step), min(s for s in kept.steps if s > 35)]
    for start in starts:
        assert_resumes_exactly(resumed_by, "steps", tmp_path, start, reference, recorder)


def test_autowutrainer_logs_options_that_differ_from_the_checkpoints(tmp_path, caplog):
    """The Trainer drops warnings while it loads a scheduler: a resume with other options says so in the log."""
    kept = KeepCheckpoints(tmp_path / "kept")
    make_trainer("trainer", tmp_path / "full", "steps", [kept]).train()
    torch.manual_seed(0)
    args = training_args(str(tmp_path / "resumed"), logging_steps=100, save_strategy="no")
    config = AutoWUConfig(**{**AUTOWU_OPTIONS, "confidence": 0.9})
    resumed = AutoWUTrainer(model=ToyRegressor(), args=args, train_dataset=regression_data(), autowu_config=config)
    with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "kept" / f"checkpoint-{kept.steps[0]}"))
    assert any("other options (confidence)" in record.getMessage() for record in caplog.records)
    assert resumed.lr_scheduler.config.confidence == AutoWUConfig(**AUTOWU_OPTIONS).confidence

    caplog.clear()
    state = torch.load(tmp_path / "kept" / f"checkpoint-{kept.steps[0]}" / "scheduler.pt", weights_only=True)
    state["autowu_state"]["config"]["device"] = "cpu"  # a checkpoint from before `device` was deprecated
    with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
        resumed.lr_scheduler.load_state_dict(state)
    assert not any("other options" in record.getMessage() for record in caplog.records)
    assert AutoWU.from_state_dict(state).last_step == kept.steps[0]  # scheduler.pt read back as the README shows


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_warmup_checkpoint_without_its_rewind_file_is_resumed_with_a_log_line(entry_point, tmp_path, caplog):
    """A checkpoint copied or pruned without `autowu_rewind_rank0.pt` cannot resume bit for bit: the log says so (a
    resume with the file says nothing of it)."""
    kept = KeepCheckpoints(tmp_path / "kept")
    full = make_trainer(entry_point, tmp_path / "full", "steps", [kept])
    full.train()
    start = next(step for step in kept.steps if 0 < step < scheduler_of(full).switch_step)
    checkpoint = tmp_path / "kept" / f"checkpoint-{start}"
    for present in (True, False):
        if not present:
            (checkpoint / hf_autowu.trainer.REWIND_FILE.format(rank=0)).unlink()
        caplog.clear()
        resumed = make_trainer(entry_point, tmp_path / f"resumed_{present}", "steps", [], save=False)
        with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
            resumed.train(resume_from_checkpoint=str(checkpoint))
        said = any("holds no rewind state" in record.getMessage() for record in caplog.records)
        assert said is not present, present
