"""Where the training state lives, so that rewind can copy it and put it back on every engine.

Three layouts:

- `REPLICATED`: one process, or data-parallel replicas (DDP, Accelerate, the Trainer without sharding, DeepSpeed
  ZeRO stage 0); every replica holds the same parameters and optimizer state. With DeepSpeed's stage 0 in bf16 or
  fp16 those parameters are fp32 master weights, which `refresh_model` copies into the model's after a restore.
- `SHARDED`: every process holds its own part (FSDP1 with `use_orig_params`, FSDP2 `fully_shard`,
  `ZeroRedundancyOptimizer`, DeepSpeed ZeRO stages 1 to 3). For DeepSpeed the optimizer's parameters are the fp32
  master partitions, not the model's weights: after they are restored, the layout's `refresh_model` copies them
  into the weights the model computes with, as DeepSpeed's own step does.
- `UNSUPPORTED`: state that lives where a copy of `param_groups` and `state` cannot reach (DeepSpeed with NVMe
  offload, or an optimizer that DeepSpeed neither wraps nor steps while it runs the model); `reason` says which.

An optimizer built before `deepspeed.initialize` (or `accelerator.prepare` with DeepSpeed) is the one DeepSpeed's
wrapper steps, with its parameters replaced by DeepSpeed's master partitions; its layout is that wrapper's, found
among the objects that refer to the optimizer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .optimizer_wrappers import holders_of

REPLICATED, SHARDED, UNSUPPORTED = "replicated", "sharded", "unsupported"


@dataclass(frozen=True)
class StateLayout:
    """How the training state is laid out over processes.

    Args:
        mode (`str`): `REPLICATED`, `SHARDED` or `UNSUPPORTED`.
        reason (`str`, *optional*): Why the state is unsupported.
        refresh_model (`Callable[[], None]`, *optional*): After the optimizer's parameters are restored, brings the
            model's weights in line with them (DeepSpeed's master weights); a collective, called on every process.
        stepped_params (`Callable[[], list[torch.Tensor]]`, *optional*): The tensors the optimizer steps and keys its
            state by, when they are not in its `param_groups` between steps (ZeRO 3 lends each flat partition to
            its optimizer only for the step).
        real_elements (`Callable[[], list[torch.Tensor | None]]`, *optional*): For each stepped tensor, a boolean
            mask (on the host) of its elements that hold values, or None when all do; the others are padding that
            DeepSpeed leaves uninitialised (ZeRO 3 pads each parameter's partition on the last processes), which a
            finiteness check or a distance must not read.
    """

    mode: str
    reason: str | None = None
    refresh_model: Callable[[], None] | None = None
    stepped_params: Callable[[], list[torch.Tensor]] | None = None
    real_elements: Callable[[], list[torch.Tensor | None]] | None = None


def _from_deepspeed(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "deepspeed"


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and the optimizers it wraps (Accelerate's and DeepSpeed's wrappers), outermost first."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None and len(chain) < 8:
        chain.append(chain[-1].optimizer)
    return chain


def state_owner(optimizer: Any) -> Any:
    """The optimizer whose `state` holds the per-parameter state of `optimizer`'s parameters: `optimizer` itself, or
    the innermost optimizer it wraps with the very same parameter groups. timm's `Lookahead` keeps its base
    optimizer's moments, and its own slow weights, in the base optimizer's `state` (`_base_optimizer`) and leaves its
    own `state` empty; Accelerate's and DeepSpeed's wrappers share the `state` of the optimizer they wrap.

    Args:
        optimizer: The optimizer AutoWU drives, or a wrapper of it.

    Returns:
        The optimizer whose `state` to snapshot and restore.
    """
    current = optimizer
    for _ in range(8):
        inner = next(
            (
                getattr(current, name)
                for name in ("optimizer", "_base_optimizer", "base_optimizer")
                if isinstance(getattr(current, name, None), torch.optim.Optimizer)
            ),
            None,
        )
        if inner is None or inner is current or inner.param_groups is not current.param_groups:
            break
        current = inner
    return current


def _deepspeed_holders(optimizer: Any) -> list[Any]:
    """DeepSpeed's objects whose `optimizer` is `optimizer`: the wrapper that steps it (ZeRO, or the `FP16_Optimizer`
    wrappers of stage 0), or the engine that steps it itself (stage 0 in fp32); read once per run, when the first
    snapshot is due."""
    return [obj for obj in holders_of(optimizer) if _from_deepspeed(obj)]


def _deepspeed_running() -> bool:
    """Whether DeepSpeed's communication layer is up in this process (DeepSpeed, or Accelerate with DeepSpeed)."""
    comm = getattr(sys.modules.get("deepspeed"), "comm", None)
    is_initialized = getattr(comm, "is_initialized", None)
    try:
        return bool(is_initialized()) if callable(is_initialized) else False
    except Exception:  # an unusual DeepSpeed build: treat it as running, so that nothing is restored blindly
        return True


