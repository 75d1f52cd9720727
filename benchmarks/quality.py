#!/usr/bin/env python
"""Quality per compute: does AutoWU reach a tuned schedule's quality for less compute than tuning?

The tasks are in `tasks.py`, the methods (and exactly how each sets the learning rate) in `methods.py`, the
driver in `runner.py`, the report in `report.py`. Every run is appended to ``results/quality.json`` as soon as it
finishes (runs already there are skipped), so the script can be interrupted and resumed; several processes started
with the same (or overlapping) arguments share the work.

Examples::

    python benchmarks/quality.py                                  # everything (resumes)
    python benchmarks/quality.py --tasks digits_cnn --methods autowu,oracle --seeds 0,1
    python benchmarks/quality.py --methods autowu,autowu_paper,autowu_at  # rows of older decision code
    python benchmarks/quality.py --report-only                    # rebuild RESULTS.md and the plots
    python benchmarks/quality.py --smoke --out-dir /tmp/quality   # a few seconds per task
    python benchmarks/quality.py --methods autowu --out-dir /tmp/ablation --autowu-options '{"cooldown_fraction": 0.4}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import methods as m  # noqa: E402
import torch  # noqa: E402
from common import locked_json, resolve_output_paths, update_section  # noqa: E402
from report import plot, report, summarize  # noqa: E402
from runner import EMPTY_RESULTS, execute  # noqa: E402
from tasks import TASKS  # noqa: E402


def write_report(results_path: Path, md_path: Path, tasks: list[str]) -> None:
    """Rebuild the RESULTS.md section from the results file, and the plots of ``tasks``."""
    with locked_json(results_path, EMPTY_RESULTS) as data:
        runs, commands = list(data["runs"].values()), list(data["commands"])
    if not runs:
        return
    summary, stale = summarize(runs)
    plot(summary, results_path.parent, tasks)
    update_section(md_path, "quality", report(summary, stale, commands, runs))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    methods = [*m.METHODS, *m.HIDDEN_METHODS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument(
        "--methods", default=",".join(m.METHODS), help="comma-separated subset of " + ", ".join(methods)
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where quality.json and the plots go (default benchmarks/results; --smoke: a temp dir)",
    )
    parser.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="Markdown file to update (default benchmarks/RESULTS.md, or OUT_DIR/RESULTS.md when --out-dir is given)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny steps, 1 seed, 2-point grid: checks that it runs")
    parser.add_argument("--redo", action="store_true", help="re-run the selected runs even if already recorded")
    parser.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md and the plots")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--autowu-options",
        type=json.loads,
        default={},
        help="ablation: JSON of AutoWUConfig options for the autowu and autowu_at methods (needs --out-dir)",
    )
    args = parser.parse_args(argv)
    if args.autowu_options and args.out_dir is None:
        parser.error("--autowu-options needs --out-dir: ablation rows must not mix with the default's")
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for name, allowed in (("task", list(TASKS)), ("method", methods)):
        unknown = [v for v in getattr(args, name + "s") if v not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {allowed}")
    if args.smoke:
        args.seeds = args.seeds[:1]
    return resolve_output_paths(args, "quality_smoke_")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run what is missing, then rebuild the report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    results_path = args.out_dir / "quality.json"
    if not args.report_only:
        m.ABLATION_OPTIONS.update(args.autowu_options)
        try:
            execute(args, results_path)
        finally:
            m.ABLATION_OPTIONS.clear()
    write_report(results_path, args.results_md, args.tasks)
    print(f"wrote {args.results_md} and plots in {args.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
