"""Rewind: on by default in a hand-written loop, restores a warmup snapshot bit for bit, fits its memory budget,
offloads to disk, survives resume, and turns itself off (with one warning) where it cannot work."""

import copy
import math
import shutil
import warnings

import pytest
import torch
from helpers import assert_state_equal, roundtrip

from hf_autowu import AutoWU, WarmupRewinder
from hf_autowu.log_entries import switch_message


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    )


def data(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def train(model, optimizer, scheduler, start, stop, snapshots_seen=None, lrs=None, nan_at=(), masked_at=()):
    """The README's loop: `scheduler.step(loss)` after every optimizer step; the steps `nan_at` get NaN targets (a
    NaN loss and NaN gradients, which reach the weights), the steps `masked_at` a loss over no label (every target
    `ignore_index`: a NaN loss, zero gradients)."""
    for step in range(start, stop):
        x, y = data(step)
        if step in nan_at:
            y = y * math.nan
        if step in masked_at:
            loss = torch.nn.functional.cross_entropy(model(x).expand(-1, 2), torch.full((len(x),), -100))
        else:
            loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if lrs is not None:
            lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(loss)
        rewinder = scheduler.rewinder
        if snapshots_seen is not None and rewinder is not None and rewinder.snapshots:
            latest = rewinder.snapshots[-1]
            if latest["step"] not in snapshots_seen:
                snapshots_seen[latest["step"]] = copy.deepcopy(latest)


def build(seed=0, with_model=False, **options):
    """A model, AdamW and AutoWU with its defaults; `with_model` attaches a `WarmupRewinder` given the model."""
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=400, immediate_cooldown=True, **options)
    if with_model:
        WarmupRewinder(model, optimizer, scheduler)
    return model, optimizer, scheduler


