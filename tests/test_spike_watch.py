"""The spike watch: a loss that blows up between two switch tests is caught on the next step and rewound; noise,
a falling loss and the paper preset never trigger it."""

import math

import numpy as np
import pytest
import torch
from helpers import make_optimizer, run_valley

from hf_autowu import AutoWU
from hf_autowu.watch import LossSpikeWatch

TOTAL, INTERVAL, DAMAGE_AT = 2000, 50, 120


def regression_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 8, generator=g)
    return x, x @ torch.linspace(-1, 1, 8).unsqueeze(1)


def train_with_a_damaging_update(damage_at: int | None, offset: float = 0.0):
    """SGD on a linear regression; at step `damage_at` the gradient is multiplied by 1e4, so that one update wrecks
    the weights and every later loss is huge (a real blow-up, between the tests at steps 100 and 150). AutoWU is
    given the loss plus `offset` (in float64: the offset is not rounded away), the gradient is the loss's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=TOTAL, test_interval=INTERVAL, min_lr=1e-3, max_lr=1e3)
    losses, weights = [], []
    for step in range(300):
        x, y = regression_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss * (1e4 if step == damage_at else 1.0)).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(loss.detach().double() + offset if offset else loss)
        losses.append(loss.item())
        weights.append(model.weight.detach().clone())
    return scheduler, losses, weights


@pytest.mark.parametrize("offset", [0.0, 1000.0, -1000.0])
def test_a_blow_up_between_tests_is_caught_on_the_next_step_and_rewound(offset):
    """The same with a constant added to the loss (a negative log-likelihood can be negative, a loss can carry a
    large constant term): the watch reads differences of losses only, and acts alike."""
    clean, _, _ = train_with_a_damaging_update(None, offset)
    assert clean.phase == "warmup", "without the damage nothing happens in the first 300 steps"
    scheduler, losses, weights = train_with_a_damaging_update(DAMAGE_AT, offset)
    first_bad = DAMAGE_AT + 1  # the first loss computed with the wrecked weights
    assert losses[first_bad] > 1e3 * losses[DAMAGE_AT]
    assert [r.step for r in scheduler.tests][-1] < first_bad < scheduler.tests[-1].step + INTERVAL
    # its loss is read at the next step (one step late, no sync), and that step switches
    assert scheduler.switch_reason == "spike" and scheduler.switch_step == first_bad + 2
    assert scheduler.peak_lr <= scheduler.lr_at(DAMAGE_AT)
    # the weights after the switch are a warmup snapshot's, from before the damage
    rewound = scheduler.rewinder.rewound_to
    assert rewound["step"] <= DAMAGE_AT
    assert torch.equal(weights[scheduler.switch_step - 1], weights[rewound["step"] - 1])
    # training goes on from there: the next loss is that snapshot's level, not the wrecked one
    assert losses[scheduler.switch_step] < 10 * losses[rewound["step"]]
    assert losses[scheduler.switch_step] < 1e-3 * losses[first_bad]


def run_falling_with_a_blow_up(blow_up_at: int | None) -> tuple[AutoWU, torch.nn.Parameter, list[int]]:
    """A loss falling steadily (so the GP's estimate is the LR reached) that jumps to 1e3 from loss `blow_up_at` on.
    The parameter holds the number of updates behind it, so its value after the switch says which state came back.
    Returns the scheduler, the parameter and the steps at which snapshots were taken."""
    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = AutoWU(torch.optim.SGD([param], lr=1.0), total_steps=400)
    generator = torch.Generator().manual_seed(0)
    snapshot_steps = []
    while scheduler.phase == "warmup":
        t = scheduler.last_step
        with torch.no_grad():
            param.fill_(t + 1)  # "training": the state after this step's update
        loss = 3.0 - t / 100 + 0.01 * float(torch.randn((), generator=generator))
        scheduler.step(1e3 if blow_up_at is not None and t >= blow_up_at else loss)
        snapshots = scheduler.rewinder.snapshots
        if snapshots and snapshots[-1]["step"] == scheduler.last_step:
            snapshot_steps.append(scheduler.last_step)
    return scheduler, param, snapshot_steps


def test_rewind_never_restores_the_state_a_blow_up_came_from():
    """The update that wrecks the weights can be a snapshot step, and its snapshot carries the same LR tag as the
    capped LR chosen: it must not be the one restored."""
    _, _, snapshot_steps = run_falling_with_a_blow_up(None)
    damaged = next(step for step in snapshot_steps if step >= 100)  # loss `damaged` is computed on that snapshot
    scheduler, param, _ = run_falling_with_a_blow_up(damaged)
    assert scheduler.switch_reason == "spike" and scheduler.damaged_from == damaged
    assert scheduler.peak_lr == scheduler.lr_at(damaged - 1)  # the estimate was capped at the damaging update's LR
    restored = int(param.item())
    assert restored < damaged and scheduler.rewinder.rewound_to["step"] == restored
    assert restored == max(step for step in snapshot_steps if step < damaged)


def falling_loss(step: int, generator: torch.Generator) -> float:
    """From 3 down to about 1, with noise of sd 0.01."""
    return 1.0 + 2.0 * math.exp(-step / 20) + 0.01 * float(torch.randn((), generator=generator))


def test_a_moderate_jump_needs_two_steps_above_the_margin():
    """By step 100 the loss has fallen by 2: a jump of 0.6 (a quarter of that progress is the margin, 0.5) counts
    twice in a row, not once."""
    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL, test_interval=INTERVAL)
    generator = torch.Generator().manual_seed(0)
    for step in range(130):
        jump = 0.6 if step in (110, 115, 116) else 0.0
        scheduler.step(falling_loss(step, generator) + jump)
    assert scheduler.switch_reason == "spike" and scheduler.switch_step == 116 + 2


@pytest.mark.parametrize("offset", [0.0, -2.0, 1000.0])
def test_a_bump_before_the_loss_has_fallen_is_left_to_the_test(offset):
    """A noisy loss that has not yet fallen clearly (less than the watch's 6 noise sds): a bump of 5 noise sds on two
    steps is no blow-up (nothing to give back), at any offset."""
    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL, test_interval=INTERVAL)
    generator = torch.Generator().manual_seed(0)
    for step in range(130):
        noise = 0.01 * float(torch.randn((), generator=generator))
        scheduler.step(offset + 2.0 - 1e-4 * step + noise + (0.05 if step in (110, 111) else 0.0))
    assert scheduler.phase == "warmup"


@pytest.mark.parametrize("floor", ["zero", "bfloat16"])
def test_a_blow_up_from_a_loss_whose_latest_values_are_all_equal_is_caught(floor):
    """A loss that fell to exactly 0 (a memorised batch) or that bfloat16 rounds to the same value step after step:
    the latest losses show no noise, and the watch takes the smallest change seen as its noise instead of going
    blind; a blow-up is caught as on a noisy loss (before, only the test at step 150 could see it)."""
    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL, test_interval=INTERVAL)
    generator = torch.Generator().manual_seed(0)
    for step in range(130):
        if floor == "zero":
            loss = torch.tensor(max(2.0 - 0.04 * step, 0.0) if step < 120 else 1.5)
        else:  # a level of about 1 after a fall from 2, noise far below bfloat16's step there (2**-7)
            level = 1.0 + math.exp(-step / 10) if step < 120 else 1.6
            loss = torch.tensor(level + 1e-4 * float(torch.randn((), generator=generator))).to(torch.bfloat16)
        scheduler.step(loss)
        if scheduler.phase != "warmup":
            break
    # two losses above the margin (120 and 121), the second read one step late
    assert scheduler.switch_reason == "spike" and scheduler.switch_step == 121 + 2


@pytest.mark.parametrize("seed", range(3))
def test_heavy_tailed_noise_does_not_trigger_it(seed):
    """Student-t noise (3 degrees of freedom) on a valley: the switch comes from the GP test, not the watch."""
    scheduler = AutoWU(make_optimizer(), total_steps=1000)
    torch.manual_seed(seed)
    t_noise = torch.distributions.StudentT(3.0)
    for _ in range(scheduler.total_steps):
        lr = scheduler.optimizer.param_groups[0]["lr"]
        distance = math.log10(lr / 1e-2)
        value = 1.0 + (0.5 if distance < 0 else 2.0) * distance**2
        scheduler.step(value + 0.02 * float(t_noise.sample()))
    assert scheduler.switch_reason == "test"


def test_the_noise_is_read_from_as_many_losses_as_the_reference_judges():
    """Against a closed form: 300 losses whose last 20 barely move (changes of 0.001) after 280 with changes of
    0.02. A reference that judges 20 losses reads its noise from the latest 20; one that judges 300 (a long budget's
    steps between tests) from the latest 300, whose median change is 0.02."""
    changes = (
        torch.cat([torch.full((280,), 0.02), torch.full((19,), 0.001)]) * torch.tensor([-1.0, 1.0]).repeat(150)[1:]
    )
    losses = 2.0 + torch.cat([torch.zeros(1), changes.cumsum(0)]).to(torch.float64) - torch.linspace(0, 1, 300)
    watch = LossSpikeWatch()
    gaussian_sd = 1.4826 / math.sqrt(2.0)  # median |x_t - x_(t-1)| of Gaussian noise, as its standard deviation
    noise = {}
    for judged, window in ((5, 20), (20, 20), (300, 300), (1000, 300)):
        watch.set_reference(losses, judged=judged)
        recent = losses[-window:].numpy()
        expected = float(np.median(np.abs(np.diff(recent)))) * gaussian_sd
        assert watch.noise_sd == pytest.approx(expected, rel=1e-6), judged
        noise[judged] = watch.noise_sd
    assert noise[300] > 5 * noise[20]


def test_a_long_budgets_reference_does_not_stop_a_falling_loss_on_noise():
    """A budget of 1e6 steps: about 90 steps between tests, each judged against one reference. A loss that falls
    steadily (0.1 per decade of LR) with Gaussian noise of 0.02 (`benchmarks/false_spikes.py`, seed 4) stopped on a
    false spike at step 655 when the noise was read from 20 losses; read from as many as are judged, it warms up on."""
    optimizer = make_optimizer()
    scheduler = AutoWU(optimizer, total_steps=10**6, rewind=False)
    draws = torch.randn(1500, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for draw in draws.tolist():
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(2.0 - 0.1 * math.log10(lr / 1e-5) + 0.02 * draw)
    assert scheduler.phase == "warmup" and len(scheduler.tests) >= 10


def test_the_paper_preset_has_no_watch():
    scheduler = AutoWU(make_optimizer(), total_steps=200, preset="paper")
    run_valley(scheduler, best_lr=1e-2)
    assert scheduler._watch is None and scheduler.switch_reason in ("test", "cap")


def first_switch(jumps: int, at_test: bool) -> tuple[int, int, str]:
    """A steadily falling loss with `jumps` losses in a row 0.25 above it (above the watch's margin, below its
    extreme), the first one arriving at a switch test (`at_test`) or one step after one: where they start, and
    where and why warmup ended."""
    generator = torch.Generator().manual_seed(0)
    optimizer = make_optimizer()
    scheduler = AutoWU(optimizer, total_steps=400)
    placed = None
    while scheduler.phase == "warmup":
        t = scheduler.last_step + 1
        lr = optimizer.param_groups[0]["lr"]
        loss = 3.0 - 0.3 * math.log10(lr / 1e-5) + 0.01 * float(torch.randn((), generator=generator))
        if placed is None and t > 60 and (t == scheduler._next_test) == at_test:
            placed = t - 1
        if placed is not None and placed <= t - 1 < placed + jumps:
            loss += 0.25
        scheduler.step(loss)
    return placed, scheduler.switch_step, scheduler.switch_reason


@pytest.mark.parametrize("at_test", [True, False])
def test_each_loss_is_checked_once_whether_a_test_or_the_next_step_reads_it(at_test):
    """A loss that arrives at a switch test is checked by the test's scan, and the step after it must not check it
    again: one high loss is no spike wherever it falls, two in a row are one, found at the second."""
    placed, step, reason = first_switch(jumps=1, at_test=at_test)
    assert reason != "spike" and step > placed + 50
    placed, step, reason = first_switch(jumps=2, at_test=at_test)
    assert reason == "spike" and step <= placed + 3  # the second high loss is read at the latest one step late
