#!/usr/bin/env python
"""What the spike watch's relay costs with several processes: a small MLP under DDP, two processes.

With several processes the spike watch checks the processes' mean losses: every `RELAY_EVERY`-th (4th) warmup step
starts one asynchronous `all_reduce` of the losses held since (`distributed.MeanInFlight`), and the next step reads
it. Measured, with interleaved repeats (ABBA order) on a budget so long that warmup lasts the whole timed window:

- the wall time of `scheduler.step(loss)` by step kind: the relay's start (step count a multiple of 4), its read
  (the step after), and the steps in between (a switch test's step left out); AutoWU's defaults (``watch``)
  against ``spike_watch=False`` (``no_watch``, no relay);
- whole training steps per second for both.

Both processes run on this machine: gloo on CPUs (``--device cpu``, the default), NCCL with one GPU each
(``--device cuda``, needs two), or gloo with CUDA tensors (``--device cuda --backend gloo``, one GPU will do: the
relay's pinned copy, reduced when read). Checked after the timing: a `state_dict()` taken on the main process
alone while a relay is under way returns (no collective), the processes end with the same loss history, and
`MeanInFlight` equals the gathered values' mean. Writes ``relay_overhead.json`` and a RESULTS.md
section.

Examples::

    python benchmarks/relay_overhead.py                  # about 4 minutes on 2 CPU cores
    python benchmarks/relay_overhead.py --smoke --out-dir /tmp/relay
    python benchmarks/relay_overhead.py --device cuda --backend gloo --out-dir "$OUT"   # one GPU: the CUDA paths
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
"""AutoWU's budget: so long that warmup goes on while timing (the switch tests' steps, every few hundred steps, are
left out of the per-step times, not of the steps per second)."""
KINDS = ("relay_start", "relay_read", "between")
CHECKS = ("ranks_agree", "mean_in_flight_exact")
"""Both processes end with the same loss history; `MeanInFlight` equals the gathered values' mean."""


def step_kind(step: int, relay_every: int) -> str:
    """What a warmup step with step count `step` (after its `scheduler.step`) does for the relay."""
    return {0: "relay_start", 1: "relay_read"}.get(step % relay_every, "between")


def worker(rank: int, args: argparse.Namespace, hidden: int, port: int, queue: Any) -> None:
    """One process: train, time, and (rank 0) put the timings on `queue`."""
    from hf_autowu import AutoWU
    from hf_autowu.watch import RELAY_EVERY

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    dist.init_process_group(args.backend, rank=rank, world_size=2)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    model = torch.nn.parallel.DistributedDataParallel(model.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 64, generator=torch.Generator().manual_seed(rank)).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=torch.Generator().manual_seed(rank)).to(device)
    step_ms: dict[str, dict[str, list[float]]] = {v: {k: [] for k in KINDS} for v in VARIANTS}
    watched: Any = None
    steps_per_s: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def train_step(scheduler: Any) -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step(loss.detach())

    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:  # ABBA: no variant always runs first
            scheduler = AutoWU(optimizer, total_steps=BUDGET, spike_watch=variant == "watch", rewind=False)
            watched = scheduler if variant == "watch" else watched
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
                tests = len(scheduler.tests)
                before = time.perf_counter()
                scheduler.step(loss.detach())
                elapsed = (time.perf_counter() - before) * 1e3
                if i >= args.warmup_steps and len(scheduler.tests) == tests:  # a switch test's step is left out
                    step_ms[variant][step_kind(scheduler.last_step, RELAY_EVERY)].append(elapsed)
            if cuda:
                torch.cuda.synchronize()
            steps_per_s[variant].append(args.steps / (time.perf_counter() - start))
            assert scheduler.phase == "warmup", "the switch came in the timed window"
    # a state taken on the main process alone while a relay is under way must not hang (no collective) ...
    while watched._relay is None:
        train_step(watched)
    if rank == 0:
        watched.state_dict()
    dist.barrier()
    for _ in range(2 * RELAY_EVERY):  # ... and the processes still agree once the next relays are read
        train_step(watched)
    checks = {"ranks_agree": ranks_agree(watched.losses), "mean_in_flight_exact": mean_in_flight_exact(device)}
    if rank == 0:
        queue.put({"step_ms": step_ms, "steps_per_s": steps_per_s, "relay_every": RELAY_EVERY, **checks})
    dist.barrier()
    dist.destroy_process_group()


def ranks_agree(losses: torch.Tensor) -> bool:
    """Whether every process holds the same loss history (the relay's means included), bit for bit."""
    gathered = [None, None]
    dist.all_gather_object(gathered, losses.tolist())
    return gathered[0] == gathered[1]


