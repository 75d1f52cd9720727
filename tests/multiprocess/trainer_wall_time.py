"""Wall time of the same tiny-model Trainer run with AutoWUCallback, with AutoWUTrainer and with
`lr_scheduler_type="constant"`, interleaved; prints the medians, their ratios to the constant schedule, and
the part of each AutoWU run spent in switch tests (timed around `SwitchTester.run`).

    python tests/multiprocess/trainer_wall_time.py --steps 300 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from trainer_toy import ToyRegressor, regression_data, training_args  # noqa: E402
from transformers import Trainer  # noqa: E402

import hf_autowu.trainer  # noqa: E402
from hf_autowu import AutoWUCallback, AutoWUTrainer  # noqa: E402
from hf_autowu.switch_test import SwitchTester  # noqa: E402

test_seconds = [0.0]
_run_test = SwitchTester.run


def _timed_run_test(self, *args, **kwargs):
    start = time.perf_counter()
    try:
        return _run_test(self, *args, **kwargs)
    finally:
        test_seconds[0] += time.perf_counter() - start


SwitchTester.run = _timed_run_test


def run(variant: str, steps: int) -> tuple[float, float, int]:
    """One run; returns the wall time of `trainer.train()`, the part of it in switch tests, and their number."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_args(
            output_dir, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=1, logging_steps=50
        )
        common = {"model": ToyRegressor(), "args": args, "train_dataset": regression_data(256)}
        if variant == "constant":
            args.lr_scheduler_type = "constant"
            trainer = Trainer(**common)
        elif variant == "callback":
            callback = AutoWUCallback()
            trainer = Trainer(**common, callbacks=[callback])
        else:
            trainer = AutoWUTrainer(**common)
        test_seconds[0] = 0.0
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    scheduler = {"constant": None, "callback": lambda: callback.scheduler, "trainer": lambda: trainer.lr_scheduler}
    return elapsed, test_seconds[0], len(scheduler[variant]().tests) if scheduler[variant] else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the three variants")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fewer: less noise)")
    parser.add_argument("--no-figure", action="store_true", help="skip drawing autowu.png (SAVE_FIGURE=False)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_autowu.trainer.SAVE_FIGURE = not args.no_figure
    variants = ("constant", "callback", "trainer")
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    in_tests: dict[str, list[float]] = {variant: [] for variant in variants}
    tests: dict[str, int] = {}
    run("constant", 5)  # warm up imports and allocators
    for _ in range(args.repeats):
        for variant in variants:
            elapsed, seconds, tests[variant] = run(variant, args.steps)
            times[variant].append(elapsed)
            in_tests[variant].append(seconds)
    base = statistics.median(times["constant"])
    for variant in variants:
        median = statistics.median(times[variant])
        runs = ", ".join(f"{t:.2f}" for t in times[variant])
        print(
            f"{variant:>9}: median {median:.2f} s ({runs}), x{median / base:.2f}; "
            f"{statistics.median(in_tests[variant]):.2f} s in {tests[variant]} recorded switch tests"
        )


if __name__ == "__main__":
    main()
