#!/usr/bin/env python
"""Held-out checks of AutoWU's decisions: model families and optimizers that no decision setting was chosen on.

Every task of ``quality.py`` trains with AdamW, and its rows chose the LR rule (``slowed_fraction``) and the rewind
gate (``rewind_min_shift``). The tasks here use other optimizers and other model families, all in a plain
hand-written loop with ``AutoWU(optimizer, total_steps=..., model=model)``:

- ``mlp_sgd``: an MLP (64-128-128-10) on the digits of ``quality.py`` (same splits), SGD with momentum 0.9, batch 32,
  400 steps.
- ``bn_cnn_nesterov``: a CNN with BatchNorm (its running statistics are restored with the parameters) on the same
  digits, SGD with Nesterov momentum and weight decay 5e-4, batch 64, 300 steps.
- ``gru_adafactor``: a byte-level GRU language model (1 layer, width 128) on Python's documentation prose (the text of
  ``quality.py``'s fine-tuning task), transformers' Adafactor with an absolute LR, gradients clipped at norm 1,
  16 windows of 64 bytes per step, 300 steps.
- ``gru_adamw``: the same GRU with AdamW (torch's defaults), to tell the model family from the optimizer.
- ``gpt2_lora``: the fine-tuning task of ``quality.py`` (its GPT-2 pretrained on stdlib code, fine-tuned on the
  documentation prose, 200 steps), with PEFT LoRA adapters (rank 8) instead of every weight: the parameters rewind
  measures its shift on are the adapters (under ``--smoke`` the GPT-2 is not pretrained).
- ``t5_adafactor``: a small T5 encoder-decoder (2 + 2 layers, width 64, bytes as tokens) that reads 48 bytes of the
  documentation prose and writes the next 16, with Adafactor at an absolute LR (T5's usual optimizer), 16 windows
  per step, 300 steps: the seq2seq shape of HF training, which no task of ``quality.py`` has.

The oracle is ``quality.py``'s: a grid of peak LRs a factor 2 apart (`methods.grid_lr`), 5% linear warmup + cosine,
the best point chosen on the validation split and reported on test (the grid grows while its best point is at an
end). AutoWU runs with its defaults; to check the rewind gate, with ``rewind_min_shift`` 0 (always restore at the
switch) and 1e9 (never restore unless a blow-up forces it); with ``preset="paper"`` for reference; and with the
``slowed_fraction`` values of ``--fractions``. Runs are recorded in ``results/holdout.json`` (AutoWU's with the
decision fingerprint, so a change to the decision code re-runs them), with each task's ramp for ``--replay``, so
the script resumes.

    python benchmarks/holdout.py                      # writes the `holdout` section of RESULTS.md
    python benchmarks/holdout.py --fractions 0.1,0.3  # also AutoWU with these slowed_fraction values
    python benchmarks/holdout.py --replay '{"rise_margin": 3}'  # the recorded ramps under other options (stdout)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import methods as m  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import locked_json, resolve_output_paths, update_section  # noqa: E402
from report import regret  # noqa: E402
from runner import decision_fingerprint  # noqa: E402
from tasks import digits_splits, docs_bytes, gpt2_model, pretrained_gpt2, text_chunks  # noqa: E402
from torch import nn  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402
from transformers.optimization import Adafactor  # noqa: E402

from hf_autowu import AutoWU, AutoWUConfig  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class HoldoutTask:
    """One held-out task: how to build it, feed it and score it."""

    description: str
    metric: str  # "accuracy" (higher is better) or "loss" (nats per byte, lower is better)
    steps: int
    grid: tuple[float, ...]
    build: Callable[[float], tuple[nn.Module, torch.optim.Optimizer]]  # peak LR -> model, optimizer (seeded before)
    batches: Callable[[int], Iterator[Batch]]  # seed -> endless batches
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    score: Callable[[nn.Module], tuple[float, float]]  # model -> (val, test)
    max_grad_norm: float | None = None


def shuffled(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Iterator[Batch]:
    """Shuffled batches of `batch` examples, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        yield from ((x[i], y[i]) for i in (order[j : j + batch] for j in range(0, len(x) - batch + 1, batch)))


