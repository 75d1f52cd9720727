#!/usr/bin/env python
"""What the spike watch's relay costs with several processes: a small MLP under DDP, two processes.

With several processes the spike watch checks the processes' mean losses: every `RELAY_EVERY`-th (4th) warmup step
starts one asynchronous `all_reduce` of the losses held since (`distributed.MeanInFlight`), and the next step reads
it. Measured, with interleaved repeats on a budget so long that no switch test fires in the timed window:

- the wall time of `scheduler.step(loss)` by step kind: the relay's start (step count a multiple of 4), its read
  (the step after), and the steps in between; AutoWU's defaults (``watch``) against ``spike_watch=False``
  (``no_watch``, no relay);
- whole training steps per second for both.

Both processes run on this machine: gloo on CPUs (``--device cpu``, the default), NCCL with one GPU each
(``--device cuda``, needs two). Writes ``relay_overhead.json`` and a RESULTS.md section.

Examples::

    python benchmarks/relay_overhead.py                  # about 1 minute on 2 CPU cores
    python benchmarks/relay_overhead.py --smoke --out-dir /tmp/relay
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from common import command_line, locked_json, machine_info, resolve_output_paths, update_section  # noqa: E402

VARIANTS = ("watch", "no_watch")
BUDGET = 10_000_000
"""AutoWU's budget: so long that no switch test fires while timing."""
KINDS = ("relay_start", "relay_read", "between")


def step_kind(step: int, relay_every: int) -> str:
    """What a warmup step with step count `step` (after its `scheduler.step`) does for the relay."""
    return {0: "relay_start", 1: "relay_read"}.get(step % relay_every, "between")


def worker(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    """One process: train, time, and (rank 0) put the timings on `queue`."""
    from hf_autowu import AutoWU
    from hf_autowu.watch import RELAY_EVERY

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, 10))
    model = torch.nn.parallel.DistributedDataParallel(model.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 64, generator=torch.Generator().manual_seed(rank)).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=torch.Generator().manual_seed(rank)).to(device)
    step_ms: dict[str, dict[str, list[float]]] = {v: {k: [] for k in KINDS} for v in VARIANTS}
    steps_per_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            scheduler = AutoWU(optimizer, total_steps=BUDGET, spike_watch=variant == "watch", rewind=False)
            for i in range(args.warmup_steps + args.steps):
                if i == args.warmup_steps:
                    if cuda:
                        torch.cuda.synchronize()
                    dist.barrier()
                    start = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                before = time.perf_counter()
                scheduler.step(loss.detach())
                if i >= args.warmup_steps:
                    kind = step_kind(scheduler.last_step, RELAY_EVERY)
                    step_ms[variant][kind].append((time.perf_counter() - before) * 1e3)
            if cuda:
                torch.cuda.synchronize()
            steps_per_s[variant].append(args.steps / (time.perf_counter() - start))
            assert scheduler.phase == "warmup" and not scheduler.tests, "a switch test fired in the timed window"
    if rank == 0:
        queue.put({"step_ms": step_ms, "steps_per_s": steps_per_s, "relay_every": RELAY_EVERY})
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run both processes and collect rank 0's timings."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(worker, args=(args, free_port(), queue), nprocs=2, join=True, start_method="spawn")
    timings = queue.get(timeout=60)
    summary = {
        variant: {
            "scheduler_step_ms": {
                kind: statistics.median(values) if values else None
                for kind, values in timings["step_ms"][variant].items()
            },
            "steps_per_s": statistics.median(timings["steps_per_s"][variant]),
        }
        for variant in VARIANTS
    }
    return {
        "command": command_line(),
        "machine": machine_info(),
        "device": args.device,
        "model": f"MLP 64-{args.hidden}-10 under DDP, batch {args.batch_size} per process, 2 processes",
        "steps": args.steps,
        "repeats": args.repeats,
        "relay_every": timings["relay_every"],
        "summary": summary,
    }


def report(data: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    backend = "NCCL, one GPU per process" if data["device"] == "cuda" else "gloo on CPU cores"
    lines = [
        "## The spike watch's relay with several processes (`benchmarks/relay_overhead.py`)",
        "",
        f"Reproduce: `{data['command']}`. Machine: {data['machine']}. {data['model']}, {backend}; "
        f"{data['steps']} timed warmup steps per run, {data['repeats']} interleaved repeats per variant, medians. "
        f"`watch`: AutoWU's defaults (an asynchronous `all_reduce` started every {data['relay_every']}th warmup step, "
        "read at the next); `no_watch`: `spike_watch=False` (no collective between switch tests). No switch test "
        "fires in the timed window.",
        "",
        "| variant | `scheduler.step` ms: relay start | relay read | steps between | training steps/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, row in data["summary"].items():
        ms = row["scheduler_step_ms"]
        cells = " | ".join("" if ms[kind] is None else f"{ms[kind]:.3f}" for kind in KINDS)
        lines.append(f"| {variant} | {cells} | {row['steps_per_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="gloo on CPUs, or NCCL on 2 GPUs")
    parser.add_argument("--hidden", type=int, default=256, help="the MLP's hidden width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each variant")
    parser.add_argument("--warmup-steps", type=int, default=40, help="untimed steps before measuring")
    parser.add_argument("--out-dir", type=Path, default=None, help="where relay_overhead.json goes")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats, args.warmup_steps = 12, 1, 4
    return resolve_output_paths(args, "relay_overhead_smoke_")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 when `--device cuda` finds fewer than two GPUs)."""
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print("relay_overhead.py --device cuda needs two CUDA GPUs: nothing was measured.", file=sys.stderr)
        return 2
    data = measure(args)
    with locked_json(args.out_dir / "relay_overhead.json", {}) as stored:
        stored.clear()
        stored.update(data)
    update_section(args.results_md, "relay_overhead", report(data))
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
