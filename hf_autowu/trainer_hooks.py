"""The one place where hf_autowu reaches into a running `transformers.Trainer` from outside.

`AutoWUTrainerMixin` overrides `training_step`, `log` and `_save_checkpoint` as a subclass would. A plain
`AutoWUCallback` cannot subclass the Trainer it is given, and no callback hook sees the step's loss, adds keys
to a log entry, or runs on every process just before a checkpoint is written; so at `on_train_begin` it wraps
those three methods on that trainer instance (and unwraps them at `on_train_end`), calling the same code the mixin
calls. It finds the trainer, and the checkpoint a run resumes from, on the call stack of the training loop.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

if TYPE_CHECKING:
    from .trainer import _AutoWUEvents

_WRAPPED = ("training_step", "log", "_save_checkpoint")


def find_running_trainer(callback: TrainerCallback) -> tuple[Trainer, str | None]:
    """The `Trainer` whose training loop is calling `callback` now, and the checkpoint it resumes from (or None).

    Raises:
        `RuntimeError`: when no Trainer running `callback` is on the call stack.
    """
    trainer, resume = None, None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            local = frame.f_locals
            candidate = local.get("self")
            if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
                trainer = trainer or candidate
                if frame.f_code.co_name == "_inner_training_loop":
                    resume = local.get("resume_from_checkpoint")
                    break
            frame = frame.f_back
    finally:
        del frame
    if trainer is None:
        raise RuntimeError(
            f"{type(callback).__name__} found no transformers.Trainer running it, so it cannot get the training "
            "loss. Use AutoWUTrainer (or AutoWUTrainerMixin), or call AutoWU.step(loss) in your own loop."
        )
    return trainer, resume if isinstance(resume, (str, os.PathLike)) else None


def checkpoint_dir(trainer: Trainer, trial: Any = None) -> str:
    """The folder `Trainer._save_checkpoint` writes the current step's checkpoint to."""
    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def install(trainer: Trainer, events: _AutoWUEvents) -> None:
    """Wrap `training_step`, `log` and `_save_checkpoint` of `trainer` (the instance) to call `events`."""
    uninstall(trainer)  # a run that raised never reached on_train_end
    original = {name: getattr(trainer, name) for name in _WRAPPED}

    def training_step(*args: Any, **kwargs: Any) -> Any:
        loss = original["training_step"](*args, **kwargs)
        events.add_step_loss(loss)
        return loss

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        events.add_log_values(logs)
        return original["log"](logs, *args, **kwargs)

    def _save_checkpoint(model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        events.before_save()
        original["_save_checkpoint"](model, trial, *args, **kwargs)
        events.after_save(checkpoint_dir(trainer, trial))

    for name, wrapper in (("training_step", training_step), ("log", log), ("_save_checkpoint", _save_checkpoint)):
        wrapper.autowu_replaced = trainer.__dict__.get(name)  # an instance attribute it shadows, if any
        setattr(trainer, name, wrapper)


def uninstall(trainer: Trainer | None) -> None:
    """Undo `install` (nothing happens when it was not installed)."""
    if trainer is None:
        return
    for name in _WRAPPED:
        wrapper = trainer.__dict__.get(name)
        if wrapper is None or not hasattr(wrapper, "autowu_replaced"):
            continue
        if wrapper.autowu_replaced is None:
            delattr(trainer, name)
        else:
            setattr(trainer, name, wrapper.autowu_replaced)
