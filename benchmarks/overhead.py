#!/usr/bin/env python
"""What AutoWU costs: switch-test latency and memory versus history length, and end-to-end Trainer overhead.

1. Switch test. For each history length (1e3 ... 1e6 losses of a noisy U-shaped warmup curve) and each
   implementation, a fresh process runs one untimed test, then ``--repeats`` timed tests on the same history
   (the GP carries over from test to test, as in training). Reported: median and p95 latency, and the peak
   resident memory above the level before the first test, during that test (sampled every 0.5 ms by a thread;
   the history tensor itself, 8 bytes per loss, is allocated before and listed apart). Implementations:

   - ``fast``: ``hf_autowu.switch_test.SwitchTester``, the path ``AutoWU`` uses (closed-form GP);
   - ``reference``: ``hf_autowu.reference.ReferenceSwitchTest`` (GPyTorch, float64), the spec written out;
   - ``reference_fp32``: the same in float32, the cost of the original implementation;
   - ``cap_check``: ``hf_autowu.switch_test.fell_over_ramp``, which ``AutoWU`` runs once, beside a last test, when
     warmup reaches its cap with no fall in medians of ten losses: medians of a third of the ramp (the ramp's
     length matters here, not the budget's).

   The tests standardise the losses (hf_autowu's default), 5 predictions per test.

2. End to end. The same small Trainer run (the ``gpt2_stdlib`` task of ``tasks.py``), interleaved
   ``--e2e-repeats`` times, in four variants: ``lr_scheduler_type="constant"``; ``callbacks=[AutoWUCallback()]``
   and ``AutoWUTrainer`` without the figure (``hf_autowu.trainer.SAVE_FIGURE`` off); and ``AutoWUTrainer`` with
   the figure (``autowu.png`` drawn at the switch and at the end, as by default). Reported: wall time of
   ``trainer.train()`` and its ratio to the constant schedule's, and, inside it, the time spent in switch tests
   (``SwitchTester.run``) and in drawing the figure, each timed on its own, so that neither is charged to the other.

Examples::

    python benchmarks/overhead.py                       # writes results/overhead.json and RESULTS.md
    python benchmarks/overhead.py --smoke --out-dir /tmp/overhead
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import command_line, locked_json, machine_info, resolve_output_paths, update_section  # noqa: E402
from tasks import TASKS, RandomWindows, gpt2_model, stdlib_bytes  # noqa: E402

HISTORY_LENGTHS = (1_000, 10_000, 100_000, 1_000_000)
IMPLEMENTATIONS = ("fast", "reference", "reference_fp32", "cap_check")
E2E_VARIANTS = ("constant", "callback", "trainer", "trainer_figure")
E2E_TASK = "gpt2_stdlib"


def synthetic_history(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` float64 losses: a U-shaped warmup curve (minimum at 70% of the way) with Gaussian noise."""
    x = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 2.0 - 1.2 * x + 3.0 * torch.clamp(x - 0.7, min=0.0) ** 2 * 10 + 0.1 * noise


def _rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling this process's RSS in a thread; ``peak - start`` is the extra memory used."""

    def __init__(self, interval_s: float = 5e-4) -> None:
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _make_tester(implementation: str) -> Any:
    """A callable ``test(history)`` for one implementation."""
    if implementation == "fast":
        from hf_autowu.switch_test import SwitchTester

        tester = SwitchTester(confidence=0.95, n_tests=5, standardize_losses=True, seed=0)
        return lambda h: tester.run(h, current_lr=1.0, min_lr=1e-5, warmup_type="exp")
    if implementation == "cap_check":
        from hf_autowu.switch_test import fell_over_ramp

        return lambda h: fell_over_ramp(h.numpy())
    from hf_autowu.reference import ReferenceSwitchTest

    dtype = torch.float32 if implementation == "reference_fp32" else torch.float64
    reference = ReferenceSwitchTest(confidence=0.95, n_tests=5, standardize_losses=True, seed=0, dtype=dtype)
    return lambda h: reference(h, 1.0, 1e-5, "exp")


def _measure_switch_test(implementation: str, n: int, repeats: int, threads: int, queue: Any) -> None:
    """Child process: latency of ``repeats`` tests on a history of ``n`` losses, and the peak extra RSS."""
    torch.set_num_threads(threads)
    history = synthetic_history(n)
    test = _make_tester(implementation)
    with PeakRSS() as memory:
        test(history)  # untimed (lazy initialisation); the memory sampler would slow the timed tests
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        outcome = test(history)
        latencies.append(time.perf_counter() - start)
    queue.put(
        {
            "implementation": implementation,
            "history": n,
            "repeats": repeats,
            "median_ms": 1e3 * statistics.median(latencies),
            "p95_ms": 1e3 * float(np.percentile(latencies, 95)),
            "peak_extra_mb": (memory.peak - memory.start) / 2**20,
            "history_mb": history.numel() * history.element_size() / 2**20,
            "passed": getattr(outcome, "passed", outcome),  # the cap check's outcome is its verdict
        }
    )


