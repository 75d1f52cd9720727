"""A real training loop fed faulty losses (NaN, inf, spikes, NaN gradients that reach the weights), saved and resumed
at a random step, goes on exactly like the uninterrupted run: the same LR at every step, the same weights bit for
bit, the same decision, and never a non-finite or negative LR. Rewind (on by default, with and without the model
given) and its retries take part: the faults are what make them act."""

import math
import warnings

import torch
from helpers import regression_batch, regression_mlp, roundtrip
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_autowu import AutoWU

FAULTS = st.sampled_from(["nan_loss", "inf_loss", "spike", "drop", "nan_gradients"])


def build(total: int, preset: str, with_model: bool, seed: int = 0):
    model = regression_mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(
        optimizer, total_steps=total, preset=preset, immediate_cooldown=True, model=model if with_model else None
    )
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, start: int, stop: int, faults: dict[int, str], lrs: list[float]) -> None:
    """The README's hand loop. A fault at a step changes what the scheduler is fed (`nan_loss`, `inf_loss`, a
    `spike` 1000x the loss, a `drop` to 0) or, for `nan_gradients`, the targets, so that NaN reaches the weights."""
    for step in range(start, stop):
        x, y = regression_batch(step)
        if faults.get(step) == "nan_gradients":
            y = y * math.nan
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        lr = optimizer.param_groups[0]["lr"]
        assert math.isfinite(lr) and lr >= 0.0, f"LR {lr} at step {step}"
        lrs.append(lr)
        fed = {"nan_loss": loss * math.nan, "inf_loss": loss * math.inf, "spike": loss * 1e3, "drop": loss * 0}
        scheduler.step(fed.get(faults.get(step), loss))


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal bit for bit, NaNs included (`torch.equal` calls two NaNs different)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    total=st.integers(min_value=30, max_value=160),
    preset=st.sampled_from(["robust", "paper"]),
    with_model=st.booleans(),
    faults=st.dictionaries(st.integers(min_value=0, max_value=159), FAULTS, max_size=4),
    resume_at=st.floats(min_value=0.0, max_value=1.0),
)
def test_resume_anywhere_under_faults_is_bit_exact(total, preset, with_model, faults, resume_at):
    stop = min(total - 1, max(1, round(resume_at * total)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, scheduler = build(total, preset, with_model)
        expected: list[float] = []
        train(model, optimizer, scheduler, 0, total, faults, expected)

        model1, optimizer1, scheduler1 = build(total, preset, with_model)
        lrs: list[float] = []
        train(model1, optimizer1, scheduler1, 0, stop, faults, lrs)
        saved = roundtrip(
            {"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()}
        )

        model2, optimizer2, scheduler2 = build(total, preset, with_model, seed=123)  # all must come from the save
        model2.load_state_dict(saved["model"])
        optimizer2.load_state_dict(saved["opt"])
        scheduler2.load_state_dict(saved["sched"])
        train(model2, optimizer2, scheduler2, stop, total, faults, lrs)

    event(f"switch: {scheduler.switch_reason}, rewound: {getattr(scheduler.rewinder, 'rewound_to', None) is not None}")
    event(f"resumed in {'warmup' if scheduler.switch_step is None or stop <= scheduler.switch_step else 'decay'}")
    assert lrs == expected, f"the LRs diverge after resuming at step {stop}"
    assert (scheduler2.switch_step, scheduler2.switch_reason, scheduler2.peak_lr) == (
        scheduler.switch_step,
        scheduler.switch_reason,
        scheduler.peak_lr,
    )
    assert same_bits(model2.state_dict(), model.state_dict()), f"the weights differ after resuming at step {stop}"
