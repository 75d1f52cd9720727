"""Rewind: undo the damage of the warmup's too-large learning rates at the switch.

AutoWU only learns that the LR is too large by seeing the loss rise, so the last steps of warmup train with LRs
above the one it finally picks. `WarmupRewinder` is a listener of the scheduler: it keeps a few snapshots of the
parameters and the optimizer state (and the model's buffers, when it knows the model) taken at LR milestones
during warmup and, at the switch, restores the latest one taken at or below the chosen LR, when the steps since
then moved the parameters by at least `min_shift` of their norm (or a blow-up marked them damaged): a model those
steps barely moved, e.g. a pretrained one being fine-tuned, keeps what they taught it.

Where the snapshots live, so that the default fits every engine:

- one process, or data-parallel replicas (DDP, Accelerate, the Trainer without sharding, DeepSpeed without ZeRO):
  every replica holds the same state, so only the main process keeps snapshots; at the switch it restores its copy
  and broadcasts it to the others (one snapshot set in the job, not one per process; DeepSpeed's bf16/fp16 wrappers
  then copy their fp32 masters into the model);
- sharded state (FSDP1 with `use_orig_params`, FSDP2 `fully_shard`, `ZeroRedundancyOptimizer`, DeepSpeed ZeRO
  stages 1 to 3): every process keeps a snapshot of its own shards and restores them itself. DeepSpeed's optimizer
  steps fp32 master partitions: those and their optimizer state are what is snapshotted, and after a restore the
  model's weights are refreshed from them the way DeepSpeed's step does it (`state_layout`);
- state out of reach (DeepSpeed with NVMe offload, or an optimizer that DeepSpeed neither wraps nor steps while it
  runs the model): rewind turns itself off with one warning that says why.

With sharded state each process's `state_dict()` holds its own shards' snapshots, so each process must save its
own. A snapshot loaded from another process's state (`accelerator.register_for_checkpointing` saves the main
process's state and loads it on every process) or from another number of processes is never restored: when the
switch would restore one, no process restores, with one warning.

The layout is read when the first snapshot is due (after `accelerator.prepare` or `deepspeed.initialize` has
wrapped the optimizer), not when the rewinder is built.

Before the first snapshot is copied, the rewinder compares what its snapshots will take (summed over the
processes of the node that hold them) with `memory_fraction` of the host memory available (or of the free disk
space, with `offload_dir`); when they would not fit it turns itself off on every process, with one warning.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .distributed import (
    broadcast_object,
    collective_device,
    mean_over_processes,
    min_over_processes,
    min_over_processes_each,
    process_rank,
    world_size,
)
from .state_layout import REPLICATED, SHARDED, UNSUPPORTED, layout_of, sharding_of, state_owner

__all__ = ["REPLICATED", "SHARDED", "UNSUPPORTED", "WarmupRewinder", "sharding_of"]

if TYPE_CHECKING:
    from .scheduler import AutoWU

logger = logging.getLogger(__name__)

_BROADCAST_BUCKET_BYTES = 256 * 2**20


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return _local(tensor).detach().to("cpu", copy=True)


def _map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `function` applied to every tensor in it, also inside lists, tuples and dicts (LBFGS keeps its
    history in lists of tensors and changes them in place); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, function) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, function) for v in value)
    return value


def _nbytes(tensor: torch.Tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def _is_average(value: Any) -> bool:
    """Whether `value` is one weight average `ema_tensors` reads."""
    if isinstance(value, (torch.nn.Module, torch.Tensor)):
        return True
    return isinstance(getattr(value, "shadow_params", None), list)


def check_ema(ema: Any) -> None:
    """Raise a `ValueError` unless `ema` is None or what `ema_tensors` reads: a module, an object with a
    `shadow_params` list (diffusers' `EMAModel`), a tensor, or a list or tuple of these."""
    items = ema if isinstance(ema, (list, tuple)) else [ema]
    if ema is not None and not all(_is_average(item) for item in items):
        raise ValueError(
            "`ema` must be a `torch.nn.Module` (timm's `ModelEmaV3`, torch's `AveragedModel`), an object with a "
            "`shadow_params` list of tensors (diffusers' `EMAModel`), a tensor, or a list of these; got "
            f"{type(ema).__name__}"
            f"{'' if items[0] is ema else ' holding a '}"
            f"{'' if items[0] is ema else next(type(i).__name__ for i in items if not _is_average(i))}."
        )


def ema_tensors(ema: Any) -> list[torch.Tensor]:
    """The tensors of the weight averages `ema` (see `check_ema`), read now: a module's parameters and buffers, an
    object's `shadow_params` (diffusers' `EMAModel.to` replaces that list's tensors, so it is read at every use), a
    tensor itself; for a list, each item's in turn."""
    if ema is None:
        return []
    if isinstance(ema, (list, tuple)):
        return [t for item in ema for t in ema_tensors(item)]
    if isinstance(ema, torch.Tensor):
        return [ema]
    if isinstance(ema, torch.nn.Module):
        return [*ema.parameters(), *(b for b in ema.buffers() if b is not None)]
    return list(ema.shadow_params)


def available_host_memory() -> int | None:
    """Bytes of host memory available to this process: the smaller of the system's `MemAvailable` and what the
    cgroup (container) limit leaves; None when neither can be read."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            candidates.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(candidates) if candidates else None


def local_world_size() -> int:
    """Processes of this job on this node (torchrun's and Accelerate's `LOCAL_WORLD_SIZE`; 1 without it)."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


class WarmupRewinder:
    """Snapshots of the training state at warmup LR milestones, restored at AutoWU's switch.

    `AutoWU` builds one by default (`rewind=True`, the robust preset's default), so a hand-written loop gets rewind
    without writing anything; build one yourself to pass the model (its buffers, e.g. BatchNorm statistics, are
    then restored too), a moving average of the weights kept beside it (`ema`) or other settings: it replaces the
    scheduler's own.

    Which snapshots are kept: the latest one at or below the GP's latest estimate of the best LR (the likely rewind
    target), the one after it (in case the estimate still grows), and the newest. Snapshots are taken when the
    largest LR used so far has grown by `lr_factor` since the last one, so at the same steps on every process;
    copying one to the host costs a device sync there.

    Its state (snapshots as CPU tensors, and bookkeeping) travels in `scheduler.state_dict()` unless `state_key` is
    set to None (the Trainer integration does that and saves one file per process in the checkpoint instead). With
    data-parallel replicas only the main process's state holds the snapshots.

    Every option left at None takes the scheduler's `AutoWUConfig` value (`rewind_*`), so a rewinder built by hand
    decides as the one the scheduler builds itself.

    Args:
        model (`torch.nn.Module`, *optional*): The model; with it, its buffers are snapshotted too.
        optimizer (`torch.optim.Optimizer`, *optional*): The optimizer (defaults to the scheduler's).
        scheduler (`AutoWU`): The scheduler to listen to.
        snapshots (`int`, *optional*): How many snapshots to keep (default: the config's `rewind_snapshots`, 3).
        lr_factor (`float`, *optional*): LR growth between two snapshots (default: `rewind_lr_factor`, 2.0).
        memory_fraction (`float`, *optional*): Largest share of the node's available host memory (or free disk space
            with `offload_dir`) the snapshots may take; above it rewind turns itself off (default:
            `rewind_memory_fraction`, 0.5).
        offload_dir (`str`, *optional*): Keep the snapshots as files in this (local) folder instead of memory
            (default: `rewind_offload_dir`, None: in memory).
        min_shift (`float`, *optional*): Restore a snapshot only when the parameters have moved since it by at least
            this fraction of its norm (`||now - snapshot|| / ||snapshot||`, over all parameters); below it the run
            keeps the steps trained past the chosen LR. After a blow-up the snapshot is always restored. 0: always
            restore (default: `rewind_min_shift`, 0.2 with the robust preset).
        ema (*optional*): A moving average of the weights kept beside the model, updated from it after every step:
            a module (timm's `ModelEmaV2` or `ModelEmaV3`, torch's `AveragedModel`: its parameters and buffers), an
            object with a `shadow_params` list of tensors (diffusers' `EMAModel`), a tensor, or a list of these. Its
            tensors are snapshotted and restored with the parameters, so that the average leaves out the steps the
            rewind undoes; otherwise a blow-up's weights stay in it (for good, when they are not finite).

    Example:

    ```python
    scheduler = AutoWU(optimizer, total_steps=10_000)
    WarmupRewinder(model, optimizer, scheduler, offload_dir="/local/rewind")  # snapshots on disk, buffers too
    # (`AutoWU(optimizer, total_steps=10_000, model=model)` restores the buffers with the config's options, and
    # `AutoWU(..., model=model, ema=ema_model)` an EMA of the weights too)
    ```
    """

    state_key: str | None = "rewind"

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: AutoWU | None = None,
        snapshots: int | None = None,
        lr_factor: float | None = None,
        memory_fraction: float | None = None,
        offload_dir: str | os.PathLike | None = None,
        min_shift: float | None = None,
        ema: Any = None,
    ):
        if scheduler is None:
            raise ValueError("`scheduler` is required: the AutoWU scheduler to rewind at.")
        config = scheduler.config
        snapshots = config.rewind_snapshots if snapshots is None else snapshots
        lr_factor = config.rewind_lr_factor if lr_factor is None else lr_factor
        memory_fraction = config.rewind_memory_fraction if memory_fraction is None else memory_fraction
        offload_dir = config.rewind_offload_dir if offload_dir is None else offload_dir
        min_shift = config.preset_setting("rewind_min_shift") if min_shift is None else min_shift
        if not isinstance(snapshots, int) or isinstance(snapshots, bool) or snapshots < 1:
            raise ValueError(f"`snapshots` must be an int >= 1, got {snapshots!r}.")
        if not isinstance(lr_factor, (int, float)) or not lr_factor > 1.0 or not math.isfinite(lr_factor):
            raise ValueError(f"`lr_factor` must be a finite number > 1, got {lr_factor!r}.")
        if not isinstance(memory_fraction, (int, float)) or not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"`memory_fraction` must be in (0, 1], got {memory_fraction!r}.")
        if not isinstance(min_shift, (int, float)) or isinstance(min_shift, bool) or not 0.0 <= min_shift < math.inf:
            raise ValueError(f"`min_shift` must be a finite number >= 0, got {min_shift!r}.")
        check_ema(ema)
        self.model = model
        self.ema = ema
        self.optimizer = optimizer if optimizer is not None else scheduler.optimizer
        self.max_snapshots = snapshots
        self.lr_factor = float(lr_factor)
        self.memory_fraction = float(memory_fraction)
        self.offload_dir = None if offload_dir is None else Path(offload_dir)
        self._file_tag = uuid.uuid4().hex[:12]  # two rewinders may share a folder (two models, a sweep)
        self.mode = REPLICATED  # read again, with the refresh DeepSpeed needs, when the first snapshot is due
        self._refresh_model = self._layout_params = self._padding_masks = None
        self.enabled = True
        self.disabled_reason: str | None = None
        self.snapshots: list[dict[str, Any]] = []
        self.min_shift = float(min_shift)
        self.rewound_to: dict[str, float] | None = None
        self.kept: dict[str, float] | None = None  # the snapshot not restored (shift below `min_shift`), and the shift
        self.planned_bytes: int | None = None
        self._next_lr = 0.0
        self._budget_checked = False
        scheduler.add_listener(self)  # replaces the scheduler's own rewinder, if it built one

    # ------------------------------------------------------------------ what is held, and where

    @property
    def holds_snapshots(self) -> bool:
        """Whether this process keeps snapshot data (every process for sharded state, else the main process)."""
        return self.enabled and (self.mode == SHARDED or process_rank() == 0)

    @property
    def memory_bytes(self) -> int:
        """Host memory held by this process's snapshots (0 when they are offloaded to disk)."""
        return sum(s["bytes"] for s in self.snapshots if s.get("data") is not None)

    def _stepped_params(self) -> list[torch.Tensor]:
        """The tensors the optimizer steps, in its order (DeepSpeed: its fp32 master partitions)."""
        if self._layout_params is not None:
            return self._layout_params()
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _optimizer_state(self) -> dict[Any, dict[str, Any]]:
        """The optimizer's per-parameter state, where it lives (`state_owner`: timm's `Lookahead` keeps it in the
        optimizer it wraps)."""
        return state_owner(self.optimizer).state

    def _state_tensors(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """The parameters, in the optimizer's order, with their optimizer state."""
        state = self._optimizer_state()
        for p in self._stepped_params():
            yield p, state.get(p, {})

    def _buffers(self) -> list[torch.Tensor]:
        """The tensors restored beside the stepped ones: the model's buffers, then the tensors of `ema`."""
        model = [] if self.model is None else [b for b in self.model.buffers() if b is not None]
        return model + ema_tensors(self.ema)

    def _snapshot_bytes(self) -> int:
        total = sum(_nbytes(b) for b in self._buffers())
        for p, state in self._state_tensors():
            total += _nbytes(p) + sum(_nbytes(v) for v in _tensors_in(state))
        return total

    def _shapes(self) -> list[list[list[int]]]:
        """The shapes of this process's stepped tensors and of the model's buffers and `ema`'s tensors: a snapshot is
        restored only into a training state of the same shapes (not after `optimizer.add_param_group`, or a buffer
        registered again with another shape)."""
        return [
            [list(_local(p).shape) for p in self._stepped_params()],
            [list(_local(b).shape) for b in self._buffers()],
        ]

    # ------------------------------------------------------------------ listener hooks

    def on_step(self, scheduler: AutoWU) -> None:
        """Take a snapshot when the largest LR used so far has crossed the next milestone (warmup only)."""
        if scheduler.phase != "warmup" or not self.enabled:
            return
        used = scheduler.lr_at(scheduler.last_step - 1) if scheduler.last_step > 0 else 0.0
        if used < self._next_lr:
            return
        if not self._budget_checked and not self._check_budget():
            return
        self._next_lr = max(used, scheduler.config.min_lr) * self.lr_factor
        entry: dict[str, Any] = {
            "step": scheduler.last_step,
            "lr": used,
            "data": None,
            "bytes": 0,
            "finite": True,
            "shapes": self._shapes(),
        }
        if self.holds_snapshots:
            # under `Join`, a main process that ran out of inputs copies the state it stopped at (`scheduler.joined`):
            # an earlier state of the run, trained with LRs below its label, so still a valid rewind target
            data = {
                "params": [_host_copy(p) for p, _ in self._state_tensors()],
                "state": [
                    {k: _map_tensors(v, _host_copy) for k, v in state.items()} for _, state in self._state_tensors()
                ],
                "buffers": [_host_copy(b) for b in self._buffers()],
            }
            self._clear_padding(data["params"], data["state"])
            # a state a NaN has already reached is not kept (the metadata is, so that every process keeps the same
            # list); `on_switch` never picks it
            entry["finite"] = all(bool(torch.isfinite(t).all()) for t in _tensors_in(data) if t.is_floating_point())
            if not entry["finite"]:
                data = None
            elif self.offload_dir is not None:
                entry["file"] = str(self._offload_path(scheduler.last_step))
                torch.save(data, entry["file"])
            else:
                entry["data"] = data
                entry["bytes"] = sum(t.numel() * t.element_size() for t in _tensors_in(data))
        self.snapshots.append(entry)
        self._evict(scheduler)

    def _evict(self, scheduler: AutoWU) -> None:
        """Keep `max_snapshots`, in this order of priority: the anchor (the latest snapshot at or below the GP's
        current estimate of the best LR, the likely rewind target; the oldest one when all lie above it), the one
        after it (the target if the estimate still grows by up to `lr_factor`), and the newest. Before any estimate
        (a short budget's fast ramp can take many snapshots before the first switch test): the oldest, a state no
        blow-up can have reached yet, and the newest, since a switch at the cap comes at the end of the ramp so far.
        The choice depends only on what every process knows alike, so they all keep the same list."""
        estimate = scheduler.last_outcome.lr_estimate if scheduler.last_outcome is not None else None
        while len(self.snapshots) > self.max_snapshots:
            if estimate is None:
                self._drop(self.snapshots.pop(1))  # the oldest stays; the second oldest goes
                continue
            below = [i for i, s in enumerate(self.snapshots) if s["lr"] <= estimate]
            anchor = below[-1] if below else 0
            kept = [anchor, anchor + 1, len(self.snapshots) - 1][: self.max_snapshots]
            self._drop(self.snapshots.pop(next(i for i in range(len(self.snapshots)) if i not in kept)))

    def on_switch(self, scheduler: AutoWU) -> None:
        """Restore the latest finite snapshot taken at or below the chosen LR, and before the first damaged state
        after a blow-up (the oldest such one, with a warning, when none is at or below the LR), then free the
        snapshots. Without a blow-up, a snapshot the parameters have moved less than `min_shift` of its norm away
        from is not restored (`kept` records it and the shift). Every process restores the same one: with replicated
        state the main process chooses and broadcasts its copy; with sharded state the processes agree on which
        snapshots are finite everywhere (one collective each, at the switch only)."""
        if not self.snapshots or scheduler.switch_reason == "no_warmup" or not self.enabled:
            return
        index = self._agreed_choice(scheduler.peak_lr, scheduler.damaged_from)
        if index is not None:
            chosen = self.snapshots[index]
            data = self._snapshot_data(chosen)
            gated = self.min_shift > 0.0 and scheduler.damaged_from is None
            shift = self._shift_since(data, scheduler.joined) if gated else math.inf
            if shift < self.min_shift:
                self.kept = {"step": chosen["step"], "lr": chosen["lr"], "shift": shift}
            else:
                if chosen["lr"] > scheduler.peak_lr:
                    warnings.warn(
                        "AutoWU rewind: every kept snapshot was trained with LRs above the chosen one "
                        f"({scheduler.peak_lr:.3g}); restoring the oldest kept, of step {chosen['step']} (LRs up to "
                        f"{chosen['lr']:.3g}). The snapshots kept follow the GP's estimate of the best LR while "
                        "warmup goes on; more of them (`rewind_snapshots`) reach further back.",
                        stacklevel=2,
                    )
                self._restore(data)
                self.rewound_to = {"step": chosen["step"], "lr": chosen["lr"]}
        for snapshot in self.snapshots:
            self._drop(snapshot)
        self.snapshots = []

    def restore_before(self, scheduler: AutoWU, damaged_from: int) -> dict[str, float] | None:
        """Warmup goes on after a non-finite loss (`AutoWU.retried`): restore the latest finite snapshot taken before
        step `damaged_from` (the state that loss was computed on), keep it and the older ones, and drop the later
        ones, which belong to the abandoned steps. The next snapshot comes when the ramp's LR has grown by `lr_factor`
        from where it is now. Every process restores the same one (see `on_switch`).

        Args:
            scheduler (`AutoWU`): The scheduler this rewinder listens to.
            damaged_from (`int`): Index of the non-finite loss.

        Returns:
            `dict` or `None`: the restored snapshot's `step` and `lr`, or None when nothing was restored: the training
            state is finite on every process (the bad update never reached it: all-masked labels give zero
            gradients, fp16 loss scaling skips the update), or there is no finite snapshot before the loss, rewind
            is off, or the snapshot does not fit; the run goes on from where it is.
        """
        if not self.snapshots or not self.enabled or self._state_is_finite():
            return None
        index = self._agreed_choice(math.inf, damaged_from)
        if index is None:
            return None
        chosen = self.snapshots[index]
        self._restore(self._snapshot_data(chosen))
        for snapshot in self.snapshots[index + 1 :]:
            self._drop(snapshot)
        self.snapshots = self.snapshots[: index + 1]
        used = scheduler.lr_at(scheduler.last_step - 1) if scheduler.last_step > 0 else 0.0
        self._next_lr = max(used, scheduler.config.min_lr) * self.lr_factor
        return {"step": chosen["step"], "lr": chosen["lr"]}

    def _state_is_finite(self) -> bool:
        """Whether the stepped tensors, their optimizer state, the model's buffers and `ema`'s tensors hold no NaN or
        inf on any process (DeepSpeed's uninitialised padding left out). One pass over them, one host read per device
        they live on, and one collective: after a non-finite loss only."""
        flags: dict[torch.device, torch.Tensor] = {}  # per device, whether all its tensors so far are finite

        def check(ok: torch.Tensor) -> None:
            flag = ok.all()
            flags[flag.device] = flag if flag.device not in flags else flags[flag.device] & flag

        with torch.no_grad():
            masks = self._padding_masks or []
            for i, (p, state) in enumerate(self._state_tensors()):
                mask = masks[i] if i < len(masks) else None
                for tensor in [_local(p), *(_local(t) for t in _tensors_in(state))]:
                    if not tensor.is_floating_point():
                        continue
                    ok = torch.isfinite(tensor)
                    if mask is not None and ok.shape == mask.shape:
                        ok = ok | ~mask.to(ok.device)
                    check(ok)
            for buffer in self._buffers():
                if buffer.is_floating_point():
                    check(torch.isfinite(buffer))
        finite = all(bool(flag) for flag in flags.values())
        return min_over_processes_each([float(finite)])[0] > 0.0

    def _agreed_choice(self, lr: float, damaged_from: int | None) -> int | None:
        """The index of the snapshot every process restores (`_choose` with `lr` and `damaged_from`), or None, with a
        warning, when there is none: no finite snapshot, or the one chosen holds another process's state or does not
        fit today's shapes. With sharded state the processes agree on which snapshots are finite, their own and
        fitting everywhere (one collective); with replicated state the main process's choice is broadcast."""
        finite = [s["finite"] for s in self.snapshots]
        own = [not s.get("foreign", False) for s in self.snapshots]
        shapes = self._shapes()  # snapshots of states saved before shapes were recorded are taken to fit
        fits = [s.get("shapes") in (None, shapes) for s in self.snapshots]
        n = len(finite)
        if self.mode == SHARDED:  # the three agreements in one collective
            flags = [flag > 0.0 for flag in min_over_processes_each([float(f) for f in finite + own + fits])]
            finite, own, fits = flags[:n], flags[n : 2 * n], flags[2 * n :]
        index = _choose(self.snapshots, finite, lr, damaged_from)
        if self.mode == REPLICATED:
            index, fits = broadcast_object((index, fits))
        if index is None:
            warnings.warn("AutoWU rewind: no finite snapshot is left; the run goes on from where it is.", stacklevel=3)
        elif not own[index]:
            if process_rank() == 0:
                warnings.warn(
                    "AutoWU rewind: the snapshot to restore came from another process's state (each process holds "
                    "its own shards: save every process's `scheduler.state_dict()`, not only the main process's) or "
                    "from another number of processes; nothing is restored, and the run goes on from where it is.",
                    stacklevel=3,
                )
        elif not fits[index]:
            if process_rank() == 0:
                warnings.warn(
                    "AutoWU rewind: the parameters or buffers have changed shape since the snapshot to restore was "
                    "taken (a parameter group added to the optimizer, a buffer registered again); nothing is "
                    "restored, and the run goes on from where it is.",
                    stacklevel=3,
                )
        else:
            return index
        return None

    def _snapshot_data(self, snapshot: dict[str, Any]) -> dict[str, Any] | None:
        """A snapshot's tensors (read from its file when offloaded), or None on a process that holds none."""
        if not self.holds_snapshots:
            return None
        return snapshot["data"] if snapshot["data"] is not None else torch.load(snapshot["file"], weights_only=True)

    def _clear_padding(self, params: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        """Zero, in host copies, the padding elements DeepSpeed leaves uninitialised (ZeRO 3), in each stepped tensor
        and in the state tensors shaped like it, so that no check or distance reads them."""
        for i, mask in enumerate(self._padding_masks or []):
            if mask is None:
                continue
            for tensor in [params[i], *(v for v in states[i].values() if isinstance(v, torch.Tensor))]:
                if tensor.shape == mask.shape:
                    tensor[~mask] = 0

    def _shift_since(self, data: dict[str, Any] | None, joined: bool = False) -> float:
        """How far the parameters have moved since the snapshot `data`: `||now - snapshot|| / ||snapshot||` over all
        parameters, in float64 on the host, the same value on every process (sharded: the sums are added over the
        processes; replicated: the main process's value). NaN when a parameter is not finite, or when this process
        reads it and has joined under `Join` (its parameters stopped where it joined): then rewind restores. At the
        switch only: one pass over the parameters, one collective."""
        sums = torch.zeros(2, dtype=torch.float64)
        if joined:
            sums.fill_(math.nan)
        elif data is not None:
            with torch.no_grad():
                masks = self._padding_masks or [None] * len(data["params"])
                for (p, _), saved, mask in zip(self._state_tensors(), data["params"], masks, strict=True):
                    before = saved.to(torch.float64)
                    moved = _local(p).detach().to(device="cpu", dtype=torch.float64) - before
                    if mask is not None:
                        moved[~mask] = 0
                    sums[0] += moved.square().sum()
                    sums[1] += before.square().sum()
        if self.mode == SHARDED:
            sums = mean_over_processes(sums)  # a mean over processes keeps the ratio of the sums
        shift = float(sums[0].sqrt() / sums[1].sqrt()) if float(sums[1]) > 0.0 else math.nan
        if self.mode == REPLICATED:
            shift = broadcast_object(shift)
        return shift

    # ------------------------------------------------------------------ restore

    def _restore(self, data: dict[str, Any] | None) -> None:
        """Copy `data` into the live tensors; with replicated state the main process's copy is then broadcast."""
        broadcast = (
            self.mode == REPLICATED and dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1)
        )
        # the snapshot's optimizer-state layout (key, shape, dtype, or the value itself when it is not a tensor):
        # every process aligns its state to it, so that all of them broadcast the same tensors in the same order
        layout = None if data is None else [_layout(state) for state in data["state"]]
        if broadcast:
            layout = broadcast_object(layout)
        tensors: list[torch.Tensor] = []
        optimizer_state = self._optimizer_state()
        with torch.no_grad():
            for i, (p, _) in enumerate(list(self._state_tensors())):
                if data is not None:
                    _local(p).copy_(data["params"][i])
                tensors.append(_local(p))
                if not layout[i]:
                    optimizer_state.pop(p, None)
                    continue
                state = optimizer_state[p]
                for key in [k for k in state if k not in {entry[0] for entry in layout[i]}]:
                    del state[key]
                for key, shape, dtype, value in layout[i]:
                    if shape is None:
                        device = _local(p).device  # fresh copies: training on never changes the snapshot
                        state[key] = _map_tensors(value, lambda t, device=device: t.to(device, copy=True))
                        continue
                    current = state.get(key)
                    if not isinstance(current, torch.Tensor) or tuple(_local(current).shape) != shape:
                        current = torch.zeros(shape, dtype=getattr(torch, dtype), device=_local(p).device)
                        state[key] = current
                    if data is not None:
                        _local(current).copy_(data["state"][i][key])
                    tensors.append(_local(current))
            for j, buffer in enumerate(self._buffers()):
                if data is not None:
                    _local(buffer).copy_(data["buffers"][j])
                tensors.append(_local(buffer))
            if broadcast:
                _broadcast_in_place(tensors)
        if self._refresh_model is not None:
            self._refresh_model()  # DeepSpeed: the model's weights from the restored master partitions

    # ------------------------------------------------------------------ memory budget

    def _check_budget(self) -> bool:
        """Before the first copy: is the training state within a snapshot's reach on every process (its layout is
        read now, once the optimizer is wrapped), and do the snapshots fit in the budget on every node? Decided the
        same on every process (two collectives, here only); off with one warning when either is not so."""
        self._budget_checked = True
        self._read_layout()
        if min_over_processes(float(self.mode != UNSUPPORTED)) < 1.0:
            self._disable(self.disabled_reason or "another process's training state is out of a snapshot's reach")
            return False
        per_snapshot = self._snapshot_bytes()
        holders_here = (local_world_size() if self.mode == SHARDED else 1) if self.holds_snapshots else 0
        self.planned_bytes = per_snapshot * self.max_snapshots * holders_here
        if self.offload_dir is not None:
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            available, where = shutil.disk_usage(self.offload_dir).free, f"free disk space in {self.offload_dir}"
        else:
            available, where = available_host_memory(), "available host memory"
        fits = available is None or self.planned_bytes <= self.memory_fraction * available
        if min_over_processes(float(fits)) < 1.0:
            if fits:
                self._disable("another node cannot hold its snapshots")
            else:
                self._disable(
                    f"{self.max_snapshots} snapshots x {_gib(per_snapshot)} x {holders_here} process(es) on this "
                    f"node = {_gib(self.planned_bytes)} would exceed {self.memory_fraction:.0%} of the {where} "
                    f"({_gib(available)}); set `rewind_offload_dir`, fewer `rewind_snapshots`, or rewind=False"
                )
            return False
        if self.planned_bytes:
            logger.info(
                f"AutoWU rewind: up to {self.max_snapshots} snapshots x {_gib(per_snapshot)} x {holders_here} "
                f"process(es) on this node = {_gib(self.planned_bytes)} of {where} ({self.mode} state)."
            )
        return True

    def _read_layout(self) -> None:
        """Read where the training state lives now (Accelerate and DeepSpeed wrap the optimizer after the rewinder
        may have been built); unsupported state records its reason."""
        layout = layout_of(self.optimizer, self.model)
        self.mode, self._refresh_model, self._layout_params = layout.mode, layout.refresh_model, layout.stepped_params
        self._padding_masks = None if layout.real_elements is None else layout.real_elements()
        if layout.mode == UNSUPPORTED:
            self.disabled_reason = layout.reason

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.disabled_reason = reason
        for snapshot in self.snapshots:
            self._drop(snapshot)
        self.snapshots = []
        if process_rank() == 0:
            warnings.warn(f"AutoWU rewind is off: {reason}. Training goes on without rewind.", stacklevel=3)

    def hand_over(self) -> dict[str, Any] | None:
        """For the rewinder that replaces this one on the scheduler: this one's state, or None when it holds nothing
        to take over (no snapshot, no decision, not turned off). Its own snapshot files are deleted."""
        if not (self.snapshots or self.rewound_to is not None or self.kept is not None or not self.enabled):
            return None
        state = self.state_dict()
        for snapshot in self.snapshots:
            self._drop(snapshot)
        self.snapshots = []
        return state

    def _offload_path(self, step: int) -> Path:
        return self.offload_dir / f"autowu_rewind_{self._file_tag}_rank{process_rank()}_step{step}.pt"

    @staticmethod
    def _drop(snapshot: dict[str, Any]) -> None:
        path = snapshot.get("file")
        if path is not None and os.path.exists(path):
            os.remove(path)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Snapshots (CPU tensors; loaded from disk when offloaded) and bookkeeping."""
        snapshots = []
        for s in self.snapshots:
            data = s["data"]
            if data is None and s.get("file") is not None:
                data = torch.load(s["file"], weights_only=True, mmap=True)
            entry = {"step": s["step"], "lr": s["lr"], "finite": s["finite"], "shapes": s.get("shapes"), "data": data}
            snapshots.append({**entry, "foreign": True} if s.get("foreign") else entry)
        return {
            "snapshots": snapshots,
            "process": [process_rank(), world_size()],  # whose shards the snapshots hold, with sharded state
            "rewound_to": self.rewound_to,
            "kept": self.kept,
            "next_lr": self._next_lr,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "budget_checked": self._budget_checked,
            "planned_bytes": self.planned_bytes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (on a process that holds no snapshots, only the bookkeeping). The state
        is read in full before anything changes: one that cannot be read (a key missing, a value of the wrong kind)
        raises and leaves this rewinder, its snapshots and their files as they were."""
        rewound_to, kept = state["rewound_to"], state.get("kept")
        next_lr = float(state["next_lr"])
        budget_checked = bool(state.get("budget_checked", True))
        planned_bytes = state.get("planned_bytes")
        enabled, disabled_reason = bool(state.get("enabled", True)), state.get("disabled_reason")
        saved_by = state.get("process")  # absent in states saved before it was recorded
        entries = [
            (
                {
                    "step": int(saved["step"]),
                    "lr": float(saved["lr"]),
                    "data": None,
                    "bytes": 0,
                    "finite": bool(saved.get("finite", True)),
                    "shapes": saved.get("shapes"),
                },
                bool(saved.get("foreign")),
                saved.get("data"),
            )
            for saved in state["snapshots"]
        ]
        for snapshot in self.snapshots:
            self._drop(snapshot)
        self._read_layout()
        self.rewound_to, self.kept = rewound_to, kept
        self._next_lr = next_lr
        self._budget_checked = budget_checked
        self.planned_bytes = planned_bytes
        if not enabled:
            self.enabled, self.disabled_reason = False, disabled_reason
        elif self.mode == UNSUPPORTED:
            self._disable(self.disabled_reason)
        another_process = (
            self.mode == SHARDED and saved_by is not None and list(saved_by) != [process_rank(), world_size()]
        )
        self.snapshots = []
        for entry, foreign, data in entries:
            if another_process or foreign:  # never restored (`on_switch`); the bookkeeping stays
                entry["foreign"] = True
                self.snapshots.append(entry)
                continue
            data = data if self.holds_snapshots else None
            if data is not None and self.offload_dir is not None:
                self.offload_dir.mkdir(parents=True, exist_ok=True)  # a fresh node, a wiped scratch folder
                entry["file"] = str(self._offload_path(entry["step"]))
                torch.save(data, entry["file"])
            elif data is not None:
                entry["data"] = data
                entry["bytes"] = sum(t.numel() * t.element_size() for t in _tensors_in(data))
            self.snapshots.append(entry)


def _choose(
    snapshots: list[dict[str, Any]], finite: list[bool], peak_lr: float, damaged_from: int | None = None
) -> int | None:
    """The snapshot to restore: the latest finite one at or below `peak_lr`, else the oldest finite one; never one
    taken at or after step `damaged_from` (the first state a blow-up produced: its LR tag can equal the capped
    `peak_lr`)."""
    usable = [i for i, ok in enumerate(finite) if ok and (damaged_from is None or snapshots[i]["step"] < damaged_from)]
    below = [i for i in usable if snapshots[i]["lr"] <= peak_lr]
    return below[-1] if below else (usable[0] if usable else None)


def _layout(state: dict[str, Any]) -> list[tuple[str, tuple[int, ...] | None, str | None, Any]]:
    """(key, shape, dtype name, None) for each tensor of an optimizer state entry, (key, None, None, value) for the
    other values, sorted by key."""
    return [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch."), None)
        if isinstance(v, torch.Tensor)
        else (k, None, None, v)
        for k, v in sorted(state.items())
    ]


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


def _broadcast_in_place(tensors: list[torch.Tensor]) -> None:
    """Broadcast `tensors` from the main process, in place, in buckets of at most 256 MiB per dtype (few
    collectives, bounded extra memory)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in [*group, None]:
            if tensor is not None:
                bucket.append(tensor)
                size += tensor.numel() * tensor.element_size()
            if bucket and (tensor is None or size >= _BROADCAST_BUCKET_BYTES):
                device = collective_device(bucket[0])
                flat = torch.cat([t.reshape(-1).to(device) for t in bucket])
                dist.broadcast(flat, src=0)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
                bucket, size = [], 0


def _gib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 2**30:.2f} GiB"
