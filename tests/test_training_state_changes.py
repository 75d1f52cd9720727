"""What a hand-written loop may change while AutoWU runs: a parameter group added to the optimizer (gradual
unfreezing), a buffer registered again with another shape, an optimizer that keeps lists of tensors in its state
(LBFGS). The run goes on, every group follows AutoWU's schedule at its configured ratio, and rewind restores only a
snapshot that fits the training state as it is, exactly as it was taken."""

import copy
import warnings

import numpy as np
import pytest
import torch

from hf_autowu import AutoWU

STEPS = 200
SHAPE_WARNING = "changed shape since the snapshot"


def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def unfreezing_setup(add=False, **options):
    """A head trained alone (AdamW, lr 1e-3), its body joining as a group at a tenth of that LR when `add`; AutoWU."""
    torch.manual_seed(0)
    body, head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), torch.nn.Linear(16, 1)
    model = torch.nn.Sequential(body, head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    if add:
        optimizer.add_param_group({"params": body.parameters(), "lr": 1e-4})
    return model, optimizer, AutoWU(optimizer, total_steps=STEPS, model=model, **options)


def unfreezing_run(add_at, resume_at=None, **options):
    """`unfreezing_setup`'s head whose body joins at step `add_at`; resumed at `resume_at` by a new process's code:
    the model, the optimizer (its groups as at that step) and AutoWU built anew, each loading its saved state."""
    model, optimizer, scheduler = unfreezing_setup(**options)
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            if step == add_at:
                optimizer.add_param_group({"params": model[0].parameters(), "lr": 1e-4})
            if step == resume_at:
                saved = copy.deepcopy([model.state_dict(), optimizer.state_dict(), scheduler.state_dict()])
                model, optimizer, scheduler = unfreezing_setup(add=step > add_at, **options)
                model.load_state_dict(saved[0])
                optimizer.load_state_dict(saved[1])
                scheduler.load_state_dict(saved[2])
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            lrs.append([group["lr"] for group in optimizer.param_groups])
            scheduler.step(loss)
    return scheduler, lrs, [str(w.message) for w in caught]


@pytest.mark.parametrize("add_at", [10, 95])
def test_a_group_added_during_warmup_follows_the_schedule_at_its_configured_ratio(add_at):
    scheduler, lrs, messages = unfreezing_run(add_at, rewind_min_shift=0.0)  # restore whatever the shift
    assert scheduler.switch_step is not None
    assert lrs[add_at][1] == 1e-4, "the step the group is added in runs at the LR it was added with"
    for step, group_lrs in enumerate(lrs):
        assert len(group_lrs) == (1 if step < add_at else 2)
        if step > add_at:
            assert group_lrs[1] == pytest.approx(group_lrs[0] / 10, rel=1e-12), step
    assert scheduler.get_last_lr() == [0.0, 0.0], "the added group decays to zero by the end with the rest"
    rewound = scheduler.rewinder.rewound_to
    if add_at == 10:  # every snapshot near the chosen LR was taken with the body in the optimizer: restored
        assert rewound is not None and rewound["step"] > add_at
        assert not any(SHAPE_WARNING in m for m in messages)
    else:  # the snapshot to restore predates the body's group: nothing is restored, with a warning
        assert rewound is None
        assert sum(SHAPE_WARNING in m for m in messages) == 1


@pytest.mark.parametrize("resume_at", [60, 110])
def test_a_run_with_an_added_group_resumes_bit_exactly(resume_at):
    full, lrs, _ = unfreezing_run(10)
    resumed, resumed_lrs, messages = unfreezing_run(10, resume_at=resume_at)
    assert resumed_lrs == lrs and resumed.rewinder.rewound_to == full.rewinder.rewound_to is not None
    assert not any("parameter groups" in m for m in messages), "the state holds a ratio for the added group"


def test_a_state_of_an_optimizer_with_more_groups_is_refused_and_changes_nothing():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}]
    two = AutoWU(torch.optim.SGD(groups, lr=1.0), total_steps=50)
    one = AutoWU(torch.optim.SGD([params[0]], lr=1.0), total_steps=80)
    for step in range(7):
        two.step(1.0 / (step + 1))
        one.step(2.0)
    before = copy.deepcopy(one.state_dict())
    with pytest.raises(ValueError, match="2 parameter groups, but the optimizer has 1"):
        one.load_state_dict(two.state_dict())
    after = one.state_dict()
    assert after["total_steps"] == 80 and after["last_step"] == 7 and torch.equal(after["history"], before["history"])
    # fewer saved groups than the optimizer has: the others take the ratio of their configured LR, with a warning
    with pytest.warns(UserWarning, match="the groups after the first 1 follow the ratio of their configured LR"):
        two.load_state_dict(before)
    assert two.get_last_lr() == [one.get_last_lr()[0], pytest.approx(one.get_last_lr()[0] / 2)]


