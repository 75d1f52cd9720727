"""AutoWU on a model under `torch.compile` (backend ``aot_eager``, which runs on the CPU): the hand-written loop with
the compiled module or the original handed to `AutoWU(model=...)`, and the Trainer's `torch_compile=True` through
both entry points. The compiled graph computes what the eager model does, so every LR, the switch, the rewind and the
final weights must be those of the same run without compile, bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from transformers import Trainer

import hf_autowu.trainer
from hf_autowu import AutoWU, AutoWUCallback, AutoWUConfig, AutoWUTrainer

sys.path.insert(0, str(Path(__file__).parent / "multiprocess"))
from trainer_toy import AUTOWU_OPTIONS, StepRecorder, ToyRegressor, regression_data, training_args  # noqa: E402

BACKEND = "aot_eager"  # inductor would need a C++ compiler at test time and rounds differently from eager


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each run compiles its own graphs (a cached graph from another test's model would be reused otherwise)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def digits_run(compiled: bool, hand_compiled_to_autowu: bool) -> tuple[list[float], AutoWU, torch.nn.Module]:
    """The README's hand-written loop on the digits (an MLP with BatchNorm, whose running statistics rewind restores),
    AutoWU's defaults, 160 steps of 64 digits; the model compiled or not. Returns the LR of every step, the
    scheduler and the (uncompiled) model."""
    images, labels = load_digits(return_X_y=True)
    images, labels = torch.tensor(images, dtype=torch.float32) / 16, torch.tensor(labels)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    network = torch.compile(model, backend=BACKEND) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = AutoWU(optimizer, total_steps=160, model=network if hand_compiled_to_autowu else model)
    generator = torch.Generator().manual_seed(0)
    lrs = []
    for _ in range(160):
        batch = torch.randint(len(images), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(network(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(loss)
    return lrs, scheduler, model


@pytest.mark.parametrize("hand_compiled_to_autowu", [False, True], ids=["original-to-autowu", "compiled-to-autowu"])
def test_the_hand_loop_under_compile_decides_and_rewinds_as_without(hand_compiled_to_autowu):
    eager_lrs, eager, eager_model = digits_run(compiled=False, hand_compiled_to_autowu=False)
    lrs, scheduler, model = digits_run(compiled=True, hand_compiled_to_autowu=hand_compiled_to_autowu)
    # the run is one where the defaults switch and restore a snapshot, so that rewind is exercised
    assert eager.switch_step is not None and eager.rewinder.rewound_to is not None
    assert lrs == eager_lrs
    assert (scheduler.switch_step, scheduler.switch_reason) == (eager.switch_step, eager.switch_reason)
    assert scheduler.rewinder.rewound_to == eager.rewinder.rewound_to
    final, eager_final = model.state_dict(), eager_model.state_dict()
    assert final.keys() == eager_final.keys()
    assert all(torch.equal(final[name], eager_final[name]) for name in final)  # BatchNorm's statistics included
    assert lrs[-1] > 0.0 and all(torch.isfinite(torch.tensor(lrs)))


def trainer_run(entry_point: str, output_dir: Path, compiled: bool) -> tuple[list[float], AutoWU, dict]:
    """A Trainer driven by AutoWU through `entry_point`, with `torch_compile=True` or without. Returns the LR applied
    at every step, the scheduler and the final weights."""
    torch.manual_seed(0)
    recorder = StepRecorder()
    compile_args = {"torch_compile": True, "torch_compile_backend": BACKEND} if compiled else {}
    args = training_args(str(output_dir), **compile_args)
    config = AutoWUConfig(**AUTOWU_OPTIONS)
    common = {"model": ToyRegressor(), "args": args, "train_dataset": regression_data()}
    if entry_point == "callback":
        trainer = Trainer(**common, callbacks=[recorder, AutoWUCallback(config)])
        (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoWUCallback)]
    else:
        trainer = AutoWUTrainer(**common, callbacks=[recorder], autowu_config=config)
    trainer.train()
    scheduler = callback.scheduler if entry_point == "callback" else trainer.lr_scheduler
    if compiled:  # the Trainer did compile the model it trained
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    weights = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    return [lrs[0] for lrs in recorder.lrs], scheduler, weights


@pytest.mark.parametrize("entry_point", ["callback", "trainer"])
def test_the_trainers_torch_compile_decides_and_rewinds_as_without(entry_point, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_autowu.trainer, "SAVE_FIGURE", False)
    eager_lrs, eager, eager_weights = trainer_run(entry_point, tmp_path / "eager", compiled=False)
    lrs, scheduler, weights = trainer_run(entry_point, tmp_path / "compiled", compiled=True)
    assert eager.switch_step is not None and eager.rewinder.rewound_to is not None
    assert len(lrs) == 60 and lrs == eager_lrs
    assert scheduler.switch_step == eager.switch_step and scheduler.rewinder.rewound_to == eager.rewinder.rewound_to
    assert weights.keys() == eager_weights.keys()
    assert all(torch.equal(weights[name], eager_weights[name]) for name in weights)
