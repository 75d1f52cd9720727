"""The LR the robust preset decays from after a blow-up, when the loss's noise grows as the model learns.

A preference loss (DPO's) is ln 2 with almost no noise while the policy is its reference, and its noise grows
fifty-fold as the policy moves away. The GP fits one noise level to the whole history, mostly the later noise, so a
real fall can read as none; and the rising losses at the end of the history pull its smoothed minimum toward the
LRs that made them. The rule: after a blow-up the fall of the losses' level (medians of ten in a row) is judged
against the first losses' noise, and after a rise a test found AutoWU decays from the estimate of the latest test
that saw no rise. (A flat curve that blows up still decays from a decade below: `test_faults.py`.)
"""

import math
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import make_optimizer, regression_batch, regression_mlp

from hf_autowu import AutoWU, switch_message
from hf_autowu.scheduler import BLOW_UP_BACKOFF
from hf_autowu.switch_test import fell_over_ramp, level_fall, sliding_medians, start_noise_sd

BEST_LR = 1e-3
"""The LR at the minimum of the noiseless curve below."""
BLOW_UP_LR = 2e-2
TOTAL_STEPS = 200


def growing_noise_loss(lr: float, draw: float) -> float:
    """A preference-like loss: ln 2 at a tiny LR, falling to 0.39 at `BEST_LR`, rising gently beyond it and steeply
    past `BLOW_UP_LR`; its noise standard deviation grows from 0.003 with the progress made (~100x at the bottom)."""
    x = math.log10(lr / BEST_LR)
    mean = 0.69 - 0.3 * math.exp(-0.5 * (x / 0.8) ** 2) if x < 0 else 0.39 + 0.03 * x
    mean += 4.0 * max(0.0, math.log10(lr / BLOW_UP_LR))
    return mean + (0.003 + max(0.0, 0.69 - mean)) * draw


def run(seed: int, stop_at: int | None = None, state: dict | None = None) -> tuple[AutoWU, list[float]]:
    """The robust defaults on `growing_noise_loss` to the end of warmup (the LR of every step), from `state` when
    given, saving nothing; with `stop_at`, only that many steps."""
    draws = np.random.default_rng(seed).standard_normal(TOTAL_STEPS)
    optimizer = make_optimizer()
    scheduler = AutoWU(optimizer, total_steps=TOTAL_STEPS)
    if state is not None:
        scheduler.load_state_dict(state)
    lrs = []
    while scheduler.phase == "warmup" and scheduler.last_step < (stop_at or TOTAL_STEPS):
        lr = optimizer.param_groups[0]["lr"]
        lrs.append(lr)
        scheduler.step(torch.tensor(growing_noise_loss(lr, float(draws[scheduler.last_step]))))
    lrs.append(optimizer.param_groups[0]["lr"])
    return scheduler, lrs


def test_start_noise_is_a_robust_standard_deviation_of_the_first_differences():
    """The median absolute deviation of the first 20 finite losses' differences, as a normal's standard deviation,
    over sqrt 2; later losses, however noisy, and non-finite ones do not count."""
    steps = [0.02, -0.04, 0.0, 0.01, -0.01, 0.03, 0.0, -0.02, 0.04, -0.01, 0.0, 0.01, -0.03, 0.02, 0.0, -0.01, 0.01]
    steps += [-0.02, 0.0]  # 19 differences: median 0, median absolute deviation 0.01
    start = 0.7 + np.concatenate([[0.0], np.cumsum(steps)])
    later = 0.4 + 0.3 * np.random.default_rng(0).standard_normal(40)
    expected = 1.4826 * 0.01 / math.sqrt(2)
    assert start_noise_sd(np.concatenate([start, later])) == pytest.approx(expected, rel=1e-9)
    with_gaps = np.concatenate([[math.nan], start[:5], [math.inf], start[5:], later])
    assert start_noise_sd(with_gaps) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(start_noise_sd(np.array([0.7, math.nan, 0.6])))  # fewer than three finite losses
    # on Gaussian noise around a falling line the trend drops out: the estimate is the noise's own scale
    noisy = 2.0 - 0.01 * np.arange(20) + 0.05 * np.random.default_rng(1).standard_normal(20)
    assert 0.025 < start_noise_sd(noisy) < 0.1


