"""The timm examples run end to end on a CPU, offline: a few steps each, one and two processes, resume, bad input."""

import importlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

import hf_autowu
from hf_autowu.cli import main as hf_autowu_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ACCELERATE_SCRIPT = EXAMPLES / "train_timm_accelerate.py"
TRAINER_SCRIPT = EXAMPLES / "train_timm_trainer.py"
CLASSES = ("cat", "dog", "fox")
TRAIN_PER_CLASS = 8  # 24 training images: 6 steps per epoch at batch 4 on one process, 3 on two
BATCH = 4


# `accelerate launch --cpu --num_processes 2` starts a single process; on a machine without GPUs `--multi_gpu` starts
# two (torchrun), which form a group (gloo) only when the script is told to use the CPU (`--cpu`, `--use_cpu`).
def two_processes() -> list[str]:
    """`accelerate launch` of two processes on a free port: tests running side by side (pytest-xdist) must not share
    Accelerate's default port 29500, or their process groups mix up and abort."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    return [*launch, "--main_process_port", str(port)]


# AutoWU options given on the command line of the folder runs, checked in the scheduler's saved state
AUTOWU_OPTIONS = {"confidence": 0.9, "patience": 2, "cooldown_fraction": 0.3}
needs_trainer_callback = pytest.mark.skipif(
    not hasattr(hf_autowu, "AutoWUCallback"), reason="hf_autowu.AutoWUCallback does not exist yet"
)


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny ImageNet-layout dataset: train/ and val/ with one folder of 16x16 PNGs per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", 2)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) // 2 + 40 * label
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of the example processes: offline, this checkout's hf_autowu, a private datasets cache."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf_datasets_cache")),
        "PYTHONPATH": pythonpath,
        "TQDM_DISABLE": "1",
    }


def run_example(command: list[str], env: dict[str, str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    # the examples leave a multi-process run with `os._exit` (`timm_data.leave_process_group`), so gloo's teardown
    # abort (see `helpers.torchrun`) cannot end them: an abort here is a regression
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == expect_rc, (
        f"exit code {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-5000:]}"
    )
    return result


def folder_args(image_folders: tuple[Path, Path]) -> list[str]:
    return ["--train-dir", str(image_folders[0]), "--val-dir", str(image_folders[1])]


def read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def autowu_flags(style: str) -> list[str]:
    """`AUTOWU_OPTIONS` as flags; `style`: "dash" (the Accelerate example) or "underscore" (the Trainer example)."""
    flags = []
    for name, value in AUTOWU_OPTIONS.items():
        flags += [f"--{name.replace('_', '-') if style == 'dash' else name}", str(value)]
    return flags


def assert_options_reached(config: dict) -> None:
    """The saved AutoWU options are those given on the command line."""
    assert {name: config[name] for name in AUTOWU_OPTIONS} == AUTOWU_OPTIONS


# ---------------------------------------------------------------- the Accelerate example


@pytest.fixture(scope="module")
def accelerate_folder_run(image_folders, example_env, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Three epochs of test_resnet on the image folders, one process, a checkpoint every epoch, TensorBoard on."""
    output_dir = tmp_path_factory.mktemp("accelerate_folder")
    command = [sys.executable, str(ACCELERATE_SCRIPT), *folder_args(image_folders), "--model", "test_resnet"]
    command += ["--image-size", "32", "--batch-size", str(BATCH), "--epochs", "3", "--output-dir", str(output_dir)]
    command += ["--checkpointing-steps", "6", "--log-every", "1", *autowu_flags("dash")]
    return output_dir, run_example(command, example_env)


