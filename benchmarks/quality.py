#!/usr/bin/env python
"""Quality per compute: does AutoWU reach a tuned schedule's quality for less compute than tuning?

Tasks (all offline, sized for a 2-core CPU):

- ``digits_cnn``: scikit-learn's 8x8 digits, a small CNN, hand-written training loop, batch 256
  (4 optimizer steps per epoch over 1077 training images).
- ``timm_digits``: the digits upsampled to 16x16, timm's ``test_efficientnet_gn`` through
  ``TimmWrapperForImageClassification`` and the ``transformers`` Trainer.
- ``gpt2_stdlib``: a tiny GPT-2 (``GPT2Config``, byte-level vocabulary of 256) trained as a causal LM
  with the Trainer on the Python standard library's own ``.py`` sources; scored by validation loss.

Methods (AdamW means betas (0.9, 0.999), eps 1e-8, weight decay 0: the Trainer's defaults):

- ``autowu``: AdamW + ``hf_autowu`` with its defaults (no LR given); in the hand-written loop a
  ``WarmupRewinder`` is attached when the defaults enable rewind (the Trainer integration does that itself).
- ``autowu_paper``: the same with ``preset="paper"`` (the published behaviour).
- ``oracle``: AdamW, linear warmup over 5% of the steps then cosine to 0; peak LR from a grid of 6 values
  10^-4 ... 10^-1 (evenly spaced in log), the one with the best mean validation metric over seeds wins and is
  reported on the test split. Compute: the whole grid.
- ``hf_default``: the Trainer's defaults: AdamW, LR 5e-5, linear decay to 0, no warmup.
- ``schedulefree``: Schedule-Free AdamW at the package defaults (LR 2.5e-3, no warmup), constant schedule
  (``optim="schedule_free_adamw"`` on Trainer tasks).
- ``prodigy``: Prodigy (LR 1.0, package defaults) with cosine decay to 0, no warmup.
- ``lr_finder``: torch-lr-finder range test (AdamW, LR 1e-7 to 10 exponentially over 100 steps, steepest
  descent of the smoothed loss) then the oracle's schedule at the suggested LR. Compute includes the sweep.

Every run is appended to ``results/quality.json`` as soon as it finishes (runs already there are skipped),
so the script can be interrupted and resumed; several processes started with the same (or overlapping)
arguments share the work (each run is claimed in the file before it starts).

Examples::

    python benchmarks/quality.py                                  # everything (resumes)
    python benchmarks/quality.py --tasks digits_cnn --methods autowu,oracle --seeds 0,1
    python benchmarks/quality.py --methods autowu,autowu_paper --redo   # after a change of defaults
    python benchmarks/quality.py --report-only                    # rebuild RESULTS.md and the plots
    python benchmarks/quality.py --smoke --out-dir /tmp/quality   # a few seconds per task
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import command_line, locked_json, machine_info, resolve_output_paths, update_section  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
"""AdamW settings of every AdamW-based method (the Trainer's defaults)."""

ORACLE_GRID = tuple(float(f"{10**e:.3g}") for e in np.linspace(-4.0, -1.0, 6))
WARMUP_FRACTION = 0.05
HF_DEFAULT_LR = 5e-5
SCHEDULEFREE_LR = 2.5e-3
PRODIGY_LR = 1.0
FINDER_START_LR, FINDER_END_LR = 1e-7, 10.0

METHODS: dict[str, str] = {
    "autowu": "AdamW + `AutoWU` defaults (no LR given; rewind attached where the defaults enable it)",
    "autowu_paper": 'AdamW + `AutoWU(preset="paper")`',
    "oracle": "AdamW, 5% linear warmup + cosine, best of 6 peak LRs 1e-4..1e-1 on val",
    "hf_default": "Trainer defaults: AdamW lr 5e-5, linear decay, no warmup",
    "schedulefree": "Schedule-Free AdamW, package defaults (lr 2.5e-3), constant",
    "prodigy": "Prodigy lr 1.0 (defaults) + cosine, no warmup",
    "lr_finder": "LR range test (1e-7..10, 100 steps, steepest slope) + 5% warmup + cosine",
}


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task.

    Attributes:
        name: key used on the command line and in the results.
        title: one-line description for the report.
        steps: optimizer steps of one training run.
        batch_size: training batch size.
        steps_per_epoch: optimizer steps per epoch (the paper's AutoWU tests once per epoch).
        metric: "accuracy" (higher is better) or "loss" (lower is better).
        finder_iters: steps of the LR range test.
        finder_skip: (skip_start, skip_end) when reading the suggestion off the range test.
    """

    name: str
    title: str
    steps: int
    batch_size: int
    steps_per_epoch: int
    metric: str
    finder_iters: int = 100
    finder_skip: tuple[int, int] = (10, 5)


TASKS: dict[str, TaskSpec] = {
    "digits_cnn": TaskSpec(
        "digits_cnn", "sklearn digits, 38k-param CNN, hand-written loop, batch 256 (4 steps/epoch)", 300, 256, 4,
        "accuracy",
    ),
    "timm_digits": TaskSpec(
        "timm_digits", "digits at 16x16, timm test_efficientnet_gn (101k params), Trainer, batch 64", 255, 64, 17,
        "accuracy",
    ),
    "gpt2_stdlib": TaskSpec(
        "gpt2_stdlib", "GPT-2 (2 layers, d=64, 120k params), bytes of the stdlib sources, Trainer, 16x64 tokens",
        300, 16, 20, "loss",
    ),
}


def smoke_task(task: TaskSpec) -> TaskSpec:
    """A tiny version of ``task`` for the smoke test."""
    return replace(task, steps=4 * min(task.steps_per_epoch, 4), steps_per_epoch=min(task.steps_per_epoch, 4),
                   finder_iters=8, finder_skip=(1, 1))


@dataclass
class RunResult:
    """What one training run produced (a grid point of the oracle counts as one run)."""

    val: float
    test: float
    val_loss: float
    test_loss: float
    steps: int
    lrs: list[float]
    losses: list[float]
    compute: int = 0
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- data


@cache
def digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The 1797 digits, pixels scaled to [-1, 1], split 60/20/20 (stratified, fixed seed) into train/val/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 8.0 - 1.0).astype(np.float32)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest)
    return {
        name: (torch.from_numpy(a), torch.from_numpy(b).long())
        for name, a, b in (("train", x_tr, y_tr), ("val", x_va, y_va), ("test", x_te, y_te))
    }


class DictDataset(Dataset):
    """A dataset of dicts of tensors, indexed along the first dimension (what the Trainer expects)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


@cache
def stdlib_bytes() -> dict[str, torch.Tensor]:
    """The top-level ``.py`` files of this Python's standard library as bytes, split by file into train/val/test.

    Files are sorted by name; every tenth file (index % 10 == 0) is validation, index % 10 == 1 is test.
    """
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for i, path in enumerate(files):
        parts["val" if i % 10 == 0 else "test" if i % 10 == 1 else "train"].append(path.read_bytes())
    return {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8).long() for k, v in parts.items()}


class RandomWindows(Dataset):
    """``length`` windows of ``seq_len`` bytes at fresh random offsets: an "epoch" is ``length`` windows.

    The index is ignored; offsets come from the dataset's own seeded generator, so a single-process loader
    sees the same sequence for the same seed.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, length: int, seed: int) -> None:
        self.data, self.seq_len, self.length = data, seq_len, length
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(torch.randint(len(self.data) - self.seq_len, (1,), generator=self.generator))
        window = self.data[start : start + self.seq_len]
        return {"input_ids": window, "labels": window}


def text_chunks(data: torch.Tensor, seq_len: int, count: int) -> DictDataset:
    """``count`` evenly spread, non-overlapping windows of ``seq_len`` bytes (the fixed val/test sets)."""
    starts = torch.linspace(0, len(data) - seq_len, count).long()
    windows = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
    return DictDataset(input_ids=windows, labels=windows)


# --------------------------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a max-pool and a two-layer head (38k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of 1x8x8 images."""
        return self.net(x)


def timm_digits_model() -> nn.Module:
    """timm's ``test_efficientnet_gn`` (GroupNorm, no BatchNorm) for 1-channel images, as a transformers model."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="test_efficientnet_gn", num_labels=10, model_args={"in_chans": 1})
    return TimmWrapperForImageClassification(config)


def gpt2_model() -> nn.Module:
    """A 2-layer GPT-2 with a byte vocabulary, context 64, width 64, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------------------------- methods


def warmup_steps(total_steps: int) -> int:
    """Linear-warmup length of the oracle schedule."""
    return max(1, round(WARMUP_FRACTION * total_steps))


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first group's step size: ``lr`` (times Prodigy's distance estimate ``d`` where present)."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))


