"""AutoWU for the Hugging Face `Trainer`: `AutoWUCallback`, `AutoWUTrainerMixin` and `AutoWUTrainer`.

Both entry points feed AutoWU the training loss of every optimizer step: the sum of what
`Trainer.training_step` returns for the step's micro-batches (each already divided by the number of
micro-batches, or normalised by `num_items_in_batch`), kept on the device. AutoWU averages these losses over
processes itself, once per switch test, so ordinary steps add no device sync and no collective.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import has_length

from .config import AutoWUConfig
from .log_entries import LOG_KEYS, autowu_log_entries
from .plotting import save_autowu_figure
from .rewind import WarmupRewinder, check_rewindable
from .scheduler import AutoWU

logger = logging.getLogger(__name__)

_UNSUPPORTED_SCHEDULER_TYPES = ("reduce_lr_on_plateau", "greedy")
_STATE_KEY = "autowu_state"  # where AutoWUCallback keeps AutoWU's state inside the Trainer's scheduler
SAVE_FIGURE = True
"""Whether the main process writes `autowu.png` (needs matplotlib) to the output folder at the switch and at the
end of training; set `hf_autowu.trainer.SAVE_FIGURE = False` to skip it (drawing takes about a second)."""


class _StepLoss:
    """The training loss of the current optimizer step: the sum of `training_step`'s returns, on the device."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def reset(self) -> None:
        self.value = None

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().to(torch.float32).reshape(())
        self.value = loss if self.value is None else self.value + loss

    def take(self, entry_point: str) -> torch.Tensor:
        """The step's loss; a clear error when no micro-batch of the step went through `training_step`."""
        if self.value is None:
            raise RuntimeError(
                f"{entry_point} got no training loss for this optimizer step: the Trainer did not call "
                "`training_step` for it (a custom training loop, or a DeepSpeed/layer-wise optimizer that steps "
                "elsewhere). AutoWU needs the loss of every step; with a custom loop, call "
                "`AutoWU.step(loss)` yourself, or subclass `AutoWUTrainer` and make your loop use `training_step`."
            )
        return self.value


class _TrainerAutoWU(AutoWU):
    """`AutoWU` as the Trainer's `lr_scheduler`: the Trainer calls `step()` without a loss, so the loss of the
    step that just ran comes from the `_StepLoss` that `AutoWUTrainerMixin.training_step` fills."""

    def __init__(self, optimizer: torch.optim.Optimizer, *args: Any, step_loss: _StepLoss, **kwargs: Any):
        self._step_loss = step_loss
        super().__init__(optimizer, *args, **kwargs)

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        super().step(self._step_loss.take("AutoWUTrainer") if loss is None else loss)