def state_after(step, with_rewind=False):
    """Model and optimizer state after `step` steps of a run with nothing rewound before then."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=400, immediate_cooldown=True, rewind=with_rewind)
    train(model, optimizer, scheduler, 0, step)
    return model.state_dict(), optimizer.state_dict()["state"]


@pytest.mark.parametrize("with_model", [False, True])
def test_default_rewind_in_a_hand_written_loop_restores_a_snapshot_bit_for_bit(with_model):
    model, optimizer, scheduler = build(with_model=with_model)
    rewinder = scheduler.rewinder
    assert rewinder is not None, "the robust default rewinds without anything attached"
    seen = {}
    train(model, optimizer, scheduler, 0, 400, snapshots_seen=seen)
    assert scheduler.switch_step is not None and rewinder.rewound_to is not None
    tags = [seen[s]["lr"] for s in sorted(seen)]
    assert all(b >= 2 * a for a, b in zip(tags, tags[1:], strict=False)), "one snapshot per doubling of the LR"
    target = rewinder.rewound_to
    assert target["lr"] <= scheduler.peak_lr < 2 * target["lr"], "the latest snapshot at or below the chosen LR"
    assert rewinder.snapshots == [] and rewinder.memory_bytes == 0

    # right after the switch the parameters and optimizer state are exactly those of the snapshot's step
    model2, optimizer2, scheduler2 = build(with_model=with_model)
    train(model2, optimizer2, scheduler2, 0, scheduler.switch_step)
    expected_model, expected_state = state_after(target["step"])
    for name, param in model2.named_parameters():
        assert torch.equal(param, expected_model[name]), name
    assert_state_equal(optimizer2.state_dict()["state"], expected_state)
    # the model's buffers (BatchNorm statistics) come back only when the rewinder knows the model
    buffers = [name for name, _ in model2.named_buffers() if "running" in name]
    restored = all(torch.equal(model2.state_dict()[name], expected_model[name]) for name in buffers)
    assert restored == with_model


def test_snapshots_are_taken_after_the_step_they_are_tagged_with():
    model, optimizer, scheduler = build()
    seen = {}
    train(model, optimizer, scheduler, 0, 60, snapshots_seen=seen)
    step = sorted(seen)[-1]
    expected_model, expected_state = state_after(step)
    params = [p for p in seen[step]["data"]["params"]]
    assert all(
        torch.equal(a, b)
        for a, b in zip(params, [expected_model[n] for n, _ in model.named_parameters()], strict=True)
    )
    assert seen[step]["lr"] == scheduler.lr_at(step - 1)


def test_memory_cost_is_reported():
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 0, 60)
    rewinder = scheduler.rewinder
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(rewinder.snapshots) >= 1
    # each snapshot: the parameters and AdamW's two moments (and its step counters)
    assert rewinder.memory_bytes >= len(rewinder.snapshots) * 3 * params
    assert rewinder.planned_bytes >= 3 * 3 * params


def test_rewind_turns_itself_off_when_it_would_not_fit(recwarn):
    model, optimizer, scheduler = build(rewind_memory_fraction=1e-12)
    lrs = []
    train(model, optimizer, scheduler, 0, 400, lrs=lrs)
    warnings = [str(w.message) for w in recwarn if "rewind is off" in str(w.message)]
    assert len(warnings) == 1 and "available host memory" in warnings[0]
    rewinder = scheduler.rewinder
    assert not rewinder.enabled and rewinder.snapshots == [] and rewinder.rewound_to is None
    assert scheduler.switch_step is not None and all(math.isfinite(lr) for lr in lrs)


def test_offloaded_snapshots_restore_the_same_state(tmp_path):
    in_memory = build()
    train(*in_memory, 0, 400)
    model, optimizer, scheduler = build(rewind_offload_dir=str(tmp_path))
    train(model, optimizer, scheduler, 0, 60)
    assert scheduler.rewinder.memory_bytes == 0 and len(list(tmp_path.glob("autowu_rewind_*_rank0_step*.pt"))) == len(
        scheduler.rewinder.snapshots
    )
    train(model, optimizer, scheduler, 60, 400)
    assert scheduler.rewinder.rewound_to == in_memory[2].rewinder.rewound_to
    assert_state_equal(model.state_dict(), in_memory[0].state_dict())
    assert list(tmp_path.glob("*.pt")) == [], "snapshot files are deleted once used"


@pytest.mark.parametrize("where", ["early_warmup", "late_warmup", "after_switch"])
def test_resume_with_the_default_rewind_is_bit_exact(where):
    model, optimizer, scheduler = build()
    expected = []
    train(model, optimizer, scheduler, 0, 400, lrs=expected)
    final_state = model.state_dict()
    stop = {"early_warmup": 30, "late_warmup": scheduler.switch_step - 3, "after_switch": scheduler.switch_step + 5}[
        where
    ]

    model1, optimizer1, scheduler1 = build()
    lrs = []
    train(model1, optimizer1, scheduler1, 0, stop, lrs=lrs)
    saved = roundtrip({"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()})
    if where != "after_switch":
        assert saved["sched"]["listeners"]["rewind"]["snapshots"], "the snapshots travel in the scheduler's state"

    model2, optimizer2, scheduler2 = build(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    train(model2, optimizer2, scheduler2, stop, 400, lrs=lrs)
    assert lrs == expected
    assert_state_equal(model2.state_dict(), final_state)


def test_a_resume_with_an_offload_folder_that_is_gone_is_bit_exact(tmp_path):
    """Snapshots offloaded to a folder travel in the state; resumed on a machine where that folder does not exist
    (another node, a wiped scratch disk), the folder is made again and the run goes on as the uninterrupted one."""
    folder = tmp_path / "scratch" / "autowu"
    model, optimizer, scheduler = build(rewind_offload_dir=str(folder))
    expected = []
    train(model, optimizer, scheduler, 0, 400, lrs=expected)
    final_state = model.state_dict()
    model1, optimizer1, scheduler1 = build(rewind_offload_dir=str(folder))
    lrs = []
    train(model1, optimizer1, scheduler1, 0, 60, lrs=lrs)
    saved = roundtrip({"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()})
    assert saved["sched"]["listeners"]["rewind"]["snapshots"]
    shutil.rmtree(tmp_path / "scratch")
    model2, optimizer2, scheduler2 = build(seed=123, rewind_offload_dir=str(folder))
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    train(model2, optimizer2, scheduler2, 60, 400, lrs=lrs)
    assert lrs == expected
    assert_state_equal(model2.state_dict(), final_state)


@pytest.mark.parametrize(
    "saved_with", [{"rewind_min_shift": 10.0}, {"rewind_snapshots": 1}, {"rewind_lr_factor": 8.0}], ids=str
)
def test_a_state_saved_with_other_rewind_options_resumes_with_them(saved_with):
    """`load_state_dict` uses the saved options: the scheduler's own rewinder too (it used to keep the options of
    the scheduler loaded into), so the run rewinds to the state the uninterrupted run rewinds to."""
    ((name, value),) = saved_with.items()
    model, optimizer, scheduler = build(**saved_with)
    expected = []
    train(model, optimizer, scheduler, 0, 400, lrs=expected)
    stop = 30
    assert scheduler.switch_step > stop
    model1, optimizer1, scheduler1 = build(**saved_with)
    lrs = []
    train(model1, optimizer1, scheduler1, 0, stop, lrs=lrs)
    saved = roundtrip({"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()})
    model2, optimizer2, scheduler2 = build()  # the defaults in code
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    with pytest.warns(UserWarning, match=f"other options \\({name}\\)"):
        scheduler2.load_state_dict(saved["sched"])
    rewinder = scheduler2.rewinder
    attribute = {"rewind_min_shift": "min_shift", "rewind_snapshots": "max_snapshots", "rewind_lr_factor": "lr_factor"}
    assert getattr(rewinder, attribute[name]) == value
    assert [s["step"] for s in rewinder.snapshots] == [s["step"] for s in scheduler1.rewinder.snapshots]
    train(model2, optimizer2, scheduler2, stop, 400, lrs=lrs)
    assert lrs == expected
    assert (rewinder.rewound_to, rewinder.kept) == (scheduler.rewinder.rewound_to, scheduler.rewinder.kept)
    assert_state_equal(model2.state_dict(), model.state_dict())


@pytest.mark.parametrize("built_with", [{"rewind": False}, {}])
def test_a_rewinder_attached_by_hand_after_loading_takes_the_saved_snapshots(built_with):
    """Whether the scheduler loaded into had no rewinder (other options: the saved ones are used) or its own."""
    model, optimizer, scheduler = build(with_model=True)
    train(model, optimizer, scheduler, 0, 60)
    saved = roundtrip(scheduler.state_dict())
    model2 = make_model()
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    scheduler2 = AutoWU(optimizer2, total_steps=400, immediate_cooldown=True, **built_with)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler2.load_state_dict(saved)
    assert any("other options" in str(w.message) for w in caught) == bool(built_with)
    rewinder = WarmupRewinder(model2, optimizer2, scheduler2)
    assert scheduler2.rewinder is rewinder
    assert [s["step"] for s in rewinder.snapshots] == [s["step"] for s in scheduler.rewinder.snapshots]


def test_a_rewinder_that_replaces_another_during_warmup_takes_over_its_snapshots():
    """Re-attaching a rewinder mid-warmup (say, to give it the model) goes on from the snapshots the replaced one
    held: the run rewinds to the same state as one that kept its first rewinder."""
    reference = build(with_model=True)
    train(*reference, 0, 400)
    model, optimizer, scheduler = build(with_model=True)
    train(model, optimizer, scheduler, 0, 30)
    first = scheduler.rewinder
    assert first.snapshots and scheduler.phase == "warmup"
    second = WarmupRewinder(model, optimizer, scheduler)
    assert scheduler.rewinder is second and first not in scheduler._listeners
    train(model, optimizer, scheduler, 30, 400)
    assert second.rewound_to == reference[2].rewinder.rewound_to is not None
    assert_state_equal(model.state_dict(), reference[0].state_dict())


def test_paper_preset_and_rewind_false_attach_nothing():
    assert (
        AutoWU(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=10, preset="paper").rewinder
        is None
    )
    assert (
        AutoWU(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=10, rewind=False).rewinder
        is None
    )


def test_partitioned_parameters_outside_deepspeeds_optimizer_turn_rewind_off_with_a_warning():
    """ZeRO-3's parameters carry a `ds_id`; stepped by an optimizer that is not DeepSpeed's, their state is out of a
    snapshot's reach: rewind turns itself off, once, when the first snapshot is due, and the run goes on.
    `tests/test_deepspeed.py` and `tests/test_deepspeed_rewind.py` run the real thing."""
    param = torch.nn.Parameter(torch.zeros(3))
    param.ds_id = 0
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=100)
    with pytest.warns(UserWarning, match="rewind is off: DeepSpeed's partitioned parameters") as caught:
        for step in range(100):
            param.grad = torch.full_like(param, 0.1)
            optimizer.step()
            scheduler.step(1.0 / (step + 1))
    assert len([w for w in caught if "AutoWU rewind" in str(w.message)]) == 1
    assert scheduler.rewinder.snapshots == [] and scheduler.switch_step is not None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"snapshots": 0}, "snapshots"),
        ({"lr_factor": 1.0}, "lr_factor"),
        ({"memory_fraction": 0.0}, "memory_fraction"),
        ({"min_shift": -1.0}, "min_shift"),
        ({"min_shift": True}, "min_shift"),
    ],
)
def test_bad_rewinder_arguments_name_the_argument(kwargs, name):
    model, optimizer, scheduler = build()
    with pytest.raises(ValueError, match=f"`{name}`"):
        WarmupRewinder(model, optimizer, scheduler, **kwargs)


def shift_between(after: dict, before: dict) -> float:
    """`||after - before|| / ||before||` over the parameters of two model state dicts (buffers left out)."""
    names = [name for name, _ in make_model().named_parameters()]
    moved = sum(float((after[n].double() - before[n].double()).square().sum()) for n in names)
    size = sum(float(before[n].double().square().sum()) for n in names)
    return math.sqrt(moved) / math.sqrt(size)


@pytest.mark.parametrize("min_shift", [None, 1e9])
def test_rewind_restores_only_when_the_parameters_moved_enough(min_shift):
    """The default (0.2) against the shift computed from two plain runs; a threshold no run reaches keeps the
    steps past the chosen LR, so the whole run is bit for bit a run without rewind."""
    options = {} if min_shift is None else {"rewind_min_shift": min_shift}
    model, optimizer, scheduler = build(**options)
    lrs = []
    train(model, optimizer, scheduler, 0, 400, lrs=lrs)
    rewinder = scheduler.rewinder
    target = rewinder.rewound_to or rewinder.kept
    at_switch, _ = state_after(scheduler.switch_step)
    at_snapshot, _ = state_after(target["step"])
    shift = shift_between(at_switch, at_snapshot)
    threshold = 0.2 if min_shift is None else min_shift
    if shift >= threshold:
        assert rewinder.rewound_to is not None and rewinder.kept is None
    else:
        assert rewinder.rewound_to is None and rewinder.kept["shift"] == pytest.approx(shift, rel=1e-6)
        assert "Not rewound" in switch_message(scheduler)
    if min_shift is not None:
        plain_model, plain_optimizer, plain = build(rewind=False)
        plain_lrs = []
        train(plain_model, plain_optimizer, plain, 0, 400, lrs=plain_lrs)
        assert lrs == plain_lrs
        assert_state_equal(model.state_dict(), plain_model.state_dict())


def test_rewind_always_restores_after_a_blow_up():
    """NaN losses and gradients from step 70 on, while warmup lasts: the first is retried (warmup goes on from a
    snapshot before it), the next ends warmup and marks the states from its step on as damaged: the snapshot before
    it is restored even when the parameters barely moved (a threshold no run reaches)."""
    model, optimizer, scheduler = build(with_model=True, rewind_min_shift=1e9)  # BatchNorm's statistics too
    for step in range(400):
        x, y = data(step)
        if step >= 70 and scheduler.phase == "warmup":
            y = y * math.nan
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(loss)
    rewinder, retried = scheduler.rewinder, scheduler.retried
    assert retried["loss_index"] == 70 and retried["restored_step"] < 70
    assert scheduler.switch_reason == "divergence" and scheduler.damaged_from == retried["step"]
    assert rewinder.kept is None and rewinder.rewound_to is not None
    assert rewinder.rewound_to["step"] < scheduler.damaged_from
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


def test_one_non_finite_loss_in_warmup_is_retried_from_the_snapshot_before_it():
    """One batch with a NaN loss and NaN gradients early in warmup (they reach the weights and BatchNorm's statistics
    the next step): warmup goes on from the latest snapshot before it, state for state the uninterrupted run's at that
    step, along the same closed-form ramp, and ends on its own. Before, it ended at that NaN and the run decayed from
    `min_lr` (1e-5 here), never training."""
    model, optimizer, scheduler = build(with_model=True)
    lrs, at_retry = [], None
    for step in range(400):
        train(model, optimizer, scheduler, step, step + 1, lrs=lrs, nan_at=(10,))
        if scheduler.retried is not None and at_retry is None:
            at_retry = copy.deepcopy((model.state_dict(), optimizer.state_dict()["state"]))
    retried = scheduler.retried
    assert retried["loss_index"] == 10 and retried["step"] <= 12 and retried["restored_step"] < 10
    expected_model, expected_optimizer = state_after(retried["restored_step"])
    assert_state_equal(at_retry[0], expected_model)
    assert_state_equal(at_retry[1], expected_optimizer)
    warmup = scheduler.warmup_steps
    for step in range(scheduler.switch_step):  # lrs[step] is the LR of optimizer step `step`
        assert lrs[step] == pytest.approx(1e-5 * 1e5 ** (step / warmup), rel=1e-9)
    assert scheduler.switch_reason in ("test", "spike") and scheduler.switch_step > 50
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())
    clean_model, clean_optimizer, clean = build(with_model=True)
    train(clean_model, clean_optimizer, clean, 0, 400)
    assert clean.peak_lr / 2 <= scheduler.peak_lr <= 2 * clean.peak_lr
    assert "non-finite loss of step 11" in switch_message(scheduler)  # loss index 10: the 11th step's


def test_a_nan_loss_that_left_the_state_finite_is_retried_without_a_restore():
    """A loss over no label (NaN, zero gradients: the update cannot have damaged the state): warmup goes on from where
    it is, nothing restored, no loss dropped but the NaN; the run ends as one with that step's update wasted."""
    model, optimizer, scheduler = build(with_model=True)
    train(model, optimizer, scheduler, 0, 400, masked_at=(10,))
    retried = scheduler.retried
    assert retried["loss_index"] == 10 and retried["restored_step"] is None
    finite = torch.isfinite(scheduler.losses)
    assert not finite[10] and bool(finite[: scheduler.switch_step].sum() == scheduler.switch_step - 1)
    assert scheduler.switch_reason in ("test", "spike") and scheduler.switch_step > 50
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


