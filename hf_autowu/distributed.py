"""The collectives AutoWU needs, made only at decision points (switch tests, the switch, checkpoints; never per
step), and the spike watch's relay: one asynchronous `all_reduce` every few warmup steps, read one step later
(`MeanInFlight`). Without an initialised process group (or with one process) each is a local no-op."""

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


class MeanInFlight:
    """An element-wise mean over all processes started without waiting for it: `all_reduce(async_op=True)`, and for
    a CUDA result a copy to pinned host memory with `non_blocking=True`. `wait()` returns the mean (float64, CPU;
    `mean_over_processes` is this, waited for at once); called a step later it normally finds them there, and the host
    only waits for the work of the step before, never the current one's.

    With gloo and CUDA tensors (gloo reduces host memory) the values are copied to pinned memory at once and reduced
    when `wait()` is called: `wait()` is then a collective (`needs_collective`), to call on every process alike.
    Every process must start it at the same point, with values of the same shape.

    With `present` (under `torch.distributed.algorithms.Join`, where a process that ran out of inputs holds no
    loss for the steps it shadows), the mean of each entry is over the processes that hold it: the values and the
    flags travel in one reduction, and the sums are divided by the counts.

    Args:
        values (`torch.Tensor`): This process's values (1-D); entries not `present` are ignored.
        present (`torch.Tensor`, *optional*): Bool, the shape of `values`: which entries this process holds.
    """

    def __init__(self, values: torch.Tensor, present: torch.Tensor | None = None):
        self.count = int(values.numel())
        self._world = world_size()
        self._work: Any = None
        self._event: Any = None
        self._reduce_on_wait = False
        self._weighted = present is not None
        if present is not None:
            present = present.to(device=values.device, dtype=torch.bool)
            values = values.to(torch.float64)
            values = torch.cat([torch.where(present, values, torch.zeros_like(values)), present.to(values.dtype)])
        device = collective_device(values) if self._world > 1 else values.device
        if values.device.type == "cuda" and device.type == "cpu":  # gloo with CUDA tensors
            self._values = self._to_pinned(values.to(torch.float64))
            self._reduce_on_wait = True
            return
        values = values.to(device=device, dtype=torch.float64)
        if self._world > 1:
            self._work = dist.all_reduce(values, op=dist.ReduceOp.SUM, async_op=True)
        if values.device.type == "cuda":
            if self._work is not None:
                self._work.wait()  # NCCL: the current stream waits for the reduction; the host does not
                self._work = None
            values = self._to_pinned(values)
        self._values = values

    def _to_pinned(self, values: torch.Tensor) -> torch.Tensor:
        host = torch.empty(values.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(values, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return host

    @property
    def needs_collective(self) -> bool:
        """Whether `wait()` still has to reduce (a collective): gloo with CUDA tensors."""
        return self._reduce_on_wait

    def local_values(self) -> torch.Tensor:
        """This process's values, float64 on the CPU (waits for their copy; no collective): only before a reduction
        that `wait()` makes (`needs_collective`)."""
        if not self._reduce_on_wait:
            raise RuntimeError("MeanInFlight.local_values: the values are already being reduced in place.")
        if self._event is not None:
            self._event.synchronize()
        return self._values[: self.count].clone()

    def wait(self) -> torch.Tensor:
        """The mean over processes, float64 on the CPU (waits for what was started, if not done yet)."""
        if self._work is not None:
            self._work.wait()
        if self._event is not None:
            self._event.synchronize()
        values = self._values
        if self._reduce_on_wait:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        if self._weighted:
            values = values[: self.count] / values[self.count :]
        elif self._world > 1:
            values = values / self._world
        return values.to(device="cpu", dtype=torch.float64)


def mean_over_processes(values: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise mean of `values` over all processes, returned as float64 on the CPU (`MeanInFlight`, waited for
    at once).

    Args:
        values (`torch.Tensor`): Same shape on every process.
        present (`torch.Tensor`, *optional*): Which entries this process holds (`MeanInFlight`); given on every
            process or on none.

    Returns:
        `torch.Tensor`: the mean, float64, CPU.
    """
    return MeanInFlight(values, present).wait()


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