def digits(flat: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`quality.py`'s digits splits, as 64-vectors (`flat`) or 1x8x8 images."""
    return {name: (x.flatten(1) if flat else x, y) for name, (x, y) in digits_splits().items()}


def accuracy(flat: bool) -> Callable[[nn.Module], tuple[float, float]]:
    """A scorer: the model's validation and test accuracy on the digits (as vectors when `flat`)."""

    def score(model: nn.Module) -> tuple[float, float]:
        splits = digits(flat)
        return tuple((model(x).argmax(1) == y).float().mean().item() for x, y in (splits["val"], splits["test"]))

    return score


def classify(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the model's class logits on a batch of (inputs, labels)."""
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def mlp_sgd(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The MLP and its SGD with momentum 0.9."""
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def bn_cnn_nesterov(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The BatchNorm CNN and its SGD with Nesterov momentum 0.9 and weight decay 5e-4."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


class ByteGRU(nn.Module):
    """A byte-level GRU language model: embedding 32, one GRU layer of width 128, a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.gru = nn.GRU(32, 128, batch_first=True)
        self.head = nn.Linear(128, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-byte logits for a batch of byte windows."""
        return self.head(self.gru(self.embed(ids))[0])


SEQ_LEN, TEXT_BATCH = 64, 16


def gru_adafactor(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The GRU and transformers' Adafactor with an absolute LR (no parameter scaling, no relative step)."""
    model = ByteGRU()
    optimizer = Adafactor(model.parameters(), lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return model, optimizer


def gru_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The GRU and torch's AdamW with its defaults."""
    model = ByteGRU()
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def next_byte_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte) on a batch of (inputs, next bytes)."""
    out = model(batch[0])
    logits = getattr(out, "logits", out)  # a `transformers` model's output, or the module's own
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())


PRETRAINED = True  # False under --smoke: LoRA then starts from an untrained GPT-2 (no pretraining run)


def gpt2_lora_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`quality.py`'s GPT-2 pretrained on stdlib code (its fine-tuning task's base model) with PEFT LoRA adapters
    (rank 8, alpha 16, on the attention and MLP projections) and AdamW on the adapters, as `quality.py` sets it."""
    from peft import LoraConfig, get_peft_model

    base = pretrained_gpt2() if PRETRAINED else gpt2_model()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(base, config)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **m.ADAMW)


SOURCE_LEN, TARGET_LEN = 48, 16


def t5_adafactor(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small T5 (2 encoder and 2 decoder layers, width 64, 4 heads, bytes as tokens; byte 0, absent from the prose,
    is its pad and decoder start) and transformers' Adafactor with an absolute LR."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=256,
        d_model=64,
        d_kv=16,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    optimizer = Adafactor(model.parameters(), lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return model, optimizer


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) of the target bytes given the source bytes."""
    return model(input_ids=batch[0], labels=batch[1]).loss


def next_bytes(windows: torch.Tensor) -> Batch:
    """A language model's (inputs, targets) from windows of `SEQ_LEN` + 1 bytes: each byte and the byte after it."""
    return windows[:, :-1], windows[:, 1:]


def continuation(windows: torch.Tensor) -> Batch:
    """A seq2seq model's (source, target) from windows of `SOURCE_LEN` + `TARGET_LEN` bytes."""
    return windows[:, :SOURCE_LEN].contiguous(), windows[:, SOURCE_LEN:].contiguous()


def prose_batches(length: int, split: Callable[[torch.Tensor], Batch], seed: int) -> Iterator[Batch]:
    """`TEXT_BATCH` windows of `length` bytes of the training prose at random offsets per step, `split` into a
    batch."""
    data, generator = docs_bytes()["train"], torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(data) - length, (TEXT_BATCH,), generator=generator)
        yield split(torch.stack([data[s : s + length] for s in starts.tolist()]))


def prose_score(
    length: int, split: Callable[[torch.Tensor], Batch], loss: Callable[[nn.Module, Batch], torch.Tensor]
) -> Callable[[nn.Module], tuple[float, float]]:
    """A scorer: the model's mean `loss` on 128 fixed windows of `length` bytes of the validation and test prose."""

    def score(model: nn.Module) -> tuple[float, float]:
        splits = docs_bytes()
        return tuple(
            loss(model, split(text_chunks(splits[name], length, 128).tensors["input_ids"])).item()
            for name in ("val", "test")
        )

    return score


LM_BATCHES = partial(prose_batches, SEQ_LEN + 1, next_bytes)
LM_SCORE = prose_score(SEQ_LEN + 1, next_bytes, next_byte_loss)
SEQ2SEQ_BATCHES = partial(prose_batches, SOURCE_LEN + TARGET_LEN, continuation)
SEQ2SEQ_SCORE = prose_score(SOURCE_LEN + TARGET_LEN, continuation, seq2seq_loss)


def grid(first: int, count: int = 9) -> tuple[float, ...]:
    """`count` points of `quality.py`'s grid from its `first`-th, a factor 2 apart."""
    return tuple(m.grid_lr(k) for k in range(first, first + count))


TASKS: dict[str, HoldoutTask] = {
    "mlp_sgd": HoldoutTask(
        "MLP 64-128-128-10 on the digits, SGD + momentum 0.9, batch 32, 400 steps",
        "accuracy",
        400,
        grid(7),
        mlp_sgd,
        lambda seed: shuffled(*digits(True)["train"], 32, seed),
        classify,
        accuracy(True),
    ),
    "bn_cnn_nesterov": HoldoutTask(
        "CNN with BatchNorm on the digits, SGD + Nesterov momentum 0.9 + weight decay 5e-4, batch 64, 300 steps",
        "accuracy",
        300,
        grid(6),
        bn_cnn_nesterov,
        lambda seed: shuffled(*digits(False)["train"], 64, seed),
        classify,
        accuracy(False),
    ),
    "gru_adafactor": HoldoutTask(
        "byte-level GRU LM on Python's documentation prose, Adafactor (absolute LR), clip 1.0, 16x64 bytes, 300 steps",
        "loss",
        300,
        grid(1),
        gru_adafactor,
        LM_BATCHES,
        next_byte_loss,
        LM_SCORE,
        max_grad_norm=1.0,
    ),
    "gru_adamw": HoldoutTask(
        "the same GRU LM with AdamW (torch defaults, weight decay 0.01), clip 1.0, 16x64 bytes, 300 steps",
        "loss",
        300,
        grid(1),
        gru_adamw,
        LM_BATCHES,
        next_byte_loss,
        LM_SCORE,
        max_grad_norm=1.0,
    ),
    "gpt2_lora": HoldoutTask(
        "quality.py's pretrained GPT-2 fine-tuned on the documentation prose with PEFT LoRA (rank 8), AdamW, "
        "16x64 bytes, 200 steps",
        "loss",
        200,
        grid(3),
        gpt2_lora_adamw,
        LM_BATCHES,
        next_byte_loss,
        LM_SCORE,
    ),
    "t5_adafactor": HoldoutTask(
        "T5 encoder-decoder (2+2 layers, width 64) continuing 48 bytes of the documentation prose by 16, Adafactor "
        "(absolute LR), clip 1.0, 16 windows, 300 steps",
        "loss",
        300,
        grid(1),
        t5_adafactor,
        SEQ2SEQ_BATCHES,
        seq2seq_loss,
        SEQ2SEQ_SCORE,
        max_grad_norm=1.0,
    ),
}

RAMP = "ramp"
RAMP_OPTIONS = {"patience": 10**6, "divergence_guard": False, "spike_watch": False, "rewind": False}
"""The warmup ramp to its cap with nothing that can end it early: every loss of the ramp is recorded, and up to the
default's switch the ramp trains exactly as the default run does (same seed, same LRs), so `--replay` can feed it to
the real scheduler under any options, as `decisions.py` does with `quality.py`'s ramps."""
REWIND_SETTINGS = {"always restore (rewind_min_shift 0)": 0.0, "never restore (rewind_min_shift 1e9)": 1e9}


def run(task: HoldoutTask, steps: int, seed: int, peak_lr: float | None, **options: float) -> dict[str, Any]:
    """Train once: AutoWU (with `options`) when `peak_lr` is None, else the oracle's schedule to `peak_lr`.

    Returns:
        The validation and test metric, the peak LR, and for AutoWU the switch and what rewind did there.
    """
    torch.manual_seed(seed)
    model, optimizer = task.build(peak_lr or 1.0)
    if peak_lr is None:
        scheduler = AutoWU(optimizer, total_steps=steps, model=model, **options)
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, m.warmup_steps(steps), steps)
    stream = task.batches(seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = task.loss(model, next(stream))
        losses.append(loss.detach())  # read once at the end, not every step
        optimizer.zero_grad()
        loss.backward()
        if task.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.max_grad_norm)
        optimizer.step()
        m.step_scheduler("autowu" if peak_lr is None else "oracle", scheduler, loss)
    model.eval()
    with torch.no_grad():
        val, test = task.score(model)
    result: dict[str, Any] = {"val": val, "test": test, "lr": peak_lr}
    if peak_lr is None:
        rewinder = scheduler.rewinder
        result |= {
            "lr": scheduler.peak_lr,
            "switch_step": scheduler.switch_step,
            "switch_reason": scheduler.switch_reason,
            "rewind_off": rewinder is None or not rewinder.enabled,
            "rewound": rewinder is not None and rewinder.rewound_to is not None,
            "shift": None if rewinder is None or rewinder.kept is None else rewinder.kept["shift"],
            "decision_fingerprint": decision_fingerprint(),
            "losses": torch.stack(losses).tolist(),
        }
    return result


def recorded_run(
    path: Path,
    redo: bool,
    name: str,
    task: HoldoutTask,
    steps: int,
    setting: str,
    seed: int,
    lr: float | None = None,
    **options: float,
) -> dict[str, Any]:
    """`run` for task `name` under `setting` (a grid point when `lr` is given, else AutoWU with `options`): the run
    recorded in `path` (an AutoWU run only if recorded with today's decision code), else a new one, recorded."""
    key = f"{name}|{setting}|{seed}|{steps}"
    with locked_json(path, {"runs": {}}) as data:
        found = data["runs"].get(key)
    current = found is not None and found.get("decision_fingerprint", decision_fingerprint()) == decision_fingerprint()
    if current and not redo:
        return found
    result = run(task, steps, seed, lr, **options)
    with locked_json(path, {"runs": {}}) as data:
        data["runs"][key] = result
    return result


def best_point(task: HoldoutTask, grid_runs: dict[float, list]) -> float:
    """The grid LR with the best mean validation metric."""
    better = max if task.metric == "accuracy" else min
    return better(grid_runs, key=lambda lr: np.mean([r["val"] for r in grid_runs[lr]]))


def best_at_edge(task: HoldoutTask, grid_runs: dict[float, list]) -> float | None:
    """The grid point beyond the best one when that is at an end of the grid (the grid then grows), else None."""
    best = best_point(task, grid_runs)
    k = m.grid_index(best)
    if best == max(grid_runs):
        return m.grid_lr(k + 1)
    return m.grid_lr(k - 1) if best == min(grid_runs) else None


def fmt(value: float, metric: str) -> str:
    """A metric as the report prints it: accuracy in %, loss with 4 decimals."""
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4f}"


def task_report(name: str, task: HoldoutTask, grid_runs: dict[float, list], autowu: dict[str, list]) -> list[str]:
    """One task's table: the grid, then each AutoWU setting's metric, regret, LRs and rewind outcome."""
    best = best_point(task, grid_runs)
    oracle = float(np.mean([r["test"] for r in grid_runs[best]]))
    lines = [
        f"### {name}: {task.description}",
        "",
        "Grid (test): "
        + " · ".join(f"{lr:.3g}: {fmt(np.mean([r['test'] for r in v]), task.metric)}" for lr, v in grid_runs.items())
        + f" (best on validation: {best:.3g}, {fmt(oracle, task.metric)}).",
        "",
        "| AutoWU | test | regret | peak LR per seed | switch (step, reason) | rewind: shift at the switch, outcome |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting, runs in autowu.items():
        values = [r["test"] for r in runs]
        spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
        scale = 100 if task.metric == "accuracy" else 1
        outcome = ", ".join(
            "off"
            if r.get("rewind_off")
            else ("restored" if r["rewound"] else "kept") + ("" if r["shift"] is None else f" ({r['shift']:.2f})")
            for r in runs
        )
        lines.append(
            f"| {setting} | {fmt(np.mean(values), task.metric)} ± {scale * spread:.{2 if scale == 100 else 4}f} | "
            f"{regret(float(np.mean(values)), oracle, task.metric):+.2f} | "
            + ", ".join(f"{r['lr']:.3g}" for r in runs)
            + " | "
            + ", ".join(f"{r['switch_step']} {r['switch_reason']}" for r in runs)
            + f" | {outcome} |"
        )
    return lines + [""]


def replay(losses: list[float], steps: int, **options: Any) -> AutoWU:
    """Feed a recorded ramp's losses to an `AutoWU` for `steps` with `options` (rewind off) until it switches."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, total_steps=steps, rewind=False, **options)
    for loss in losses:
        if scheduler.phase != "warmup":
            break
        scheduler.step(loss)
    return scheduler


def replay_report(
    name: str, task: HoldoutTask, steps: int, ramps: list[dict], grid_runs: dict[float, list], options: dict
) -> str:
    """One line per task: where the replayed scheduler switches, the LR it chooses, and the regret the oracle's grid
    suggests for that LR (its mean test metric interpolated in log2 of the LR: a proxy, as in `decisions.py`)."""
    lrs = np.log2(sorted(grid_runs))
    curve = [np.mean([r["test"] for r in grid_runs[lr]]) for lr in sorted(grid_runs)]
    oracle = float(np.mean([r["test"] for r in grid_runs[best_point(task, grid_runs)]]))
    switched = [replay(ramp["losses"], steps, **options) for ramp in ramps]
    proxies = [regret(float(np.interp(np.log2(s.peak_lr), lrs, curve)), oracle, task.metric) for s in switched]
    return (
        f"{name}: "
        + ", ".join(f"switch {s.switch_step} ({s.switch_reason}) at LR {s.peak_lr:.3g}" for s in switched)
        + f"; proxy regret {np.mean(proxies):+.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument(
        "--fractions", default="", help="comma-separated slowed_fraction values to run besides the default"
    )
    parser.add_argument("--redo", action="store_true", help="re-run the selected runs even if recorded")
    parser.add_argument("--out-dir", type=Path, default=None, help="where holdout.json goes (default results/)")
    parser.add_argument("--results-md", type=Path, default=None, help="Markdown file to update")
    parser.add_argument("--smoke", action="store_true", help="30 steps, 1 seed, 2 grid points: checks that it runs")
    parser.add_argument(
        "--replay",
        default=None,
        metavar="JSON",
        help="instead of writing the report, replay the recorded ramps under these AutoWUConfig options ('{}': the "
        "defaults) and print each task's switches, LRs and proxy regret",
    )
    args = resolve_output_paths(parser.parse_args(argv), "holdout_smoke_")
    global PRETRAINED
    PRETRAINED = not args.smoke
    names = [t for t in args.tasks.split(",") if t]
    if unknown := sorted(set(names) - set(TASKS)):
        parser.error(f"unknown --tasks {unknown}; choose from {list(TASKS)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="hf_autowu")
    results = args.out_dir / "holdout.json"
    default = AutoWUConfig().preset_setting("slowed_fraction")
    settings: dict[str, dict[str, float]] = {f"defaults (slowed_fraction {default})": {}}
    settings |= {label: {"rewind_min_shift": shift} for label, shift in REWIND_SETTINGS.items()}
    settings |= {f"slowed_fraction {float(f)}": {"slowed_fraction": float(f)} for f in args.fractions.split(",") if f}
    settings["paper preset"] = {"preset": "paper"}
    lines = [
        "## Held-out checks (`benchmarks/holdout.py`)",
        "",
        "Model families and optimizers no decision setting was chosen on (every `quality.py` task uses AdamW), each "
        "in a hand-written loop with `AutoWU(optimizer, total_steps=..., model=model)`. Test metric, mean ± std over "
        f"{1 if args.smoke else args.seeds} seeds (accuracy in %, loss in nats per byte); regret in units of 0.5 pp "
        "or 1% of the oracle's loss, as in `quality.py`. The oracle is `quality.py`'s (5% warmup + cosine, best grid "
        "point on validation). Rewind: the shift `||now - snapshot|| / ||snapshot||` where the run kept its steps "
        "(below `rewind_min_shift`); the two rewind rows force each outcome, so they show what the gate's choice "
        f"was worth. AutoWU rows at decision code {decision_fingerprint()}.",
        "",
    ]
    for name in names:
        task = TASKS[name]
        steps, seeds, lrs = (30, 1, task.grid[3:5]) if args.smoke else (task.steps, args.seeds, task.grid)
        one = partial(recorded_run, results, args.redo, name, task, steps)
        grid_runs = {lr: [one(f"oracle {lr:g}", s, lr) for s in range(seeds)] for lr in lrs}
        while not args.smoke and (edge := best_at_edge(task, grid_runs)) is not None:  # as quality.py's oracle
            grid_runs[edge] = [one(f"oracle {edge:g}", s, edge) for s in range(seeds)]
            grid_runs = dict(sorted(grid_runs.items()))
        ramps = [one(RAMP, s, **RAMP_OPTIONS) for s in range(seeds)]
        if args.replay is not None:
            print(replay_report(name, task, steps, ramps, grid_runs, json.loads(args.replay)))
            continue
        autowu = {label: [one(label, s, **options) for s in range(seeds)] for label, options in settings.items()}
        lines += task_report(name, task, grid_runs, autowu)
        print(f"{name}: done")
    if args.replay is None:
        update_section(args.results_md, "holdout", "\n".join(lines))
        print(f"wrote the holdout section of {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
