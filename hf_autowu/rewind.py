"""Rewind: undo the damage of the warmup's too-large learning rates at the switch.

AutoWU only learns that the LR is too large by seeing the loss rise, so the last steps of warmup train with
LRs above the one it finally picks. `WarmupRewinder` keeps a few host-memory snapshots of the model and the
optimizer taken at LR milestones during warmup and, at the switch, restores the latest one taken at or below
the chosen LR; decay then starts from that state.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .scheduler import AutoWU


def _to_host(value: Any) -> Any:
    """A deep copy of `value` with every tensor cloned to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def check_rewindable(model: torch.nn.Module) -> None:
    """Raise `ValueError` when `model`'s state is sharded across processes (FSDP, DeepSpeed ZeRO).

    A snapshot of a shard would restore only part of the model; that is not supported yet.
    """
    sharded_types = {"FullyShardedDataParallel", "DeepSpeedEngine"}
    if type(model).__name__ in sharded_types or hasattr(model, "_fsdp_wrapped_module"):
        raise ValueError("AutoWU rewind does not support sharded models (FSDP, DeepSpeed ZeRO); set rewind=False.")
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
        raise ValueError("AutoWU rewind does not support sharded (DTensor) parameters; set rewind=False.")


class WarmupRewinder:
    """Snapshots of model and optimizer state at warmup LR milestones, restored at AutoWU's switch.

    Which snapshots are kept: the latest one at or below the GP's latest estimate of the best LR (the likely
    rewind target), and the newest others.

    Attaching is all it takes: the scheduler calls it after every step (a Python comparison; snapshots are
    copied to host memory only at milestones, which costs a device sync there) and at the switch. Its
    snapshots travel in `scheduler.state_dict()`, so a resumed run rewinds exactly like an uninterrupted one.

    Every data-parallel process takes the same snapshots at the same steps (milestones depend only on the LR
    schedule) and restores the same one (the switch decision is shared), so replicas stay identical.

    Args:
        model (`torch.nn.Module`): The model (unwrapped or DDP-wrapped; not sharded).
        optimizer (`torch.optim.Optimizer`): Its optimizer.
        scheduler (`AutoWU`): The scheduler to attach to.
        snapshots (`int`, *optional*, defaults to 3): How many snapshots to keep (host memory: this many copies
            of the model and optimizer state).
        lr_factor (`float`, *optional*, defaults to 2.0): LR growth between two snapshots.

    Example:

    ```python
    scheduler = AutoWU(optimizer, total_steps=10_000)
    WarmupRewinder(model, optimizer, scheduler)
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: AutoWU,
        snapshots: int = 3,
        lr_factor: float = 2.0,
    ):
        if not isinstance(snapshots, int) or isinstance(snapshots, bool) or snapshots < 1:
            raise ValueError(f"`snapshots` must be an int >= 1, got {snapshots!r}.")
        if not isinstance(lr_factor, (int, float)) or not lr_factor > 1.0:
            raise ValueError(f"`lr_factor` must be a number > 1, got {lr_factor!r}.")
        check_rewindable(model)
        self.model = model
        self.optimizer = optimizer
        self.max_snapshots = snapshots
        self.lr_factor = float(lr_factor)
        self.snapshots: list[dict[str, Any]] = []
        self.rewound_to: dict[str, float] | None = None
        self._next_lr = 0.0
        scheduler.attach_rewinder(self)

    @property
    def memory_bytes(self) -> int:
        """Host memory held by the snapshots."""
        return sum(_nbytes(s["model"]) + _nbytes(s["optimizer"]) for s in self.snapshots)

    def after_step(self, scheduler: AutoWU) -> None:
        """Take a snapshot when the largest LR used so far has crossed the next milestone (warmup only)."""
        if scheduler.phase != "warmup":
            return
        used = scheduler.lr_at(scheduler.last_step - 1) if scheduler.last_step > 0 else 0.0
        if used < self._next_lr:
            return
        self.snapshots.append(
            {
                "step": scheduler.last_step,
                "lr": used,
                "model": _to_host(self.model.state_dict()),
                "optimizer": _to_host(self.optimizer.state_dict()),
            }
        )
        self._evict(scheduler)
        self._next_lr = max(used, scheduler.config.min_lr) * self.lr_factor

    def _evict(self, scheduler: AutoWU) -> None:
        """Keep `max_snapshots`: the anchor (the latest snapshot at or below the GP's current estimate of the
        best LR, the likely rewind target) and the newest others."""
        estimate = scheduler.last_outcome.lr_estimate if scheduler.last_outcome is not None else None
        while len(self.snapshots) > self.max_snapshots:
            below = [i for i, s in enumerate(self.snapshots) if estimate is not None and s["lr"] <= estimate]
            anchor = below[-1] if below else None
            del self.snapshots[1 if anchor == 0 else 0]

    def on_switch(self, scheduler: AutoWU) -> None:
        """Restore the latest snapshot taken at or below the chosen LR, then free the snapshots."""
        if not self.snapshots or scheduler.switch_reason == "no_warmup":
            return
        eligible = [s for s in self.snapshots if s["lr"] <= scheduler.peak_lr]
        if eligible:
            chosen = eligible[-1]
        else:
            chosen = self.snapshots[0]
            warnings.warn(
                "AutoWU rewind: every kept snapshot was trained with LRs above the chosen one; restoring the "
                "oldest. Keep more snapshots (`rewind_snapshots`) to rewind further.",
                stacklevel=2,
            )
        self.model.load_state_dict(chosen["model"])
        self.optimizer.load_state_dict(chosen["optimizer"])
        self.rewound_to = {"step": chosen["step"], "lr": chosen["lr"]}
        self.snapshots = []

    def state_dict(self) -> dict[str, Any]:
        """Snapshots (CPU tensors) and bookkeeping; stored inside the scheduler's state."""
        return {"snapshots": self.snapshots, "rewound_to": self.rewound_to, "next_lr": self._next_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.snapshots = list(state["snapshots"])
        self.rewound_to = state["rewound_to"]
        self._next_lr = float(state["next_lr"])
