#!/usr/bin/env python
"""AutoWU's cost on a GPU: timm ResNet-50, synthetic data, bf16 autocast, hand-written loop.

Measured, with interleaved repeats (constant / autowu / autowu_tests, ABCABC...):

- steps/s with a constant LR (no scheduler), with ``AutoWU`` on a budget so long that no switch test fires
  in the timed window (its per-step cost: ``step(loss)`` with the loss left on the GPU), and with ``AutoWU``
  on a short budget where switch tests fire every few dozen steps (the amortised cost of the tests);
- step by step, from a fresh scheduler on the short budget (and with a constant LR): what the scheduler did
  on the step (nothing, a rewind snapshot, a switch test), its wall time with the device drained before and
  after, and its host-device synchronisations, counted as the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")``. An ordinary step must add none; a snapshot copies the parameters
  and optimizer state to the host (a sync per tensor); a test reads the losses (one sync).

It needs a CUDA GPU and refuses to run without one (exit code 2), unless ``--device cpu`` is given for a dry run
of the code path (small model, no sync counts). Writes ``gpu_overhead.json`` and a RESULTS.md section.

Examples::

    python benchmarks/gpu_overhead.py                                   # expected: about 2 minutes on one H200
    python benchmarks/gpu_overhead.py --out-dir "$OUT" --results-md "$OUT/RESULTS.md"
    python benchmarks/gpu_overhead.py --device cpu --smoke --out-dir /tmp/gpu   # dry run on a CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import command_line, locked_json, resolve_output_paths, update_section  # noqa: E402

VARIANTS = ("constant", "autowu", "autowu_tests")
LONG_BUDGET = 10_000_000
"""AutoWU step budget of the ``autowu`` variant: so long that no switch test fires while timing."""


class Bench:
    """A model, optimizer and one synthetic batch, stepped under a chosen LR schedule."""

    def __init__(self, args: argparse.Namespace) -> None:
        import timm

        self.device = torch.device(args.device)
        self.model = timm.create_model(args.model, pretrained=False, num_classes=1000).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
        size = (args.batch_size, 3, args.image_size, args.image_size)
        self.x = torch.randn(size, device=self.device).to(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (args.batch_size,), device=self.device)
        self.short_budget = args.short_budget
        self.scheduler: Any = None

    def use(self, variant: str) -> None:
        """Select the LR schedule of ``variant`` (a fresh AutoWU each time)."""
        from hf_autowu import AutoWU

        for group in self.optimizer.param_groups:
            group["lr"] = 1e-4
        budget = {"constant": None, "autowu": LONG_BUDGET, "autowu_tests": self.short_budget}[variant]
        self.scheduler = None if budget is None else AutoWU(self.optimizer, total_steps=budget)

    def step(self) -> None:
        """One optimizer step (forward and backward in bf16 autocast), then the scheduler's step."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step(loss.detach())

    def synchronize(self) -> None:
        """Wait for queued device work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def steps_per_second(self, steps: int) -> tuple[float, int]:
        """Time ``steps`` steps; returns (steps/s, switch tests that ran meanwhile)."""
        tests_before = len(self.scheduler.tests) if self.scheduler is not None else 0
        self.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.synchronize()
        wall = time.perf_counter() - start
        tests = len(self.scheduler.tests) - tests_before if self.scheduler is not None else 0
        return steps / wall, tests

    def marks(self) -> tuple[int, int | None]:
        """(switch tests run so far, step of the latest rewind snapshot): what tells one step's work from another's."""
        if self.scheduler is None:
            return 0, None
        rewinder = self.scheduler.rewinder
        latest = rewinder.snapshots[-1]["step"] if rewinder is not None and rewinder.snapshots else None
        return len(self.scheduler.tests), latest

    def step_kind(self, before: tuple[int, int | None]) -> str:
        """What the scheduler did on the step just taken: ``ordinary``, ``snapshot``, ``test`` or ``snapshot+test``."""
        tests, snapshot = self.marks()
        kinds = [name for name, done in (("snapshot", snapshot != before[1]), ("test", tests > before[0])) if done]
        return "+".join(kinds) or "ordinary"

    def profile(self, steps: int, count_syncs: bool) -> list[dict[str, Any]]:
        """Each of ``steps`` steps: what the scheduler did, and either its host-device syncs (the warnings of
        ``torch.cuda.set_sync_debug_mode("warn")``) or its wall time with the device drained before and after."""
        rows = []
        for _ in range(steps):
            before = self.marks()
            if count_syncs:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        self.step()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                value = sum("synchroniz" in str(w.message).lower() for w in caught)
            else:
                self.synchronize()
                start = time.perf_counter()
                self.step()
                self.synchronize()
                value = (time.perf_counter() - start) * 1e3
            rows.append({"kind": self.step_kind(before), "syncs" if count_syncs else "ms": value})
        return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the throughput and sync measurements."""
    bench = Bench(args)
    bench.use("constant")
    bench.steps_per_second(args.warmup_steps)  # cuDNN autotuning, allocator warm-up
    throughput: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            bench.use(variant)
            rate, tests = bench.steps_per_second(args.steps)
            throughput.append({"variant": variant, "repeat": repeat, "steps_per_s": rate, "switch_tests": tests})
            print(f"{variant:>12} repeat {repeat}: {rate:.2f} steps/s ({tests} switch tests)", flush=True)
    # step by step: syncs (CUDA only) and wall time, by what the scheduler did on the step
    steps: dict[str, dict[str, Any]] = {}
    for variant in ("constant", "autowu_tests"):
        passes = (True, False) if bench.device.type == "cuda" else (False,)
        by_kind: dict[str, Any] = {}
        for count_syncs in passes:  # a fresh scheduler each pass (the model trains on: the work may differ a little)
            bench.use(variant)
            rows = bench.profile(args.profile_steps, count_syncs)
            field = "syncs" if count_syncs else "ms"
            for kind in sorted({r["kind"] for r in rows}):
                values = [r[field] for r in rows if r["kind"] == kind]
                row = by_kind.setdefault(kind, {"steps": len(values), "median_ms": None, "median_syncs": None})
                if count_syncs:
                    row.update(median_syncs=statistics.median(values), max_syncs=max(values))
                else:
                    row.update(steps=len(values), median_ms=statistics.median(values))
        steps[variant] = by_kind
        print(f"{variant}: {by_kind}", flush=True)
    device_name = torch.cuda.get_device_name() if bench.device.type == "cuda" else "CPU (dry run)"
    return {
        "command": command_line(),
        "device": device_name,
        "torch": torch.__version__,
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "short_budget": args.short_budget,
        "throughput": throughput,
        "profile_steps": args.profile_steps,
        "steps_by_kind": steps,
    }


