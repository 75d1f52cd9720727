#!/usr/bin/env python
"""AutoWU's cost on a GPU: timm ResNet-50, synthetic data, bf16 autocast, hand-written loop.

Measured, with interleaved repeats (constant / autowu / autowu_tests, ABCABC...):

- steps/s with a constant LR (no scheduler), with ``AutoWU`` on a budget so long that no switch test fires
  in the timed window (its per-step cost: ``step(loss)`` with the loss left on the GPU), and with ``AutoWU``
  on a short budget where switch tests fire every few dozen steps (the amortised cost of the tests);
- host-device synchronisations per ordinary step, counted as the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")`` over a few steps, for each variant, and on a step that runs a
  switch test.

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

    def count_syncs(self, steps: int) -> int:
        """Host-device syncs reported by ``torch.cuda.set_sync_debug_mode("warn")`` over ``steps`` steps."""
        self.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    self.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)

    def syncs_on_test_step(self, max_steps: int) -> int | None:
        """Syncs of the first step that runs a switch test (``autowu_tests`` schedule), None if none ran."""
        for _ in range(max_steps):
            before = len(self.scheduler.tests)
            syncs = self.count_syncs(1)
            if len(self.scheduler.tests) > before:
                return syncs
        return None


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
    syncs: dict[str, Any] = {}
    if bench.device.type == "cuda":
        for variant in ("constant", "autowu"):
            bench.use(variant)
            syncs[variant] = bench.count_syncs(args.sync_steps) / args.sync_steps
        bench.use("autowu_tests")
        syncs["autowu_test_step"] = bench.syncs_on_test_step(args.short_budget // 2)
        print(f"syncs per step: {syncs}", flush=True)
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
        "syncs_per_step": syncs,
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
    if data["syncs_per_step"]:
        s = data["syncs_per_step"]
        lines += [
            "",
            f"Host-device syncs (`set_sync_debug_mode` warnings) per ordinary step: constant "
            f"{s['constant']:g}, autowu {s['autowu']:g}; on a step that runs a switch test: "
            f"{s['autowu_test_step']}.",
        ]
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
    parser.add_argument("--sync-steps", type=int, default=10, help="steps over which syncs are counted")
    parser.add_argument("--short-budget", type=int, default=1000, help="AutoWU budget of the autowu_tests variant")
    parser.add_argument("--out-dir", type=Path, default=None, help="where gpu_overhead.json goes")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model at 32px")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.image_size = "test_resnet", 2, 32
        args.steps, args.repeats, args.warmup_steps, args.sync_steps, args.short_budget = 3, 1, 1, 2, 40
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