class _AutoWUEvents(TrainerCallback):
    """What both entry points do around each optimizer step: start the step's loss, log the switch tests,
    average the untested losses over processes before a checkpoint is written, and (main process) announce the
    switch and draw `autowu.png`."""

    def __init__(self, trainer: Trainer | None = None) -> None:
        self.step_loss = _StepLoss()
        self.scheduler: AutoWU | None = None
        self._trainer = trainer
        self._logged_tests = 0
        self._logged_switch = False

    def _start(self, trainer: Trainer, scheduler: AutoWU) -> None:
        """Watch `scheduler` for this `train()` call (after any checkpoint state was loaded into it)."""
        self._trainer = trainer
        self.scheduler = scheduler
        self._logged_tests = len(scheduler.tests)
        self._logged_switch = scheduler.switch_step is not None
        self.step_loss.reset()
        if scheduler.config.effective_rewind and scheduler.rewinder is None:
            check_rewindable(trainer.model_wrapped)
            config = scheduler.config
            WarmupRewinder(
                trainer.model,
                trainer.optimizer,
                scheduler,
                snapshots=config.rewind_snapshots,
                lr_factor=config.rewind_lr_factor,
            )
        if trainer.is_world_process_zero():
            scheduler.add_switch_listener(self._on_switch)

    def _on_switch(self, scheduler: AutoWU) -> None:
        """On the main process: one line, and the figure."""
        logger.warning(
            f"AutoWU: warmup ended after {scheduler.switch_step} steps ({scheduler.switch_reason}); peak LR "
            f"{scheduler.peak_lr:.4g}, decaying to 0 by step {scheduler.total_steps}."
        )
        _save_figure(scheduler, self._trainer.args.output_dir)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        lr_scheduler: AutoWU | None = None,
        **kwargs,
    ):
        self._start(self._trainer, lr_scheduler)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.step_loss.reset()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        scheduler = self.scheduler
        tested = len(scheduler.tests) > self._logged_tests
        switched = scheduler.switch_step is not None and not self._logged_switch
        if tested or switched:
            self._logged_tests = len(scheduler.tests)
            self._logged_switch = scheduler.switch_step is not None
            should_log = control.should_log  # `Trainer.log` clears it: keep the Trainer's own log of this step
            self._trainer.log(autowu_log_entries(scheduler))
            control.should_log = should_log
        if control.should_save:
            scheduler.sync_pending_losses()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if control.should_save:
            self.scheduler.sync_pending_losses()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            _save_figure(self.scheduler, args.output_dir)


