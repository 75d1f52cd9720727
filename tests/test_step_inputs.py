"""What `AutoWU.step(loss)` records, and how the LR reaches the optimizer."""

import pytest
import torch
from helpers import make_optimizer, valley_loss

from hf_autowu import AutoWU


def test_a_loss_tensor_reused_and_changed_in_place_is_recorded_as_it_was_at_the_step():
    """Gradient accumulation often sums micro-batch losses into one running tensor and zeroes it after the step:
    the scheduler must keep each step's value, not a view of the tensor that is read at the next test."""
    by_float = AutoWU(make_optimizer(), total_steps=300)
    by_buffer = AutoWU(make_optimizer(), total_steps=300)
    generator = torch.Generator().manual_seed(0)
    running = torch.zeros((), dtype=torch.float64)
    for _ in range(300):
        lr = by_float.optimizer.param_groups[0]["lr"]
        loss = valley_loss(lr, 3e-3, 0.05, generator)
        by_float.step(loss)
        running.add_(torch.tensor(loss, dtype=torch.float64))
        by_buffer.step(running)
        running.zero_()
    assert by_float.switch_step is not None and by_float.switch_step < 200
    assert (by_buffer.switch_step, by_buffer.peak_lr) == (by_float.switch_step, by_float.peak_lr)
    assert torch.equal(by_buffer.losses, by_float.losses)


def test_a_tensor_lr_is_updated_in_place_as_torch_schedulers_do():
    model = torch.nn.Linear(2, 1)
    lr = torch.tensor(1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = AutoWU(optimizer, total_steps=100)
    for step in range(30):
        assert optimizer.param_groups[0]["lr"] is lr, "the optimizer's own tensor is kept"
        assert scheduler.get_last_lr()[0] == scheduler.lr_at(step)
        assert float(lr) == pytest.approx(scheduler.lr_at(step), rel=1e-6)  # a float32 tensor holds it
        model(torch.ones(4, 2)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(1.0 / (step + 1))
