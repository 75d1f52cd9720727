"""The Trainer integration on a real `transformers.Trainer` (CPU, tiny models): both entry points."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

import hf_autowu.trainer
from hf_autowu import AutoWU, AutoWUCallback, AutoWUConfig, AutoWUTrainer
from hf_autowu.trainer import LOG_KEYS

sys.path.insert(0, str(Path(__file__).parent / "multiprocess"))
from trainer_toy import (  # noqa: E402
    AUTOWU_OPTIONS,
    FakeOverflow,
    StepRecorder,
    ToyRegressor,
    ToyTokenModel,
    regression_data,
    token_data,
    training_args,
)

ENTRY_POINTS = ("callback", "trainer")


@pytest.fixture(autouse=True)
def no_figure(monkeypatch):
    """Drawing `autowu.png` takes a second or two; only the logging test draws it."""
    monkeypatch.setattr(hf_autowu.trainer, "SAVE_FIGURE", False)


def make_trainer(entry_point: str, args, callbacks=(), model=None, dataset=None, **options) -> Trainer:
    """A Trainer driven by AutoWU through `entry_point` ("callback" or "trainer")."""
    torch.manual_seed(0)
    model = ToyRegressor() if model is None else model
    dataset = regression_data() if dataset is None else dataset
    config = AutoWUConfig(**{**AUTOWU_OPTIONS, **options})
    if entry_point == "callback":
        callbacks = [*callbacks, AutoWUCallback(config)]
        return Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    return AutoWUTrainer(
        model=model, args=args, train_dataset=dataset, callbacks=list(callbacks), autowu_config=config
    )


def scheduler_of(trainer: Trainer) -> AutoWU:
    if isinstance(trainer, AutoWUTrainer):
        return trainer.lr_scheduler
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoWUCallback)]
    return callback.scheduler


def resumed_by_each_entry_point(tmp_path, checkpoint, caplog):
    """For each entry point in turn: a 12-step run resumed from `checkpoint` (its warnings in `caplog`), with a
    `StepRecorder`; yields (entry point, trainer, recorder)."""
    for entry_point in ENTRY_POINTS:
        caplog.clear()
        recorder = StepRecorder()
        args = training_args(str(tmp_path / entry_point), max_steps=12, logging_steps=100)
        trainer = make_trainer(entry_point, args, callbacks=[recorder])
        with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
            trainer.train(resume_from_checkpoint=str(checkpoint))
        yield entry_point, trainer, recorder


def hand_fed_lrs(losses: list[torch.Tensor | None], total_steps: int, steps_per_epoch: int, **options) -> list[float]:
    """The LR of every step from an AutoWU fed `losses` by hand (`None`: a skipped step, not fed)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = AutoWU(optimizer, steps_per_epoch, total_steps=total_steps, config=AutoWUConfig(**options))
    lrs = []
    for loss in losses:
        lrs.append(optimizer.param_groups[0]["lr"])
        if loss is not None:
            scheduler.step(loss)
    return lrs