def lr_range_test(
    model: nn.Module, criterion: Callable[..., torch.Tensor], batches: Any, task: TaskSpec
) -> tuple[float, int, dict[str, list[float]]]:
    """Run torch-lr-finder's exponential range test, then restore the model to its initial weights.

    Args:
        model: module called as ``model(inputs)``.
        criterion: ``criterion(outputs, labels)`` -> scalar loss.
        batches: a DataLoader or a ``TrainDataLoaderIter``.
        task: gives the number of steps and the skips for the suggestion.

    Returns:
        (suggested LR, steps taken (the test may stop early on divergence), the sweep's LR and smoothed loss).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch_lr_finder import LRFinder

    optimizer = torch.optim.AdamW(model.parameters(), lr=FINDER_START_LR, **ADAMW)
    finder = LRFinder(model, optimizer, criterion)
    with contextlib.redirect_stdout(io.StringIO()):
        finder.range_test(batches, start_lr=FINDER_START_LR, end_lr=FINDER_END_LR, num_iter=task.finder_iters)
        fig, ax = plt.subplots()
        _, suggestion = finder.plot(*task.finder_skip, ax=ax, suggest_lr=True)
        plt.close(fig)
    finder.reset()
    history = {"lrs": [float(v) for v in finder.history["lr"]], "losses": [float(v) for v in finder.history["loss"]]}
    return float(suggestion), len(history["lrs"]), history


def autowu_options(method: str) -> dict[str, Any]:
    """Keyword arguments that select the AutoWU behaviour of ``method``."""
    return {"preset": "paper"} if method == "autowu_paper" else {}


def autowu_info(scheduler: Any) -> dict[str, Any]:
    """The AutoWU decisions worth keeping: switch step and reason, chosen peak LR, rewind, number of tests."""
    return {
        "switch_step": scheduler.switch_step,
        "peak_lr": scheduler.peak_lr,
        "switch_reason": scheduler.switch_reason,
        "rewound_to": getattr(getattr(scheduler, "rewinder", None), "rewound_to", None),
        "n_tests": len(scheduler.tests),
        "phase": scheduler.phase,
    }


# -------------------------------------------------------------------------------- hand-written loop


def loop_optimizer(
    method: str, model: nn.Module, task: TaskSpec, peak_lr: float | None
) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer and scheduler of ``method`` for a hand-written loop (scheduler None: constant LR)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    params = list(model.parameters())
    if method in ("autowu", "autowu_paper"):
        from hf_autowu import AutoWU, WarmupRewinder

        optimizer = torch.optim.AdamW(params, **ADAMW)
        epochs = task.steps // task.steps_per_epoch
        scheduler = AutoWU(optimizer, task.steps_per_epoch, epochs, **autowu_options(method))
        config = scheduler.config
        if config.effective_rewind:  # what the Trainer integration does; a hand-written loop attaches it itself
            WarmupRewinder(model, optimizer, scheduler, snapshots=config.rewind_snapshots,
                           lr_factor=config.rewind_lr_factor)
        return optimizer, scheduler
    if method in ("oracle", "lr_finder"):
        assert peak_lr is not None
        optimizer = torch.optim.AdamW(params, lr=peak_lr, **ADAMW)
        return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps(task.steps), task.steps)
    if method == "hf_default":
        optimizer = torch.optim.AdamW(params, lr=HF_DEFAULT_LR, **ADAMW)
        return optimizer, get_linear_schedule_with_warmup(optimizer, 0, task.steps)
    if method == "schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=SCHEDULEFREE_LR), None
    if method == "prodigy":
        from prodigyopt import Prodigy

        optimizer = Prodigy(params, lr=PRODIGY_LR)
        return optimizer, get_cosine_schedule_with_warmup(optimizer, 0, task.steps)
    raise ValueError(f"unknown method {method!r}")


def _set_optimizer_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """Switch a Schedule-Free optimizer between its train and eval weights (no-op for others)."""
    mode = getattr(optimizer, "train" if train else "eval", None)
    if callable(mode):
        mode()


def _endless(loader: DataLoader) -> Iterator[Any]:
    """Cycle through a DataLoader forever, reshuffling each epoch."""
    while True:
        yield from loader


@torch.no_grad()
def _classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on a tensor split."""
    logits = model(x)
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