class GrowingCache(torch.nn.Module):
    """A linear layer with a non-persistent buffer registered again, larger, when a longer input arrives (as rotary
    embeddings cache their tables)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 1)
        self.register_buffer("table", torch.ones(4), persistent=False)

    def forward(self, x: torch.Tensor, length: int) -> torch.Tensor:
        if length > self.table.numel():
            self.register_buffer("table", torch.ones(length), persistent=False)
        return self.linear(x) * self.table[:length].mean()


def test_a_buffer_registered_again_with_another_shape_is_not_restored_into():
    torch.manual_seed(0)
    model = GrowingCache()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = AutoWU(optimizer, total_steps=STEPS, model=model, rewind_min_shift=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x, 4 if scheduler.phase == "warmup" and step < 90 else 8), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if scheduler.phase == "warmup":
                params_before_switch = [p.detach().clone() for p in model.parameters()]
            scheduler.step(loss)
            if scheduler.switch_step == step + 1:
                # nothing restored: the parameters are those the last warmup step left
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before_switch, strict=True))
    assert scheduler.switch_step is not None and scheduler.switch_step > 90
    assert scheduler.rewinder.rewound_to is None
    assert sum(SHAPE_WARNING in str(w.message) for w in caught) == 1
    assert model.table.shape == (8,)


def lbfgs_run(stop, record_at=None):
    """LBFGS (its state keeps lists of tensors, changed in place) on a least-squares problem; the optimizer state
    after step `record_at`, deep-copied by this test."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=2, history_size=4)
    scheduler = AutoWU(optimizer, total_steps=STEPS, model=model, rewind_min_shift=0.0)
    recorded = None
    for step in range(stop):
        x, y = batch(step)

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        if step + 1 == record_at:
            recorded = copy.deepcopy(optimizer.state_dict()["state"])
        scheduler.step(loss)
    return scheduler, optimizer, recorded


def test_lists_of_tensors_in_the_optimizer_state_are_restored_as_they_were_at_the_snapshot():
    scheduler, _, _ = lbfgs_run(STEPS)
    assert scheduler.switch_step is not None and scheduler.rewinder.rewound_to is not None
    snapshot_step = scheduler.rewinder.rewound_to["step"]
    _, optimizer, expected = lbfgs_run(scheduler.switch_step, record_at=snapshot_step)
    restored = optimizer.state_dict()["state"]
    assert len(expected[0]["old_dirs"]) > 0
    for key in ("old_dirs", "old_stps", "ro"):
        assert len(restored[0][key]) == len(expected[0][key]), key
        assert all(torch.equal(a, b) for a, b in zip(restored[0][key], expected[0][key], strict=True)), key
    assert torch.equal(restored[0]["d"], expected[0]["d"])


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_numpy_array_holding_one_loss_is_that_loss(shape):
    losses = [3.0 / (step + 1) + 0.01 * (step % 3) for step in range(60)]
    lrs = {}
    for kind in ("float", "array"):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = AutoWU(optimizer, total_steps=60, rewind=False)
        for value in losses:
            scheduler.step(value if kind == "float" else np.full(shape, value, dtype=np.float64))
        lrs[kind] = scheduler.lr_changes, scheduler.get_last_lr(), scheduler.losses.tolist()
    assert lrs["array"] == lrs["float"]


def test_a_copy_made_before_the_first_step_steps_like_the_original():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=60, rewind=False)
    copied = copy.deepcopy(scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading whether Accelerate stepped works on the copy too
        for step in range(30):
            scheduler.step(1.0 / (step + 1))
            copied.step(1.0 / (step + 1))
    assert copied.get_last_lr() == scheduler.get_last_lr() and copied.last_step == 30


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": None}, "`optimizer` must be a torch optimizer"),
        ({"optimizer": [torch.nn.Parameter(torch.zeros(1))]}, "`optimizer` must be a torch optimizer"),
        ({"model": {"weight": torch.zeros(1)}}, "`model` must be a `torch.nn.Module`"),
        ({"seed": 2**64}, "`seed` must be an int in"),
    ],
)
def test_bad_construction_arguments_name_the_argument(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    arguments = {"optimizer": optimizer, "total_steps": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        AutoWU(arguments.pop("optimizer"), **arguments)


@pytest.mark.parametrize("damage", ["record of a test", "missing key", "wrong kind"])
def test_a_state_that_cannot_be_loaded_raises_and_changes_nothing(damage):
    def scheduler_after(steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = AutoWU(optimizer, total_steps=120, rewind=False)
        for step in range(steps):
            scheduler.step(3.0 / (step + 1) + 0.02 * (step % 5))
        return scheduler

    saved = scheduler_after(70).state_dict()
    if damage == "record of a test":
        saved["tests"][-1] = {"bogus": 1}  # read after most of the state has been assigned
    elif damage == "missing key":
        del saved["next_test"]
    else:
        saved["cooldown_from"] = 5
    scheduler, twin = scheduler_after(30), scheduler_after(30)
    with pytest.raises(ValueError, match="this state cannot be loaded"):
        scheduler.load_state_dict(saved)
    # the scheduler goes on exactly as its untouched twin
    for step in range(30, 120):
        assert scheduler.get_last_lr() == twin.get_last_lr(), step
        scheduler.step(1.0 / (step + 1))
        twin.step(1.0 / (step + 1))
    assert scheduler.switch_step == twin.switch_step is not None
    assert torch.equal(scheduler.state_dict()["history"], twin.state_dict()["history"])
