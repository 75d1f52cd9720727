"""The collectives AutoWU needs, made only at decision points (switch tests, the switch, checkpoints; never per
step). Without an initialised process group (or with one process) each is a local no-op."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def collective_device(tensor: torch.Tensor) -> torch.device:
    """The device a collective of the default process group needs `tensor` on (NCCL: the current GPU; gloo: the
    CPU for CUDA tensors)."""
    backend = str(dist.get_backend())
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if tensor.device.type == "cuda" and "gloo" in backend else tensor.device


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `values` over all processes, returned as float64 on the CPU.

    Args:
        values (`torch.Tensor`): Same shape on every process.

    Returns:
        `torch.Tensor`: the mean, float64, CPU.
    """
    world = world_size()
    if world > 1:
        values = values.to(device=collective_device(values), dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world
    return values.to(device="cpu", dtype=torch.float64)


def min_over_processes(value: float) -> float:
    """The smallest of every process's `value` (so that all processes take the same yes/no decision)."""
    return min_over_processes_each([value])[0]


def min_over_processes_each(values: list[float]) -> list[float]:
    """Element-wise minimum of every process's `values` (same length everywhere), in one collective."""
    if world_size() == 1 or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    tensor = tensor.to(collective_device(tensor))
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.cpu().tolist()


def broadcast_floats(values: list[float]) -> list[float]:
    """The main process's `values` on every process (so that all processes take the same decision).

    Args:
        values (`list[float]`): Same length on every process.

    Returns:
        `list[float]`: the values of rank 0.
    """
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    tensor = tensor.to(collective_device(tensor))
    dist.broadcast(tensor, src=0)
    return tensor.cpu().tolist()


def broadcast_object(value: Any) -> Any:
    """The main process's `value` (any picklable object) on every process."""
    if world_size() == 1:
        return value
    holder = [value]
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else None
    dist.broadcast_object_list(holder, src=0, device=device)
    return holder[0]
