"""A scheduler restored from `state_dict()` at any step continues exactly like the uninterrupted one."""

import math

import pytest
import torch
from helpers import make_optimizer, roundtrip, valley_loss

from hf_autowu import AutoWU

TOTAL = 300


def new_scheduler(preset):
    return AutoWU(make_optimizer((0.5, 0.05)), 10, TOTAL // 10, preset=preset, decay_phase_factor=0.9)


def losses_for(lrs_seen):
    """Deterministic losses from the LR (a valley at 3e-3) with noise keyed by the step, as tensors."""
    g = torch.Generator().manual_seed(len(lrs_seen))
    return torch.tensor(valley_loss(lrs_seen[-1], 3e-3, 0.03, g), dtype=torch.float32)


def run(scheduler, start, stop, lrs):
    for _ in range(start, stop):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.step(losses_for(lrs))
    return lrs


@pytest.fixture(scope="module", params=["robust", "paper"])
def uninterrupted(request):
    scheduler = new_scheduler(request.param)
    lrs = run(scheduler, 0, TOTAL, [])
    assert scheduler.switch_reason == "test", "the scenario must switch on the GP test"
    return request.param, scheduler, lrs


def checkpoints(scheduler):
    """Mid-warmup, at a test step, right after the switch, in decay, in cooldown."""
    first_test = scheduler.tests[0].step
    return [
        first_test - 2,
        first_test,
        scheduler.switch_step,
        scheduler.switch_step + 15,
        scheduler.cooldown_start + 5,
    ]


def test_resume_anywhere_is_bit_exact(uninterrupted):
    preset, reference, expected = uninterrupted
    assert reference.phase == "cooldown"
    for stop in checkpoints(reference):
        first = new_scheduler(preset)
        lrs = run(first, 0, stop, [])
        state = roundtrip(first.state_dict())
        resumed = new_scheduler(preset)
        resumed.load_state_dict(state)
        assert resumed.optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * resumed.optimizer.param_groups[0]["lr"])
        run(resumed, stop, TOTAL, lrs)
        assert lrs == expected, f"diverged after resuming at step {stop}"
        assert resumed.tests == reference.tests
        assert resumed.switch_step == reference.switch_step and resumed.peak_lr == reference.peak_lr


def test_state_dict_is_plain(uninterrupted):
    _, scheduler, _ = uninterrupted
    state = scheduler.state_dict()
    allowed = (int, float, str, bool, type(None), torch.Tensor)

    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str)
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert isinstance(value, allowed), type(value)

    check(state)
    assert roundtrip(state)["peak_lr"] == scheduler.peak_lr
    assert math.isfinite(scheduler.peak_lr)


def test_readable_state(uninterrupted):
    _, scheduler, lrs = uninterrupted
    assert scheduler.phase == "cooldown"
    assert scheduler.peak_lr == lrs[scheduler.switch_step]
    record = scheduler.tests[-1]
    assert record.step == scheduler.switch_step and record.passed
    assert 0.0 <= record.probability <= 1.0 and 0 <= record.votes <= 5


def test_a_state_saved_before_descended_existed_resumes_bit_exact(uninterrupted):
    """States written before `SwitchTestOutcome.descended` was recorded lack it: they load as "descended" (the GP's
    estimate is trusted after a blow-up, as it always was then) and the run goes on exactly."""
    preset, reference, expected = uninterrupted
    stop = reference.tests[0].step + 2
    first = new_scheduler(preset)
    lrs = run(first, 0, stop, [])
    state = roundtrip(first.state_dict())
    assert state["last_outcome"] is not None
    del state["last_outcome"]["descended"]
    resumed = new_scheduler(preset)
    resumed.load_state_dict(state)
    assert resumed.last_outcome.descended is True
    run(resumed, stop, TOTAL, lrs)
    assert lrs == expected