def _zero3_refresh(zero: Any) -> Callable[[], None]:
    """ZeRO-3: the steps of DeepSpeed's own checkpoint load. Release every gathered parameter (the persistent ones
    stay gathered between steps), copy each fp32 partition into the partition the model gathers its weights from
    and re-point the parameters at it, then gather the persistent parameters again."""

    @torch.no_grad()
    def refresh() -> None:
        zero.checkpoint_event_prologue()
        for group, (low, master) in enumerate(
            zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat, strict=True)
        ):
            low.data.copy_(master.data)
            zero._unflatten_partitioned_parameters(group)
        zero.checkpoint_event_epilogue()

    return refresh


def _zero3_real_elements(zero: Any) -> Callable[[], list[torch.Tensor | None]]:
    """ZeRO 3: each flat fp32 partition concatenates this process's partition of every parameter of its group,
    `ceil(numel / processes)` elements each; on the last processes a partition runs past the parameter's end."""

    def masks() -> list[torch.Tensor | None]:
        result: list[torch.Tensor | None] = []
        for params in zero.fp16_groups:
            parts = []
            for param in params:
                size = param.ds_tensor.ds_numel
                rank = torch.distributed.get_rank(group=param.ds_process_group)
                real = min(max(param.ds_numel - rank * size, 0), size)
                parts.append(torch.arange(size) < real)
            mask = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
            result.append(None if bool(mask.all()) else mask)
        return result

    return masks


def _is_params_list(groups: Any) -> bool:
    """Whether `groups` is a list of lists of tensors (one list per parameter group)."""
    return isinstance(groups, list) and all(
        isinstance(group, list) and all(torch.is_tensor(t) for t in group) for group in groups
    )


def _replicated_refresh(weights: list[list[torch.Tensor]], masters: list[Any]) -> Callable[[], None]:
    """ZeRO stage 0 in bf16 or fp16 (DeepSpeed's `FP16_Optimizer` wrappers): every process holds every fp32 master
    weight, either one tensor per weight or one flat tensor per group; copy them into the model's weights, as the
    wrapper's step does."""

    @torch.no_grad()
    def refresh() -> None:
        for group, master in zip(weights, masters, strict=True):
            if torch.is_tensor(master):  # one flat fp32 tensor for the group, the weights in order
                master = master.split([w.numel() for w in group])
            for weight, value in zip(group, master, strict=True):
                weight.data.copy_(value.data.view_as(weight))

    return refresh


