"""Budgets too short for a switch test: the robust preset's ramp reaches its cap (half the budget) before the 20
losses a test needs, so warmup ends there with no estimate from the GP. It then decays from the LR range test's
rule read off the ramp (a tenth of the LR at the lowest loss), not from the LR reached near `max_lr`, which left
every 30-step run at chance level."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_optimizer
from transformers import Trainer, TrainerCallback

import hf_autowu.gp
import hf_autowu.trainer
from hf_autowu import AutoWU, AutoWUCallback, AutoWUTrainer
from hf_autowu.log_entries import switch_message

sys.path.insert(0, str(Path(__file__).parent / "multiprocess"))
from trainer_toy import training_args  # noqa: E402

sklearn_datasets = pytest.importorskip("sklearn.datasets")

MIN_LR, MAX_LR = 1e-5, 1.0


def ramp_lr(step: int, warmup: int) -> float:
    """The exponential ramp's LR at `step`, written out from its definition."""
    return MIN_LR * (MAX_LR / MIN_LR) ** (step / warmup)


def range_test_lr(losses: list[float], warmup: int) -> float:
    """The LR range test's rule, computed independently: the LR of the update that produced the lowest finite loss
    (loss `i` comes from the update at LR `ramp_lr(i - 1)`; the first from `MIN_LR`), divided by 10, at least
    `MIN_LR`."""
    finite = [(value, i) for i, value in enumerate(losses) if math.isfinite(value)]
    if not finite:
        return MIN_LR
    lowest = min(finite)[1]
    return max((ramp_lr(lowest - 1, warmup) if lowest > 0 else MIN_LR) / 10, MIN_LR)


def blow_up_curve(lr: float, generator: torch.Generator) -> float:
    """Falls from 2.3 towards 1 as the LR nears 1e-2, then blows up: a noisy valley in log-LR."""
    distance = math.log10(lr / 1e-2)
    value = 1.0 + 0.3 * distance**2 if distance < 0 else 1.0 + 20.0 * distance**2
    return min(value, 2.3) + 0.05 * float(torch.randn((), generator=generator)) if distance < 0 else value


@pytest.mark.parametrize("total", [4, 8, 20, 30, 38])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_budget_too_short_for_a_test_decays_from_a_tenth_of_the_lowest_losss_lr(total, seed, caplog):
    warmup = total // 2
    scheduler = AutoWU(make_optimizer(), total_steps=total)
    generator = torch.Generator().manual_seed(seed)
    lrs, losses = [], []
    with caplog.at_level(logging.WARNING, logger="hf_autowu.scheduler"):
        for _ in range(total):
            lrs.append(scheduler.get_last_lr()[0])
            losses.append(blow_up_curve(lrs[-1], generator))
            scheduler.step(losses[-1])
    assert scheduler.tests == [] and scheduler.switch_step == warmup and scheduler.switch_reason == "cap"
    assert lrs[:warmup] == pytest.approx([ramp_lr(t, warmup) for t in range(warmup)], rel=1e-12)
    expected = range_test_lr(losses[:warmup], warmup)
    assert scheduler.peak_lr == pytest.approx(expected, rel=1e-12)
    assert scheduler.peak_lr < ramp_lr(warmup - 1, warmup) / 9, "not the LR reached"
    assert lrs[warmup] == pytest.approx(expected, rel=1e-12)
    assert "the LR range test's rule" in caplog.text
    assert "a tenth of the LR at the lowest warmup loss" in switch_message(scheduler)


def test_a_40_step_budget_decays_from_the_gps_estimate_and_says_nothing_of_the_range_test(caplog):
    """At 40 steps the cap comes with the 20 losses a test needs, before any test ran: the GP's estimate is used,
    and neither the warning nor the switch line speaks of the range test's rule."""
    scheduler = AutoWU(make_optimizer(), total_steps=40)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with caplog.at_level(logging.WARNING, logger="hf_autowu.scheduler"):
        while scheduler.phase == "warmup":
            losses.append(blow_up_curve(scheduler.get_last_lr()[0], generator))
            scheduler.step(losses[-1])
    assert scheduler.tests == [] and scheduler.switch_reason == "cap" and scheduler.last_outcome is not None
    assert scheduler.peak_lr == pytest.approx(scheduler.last_outcome.lr_estimate, rel=1e-12)
    assert "range test" not in caplog.text
    assert "lowest warmup loss" not in switch_message(scheduler)


def test_the_paper_preset_still_decays_from_the_lr_reached():
    """The published algorithm is unchanged: at its cap (a loss still falling) it decays from the LR reached
    (`preset="paper"`)."""
    scheduler = AutoWU(make_optimizer(), total_steps=30, preset="paper")
    for t in range(30):
        scheduler.step(2.0 - 0.01 * t)
    assert scheduler.switch_reason == "cap" and scheduler.peak_lr == pytest.approx(ramp_lr(14, 15), rel=1e-12)