@pytest.mark.slow
def test_accelerate_folder_one_process(accelerate_folder_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, result = accelerate_folder_run
    assert "AutoWU summary: switch_step=" in result.stdout
    summary = read_summary(output_dir)
    assert summary["steps"] == len(summary["lr"]) == 18
    assert 0.0 <= summary["top1"] <= summary["top5"] <= 100.0
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_12", "step_18", "step_6"]
    tags = EventAccumulator(str(output_dir / "autowu")).Reload().Tags()["scalars"]
    assert {"autowu/phase", "autowu/lr", "train/loss", "eval/top1", "eval/top5"} <= set(tags)
    # the AutoWU flags reached the scheduler: its checkpointed state (the first object registered for checkpointing)
    state = torch.load(output_dir / "checkpoints" / "step_6" / "custom_checkpoint_0.pkl", weights_only=True)
    assert_options_reached(state["config"])
    # the switch is announced, and the figure written
    assert result.stdout.count("AutoWU: warmup ended after ") == 1 and (output_dir / "autowu.png").is_file()
    assert ("Rewound to the state of step" in result.stdout) == (summary["rewound_to"] is not None)


@pytest.mark.slow
def test_replay_reads_the_accelerate_example_tensorboard_folder(accelerate_folder_run, capsys):
    """`hf-autowu replay OUTPUT_DIR` reads the example's TensorBoard run (beside Accelerate's hyperparameter sub-run),
    takes `autowu/lr` as the LR and infers the budget from it."""
    output_dir, _ = accelerate_folder_run
    options = [f"--{name.replace('_', '-')}={value}" for name, value in AUTOWU_OPTIONS.items()]
    assert hf_autowu_cli(["replay", str(output_dir), *options]) == 0
    out = capsys.readouterr().out
    assert "learning rate: logged" in out and "budget inferred from the logged LRs: 18 steps" in out


@pytest.mark.slow
def test_accelerate_resume_reproduces_lr_trajectory(accelerate_folder_run, image_folders, example_env, tmp_path):
    reference_dir, _ = accelerate_folder_run
    command = [sys.executable, str(ACCELERATE_SCRIPT), *folder_args(image_folders), "--model", "test_resnet"]
    command += ["--image-size", "32", "--batch-size", str(BATCH), "--epochs", "3", "--output-dir", str(tmp_path)]
    command += ["--resume", str(reference_dir / "checkpoints" / "step_6"), "--report-to", "none"]
    command += autowu_flags("dash")
    result = run_example(command, example_env)
    assert "Resuming from" in result.stdout
    resumed, reference = read_summary(tmp_path), read_summary(reference_dir)
    assert resumed["lr"] == reference["lr"]
    for key in ("switch_step", "peak_lr", "top1", "top5"):
        assert resumed[key] == reference[key]


@pytest.mark.slow
def test_accelerate_embedded_digits_efficientnet(example_env, tmp_path):
    """The embedded digits, with a moving average of the weights (`--model-ema-decay`), evaluated beside the model."""
    command = [sys.executable, str(ACCELERATE_SCRIPT), "--model", "test_efficientnet", "--batch-size", "32"]
    command += ["--epochs", "1", "--max-train-steps", "4", "--output-dir", str(tmp_path), "--report-to", "none"]
    result = run_example(command + ["--model-ema-decay", "0.9"], example_env)
    assert "AutoWU summary: switch_step=" in result.stdout
    summary = read_summary(tmp_path)
    assert summary["steps"] == len(summary["lr"]) == 4
    assert 0.0 <= summary["ema_top1"] <= 100.0 and "(EMA top-1 " in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", ["accelerate", pytest.param("trainer", marks=needs_trainer_callback)], ids=["accelerate", "trainer"]
)
def test_layer_decay_scales_each_layer_group(script, image_folders, example_env, tmp_path):
    """`--layer-decay`: timm's layer groups, each at AutoWU's LR times its `lr_scale` (the head at the full LR), in
    the optimizer state the example checkpoints after the first of two epochs (6 steps each)."""
    command = [sys.executable, str(ACCELERATE_SCRIPT if script == "accelerate" else TRAINER_SCRIPT)]
    command += [*folder_args(image_folders), "--model", "test_resnet", "--image-size", "32", "--layer-decay", "0.5"]
    if script == "accelerate":
        command += ["--batch-size", str(BATCH), "--epochs", "2", "--checkpointing-steps", "6"]
        optimizer_file = tmp_path / "checkpoints" / "step_6" / "optimizer.bin"
    else:
        command += ["--per_device_train_batch_size", str(BATCH), "--num_train_epochs", "2", "--use_cpu"]
        optimizer_file = tmp_path / "checkpoint-6" / "optimizer.pt"
    run_example([*command, "--output-dir", str(tmp_path), "--report-to", "none"], example_env)
    groups = torch.load(optimizer_file, weights_only=True)["param_groups"]
    scales = sorted({group["lr_scale"] for group in groups})
    assert scales[-1] == 1.0 and scales[0] <= 0.5**3  # one factor 0.5 per layer group below the head
    head_lr = next(group["lr"] for group in groups if group["lr_scale"] == 1.0)
    assert head_lr > 0
    for group in groups:
        assert group["lr"] == pytest.approx(head_lr * group["lr_scale"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_two_processes(image_folders, example_env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [*two_processes(), str(ACCELERATE_SCRIPT), *folder_args(image_folders), "--model", "test_resnet"]
    command += ["--image-size", "32", "--batch-size", str(BATCH), "--epochs", "2", "--output-dir", str(tmp_path)]
    command += ["--log-every", "2", "--cpu", "--checkpointing-steps", "3"]
    result = run_example(command, example_env)
    assert result.stdout.count("AutoWU summary: switch_step=") == 1
    summary = read_summary(tmp_path)
    assert summary["steps"] == len(summary["lr"]) == 2 * 3  # the 24 images are shared out: 3 batches per process
    # the logged loss, averaged over both processes at every second step (a collective on each of them)
    losses = EventAccumulator(str(tmp_path / "autowu")).Reload().Scalars("train/loss")
    assert [event.step for event in losses] == [2, 4, 6]
    # the checkpoint after the first epoch keeps process 1's own AutoWU state beside the main process's, and both
    # processes resumed from it repeat the uninterrupted run's LRs
    checkpoint = tmp_path / "checkpoints" / "step_3"
    assert (checkpoint / "custom_checkpoint_0.pkl").is_file() and (checkpoint / "autowu_rank1.pt").is_file()
    resumed_dir = tmp_path / "resumed"
    resume = [arg if arg != str(tmp_path) else str(resumed_dir) for arg in command[: command.index("--log-every")]]
    run_example([*resume, "--cpu", "--report-to", "none", "--resume", str(checkpoint)], example_env)
    resumed = read_summary(resumed_dir)
    assert resumed["lr"] == summary["lr"] and resumed["switch_step"] == summary["switch_step"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_streaming_two_processes(image_folders, example_env, tmp_path):
    # a streamed image folder has no split sizes in its metadata (unless an earlier run of this module cached them),
    # so the size is given: the test must not depend on which tests ran before it
    command = [*two_processes(), str(ACCELERATE_SCRIPT), *folder_args(image_folders), "--streaming"]
    command += ["--train-samples", str(TRAIN_PER_CLASS * len(CLASSES))]
    command += ["--model", "test_resnet", "--image-size", "32", "--batch-size", str(BATCH), "--epochs", "2"]
    command += ["--output-dir", str(tmp_path), "--report-to", "none", "--cpu"]
    run_example(command, example_env)
    summary = read_summary(tmp_path)
    assert summary["steps"] == len(summary["lr"]) == 2 * 3  # each process streams its half: 12 images, 3 batches


# ---------------------------------------------------------------- the Trainer example


@pytest.mark.slow
@needs_trainer_callback
def test_trainer_folder_one_process(image_folders, example_env, tmp_path):
    command = [sys.executable, str(TRAINER_SCRIPT), *folder_args(image_folders), "--model", "test_resnet"]
    command += ["--image_size", "32", "--per_device_train_batch_size", str(BATCH), "--num_train_epochs", "2"]
    command += ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", *autowu_flags("underscore")]
    result = run_example(command, example_env)
    assert "AutoWU summary: switch_step=" in result.stdout
    assert (tmp_path / "checkpoint-12").is_dir()
    # the AutoWU flags reached the scheduler (the callback's options are saved with the Trainer's state)
    trainer_state = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())
    assert_options_reached(trainer_state["stateful_callbacks"]["AutoWUCallback"]["args"])
    assert "AutoWU: warmup ended after " in result.stderr and (tmp_path / "autowu.png").is_file()


@pytest.mark.slow
@needs_trainer_callback
def test_trainer_embedded_digits_efficientnet(example_env, tmp_path):
    command = [sys.executable, str(TRAINER_SCRIPT), "--model", "test_efficientnet"]
    command += ["--per_device_train_batch_size", "32", "--max_steps", "4", "--output_dir", str(tmp_path)]
    command += ["--report_to", "none", "--save_strategy", "no", "--use_cpu"]
    result = run_example(command, example_env)
    assert "AutoWU summary: switch_step=" in result.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
@needs_trainer_callback
def test_trainer_two_processes(image_folders, example_env, tmp_path):
    command = [*two_processes(), str(TRAINER_SCRIPT), *folder_args(image_folders), "--model", "test_resnet"]
    command += ["--image_size", "32", "--per_device_train_batch_size", str(BATCH), "--num_train_epochs", "2"]
    command += ["--output_dir", str(tmp_path), "--report_to", "none", "--save_strategy", "no", "--use_cpu"]
    result = run_example(command, example_env)
    assert result.stdout.count("AutoWU summary: switch_step=") == 1
    assert "steps=6" in result.stdout


# ---------------------------------------------------------------- bad input: one line, exit code 2


@pytest.fixture
def import_example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Import an example script as a module; afterwards forget the Accelerate state its `main` created."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield importlib.import_module
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def bad_input_cases(image_folders: tuple[Path, Path], tmp_path: Path, style: str) -> list[tuple[list[str], str]]:
    """(arguments, expected part of the error line); `style`: "dash" (argparse) or "underscore" (HfArgumentParser)."""

    def flag(name: str) -> str:
        return f"--{name.replace('-', '_')}" if style == "underscore" else f"--{name}"

    train, val = (str(p) for p in image_folders)
    empty = tmp_path / "empty"
    empty.mkdir()
    return [
        ([flag("val-dir"), val], "--train-dir is missing"),
        ([flag("train-dir"), str(empty / "nope"), flag("val-dir"), val], "is not a directory"),
        ([flag("train-dir"), str(empty), flag("val-dir"), str(empty)], "no images found"),
        ([flag("train-dir"), train, flag("val-dir"), val, "--model", "no_such_model"], "unknown timm model"),
        (
            [flag("train-dir"), train, flag("val-dir"), val, "--model", "test_resnet", flag("layer-decay"), "1.5"],
            "--layer-decay must be in (0, 1]",
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_accelerate_bad_input_in_process(case, image_folders, tmp_path, import_example, capsys):
    example = import_example("train_timm_accelerate")
    resume_args = ["--model", "test_resnet", "--batch-size", str(BATCH), "--resume", "latest"]
    no_checkpoint = ([*folder_args(image_folders), *resume_args], "no checkpoint")
    ema_decay = ([*folder_args(image_folders), "--model-ema-decay", "1.5"], "--model-ema-decay must be in (0, 1)")
    args, expected = [*bad_input_cases(image_folders, tmp_path, "dash"), no_checkpoint, ema_decay][case]
    with pytest.raises(SystemExit) as exit_info:
        example.main([*args, "--output-dir", str(tmp_path / "out"), "--report-to", "none", "--cpu"])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and expected in error_lines[0]


@needs_trainer_callback
@pytest.mark.parametrize("case", range(5))
def test_trainer_bad_input_in_process(case, image_folders, tmp_path, import_example, capsys):
    example = import_example("train_timm_trainer")
    args, expected = bad_input_cases(image_folders, tmp_path, "underscore")[case]
    with pytest.raises(SystemExit) as exit_info:
        example.main([*args, "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu"])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and expected in error_lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,extra",
    [
        (ACCELERATE_SCRIPT, ["--report-to", "none"]),
        pytest.param(TRAINER_SCRIPT, ["--report_to", "none"], marks=needs_trainer_callback),
    ],
    ids=["accelerate", "trainer"],
)
def test_unreachable_hub_dataset_is_one_line(script, extra, example_env, tmp_path):
    command = [sys.executable, str(script), "--dataset", "ILSVRC/imagenet-1k", *extra]
    command += ["--output-dir" if script == ACCELERATE_SCRIPT else "--output_dir", str(tmp_path)]
    result = run_example(command, example_env, expect_rc=2)
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error: cannot load dataset 'ILSVRC/imagenet-1k' from the Hub" in last_line


# ---------------------------------------------------------------- command lines


def help_text(example: ModuleType, capsys: pytest.CaptureFixture, flag: str = "--help") -> str:
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args([flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@needs_trainer_callback
def test_trainer_example_draws_the_same_weights_for_the_same_seed(import_example):
    example = import_example("train_timm_trainer")
    first, again = (example.build_model("test_resnet", ["a", "b"], seed=3).state_dict() for _ in range(2))
    other = example.build_model("test_resnet", ["a", "b"], seed=4).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_trainer_help_is_readable(import_example, capsys):
    example = import_example("train_timm_trainer")
    out = help_text(example, capsys)
    flat = " ".join(out.split())
    assert len(out.splitlines()) < 280  # AutoWU's options and the usual ones (--help_all: over 600 lines)
    assert "(default: None)" not in flat and not re.search(r"\(default[^()]*\)\.? \(default", flat)
    for ignored in ("--learning_rate", "--lr_scheduler_type", "--warmup_steps"):
        assert re.search(ignored + r"\b[^.]*? Ignored, default or not: AutoWU sets the learning rate", flat), ignored
    for option in ("--confidence", "--patience", "--cooldown_fraction", "--preset", "--min_lr", "--rewind [REWIND]"):
        assert option in out
    assert "--adam_beta1" not in out and "--adam_beta1" in help_text(example, capsys, "--help_all")


def test_accelerate_help_is_readable(import_example, capsys):
    out = help_text(import_example("train_timm_accelerate"), capsys)
    flat = " ".join(out.split())
    assert "(default: None)" not in flat and not re.search(r"\(default[^()]*\)\.? \(default", flat)
    for option in (
        "--confidence",
        "--patience",
        "--cooldown-fraction",
        "--rewind [REWIND]",
        "--no-immediate-cooldown",
    ):
        assert option in out


@needs_trainer_callback
def test_trainer_autowu_flags_reach_the_options(import_example):
    example = import_example("train_timm_trainer")
    flags = [*autowu_flags("underscore"), "--rewind", "false", "--spike_watch", "--seed", "7", "--output_dir", "out"]
    _, _, config, training_args, _ = example.parse_args(flags)
    assert_options_reached(config.to_dict())
    assert config.rewind is False and config.spike_watch is True and config.divergence_guard is None
    assert config.immediate_cooldown is True  # the recipe: decay from the switch (linear for robust, cosine for paper)
    assert config.seed == training_args.seed == 7
    assert type(config) is hf_autowu.AutoWUConfig


def test_accelerate_autowu_flags_reach_the_options(import_example):
    example = import_example("train_timm_accelerate")
    _, autowu, args = example.parse_args([*autowu_flags("dash"), "--no-immediate-cooldown", "--rewind", "--seed", "3"])
    config = autowu.to_config(seed=args.seed)
    assert_options_reached(config.to_dict())
    assert config.immediate_cooldown is False and config.rewind is True and config.seed == 3


@pytest.mark.parametrize("style", ["dash", "underscore"])
def test_invalid_autowu_option_is_one_error_line(style, import_example, capsys):
    if style == "underscore" and not hasattr(hf_autowu, "AutoWUCallback"):
        pytest.skip("hf_autowu.AutoWUCallback does not exist yet")
    example = import_example("train_timm_accelerate" if style == "dash" else "train_timm_trainer")
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--confidence", "1.5"])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "`confidence` must be in (0, 1), got 1.5" in error_lines[0]