def test_the_level_fall_reads_medians_of_ten_losses_not_single_ones():
    """The median of the first ten losses minus the lowest median of ten in a row: a lone low loss does not move
    it, a stretch of low ones does; fewer than ten finite losses have no level to compare."""
    start, dip = np.full(10, 1.0), np.full(10, 0.5)
    assert level_fall(np.concatenate([start, dip, [3.0, 5.0, math.nan, 9.0]])) == pytest.approx(0.5)
    lone_low = np.concatenate([start, [0.1], start])
    assert level_fall(lone_low) == 0.0
    assert level_fall(np.concatenate([start[:5], [math.nan] * 10, start[:4] - 0.5])) == 0.0
    # white noise: medians of ten scatter by about 0.4 of the noise, far from the three noise SDs the rule asks
    noise = np.random.default_rng(0).standard_normal(200)
    assert level_fall(noise) < 1.5 * start_noise_sd(noise)


@pytest.mark.parametrize("seed", [1, 3])
def test_a_loss_whose_noise_grows_decays_from_before_the_rise_within_2x_of_its_minimum(seed):
    """The ramp passes the bottom (1e-3) and the loss rises past 2e-2; the test that sees the rise finds no descent
    by the GP's noise (so the old rule decayed from a decade below the rise, 3.5x above the bottom) and its estimate
    is pulled toward the rise (2e-3 and 5e-3). Judged against the first losses' noise the fall is real, and the LR
    decayed from is the estimate before the rise: within 2x of the bottom."""
    scheduler, _ = run(seed)
    last = scheduler.last_outcome
    assert scheduler.switch_reason == "divergence" and last.rising and last.passed
    assert not last.descended and last.descended_from_start
    ceiling = scheduler.tests[-1].lr
    assert ceiling > BLOW_UP_LR  # the rise was seen ...
    assert ceiling / BLOW_UP_BACKOFF > 3 * BEST_LR  # ... so a decade below it is 3x or more above the bottom
    assert BEST_LR / 2 <= scheduler.peak_lr <= 2 * BEST_LR
    assert scheduler.peak_lr != last.lr_estimate  # not the estimate of the test that saw the rise
    assert scheduler.peak_lr == scheduler.tests[-2].lr_estimate  # but that of the one before it
    # what the integrations print says the same: the loss fell, so not "a decade below the blow-up"
    assert last.fell
    assert "had not really fallen" not in switch_message(scheduler)


def test_a_resume_across_the_blow_up_decays_from_the_same_lr():
    """Saved at any step before the rise and resumed, the run switches at the same step to the same LR: the state
    holds the estimate of the latest test before the last one that saw no rise. A state written before the rule
    existed lacks it; it resumes, and the next test takes it from the saved last outcome."""
    uninterrupted, lrs = run(seed=3)
    assert uninterrupted.switch_reason == "divergence"
    steps = [t.step for t in uninterrupted.tests]
    for stop_at in (steps[-3], steps[-2], steps[-2] + 1, steps[-1] - 1):
        first, before = run(seed=3, stop_at=stop_at)
        state = first.state_dict()
        assert state["estimate_before_last"] == first.tests[-2].lr_estimate  # no test before the last one rose
        resumed, after = run(seed=3, state=state)
        assert before[:-1] + after == lrs
        assert (resumed.switch_step, resumed.peak_lr) == (uninterrupted.switch_step, uninterrupted.peak_lr)
        del state["estimate_before_last"]
        resumed, after = run(seed=3, state=state)
        assert before[:-1] + after == lrs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_loss_that_never_falls_decays_from_min_lr_at_the_cap(seed):
    """A loss that carries no signal of the LR (zero-mean noise over the whole ramp: a loss that does not track
    training, or a model whose trained weights are frozen) neither falls nor blows up, and warmup reaches its cap
    (on these seeds). The GP's lowest point of such a curve is noise, anywhere on the ramp (before, these seeds
    decayed from 1.0e-5, 5.1e-4 and 3.9e-5, and others from up to 0.6); AutoWU decays from `min_lr` instead and says
    why. A loss that falls over the same ramp keeps the GP's estimate."""
    total = 300
    draws = np.random.default_rng(seed).standard_normal(total)
    scheduler = AutoWU(make_optimizer(), total_steps=total)
    with pytest.warns(UserWarning, match="restoring the oldest kept") as caught:
        for draw in draws:
            scheduler.step(torch.tensor(0.01 * float(draw)))
    assert scheduler.switch_reason == "cap" and scheduler.switch_step == scheduler.warmup_steps
    assert not scheduler.last_outcome.fell
    assert scheduler.peak_lr == scheduler.config.min_lr
    # rewind restores its oldest kept snapshot, trained above min_lr (the kept ones follow the GP's estimate), and
    # the warning names which one
    restored = scheduler.rewinder.rewound_to
    assert restored["lr"] > scheduler.config.min_lr
    (message,) = [str(w.message) for w in caught if "restoring the oldest kept" in str(w.message)]
    assert f"of step {restored['step']} (LRs up to {restored['lr']:.3g})" in message
    assert "not read from a descent" in switch_message(scheduler)
    falling = AutoWU(make_optimizer(), total_steps=total)
    for draw in draws:
        falling.step(torch.tensor(2.0 - 0.005 * falling.last_step + 0.01 * float(draw)))
    assert falling.switch_reason == "cap" and falling.last_outcome.fell
    assert falling.peak_lr == falling.last_outcome.lr_estimate > 100 * falling.config.min_lr
    assert "not read from a descent" not in switch_message(falling)