def test_a_gp_that_fails_at_the_cap_falls_back_to_the_range_test_rule(monkeypatch):
    """Enough losses for a test, but the GP fails numerically at every one: the cap decays from the range test's
    rule, not from the LR reached."""

    def broken_cholesky(*args, **kwargs):
        raise np.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(hf_autowu.gp.np.linalg, "cholesky", broken_cholesky)
    total, warmup = 100, 25
    scheduler = AutoWU(make_optimizer(), total_steps=total, max_warmup_fraction=0.25)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with pytest.warns(UserWarning, match="failed numerically"):
        while scheduler.phase == "warmup":
            losses.append(blow_up_curve(scheduler.get_last_lr()[0], generator))
            scheduler.step(losses[-1])
    assert scheduler.tests == [] and scheduler.switch_step == warmup and scheduler.switch_reason == "cap"
    assert scheduler.peak_lr == pytest.approx(range_test_lr(losses, warmup), rel=1e-12)


@pytest.mark.parametrize(
    ("options", "lr"),
    [({}, MIN_LR), ({"preset": "paper"}, MAX_LR), ({"max_warmup_fraction": 0.0}, MAX_LR)],
)
def test_a_one_step_budget_trains_at_min_lr_unless_no_warmup_was_asked_for(options, lr):
    """`max_steps=1` (a pipeline's smoke run) leaves no warmup step: the robust preset runs it at `min_lr`, as it
    does two- and three-step budgets, instead of at `max_lr` (1.0, which moves every AdamW weight by about 1); the
    paper's preset, and options that ask for no warmup, keep `max_lr`."""
    optimizer = make_optimizer()
    scheduler = AutoWU(optimizer, total_steps=1, **options)
    assert scheduler.switch_reason == "no_warmup" and optimizer.param_groups[0]["lr"] == lr
    scheduler.step(1.0)
    assert scheduler.last_step == 1 and scheduler.phase == "cooldown"


def test_nothing_finite_at_the_cap_decays_from_min_lr():
    scheduler = AutoWU(make_optimizer(), total_steps=20, spike_watch=False, divergence_guard=False)
    for _ in range(20):
        scheduler.step(math.nan)
    assert scheduler.switch_reason == "cap" and scheduler.peak_lr == MIN_LR


class _DigitsCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.head = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.head(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def test_a_30_step_run_in_the_readme_loop_trains(monkeypatch):
    """The README's hand-written loop, AdamW and AutoWU's defaults, on scikit-learn's digits for 30 steps of 32
    images: the ramp reaches 0.46 at step 14; holding it (the LR reached) left the network at chance (about 10% on
    the held-out images); decaying from the range test's rule, it learns."""
    torch.manual_seed(0)
    digits = sklearn_datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    model = _DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=30)
    for step in range(30):
        x, y = images[32 * step : 32 * (step + 1)], labels[32 * step : 32 * (step + 1)]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(loss)
    assert scheduler.switch_reason == "cap" and scheduler.peak_lr < 0.05
    with torch.no_grad():
        accuracy = (model(images[-500:]).argmax(1) == labels[-500:]).float().mean().item()
    assert accuracy > 0.5


class _StepLosses(TrainerCallback):
    """The LR of every optimizer step (read just before it) and the loss the Trainer logged for it."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.parametrize("entry_point", ["callback", "trainer"])
def test_a_30_step_trainer_run_decays_from_the_range_test_rule(entry_point, tmp_path, monkeypatch):
    """A tiny Llama, 30 Trainer steps with AutoWU's defaults: the LR after the cap is the range test's rule applied
    to the losses the Trainer logged, every LR finite and positive, and the weights finite."""
    from datasets import Dataset
    from lm_toy import TEXT, tiny_llama

    monkeypatch.setattr(hf_autowu.trainer, "SAVE_FIGURE", False)
    recorder = _StepLosses()
    args = training_args(
        str(tmp_path), max_steps=30, per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1
    )
    windows = [[TEXT[(7 * i + k) % len(TEXT)] for k in range(16)] for i in range(120)]
    dataset = Dataset.from_list([{"input_ids": ids, "labels": ids} for ids in windows])
    callback = AutoWUCallback()
    if entry_point == "callback":
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=dataset, callbacks=[recorder, callback])
    else:
        trainer = AutoWUTrainer(model=tiny_llama(), args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    scheduler = callback.scheduler if entry_point == "callback" else trainer.lr_scheduler
    assert scheduler.switch_reason == "cap" and scheduler.switch_step == 15
    assert len(recorder.losses) == 30
    expected = range_test_lr(recorder.losses[:15], 15)
    assert scheduler.peak_lr == pytest.approx(expected, rel=1e-3)  # logged losses are rounded to 4 digits
    assert recorder.lrs[15] == pytest.approx(expected, rel=1e-3)
    assert all(math.isfinite(lr) and lr > 0 for lr in recorder.lrs)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