def test_a_state_saved_before_the_resolution_rules_existed_resumes_as_it_would_have_gone_on():
    """States written before `min_past_lengthscales`, `max_descent_left`, `descent_required_below` and
    `swing_margin` existed lack them in their config: they load with the values their run decided with (0, 1, 0 and
    0), so a resumed warmup goes on exactly like an uninterrupted run with those values, not like one with today's
    defaults."""
    old_options = {
        "min_past_lengthscales": 0.0,
        "max_descent_left": 1.0,
        "descent_required_below": 0,
        "swing_margin": 0.0,
    }

    noise = torch.randn(TOTAL, generator=torch.Generator().manual_seed(0)).tolist()

    def drop_losses(lrs_seen):  # a sharp drop at LR 1e-3 into a flat stretch: the rules tell these apart
        drop = 1.0 / (1.0 + math.exp(math.log10(lrs_seen[-1] / 1e-3) / 0.03))
        return 1.0 + drop + 0.02 * noise[len(lrs_seen) - 1]

    def train(scheduler, start, stop, lrs):
        for _ in range(start, stop):
            lrs.append(scheduler.optimizer.param_groups[0]["lr"])
            scheduler.step(drop_losses(lrs))
        return lrs

    def scheduler(**options):
        return AutoWU(make_optimizer((0.5, 0.05)), total_steps=TOTAL, **options)

    expected = train(scheduler(**old_options), 0, TOTAL, [])
    assert train(scheduler(), 0, TOTAL, []) != expected  # the rules decide differently on this curve
    first = scheduler(**old_options)
    lrs = train(first, 0, 40, [])
    state = roundtrip(first.state_dict())
    for name in old_options:
        del state["config"][name]
    resumed = scheduler()
    with pytest.warns(
        UserWarning,
        match=r"saved with other options \(descent_required_below, max_descent_left, min_past_lengthscales, "
        r"swing_margin\)",
    ):
        resumed.load_state_dict(state)
    assert {name: getattr(resumed.config, name) for name in old_options} == old_options
    train(resumed, 40, TOTAL, lrs)
    assert lrs == expected


def test_loading_a_state_that_is_not_autowus_names_the_problem():
    optimizer = make_optimizer()
    other = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match="not an AutoWU state"):
        AutoWU(optimizer, total_steps=100).load_state_dict(other.state_dict())


@pytest.mark.parametrize("new_total", [450, 200])
def test_a_state_loaded_into_a_scheduler_with_another_budget_is_re_planned_until_its_cooldown(new_total, caplog):
    """Loaded while holding the peak into a scheduler built for another budget: the LR holds until that budget's
    cooldown (its last 20%, linear to 0), as if the run had been planned for it after the switch. Loaded in the
    cooldown, the saved plan is kept, with a warning."""
    reference = AutoWU(make_optimizer(), total_steps=TOTAL)
    lrs = run(reference, 0, TOTAL, [])
    assert reference.switch_step < 150 < reference.cooldown_start
    peak = lrs[reference.switch_step + 1]

    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL)
    run(scheduler, 0, 150, [])
    resumed = AutoWU(make_optimizer(), total_steps=new_total)
    with caplog.at_level("WARNING", logger="hf_autowu.scheduler"):
        resumed.load_state_dict(roundtrip(scheduler.state_dict()))
    assert f"re-planned for this run's {new_total}" in caplog.text
    start = new_total - int(0.2 * new_total)
    expected = [peak if t < start else peak * (1.0 - (t - start) / (new_total - start)) for t in range(150, new_total)]
    assert run(resumed, 150, new_total, []) == pytest.approx(expected, rel=1e-12)

    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL)
    run(scheduler, 0, 260, [])
    resumed = AutoWU(make_optimizer(), total_steps=new_total)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_autowu.scheduler"):
        resumed.load_state_dict(roundtrip(scheduler.state_dict()))
    assert "the saved plan is kept" in caplog.text
    assert run(resumed, 260, TOTAL, []) == lrs[260:TOTAL]


def test_a_warmup_resumed_with_a_budget_whose_cooldown_has_passed_decays_from_the_resumed_step():
    """Saved in warmup after 150 steps of a 400-step budget (a loss still falling: no switch), resumed with 160
    steps, whose cooldown point (128) has passed: warmup ends at once, at its cap, and the resumed steps 150-159
    decay linearly to 0, as in a run planned with its cooldown from step 150 (the same ramp, `cooldown_fraction`
    250/400). The first resumed step used to train at the plan's LR and the cooldown to begin a step late."""

    def falling(scheduler, start, stop, lrs):
        for step in range(start, stop):
            lrs.append(scheduler.get_last_lr()[0])
            noise = 0.01 * float(torch.randn((), generator=torch.Generator().manual_seed(step)))
            scheduler.step(2.0 - 0.1 * math.log10(lrs[-1] / 1e-5) + noise)
        return lrs

    saved = AutoWU(make_optimizer(), total_steps=400)
    falling(saved, 0, 150, [])
    assert saved.phase == "warmup" and saved.warmup_steps == 200
    planned = AutoWU(make_optimizer(), total_steps=400, cooldown_fraction=250 / 400)
    falling(planned, 0, 150, [])
    assert planned.switch_step == 150 and planned.switch_reason == "cap"

    resumed = AutoWU(make_optimizer(), total_steps=160)
    resumed.load_state_dict(roundtrip(saved.state_dict()))
    assert (resumed.phase, resumed.switch_step, resumed.switch_reason) == ("cooldown", 150, "cap")
    assert resumed.peak_lr == planned.peak_lr
    expected = [planned.peak_lr * (1.0 - (t - 150) / 10) for t in range(150, 160)]
    assert falling(resumed, 150, 160, []) == pytest.approx(expected, rel=1e-12)


