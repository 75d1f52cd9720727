"""What `AutoWU.step` accepts as a step's loss, and how the losses it buffers become the history the switch test
reads, without a device sync."""

from __future__ import annotations

import math

import torch

from .config import is_number


def detach_loss(loss: torch.Tensor | float | None) -> torch.Tensor | float:
    """The step's loss, as it is now: a float, or for a tensor off the CPU a detached copy (a device-side copy, no
    sync). A copy, because a caller may reuse the tensor and change it in place before it is read.

    Args:
        loss (`torch.Tensor`, `float` or a NumPy array of one number): What was passed to `AutoWU.step`.

    Returns:
        `torch.Tensor` or `float`: the loss to buffer.
    """
    if loss is None:
        raise ValueError(
            "`AutoWU.step(loss)` needs the step's loss during warmup (a tensor or a float). With the Hugging Face "
            "`Trainer`, do not pass AutoWU in `optimizers=`: use `callbacks=[AutoWUCallback()]` or `AutoWUTrainer`, "
            "which hand it each step's loss."
        )
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"`loss` must hold a single value, got a tensor of shape {tuple(loss.shape)}.")
        if loss.is_complex() or loss.dtype == torch.bool:
            raise ValueError(f"`loss` must be a real number, got a {loss.dtype} tensor.")
        if loss.device.type == "cpu":
            return float(loss.detach())
        return loss.detach().reshape(()).clone()
    if is_number(loss):
        try:
            return float(loss)
        except OverflowError:  # an int beyond any float: as good as an infinite loss (a blow-up), not a crash
            return math.inf if loss > 0 else -math.inf
    kind = getattr(getattr(loss, "dtype", None), "kind", "")
    if hasattr(loss, "__array__") and getattr(loss, "size", None) == 1 and kind in ("i", "u", "f"):
        return float(loss.item())  # a numpy array holding one number, of any shape
    raise ValueError(f"`loss` must be a tensor or a float, got {type(loss).__name__}.")


def mean_loss(losses: list[torch.Tensor | float]) -> torch.Tensor | float:
    """The mean of an update's micro-batch losses (as `detach_loss` gives them), on their device: no sync.

    Args:
        losses (`list`): The micro-batches' losses, at least one.

    Returns:
        `torch.Tensor` or `float`: their mean.
    """
    values = [v.to(torch.promote_types(v.dtype, torch.float32)) if isinstance(v, torch.Tensor) else v for v in losses]
    return sum(values[1:], values[0]) / len(values)


def pending_to_tensor(pending: list[torch.Tensor | float]) -> torch.Tensor:
    """Stack buffered losses into one float64 tensor (on their device when they are all tensors on one).

    Args:
        pending (`list`): Buffered losses, as `detach_loss` or `mean_loss` gave them.

    Returns:
        `torch.Tensor`: shape (len(pending),), float64.
    """
    if not pending:
        return torch.empty(0, dtype=torch.float64)
    if all(isinstance(v, torch.Tensor) for v in pending) and len({v.device for v in pending}) == 1:
        return torch.stack([v.to(torch.float64) for v in pending])
    return torch.tensor([float(v) for v in pending], dtype=torch.float64)
