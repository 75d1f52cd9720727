"""The LR trajectory against closed-form expectations written here, independently of hf_autowu.ramp."""

import math

import pytest
from helpers import make_optimizer

from hf_autowu import AutoWU

MIN_LR, MAX_LR = 1e-5, 1.0


def exp_ramp(t, warmup):
    return MIN_LR * (MAX_LR / MIN_LR) ** (t / warmup)


def drive(scheduler, losses):
    """Run the whole budget; return the LR of group 0 used at each step."""
    lrs = []
    for t in range(scheduler.total_steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.step(losses(t))
    return lrs


def falling(t):
    """A loss that only falls: the minimum is never in the past, so warmup runs to its cap."""
    return 5.0 * math.exp(-t / 40.0)


@pytest.mark.parametrize(
    ("total", "preset", "warmup"),
    [
        (500, "robust", 250),  # up to 500 steps: half the budget, as in the paper
        (3000, "paper", 1500),
        (3000, "robust", 612),  # beyond: half of sqrt(500 * 3000) = 612.4
        (20000, "robust", 1581),  # half of sqrt(500 * 20000) = 1581.1
    ],
)
def test_long_budgets_get_a_warmup_ramp_growing_with_the_square_root_of_the_budget(total, preset, warmup):
    scheduler = AutoWU(make_optimizer(), total_steps=total, preset=preset, rewind=False)
    assert scheduler.warmup_steps == warmup
    for t in (0, 1, warmup // 3, warmup - 1):
        assert scheduler.lr_at(t) == pytest.approx(exp_ramp(t, warmup), rel=1e-12)


def test_long_budget_steps_zero_restores_the_proportional_ramp():
    scheduler = AutoWU(make_optimizer(), total_steps=3000, long_budget_steps=0, rewind=False)
    assert scheduler.warmup_steps == 1500


@pytest.mark.parametrize("preset", ["paper", "robust"])
def test_exp_warmup_to_cap_then_cooldown(preset):
    total = 200
    scheduler = AutoWU(make_optimizer(), total_steps=total, immediate_cooldown=True, preset=preset)
    lrs = drive(scheduler, falling)
    warmup = 100
    for t in range(warmup):
        assert lrs[t] == pytest.approx(exp_ramp(t, warmup), rel=1e-12)
    assert scheduler.switch_step == warmup and scheduler.switch_reason == "cap"
    start = lrs[warmup]
    # paper: decay starts from the LR reached; robust: from the GP's estimate. The descent of the loss (5 exp(-t/40),
    # steepest at t=0) has slowed to 0.3 of its steepest rate at t = 40 ln(1/0.3) = 48.2, but 20% of the descent
    # down to the last loss (t = 99) is still ahead there, more than `max_descent_left` (0.06) allows: the estimate
    # is where only 0.06 of it is ahead, give or take the GP's smoothing
    if preset == "paper":
        assert start == pytest.approx(exp_ramp(warmup - 1, warmup), rel=1e-12)
    else:
        lowest = 5.0 * math.exp(-(warmup - 1) / 40)
        mostly_done = 40.0 * math.log(5.0 / (lowest + 0.06 * (5.0 - lowest)))  # 78.9
        assert start == pytest.approx(exp_ramp(mostly_done, warmup), rel=0.3)
    for t in range(warmup, total):
        progress = (t - warmup) / (total - warmup)  # cosine for the paper, linear for the robust default
        factor = 0.5 * (1 + math.cos(math.pi * progress)) if preset == "paper" else 1 - progress
        assert lrs[t] == pytest.approx(start * factor, rel=1e-12, abs=1e-15)
    assert lrs[-1] > 0.0, "the last step trains with a positive LR"
    assert scheduler.phase == "cooldown"


def test_linear_warmup():
    total = 100
    scheduler = AutoWU(make_optimizer(), total_steps=total, warmup_type="linear", preset="paper")
    lrs = drive(scheduler, falling)
    for t in range(50):
        assert lrs[t] == pytest.approx(MIN_LR + (MAX_LR - MIN_LR) * t / 50, rel=1e-12)


def test_epoch_warmup_unit_grows_once_per_epoch():
    scheduler = AutoWU(make_optimizer(), 10, 10, warmup_unit="epoch", preset="paper")
    lrs = drive(scheduler, falling)
    for t in range(50):
        assert lrs[t] == pytest.approx(MIN_LR * (MAX_LR / MIN_LR) ** ((t // 10) / 5), rel=1e-12)


@pytest.mark.parametrize("cooldown_type", ["cosine", "half_cosine", "linear"])
def test_constant_then_cooldown(cooldown_type):
    total = 200
    scheduler = AutoWU(
        make_optimizer(), total_steps=total, max_warmup_fraction=0.3, cooldown_type=cooldown_type, preset="paper"
    )
    lrs = drive(scheduler, falling)
    held = exp_ramp(59, 60)
    assert all(lr == pytest.approx(held, rel=1e-12) for lr in lrs[60:160])
    assert scheduler.phase == "cooldown"
    for t in range(160, total):
        progress = (t - 160) / 40
        if cooldown_type == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        elif cooldown_type == "linear":
            factor = 1 - progress
        else:
            factor = 0.5 + 0.5 * math.cos(math.pi / 2 * (1 + progress))
        assert lrs[t] == pytest.approx(held * factor, rel=1e-12)


def test_cooldown_preempts_a_warmup_still_going():
    # warmup may last 90% of the budget but cooldown starts at 50%
    scheduler = AutoWU(
        make_optimizer(), total_steps=100, max_warmup_fraction=0.9, cooldown_fraction=0.5, preset="paper"
    )
    lrs = drive(scheduler, falling)
    ramp = [MIN_LR * (MAX_LR / MIN_LR) ** (t / 90) for t in range(50)]
    assert lrs[:50] == pytest.approx(ramp, rel=1e-12)
    for t in range(50, 100):
        assert lrs[t] == pytest.approx(ramp[49] * 0.5 * (1 + math.cos(math.pi * (t - 50) / 50)), rel=1e-12)


def test_no_warmup_starts_at_max_lr():
    scheduler = AutoWU(make_optimizer(), total_steps=50, max_warmup_fraction=0.0, immediate_cooldown=True)
    lrs = drive(scheduler, falling)
    assert lrs[0] == MAX_LR
    assert lrs[10] == pytest.approx(MAX_LR * (1 - 10 / 50), rel=1e-12)  # the robust default's linear cooldown
    assert scheduler.switch_reason == "no_warmup"


@pytest.mark.parametrize(("preset", "shape"), [("robust", "linear"), ("paper", "cosine")])
def test_the_default_cooldown_is_linear_and_the_papers_cosine(preset, shape):
    # no warmup: max_lr is held until the cooldown starts at 80% of the budget, then decays in the preset's shape
    scheduler = AutoWU(make_optimizer(), total_steps=100, max_warmup_fraction=0.0, preset=preset)
    lrs = drive(scheduler, falling)
    assert lrs[:80] == [MAX_LR] * 80
    for t in range(80, 100):
        progress = (t - 80) / 20
        factor = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        assert lrs[t] == pytest.approx(MAX_LR * factor, rel=1e-12)
    assert 0 < lrs[-1] < 0.06 * MAX_LR  # the last step still trains, with a small positive LR


def test_decay_phase_factor_per_epoch():
    scheduler = AutoWU(make_optimizer(), 10, 20, max_warmup_fraction=0.2, decay_phase_factor=0.5, preset="paper")
    lrs = drive(scheduler, falling)
    start = exp_ramp(39, 40)
    for t in range(40, 160):
        assert lrs[t] == pytest.approx(start * 0.5 ** ((t - 40) // 10), rel=1e-12)


@pytest.mark.parametrize("offset", [0.0, -1000.0, 1000.0])
def test_reduce_on_plateau_of_epoch_mean_loss(offset):
    """A flat loss after warmup is a plateau wherever it lies: a constant added to the loss (a negative
    log-likelihood below zero) changes nothing."""

    def plateau(t):
        return offset + (falling(t) if t < 40 else 1.0)  # flat after warmup: every epoch is a bad epoch

    scheduler = AutoWU(
        make_optimizer(),
        10,
        20,
        max_warmup_fraction=0.2,
        decay_phase_stat="loss",
        decay_phase_factor=0.1,
        preset="paper",
    )
    lrs = drive(scheduler, plateau)
    start = exp_ramp(39, 40)
    # epoch 1 sets the best; epochs 2..7 are bad; the 6th bad epoch (> patience 5) reduces, at step 40 + 70
    assert all(lr == pytest.approx(start, rel=1e-12) for lr in lrs[40:110])
    assert all(lr == pytest.approx(start * 0.1, rel=1e-12) for lr in lrs[110:160])


def test_parameter_groups_keep_their_ratios():
    optimizer = make_optimizer((0.3, 0.03, 0.0))
    scheduler = AutoWU(optimizer, total_steps=120, immediate_cooldown=True)
    for t in range(120):
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs[1] == pytest.approx(0.1 * lrs[0], rel=1e-12)
        assert lrs[2] == 0.0
        assert scheduler.get_last_lr() == pytest.approx(lrs, rel=1e-12)
        scheduler.step(falling(t))


def test_lr_schedule_matches_what_was_applied():
    scheduler = AutoWU(make_optimizer(), total_steps=150, max_warmup_fraction=0.4)
    lrs = drive(scheduler, falling)
    assert scheduler.lr_schedule() == pytest.approx(lrs, rel=1e-12)


def test_plan_before_any_step_is_warmup_to_cap_then_decay():
    scheduler = AutoWU(make_optimizer(), total_steps=150, max_warmup_fraction=0.4, preset="paper")
    planned = scheduler.lr_schedule()
    assert drive(scheduler, falling) == pytest.approx(planned, rel=1e-12), "a run to the cap follows the plan"


def test_a_budget_that_is_all_cooldown_decays_from_the_ramps_first_lr():
    total = 10
    scheduler = AutoWU(make_optimizer(), total_steps=total, cooldown_fraction=1.0)
    lrs = drive(scheduler, falling)
    # one step on the ramp (its first LR), then the cap: a linear cooldown from there to the end of the budget
    expected = [MIN_LR] + [MIN_LR * (1.0 - (t - 1) / (total - 1)) for t in range(1, total)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert scheduler.lr_schedule() == pytest.approx(lrs, rel=1e-12)
