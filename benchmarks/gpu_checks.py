#!/usr/bin/env python
"""Checks that need a CUDA GPU: the Trainer with FSDP2 and DeepSpeed (ZeRO-2, ZeRO-3, stage 0 in bf16), under AutoWU.

A tiny Llama (from a config, byte vocabulary, eager attention, fp32, deterministic algorithms) on byte sequences of
hf_autowu's own sources, with AutoWU's defaults, through `AutoWUCallback` and `AutoWUTrainer`:

- ``fsdp``: `fsdp=True`, `fsdp_config={"version": 2, ...}` (Accelerate's FSDP plugin, FSDP2 `fully_shard`), one
  process. Checked: no exception; the LR every update used is AutoWU's (`lr_at`) and is the logged
  `learning_rate`; AutoWU's keys are in the log entries; the parameters are sharded (DTensors) and rewind runs in
  its sharded mode; right after the switch the parameters and optimizer state are bit for bit those of the step
  the rewind restored (fingerprints of the local shards taken at every step); resuming from the last checkpoint
  written before the switch gives the same LRs and final weights.
- ``deepspeed``: configs without a `scheduler` section: ZeRO-2 with an `optimizer` section (DeepSpeed's engine
  steps the scheduler inside the backward pass) and without one (the Trainer steps it), ZeRO-3, and no ZeRO
  (stage 0) with bf16 weights, whose fp32 masters DeepSpeed's `FP16_UnfusedOptimizer` keeps. The same
  checks, with the LR read inside DeepSpeed's optimizer step; the rewind fingerprints cover DeepSpeed's fp32 master
  partitions, their optimizer state and the weights the model computes with (ZeRO-3: each parameter's partition).

Each part runs in its own process, started with ``torch.distributed.run --nproc_per_node 1`` (Accelerate takes its FSDP
and DeepSpeed paths only in a distributed launch). Then ``benchmarks/gpu_overhead.py`` runs (its own RESULTS.md
section), and ``benchmarks/relay_overhead.py --device cuda --backend gloo``: the spike watch's relay with CUDA losses,
two processes on one GPU (its own section; its checks count here). Writes ``gpu_checks.json`` and the RESULTS.md
section ``gpu_checks``; the exit code is 0 when every check passed, 1 otherwise, 2 without a CUDA GPU (nothing is run).
``--device cpu --smoke`` is a dry run of the code path on a CPU (DeepSpeed with ``DS_ACCELERATOR=cpu``; the Trainer
refuses FSDP without a distributed accelerator, so the ``fsdp`` part trains unsharded there and skips its sharding
check).

Examples::

    python benchmarks/gpu_checks.py --out-dir "$OUT" --results-md "$OUT/RESULTS.md"   # the checks and the overhead
    python benchmarks/gpu_checks.py --skip-overhead                                    # only the Trainer checks
    python benchmarks/gpu_checks.py --device cpu --smoke --out-dir /tmp/gpu_checks     # dry run on a CPU

On one H200 the Trainer checks took about 6 minutes (the FSDP part about 70 s, the DeepSpeed part's eight runs
about 290 s, and over 300 s on a second machine), hence a part timeout of 600 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import command_line, locked_json, resolve_output_paths, update_section  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
ENTRY_POINTS = ("callback", "trainer")
DEEPSPEED_CONFIGS = ("optimizer", "no_optimizer", "zero3", "zero0_bf16")
SEQUENCE = 64


# ------------------------------------------------------------------------------------------ model and data


def tiny_llama(smoke: bool) -> Any:
    """A small Llama from a config (byte vocabulary), eager attention (deterministic backward)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    width = 64 if smoke else 128
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2 if smoke else 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQUENCE,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def byte_dataset(rows: int) -> torch.utils.data.Dataset:
    """`rows` sequences of `SEQUENCE` bytes of hf_autowu's sources, as `input_ids` and `labels`."""
    text = b"".join(path.read_bytes() for path in sorted((BENCH_DIR.parent / "hf_autowu").glob("*.py")))
    ids = torch.tensor(list(text[: rows * SEQUENCE]), dtype=torch.long).view(rows, SEQUENCE)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return rows

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": ids[i]}

    return Rows()


