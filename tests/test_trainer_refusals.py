"""Setups in which AutoWU cannot own the learning rate are refused with a clear message, by both entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import schedulefree
import torch
from transformers import Trainer, TrainerControl, TrainerState

from hf_autowu import AutoWU, AutoWUCallback, AutoWUTrainer

sys.path.insert(0, str(Path(__file__).parent / "multiprocess"))
from trainer_toy import ToyRegressor, regression_data, training_args  # noqa: E402

ENTRY_POINTS = ("callback", "trainer")


def build_and_train(entry_point: str, args, optimizers=(None, None), callbacks=()) -> None:
    """Build the trainer through `entry_point` and train (the callback checks at `on_train_begin`)."""
    common = {
        "model": ToyRegressor(),
        "args": args,
        "train_dataset": regression_data(),
        "eval_dataset": regression_data(8),
        "optimizers": optimizers,
    }
    if entry_point == "callback":
        trainer = Trainer(**common, callbacks=[*callbacks, AutoWUCallback()])
    else:
        trainer = AutoWUTrainer(**common, callbacks=list(callbacks))
    trainer.train()


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps"}, "reduce_lr_on_plateau"),
        ({"lr_scheduler_type": "greedy", "eval_strategy": "steps"}, "greedy"),
        ({"optim": "schedule_free_adamw"}, "schedule-free"),
    ],
)
def test_refused_arguments(entry_point, overrides, message, tmp_path):
    args = training_args(str(tmp_path), max_steps=2, **overrides)
    with pytest.raises(ValueError, match=message):
        build_and_train(entry_point, args)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("optim", ["galore_adamw_layerwise", "lomo"])
def test_refused_optimizers_that_step_in_backward(entry_point, optim, tmp_path):
    """(GaLore and LOMO are not installed here: the optimizer is given, so the Trainer does not build one.)"""
    model = ToyRegressor()
    args = training_args(str(tmp_path), max_steps=2, optim=optim)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=f"optim='{optim}'.*inside the backward pass"):
        build_and_train(entry_point, args, optimizers=(optimizer, None))


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_refused_schedule_free_optimizer_instance(entry_point, tmp_path):
    optimizer = schedulefree.AdamWScheduleFree(ToyRegressor().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="schedule-free"):
        build_and_train(entry_point, training_args(str(tmp_path), max_steps=2), optimizers=(optimizer, None))


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_refused_deepspeed_owned_scheduler(entry_point, tmp_path):
    """(The config is set after the arguments were validated, so DeepSpeed does not start; `tests/test_deepspeed.py`
    refuses a real DeepSpeed run's config.)"""
    args = training_args(str(tmp_path), max_steps=2)
    args.deepspeed = {"scheduler": {"type": "WarmupLR", "params": {}}, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ValueError, match="DeepSpeed owns"):
        build_and_train(entry_point, args)


def test_trainer_refuses_a_given_scheduler_and_a_second_autowu(tmp_path):
    model = ToyRegressor()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)
    args = training_args(str(tmp_path), max_steps=2)
    with pytest.raises(ValueError, match=r"optimizers=\(optimizer, None\)"):
        AutoWUTrainer(model=model, args=args, train_dataset=regression_data(), optimizers=(optimizer, scheduler))
    with pytest.raises(ValueError, match="remove the AutoWUCallback"):
        AutoWUTrainer(model=model, args=args, train_dataset=regression_data(), callbacks=[AutoWUCallback()])


def test_autowu_given_to_a_plain_trainer_as_its_scheduler_points_to_the_entry_points(tmp_path):
    """A plain `Trainer` steps its scheduler without a loss: the first step says how AutoWU gets one."""
    model = ToyRegressor()
    optimizer = torch.optim.AdamW(model.parameters())
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=2),
        train_dataset=regression_data(),
        optimizers=(optimizer, AutoWU(optimizer, total_steps=2)),
    )
    with pytest.raises(ValueError, match=r"callbacks=\[AutoWUCallback\(\)\]"):
        trainer.train()


def test_callback_outside_a_trainer_points_to_autowu_trainer(tmp_path):
    callback = AutoWUCallback()
    with pytest.raises(RuntimeError, match="Use AutoWUTrainer"):
        callback.on_train_begin(training_args(str(tmp_path)), TrainerState(), TrainerControl())


def test_the_callback_refuses_a_reduce_on_plateau_scheduler_given_to_the_trainer(tmp_path):
    """The Trainer steps a given ReduceLROnPlateau after evaluation, after AutoWU has set the LR."""
    model = ToyRegressor()
    optimizer = torch.optim.AdamW(model.parameters())
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    args = training_args(str(tmp_path), max_steps=2, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        build_and_train("callback", args, optimizers=(optimizer, plateau))


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_options_may_come_as_a_dict_and_anything_else_is_refused(entry_point, tmp_path):
    common = {"model": ToyRegressor(), "args": training_args(str(tmp_path), max_steps=2)}
    common["train_dataset"] = regression_data()
    if entry_point == "callback":
        callback = AutoWUCallback({"max_lr": 2.0}, min_lr=1e-4)
        assert (callback.config.max_lr, callback.config.min_lr) == (2.0, 1e-4)
        with pytest.raises(ValueError, match="`config`"):
            AutoWUCallback("robust")
    else:
        trainer = AutoWUTrainer(**common, autowu_config={"max_lr": 2.0})
        assert trainer.autowu_config.max_lr == 2.0
        with pytest.raises(ValueError, match="`autowu_config`"):
            AutoWUTrainer(**common, autowu_config=["max_lr", 2.0])
