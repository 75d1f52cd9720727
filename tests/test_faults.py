"""Non-finite losses, numerical failures, tiny budgets, and no device sync on ordinary steps."""

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import make_optimizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_autowu.gp
from hf_autowu import AutoWU
from hf_autowu.log_entries import switch_message

LOSS_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-10, max_value=10),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e-30, 1e30, 1e300]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    losses=st.lists(LOSS_VALUES, min_size=1, max_size=90),
    total=st.integers(min_value=1, max_value=90),
    preset=st.sampled_from(["robust", "paper"]),
    warmup_type=st.sampled_from(["exp", "linear"]),
    immediate=st.booleans(),
    ratios=st.sampled_from([(1.0,), (1.0, 0.25)]),
)
def test_lr_is_always_finite_and_in_range(losses, total, preset, warmup_type, immediate, ratios):
    optimizer = make_optimizer(ratios)
    scheduler = AutoWU(
        optimizer,
        total_steps=total,
        preset=preset,
        warmup_type=warmup_type,
        immediate_cooldown=immediate,
        test_interval=3 if preset == "paper" else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(total):
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                assert math.isfinite(group["lr"])
                assert 0.0 <= group["lr"] <= scheduler.config.max_lr * ratio * (1 + 1e-12)
            scheduler.step(losses[t % len(losses)])


@pytest.mark.parametrize("preset", ["robust", "paper"])
def test_all_nan_history_does_not_crash(preset):
    scheduler = AutoWU(make_optimizer(), total_steps=100, preset=preset, test_interval=5)
    for _ in range(100):
        scheduler.step(torch.tensor(math.nan))
        assert math.isfinite(scheduler.get_last_lr()[0]) and scheduler.get_last_lr()[0] >= 0
    assert scheduler.tests == []  # nothing to fit, nothing tested
    if preset == "robust":
        # the guard reads a non-finite loss as divergence and falls back to the smallest LR
        assert scheduler.switch_reason == "divergence" and scheduler.peak_lr == scheduler.config.min_lr


def test_robust_switches_at_once_on_nan_and_rewinds_lr():
    scheduler = AutoWU(make_optimizer(), total_steps=400)
    t = 0
    while scheduler.phase == "warmup":
        lr = scheduler.get_last_lr()[0]
        scheduler.step(math.nan if lr > 1e-2 else 2.0 - 0.1 * math.log10(lr))
        t += 1
    assert scheduler.switch_reason == "divergence"
    assert "had not really fallen" not in switch_message(scheduler)  # it fell: the GP's estimate, not the rule
    # switched within one test interval of the first NaN, at the LR of the lowest loss seen
    first_nan = next(i for i in range(400) if scheduler.lr_at(i) > 1e-2)
    assert scheduler.switch_step - first_nan <= 10
    assert 5e-3 < scheduler.peak_lr <= 1e-2


@pytest.mark.parametrize("blow_up", ["nan", "rise"])
def test_a_flat_curve_that_blows_up_decays_from_a_decade_below_the_blow_up(blow_up):
    """A warmup loss that only wanders in its noise (as a fine-tune's can) until it blows up at 1e-2: its smoothed
    minimum is noise, so the LR chosen is a tenth of the LR of the update that blew up (a NaN), or of the LR at the
    test that saw the loss rise back above its start, the range test's rule. A curve that fell first keeps the
    GP's estimate (`test_robust_switches_at_once_on_nan_and_rewinds_lr`)."""
    total, blow_up_lr = 400, 1e-2
    scheduler = AutoWU(make_optimizer(), total_steps=total, rewind=False)
    generator = torch.Generator().manual_seed(0)
    ramp = [1e-5 * 1e5 ** (t / scheduler.warmup_steps) for t in range(total)]  # the closed-form exponential ramp
    t = 0
    while scheduler.phase == "warmup":
        noise = 0.05 * float(torch.randn((), generator=generator))
        behind = ramp[max(t - 1, 0)]  # loss number t comes from the update made at the previous step's LR
        if behind <= blow_up_lr:
            loss = 2.0 + noise
        else:
            loss = math.nan if blow_up == "nan" else 2.0 + 20.0 * math.log10(behind / blow_up_lr) + noise
        scheduler.step(loss)
        t += 1
    assert scheduler.switch_reason == "divergence"
    assert scheduler.last_outcome is not None and not scheduler.last_outcome.descended
    assert "had not really fallen before it blew up" in switch_message(scheduler)
    first_bad = next(i for i in range(1, total) if ramp[i - 1] > blow_up_lr)
    if blow_up == "nan":  # the first NaN is retried (nothing to restore here); the next one ends warmup
        retried = scheduler.retried
        assert retried is not None and retried["loss_index"] == first_bad and retried["restored_step"] is None
        assert retried["step"] - first_bad <= 2  # found within two steps
        assert scheduler.damaged_from == retried["step"]  # the first loss after the retry
        assert scheduler.peak_lr == pytest.approx(ramp[retried["step"] - 1] / 10, rel=1e-9)
    else:  # switched at a test a few steps into the rise, from a tenth of the LR there
        assert scheduler.peak_lr == pytest.approx(ramp[scheduler.switch_step - 1] / 10, rel=1e-9)
        assert blow_up_lr / 10 < scheduler.peak_lr < 2 * blow_up_lr / 10


def test_gp_failures_skip_the_test_with_a_warning(monkeypatch):
    def broken_cholesky(*args, **kwargs):
        raise np.linalg.LinAlgError("injected failure")

    scheduler = AutoWU(make_optimizer(), total_steps=200, preset="paper", test_interval=10)
    monkeypatch.setattr(hf_autowu.gp.np.linalg, "cholesky", broken_cholesky)
    with pytest.warns(UserWarning, match="skipped"):
        for t in range(60):
            scheduler.step(1.0 + 0.01 * t)
    assert scheduler.tests == [] and scheduler.phase == "warmup"
    monkeypatch.undo()
    for t in range(60, 100):
        scheduler.step(1.0 + 0.01 * t)
    assert scheduler.tests, "tests resume once the GP works again"


def test_extreme_loss_values_do_not_break_the_gp():
    scheduler = AutoWU(make_optimizer(), total_steps=200, preset="paper", test_interval=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(100):
            scheduler.step(1e200 * (1 + t % 3))
    assert all(math.isfinite(v) for v in scheduler._tester.gp.raw)
    assert math.isfinite(scheduler.get_last_lr()[0])


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300, 1e306, 1e307])
def test_decisions_are_the_same_at_any_loss_scale_a_float_holds(scale):
    """The default standardizes the losses: a valley's losses times 1e-300 ... 1e307 give the unscaled run's switch
    step, reason and LR. Beyond about 1e154 (or below 1e-154) the squares of a plain standard deviation overflow
    (underflow), and every test used to be skipped (the switch then came at the cap, from the range test's rule);
    beyond about 1e306 so did the sum of the losses behind their mean."""

    def decide(factor):
        optimizer = make_optimizer()
        scheduler = AutoWU(optimizer, total_steps=400)
        generator = torch.Generator().manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow warning either
            while scheduler.phase == "warmup":
                distance = math.log10(optimizer.param_groups[0]["lr"] / 1e-2)
                noise = 0.02 * float(torch.randn((), generator=generator))
                scheduler.step(factor * (1.0 + (0.5 if distance < 0 else 2.0) * distance**2 + noise))
        return scheduler.switch_step, scheduler.switch_reason, scheduler.peak_lr, len(scheduler.tests)

    reference = decide(1.0)
    assert reference[1] == "test"
    assert decide(scale) == reference


