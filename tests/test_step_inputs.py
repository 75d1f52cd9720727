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


def test_micro_batch_losses_are_averaged_at_their_own_precision():
    """Under gradient accumulation the update's loss is the mean of its micro-batches' losses: float64 losses stay
    float64 (a loss with a large constant term kept its variation; it used to be rounded to float32), bfloat16
    ones are averaged in float32."""
    from hf_autowu.loss_inputs import mean_loss

    big = [torch.tensor(1e6 + 0.0125, dtype=torch.float64), torch.tensor(1e6, dtype=torch.float64)]
    assert mean_loss(big).item() == pytest.approx(1e6 + 0.00625, abs=1e-9)
    halves = [torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0078125, dtype=torch.bfloat16)]
    assert mean_loss(halves).dtype == torch.float32 and mean_loss(halves).item() == 1.00390625


def test_an_int_loss_beyond_any_float_is_a_non_finite_loss():
    """`step(10**400)` is a loss too large for a float: taken as an infinite loss (retried once, as a NaN is), not
    an OverflowError in the training loop; the LR stays finite."""
    scheduler = AutoWU(make_optimizer(), total_steps=100)
    for step in range(30):
        scheduler.step(10**400 if step == 12 else 1.0 - 0.01 * step)
    assert scheduler.retried is not None and scheduler.retried["loss_index"] == 12
    assert 0 <= scheduler.get_last_lr()[0] < float("inf")


def test_step_update_refuses_a_count_that_is_not_an_int():
    scheduler = AutoWU(make_optimizer(), total_steps=100)
    for bad in (None, "1", 1.0):
        with pytest.raises(ValueError, match="`num_updates` must be an int"):
            scheduler.step_update(bad, 1.0)


def test_a_group_whose_lr_would_overflow_is_refused():
    """A finite `lr_scale` so large that the group's LR at `max_lr` is not finite: refused when AutoWU is built
    (it used to write an infinite LR into the optimizer when the ramp got there)."""
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 1.0, "lr_scale": 1e308}])
    with pytest.raises(ValueError, match="Parameter group 0: its LR ratio"):
        AutoWU(optimizer, total_steps=100, max_lr=10.0)