def _deepspeed_layout(zero: Any) -> StateLayout:
    """The layout for DeepSpeed's optimizer wrapper `zero`, whose inner optimizer steps the fp32 master partitions."""
    name = type(zero).__name__
    if callable(getattr(zero, "update_lp_params", None)):  # ZeRO 1 and 2, BF16_Optimizer
        return StateLayout(SHARDED, refresh_model=zero.update_lp_params)
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO 3
        if getattr(zero, "swap_optimizer", False) or getattr(zero, "params_in_nvme_and_cpu", False):
            return StateLayout(UNSUPPORTED, f"DeepSpeed's {name} swaps state to NVMe, out of a snapshot's reach")
        lows = getattr(zero, "fp16_partitioned_groups_flat", None)
        if (
            lows is None
            or any(low is None for low in lows)
            or not all(
                hasattr(zero, member)
                for member in (
                    "_unflatten_partitioned_parameters",
                    "checkpoint_event_prologue",
                    "checkpoint_event_epilogue",
                    "fp16_groups",
                )
            )
        ):
            return StateLayout(UNSUPPORTED, f"this DeepSpeed's {name} does not expose its weight partitions")
        return StateLayout(
            SHARDED,
            refresh_model=_zero3_refresh(zero),
            stepped_params=lambda: list(zero.fp32_partitioned_groups_flat),
            real_elements=_zero3_real_elements(zero),
        )
    if _is_params_list(getattr(zero, "fp16_groups", None)):  # ZeRO stage 0 in bf16 or fp16: full fp32 masters
        masters = getattr(zero, "fp32_groups_flat", None)  # FP16_Optimizer (fused): one flat master per group
        if _is_params_list(getattr(zero, "fp32_groups", None)):  # FP16_UnfusedOptimizer: one master per weight
            masters = zero.fp32_groups
        if isinstance(masters, list) and len(masters) == len(zero.fp16_groups):
            return StateLayout(REPLICATED, refresh_model=_replicated_refresh(zero.fp16_groups, masters))
    return StateLayout(
        UNSUPPORTED, f"DeepSpeed's {name} keeps master weights that AutoWU cannot copy back into the model"
    )


def layout_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> StateLayout:
    """How the training state behind `optimizer` is laid out over processes.

    Args:
        optimizer (`torch.optim.Optimizer`): The optimizer (Accelerate's and DeepSpeed's wrappers are fine).
        model (`torch.nn.Module`, *optional*): The model, when known.

    Returns:
        `StateLayout`: the layout, with a reason when it is unsupported and, for DeepSpeed, how to refresh the
        model's weights from the restored master weights.
    """
    chain = _optimizer_chain(optimizer)
    zero = next((obj for obj in chain[:-1] if _from_deepspeed(obj)), None)  # a DeepSpeed wrapper of an optimizer
    if zero is None and (_deepspeed_running() or (model is not None and _from_deepspeed(model))):
        # built before `deepspeed.initialize`: DeepSpeed's wrapper (or, without one, its engine) steps it
        for holder in _deepspeed_holders(chain[-1]):
            if isinstance(holder, torch.nn.Module):
                model = holder
            else:
                zero = holder
    if zero is not None:
        return _deepspeed_layout(zero)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(hasattr(p, "ds_id") for p in params):
        return StateLayout(
            UNSUPPORTED,
            "DeepSpeed's partitioned parameters are stepped by an optimizer that is not DeepSpeed's; build AutoWU "
            "with DeepSpeed's optimizer (`engine.optimizer`, or the one `accelerator.prepare` returns)",
        )
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        return StateLayout(SHARDED)
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        return StateLayout(SHARDED)
    if any(type(obj).__name__ == "ZeroRedundancyOptimizer" for obj in chain):
        return StateLayout(SHARDED)
    if model is not None and any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        return StateLayout(SHARDED)
    if _deepspeed_running() or (model is not None and _from_deepspeed(model)):
        # an optimizer that no DeepSpeed wrapper steps: only the model (or the engine that steps the optimizer) can
        # tell that its parameters are the model's own weights (no ZeRO, fp32) and not master partitions
        owned = model is not None and {id(p) for p in params} <= {id(p) for p in model.parameters()}
        if not owned:
            return StateLayout(
                UNSUPPORTED,
                "DeepSpeed is running and neither wraps nor steps this optimizer, so its parameters may be "
                "DeepSpeed's master partitions; build AutoWU with DeepSpeed's optimizer (`engine.optimizer`, or the "
                "one `accelerator.prepare` returns), or pass `model`",
            )
    return StateLayout(REPLICATED)


def sharding_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> str:
    """How the training state is laid out over processes: `REPLICATED`, `SHARDED` or `UNSUPPORTED`.

    Args:
        optimizer (`torch.optim.Optimizer`): The optimizer (Accelerate's and DeepSpeed's wrappers are fine).
        model (`torch.nn.Module`, *optional*): The model, when known.

    Returns:
        `str`: one of the three constants (`layout_of(...).mode`).
    """
    return layout_of(optimizer, model).mode
