"""The two collectives AutoWU needs, made only at decision points (never per step)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """The device a collective of the default process group needs its tensor on."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if tensor.device.type == "cuda" and "gloo" in str(dist.get_backend()) else tensor.device


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `values` over all processes, returned as float64 on the CPU.

    Without an initialised process group (or with one process) this only moves `values` to the CPU.

    Args:
        values (`torch.Tensor`): Same shape on every process.

    Returns:
        `torch.Tensor`: the mean, float64, CPU.
    """
    world = _world_size()
    if world > 1:
        values = values.to(device=_collective_device(values), dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world
    return values.to(device="cpu", dtype=torch.float64)


def broadcast_floats(values: list[float]) -> list[float]:
    """The main process's `values` on every process (so that all processes take the same decision).

    Args:
        values (`list[float]`): Same length on every process.

    Returns:
        `list[float]`: the values of rank 0.
    """
    if _world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    tensor = tensor.to(_collective_device(tensor))
    dist.broadcast(tensor, src=0)
    return tensor.cpu().tolist()