def run_digits_cnn(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """Train the digits CNN with ``method`` in a hand-written loop and score it on val and test."""
    splits = digits_splits()
    x_train, y_train = splits["train"]
    torch.manual_seed(seed)
    model = DigitsCNN()
    info: dict[str, Any] = {}
    sweep_steps = 0
    if method == "lr_finder":
        sweep_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=task.batch_size, shuffle=True,
                                  drop_last=True, generator=torch.Generator().manual_seed(seed + 10_000))
        peak_lr, sweep_steps, info["sweep"] = lr_range_test(model, nn.CrossEntropyLoss(), sweep_loader, task)
        info["suggested_lr"] = peak_lr
    optimizer, scheduler = loop_optimizer(method, model, task, peak_lr)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=task.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = _endless(loader)
    is_autowu = method.startswith("autowu")
    lrs, losses = [], []
    model.train()
    _set_optimizer_mode(optimizer, train=True)
    for _ in range(task.steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        lrs.append(effective_lr(optimizer))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if is_autowu:
            scheduler.step(loss.detach())
        elif scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    if is_autowu:
        info.update(autowu_info(scheduler))
    model.eval()
    _set_optimizer_mode(optimizer, train=False)
    val, val_loss = _classify(model, *splits["val"])
    test, test_loss = _classify(model, *splits["test"])
    return RunResult(val, test, val_loss, test_loss, task.steps, lrs, losses, task.steps + sweep_steps, info)


# --------------------------------------------------------------------------------------- Trainer tasks


class _LossOf(nn.Module):
    """Wraps a transformers model so that ``module(batch_dict)`` returns its loss (for torch-lr-finder)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own loss on a batch dict that holds ``labels``."""
        return self.model(**batch).loss


def _dict_batches(loader: DataLoader) -> Any:
    """A torch-lr-finder iterator over dict batches: inputs are the dict, labels its ``labels``."""
    from torch_lr_finder import TrainDataLoaderIter

    class DictBatches(TrainDataLoaderIter):
        def inputs_labels_from_batch(self, batch_data: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
            return batch_data, batch_data["labels"]

    return DictBatches(loader)


def _accuracy(eval_pred: Any) -> dict[str, float]:
    """compute_metrics for classification: top-1 accuracy."""
    logits, labels = eval_pred
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def trainer_method_settings(
    method: str, task: TaskSpec, peak_lr: float | None
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """TrainingArguments overrides, extra Trainer kwargs and extra callbacks that select ``method``."""
    if method in ("autowu", "autowu_paper"):
        from hf_autowu import AutoWUCallback

        return {}, {}, [AutoWUCallback(**autowu_options(method))]
    if method in ("oracle", "lr_finder"):
        return {"learning_rate": peak_lr, "lr_scheduler_type": "cosine",
                "warmup_steps": warmup_steps(task.steps)}, {}, []
    if method == "hf_default":
        return {}, {}, []
    if method == "schedulefree":
        return {"optim": "schedule_free_adamw", "learning_rate": SCHEDULEFREE_LR,
                "lr_scheduler_type": "constant"}, {}, []
    if method == "prodigy":
        from prodigyopt import Prodigy

        return ({"learning_rate": PRODIGY_LR, "lr_scheduler_type": "cosine"},
                {"optimizer_cls_and_kwargs": (Prodigy, {"lr": PRODIGY_LR})}, [])
    raise ValueError(f"unknown method {method!r}")


def run_with_trainer(
    task: TaskSpec,
    method: str,
    seed: int,
    peak_lr: float | None,
    make_model: Callable[[], nn.Module],
    datasets: dict[str, Dataset],
    classification: bool,
) -> RunResult:
    """Train ``make_model()`` with the transformers Trainer under ``method``; score it on val and test."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(seed)
    model = make_model()
    info: dict[str, Any] = {}
    sweep_steps = 0
    if method == "lr_finder":
        loader = DataLoader(datasets["finder"], batch_size=task.batch_size, shuffle=True,
                            collate_fn=default_data_collator, generator=torch.Generator().manual_seed(seed + 10_000))
        peak_lr, sweep_steps, info["sweep"] = lr_range_test(
            _LossOf(model), lambda loss, _labels: loss, _dict_batches(loader), task
        )
        info["suggested_lr"] = peak_lr
    overrides, trainer_kwargs, callbacks = trainer_method_settings(method, task, peak_lr)
    lrs: list[float] = []

    class RecordLR(TrainerCallback):
        """Records the step size each optimizer step uses."""

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            lrs.append(effective_lr(optimizer))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=task.steps, per_device_train_batch_size=task.batch_size,
            per_device_eval_batch_size=256, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
            seed=seed, disable_tqdm=True, dataloader_pin_memory=False, prediction_loss_only=not classification,
            **overrides,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=datasets["train"], callbacks=[*callbacks, RecordLR()],
            compute_metrics=_accuracy if classification else None, **trainer_kwargs,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        val = trainer.evaluate(datasets["val"], metric_key_prefix="val")
        test = trainer.evaluate(datasets["test"], metric_key_prefix="test")
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    for callback in callbacks:
        scheduler = getattr(callback, "scheduler", None)
        if scheduler is not None:
            info.update(autowu_info(scheduler))
    key = "accuracy" if classification else "loss"
    return RunResult(
        val[f"val_{key}"], test[f"test_{key}"], val["val_loss"], test["test_loss"], trainer.state.global_step,
        lrs, losses, trainer.state.global_step + sweep_steps, info,
    )


def run_timm_digits(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The timm model on 16x16 digits through the Trainer."""
    splits = digits_splits()

    def images(name: str) -> DictDataset:
        x, y = splits[name]
        return DictDataset(pixel_values=F.interpolate(x, size=16, mode="bilinear", align_corners=False), labels=y)

    datasets: dict[str, Dataset] = {name: images(name) for name in ("train", "val", "test")}
    datasets["finder"] = datasets["train"]
    return run_with_trainer(task, method, seed, peak_lr, timm_digits_model, datasets, classification=True)


def run_gpt2_stdlib(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The tiny GPT-2 on the standard library's bytes through the Trainer (64-byte windows)."""
    text = stdlib_bytes()
    epoch_windows = task.steps_per_epoch * task.batch_size
    datasets: dict[str, Dataset] = {
        "train": RandomWindows(text["train"], 64, epoch_windows, seed),
        "finder": RandomWindows(text["train"], 64, epoch_windows, seed + 10_000),
        "val": text_chunks(text["val"], 64, 256),
        "test": text_chunks(text["test"], 64, 256),
    }
    return run_with_trainer(task, method, seed, peak_lr, gpt2_model, datasets, classification=False)


RUNNERS: dict[str, Callable[[TaskSpec, str, int, float | None], RunResult]] = {
    "digits_cnn": run_digits_cnn,
    "timm_digits": run_timm_digits,
    "gpt2_stdlib": run_gpt2_stdlib,
}


# ------------------------------------------------------------------------------------------ driver


def run_key(task: str, method: str, seed: int, peak_lr: float | None) -> str:
    """Identifier of one run in the results file."""
    return f"{task}|{method}|{seed}|{'' if peak_lr is None else f'{peak_lr:.3g}'}"


def planned_runs(tasks: list[str], methods: list[str], seeds: list[int], grid: tuple[float, ...]) -> list[tuple]:
    """Every (task, method, seed, grid LR or None) to run, cheap methods first."""
    runs = []
    for task in tasks:
        for seed in seeds:
            for method in methods:
                for lr in grid if method == "oracle" else (None,):
                    runs.append((task, method, seed, lr))
    return runs


def task_steps(args: argparse.Namespace, task_name: str) -> int:
    """Steps of one run of ``task_name`` under these options (a recorded run with other steps is stale)."""
    task = TASKS.get(task_name)
    if task is None:
        return -1
    return (smoke_task(task) if args.smoke else task).steps


@cache
def library_revision() -> str:
    """The git commit of this checkout, with ``+dirty`` when ``hf_autowu/`` has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True).stdout.strip()

    dirty = "+dirty" if git("status", "--porcelain", "hf_autowu") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


_EMPTY_RESULTS: dict[str, Any] = {"runs": {}, "commands": [], "claims": {}}
_STARTED = time.time()


def _alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(results_path: Path, key: str, args: argparse.Namespace) -> bool:
    """Reserve run ``key`` for this process; False when it is done or another live process is running it.

    A recorded run counts as done unless its step count differs from the task's (stale), or ``--redo`` was
    given and it finished before this process started. So several processes with the same arguments share the
    work instead of repeating it.
    """
    with locked_json(results_path, _EMPTY_RESULTS) as data:
        run = data["runs"].get(key)
        if run is not None and run["steps"] == task_steps(args, run["task"]):
            if not args.redo or run.get("finished", 0.0) >= _STARTED:
                return False
        claims = data.setdefault("claims", {})
        owner = claims.get(key)
        if owner is not None and owner != os.getpid() and _alive(owner):
            return False
        claims[key] = os.getpid()
        return True


def execute(args: argparse.Namespace, results_path: Path) -> None:
    """Run every planned run that is not in the results file yet (or all of them with ``--redo``)."""
    grid = (1e-3, 1e-2) if args.smoke else ORACLE_GRID
    with locked_json(results_path, _EMPTY_RESULTS) as data:
        command = command_line()
        if command not in data["commands"]:
            data["commands"].append(command)
    planned = planned_runs(args.tasks, args.methods, args.seeds, grid)
    print(f"{len(planned)} runs planned ({results_path})", flush=True)
    for i, (task_name, method, seed, lr) in enumerate(planned, 1):
        key = run_key(task_name, method, seed, lr)
        if not claim(results_path, key, args):
            continue
        task = smoke_task(TASKS[task_name]) if args.smoke else TASKS[task_name]
        start = time.perf_counter()
        result = RUNNERS[task_name](task, method, seed, lr)
        wall = time.perf_counter() - start
        record = {"task": task_name, "method": method, "seed": seed, "grid_lr": lr, "metric": task.metric,
                  "wall_s": round(wall, 2), "revision": library_revision(), "finished": time.time(),
                  **result.__dict__}
        for name in ("lrs", "losses"):
            record[name] = [float(f"{v:.6g}") for v in record[name]]
        with locked_json(results_path, _EMPTY_RESULTS) as data:
            data["runs"][key] = record
            data.setdefault("claims", {}).pop(key, None)
        print(f"[{i}/{len(planned)}] {task_name} {method} seed={seed} lr={lr} val={result.val:.4f} "
              f"test={result.test:.4f} {wall:.1f}s {result.info.get('peak_lr', '')}", flush=True)


# ------------------------------------------------------------------------------------------ report


def _score(value: float | None, metric: str) -> float:
    """Sortable score, higher is better; missing/non-finite values rank last."""
    if value is None or not math.isfinite(value):
        return -math.inf
    return value if metric == "accuracy" else -value


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and method: the runs that count (the oracle's best grid LR), their metrics and compute."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in [t for t in TASKS if any(r["task"] == t for r in runs)]:
        task_runs = [r for r in runs if r["task"] == task]
        metric = task_runs[0]["metric"]
        out[task] = {}
        for method in METHODS:
            chosen = [r for r in task_runs if r["method"] == method]
            if not chosen:
                continue
            extra: dict[str, Any] = {}
            compute = [r["compute"] for r in chosen]
            if method == "oracle":
                by_lr: dict[float, list[dict]] = {}
                for r in chosen:
                    by_lr.setdefault(r["grid_lr"], []).append(r)
                best = max(by_lr, key=lambda lr: np.mean([_score(r["val"], metric) for r in by_lr[lr]]))
                per_seed_compute: dict[int, int] = {}
                for r in chosen:
                    per_seed_compute[r["seed"]] = per_seed_compute.get(r["seed"], 0) + r["compute"]
                compute = list(per_seed_compute.values())
                extra = {"lr": best, "grid_points": len(by_lr)}
                chosen = by_lr[best]
            elif method in ("autowu", "autowu_paper"):
                extra = {"lr": _geo_mean([r["info"].get("peak_lr") for r in chosen])}
            elif method == "lr_finder":
                extra = {"lr": _geo_mean([r["info"].get("suggested_lr") for r in chosen])}
            out[task][method] = {
                "metric": metric, "runs": sorted(chosen, key=lambda r: r["seed"]),
                "test": [r["test"] for r in chosen], "val": [r["val"] for r in chosen],
                "compute": float(np.mean(compute)), "wall_s": sum(r["wall_s"] for r in runs
                                                                  if r["task"] == task and r["method"] == method),
                **extra,
            }
    return out


def _geo_mean(values: list[float | None]) -> float | None:
    """Geometric mean of the positive finite values (None if there are none)."""
    good = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return float(np.exp(np.mean(np.log(good)))) if good else None


def _mean_std(values: list[float | None], scale: float) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of ``values`` times ``scale``; non-finite values propagate as NaN."""
    arr = np.array([math.nan if v is None else v for v in values], dtype=float) * scale
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _failed(run: dict[str, Any]) -> bool:
    """A run that ended at chance level (accuracy <= 20%) or with a non-finite / chance-level (ln 256) loss."""
    value = run["test"]
    if value is None or not math.isfinite(value):
        return True
    return value <= 0.2 if run["metric"] == "accuracy" else value >= 0.95 * math.log(256)


def _notes(method: str, row: dict[str, Any]) -> str:
    """Per-method notes: AutoWU's switch (mean step, reasons) and the code revision(s) of its runs."""
    if method not in ("autowu", "autowu_paper"):
        return ""
    steps = [r["info"].get("switch_step") for r in row["runs"]]
    steps = [s for s in steps if s is not None]
    reasons = sorted({str(r["info"].get("switch_reason")) for r in row["runs"]})
    revisions = sorted({r.get("revision", "?") for r in row["runs"]})
    switch = f"switch at step {np.mean(steps):.0f}" if steps else "no switch"
    rewound = sum(r["info"].get("rewound_to") is not None for r in row["runs"])
    return f"{switch} ({', '.join(reasons)}); rewound {rewound}/{len(row['runs'])}; rev {', '.join(revisions)}"


def report(summary: dict[str, dict[str, dict[str, Any]]], commands: list[str]) -> str:
    """The Markdown section: one table per task, then where each AutoWU variant stands against each method."""
    lines = ["## Quality per compute (`benchmarks/quality.py`)", "",
             "Reproduce: `python benchmarks/quality.py` (all tasks, methods and seeds; resumable). The runs below "
             "came from these invocations, in order (several ran side by side as workers; a later `--redo` replaced "
             "the rows it re-ran, and the `rev` note gives the code revision of each AutoWU row): "
             + "; ".join(f"`{c}`" for c in commands), "",
             f"Machine: {machine_info()}. The machine was shared with other jobs (load average up to about 13 on 2 "
             "cores), so wall times are inflated, vary between rows, and are only roughly comparable.", "",
             "Metric: test accuracy (%) for the digits tasks, test loss (nats per byte) for GPT-2; mean ± std over "
             "seeds (n). Failed: runs that ended at chance level (accuracy <= 20%, or loss >= 0.95 ln 256, or "
             "non-finite). Compute: optimizer steps per seed, including every grid point and LR sweep. Gap: method "
             "minus oracle on test (positive = better than the oracle for accuracy, worse for loss). LR: peak LR "
             "used (oracle: chosen grid point; AutoWU: LR chosen at the switch; finder: suggestion; geometric mean "
             "over seeds). Wall: seconds for all seeds together.", ""]
    for task, methods in summary.items():
        spec = TASKS[task]
        is_acc = spec.metric == "accuracy"
        scale, digits = (100.0, 2) if is_acc else (1.0, 4)
        steps = next(iter(methods.values()))["runs"][0]["steps"]
        lines += [f"### {task}: {spec.title}, {steps} steps per run", "",
                  "| method | settings | test | val | n | failed | compute (steps) | gap to oracle | LR | wall (s) | "
                  "notes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        oracle_mean = _mean_std(methods["oracle"]["test"], scale)[0] if "oracle" in methods else math.nan
        for method, row in methods.items():
            test_m, test_s = _mean_std(row["test"], scale)
            val_m, val_s = _mean_std(row["val"], scale)
            gap = "" if method == "oracle" or math.isnan(oracle_mean) else f"{test_m - oracle_mean:+.{digits}f}"
            lr = "" if row.get("lr") is None else f"{row['lr']:.2e}"
            lines.append(
                f"| {method} | {METHODS[method]} | {test_m:.{digits}f} ± {test_s:.{digits}f} | "
                f"{val_m:.{digits}f} ± {val_s:.{digits}f} | {len(row['test'])} | "
                f"{sum(_failed(r) for r in row['runs'])} | {row['compute']:.0f} | {gap} | {lr} | "
                f"{row['wall_s']:.0f} | {_notes(method, row)} |"
            )
        lines += ["", f"![LR and training loss per step, {task}](results/{task}.png)", ""]
    lines += ["### Where AutoWU stands (test metric, mean over seeds; compute per seed)", ""]
    for variant in ("autowu", "autowu_paper"):
        for task, methods in summary.items():
            if variant not in methods:
                continue
            scale, better, unit = (100.0, 1.0, "pp") if TASKS[task].metric == "accuracy" else (1.0, -1.0, "nats")
            mine = methods[variant]
            mean, std = _mean_std(mine["test"], scale)
            parts = []
            for method, row in methods.items():
                if method == variant:
                    continue
                other_mean, other_std = _mean_std(row["test"], scale)
                diff = (mean - other_mean) * better
                word = "ahead of" if diff > 0 else "behind" if diff < 0 else "level with"
                noise = ", within one std" if abs(diff) <= max(std, other_std) else ""
                parts.append(f"{word} {method} by {abs(diff):.2f} {unit}{noise} ({mine['compute']:.0f} vs "
                             f"{row['compute']:.0f} steps)")
            lines.append(f"- **{variant}, {task}**: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, dict[str, Any]]], out_dir: Path, tasks: list[str]) -> None:
    """One PNG per task in ``tasks``: LR and training loss versus step of each method (lowest seed; oracle: chosen
    LR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task, methods in summary.items():
        if task not in tasks:
            continue
        fig, (ax_lr, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.5))
        for method, row in methods.items():
            run = row["runs"][0]
            steps = np.arange(1, len(run["losses"]) + 1)
            lrs = np.array([math.nan if v is None else v for v in run["lrs"]], dtype=float)
            losses = np.array([math.nan if v is None else v for v in run["losses"]], dtype=float)
            ax_lr.plot(np.arange(1, len(lrs) + 1), lrs, label=method)
            ax_loss.plot(steps, losses, label=method, lw=0.8)
        ax_lr.set(yscale="log", xlabel="optimizer step", ylabel="learning rate (Prodigy: lr x d)",
                  title=f"{task}: learning rate (seed {min(r['runs'][0]['seed'] for r in methods.values())})")
        ax_loss.set(yscale="log", xlabel="optimizer step", ylabel="training loss", title=f"{task}: training loss")
        ax_lr.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{task}.png", dpi=90)
        plt.close(fig)


def write_report(results_path: Path, md_path: Path, tasks: list[str]) -> None:
    """Rebuild the RESULTS.md section from the results file, and the plots of ``tasks``."""
    with locked_json(results_path, _EMPTY_RESULTS) as data:
        runs, commands = list(data["runs"].values()), list(data["commands"])
    if not runs:
        return
    summary = summarize(runs)
    plot(summary, results_path.parent, tasks)
    update_section(md_path, "quality", report(summary, commands))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where quality.json and the plots go (default benchmarks/results; --smoke: a temp dir)")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="Markdown file to update (default benchmarks/RESULTS.md, or OUT_DIR/RESULTS.md when "
                        "--out-dir is given)")
    parser.add_argument("--smoke", action="store_true", help="tiny steps, 1 seed, 2-point grid: checks that it runs")
    parser.add_argument("--redo", action="store_true", help="re-run the selected runs even if already recorded")
    parser.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md and the plots")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for name, allowed in (("task", TASKS), ("method", METHODS)):
        unknown = [v for v in getattr(args, name + "s") if v not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {list(allowed)}")
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
        execute(args, results_path)
    write_report(results_path, args.results_md, args.tasks)
    print(f"wrote {args.results_md} and plots in {args.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
