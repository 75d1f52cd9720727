import math

import pytest
import torch
from helpers import make_optimizer
from transformers import HfArgumentParser

from hf_autowu import AutoWU, AutoWUCallback, AutoWUConfig


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"warmup_type": "cosine"}, "warmup_type"),
        ({"warmup_unit": "batch"}, "warmup_unit"),
        ({"cooldown_type": "one_minus_sqrt"}, "cooldown_type"),
        ({"decay_phase_stat": "accuracy"}, "decay_phase_stat"),
        ({"preset": "fast"}, "preset"),
        ({"max_warmup_fraction": 1.5}, "max_warmup_fraction"),
        ({"long_budget_steps": -1}, "long_budget_steps"),
        ({"long_budget_steps": 500.0}, "long_budget_steps"),
        ({"long_budget_steps": True}, "long_budget_steps"),
        ({"max_warmup_fraction": -0.1}, "max_warmup_fraction"),
        ({"cooldown_fraction": 2.0}, "cooldown_fraction"),
        ({"cooldown_fraction": math.nan}, "cooldown_fraction"),
        ({"min_lr": 0.0}, "min_lr"),
        ({"min_lr": -1e-3}, "min_lr"),
        ({"max_lr": math.inf}, "max_lr"),
        ({"min_lr": 1.0, "max_lr": 0.5}, "min_lr"),
        ({"min_lr": 0.1, "max_lr": 0.1}, "min_lr"),
        ({"decay_phase_factor": 0.0}, "decay_phase_factor"),
        ({"decay_phase_factor": 1.5}, "decay_phase_factor"),
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": 0.0}, "confidence"),
        ({"patience": 0}, "patience"),
        ({"patience": 2.5}, "patience"),
        ({"n_tests": 0}, "n_tests"),
        ({"test_interval": 0}, "test_interval"),
        ({"test_lr_growth": 1.0}, "test_lr_growth"),
        ({"immediate_cooldown": "yes"}, "immediate_cooldown"),
        ({"standardize_losses": "yes"}, "standardize_losses"),
        ({"seed": 1.5}, "seed"),
        ({"spike_watch": 1}, "spike_watch"),
        ({"rewind": 0}, "rewind"),
        ({"min_lr": 1e-200, "max_lr": 1e200}, "max_lr / min_lr"),
    ],
)
def test_invalid_option_names_the_option(options, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AutoWUConfig(**options)
    with pytest.raises(ValueError, match=f"`{name}`"):
        AutoWU(make_optimizer(), total_steps=100, **options)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": -5}, "total_steps"),
        ({"total_steps": 10.5}, "total_steps"),
        ({"steps_per_epoch": 0, "total_epochs": 3}, "steps_per_epoch"),
        ({"steps_per_epoch": 10, "total_epochs": 0}, "total_epochs"),
        ({"steps_per_epoch": 10, "total_epochs": math.inf}, "total_epochs"),
        ({}, "total_steps"),
        ({"total_steps": 100, "warmup_unit": "epoch"}, "steps_per_epoch"),
        ({"total_steps": 100, "decay_phase_stat": "loss"}, "steps_per_epoch"),
    ],
)
def test_invalid_budget_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AutoWU(make_optimizer(), **kwargs)


def test_a_misspelt_option_is_named_with_the_closest_one():
    for build in (
        lambda: AutoWU(make_optimizer(), total_steps=100, min_lrr=1e-4),
        lambda: AutoWU(make_optimizer(), total_steps=100, config={"confidense": 0.9}),
        lambda: AutoWUCallback(rewnd=False),
    ):
        with pytest.raises(ValueError, match=r"is not an AutoWU option\. Did you mean `(min_lr|confidence|rewind)`"):
            build()


def test_step_rejects_bad_losses():
    scheduler = AutoWU(make_optimizer(), total_steps=100)
    with pytest.raises(ValueError, match="loss"):
        scheduler.step()
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.ones(3))
    with pytest.raises(ValueError, match="loss"):
        scheduler.step("0.5")
    with pytest.raises(ValueError, match="real"):
        scheduler.step(torch.tensor(0.5 + 0.1j))
    with pytest.raises(ValueError, match="real"):
        scheduler.step(torch.tensor(True))  # as Python's and NumPy's bools are
    with pytest.raises(ValueError, match="loss"):
        scheduler.step(0.5 + 0.1j)


def test_numpy_scalars_and_paths_are_taken_as_plain_values(tmp_path):
    np = pytest.importorskip("numpy")
    scheduler = AutoWU(
        make_optimizer(),
        total_steps=np.int64(100),
        min_lr=np.float32(1e-4),
        patience=np.int64(4),
        rewind_offload_dir=tmp_path,
    )
    options = scheduler.config.to_dict()
    assert scheduler.total_steps == 100 and type(scheduler.total_steps) is int
    assert type(options["min_lr"]) is float and options["min_lr"] == float(np.float32(1e-4))
    assert type(options["patience"]) is int and options["rewind_offload_dir"] == str(tmp_path)
    for loss in (np.float32(0.5), np.array(0.5), np.float64(0.5)):
        scheduler.step(loss)
    assert scheduler.state_dict()["pending"].tolist() == [0.5, 0.5, 0.5]