@pytest.mark.parametrize("seed", [5, 7, 8])
def test_a_fall_of_a_few_losses_noise_counts_at_the_cap_over_a_third_of_the_ramp(seed):
    """Each loss's noise (0.9) is a large part of a level that falls by 1.8 (from 3.2) and stays there: medians of
    ten read no fall (on these seeds: under three of the first losses' noise), medians of a third of the ramp do, at
    a threshold scaled to their smaller noise. The same statistic on the same noise without the fall stays below."""
    rng = np.random.default_rng(seed)
    n = 150
    level = np.where(np.arange(n) < 90, 3.2, 1.4)
    noise = 0.9 * rng.standard_normal(n)
    falling, flat = level + noise, 3.2 + noise
    assert level_fall(falling) < 3 * start_noise_sd(falling), "medians of ten must miss this fall"
    assert fell_over_ramp(falling)
    assert not fell_over_ramp(flat)
    with_gaps = falling.copy()
    with_gaps[[3, 60, 120]] = math.nan
    assert fell_over_ramp(with_gaps)
    assert not fell_over_ramp(np.full(n, 1.0)), "no measurable noise: no judged fall"


def test_sliding_medians_are_numpys_medians_of_every_window():
    """Bit for bit `np.median` over each window, odd and even sizes, with ties (losses rounded to 0.1)."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 10, 11, 157):
        values = np.round(rng.standard_normal(n), 1)
        for window in {1, 2, 3, 10, 11, n // 3 or 1, n}:
            if window > n:
                continue
            expected = np.median(np.lib.stride_tricks.sliding_window_view(values, window), axis=-1)
            np.testing.assert_array_equal(sliding_medians(values, window), expected)


def test_a_long_flat_ramp_reaches_its_cap_in_memory_that_grows_with_its_length_not_its_square():
    """A loss that carries no signal over a 10,000-step warmup: at the cap `fell_over_ramp` reads medians of a third
    of the ramp. Copying every window of 3,333 losses (as `np.median` over a sliding window view does) would take
    ~180 MB here and ~18 GB at 100,000 losses, on every process; the rank filters take a few arrays of the ramp's
    length. The decision is the one `_lr_without_descent` states: decay from `min_lr`."""
    total = 20_000
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=total, long_budget_steps=0)
    assert scheduler.warmup_steps == total // 2
    draws = np.random.default_rng(0).standard_normal(scheduler.warmup_steps)
    tracemalloc.start()
    try:
        for draw in draws:
            optimizer.step()
            scheduler.step(1.0 + 0.1 * float(draw))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scheduler.phase == "decay" and scheduler.switch_reason == "cap"
    assert scheduler.peak_lr == scheduler.config.min_lr
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB traced at the cap"


def noisy_regression_run(total: int, batch: int) -> tuple[AutoWU, list[float]]:
    """The README's hand loop on a regression whose per-batch loss is noisy (targets with variance 3, 16 rows)."""
    model = regression_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = AutoWU(optimizer, total_steps=total, immediate_cooldown=True)
    losses = []
    for step in range(total):
        x, y = regression_batch(step, batch)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        scheduler.step(loss)
    return scheduler, losses


def test_a_noisy_regression_that_falls_decays_from_the_estimate_at_the_cap():
    """A real loop: the loss falls from about 3.2 to 0.4 over the ramp with +-0.9 of batch noise, and warmup reaches
    its cap. Judged by medians of ten the fall was noise and the run spent its decay at `min_lr` (final loss 0.26,
    median of the last 20). Over a third of the ramp the fall counts: the run decays from the GP's estimate, inside
    the ramp's low region, and ends at 0.13."""
    scheduler, losses = noisy_regression_run(300, 16)
    assert scheduler.switch_reason == "cap" and not scheduler.last_outcome.fell
    assert 1e-2 < scheduler.peak_lr < 0.3
    assert "not read from a descent" not in switch_message(scheduler)
    assert np.median(losses[-20:]) < 0.2
