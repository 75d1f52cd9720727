"""Helpers shared by the benchmark scripts: machine description, RESULTS.md sections, locked JSON files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

_MD_HEADER = """# hf_autowu benchmarks

Produced by the scripts in this folder; each script rewrites only its own section
(between its `begin`/`end` markers). See `benchmarks/README.md` for what each one measures.
"""


UNRECORDED_CPU = "AMD EPYC"
"""The CPU of every run recorded before runs named theirs (up to 2026-11-29): every report of that time names it."""


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where the name alone does not tell two generations
    apart (a virtual machine's "AMD EPYC"). Recorded with every benchmark run: on another CPU, float rounding differs
    from the first steps on, so a run is only repeatable bit for bit on the CPU it ran on. Runs recorded before the
    numbers were added name the model alone."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpus_line(runs: Iterable[tuple[str | None, str]]) -> str:
    """One line: which CPU the recorded runs ran on, given as (CPU, kind of run) pairs, with the kinds run on each (a
    CPU of None: recorded before runs named theirs, so `UNRECORDED_CPU`)."""
    kinds_by_cpu: dict[str, dict[str, int]] = {}
    for cpu, kind in runs:
        counts = kinds_by_cpu.setdefault(cpu or UNRECORDED_CPU, {})
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{cpu}: {sum(n.values())} runs ({', '.join(sorted(n))})" for cpu, n in kinds_by_cpu.items()]
    line = "Runs by CPU: " + "; ".join(parts) + "."
    if len(parts) > 1:
        line += (
            " Float rounding differs between CPUs from the first steps on, so the same run repeated on another CPU "
            "does not come out bit for bit the same."
        )
    return line


def machine_info() -> str:
    """Describe the machine and software stack in one line."""
    import transformers

    return (
        f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def command_line() -> str:
    """The command that started this process, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(BENCH_DIR.parent)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def update_section(md_path: Path, name: str, body: str) -> None:
    """Replace (or append) the section delimited by ``<!-- name:begin -->`` / ``<!-- name:end -->``.

    Args:
        md_path: the Markdown file; created with a short header when missing.
        name: section name used in the markers.
        body: new Markdown text of the section (without the markers).
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = md_path.read_text() if md_path.exists() else _MD_HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)


def finite_or_none(value: Any) -> Any:
    """Map NaN/inf floats (recursively in lists and dicts) to None so that the JSON stays strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def _dumps_by_line(data: dict[str, Any]) -> str:
    """Strict JSON with one line per top-level key, and one line per entry of top-level dicts (small diffs)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items = [f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(items) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


@contextlib.contextmanager
def locked_json(path: Path, default: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Load a JSON file under an exclusive lock, yield it for in-place edits, then write it back atomically.

    Several benchmark processes (e.g. one per task) can therefore share one results file.

    Args:
        path: the JSON file (its folder is created if needed).
        default: content used when the file does not exist yet.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else json.loads(json.dumps(default))
            yield data
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(_dumps_by_line(finite_or_none(data)))
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_output_paths(args, smoke_prefix: str):
    """Fill in `args.out_dir` and `args.results_md`: a temporary folder for `--smoke` runs (never the committed
    results), RESULTS.md beside an explicit `--out-dir`, else the committed files. Returns `args`."""
    if args.smoke:
        args.out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix=smoke_prefix))
    if args.results_md is None:
        args.results_md = RESULTS_MD if args.out_dir is None else args.out_dir / "RESULTS.md"
    args.out_dir = args.out_dir or RESULTS_DIR
    return args
