"""The optimizer's parameter groups as AutoWU reads and sets their learning rates."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import is_number


def configured_lr(index: int, group: dict[str, Any]) -> float:
    """The LR a parameter group was built with; a clear error when it has none AutoWU can scale.

    Args:
        index (`int`): The group's index, for the error message.
        group (`dict`): The parameter group.

    Returns:
        `float`: its `initial_lr` (set by an earlier scheduler), else its `lr`.
    """
    lr = group.get("initial_lr", group.get("lr"))
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and not lr.is_complex():
        lr = float(lr)
    if not (is_number(lr) and 0 <= lr < math.inf):
        raise ValueError(
            f"AutoWU sets every parameter group's `lr`, but group {index} has lr={lr!r}: give the optimizer a finite "
            "lr >= 0 (for transformers' Adafactor: `lr=1e-3, relative_step=False, scale_parameter=False`)."
        )
    return float(lr)


def lr_scale(index: int, group: dict[str, Any]) -> float:
    """A parameter group's `lr_scale` (1 without one): timm's layer-wise LR decay puts it there for the scheduler
    to apply (`timm.optim.create_optimizer_v2(..., layer_decay=...)` gives every group the same `lr`), and timm's
    schedulers set `lr = value * lr_scale`.

    Args:
        index (`int`): The group's index, for the error message.
        group (`dict`): The parameter group.

    Returns:
        `float`: the scale, finite and >= 0.
    """
    scale = group.get("lr_scale", 1.0)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = float(scale)
    if not (is_number(scale) and 0 <= scale < math.inf):
        raise ValueError(
            f"Parameter group {index} has lr_scale={scale!r}: AutoWU multiplies the group's LR by it, as timm's "
            "schedulers do, so it must be a finite number >= 0."
        )
    return float(scale)


def set_group_lr(group: dict[str, Any], lr: float) -> None:
    """Set a parameter group's LR; a tensor LR (as for capturable or compiled optimizers) is updated in place, as
    torch's own schedulers do, so that whatever reads that tensor sees the new value.

    Args:
        group (`dict`): The parameter group.
        lr (`float`): Its new learning rate.
    """
    current = group.get("lr")
    if isinstance(current, torch.Tensor):
        current.fill_(lr)
    else:
        group["lr"] = lr