def test_a_second_non_finite_loss_ends_warmup():
    """The retry is once per run: a second NaN, well after the first, ends warmup as a blow-up, rewound to a state
    from before it."""
    model, optimizer, scheduler = build(with_model=True)
    train(model, optimizer, scheduler, 0, 400, nan_at=(10, 40))
    assert scheduler.retried["loss_index"] == 10
    assert scheduler.switch_reason == "divergence" and 40 <= scheduler.damaged_from <= 41
    assert scheduler.rewinder.rewound_to["step"] < scheduler.damaged_from
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


@pytest.mark.parametrize("first", range(40, 52))
def test_a_second_non_finite_loss_right_after_the_first_ends_warmup(first):
    """Two batches in a row with no label (NaN losses, zero gradients: the state stays finite, nothing is restored):
    the second ends warmup, whether or not a switch test fell between them (it used to be dropped with the loss the
    watch held when the retry came, on every other step here)."""
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, 0, first + 12, masked_at=(first, first + 1))
    assert scheduler.retried["loss_index"] == first and scheduler.retried["restored_step"] is None
    assert scheduler.switch_reason == "divergence" and scheduler.switch_step == first + 3
    assert scheduler.damaged_from == first + 1


def test_resume_after_a_retry_is_bit_exact():
    """Saved a few steps after the retry: the resumed run does not read the NaN again (it would end warmup) and ends
    with the uninterrupted run's LRs and weights."""
    model, optimizer, scheduler = build(with_model=True)
    expected = []
    train(model, optimizer, scheduler, 0, 400, lrs=expected, nan_at=(10,))
    stop = scheduler.retried["step"] + 3
    model1, optimizer1, scheduler1 = build(with_model=True)
    lrs = []
    train(model1, optimizer1, scheduler1, 0, stop, lrs=lrs, nan_at=(10,))
    saved = roundtrip({"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()})
    model2, optimizer2, scheduler2 = build(seed=123, with_model=True)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    train(model2, optimizer2, scheduler2, stop, 400, lrs=lrs)
    assert lrs == expected and scheduler2.switch_reason == scheduler.switch_reason != "divergence"
    assert scheduler2.retried == scheduler.retried  # the retry is spent: a second NaN would end warmup
    assert_state_equal(model2.state_dict(), model.state_dict())


def test_resume_before_a_switch_that_keeps_its_steps_is_bit_exact():
    """Saved late in warmup with a threshold no run reaches: the resumed run keeps the same steps at the switch
    (the shift is measured against the snapshot it loaded) and ends with the uninterrupted run's weights."""
    model, optimizer, scheduler = build(rewind_min_shift=1e9)
    expected = []
    train(model, optimizer, scheduler, 0, 400, lrs=expected)
    assert scheduler.rewinder.kept is not None
    stop = scheduler.switch_step - 3
    model1, optimizer1, scheduler1 = build(rewind_min_shift=1e9)
    lrs = []
    train(model1, optimizer1, scheduler1, 0, stop, lrs=lrs)
    saved = roundtrip({"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()})
    model2, optimizer2, scheduler2 = build(seed=123, rewind_min_shift=1e9)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    train(model2, optimizer2, scheduler2, stop, 400, lrs=lrs)
    assert lrs == expected and scheduler2.rewinder.kept == scheduler.rewinder.kept
    assert_state_equal(model2.state_dict(), model.state_dict())


def test_a_rewinder_built_by_hand_takes_the_scheduler_options():
    """Options left out come from the config (`rewind_*`, the preset's shift threshold); given ones win."""
    model, optimizer, scheduler = build(rewind_snapshots=5, rewind_lr_factor=3.0, rewind_memory_fraction=0.25)
    rewinder = WarmupRewinder(model, optimizer, scheduler)
    assert (rewinder.max_snapshots, rewinder.lr_factor, rewinder.memory_fraction) == (5, 3.0, 0.25)
    assert rewinder.min_shift == 0.2 and rewinder.offload_dir is None
    assert WarmupRewinder(model, optimizer, scheduler, min_shift=0.0, snapshots=2).max_snapshots == 2
    _, _, paper = build(preset="paper")
    assert WarmupRewinder(model, optimizer, paper).min_shift == 0.0


@pytest.mark.parametrize(("saved_with", "built_with"), [({}, {"rewind": False}), ({"rewind": False}, {})])
def test_a_resume_follows_the_saved_rewind_option(saved_with, built_with):
    """The saved options are used, rewind included: the run goes on as the uninterrupted one with them."""
    model, optimizer, scheduler = build(**saved_with)
    expected = []
    train(model, optimizer, scheduler, 0, 400, lrs=expected)
    assert (scheduler.rewinder is not None) == (saved_with == {})

    model1, optimizer1, scheduler1 = build(**saved_with)
    lrs = []
    train(model1, optimizer1, scheduler1, 0, 30, lrs=lrs)
    saved = roundtrip({"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()})
    model2, optimizer2, scheduler2 = build(seed=123, **built_with)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    with pytest.warns(UserWarning, match="the saved options are used"):
        scheduler2.load_state_dict(saved["sched"])
    train(model2, optimizer2, scheduler2, 30, 400, lrs=lrs)
    assert lrs == expected
    assert (scheduler2.rewinder is not None) == (scheduler.rewinder is not None)
    if scheduler.rewinder is not None:
        assert scheduler2.rewinder.rewound_to == scheduler.rewinder.rewound_to is not None
    assert_state_equal(model2.state_dict(), model.state_dict())


def test_two_rewinders_sharing_an_offload_folder_restore_their_own_snapshots(tmp_path):
    """Two models trained side by side (two runs of a sweep, a GAN's two networks) with one offload folder."""
    in_memory = [build(seed=seed) for seed in (0, 1)]
    offloaded = [build(seed=seed, rewind_offload_dir=str(tmp_path)) for seed in (0, 1)]
    for step in range(400):
        for run in (*in_memory, *offloaded):
            train(*run, step, step + 1)
    for reference, run in zip(in_memory, offloaded, strict=True):
        assert run[2].rewinder.rewound_to == reference[2].rewinder.rewound_to is not None
        assert_state_equal(run[0].state_dict(), reference[0].state_dict())
    assert list(tmp_path.glob("*.pt")) == []


def test_before_any_switch_test_the_newest_snapshots_are_kept():
    """A 40-step budget ramps from 1e-5 to 1 in 20 steps, faster than a switch test can run: the warmup ends at
    its cap, and the state restored is the latest snapshot at or below the LR chosen, not one from the ramp's
    first steps."""
    model, optimizer, _ = build()
    scheduler = AutoWU(optimizer, total_steps=40)
    train(model, optimizer, scheduler, 0, 40)
    assert scheduler.tests == [] and scheduler.switch_reason == "cap"
    target = scheduler.rewinder.rewound_to
    assert target is not None
    assert scheduler.peak_lr / scheduler.config.rewind_lr_factor < target["lr"] <= scheduler.peak_lr


@pytest.mark.parametrize("damage", ["snapshot without its step", "bookkeeping of the wrong kind"])
def test_a_rewinder_state_that_cannot_be_loaded_changes_nothing(damage, tmp_path):
    """A saved state whose rewinder part is damaged: `load_state_dict` raises, and the scheduler and its rewinder
    (snapshots offloaded to disk, so that a half-done load would also have deleted their files) go on exactly as an
    untouched twin: the same switch, the same snapshot restored, the same final weights."""
    source = build(rewind_offload_dir=str(tmp_path / "source"))
    train(*source, 0, 60)
    saved = copy.deepcopy(source[2].state_dict())
    if damage == "snapshot without its step":
        del saved["listeners"]["rewind"]["snapshots"][-1]["step"]
    else:
        saved["listeners"]["rewind"]["next_lr"] = "twice the last"
    run, twin = build(rewind_offload_dir=str(tmp_path / "run")), build(rewind_offload_dir=str(tmp_path / "twin"))
    train(*run, 0, 30)
    train(*twin, 0, 30)
    held = sorted(p.name for p in (tmp_path / "run").glob("*.pt"))
    assert held and run[2].rewinder.snapshots
    with pytest.raises(ValueError):
        run[2].load_state_dict(saved)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == held
    train(*run, 30, 400)
    train(*twin, 30, 400)
    assert run[2].switch_step == twin[2].switch_step is not None
    assert run[2].rewinder.rewound_to == twin[2].rewinder.rewound_to is not None
    assert_state_equal(run[0].state_dict(), twin[0].state_dict())


@pytest.mark.parametrize("wrapped_by_accelerate", [False, True])
def test_rewind_restores_the_state_an_optimizer_keeps_in_the_one_it_wraps(wrapped_by_accelerate):
    """timm's `Lookahead` keeps AdamW's moments and its own slow weights in the base optimizer's `state` and leaves
    its own empty: right after the switch all of them, as the parameters, are those of the snapshot's step (also
    with Accelerate's wrapper around it)."""
    timm_optim = pytest.importorskip("timm.optim")
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def build_lookahead(**options):
        model = make_model()
        optimizer = timm_optim.Lookahead(torch.optim.AdamW(model.parameters(), lr=1.0), k=3)
        if wrapped_by_accelerate:
            model, optimizer = accelerate.Accelerator(cpu=True).prepare(model, optimizer)
        return model, optimizer, AutoWU(optimizer, total_steps=400, immediate_cooldown=True, **options)

    try:
        model, optimizer, scheduler = build_lookahead()
        train(model, optimizer, scheduler, 0, 400)
        target = scheduler.rewinder.rewound_to
        assert scheduler.switch_step is not None and target is not None and target["step"] > 3
        model2, optimizer2, scheduler2 = build_lookahead()
        train(model2, optimizer2, scheduler2, 0, scheduler.switch_step)  # right after the switch's restore
        model3, optimizer3, scheduler3 = build_lookahead(rewind=False)
        train(model3, optimizer3, scheduler3, 0, target["step"])  # the snapshot's step, nothing rewound
        expected = optimizer3.state_dict()["state"]
        assert all({"exp_avg", "lookahead_slow_buff"} <= set(state) for state in expected.values())
        for (name, param), (_, twin) in zip(model2.named_parameters(), model3.named_parameters(), strict=True):
            assert torch.equal(param, twin), name
        assert_state_equal(optimizer2.state_dict()["state"], expected)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
