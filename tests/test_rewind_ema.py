"""Rewind with a moving average of the weights kept beside the model (`AutoWU(..., ema=...)`): timm's `ModelEmaV3` and
diffusers' `EMAModel` come back to their state at the restored snapshot, so a blow-up the rewind undoes leaves no
trace in them; without `ema` it stays there for good."""

import math

import pytest
import torch
from test_rewind import data, make_model
from timm.utils import ModelEmaV3

from hf_autowu import AutoWU, WarmupRewinder

BUDGET = 400
BLOW_UP_AT = 70


def timm_ema(model):
    return ModelEmaV3(model, decay=0.9)


def diffusers_ema(model):
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=0.9)


def update(ema, model):
    """One update of the average, as each library's training script does it after the optimizer's step."""
    if isinstance(ema, ModelEmaV3):
        ema.update(model)
    else:
        ema.step(model.parameters())


def averaged(ema):
    """The average's tensors, copied."""
    tensors = ema.state_dict().values() if isinstance(ema, ModelEmaV3) else ema.shadow_params
    return [t.detach().clone() for t in tensors]


def train_step(model, optimizer, scheduler, ema, step, blow_up=True):
    """One step of the README's loop with the average updated after the optimizer's step; from `BLOW_UP_AT` on, while
    warmup lasts, the targets are NaN (a NaN loss and NaN gradients, which reach the weights and so the average)."""
    x, y = data(step)
    if blow_up and step >= BLOW_UP_AT and scheduler.phase == "warmup":
        y = y * math.nan
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    update(ema, model)
    scheduler.step(loss)


def run(make_ema, steps, attach, blow_up=True):
    """`steps` of `train_step`; `attach`: the scheduler is given the average (`ema=`). Returns the scheduler, the
    average and a copy of the average's tensors right after the switch."""
    model = make_model()
    ema = make_ema(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=BUDGET, model=model, ema=ema if attach else None)
    after_switch = None
    for step in range(steps):
        train_step(model, optimizer, scheduler, ema, step, blow_up)
        if after_switch is None and scheduler.phase != "warmup":
            after_switch = averaged(ema)
    return scheduler, ema, after_switch


@pytest.mark.parametrize("make_ema", [timm_ema, diffusers_ema])
def test_the_average_comes_back_to_the_restored_snapshot(make_ema):
    scheduler, ema, after_switch = run(make_ema, BUDGET, attach=True)
    rewinder = scheduler.rewinder
    assert scheduler.switch_reason == "divergence" and rewinder.rewound_to is not None
    restored = rewinder.rewound_to["step"]
    assert restored < BLOW_UP_AT
    # right after the switch the average is, bit for bit, that of a run stopped at the restored snapshot's step
    _, untouched, _ = run(make_ema, restored, attach=False, blow_up=False)
    assert len(after_switch) == len(averaged(untouched))
    for got, expected in zip(after_switch, averaged(untouched), strict=True):
        assert torch.equal(got, expected)
    assert all(bool(torch.isfinite(t).all()) for t in averaged(ema)), "the average trains on, finite"


@pytest.mark.parametrize("make_ema", [timm_ema, diffusers_ema])
def test_without_the_average_the_blow_up_stays_in_it(make_ema):
    """What `ema=` is for: the rewind restores the model, but an average it does not know keeps the NaN weights of
    the blow-up to the end of the run."""
    scheduler, ema, _ = run(make_ema, BUDGET, attach=False)
    assert scheduler.rewinder.rewound_to is not None
    assert all(bool(torch.isfinite(p).all()) for p in scheduler.optimizer.param_groups[0]["params"])
    assert not all(bool(torch.isfinite(t).all()) for t in averaged(ema))


def test_the_average_travels_in_the_state_and_resumes_bit_for_bit():
    """Saved in warmup with its snapshots (the average's tensors among them) and resumed in a new scheduler given a
    new average, the run comes out as the uninterrupted one."""
    scheduler, ema, _ = run(timm_ema, BUDGET, attach=True)

    model = make_model()
    ema2 = timm_ema(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    first = AutoWU(optimizer, total_steps=BUDGET, model=model, ema=ema2)
    for step in range(BUDGET):
        if step == 50:  # mid-warmup: save everything, rebuild, load
            states = (model.state_dict(), ema2.state_dict(), optimizer.state_dict(), first.state_dict())
            model = make_model(seed=1)
            ema2 = timm_ema(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
            first = AutoWU(optimizer, total_steps=BUDGET, model=model, ema=ema2)
            model.load_state_dict(states[0])
            ema2.load_state_dict(states[1])
            optimizer.load_state_dict(states[2])
            first.load_state_dict(states[3])
        train_step(model, optimizer, first, ema2, step)
    assert first.rewinder.rewound_to == scheduler.rewinder.rewound_to
    for got, expected in zip(averaged(ema2), averaged(ema), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "ema, got",
    [("ema", "got str"), (3, "got int"), ([torch.zeros(2), "x"], "got list holding a str"), ({"w": 1}, "got dict")],
)
def test_an_average_of_another_kind_is_refused_naming_ema(ema, got):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match=f"`ema` must be .*; {got}"):
        AutoWU(optimizer, total_steps=BUDGET, ema=ema)
    scheduler = AutoWU(optimizer, total_steps=BUDGET)
    with pytest.raises(ValueError, match=f"`ema` must be .*; {got}"):
        WarmupRewinder(model, optimizer, scheduler, ema=ema)