def deepspeed_state(zero: Any, model: torch.nn.Module) -> list[torch.Tensor]:
    """DeepSpeed's training state on this process: its fp32 master partitions with their optimizer state, and the
    weights the model computes with. ZeRO-3 keeps its flat partitions out of `param_groups` between steps, and only
    the real elements of each parameter's partition are taken (the last processes' run into uninitialised padding)."""
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is None:
        masters = [p for group in zero.param_groups for p in group["params"]]
        moments = [v for p in masters for _, v in sorted(zero.state.get(p, {}).items()) if torch.is_tensor(v)]
        return masters + moments + [p for _, p in sorted(model.named_parameters())]

    def real(partition: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
        size = partition.numel()
        start = torch.distributed.get_rank(group=param.ds_process_group) * size
        return partition[: min(max(param.ds_numel - start, 0), size)]

    tensors = []
    for flat, params in zip(flats, zero.fp16_groups, strict=True):
        state = zero.state[flat]
        for tensor in [flat, *(state[k] for k in sorted(state) if torch.is_tensor(state[k]) and state[k].dim())]:
            parts = tensor.split([p.ds_tensor.ds_numel for p in params])
            tensors += [real(part, p) for part, p in zip(parts, params, strict=True)]
    return tensors + [real(p.ds_tensor, p) for _, p in sorted(model.named_parameters())]


def fingerprint(tensors: list[torch.Tensor]) -> str:
    """A hash of the bytes of `tensors` (local shards of DTensors), to compare states bit for bit."""
    digest = hashlib.sha256()
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        digest.update(local.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ one training run


def make_recorder() -> Any:
    """A callback recording the LR of every update (inside DeepSpeed's optimizer step when there is one, else just
    before `optimizer.step()`), whether DeepSpeed skipped it, and fingerprints of the training state."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.updates: list[tuple[list[float], bool]] = []
            self.begin_fingerprints: list[str] = []
            self.final_fingerprint: str | None = None
            self.zero = None

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", None)
            if type(inner).__name__.startswith(("DeepSpeedZeroOptimizer", "FP16_")):  # ZeRO, or stage 0 in bf16
                self.zero = inner
                original = inner.step

                def step(*a: Any, **k: Any) -> Any:
                    lrs = [group["lr"] for group in inner.param_groups]
                    result = original(*a, **k)
                    self.updates.append((lrs, bool(getattr(inner, "overflow", False))))
                    return result

                inner.step = step

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self.zero is None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                states = [sorted(optimizer.state.get(p, {}).items()) for p in params]
                moments = [value for state in states for _, value in state if torch.is_tensor(value)]
                self.begin_fingerprints.append(fingerprint(params + moments))
            else:
                self.begin_fingerprints.append(fingerprint(deepspeed_state(self.zero, model)))

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if self.zero is None:
                self.updates.append(([group["lr"] for group in optimizer.param_groups], False))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.zero is None:
                self.final_fingerprint = fingerprint([p for _, p in sorted(model.named_parameters())])
            else:
                self.final_fingerprint = fingerprint(deepspeed_state(self.zero, model))

    return Recorder()


def train_once(part: str, entry_point: str, config: str, out: Path, opts: argparse.Namespace, resume: str | None):
    """One Trainer run; returns the recorder, the trainer, the AutoWU scheduler and the rewind warnings."""
    from transformers import Trainer, TrainingArguments

    from hf_autowu import AutoWU, AutoWUCallback, AutoWUConfig, AutoWUTrainer

    engine: dict[str, Any] = {}
    if part == "fsdp" and opts.device == "cpu":
        pass  # the Trainer refuses FSDP without a distributed accelerator: the dry run trains unsharded
    elif part == "fsdp":
        engine = {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "reshard_after_forward": True,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "state_dict_type": "SHARDED_STATE_DICT",
            },
        }
    else:
        deepspeed: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": {"zero3": 3, "zero0_bf16": 0}.get(config, 2)},
        }
        if config == "zero0_bf16":  # no ZeRO, bf16 weights: DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters
            deepspeed["bf16"] = {"enabled": "auto"}
        if config == "optimizer":
            # torch's AdamW: no DeepSpeed op to compile
            params = {"lr": "auto", "weight_decay": "auto", "torch_adam": True}
            deepspeed["optimizer"] = {"type": "AdamW", "params": params}
        engine = {"deepspeed": deepspeed}
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=opts.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        logging_steps=5,
        save_strategy="no" if resume else "steps",
        save_steps=opts.save_steps,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        use_cpu=False,
        dataloader_pin_memory=False,
        bf16=config == "zero0_bf16",
        **engine,
    )
    recorder = make_recorder()
    common = {"model": tiny_llama(opts.smoke), "args": args, "train_dataset": byte_dataset(opts.rows)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if entry_point == "callback":
            callback = AutoWUCallback(AutoWUConfig())
            trainer = Trainer(**common, callbacks=[recorder, callback])
        else:
            trainer = AutoWUTrainer(**common, callbacks=[recorder], autowu_config=AutoWUConfig())
        trainer.train(resume_from_checkpoint=resume)
    scheduler = callback.scheduler if entry_point == "callback" else trainer.lr_scheduler
    while not isinstance(scheduler, AutoWU):  # DeepSpeed's engine stepping it: Accelerate's wrapper around it
        scheduler = scheduler.scheduler
    rewind_warnings = [str(w.message) for w in caught if "AutoWU rewind" in str(w.message)]
    return recorder, trainer, scheduler, rewind_warnings


def rewind_on(result: dict[str, Any], mode: str, rewind_warnings: list[str]) -> bool:
    """Whether rewind ran in `mode` and was never turned off. A warning that rewind is off fails the check; the
    others do not (every snapshot kept having trained above the chosen LR, say: the oldest is restored)."""
    turned_off = any(text.startswith("AutoWU rewind is off") for text in rewind_warnings)
    return result["rewind_enabled"] and result["rewind_mode"] == mode and not turned_off


def check_run(part: str, entry_point: str, config: str, opts: argparse.Namespace) -> dict[str, Any]:
    """An uninterrupted run and a run resumed from its last checkpoint before the switch; the checks' outcomes."""
    name = f"{part}-{entry_point}" + (f"-{config}" if part == "deepspeed" else "")
    out = opts.out_dir / "runs" / name
    start = time.perf_counter()
    recorder, trainer, scheduler, rewind_warnings = train_once(part, entry_point, config, out / "full", opts, None)
    applied = [lrs[0] for lrs, _ in recorder.updates]
    skipped = [i for i, (_, was_skipped) in enumerate(recorder.updates) if was_skipped]
    counted = [sum(1 for j in skipped if j < i) for i in range(len(applied))]
    expected = [scheduler.lr_at(i - counted[i]) for i in range(len(applied))]
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    entries = [e for e in trainer.state.log_history if "loss" in e]
    rewinder = scheduler.rewinder
    sharded = any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    result: dict[str, Any] = {
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "skipped_updates": skipped,
        "sharded": sharded,
        "rewind_mode": rewinder.mode if rewinder is not None else None,
        "rewind_enabled": bool(rewinder is not None and rewinder.enabled),
        "rewound_to": rewinder.rewound_to if rewinder is not None else None,
        "rewind_warnings": len(rewind_warnings),
        "rewind_warning_texts": [text[:160] for text in rewind_warnings],
    }
    checks = {
        "lr_applied": len(applied) == opts.steps
        and all(len(set(lrs)) == 1 for lrs, _ in recorder.updates)
        and applied == expected,
        "lr_logged": bool(logged) and all(lr == applied[step - 1] for step, lr in logged.items()),
        "autowu_in_logs": bool(entries) and all("autowu/lr" in e for e in entries),
        "switched": scheduler.switch_step is not None,
    }
    target = result["rewound_to"]
    checks["rewind_restored_bit_for_bit"] = (
        target is not None
        and recorder.begin_fingerprints[scheduler.switch_step] == recorder.begin_fingerprints[target["step"]]
    )
    if part == "fsdp" and opts.device == "cuda":  # a CPU has no FSDP through Accelerate
        checks["sharded_with_sharded_rewind"] = sharded and result["rewind_mode"] == "sharded"
    if part == "deepspeed":  # each process's own master partitions (stage 0: replicas)
        mode = "replicated" if config == "zero0_bf16" else "sharded"
        checks["rewind_on"] = rewind_on(result, mode, rewind_warnings)
    written = sorted(int(p.name.split("-")[1]) for p in (out / "full").glob("checkpoint-*"))
    before = [step for step in written if scheduler.switch_step is not None and step < scheduler.switch_step]
    result["resumed_from"] = before[-1] if before else None
    if before:
        again, _, resumed_scheduler, _ = train_once(
            part, entry_point, config, out / "resumed", opts, str(out / "full" / f"checkpoint-{before[-1]}")
        )
        checks["resume_exact"] = (
            [lrs for lrs, _ in again.updates] == [lrs for lrs, _ in recorder.updates][before[-1] :]
            and resumed_scheduler.switch_step == scheduler.switch_step
            and again.final_fingerprint == recorder.final_fingerprint
        )
    else:
        checks["resume_exact"] = False
    result["checks"] = checks
    result["ok"] = all(checks.values())
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {'ok' if result['ok'] else 'FAILED'} {checks}", flush=True)
    return result


def run_part(part: str, opts: argparse.Namespace) -> int:
    """The worker: every run of `part`, into `OUT_DIR/gpu_checks_{part}.json`, rewritten after each run so that a
    part cut by its timeout keeps the runs it finished."""
    if opts.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    import hf_autowu.trainer

    hf_autowu.trainer.SAVE_FIGURE = False
    results: dict[str, Any] = {}
    configs = DEEPSPEED_CONFIGS if part == "deepspeed" else (None,)
    runs = [(entry_point, config) for entry_point in ENTRY_POINTS for config in configs]
    if opts.smoke:  # one run of each part: the engine-stepped DeepSpeed path for the subclass
        runs = [("callback", None)] if part == "fsdp" else [("trainer", "optimizer")]
    for entry_point, config in runs:
        name = f"{part}-{entry_point}" + (f"-{config}" if config else "")
        try:
            results[name] = check_run(part, entry_point, config, opts)
        except Exception:  # a check that crashes is a failed check; the others still run
            results[name] = {"ok": False, "error": traceback.format_exc(limit=20)}
            print(f"{name}: FAILED with an exception\n{results[name]['error']}", flush=True)
        partial = opts.out_dir / f"gpu_checks_{part}.json.partial"  # replaced whole: a kill never leaves half a file
        partial.write_text(json.dumps(results, indent=1, default=str))
        partial.replace(opts.out_dir / f"gpu_checks_{part}.json")
    return 0


# ------------------------------------------------------------------------------------------ the parent


def launch(part: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Run the `part` worker in its own process (torch.distributed.run, one process); its results."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += [str(Path(__file__).resolve()), "--worker", part, "--device", opts.device]
    command += ["--out-dir", str(opts.out_dir)]
    command += ["--steps", str(opts.steps), "--save-steps", str(opts.save_steps), "--rows", str(opts.rows)]
    command += ["--smoke"] if opts.smoke else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if opts.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    result_file = opts.out_dir / f"gpu_checks_{part}.json"
    result_file.unlink(missing_ok=True)
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = launcher.communicate(timeout=opts.part_timeout)
        headline = ""
    except subprocess.TimeoutExpired:  # SIGTERM: torch.distributed.run then ends its workers (SIGKILL would not)
        launcher.terminate()
        stdout, stderr = launcher.communicate(timeout=60)
        headline = f"timed out after {opts.part_timeout} s\n"
    (opts.out_dir / f"gpu_checks_{part}.log").write_text(headline + stdout + stderr)
    results = json.loads(result_file.read_text()) if result_file.exists() else {}
    if headline or not results:  # the runs finished before a timeout are kept; the part still fails
        # the timeout stays first however long the log: only the log's tail is kept after it
        results[f"{part}-worker"] = {"ok": False, "error": headline + (stdout + stderr)[-3000:]}
    return results


def report(data: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    lines = [
        "## GPU checks: the Trainer with FSDP2 and DeepSpeed ZeRO-2 and ZeRO-3 (`benchmarks/gpu_checks.py`)",
        "",
        f"Produced by: `{data['command']}`",
        "",
        f"Device: {data['device']}, torch {data['torch']}, transformers {data['transformers']}, accelerate "
        f"{data['accelerate']}, deepspeed {data['deepspeed']}. A tiny Llama (fp32, eager attention), AutoWU's "
        f"defaults, {data['steps']} steps; each run also resumed from its last checkpoint before the switch.",
        "",
        "| run | result | switch (reason) | peak LR | rewind | resumed from | checks failed | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in data["runs"].items():
        if "checks" not in run:
            lines.append(f"| {name} | **error** | | | | | see gpu_checks.json | |")
            continue
        failed = [check for check, ok in run["checks"].items() if not ok]
        if run["rewind_enabled"] or run["rewound_to"]:
            rewind = f"{run['rewind_mode']}, restored step {(run['rewound_to'] or {}).get('step')}"
            if run["rewind_warnings"]:  # e.g. every kept snapshot trained above the chosen LR: the oldest restored
                rewind += f" ({run['rewind_warnings']} warning)"
        else:
            rewind = f"off ({run['rewind_warnings']} warning)"
        peak = f"{run['peak_lr']:.3g}" if run["peak_lr"] is not None else "-"
        lines.append(
            f"| {name} | {'ok' if run['ok'] else '**failed**'} | {run['switch_step']} ({run['switch_reason']}) | "
            f"{peak} | {rewind} | {run['resumed_from']} | {', '.join(failed) or '-'} | {run['seconds']} |"
        )
    if data["overhead_exit_code"] is not None:
        lines += ["", f"`benchmarks/gpu_overhead.py` exit code: {data['overhead_exit_code']} (its own section)."]
    if data.get("relay_exit_code") is not None:
        lines += [
            "",
            f"`benchmarks/relay_overhead.py --device cuda --backend gloo` exit code: {data['relay_exit_code']} (0: "
            "two processes with CUDA losses agree, `MeanInFlight` is exact, a `state_dict()` on the main process "
            "alone mid-relay returned; its own section).",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="'cpu': a dry run of the code path")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of each run (AutoWU's budget)")
    parser.add_argument("--save-steps", type=int, default=15, help="checkpoint every this many steps")
    parser.add_argument("--rows", type=int, default=512, help="training sequences")
    parser.add_argument("--part-timeout", type=int, default=600, help="seconds allowed to each part")
    parser.add_argument("--skip-overhead", action="store_true", help="do not run benchmarks/gpu_overhead.py")
    parser.add_argument("--out-dir", type=Path, default=None, help="where gpu_checks.json and the runs go")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument(
        "--smoke", action="store_true", help="a smaller model, 40 steps, one run of each part, no gpu_overhead.py"
    )
    parser.add_argument("--worker", choices=("fsdp", "deepspeed"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.save_steps, args.rows, args.skip_overhead = 40, 4, 64, True
    return resolve_output_paths(args, "gpu_checks_smoke_")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 all passed, 1 a check failed, 2 no CUDA GPU)."""
    opts = parse_args(argv)
    if opts.worker is not None:
        return run_part(opts.worker, opts)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_checks.py needs a CUDA GPU, and torch.cuda.is_available() is False: nothing was checked. "
            "(Use --device cpu --smoke for a dry run of the code path.)",
            file=sys.stderr,
        )
        return 2
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for part in ("fsdp", "deepspeed"):
        runs.update(launch(part, opts))
    overhead = None
    if not opts.skip_overhead:
        import gpu_overhead

        overhead = gpu_overhead.main(["--out-dir", str(opts.out_dir), "--results-md", str(opts.results_md)])
    relay = None
    if not opts.skip_overhead and opts.device == "cuda":
        import relay_overhead

        relay = relay_overhead.main(  # the spike watch's relay with CUDA losses (gloo: one GPU will do)
            ["--device", "cuda", "--backend", "gloo", "--hidden", "4096", "--steps", "300", "--repeats", "3"]
            + ["--out-dir", str(opts.out_dir), "--results-md", str(opts.results_md)]
        )
    import accelerate
    import transformers

    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = "not installed"
    device = torch.cuda.get_device_name() if opts.device == "cuda" else "CPU (dry run)"
    data = {
        "command": command_line(),
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "deepspeed": deepspeed_version,
        "steps": opts.steps,
        "runs": runs,
        "overhead_exit_code": overhead,
        "relay_exit_code": relay,
    }
    with locked_json(opts.out_dir / "gpu_checks.json", {}) as stored:
        stored.clear()
        stored.update(data)
    update_section(opts.results_md, "gpu_checks", report(data))
    ok = all(run.get("ok") for run in runs.values()) and overhead in (None, 0) and relay in (None, 0)
    print(
        f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; wrote {opts.out_dir / 'gpu_checks.json'} and "
        f"{opts.results_md}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