def autowu_logs(trainer: Trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "autowu/phase" in entry]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_applied_lr_and_loss_are_autowus(entry_point, tmp_path, caplog):
    """28 samples in batches of 4 with accumulation 2: 4 steps an epoch, the last of 1 micro-batch."""
    recorder = StepRecorder()
    trainer = make_trainer(entry_point, training_args(str(tmp_path)), callbacks=[recorder])
    with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
        trainer.train()
    scheduler = scheduler_of(trainer)
    assert "training_step" not in vars(trainer)  # the callback's hook is gone after training
    assert len(recorder.lrs) == trainer.state.max_steps == scheduler.total_steps == 60
    assert scheduler.steps_per_epoch == 4
    assert [len(losses) for losses in recorder.micro_losses[:4]] == [2, 2, 2, 1]
    assert scheduler.switch_step is not None and scheduler.phase == "cooldown"

    # the optimizer used AutoWU's LR (every group) at every step, as an AutoWU fed the same losses says
    expected = hand_fed_lrs(recorder.step_losses(), 60, 4, **AUTOWU_OPTIONS)
    assert [lrs[0] for lrs in recorder.lrs] == expected
    assert all(len(set(lrs)) == 1 for lrs in recorder.lrs)
    # rewind: the step after the switch starts from the snapshot of a warmup step with LR <= peak LR (weights,
    # buffers and optimizer moments)
    rewound = scheduler.rewinder.rewound_to
    assert 0 < rewound["step"] < scheduler.switch_step and rewound["lr"] <= scheduler.peak_lr
    snapshot, after_switch = recorder.begin_states[rewound["step"]], recorder.begin_states[scheduler.switch_step]
    assert snapshot.keys() == after_switch.keys()
    assert all(torch.equal(after_switch[key], value) for key, value in snapshot.items())
    # AutoWU saw each step's mean loss over its micro-batches
    warmup = scheduler.switch_step
    assert torch.equal(scheduler.losses.float(), torch.stack(recorder.step_losses()[:warmup]))
    means = torch.tensor([sum(float(v) for v in losses) / len(losses) for losses in recorder.micro_losses[:warmup]])
    torch.testing.assert_close(scheduler.losses, means.double(), rtol=1e-6, atol=0)
    # the logged learning_rate is the LR applied at that step, and the Trainer's own log lines are all there
    logged = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, 61))
    assert [entry["learning_rate"] for entry in logged] == expected
    # AutoWU's values join the Trainer's own log entries (logging_steps=1: one entry a step, no extra ones)
    entries = autowu_logs(trainer)
    assert [entry["step"] for entry in entries] == list(range(1, 61)) and all("loss" in e for e in entries)
    assert all(set(LOG_KEYS) <= set(entry) for entry in entries)
    switch = entries[scheduler.switch_step - 1]
    assert switch["autowu/switch_step"] == scheduler.switch_step and switch["autowu/peak_lr"] == scheduler.peak_lr
    assert all(
        entry["autowu/switch_step"] == -1 and entry["autowu/phase"] == 0 for entry in entries[: switch["step"] - 1]
    )
    votes = {record.step: record.votes for record in scheduler.tests}
    assert [entries[step - 1]["autowu/votes"] for step in votes] == list(votes.values())
    passed = {record.step: int(record.passed) for record in scheduler.tests}
    assert [entries[step - 1]["autowu/passed"] for step in passed] == list(passed.values())
    assert scheduler.switch_reason != "test" or entries[scheduler.switch_step - 1]["autowu/passed"] == 1
    assert [r.getMessage() for r in caplog.records if "warmup ended" in r.getMessage()] == [
        f"AutoWU: warmup ended after {scheduler.switch_step} steps ({scheduler.switch_reason}); peak LR "
        f"{scheduler.peak_lr:.4g}, decaying to 0 by step 60. Rewound to the state of step {rewound['step']} "
        f"(trained with LRs up to {rewound['lr']:.4g})."
    ]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_loss_normalised_by_num_items_in_batch(entry_point, tmp_path):
    """A model taking `num_items_in_batch`: the step's loss is the mean over all its labelled tokens."""
    recorder = StepRecorder()
    args = training_args(str(tmp_path), max_steps=5, per_device_train_batch_size=2, logging_steps=100)
    trainer = make_trainer(
        entry_point,
        args,
        callbacks=[recorder],
        model=ToyTokenModel(),
        dataset=token_data(),
        max_warmup_fraction=1.0,
        cooldown_fraction=0.0,
    )
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    scheduler = scheduler_of(trainer)
    scheduler.sync_pending_losses()
    expected = [
        sum(float(out["loss_sum"]) for out in outs) / sum(int(out["labelled"]) for out in outs)
        for outs in recorder.outputs
    ]
    assert len({int(out["labelled"]) for outs in recorder.outputs for out in outs}) > 1
    torch.testing.assert_close(scheduler.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_overflow_skipped_step_is_not_a_step(entry_point, tmp_path):
    """A step whose update fp16 overflow skipped keeps the LR and gives AutoWU no loss."""
    recorder = StepRecorder()
    args = training_args(str(tmp_path), max_steps=12)
    trainer = make_trainer(entry_point, args, callbacks=[recorder, FakeOverflow({2, 5})])
    trainer.train()
    scheduler = scheduler_of(trainer)
    assert scheduler.last_step == 10
    losses = [None if step in (2, 5) else loss for step, loss in enumerate(recorder.step_losses())]
    expected = hand_fed_lrs(losses, 12, 4, **AUTOWU_OPTIONS)
    assert [lrs[0] for lrs in recorder.lrs] == expected
    assert expected[2] == expected[3] and expected[5] == expected[6] and expected[1] < expected[2]
    assert [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry] == expected


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_bf16_on_cpu(entry_point, tmp_path):
    recorder = StepRecorder()
    args = training_args(str(tmp_path), max_steps=8, bf16=True, use_cpu=True)
    trainer = make_trainer(entry_point, args, callbacks=[recorder])
    trainer.train()
    scheduler = scheduler_of(trainer)
    assert scheduler.last_step == 8
    assert [lrs[0] for lrs in recorder.lrs] == [scheduler.lr_at(step) for step in range(8)]
    assert all(math.isfinite(float(loss)) for loss in recorder.step_losses())


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_resume_continues_the_lr_trajectory(entry_point, tmp_path):
    """Checkpoints every 10 steps; the switch comes at step 23. Resuming from step 10 (warmup) and from step 30
    (decay) must give the uninterrupted run's LRs, switch, loss history and (rewind included) final weights."""
    full_recorder = StepRecorder()
    args = training_args(str(tmp_path / "full"), save_strategy="steps", save_steps=10, logging_steps=100)
    full = make_trainer(entry_point, args, callbacks=[full_recorder])
    full.train()
    reference = scheduler_of(full)
    assert 10 < reference.switch_step < 30
    full_lrs = [lrs[0] for lrs in full_recorder.lrs]

    runs = [(10, False), (30, False)] + ([(10, True)] if entry_point == "callback" else [])
    for start, restore_callback_states in runs:
        recorder = StepRecorder()
        args = training_args(
            str(tmp_path / f"resumed{start}"),
            save_strategy="steps",
            save_steps=10,
            logging_steps=100,
            restore_callback_states_from_checkpoint=restore_callback_states,
        )
        resumed = make_trainer(entry_point, args, callbacks=[recorder])
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{start}"))
        scheduler = scheduler_of(resumed)
        assert [lrs[0] for lrs in recorder.lrs] == full_lrs[start:], (start, restore_callback_states)
        assert scheduler.switch_step == reference.switch_step and scheduler.peak_lr == reference.peak_lr
        assert torch.equal(scheduler.losses, reference.losses)
        assert [r.step for r in scheduler.tests] == [r.step for r in reference.tests]
        final, reference_final = recorder.states[-1], full_recorder.states[-1]
        assert all(torch.equal(final[key], value) for key, value in reference_final.items())


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_the_switch_is_logged_without_per_step_logging(entry_point, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(hf_autowu.trainer, "SAVE_FIGURE", True)
    args = training_args(str(tmp_path / "out"), logging_steps=1000, report_to=["tensorboard"])
    trainer = make_trainer(entry_point, args)
    trainer.train()
    scheduler = scheduler_of(trainer)
    # no per-step logging: one entry, the Trainer's own at the switch step, carries AutoWU's values
    (entry,) = autowu_logs(trainer)
    assert entry["step"] == scheduler.switch_step and "loss" in entry
    assert entry["autowu/switch_step"] == scheduler.switch_step
    (event_dir,) = {str(path.parent) for path in (tmp_path / "out").rglob("events.out.tfevents.*")}
    events = EventAccumulator(event_dir)
    events.Reload()
    for key in LOG_KEYS:
        assert [event.step for event in events.Scalars(f"train/{key}")] == [scheduler.switch_step], key
    lrs = [event.value for event in events.Scalars("train/autowu/lr")]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([entry["autowu/lr"] for entry in autowu_logs(trainer)]))
    assert events.Scalars("train/autowu/switch_step")[-1].value == scheduler.switch_step
    assert (tmp_path / "out" / "autowu.png").stat().st_size > 0


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_parameter_groups_keep_their_ratio(entry_point, tmp_path):
    torch.manual_seed(0)
    model = ToyRegressor()
    first, second = model.net[0], model.net[2]
    groups = [{"params": first.parameters(), "lr": 1e-3}, {"params": second.parameters(), "lr": 2.5e-4}]
    recorder = StepRecorder()
    args = training_args(str(tmp_path), max_steps=4)
    config = AutoWUConfig(**AUTOWU_OPTIONS)
    common = {"model": model, "args": args, "train_dataset": regression_data()}
    common["optimizers"] = (torch.optim.AdamW(groups), None)
    if entry_point == "callback":
        trainer = Trainer(**common, callbacks=[recorder, AutoWUCallback(config)])
    else:
        trainer = AutoWUTrainer(**common, callbacks=[recorder], autowu_config=config)
    trainer.train()
    scheduler = scheduler_of(trainer)
    assert recorder.lrs == [[scheduler.lr_at(step), scheduler.lr_at(step) * 0.25] for step in range(4)]


def test_a_checkpoint_saved_without_autowu_warms_up_again(tmp_path, caplog):
    """Both entry points resume a plain Trainer's checkpoint (a linear schedule's state) by warming up again on the
    remaining steps, with a warning: the same LRs from `min_lr`, and the next checkpoints save fine."""
    args = training_args(str(tmp_path), max_steps=12, save_strategy="steps", save_steps=4, logging_steps=100)
    torch.manual_seed(0)
    Trainer(model=ToyRegressor(), args=args, train_dataset=regression_data()).train()
    lrs = {}
    for entry_point in ENTRY_POINTS:
        caplog.clear()
        torch.manual_seed(0)
        args = training_args(str(tmp_path / entry_point), max_steps=12, save_strategy="steps", save_steps=4)
        recorder = StepRecorder()
        common = {"model": ToyRegressor(), "args": args, "train_dataset": regression_data()}
        if entry_point == "callback":
            trainer = Trainer(**common, callbacks=[recorder, AutoWUCallback(**AUTOWU_OPTIONS)])
        else:
            trainer = AutoWUTrainer(**common, callbacks=[recorder], autowu_config=AutoWUConfig(**AUTOWU_OPTIONS))
        with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
        assert "warming up again over the remaining 8 steps" in caplog.text, entry_point
        scheduler = scheduler_of(trainer)
        assert scheduler.total_steps == scheduler.last_step == 8, entry_point
        assert (tmp_path / entry_point / "checkpoint-12" / "scheduler.pt").exists(), entry_point
        lrs[entry_point] = [group_lrs[0] for group_lrs in recorder.lrs]
    assert lrs["callback"][0] == AUTOWU_OPTIONS["min_lr"]
    assert lrs["trainer"] == lrs["callback"] and len(lrs["trainer"]) == 8


def test_a_checkpoint_saved_with_save_only_model_warms_up_again(tmp_path, caplog):
    """`save_only_model=True` writes no scheduler.pt and the Trainer then loads no scheduler state, silently: both
    entry points warm up again over the remaining steps (the subclass used to plan its whole budget from step 0 and
    end the run at its peak LR) and reach LR 0 at the last step."""
    args = training_args(
        str(tmp_path / "full"), max_steps=12, save_strategy="steps", save_steps=4, save_only_model=True
    )
    make_trainer("trainer", args).train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert not (checkpoint / "scheduler.pt").exists()
    lrs = {}
    for entry_point, trainer, recorder in resumed_by_each_entry_point(tmp_path, checkpoint, caplog):
        assert "holds no AutoWU state; warming up again over the remaining 8 steps" in caplog.text, entry_point
        scheduler = scheduler_of(trainer)
        assert scheduler.total_steps == scheduler.last_step == 8, entry_point
        lrs[entry_point] = [group_lrs[0] for group_lrs in recorder.lrs]
        assert len(lrs[entry_point]) == 8 and lrs[entry_point][0] == AUTOWU_OPTIONS["min_lr"], entry_point
        assert scheduler.get_last_lr()[0] == 0.0, entry_point  # the cooldown ends with the run
    assert lrs["trainer"] == lrs["callback"]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_second_train_keeps_the_parameter_groups_ratio(entry_point, tmp_path):
    """A second `train()` on the same Trainer: the first run's cooldown left every group's LR at 0, and the LR ratio
    of the groups as built (1/4) still holds (the subclass used to build its new AutoWU from those zeros: ratio 1)."""
    torch.manual_seed(0)
    model = ToyRegressor()
    groups = [
        {"params": model.net[0].parameters(), "lr": 1e-3},
        {"params": model.net[2].parameters(), "lr": 2.5e-4},
    ]
    recorder = StepRecorder()
    args = training_args(str(tmp_path), max_steps=6, logging_steps=100)
    trainer = make_trainer(entry_point, args, callbacks=[recorder], model=model)
    trainer.optimizer = torch.optim.AdamW(groups)
    for _ in range(2):
        trainer.train()
        assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.0, 0.0]
    assert len(recorder.lrs) == 12
    assert all(second == pytest.approx(first * 0.25, rel=1e-12) and first > 0 for first, second in recorder.lrs)