class AutoWUCallback(_AutoWUEvents, ExportableState):
    """Drive the learning rate of a plain `transformers.Trainer` with AutoWU.

    The step budget is the Trainer's (`max_steps`, or epochs times the optimizer steps per epoch after gradient
    accumulation); the steps per epoch set the paper preset's test cadence and the per-epoch options. The
    Trainer's `learning_rate`, `lr_scheduler_type` and warmup settings are ignored: every step uses AutoWU's
    LR (parameter groups keep their configured ratios), and the `learning_rate` the Trainer logs is the LR
    applied at that step. At each switch test, and at the switch, the callback logs the `LOG_KEYS` through
    `Trainer.log` (so they reach `log_history` and every `report_to` integration); the main process prints one
    line at the switch and writes `autowu.png` to the output folder then and at the end (see `SAVE_FIGURE`).

    How it works: at `on_train_begin` the callback finds the Trainer that runs it and wraps that trainer's
    `training_step` to sum each step's micro-batch losses on the device; it steps AutoWU in
    `on_optimizer_step` (unless an fp16 overflow skipped the step) and re-applies AutoWU's LR after the
    Trainer's own scheduler has stepped. AutoWU's state travels in the Trainer's `scheduler.pt`, so
    `trainer.train(resume_from_checkpoint=...)` continues the exact LR trajectory with no extra setting;
    `restore_callback_states_from_checkpoint=True` also works (it rebuilds the callback from the options saved
    in `trainer_state.json`, so read `trainer.callback_handler.callbacks` rather than a stale reference).

    Args:
        config (`AutoWUConfig`, *optional*): The AutoWU options.
        **options: Fields of `AutoWUConfig`, overriding `config`'s.

    Example:

    ```python
    from hf_autowu import AutoWUCallback

    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=[AutoWUCallback()])
    trainer.train()
    ```

    Raises:
        `ValueError`: at `on_train_begin`, for a setup AutoWU cannot drive (a DeepSpeed-owned scheduler,
            layer-wise or schedule-free optimizers, `lr_scheduler_type` "reduce_lr_on_plateau"/"greedy", a
            scheduler that is not a `torch.optim.lr_scheduler.LRScheduler`, or an `AutoWUTrainer`).
        `RuntimeError`: when the Trainer running the callback cannot be found, or a step went by without
            `training_step`; use `AutoWUTrainer` (or `AutoWUTrainerMixin`) then.
    """

    entry_point = "AutoWUCallback"

    def __init__(self, config: AutoWUConfig | None = None, **options: Any):
        super().__init__()
        if config is None:
            config = AutoWUConfig(**options)
        elif options:
            config = AutoWUConfig(**{**config.to_dict(), **options})
        self.config = config
        self._trainer_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def state(self) -> dict[str, Any]:
        """The options, for `trainer_state.json` (AutoWU's own state is saved in `scheduler.pt`)."""
        return {"args": self.config.to_dict(), "attributes": {}}

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        train_dataloader: DataLoader | None = None,
        **kwargs,
    ):
        trainer = _find_trainer(self)
        if isinstance(trainer, AutoWUTrainerMixin):
            raise ValueError(f"{type(trainer).__name__} already runs AutoWU: remove the AutoWUCallback.")
        _refuse_unsupported(trainer, self.entry_point)
        trainer_scheduler = trainer.lr_scheduler
        if not isinstance(trainer_scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise ValueError(
                f"AutoWUCallback drives the Trainer's scheduler, which must be a torch LRScheduler; got "
                f"{type(trainer_scheduler).__name__}. Pass `optimizers=(optimizer, None)`, or use AutoWUTrainer."
            )
        saved = trainer_scheduler.__dict__.get(_STATE_KEY) if state.global_step > 0 else None
        total_steps = state.max_steps
        if state.global_step > 0 and saved is None:
            total_steps = max(state.max_steps - state.global_step, 1)
            logger.warning(
                f"AutoWU: the checkpoint holds no AutoWU state; warming up again over the remaining {total_steps} "
                "steps."
            )
        scheduler = AutoWU(
            trainer.optimizer,
            _steps_per_epoch(train_dataloader, args),
            total_steps=total_steps,
            config=self.config,
        )
        if saved is not None:
            scheduler.load_state_dict(saved)
        self._trainer_scheduler = trainer_scheduler
        self._start(trainer, scheduler)
        self._set_trainer_lr()
        _hook_training_step(trainer, self.step_loss)
        # a checkpoint saved without this callback has no entry for it, and the next save would fail
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._trainer.accelerator.optimizer_step_was_skipped:
            return  # an fp16 overflow skipped the update: not a step, as for the Trainer's own schedulers
        self.scheduler.step(self.step_loss.take(self.entry_point))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._set_trainer_lr()
        super().on_step_end(args, state, control, **kwargs)
        if control.should_save:
            self._trainer_scheduler.__dict__[_STATE_KEY] = self.scheduler.state_dict()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_epoch_end(args, state, control, **kwargs)
        if control.should_save:
            self._trainer_scheduler.__dict__[_STATE_KEY] = self.scheduler.state_dict()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        _unhook_training_step(self._trainer)
        self._trainer = None

    def _set_trainer_lr(self) -> None:
        """Undo the Trainer's scheduler step: AutoWU's LR in the optimizer, and as the LR the Trainer reports."""
        lrs = self.scheduler.get_last_lr()
        for group, lr in zip(self.scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._trainer_scheduler._last_lr = list(lrs)


class AutoWUTrainerMixin:
    """AutoWU as the scheduler of any `Trainer` subclass (TRL's `SFTTrainer`, `DPOTrainer`, ...).

    Put it first in the bases: `class AutoWUSFTTrainer(AutoWUTrainerMixin, SFTTrainer): pass`. It overrides
    `create_scheduler` (the scheduler is an `AutoWU`, saved in and restored from `scheduler.pt`),
    `training_step` (sums each step's micro-batch losses on the device, for AutoWU) and `get_train_dataloader`
    (records the optimizer steps per epoch). The Trainer's `learning_rate`, `lr_scheduler_type` and warmup
    settings are ignored; the budget is the Trainer's. The logged `learning_rate` is the LR applied at each
    step; the `LOG_KEYS` are logged at each switch test and at the switch, and `autowu.png` is written as for
    `AutoWUCallback`. Resuming with
    `trainer.train(resume_from_checkpoint=...)` continues the exact LR trajectory.

    Args:
        *args: The base trainer's positional arguments.
        autowu_config (`AutoWUConfig`, *optional*): The AutoWU options (defaults to `AutoWUConfig()`).
        **kwargs: The base trainer's keyword arguments.

    Example:

    ```python
    from trl import SFTTrainer
    from hf_autowu import AutoWUConfig, AutoWUTrainerMixin

    class AutoWUSFTTrainer(AutoWUTrainerMixin, SFTTrainer):
        pass

    trainer = AutoWUSFTTrainer(model=model, args=sft_config, train_dataset=dataset, autowu_config=AutoWUConfig())
    ```

    Raises:
        `ValueError`: for a setup AutoWU cannot drive (a scheduler passed in `optimizers`, a DeepSpeed-owned
            scheduler, layer-wise or schedule-free optimizers, `lr_scheduler_type` "reduce_lr_on_plateau" or
            "greedy", or an `AutoWUCallback` among the callbacks).
    """

    def __init__(self, *args: Any, autowu_config: AutoWUConfig | None = None, **kwargs: Any):
        self.autowu_config = autowu_config if autowu_config is not None else AutoWUConfig()
        self._autowu_events = _AutoWUEvents(trainer=self)
        self._autowu_steps_per_epoch: int | None = None
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.lr_scheduler is not None:
            raise ValueError(f"{name} builds its own AutoWU scheduler: pass `optimizers=(optimizer, None)`.")
        if any(isinstance(callback, AutoWUCallback) for callback in self.callback_handler.callbacks):
            raise ValueError(f"{name} already runs AutoWU: remove the AutoWUCallback.")
        _refuse_unsupported(self, name)
        self.add_callback(self._autowu_events)

    def get_train_dataloader(self) -> DataLoader:
        dataloader = super().get_train_dataloader()
        self._autowu_steps_per_epoch = _steps_per_epoch(dataloader, self.args)
        return dataloader

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> AutoWU:
        """Build the `AutoWU` scheduler for a budget of `num_training_steps` optimizer steps.

        Args:
            num_training_steps (`int`): The step budget (the Trainer's `max_steps`).
            optimizer (`torch.optim.Optimizer`, *optional*): Defaults to the trainer's optimizer.

        Returns:
            `AutoWU`: the scheduler, also stored as `self.lr_scheduler`.
        """
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            _refuse_unsupported(self, type(self).__name__, optimizer)
            self.lr_scheduler = _TrainerAutoWU(
                optimizer,
                self._autowu_steps_per_epoch,
                total_steps=num_training_steps,
                config=self.autowu_config,
                step_loss=self._autowu_events.step_loss,
            )
            self._created_lr_scheduler = True  # the Trainer rebuilds it at the next `train()`
        return self.lr_scheduler

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self._autowu_events.step_loss.add(loss)
        return loss


class AutoWUTrainer(AutoWUTrainerMixin, Trainer):
    """A `transformers.Trainer` whose learning rate is scheduled by AutoWU (see `AutoWUTrainerMixin`).

    Args:
        *args: `Trainer`'s positional arguments.
        autowu_config (`AutoWUConfig`, *optional*): The AutoWU options.
        **kwargs: `Trainer`'s keyword arguments (leave `optimizers[1]`, the scheduler, as `None`).

    Example:

    ```python
    from hf_autowu import AutoWUConfig, AutoWUTrainer

    trainer = AutoWUTrainer(model=model, args=args, train_dataset=train_dataset, autowu_config=AutoWUConfig())
    trainer.train()
    ```
    """


def _save_figure(scheduler: AutoWU, output_dir: str) -> None:
    if not SAVE_FIGURE:
        return
    try:
        save_autowu_figure(scheduler, output_dir)
    except Exception as error:  # a figure must never end a training run
        logger.warning(f"AutoWU: could not draw autowu.png ({error!r}).")


def _steps_per_epoch(dataloader: DataLoader | None, args: TrainingArguments) -> int | None:
    """Optimizer steps per epoch, as the Trainer counts them (None for a dataloader without a length)."""
    if dataloader is None or not has_length(dataloader):
        return None
    return max(math.ceil(len(dataloader) / args.gradient_accumulation_steps), 1)


def _find_trainer(callback: TrainerCallback) -> Trainer:
    """The `Trainer` whose training loop is calling `callback` now (found on the call stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
                return candidate
            frame = frame.f_back
    finally:
        del frame
    raise RuntimeError(
        f"{type(callback).__name__} found no transformers.Trainer running it, so it cannot get the training loss. "
        "Use AutoWUTrainer (or AutoWUTrainerMixin), or call AutoWU.step(loss) in your own loop."
    )


def _hook_training_step(trainer: Trainer, step_loss: _StepLoss) -> None:
    """Make `trainer.training_step` add each micro-batch's returned loss to `step_loss`."""
    _unhook_training_step(trainer)  # a run that raised never reached on_train_end
    original = trainer.training_step

    def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = original(*args, **kwargs)
        step_loss.add(loss)
        return loss

    training_step.autowu_original = original
    training_step.autowu_replaced = trainer.__dict__.get("training_step")
    trainer.training_step = training_step


def _unhook_training_step(trainer: Trainer | None) -> None:
    hook = trainer.__dict__.get("training_step") if trainer is not None else None
    if hook is None or not hasattr(hook, "autowu_original"):
        return
    if hook.autowu_replaced is None:
        del trainer.training_step
    else:
        trainer.training_step = hook.autowu_replaced


def _refuse_unsupported(trainer: Trainer, entry_point: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise `ValueError` for the setups in which AutoWU cannot own the learning rate."""
    args = trainer.args
    scheduler_type = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if scheduler_type in _UNSUPPORTED_SCHEDULER_TYPES:
        raise ValueError(
            f"{entry_point} sets the LR at every step, which lr_scheduler_type={scheduler_type!r} (stepped on "
            "evaluation metrics) would fight. Leave lr_scheduler_type at its default: AutoWU replaces it."
        )
    optim = str(getattr(args.optim, "value", args.optim))
    if "layerwise" in optim or optim in ("lomo", "adalomo"):
        raise ValueError(
            f"{entry_point} cannot drive optim={optim!r}: it updates the weights inside the backward pass, before "
            "the step's loss is known. Use a regular optimizer (e.g. 'adamw_torch')."
        )
    optimizer = trainer.optimizer if optimizer is None else optimizer
    if optim.startswith("schedule_free") or _is_schedule_free(optimizer):
        raise ValueError(
            f"{entry_point} cannot drive a schedule-free optimizer: it has its own warmup and no decay schedule. "
            "Use a regular optimizer (e.g. 'adamw_torch'), or a schedule-free one without AutoWU."
        )
    if "scheduler" in (_deepspeed_config(args) or {}):
        raise ValueError(
            f"{entry_point} cannot drive a scheduler that DeepSpeed owns: remove the 'scheduler' section from the "
            "DeepSpeed config."
        )


def _is_schedule_free(optimizer: torch.optim.Optimizer | None) -> bool:
    while optimizer is not None:
        cls = type(optimizer)
        if "ScheduleFree" in cls.__name__ or cls.__module__.split(".")[0] == "schedulefree":
            return True
        optimizer = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps the real one
    return False


def _deepspeed_config(args: TrainingArguments) -> dict | None:
    hf_deepspeed_config = getattr(args, "hf_deepspeed_config", None)
    if hf_deepspeed_config is not None:
        return hf_deepspeed_config.config
    if isinstance(args.deepspeed, dict):
        return args.deepspeed
    if isinstance(args.deepspeed, str):
        with open(args.deepspeed) as f:
            return json.load(f)
    return None


__all__ = ["LOG_KEYS", "AutoWUCallback", "AutoWUTrainer", "AutoWUTrainerMixin", "autowu_log_entries"]