def report(data: dict[str, Any]) -> str:
    """Markdown section from the measurements."""
    base = statistics.median(r["steps_per_s"] for r in data["throughput"] if r["variant"] == "constant")
    lines = [
        "## GPU overhead (`benchmarks/gpu_overhead.py`)",
        "",
        f"Produced by: `{data['command']}`",
        "",
        f"Device: {data['device']}, torch {data['torch']}; {data['model']}, batch {data['batch_size']}, "
        f"{data['image_size']}px, bf16 autocast, channels_last, fused AdamW; {data['steps']} timed steps per "
        f"run. `autowu`: budget {LONG_BUDGET:,} steps (no switch test in the window); `autowu_tests`: budget "
        f"{data['short_budget']} steps (tests fire during warmup).",
        "",
        "| variant | runs | median steps/s | ratio to constant | switch tests in window |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        rows = [r for r in data["throughput"] if r["variant"] == variant]
        rate = statistics.median(r["steps_per_s"] for r in rows)
        lines.append(
            f"| {variant} | {len(rows)} | {rate:.2f} | {rate / base:.3f} | {sum(r['switch_tests'] for r in rows)} |"
        )
    kinds = {
        "ordinary": "ordinary step",
        "snapshot": "rewind snapshot",
        "test": "switch test",
        "snapshot+test": "snapshot and test",
    }
    lines += [
        "",
        f"Step by step ({data['profile_steps']} steps from a fresh scheduler, `autowu_tests`' budget; the time of "
        "each step with the device drained before and after; syncs: the warnings of "
        '`torch.cuda.set_sync_debug_mode("warn")`, on a second pass over the same steps):',
        "",
        "| variant | step | steps | median ms | ms over the constant LR's step | syncs (median, max) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ordinary = data["steps_by_kind"]["constant"]["ordinary"]["median_ms"]
    for variant, by_kind in data["steps_by_kind"].items():
        for kind, row in by_kind.items():
            syncs = "-" if row["median_syncs"] is None else f"{row['median_syncs']:g}, {row['max_syncs']:g}"
            lines.append(
                f"| {variant} | {kinds.get(kind, kind)} | {row['steps']} | "
                + (
                    "- | - |"
                    if row["median_ms"] is None
                    else f"{row['median_ms']:.2f} | {row['median_ms'] - ordinary:+.2f} |"
                )
                + f" {syncs} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' for a dry run of the code path")
    parser.add_argument("--model", default="resnet50", help="timm architecture (random init)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each variant")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed steps before measuring")
    parser.add_argument("--profile-steps", type=int, default=300, help="steps profiled one by one per variant")
    parser.add_argument("--short-budget", type=int, default=1000, help="AutoWU budget of the autowu_tests variant")
    parser.add_argument("--out-dir", type=Path, default=None, help="where gpu_overhead.json goes")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model at 32px")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.image_size = "test_resnet", 2, 32
        args.steps, args.repeats, args.warmup_steps, args.profile_steps, args.short_budget = 3, 1, 1, 40, 40
    return resolve_output_paths(args, "gpu_overhead_smoke_")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 when no GPU is available)."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_overhead.py needs a CUDA GPU, and torch.cuda.is_available() is False: nothing was measured. "
            "(Use --device cpu for a dry run of the code path.)",
            file=sys.stderr,
        )
        return 2
    torch.backends.cudnn.benchmark = True
    data = measure(args)
    with locked_json(args.out_dir / "gpu_overhead.json", {}) as stored:
        stored.clear()
        stored.update(data)
    update_section(args.results_md, "gpu_overhead", report(data))
    print(f"wrote {args.out_dir / 'gpu_overhead.json'} and {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