def mean_in_flight_exact(device: torch.device) -> bool:
    """Whether `MeanInFlight` on this device's tensors gives the mean of the two processes' gathered values bit for
    bit, on every process (under NCCL: the stream wait and the pinned copy). With two processes a sum in any order is
    one rounding, so the reduction must match it exactly."""
    from hf_autowu.distributed import MeanInFlight

    values = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(dist.get_rank()))
    gathered = [None, None]
    dist.all_gather_object(gathered, values)
    expected = (gathered[0] + gathered[1]) / 2
    exact = torch.equal(MeanInFlight(values.to(device)).wait(), expected)
    flags = [None, None]
    dist.all_gather_object(flags, exact)
    return all(flags)


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_size(args: argparse.Namespace, hidden: int) -> dict[str, Any]:
    """Both processes on the MLP of width `hidden`: rank 0's medians per variant, and its steps/s per repeat."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = mp.start_processes(
        worker, args=(args, hidden, free_port(), queue), nprocs=2, join=False, start_method="spawn"
    )
    timings = queue.get()  # before joining: a process exits only once what it put on the queue has been read
    while not processes.join():
        pass
    rates = timings["steps_per_s"]
    return {
        "relay_every": timings["relay_every"],
        "ranks_agree": timings["ranks_agree"],
        "mean_in_flight_exact": timings["mean_in_flight_exact"],
        "variants": {
            variant: {
                "scheduler_step_ms": {
                    kind: statistics.median(values) if values else None
                    for kind, values in timings["step_ms"][variant].items()
                },
                "steps_per_s": statistics.median(rates[variant]),
                "steps_per_s_each_repeat": rates[variant],
            }
            for variant in VARIANTS
        },
        # the same repeat's runs side by side: how much slower the relay makes a training step
        "slowdown_each_repeat": [b / a - 1.0 for a, b in zip(rates["watch"], rates["no_watch"], strict=True)],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every width of `args.hidden`, one after the other."""
    sizes = {str(hidden): run_size(args, hidden) for hidden in args.hidden}
    return {
        "command": command_line(),
        "machine": machine_info(),
        "device": args.device,
        "backend": args.backend,
        "model": f"MLP 64-H-10 under DDP, batch {args.batch_size} per process, 2 processes",
        "steps": args.steps,
        "repeats": args.repeats,
        "relay_every": next(iter(sizes.values()))["relay_every"],
        "sizes": sizes,
    }


def report(data: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    backend = {
        ("cuda", "nccl"): "NCCL, one GPU per process",
        ("cuda", "gloo"): "gloo with CUDA tensors",
        ("cpu", "gloo"): "gloo on CPU cores",
    }[(data["device"], data.get("backend", "nccl" if data["device"] == "cuda" else "gloo"))]
    checks = ", ".join(f"`{name}` {all(size[name] for size in data['sizes'].values())}" for name in CHECKS)
    lines = [
        "## The spike watch's relay with several processes (`benchmarks/relay_overhead.py`)",
        "",
        f"Reproduce: `{data['command']}`. Machine: {data['machine']}. {data['model']}, {backend}; "
        f"{data['steps']} timed warmup steps per run, {data['repeats']} interleaved repeats per variant (ABBA "
        "order), medians; "
        f"`watch`: AutoWU's defaults (an asynchronous `all_reduce` started every {data['relay_every']}th warmup step, "
        "read at the next); `no_watch`: `spike_watch=False` (no collective between switch tests). The per-step "
        "times leave out the switch tests' steps (a few in each timed window); the steps per second include them. "
        "Each process runs on one intra-op thread. After the timing a `state_dict()` taken on the main process alone "
        "while a relay was under way returned (a collective there would have hung); checks, over every width (both "
        f"processes end with the same loss history; `MeanInFlight` equals the gathered values' mean): "
        f"{checks}.",
        "",
        "| H | variant | `scheduler.step` ms: relay start | relay read | steps between | training steps/s | "
        "steps slower with the relay (median of repeats, range) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for hidden, size in data["sizes"].items():
        slowdown = size["slowdown_each_repeat"]
        paired = (
            f"{100 * statistics.median(slowdown):+.1f}% ({100 * min(slowdown):+.1f} to {100 * max(slowdown):+.1f})"
        )
        for variant, row in size["variants"].items():
            ms = row["scheduler_step_ms"]
            cells = " | ".join("" if ms[kind] is None else f"{ms[kind]:.3f}" for kind in KINDS)
            slower = paired if variant == "watch" else ""
            lines.append(f"| {hidden} | {variant} | {cells} | {row['steps_per_s']:.1f} | {slower} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model trains")
    parser.add_argument(
        "--backend",
        default=None,
        choices=("gloo", "nccl"),
        help="default: gloo on CPUs, NCCL on GPUs (one GPU per process); gloo with --device cuda runs on one GPU",
    )
    parser.add_argument("--hidden", default="256,4096", help="comma-separated hidden widths of the MLP")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of each variant")
    parser.add_argument("--warmup-steps", type=int, default=40, help="untimed steps before measuring")
    parser.add_argument("--out-dir", type=Path, default=None, help="where relay_overhead.json goes")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    args = parser.parse_args(argv)
    args.hidden = [int(width) for width in args.hidden.split(",")]
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.smoke:
        args.steps, args.repeats, args.warmup_steps, args.hidden = 12, 1, 4, [16]
    return resolve_output_paths(args, "relay_overhead_smoke_")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code: 0, 1 when a check failed (`CHECKS`), 2 when `--device cuda` finds
    too few GPUs."""
    args = parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and gpus < (2 if args.backend == "nccl" else 1):
        needed = "two CUDA GPUs" if args.backend == "nccl" else "a CUDA GPU"
        print(
            f"relay_overhead.py --device cuda --backend {args.backend} needs {needed}: nothing measured.",
            file=sys.stderr,
        )
        return 2
    data = measure(args)
    with locked_json(args.out_dir / "relay_overhead.json", {}) as stored:
        stored.clear()
        stored.update(data)
    update_section(args.results_md, "relay_overhead", report(data))
    print(report(data))
    return 0 if all(size[check] for size in data["sizes"].values() for check in CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