def switch_test_latency(lengths: tuple[int, ...], repeats: dict[str, int], threads: int) -> list[dict[str, Any]]:
    """Run every (implementation, history length) in its own spawned process; return their measurements."""
    ctx = mp.get_context("spawn")
    rows = []
    for n in lengths:
        for implementation in IMPLEMENTATIONS:
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_measure_switch_test, args=(implementation, n, repeats[implementation], threads, queue)
            )
            proc.start()
            row = queue.get()
            proc.join()
            print(
                f"switch test {implementation:>14} n={n:>8}: median {row['median_ms']:.1f} ms, "
                f"p95 {row['p95_ms']:.1f} ms, +{row['peak_extra_mb']:.1f} MB",
                flush=True,
            )
            rows.append(row)
    return rows


@contextlib.contextmanager
def _timed(owner: Any, name: str, totals: dict[str, float]) -> Iterator[None]:
    """Replace ``owner.name`` (a function or method) by a wrapper that adds its calls and seconds to ``totals``."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals["calls"] += 1
            totals["s"] += time.perf_counter() - start

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _e2e_run(variant: str, steps: int, seed: int) -> dict[str, Any]:
    """One small Trainer run of the GPT-2 task; returns its wall time, steps, and the switch tests' and the
    figure's share of it."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    import hf_autowu.trainer as autowu_trainer
    from hf_autowu.switch_test import SwitchTester

    task = TASKS[E2E_TASK]
    text = stdlib_bytes()
    torch.manual_seed(seed)
    model = gpt2_model()
    train = RandomWindows(text["train"], 64, task.steps_per_epoch * task.batch_size, seed)
    trainer_cls, callbacks, extra = Trainer, [], {}
    if variant == "constant":
        extra = {"lr_scheduler_type": "constant", "learning_rate": 1e-3}
    elif variant == "callback":
        callbacks = [autowu_trainer.AutoWUCallback()]
    else:
        trainer_cls = autowu_trainer.AutoWUTrainer
    switch_tests, figures = {"calls": 0, "s": 0.0}, {"calls": 0, "s": 0.0}
    save_figure = autowu_trainer.SAVE_FIGURE
    autowu_trainer.SAVE_FIGURE = variant == "trainer_figure"
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            _timed(SwitchTester, "run", switch_tests),
            _timed(autowu_trainer, "save_autowu_figure", figures),
        ):
            args = TrainingArguments(
                output_dir=tmp,
                max_steps=steps,
                per_device_train_batch_size=task.batch_size,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                seed=seed,
                disable_tqdm=True,
                dataloader_pin_memory=False,
                **extra,
            )
            trainer = trainer_cls(model=model, args=args, train_dataset=train, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
    finally:
        autowu_trainer.SAVE_FIGURE = save_figure
    return {
        "variant": variant,
        "wall_s": wall,
        "steps": trainer.state.global_step,
        "switch_tests": switch_tests["calls"],
        "switch_test_s": switch_tests["s"],
        "figures": figures["calls"],
        "figure_s": figures["s"],
    }


def end_to_end(steps: int, repeats: int) -> list[dict[str, Any]]:
    """Interleave the variants ``repeats`` times (ABCDABCD...) so drifting machine load hits all alike."""
    rows = []
    for rep in range(repeats):
        for variant in E2E_VARIANTS:
            row = {**_e2e_run(variant, steps, seed=rep), "repeat": rep}
            print(f"end-to-end {variant:>14} repeat {rep}: {row['wall_s']:.2f} s", flush=True)
            rows.append(row)
    return rows


def _load(part: dict[str, Any]) -> str:
    """The load average stored with a part, as text."""
    values = part.get("load_average")
    if not values or any(v is None for v in values):
        return "not recorded"
    return ", ".join(f"{v:.1f}" for v in values)


def _part_time(rows: list[dict[str, Any]], seconds: str, calls: str) -> str:
    """Median seconds (and calls) of a timed part over ``rows``; "not timed" for rows stored before the parts were
    timed (their AutoWU variants also drew the figure)."""
    if any(seconds not in r for r in rows):
        return "not timed"
    return f"{statistics.median(r[seconds] for r in rows):.2f} ({statistics.median(r[calls] for r in rows):g})"


def report(data: dict[str, Any]) -> str:
    """Markdown section from the overhead results (either part may be missing)."""
    lines = ["## Overhead (`benchmarks/overhead.py`)", "", f"Machine: {data['machine']}.", ""]
    if "switch_test" in data:
        part = data["switch_test"]
        lines += [
            "### Switch test latency and memory versus history length",
            "",
            f"Produced by: `{part['command']}` (load average at the start: {_load(part)}).",
            "",
            "| history (losses) | implementation | median (ms) | p95 (ms) | peak extra RSS, first test (MB) | "
            "history (MB) | repeats |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in part["rows"]:
            lines.append(
                f"| {row['history']:,} | {row['implementation']} | {row['median_ms']:.1f} | {row['p95_ms']:.1f} | "
                f"{row['peak_extra_mb']:.1f} | {row['history_mb']:.2f} | {row['repeats']} |"
            )
    if "end_to_end" in data:
        part = data["end_to_end"]
        rows = part["rows"]
        variants = [v for v in E2E_VARIANTS if any(r["variant"] == v for r in rows)]
        walls = {v: [r["wall_s"] for r in rows if r["variant"] == v] for v in variants}
        lines += [
            "",
            f"### End to end: GPT-2 task, {rows[0]['steps']} Trainer steps, interleaved repeats",
            "",
            f"Produced by: `{part['command']}` (load average at the start: {_load(part)}). On a shared "
            "machine the minimum is the least disturbed estimate. Switch tests and figure: medians over the "
            "runs of the time spent in them inside the wall time (count in brackets)."
            + (
                ' Rows "not timed" were measured before the parts were timed, and their AutoWU variants drew '
                "the figure."
                if any("figure_s" not in r for r in rows)
                else ""
            ),
            "",
            "| variant | runs | median wall (s) | min | max | median / constant's | min / constant's | "
            "switch tests (s) | figure (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for variant, w in walls.items():
            mine = [r for r in rows if r["variant"] == variant]
            lines.append(
                f"| {variant} | {len(w)} | {statistics.median(w):.2f} | {min(w):.2f} | {max(w):.2f} | "
                f"{statistics.median(w) / statistics.median(walls['constant']):.3f} | "
                f"{min(w) / min(walls['constant']):.3f} | {_part_time(mine, 'switch_test_s', 'switch_tests')} | "
                f"{_part_time(mine, 'figure_s', 'figures')} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where overhead.json goes (default benchmarks/results; --smoke: a temp dir)",
    )
    parser.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="Markdown file to update (default benchmarks/RESULTS.md, or OUT_DIR/RESULTS.md)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed switch tests per configuration (fast path)")
    parser.add_argument("--reference-repeats", type=int, default=10, help="timed tests for the reference paths")
    parser.add_argument("--e2e-steps", type=int, default=200, help="optimizer steps of each end-to-end run")
    parser.add_argument("--e2e-repeats", type=int, default=3, help="interleaved repeats of the end-to-end runs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--parts",
        default="switch_test,end_to_end",
        help="comma-separated parts to measure; the other part's stored results are kept",
    )
    parser.add_argument("--smoke", action="store_true", help="one short history, 2 repeats, 4-step Trainer runs")
    args = parser.parse_args(argv)
    args.parts = args.parts.split(",")
    if args.smoke:
        args.repeats, args.reference_repeats, args.e2e_steps, args.e2e_repeats = 2, 1, 4, 1
    return resolve_output_paths(args, "overhead_smoke_")


def main(argv: list[str] | None = None) -> None:
    """Entry point: measure the selected parts, update ``overhead.json`` and the RESULTS.md section."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    lengths = HISTORY_LENGTHS[:1] if args.smoke else HISTORY_LENGTHS
    repeats = {
        "fast": args.repeats,
        "reference": args.reference_repeats,
        "reference_fp32": args.reference_repeats,
        "cap_check": args.repeats,
    }
    measured: dict[str, Any] = {}
    if "switch_test" in args.parts:
        measured["switch_test"] = {
            "command": command_line(),
            "load_average": os.getloadavg(),
            "rows": switch_test_latency(lengths, repeats, args.threads),
        }
    if "end_to_end" in args.parts:
        measured["end_to_end"] = {
            "command": command_line(),
            "load_average": os.getloadavg(),
            "rows": end_to_end(args.e2e_steps, args.e2e_repeats),
        }
    with locked_json(args.out_dir / "overhead.json", {}) as stored:
        stored.update(measured, machine=machine_info())
        data = dict(stored)
    update_section(args.results_md, "overhead", report(data))
    print(f"wrote {args.out_dir / 'overhead.json'} and {args.results_md}")


if __name__ == "__main__":
    sys.exit(main())