def test_a_second_resume_after_a_budget_change_keeps_the_ramp():
    """Begun with 400 steps, resumed in warmup with 600 (the ramp keeps its pace), saved and resumed again with 600:
    the LRs are those of the run resumed once (the second resume used to rebuild the ramp from the new budget)."""
    options = {"min_lr": 1e-2, "max_lr": 10.0}

    def lrs_of(scheduler, start, stop, lrs):
        for step in range(start, stop):
            lrs.append(scheduler.get_last_lr()[0])
            scheduler.step(valley_loss(lrs[-1], 1.0, 0.02, torch.Generator().manual_seed(step)))
        return lrs

    first = AutoWU(make_optimizer(), total_steps=400, **options)
    lrs = lrs_of(first, 0, 60, [])
    once = AutoWU(make_optimizer(), total_steps=600, **options)
    once.load_state_dict(roundtrip(first.state_dict()))
    lrs_of(once, 60, 80, lrs)
    saved = roundtrip(once.state_dict())
    expected = lrs_of(once, 80, 600, list(lrs))
    assert once.switch_step > 80 and once.warmup_steps == 200  # decided after both resumes, on the 400-step ramp
    twice = AutoWU(make_optimizer(), total_steps=600, **options)
    twice.load_state_dict(saved)
    assert lrs_of(twice, 80, 600, lrs) == expected


@pytest.mark.parametrize(
    "entry, value, name",
    [
        ("lr", math.nan, "`lr`"),
        ("lr", -1.0, "`lr`"),
        ("lr", math.inf, "`lr`"),
        ("group_ratios", [math.nan], "`group_ratios`"),
        ("group_ratios", [-1.0], "`group_ratios`"),
        ("total_steps", 0, "`total_steps`"),
        ("total_steps", 1.5, "`total_steps`"),
        ("last_step", 10**6, "`last_step`"),
        ("switch_step", -10, "`switch_step`"),
        ("switch_step", "x", "`switch_step`"),
        ("phase", "ramp", "`phase`"),
        ("history", torch.zeros(2, 3), "`history`"),
        ("retried", "x", "`retried`"),
    ],
)
def test_a_damaged_state_is_refused_and_changes_nothing(entry, value, name):
    """An edited or damaged state: a ValueError naming the entry, and the scheduler goes on as it was (it used to
    load some of these and train at a NaN or negative LR, or fail at a later step)."""
    saved = AutoWU(make_optimizer(), total_steps=TOTAL)
    run(saved, 0, 40, [])
    state = roundtrip(saved.state_dict())
    state[entry] = value
    scheduler = AutoWU(make_optimizer(), total_steps=500)
    lrs = run(scheduler, 0, 10, [])
    with pytest.raises(ValueError, match=name):
        scheduler.load_state_dict(state)
    assert scheduler.total_steps == 500 and scheduler.last_step == 10
    fresh = AutoWU(make_optimizer(), total_steps=500)
    assert run(scheduler, 10, 30, lrs) == run(fresh, 0, 30, [])


def test_an_option_given_as_a_numpy_string_resumes():
    """A NumPy string option (read from an array of settings) is stored as a plain `str`: the state loads with
    `weights_only=True`, as the Trainer loads `scheduler.pt` (it used to refuse to unpickle it)."""
    np = pytest.importorskip("numpy")
    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL, cooldown_type=np.str_("linear"))
    run(scheduler, 0, 20, [])
    assert type(scheduler.config.cooldown_type) is str
    resumed = AutoWU(make_optimizer(), total_steps=TOTAL, cooldown_type="linear")
    resumed.load_state_dict(roundtrip(scheduler.state_dict()))
    assert resumed.last_step == 20