def test_an_optimizer_without_an_lr_is_refused_clearly():
    from transformers.optimization import Adafactor

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="relative_step=False"):
        AutoWU(Adafactor(params), total_steps=100)  # relative_step=True: its LR is None
    scheduler = AutoWU(Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False), total_steps=100)
    assert scheduler.get_last_lr() == [1e-5]


@pytest.mark.parametrize("lr", [math.inf, math.nan, -1e-3])
def test_a_tensor_lr_that_is_not_finite_or_is_negative_is_refused_as_a_float_one_is(lr):
    params = [torch.nn.Parameter(torch.zeros(2))]
    if lr == math.inf:  # torch's Adam refuses the others itself
        with pytest.raises(ValueError, match="group 0 has lr="):
            AutoWU(torch.optim.Adam(params, lr=torch.tensor(lr)), total_steps=100)
    optimizer = torch.optim.Adam(params, lr=torch.tensor(1e-3))
    scheduler = AutoWU(optimizer, total_steps=100)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": torch.tensor(lr)})
    with pytest.raises(ValueError, match="group 1 has lr="):
        scheduler.step(1.0)


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, None])
def test_lr_at_refuses_what_is_not_a_step(step):
    scheduler = AutoWU(make_optimizer(), total_steps=100)
    with pytest.raises(ValueError, match="`step` must be an int >= 0"):
        scheduler.lr_at(step)


def test_reference_signature_and_defaults():
    with pytest.warns(FutureWarning, match="`device` is deprecated"):
        scheduler = AutoWU(make_optimizer(), 10, 4, immediate_cooldown=True, cooldown_type="cosine", device="cpu")
    assert scheduler.total_steps == 40
    config = scheduler.config
    assert (config.min_lr, config.max_lr, config.max_warmup_fraction) == (1e-5, 1.0, 0.5)
    assert (config.warmup_type, config.warmup_unit, config.cooldown_fraction) == ("exp", "step", 0.2)
    assert (config.confidence, config.patience, config.n_tests) == (0.95, 3, 5)
    assert config.decay_phase_stat is None and config.decay_phase_factor == 1.0


def test_config_and_options_combine():
    config = AutoWUConfig(min_lr=1e-4, preset="paper")
    scheduler = AutoWU(make_optimizer(), total_steps=50, config=config, max_lr=0.5)
    assert scheduler.config.min_lr == 1e-4
    assert scheduler.config.max_lr == 0.5
    assert scheduler.config.preset == "paper"


def test_presets_resolve_their_behaviour():
    paper = AutoWUConfig(preset="paper")
    robust = AutoWUConfig()
    assert robust.preset == "robust"
    assert not paper.effective_standardize_losses and robust.effective_standardize_losses
    assert not paper.effective_divergence_guard and robust.effective_divergence_guard
    assert paper.effective_test_lr_growth is None and robust.effective_test_lr_growth == 1.1
    assert AutoWUConfig(test_interval=7).effective_test_lr_growth is None
    assert not AutoWUConfig(standardize_losses=False).effective_standardize_losses


def test_config_is_a_command_line():
    (config,) = HfArgumentParser(AutoWUConfig).parse_args_into_dataclasses(
        ["--min_lr", "1e-4", "--preset", "paper", "--patience", "2", "--immediate_cooldown", "true"]
    )
    assert config == AutoWUConfig(min_lr=1e-4, preset="paper", patience=2, immediate_cooldown=True)


def test_on_off_options_are_command_line_flags():
    parser = HfArgumentParser(AutoWUConfig)
    (flagged,) = parser.parse_args_into_dataclasses(["--rewind", "--spike_watch", "false", "--rise_margin", "0.5"])
    assert flagged.rewind is True and flagged.spike_watch is False and flagged.rise_margin == 0.5
    (default,) = parser.parse_args_into_dataclasses([])
    assert default == AutoWUConfig() and default.rewind is None and default.effective_rewind


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"rise_margin": -1.0}, "rise_margin"),
        ({"swing_margin": -0.5}, "swing_margin"),
        ({"swing_margin": math.inf}, "swing_margin"),
        ({"swing_margin": "2"}, "swing_margin"),
        ({"rewind_min_shift": -0.1}, "rewind_min_shift"),
        ({"rewind_min_shift": math.inf}, "rewind_min_shift"),
        ({"slowed_fraction": 1.0}, "slowed_fraction"),
        ({"min_past_lengthscales": -0.5}, "min_past_lengthscales"),
        ({"min_past_lengthscales": math.nan}, "min_past_lengthscales"),
        ({"max_descent_left": 1.5}, "max_descent_left"),
        ({"max_descent_left": -0.1}, "max_descent_left"),
        ({"descent_required_below": -1}, "descent_required_below"),
        ({"descent_required_below": 30.5}, "descent_required_below"),
        ({"descent_required_below": True}, "descent_required_below"),
        ({"rewind_memory_fraction": 0.0}, "rewind_memory_fraction"),
        ({"rewind_offload_dir": 3}, "rewind_offload_dir"),
        ({"rewind_offload_dir": __file__}, "rewind_offload_dir"),  # a file, not a folder
        ({"n_tests": 10**7}, "n_tests"),  # each a posterior sample over the history: memory runs out
        ({"max_lr": 10**400}, "max_lr"),  # an int beyond any float
        ({"min_lr": 10**400}, "min_lr"),
        ({"spike_watch": "yes"}, "spike_watch"),
    ],
)
def test_new_options_are_validated(options, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AutoWUConfig(**options)