@pytest.mark.parametrize("total", [1, 2, 3])
@pytest.mark.parametrize("preset", ["robust", "paper"])
def test_tiny_budgets(total, preset):
    optimizer = make_optimizer()
    scheduler = AutoWU(optimizer, 1, total, preset=preset, immediate_cooldown=True)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1.0)
    assert all(math.isfinite(lr) and 0 < lr <= 1.0 for lr in lrs)
    assert scheduler.tests == [], "too few losses for a GP: no test is run"
    assert scheduler.phase == "cooldown"
    assert scheduler.last_step == total


def test_one_step_per_epoch_paper_budget_is_cheap():
    scheduler = AutoWU(make_optimizer(), 1, 30, preset="paper")
    for t in range(30):
        scheduler.step(1.0 / (t + 1))
    # tests at every epoch end of the 15-step warmup that has at least 3 losses
    assert [r.step for r in scheduler.tests] == list(range(3, 15))


def test_ordinary_steps_never_touch_the_loss_values():
    """Loss tensors on the meta device cannot be read: any sync or host copy would raise."""
    scheduler = AutoWU(make_optimizer(), total_steps=1000, test_interval=50)
    for _ in range(49):
        scheduler.step(torch.tensor(1.0, device="meta"))
    assert len(scheduler._pending) == 49
    with pytest.raises((NotImplementedError, RuntimeError)):
        scheduler.step(torch.tensor(1.0, device="meta"))  # the 50th step is a test: it needs the values
