"""`AutoWUArguments`: AutoWU's options parsed beside `TrainingArguments`, with the run's seed."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

import hf_autowu.trainer
from hf_autowu import AutoWU, AutoWUArguments, AutoWUCallback, AutoWUConfig, AutoWUTrainer

sys.path.insert(0, str(Path(__file__).parent / "multiprocess"))
from trainer_toy import AUTOWU_OPTIONS, StepRecorder, ToyRegressor, regression_data, training_args  # noqa: E402


@pytest.fixture(autouse=True)
def no_figure(monkeypatch):
    monkeypatch.setattr(hf_autowu.trainer, "SAVE_FIGURE", False)


def parse(argv: list[str]) -> tuple[TrainingArguments, AutoWUArguments]:
    parser = HfArgumentParser((TrainingArguments, AutoWUArguments))
    return parser.parse_args_into_dataclasses(args=["--output_dir", "unused", "--use_cpu", "true", *argv])


def test_autowu_config_beside_training_arguments_clashes_on_seed():
    """The reason for the class: both dataclasses have `seed`."""
    with pytest.raises(Exception, match="--seed"):
        HfArgumentParser((TrainingArguments, AutoWUConfig))


def test_every_option_but_seed_and_device_is_a_flag():
    training, autowu = parse(["--seed", "7", "--min_lr", "1e-4", "--max_warmup_fraction", "0.3", "--preset", "paper"])
    assert training.seed == 7
    assert (autowu.min_lr, autowu.max_warmup_fraction, autowu.preset) == (1e-4, 0.3, "paper")
    flags = {action.dest for action in HfArgumentParser(AutoWUArguments)._actions}
    options = {option.name for option in dataclasses.fields(AutoWUConfig)}
    assert options - flags == {"seed", "device"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], None), (["--rewind"], True), (["--rewind", "false"], False), (["--rewind", "yes"], True)],
)
def test_optional_switches_take_a_value_or_none(argv, expected):
    _, autowu = parse(argv)
    assert autowu.rewind is expected


def test_invalid_values_are_refused_by_name():
    with pytest.raises(ValueError, match="min_lr"):
        parse(["--min_lr", "-1"])


def test_to_config_is_the_same_options_with_the_seed():
    _, autowu = parse(["--min_lr", "1e-4", "--cooldown_type", "cosine", "--rewind", "false"])
    config = autowu.to_config(seed=11)
    assert type(config) is AutoWUConfig
    assert config == AutoWUConfig(min_lr=1e-4, cooldown_type="cosine", rewind=False, seed=11)


def run_lrs(entry_point: str, output_dir: str, run_seed: int, config: AutoWUConfig, **options) -> tuple[list, AutoWU]:
    """The LR of every step of a 60-step Trainer run with seed `run_seed`, and its scheduler."""
    torch.manual_seed(0)
    recorder = StepRecorder()
    args = training_args(output_dir, seed=run_seed)
    model, dataset = ToyRegressor(), regression_data()
    if entry_point == "callback":
        callback = AutoWUCallback(config, **options)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder, callback])
    else:
        assert not options
        trainer = AutoWUTrainer(
            model=model, args=args, train_dataset=dataset, callbacks=[recorder], autowu_config=config
        )
    trainer.train()
    scheduler = callback.scheduler if entry_point == "callback" else trainer.lr_scheduler
    return [lrs[0] for lrs in recorder.lrs], scheduler


@pytest.mark.parametrize("entry_point", ["callback", "trainer"])
def test_the_trainer_runs_them_with_the_runs_seed(entry_point, tmp_path):
    """Given `AutoWUArguments`, both entry points run exactly as with an `AutoWUConfig` carrying `args.seed`."""
    arguments = AutoWUArguments(**AUTOWU_OPTIONS)
    lrs, scheduler = run_lrs(entry_point, str(tmp_path / "arguments"), 7, arguments)
    assert scheduler.config.seed == 7 and type(scheduler.config) is AutoWUConfig
    expected, _ = run_lrs(entry_point, str(tmp_path / "config"), 7, AutoWUConfig(**AUTOWU_OPTIONS, seed=7))
    assert lrs == expected
    assert scheduler.switch_step is not None and 0 < scheduler.switch_step < 60


def test_options_on_top_keep_the_runs_seed(tmp_path):
    """`AutoWUCallback(arguments, min_lr=...)` still takes the run's seed; an explicit `seed=` is AutoWU's own."""
    arguments = AutoWUArguments(**{**AUTOWU_OPTIONS, "min_lr": 1e-3})
    _, scheduler = run_lrs("callback", str(tmp_path / "a"), 5, arguments, min_lr=AUTOWU_OPTIONS["min_lr"])
    assert (scheduler.config.seed, scheduler.config.min_lr) == (5, AUTOWU_OPTIONS["min_lr"])
    _, scheduler = run_lrs("callback", str(tmp_path / "b"), 5, arguments, seed=3)
    assert scheduler.config.seed == 3


@pytest.mark.parametrize("name", ["SFTConfig", "DPOConfig", "GRPOConfig", "RewardConfig"])
def test_they_parse_beside_trls_configs(name):
    """TRL's configs are `TrainingArguments` with more fields; none clashes with an AutoWU option."""
    trl = pytest.importorskip("trl")
    parser = HfArgumentParser((getattr(trl, name), AutoWUArguments))
    training, autowu = parser.parse_args_into_dataclasses(
        args=["--output_dir", "unused", "--use_cpu", "true", "--seed", "3", "--min_lr", "1e-4", "--rewind"]
    )
    assert training.seed == 3 and autowu.min_lr == 1e-4 and autowu.rewind is True
    assert autowu.to_config(seed=training.seed).seed == 3
