"""Small shared pieces for the scheduler tests."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from hf_autowu import AutoWU


def make_optimizer(lrs: tuple[float, ...] = (1.0,)) -> torch.optim.Optimizer:
    """An SGD optimizer with one parameter group per LR."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


def roundtrip(state):
    """`state` saved with `torch.save` and loaded back (`weights_only=True`), as a checkpoint makes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def regression_mlp(seed: int = 0) -> torch.nn.Module:
    """A small MLP with BatchNorm for `regression_batch`, initialised from `seed`."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(), torch.nn.Linear(12, 1)
    )


def regression_batch(step: int, rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s batch of a noisy regression: 6 Gaussian inputs, the sum of the first three as the target
    (variance 3), so that on small batches each loss's noise is a large part of its level."""
    x = torch.randn(rows, 6, generator=torch.Generator().manual_seed(step))
    return x, x[:, :3].sum(dim=1, keepdim=True)


def train_regression(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: AutoWU,
    steps: range,
    backward=None,
    after_step=None,
) -> dict:
    """The README's hand-written loop on `regression_batch` for `steps` (`backward(loss)`: `loss.backward()` by
    default); `after_step(steps_done, record)` runs after each. Returns the LR of each step, the switch step, the
    snapshot rewind restored and the final weights."""
    record = {"lrs": []}
    for step in steps:
        x, y = regression_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        (backward or torch.Tensor.backward)(loss)
        record["lrs"].append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(loss.detach())
        if after_step is not None:
            after_step(step + 1, record)
    record.update(
        switch_step=scheduler.switch_step,
        rewound_to=scheduler.rewinder.rewound_to,
        weights=[p.detach().clone() for p in model.parameters()],
    )
    return record


def fine_tune_loss(lr: float, noise: float) -> float:
    """A fine-tune's ramp: flat below LR 1e-3 (small LRs leave a pretrained model where it is), a fall from 2 to 1
    by 3e-3 (95% of it), a flat bottom up to 3e-2, then a rise of 3 per decade; plus `noise`."""
    x = math.log10(lr / 1e-3)
    return 2.0 - 1.0 / (1.0 + math.exp(-x / 0.15)) + 3.0 * max(0.0, math.log10(lr / 3e-2)) + noise


def valley_loss(lr: float, best_lr: float, noise: float, generator: torch.Generator, scale: float = 1.0) -> float:
    """A loss that is lowest at `best_lr` and grows on both sides in log-LR, with Gaussian noise."""
    distance = math.log10(lr / best_lr)
    value = 1.0 + 0.5 * distance**2 if distance < 0 else 1.0 + 2.0 * distance**2
    return scale * (value + noise * float(torch.randn((), generator=generator)))


def run_valley(
    scheduler: AutoWU,
    best_lr: float,
    noise: float = 0.02,
    seed: int = 0,
    scale: float = 1.0,
    swing: tuple[float, float] | None = None,
) -> list[float]:
    """Drive `scheduler` over its whole budget with `valley_loss`, plus, with `swing` = (period in steps, amplitude),
    a sine (data in a fixed order); return the LR used at every step."""
    generator = torch.Generator().manual_seed(seed)
    lrs = []
    for step in range(scheduler.total_steps):
        lr = scheduler.optimizer.param_groups[0]["lr"]
        lrs.append(lr)
        loss = valley_loss(lr, best_lr, noise, generator, scale)
        if swing is not None:
            period, amplitude = swing
            loss += amplitude * math.sin(2.0 * math.pi * step / period)
        scheduler.step(loss)
    return lrs


def assert_state_equal(a, b) -> None:
    """Assert that two (nested) states are equal: tensors bit for bit (on the CPU), containers item by item, other
    values with `==` (a NaN equals a NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_state_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b or (a != a and b != b)


def flat_tensors(value) -> list[torch.Tensor]:
    """The tensors in nested lists and tuples, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in flat_tensors(item)]


def same_tensors(a, b) -> bool:
    """Whether two nested lists/tuples of tensors hold the same tensors (dtype and values), in the same order."""
    flat_a, flat_b = flat_tensors(a), flat_tensors(b)
    return len(flat_a) == len(flat_b) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True)
    )


def torchrun(
    script: str, out_dir: str, cwd: str, timeout: int = 600, processes: int = 2, args: tuple[str, ...] = ()
) -> None:
    """Run `script OUT_DIR *args` in `processes` CPU processes with torchrun (gloo); fail the test with its stderr on
    error. The scripts end with `process_exit.leave()`, which skips the interpreter finalization in which gloo's
    threads can abort a process that did its work (pytorch/pytorch#190489), so every failure is a real one.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += [script, str(out_dir), *args]
    launcher = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, which torchrun forwards to its workers; SIGKILL (subprocess.run's timeout) ended torchrun alone and
        # left them, in sessions of their own, blocked on its store beside the tests that come next
        launcher.terminate()
        _, stderr = launcher.communicate(timeout=60)
        pytest.fail(f"torchrun {script} timed out after {timeout} s:\n{stderr[-4000:]}")
    assert launcher.returncode == 0, stderr[-4000:]


def processes_running(*words: str) -> list[list[str]]:
    """The command lines of the live (not zombie) processes whose arguments include every one of `words`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and all(word in cmdline for word in words):
            found.append(cmdline)
    return found


def torchrun_ranks(script: str, out_dir: Path, cwd: Path, timeout: int = 600) -> list[dict]:
    """`torchrun` `script` on two processes and read what each wrote to `out_dir/rank{rank}.json`."""
    torchrun(script, str(out_dir), cwd=str(cwd), timeout=timeout)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def knee_loss(lr: float, knee_lr: float, generator: torch.Generator, noise: float = 0.02) -> float:
    """A ramp loss whose sustainable LR `knee_lr` lies below its minimum, as for small transformers: it falls
    (a logistic in log-LR, steepest a third of a decade before the knee), then creeps down a broad flat bottom for a
    decade and a half, then blows up. The minimum of this curve is ~30x the knee."""
    d = math.log10(lr / knee_lr)
    fall = 2.0 / (1.0 + math.exp((d + 1 / 3) / 0.12))
    bottom = -0.03 * min(max(d, 0.0), 1.5)
    rise = 4.0 * max(d - 1.5, 0.0) ** 2
    return 1.0 + fall + bottom + rise + noise * float(torch.randn((), generator=generator))
