"""A tiny regression model, its data and a recorder callback, shared by the Trainer integration tests."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

# A budget of 60 steps: warmup may last 30 steps, over which the LR grows from 1e-4 to 10 (x1.47 a step),
# so AdamW's loss first falls, then blows up, and AutoWU switches well inside the budget.
AUTOWU_OPTIONS = {"min_lr": 1e-4, "max_lr": 10.0, "divergence_guard": False}


class ToyRegressor(nn.Module):
    """y = MLP(x); returns `{"loss", "logits"}` like a transformers model."""

    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.nan_loss = False  # set by `NanLossAt` to make this process's loss NaN

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x).squeeze(-1)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.mse_loss(logits.float(), labels.float())
            if self.nan_loss:
                out["loss"] = out["loss"] * math.nan
        return out


class ToyTokenModel(nn.Module):
    """Per-token classification with `-100` padding that takes `num_items_in_batch`, as transformers LMs do."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None, **kwargs):
        logits = self.head(self.embed(input_ids))
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        total = losses.sum()  # ignored (-100) positions contribute 0
        count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum()
        return {"loss": total / count, "logits": logits, "loss_sum": total, "labelled": labels.ne(-100).sum()}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def regression_data(n: int = 28, dim: int = 8, seed: int = 0) -> ListDataset:
    """`n` samples of a fixed random teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, generator=torch.Generator().manual_seed(1234))
    x = 0.01 * torch.randn(n, dim, generator=g)  # small inputs: batches differ little, the loss is smooth
    y = 3.0 + 0.3 * torch.tanh(x @ teacher)  # mostly an offset: the loss falls smoothly as the LR grows
    return ListDataset([{"x": x[i], "labels": y[i]} for i in range(n)])


def token_data(n: int = 12, length: int = 6, vocab: int = 11, seed: int = 0) -> ListDataset:
    """Sequences whose number of labelled (not -100) positions differs from row to row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = (ids + 1) % vocab
        labels[length - 1 - (i % (length - 1)) :] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return ListDataset(rows)


def training_args(output_dir: str, **overrides: Any) -> TrainingArguments:
    """Quiet CPU defaults: 4-sample batches, gradient accumulation 2, a log line every step."""
    options = {
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 15,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


class StepRecorder(TrainerCallback):
    """Records, per optimizer step, the LR of every parameter group just before `optimizer.step()` and the
    raw loss of every micro-batch (through a forward hook on the model)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.micro_losses: list[list[torch.Tensor]] = []
        self.outputs: list[list[dict[str, torch.Tensor]]] = []
        self.states: list[dict[str, torch.Tensor]] = []
        self.begin_states: list[dict[str, torch.Tensor]] = []
        self._hooked = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._hooked:
            model.register_forward_hook(self._record_forward)
            self._hooked = True

    def _record_forward(self, module: nn.Module, inputs: Any, output: dict[str, torch.Tensor]) -> None:
        if module.training:
            self.micro_losses[-1].append(output["loss"].detach().clone())
            self.outputs[-1].append({k: v.detach().clone() for k, v in output.items() if v.dim() == 0})

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.micro_losses.append([])
        self.outputs.append([])
        self.begin_states.append(_training_state(model, optimizer))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Keep the model weights and the optimizer's moments after each step."""
        self.states.append(_training_state(model, optimizer))

    def step_losses(self) -> list[torch.Tensor]:
        """Each step's loss as the Trainer returns it: the sum over micro-batches of `loss / micro-batches`."""
        result = []
        for losses in self.micro_losses:
            total = None
            for loss in losses:
                part = loss / len(losses)
                total = part if total is None else total + part
            result.append(total)
        return result


def _training_state(model: nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """A copy of the model's weights and buffers and the optimizer's moments."""
    moments = {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}
    return {k: v.detach().clone() for k, v in {**model.state_dict(), **moments}.items()}


class FakeOverflow(TrainerCallback):
    """Makes the optimizer step of the given (0-based) steps look like an fp16 overflow: the gradients are
    dropped (so the update is a no-op) and accelerate's `optimizer_step_was_skipped` reads True."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer._is_overflow = state.global_step in self.steps
        if optimizer._is_overflow:
            model.zero_grad(set_to_none=True)


class NanLossAt(TrainerCallback):
    """Makes the loss of optimizer step `step` (0-based) NaN on process `rank` only."""

    def __init__(self, step: int, rank: int):
        self.step = step
        self.rank = rank

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.nan_loss = state.global_step == self.step and args.process_index == self.rank