class OutOfMemoryAt(TrainerCallback):
    """Raises the CPU allocator's out-of-memory error at the end of optimizer step `step`, once: what
    `auto_find_batch_size` answers by running the training loop again with half the batch."""

    def __init__(self, step: int):
        self.step = step
        self.raised = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.raised and state.global_step == self.step:
            self.raised = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_auto_find_batch_size_warms_up_again_for_the_smaller_batch(entry_point, tmp_path):
    """`auto_find_batch_size=True`: the first loop (batches of 5, 3 steps an epoch, 45 in all) runs out of memory at
    step 3, and the Trainer runs it again with batches of 4 (Accelerate cuts it by 10%: 4 steps an epoch, 60 in all).
    AutoWU plans the retry afresh, for its own budget: its LRs are those of an AutoWU fed the retry's losses alone, it
    saw each of them once, and it switches, rewinds and cools down to 0 inside the retry."""
    recorder = StepRecorder()
    args = training_args(str(tmp_path), per_device_train_batch_size=5, logging_steps=100, auto_find_batch_size=True)
    trainer = make_trainer(entry_point, args, callbacks=[recorder, OutOfMemoryAt(3)])
    trainer.train()
    scheduler = scheduler_of(trainer)
    assert trainer._train_batch_size == 4 and trainer.state.global_step == trainer.state.max_steps == 60
    assert len(recorder.lrs) == 3 + 60
    losses = recorder.step_losses()
    lrs = [group_lrs[0] for group_lrs in recorder.lrs]
    assert lrs[:3] == hand_fed_lrs(losses[:3], 45, 3, **AUTOWU_OPTIONS)
    assert lrs[3:] == hand_fed_lrs(losses[3:], 60, 4, **AUTOWU_OPTIONS)
    assert scheduler.total_steps == 60 and scheduler.steps_per_epoch == 4 and scheduler.last_step == 60
    warmup = scheduler.switch_step
    assert warmup is not None and torch.equal(scheduler.losses.float(), torch.stack(losses[3 : 3 + warmup]))
    rewound = scheduler.rewinder.rewound_to
    assert rewound is not None and 0 < rewound["step"] < warmup
    snapshot, after_switch = recorder.begin_states[3 + rewound["step"]], recorder.begin_states[3 + warmup]
    assert all(torch.equal(after_switch[key], value) for key, value in snapshot.items())
    assert all(group["lr"] == 0.0 for group in trainer.optimizer.param_groups)