def test_restart_warms_up_again_like_a_new_scheduler_and_keeps_outside_listeners(uninterrupted):
    """`restart(total_steps)` mid-run (here in decay): every LR from then on equals a new scheduler's with that budget
    on the same losses; a listener attached from outside hears every step, before and after."""
    preset, reference, _ = uninterrupted
    fresh = AutoWU(make_optimizer((0.5, 0.05)), 10, total_steps=200, preset=preset, decay_phase_factor=0.9)
    expected = run(fresh, 0, 200, [])

    class Counter:
        steps = 0

        def on_step(self, scheduler):
            self.steps += 1

    counter = Counter()
    scheduler = new_scheduler(preset)
    scheduler.add_listener(counter)
    run(scheduler, 0, reference.switch_step + 15, [])
    assert scheduler.phase != "warmup"
    scheduler.restart(200)
    assert scheduler.last_step == 0 and scheduler.phase == "warmup" and scheduler.tests == []
    assert (scheduler.rewinder is None) == (preset == "paper")
    assert run(scheduler, 0, 200, []) == expected
    assert scheduler.switch_step == fresh.switch_step and scheduler.peak_lr == fresh.peak_lr
    assert counter.steps == reference.switch_step + 15 + 200
    for bad in (0, None, 2.0, True):
        with pytest.raises(ValueError, match="total_steps"):
            scheduler.restart(bad)


def test_a_sync_in_decay_changes_no_per_epoch_decision():
    """With `decay_phase_stat="loss"` the epoch's losses wait for its end: `sync_pending_losses()` (what the Trainer
    calls before every checkpoint, and the README before `save_state`) averages them where they are. The run that
    synced mid-epoch, and one resumed from its state, cut the LR at the steps of the run that never synced (the
    sync used to move them into the warmup history, so that epoch's mean read only the losses after it)."""

    def loss_at(step: int, lr: float, phase: str) -> float:
        if phase == "warmup":  # a valley in log LR
            distance = math.log10(lr / 1e-2)
            return 1.0 + (0.5 if distance < 0 else 2.0) * distance * distance
        if 250 <= step < 260:  # an epoch whose first half is above the level and second half below it
            return 1.2 if step < 255 else 0.9
        return 1.0

    def run(sync_at=None, resume_at=None):
        def build():
            return AutoWU(
                make_optimizer(),
                10,
                total_steps=400,
                decay_phase_stat="loss",
                decay_phase_factor=0.5,
                immediate_cooldown=False,
                rewind=False,
            )

        scheduler, lrs = build(), []
        for step in range(400):
            if step == sync_at:
                scheduler.sync_pending_losses()
            if step == resume_at:
                state = roundtrip(scheduler.state_dict())
                scheduler = build()
                scheduler.load_state_dict(state)
            lrs.append(scheduler.optimizer.param_groups[0]["lr"])
            scheduler.step(loss_at(step, lrs[-1], scheduler.phase))
        return scheduler, lrs

    reference, expected = run()
    switch = reference.switch_step
    assert reference.phase == "cooldown" and switch < 250 and len(reference.losses) == switch
    cuts = [step for step, _ in reference.lr_changes]
    assert 261 in cuts, "the epoch of steps 251-260 falls short of the best mean: the plateau rule cuts at its end"
    synced, lrs = run(sync_at=255)
    assert lrs == expected and synced.lr_changes == reference.lr_changes
    assert torch.equal(synced.losses, reference.losses)
    resumed, lrs = run(sync_at=255, resume_at=255)
    assert lrs == expected and resumed.lr_changes == reference.lr_changes


def test_a_group_added_after_a_resume_gets_the_ratio_of_the_uninterrupted_run():
    """The ratio of a group added later is its LR over the largest LR configured when AutoWU was first built (1e-4
    here, not the 1e-3 of a group added at step 10, which a resumed optimizer holds from the start)."""

    def run(resume_at=None):
        def build(groups):
            optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4}])
            for _ in range(groups - 1):
                optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3})
            return optimizer, AutoWU(optimizer, total_steps=200, rewind=False)

        optimizer, scheduler = build(1)
        lrs = []
        for step in range(200):
            if step == 10:
                optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3})
            if step == 150:
                optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4})
            if step == resume_at:
                state = roundtrip({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
                optimizer, scheduler = build(2)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            lrs.append([group["lr"] for group in optimizer.param_groups])
            scheduler.step(1.0 + abs(math.log10(lrs[-1][0] / 1e-2)))
        return lrs

    expected = run()
    assert expected[160][1] == pytest.approx(10 * expected[160][0]) and expected[160][2] == expected[160][0]
    assert run(resume_at=100) == expected
