"""Rewind restores the model and optimizer state of a warmup snapshot, bit for bit, and survives resume."""

import copy
import io
import math

import pytest
import torch

from hf_autowu import AutoWU, WarmupRewinder


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    )


def data(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def train(model, optimizer, scheduler, start, stop, snapshots_seen=None, lrs=None):
    for step in range(start, stop):
        x, y = data(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if lrs is not None:
            lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(loss)
        if snapshots_seen is not None and scheduler.rewinder.snapshots:
            latest = scheduler.rewinder.snapshots[-1]
            if latest["step"] not in snapshots_seen:
                snapshots_seen[latest["step"]] = copy.deepcopy(latest)


def build(seed=0, **options):
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=400, immediate_cooldown=True, **options)
    rewinder = WarmupRewinder(model, optimizer, scheduler)
    return model, optimizer, scheduler, rewinder


def assert_state_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


def test_snapshots_at_lr_milestones_and_bit_exact_restore():
    model, optimizer, scheduler, rewinder = build()
    seen = {}
    train(model, optimizer, scheduler, 0, 400, snapshots_seen=seen)
    assert scheduler.switch_step is not None and rewinder.rewound_to is not None
    steps = sorted(seen)
    tags = [seen[s]["lr"] for s in steps]
    assert all(b >= 2 * a for a, b in zip(tags[1:], tags[2:], strict=False)), "one snapshot per doubling of LR"
    target = rewinder.rewound_to
    assert target["lr"] <= scheduler.peak_lr < 2 * target["lr"], "the latest snapshot at or below the chosen LR"
    assert target["step"] in steps
    assert rewinder.snapshots == [] and rewinder.memory_bytes == 0

    # replay up to the snapshot step without a rewinder: the restored state is exactly the state at that step
    model2 = make_model()
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    scheduler2 = AutoWU(optimizer2, total_steps=400, immediate_cooldown=True)
    train(model2, optimizer2, scheduler2, 0, target["step"])
    assert_state_equal(seen[target["step"]]["model"], model2.state_dict())
    assert_state_equal(seen[target["step"]]["optimizer"]["state"], optimizer2.state_dict()["state"])


def test_rewind_undoes_a_blow_up():
    model, optimizer, scheduler, rewinder = build()
    train(model, optimizer, scheduler, 0, scheduler.switch_step or 400)
    x, y = data(10_000)
    loss_after_rewind = torch.nn.functional.mse_loss(model.eval()(x), y).item()
    assert math.isfinite(loss_after_rewind)
    assert rewinder.rewound_to["lr"] < scheduler.tests[-1].lr, "restored a state from before the largest LRs"


def test_memory_cost_is_reported():
    model, optimizer, scheduler, rewinder = build()
    train(model, optimizer, scheduler, 0, 60)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(rewinder.snapshots) >= 1
    # each snapshot: parameters + buffers + AdamW's two moments
    assert rewinder.memory_bytes >= len(rewinder.snapshots) * 3 * params


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("where", ["before_first_snapshot_kept", "late_warmup"])
def test_resume_with_rewind_is_bit_exact(where):
    model, optimizer, scheduler, _ = build()
    expected = []
    train(model, optimizer, scheduler, 0, 400, lrs=expected)
    final_state = model.state_dict()
    stop = 30 if where == "before_first_snapshot_kept" else scheduler.switch_step - 3

    model1, optimizer1, scheduler1, _ = build()
    lrs = []
    train(model1, optimizer1, scheduler1, 0, stop, lrs=lrs)
    saved = roundtrip({"model": model1.state_dict(), "opt": optimizer1.state_dict(), "sched": scheduler1.state_dict()})

    model2, optimizer2, scheduler2, _ = build(seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    train(model2, optimizer2, scheduler2, stop, 400, lrs=lrs)
    assert lrs == expected
    assert_state_equal(model2.state_dict(), final_state)


def test_sharded_models_are_refused():
    class FullyShardedDataParallel(torch.nn.Module):  # stands for the FSDP wrapper's type name
        pass

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=10)
    with pytest.raises(ValueError, match="sharded"):
        WarmupRewinder(FullyShardedDataParallel(), optimizer, scheduler)