def test_two_autowu_callbacks_on_one_trainer_are_refused(tmp_path):
    args = training_args(str(tmp_path), max_steps=4)
    trainer = make_trainer("callback", args)
    trainer.add_callback(AutoWUCallback(**AUTOWU_OPTIONS))
    with pytest.raises(ValueError, match="2 AutoWUCallbacks"):
        trainer.train()


def test_warming_up_again_keeps_the_listeners_a_callback_attached(tmp_path):
    """User callbacks run `on_train_begin` before AutoWUTrainer's own: a listener attached there hears every step."""

    class Attach(TrainerCallback):
        steps = 0

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            lr_scheduler.add_listener(self)

        def on_step(self, scheduler):
            self.steps += 1

    args = training_args(str(tmp_path), max_steps=12, save_strategy="steps", save_steps=4, logging_steps=100)
    torch.manual_seed(0)
    Trainer(model=ToyRegressor(), args=args, train_dataset=regression_data()).train()
    attach = Attach()
    args = training_args(str(tmp_path / "resumed"), max_steps=12, logging_steps=100)
    config = AutoWUConfig(**AUTOWU_OPTIONS)
    trainer = AutoWUTrainer(
        model=ToyRegressor(), args=args, train_dataset=regression_data(), callbacks=[attach], autowu_config=config
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert trainer.lr_scheduler.last_step == attach.steps == 8


def test_a_trainer_without_autowu_resumes_an_autowutrainer_checkpoint_on_its_own_schedule(tmp_path):
    """Dropping AutoWU mid-run: the plain Trainer's linear schedule goes on from the checkpoint's step (its first
    step still has AutoWU's LR, restored with the optimizer)."""
    args = training_args(str(tmp_path), max_steps=12, save_strategy="steps", save_steps=4, logging_steps=100)
    torch.manual_seed(0)
    config = AutoWUConfig(**AUTOWU_OPTIONS)
    AutoWUTrainer(model=ToyRegressor(), args=args, train_dataset=regression_data(), autowu_config=config).train()
    recorder = StepRecorder()
    args = training_args(str(tmp_path / "plain"), max_steps=12, logging_steps=100)
    plain = Trainer(model=ToyRegressor(), args=args, train_dataset=regression_data(), callbacks=[recorder])
    plain.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    expected = [args.learning_rate * (12 - step) / 12 for step in range(5, 12)]
    assert [group_lrs[0] for group_lrs in recorder.lrs[1:]] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("writer", ENTRY_POINTS)
def test_after_warming_up_again_checkpoints_count_the_trainers_steps(writer, tmp_path, caplog):
    """AutoWU warms up again from a plain Trainer's step 4 and saves at step 8, four steps into its own warmup.
    That checkpoint resumes on the Trainer's step 8 in every way: a plain Trainer goes on with its linear schedule
    from step 8, and both entry points go on with the LRs of the run that wrote it (not stale, no new warmup)."""
    args = training_args(str(tmp_path), max_steps=12, save_strategy="steps", save_steps=4, logging_steps=100)
    torch.manual_seed(0)
    Trainer(model=ToyRegressor(), args=args, train_dataset=regression_data()).train()
    recorder = StepRecorder()
    args = training_args(str(tmp_path / "again"), max_steps=12, save_strategy="steps", save_steps=4, logging_steps=100)
    make_trainer(writer, args, callbacks=[recorder]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    written = [group_lrs[0] for group_lrs in recorder.lrs]  # steps 4 to 11
    checkpoint = str(tmp_path / "again" / "checkpoint-8")

    recorder = StepRecorder()
    args = training_args(str(tmp_path / "plain"), max_steps=12, logging_steps=100)
    plain = Trainer(model=ToyRegressor(), args=args, train_dataset=regression_data(), callbacks=[recorder])
    plain.train(resume_from_checkpoint=checkpoint)
    expected = [args.learning_rate * (12 - step) / 12 for step in range(9, 12)]
    assert [group_lrs[0] for group_lrs in recorder.lrs[1:]] == pytest.approx(expected, rel=1e-12)

    for entry_point, trainer, recorder in resumed_by_each_entry_point(tmp_path, checkpoint, caplog):
        assert "warming up again" not in caplog.text and "re-planned" not in caplog.text, entry_point
        assert [group_lrs[0] for group_lrs in recorder.lrs] == written[4:], entry_point
        assert scheduler_of(trainer).last_step == scheduler_of(trainer).total_steps == 8, entry_point


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_stale_autowu_state_kept_by_a_trainer_without_autowu_warms_up_again(entry_point, tmp_path, caplog):
    """AutoWU to step 4, a plain Trainer on from there to step 8 (its `LambdaLR` keeps the AutoWU state it loaded
    and saves it again), then AutoWU again from step 8: that state is 4 steps old, so AutoWU warms up again over the
    remaining 4 steps from `min_lr`, as on any checkpoint written without it, instead of going on from step 4."""
    args = training_args(str(tmp_path), max_steps=12, save_strategy="steps", save_steps=4, logging_steps=100)
    make_trainer(entry_point, args).train()
    args = training_args(str(tmp_path / "plain"), max_steps=12, save_strategy="steps", save_steps=4, logging_steps=100)
    torch.manual_seed(0)
    plain = Trainer(model=ToyRegressor(), args=args, train_dataset=regression_data())
    plain.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert "autowu_state" in torch.load(tmp_path / "plain" / "checkpoint-8" / "scheduler.pt", weights_only=True)

    recorder = StepRecorder()
    args = training_args(str(tmp_path / "again"), max_steps=12, logging_steps=100)
    trainer = make_trainer(entry_point, args, callbacks=[recorder])
    with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-8"))
    assert "AutoWU state is stale" in caplog.text and "remaining 4 steps" in caplog.text
    scheduler = scheduler_of(trainer)
    assert scheduler.total_steps == scheduler.last_step == 4
    assert len(recorder.lrs) == 4 and recorder.lrs[0][0] == AUTOWU_OPTIONS["min_lr"]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_the_trainers_schedule_settings_that_autowu_overrides_are_named_in_a_warning(entry_point, tmp_path, caplog):
    """`learning_rate`, `warmup_steps`, `lr_scheduler_type` and `lr_scheduler_kwargs` do nothing under AutoWU: say
    so, once; the defaults say nothing."""
    for settings, expected in (
        (
            {"warmup_steps": 3, "lr_scheduler_type": "cosine"},
            "learning_rate=0.001, warmup_steps=3, lr_scheduler_type='cosine' are ignored",
        ),
        ({"learning_rate": 3e-4}, "the Trainer's learning_rate=0.0003 is ignored"),
        ({"learning_rate": 5e-5}, None),
    ):
        caplog.clear()
        args = training_args(str(tmp_path), max_steps=2, logging_steps=100, **settings)
        with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
            make_trainer(entry_point, args).train()
        messages = [r.getMessage() for r in caplog.records if "sets the LR of every step" in r.getMessage()]
        if expected is None:
            assert messages == []
        else:
            assert len(messages) == 1 and expected in messages[0], messages


class _MaskedBatchStream(torch.utils.data.IterableDataset):
    """Windows of `lm_toy.TEXT` in a fixed order, four per step; the labels of step `masked_step`'s four all -100
    (as a batch of prompts whose completions were all truncated away): its loss is 0/0, NaN."""

    def __init__(self, masked_step: int | None):
        self.masked_step = masked_step

    def __iter__(self):
        from lm_toy import TEXT

        for i in range(10_000):
            start = (7 * i) % len(TEXT)
            ids = torch.tensor([TEXT[(start + k) % len(TEXT)] for k in range(16)])
            masked = self.masked_step is not None and i // 4 == self.masked_step
            yield {"input_ids": ids, "labels": torch.full_like(ids, -100) if masked else ids.clone()}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_one_batch_with_every_label_masked_does_not_end_warmup(entry_point, tmp_path):
    """A tiny Llama with AutoWU's defaults; step 8's batch has every label masked, so its loss is NaN (its gradients
    zero). Warmup goes on from where it is and chooses an LR within 4x of the run without that batch (0.031 against
    0.015 here; clean runs of model seeds 0-3 choose 0.015-0.023); before, it ended there and the run trained at
    `min_lr` (1e-5), 1500x below."""
    from lm_toy import tiny_llama

    peaks = {}
    for masked_step in (None, 8):
        args = training_args(
            str(tmp_path / str(masked_step)),
            max_steps=120,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            logging_steps=1000,
        )
        model, dataset = tiny_llama(), _MaskedBatchStream(masked_step)
        if entry_point == "callback":
            trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[AutoWUCallback()])
        else:
            trainer = AutoWUTrainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        scheduler = scheduler_of(trainer)
        peaks[masked_step] = scheduler.peak_lr
        assert scheduler.switch_reason != "divergence"
        if masked_step is not None:  # its gradients are zero: the state stayed finite, nothing to restore
            assert scheduler.retried["loss_index"] == masked_step and scheduler.retried["restored_step"] is None
        assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    assert peaks[None] / 4 <= peaks[8] <= 4 * peaks[None]


class _LRRecorder(TrainerCallback):
    """The LR of every optimizer step, read just before the step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_resume_after_a_retried_nan_is_bit_exact(entry_point, tmp_path):
    """The masked batch at step 8 is retried (warmup goes on); a checkpoint at step 15, after the retry, resumes
    with the uninterrupted run's LRs, decisions and final weights (the resumed run does not read that NaN again)."""
    from lm_toy import tiny_llama

    def train(folder: str, resume: str | None = None) -> tuple[Trainer, _LRRecorder]:
        recorder = _LRRecorder()
        args = training_args(
            folder,
            max_steps=40,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            logging_steps=1000,
            save_strategy="steps",
            save_steps=15,
        )
        model, dataset = tiny_llama(seed=1 if resume else 0), _MaskedBatchStream(8)  # resumed: all from the checkpoint
        if entry_point == "callback":
            trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder, AutoWUCallback()])
        else:
            trainer = AutoWUTrainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, recorder

    full, full_lrs = train(str(tmp_path / "full"))
    reference = scheduler_of(full)
    assert reference.retried["loss_index"] == 8 and reference.retried["step"] < 15
    resumed, resumed_lrs = train(str(tmp_path / "resumed"), resume=str(tmp_path / "full" / "checkpoint-15"))
    scheduler = scheduler_of(resumed)
    assert resumed_lrs.lrs == full_lrs.lrs[15:]
    assert scheduler.retried == reference.retried and scheduler.switch_step == reference.switch_step
    assert scheduler.switch_reason == reference.switch_reason != "divergence"
    # NaN where the retry left the history: equal as NaN
    torch.testing.assert_close(scheduler.losses, reference.losses, rtol=0, atol=0, equal_nan=True)
    reference_weights = full.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, reference_weights[name]), name


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_resume_whose_budget_ends_warmup_at_the_load_logs_the_switch(entry_point, tmp_path, caplog):
    """Resumed in warmup (step 10) with 12 steps in all, whose cooldown point has passed: warmup ends as the state is
    loaded, before the Trainer attaches its rewinder and its log; they still hear of the switch (one line, from the
    integration), and the 2 steps left decay linearly from the peak to 0."""
    args = training_args(str(tmp_path / "full"), save_strategy="steps", save_steps=10, logging_steps=100)
    full = make_trainer(entry_point, args)
    full.train()
    assert scheduler_of(full).switch_step > 10
    recorder = StepRecorder()
    resumed = make_trainer(entry_point, training_args(str(tmp_path / "r"), max_steps=12), callbacks=[recorder])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_autowu.trainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    scheduler = scheduler_of(resumed)
    assert (scheduler.switch_step, scheduler.switch_reason) == (10, "cap")
    switch_lines = [r for r in caplog.records if r.name == "hf_autowu.trainer" and "warmup ended" in r.getMessage()]
    assert len(switch_lines) == 1 and "after 10 steps (cap)" in switch_lines[0].getMessage()
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([scheduler.peak_lr, 0.5 * scheduler.peak_lr], rel=1e-12)
