"""AutoWU for the Hugging Face `Trainer`: `AutoWUCallback`, `AutoWUTrainerMixin` and `AutoWUTrainer`.

Both entry points feed AutoWU the training loss of every optimizer step: the sum of what
`Trainer.training_step` returns for the step's micro-batches (each already divided by the number of
micro-batches, or normalised by `num_items_in_batch`), kept on the device. AutoWU averages these losses over
processes itself, once per switch test (and, in warmup with the spike watch, every 4th step, without waiting), so
ordinary steps add no device sync. What must reach
into the Trainer (the step's loss, AutoWU's keys in the log entries, the state written with each checkpoint) is
in `trainer_hooks`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import has_length

from . import trainer_hooks
from .arguments import config_for_run
from .config import AutoWUConfig, resolve_config
from .distributed import process_rank
from .log_entries import LOG_KEYS, autowu_log_entries, switch_message
from .param_groups import set_group_lr
from .plotting import save_autowu_figure
from .process_files import own_or_main_file, write_own_file
from .rewind import WarmupRewinder
from .saved_state import TRAINER_STATE_KEY, autowu_state_of
from .scheduler import AutoWU

logger = logging.getLogger(__name__)

_UNSUPPORTED_SCHEDULER_TYPES = ("reduce_lr_on_plateau", "greedy")
_DEFAULT_LEARNING_RATE = TrainingArguments.__dataclass_fields__["learning_rate"].default
REWIND_FILE = "autowu_rewind_rank{rank}.pt"
"""Each process's rewind state in a checkpoint folder (snapshots only where that process holds them)."""
SAVED_AT_KEY = "trainer_scheduler_step"
"""In the AutoWU state of a Trainer checkpoint: the `last_epoch` of the Trainer scheduler state it was written into.
A checkpoint whose scheduler state has moved on from it was written by a run without AutoWU that had resumed an
AutoWU checkpoint (a `LambdaLR` keeps and re-saves the AutoWU state it loaded): that state is stale."""
SAVE_FIGURE = True
"""Whether the main process writes `autowu.png` (needs matplotlib) to the output folder at the switch and at the end
of training; set `hf_autowu.trainer.SAVE_FIGURE = False` to skip it (drawing takes about a second)."""


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
                "`training_step` for it (a custom training loop, or a layer-wise optimizer that steps elsewhere). "
                "AutoWU needs the loss of every step; with a custom loop, call `AutoWU.step(loss)` yourself, or "
                "subclass `AutoWUTrainer` and make your loop use `training_step`."
            )
        return self.value


class _TrainerAutoWU(AutoWU):
    """`AutoWU` as the Trainer's `lr_scheduler`.

    The Trainer calls `step()` without a loss right after each update (and DeepSpeed's engine, when it owns the
    stepping, calls it inside the backward pass of the step's last micro-batch, before `training_step` has
    returned that micro-batch's loss). So `step()` only notes that an update happened; `complete_step()`, at
    `on_step_end`, steps AutoWU with the step's whole loss. Nothing reads the LR in between, and the next update
    comes after it. A skipped (fp16 overflow) update is never noted, so it is not a step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *args: Any, step_loss: _StepLoss, **kwargs: Any):
        self._step_loss = step_loss
        self._update_noted = False
        self._warm_up_again: str | None = None  # why, after loading a checkpoint that AutoWU must warm up again on
        self._state_loaded = False  # whether the Trainer loaded a checkpoint's scheduler state into it
        self._steps_before = 0  # the Trainer's optimizer steps before AutoWU (re)started: its step is this + last_step
        super().__init__(optimizer, *args, **kwargs)

    def step(self, loss: torch.Tensor | float | None = None, metric: Any = None) -> None:
        if loss is None and metric is None:
            self._update_noted = True
            return
        super().step(loss, metric)

    def state_dict(self) -> dict[str, Any]:
        """`AutoWU.state_dict()` under `TRAINER_STATE_KEY`, beside what the `LambdaLR` of a plain Trainer needs to
        load it (its `lr_lambdas`, and the step count): `AutoWUCallback` resumes a checkpoint written by
        `AutoWUTrainer`, and a Trainer without AutoWU goes on from the right step of its own schedule (the Trainer's
        step, which after a warm-up again is ahead of AutoWU's own)."""
        trainer_step = self._steps_before + self.last_step
        return {
            "lr_lambdas": [None] * len(self.optimizer.param_groups),
            "last_epoch": trainer_step,
            "_step_count": trainer_step + 1,
            TRAINER_STATE_KEY: {**super().state_dict(), SAVED_AT_KEY: trainer_step},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """`AutoWU.load_state_dict`, for a checkpoint written by either entry point; another scheduler's state (a
        checkpoint written without AutoWU) means warming up again (`warm_up_again`, once the Trainer's step count is
        known)."""
        self._state_loaded = True
        state = autowu_state_of(state_dict)
        if isinstance(state, dict) and "config" not in state and "last_epoch" in state:
            self._warm_up_again = NO_STATE
            return
        if state is not state_dict and _is_stale(state, state_dict.get("last_epoch")):
            self._warm_up_again = STALE_STATE
            return
        super().load_state_dict(state)

    def _load(self, state_dict: dict[str, Any]) -> None:
        """`AutoWU._load` for what this run leaves the saved AutoWU run: the budget less the steps trained before it
        (inside `load_state_dict`'s all or nothing)."""
        steps_before = _steps_before(state_dict)
        self.total_steps = max(self.total_steps - steps_before, 1)
        super()._load(state_dict)
        self._steps_before = steps_before

    def _report_other_options(self, names: list[str]) -> None:
        """Logged, not warned: the Trainer drops warnings while it loads a scheduler."""
        logger.warning(
            f"AutoWU: the checkpoint was written with other options ({', '.join(names)}); the saved ones are used."
        )

    def warm_up_again(self, steps_done: int) -> None:
        """After a checkpoint written without AutoWU was loaded, or a run resumed from one that holds no scheduler
        state (`save_only_model=True`: the Trainer then loads none, silently): warm up again over the budget's
        remaining steps, as `AutoWUCallback` does (nothing otherwise).

        Args:
            steps_done (`int`): The Trainer's optimizer steps so far (its `global_step`).
        """
        if self._warm_up_again is None and steps_done > 0 and not self._state_loaded:
            self._warm_up_again = NO_STATE
        self._state_loaded = False  # a later `train()` resumes from its own checkpoint
        if self._warm_up_again is None:
            return
        remaining = max(self.total_steps - steps_done, 1)
        _log_warming_up_again(self._warm_up_again, remaining)
        self._warm_up_again = None
        self._steps_before = steps_done
        self.restart(remaining)  # listeners that user callbacks attached in on_train_begin stay

    def complete_step(self) -> None:
        """Step AutoWU with the step's loss, if an update was noted since the last call."""
        if self._update_noted:
            self._update_noted = False
            self._step_after_update(self._step_loss.take("AutoWUTrainer"))


def _unwrap_scheduler(scheduler: Any) -> Any:
    """The scheduler inside Accelerate's wrappers (DeepSpeed's `DeepSpeedSchedulerWrapper` included)."""
    known = (AutoWU, torch.optim.lr_scheduler.LRScheduler)
    while not isinstance(scheduler, known) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return scheduler


class _AutoWUEvents(TrainerCallback):
    """What both entry points do around each optimizer step: collect the step's loss, add AutoWU's values to the
    Trainer's log entries (and log once at the switch), capture AutoWU's state and each process's rewind state
    when a checkpoint is written, and (main process) announce the switch and draw `autowu.png`."""

    def __init__(self, trainer: Trainer | None = None) -> None:
        self.step_loss = _StepLoss()
        self.scheduler: AutoWU | None = None
        self._trainer = trainer
        self._log_switch = False

    def _start(self, trainer: Trainer, scheduler: AutoWU, resume_from_checkpoint: str | None) -> None:
        """Watch `scheduler` for this `train()` call (after any checkpoint state was loaded into it)."""
        if isinstance(scheduler, _TrainerAutoWU):
            scheduler.warm_up_again(trainer.state.global_step)
        self._trainer = trainer
        self.scheduler = scheduler
        self.step_loss.reset()
        self._log_switch = False
        if scheduler.config.effective_rewind and scheduler.warmup_steps > 0:
            # with the model its buffers are restored too; one file per process in the checkpoint, not scheduler.pt.
            # (After the switch it only keeps its bookkeeping, e.g. `rewound_to`, for a run resumed then.) The
            # scheduler's own rewinder stays when it is off: it has said so, once.
            rewinder = scheduler.rewinder
            if rewinder is None or rewinder.enabled:
                rewinder = WarmupRewinder(trainer.model, trainer.optimizer, scheduler)
            rewinder.state_key = None
            found = _load_rewind_state(rewinder, resume_from_checkpoint)
            resumed_in_warmup = scheduler.phase == "warmup" and scheduler.last_step > 0
            if not found and resume_from_checkpoint is not None and resumed_in_warmup:
                logger.warning(
                    f"AutoWU: the checkpoint {resume_from_checkpoint} holds no rewind state "
                    f"({REWIND_FILE.format(rank=process_rank())}); the run goes on without the snapshots taken before "
                    "it, so the switch can only restore snapshots taken from now on and the run will differ from an "
                    "uninterrupted one."
                )
        scheduler.add_switch_listener(self._on_switch)
        if scheduler.switched_on_load:  # the resume's budget ended warmup at the load: restore and log as at a switch
            scheduler.switched_on_load = False
            if scheduler.rewinder is not None:
                scheduler.rewinder.on_switch(scheduler)
            self._on_switch(scheduler)

    def _on_switch(self, scheduler: AutoWU) -> None:
        """Log once at the switch; on the main process, one line and the figure."""
        self._log_switch = True
        if not self._trainer.is_world_process_zero():
            return
        logger.warning(switch_message(scheduler))
        _save_figure(scheduler, self._trainer.args.output_dir)

    # ------------------------------------------------------------------ what the hooks call

    def add_step_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss, as `training_step` returned it."""
        self.step_loss.add(loss)

    def add_log_values(self, logs: dict[str, float]) -> None:
        """Add AutoWU's `LOG_KEYS` to the Trainer's training log entries (not to evaluation ones)."""
        if self.scheduler is not None and "loss" in logs:
            logs.update(autowu_log_entries(self.scheduler))

    def before_save(self) -> None:
        """On every process, just before a checkpoint is written: average the untested losses over processes."""
        if self.scheduler is not None:
            self.scheduler.sync_pending_losses()

    def after_save(self, output_dir: str) -> None:
        """On every process, once the checkpoint is written: add this process's rewind state to it."""
        rewinder = self.scheduler.rewinder if self.scheduler is not None else None
        if rewinder is None or rewinder.state_key is not None or self._trainer.args.save_only_model:
            return
        write_own_file(rewinder.state_dict(), output_dir, REWIND_FILE)

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        lr_scheduler: Any = None,
        **kwargs,
    ):
        _, resume = trainer_hooks.find_running_trainer(self)
        self._start(self._trainer, _unwrap_scheduler(lr_scheduler), resume)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.step_loss.reset()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if isinstance(self.scheduler, _TrainerAutoWU):
            self.scheduler.complete_step()
        if self._log_switch:
            self._log_switch = False
            control.should_log = True  # the Trainer's own entry of this step, with AutoWU's values

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            _save_figure(self.scheduler, args.output_dir)


class AutoWUCallback(_AutoWUEvents, ExportableState):
    """Drive the learning rate of a plain `transformers.Trainer` with AutoWU.

    The step budget is the Trainer's (`max_steps`, or epochs times the optimizer steps per epoch after gradient
    accumulation); the steps per epoch set the paper preset's test cadence and the per-epoch options. The
    Trainer's `learning_rate`, `lr_scheduler_type` and warmup settings are ignored: every step uses AutoWU's
    LR (parameter groups keep their configured ratios), and the `learning_rate` the Trainer logs is the LR
    applied at that step. The `LOG_KEYS` join the Trainer's own log entries (at its logging steps, plus one
    entry at the switch), so they reach `log_history` and every `report_to` integration; the main process prints
    one line at the switch and writes `autowu.png` to the output folder then and at the end (see `SAVE_FIGURE`).

    How it works: at `on_train_begin` the callback finds the Trainer that runs it and wraps three of that
    trainer's methods (see `hf_autowu.trainer_hooks`): `training_step` (sums each step's micro-batch losses on
    the device), `log` (adds AutoWU's values) and `_save_checkpoint` (captures AutoWU's state, with the
    cross-process mean of the untested losses, when a checkpoint is written, whatever `save_strategy` decided
    it). It steps AutoWU in `on_optimizer_step` (unless an fp16 overflow skipped the step) and re-applies
    AutoWU's LR after the Trainer's own scheduler has stepped. AutoWU's state travels in the Trainer's
    `scheduler.pt` (rewind snapshots in one `autowu_rewind_rank*.pt` per process), so
    `trainer.train(resume_from_checkpoint=...)` continues the exact LR trajectory with no extra setting;
    `restore_callback_states_from_checkpoint=True` also works (it rebuilds the callback from the options saved
    in `trainer_state.json`, so read `trainer.callback_handler.callbacks` rather than a stale reference). With
    DeepSpeed, a config without a `scheduler` section is fine (with an `optimizer` section, DeepSpeed's engine steps
    the Trainer's scheduler inside the backward pass; the callback overrides it all the same); rewind restores
    DeepSpeed's master partitions and refreshes the model from them (ZeRO 0 to 3; off, with one warning, with NVMe
    offload).

    Args:
        config (`AutoWUConfig` or `dict`, *optional*): The AutoWU options (`AutoWUArguments` take the run's seed).
        **options: Fields of `AutoWUConfig`, overriding `config`'s.

    Example:

    ```python
    from hf_autowu import AutoWUCallback

    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=[AutoWUCallback()])
    trainer.train()
    ```

    Raises:
        `ValueError`: at `on_train_begin`, for a setup AutoWU cannot drive (a DeepSpeed-owned scheduler,
            layer-wise or schedule-free optimizers, `lr_scheduler_type` "reduce_lr_on_plateau"/"greedy", a given
            `ReduceLROnPlateau` or other scheduler that is not a `torch.optim.lr_scheduler.LRScheduler`, an
            `AutoWUTrainer`, or a second `AutoWUCallback` on the same Trainer).
        `RuntimeError`: when the Trainer running the callback cannot be found, or a step went by without
            `training_step`; use `AutoWUTrainer` (or `AutoWUTrainerMixin`) then.
    """

    entry_point = "AutoWUCallback"

    def __init__(self, config: AutoWUConfig | dict[str, Any] | None = None, **options: Any):
        super().__init__()
        self.config = resolve_config(config, options, "config")
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
        trainer, resume = trainer_hooks.find_running_trainer(self)
        if isinstance(trainer, AutoWUTrainerMixin):
            raise ValueError(f"{type(trainer).__name__} already runs AutoWU: remove the AutoWUCallback.")
        autowu_callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoWUCallback)]
        if len(autowu_callbacks) > 1:
            raise ValueError(
                f"The Trainer has {len(autowu_callbacks)} AutoWUCallbacks and one sets the LR: keep one "
                "(`trainer.remove_callback(AutoWUCallback)` removes the first)."
            )
        _refuse_unsupported(trainer, self.entry_point)
        _warn_ignored_schedule_settings(args, self.entry_point)
        trainer_scheduler = _unwrap_scheduler(trainer.lr_scheduler)
        if isinstance(trainer_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "AutoWUCallback cannot drive a ReduceLROnPlateau: the Trainer steps it after evaluation, after AutoWU "
                "has set the LR. Pass `optimizers=(optimizer, None)`."
            )
        if not isinstance(trainer_scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise ValueError(
                f"AutoWUCallback drives the Trainer's scheduler, which must be a torch LRScheduler; got "
                f"{type(trainer_scheduler).__name__}. Pass `optimizers=(optimizer, None)`, or use AutoWUTrainer."
            )
        saved = trainer_scheduler.__dict__.pop(TRAINER_STATE_KEY, None) if state.global_step > 0 else None
        total_steps = state.max_steps
        if state.global_step > 0 and (saved is None or _is_stale(saved, trainer_scheduler.last_epoch)):
            total_steps = max(state.max_steps - state.global_step, 1)
            _log_warming_up_again(NO_STATE if saved is None else STALE_STATE, total_steps)
            saved = None
        elif saved is not None:
            total_steps = max(state.max_steps - _steps_before(saved), 1)
        self.config = config_for_run(self.config, args.seed)  # what `state()` saves: the options this run uses
        scheduler = AutoWU(
            trainer.optimizer,
            _steps_per_epoch(train_dataloader, args),
            total_steps=total_steps,
            config=self.config,
        )
        if saved is not None:
            scheduler.load_state_dict(saved)
        self._trainer_scheduler = trainer_scheduler
        self._start(trainer, scheduler, resume)
        self._set_trainer_lr()
        trainer_hooks.install(trainer, self)
        # a checkpoint saved without this callback has no entry for it, and the next save would fail
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # the LR the Trainer logs for this step is read next: this step's, even where DeepSpeed's engine has just
        # stepped the Trainer's scheduler (a DeepSpeed config with an `optimizer` section)
        self._trainer_scheduler._last_lr = list(self.scheduler.get_last_lr())
        if self._trainer.accelerator.optimizer_step_was_skipped:
            return  # an fp16 overflow skipped the update: not a step, as for the Trainer's own schedulers
        self.scheduler._step_after_update(self.step_loss.take(self.entry_point))  # the Trainer knows its updates

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._set_trainer_lr()
        super().on_step_end(args, state, control, **kwargs)

    def before_save(self) -> None:
        """Average the untested losses, and put AutoWU's state where the Trainer saves its own scheduler."""
        super().before_save()
        self._trainer_scheduler.__dict__[TRAINER_STATE_KEY] = {
            **self.scheduler.state_dict(),
            SAVED_AT_KEY: self._trainer_scheduler.last_epoch,
        }

    def after_save(self, output_dir: str) -> None:
        self._trainer_scheduler.__dict__.pop(TRAINER_STATE_KEY, None)
        super().after_save(output_dir)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        trainer_hooks.uninstall(self._trainer)
        self._trainer = None

    def _set_trainer_lr(self) -> None:
        """Undo the Trainer's scheduler step: AutoWU's LR in the optimizer, and as the LR the Trainer reports."""
        lrs = self.scheduler.get_last_lr()
        for group, lr in zip(self.scheduler.optimizer.param_groups, lrs, strict=True):
            set_group_lr(group, lr)
        self._trainer_scheduler._last_lr = list(lrs)


class AutoWUTrainerMixin:
    """AutoWU as the scheduler of any `Trainer` subclass (TRL's `SFTTrainer`, `DPOTrainer`, ...).

    Put it first in the bases: `class AutoWUSFTTrainer(AutoWUTrainerMixin, SFTTrainer): pass`. It overrides
    `create_scheduler` (the scheduler is an `AutoWU`, saved in and restored from `scheduler.pt`),
    `training_step` (sums each step's micro-batch losses on the device, for AutoWU), `log` (adds AutoWU's values
    to the training log entries), `_save_checkpoint` (averages the untested losses over processes and adds each
    process's rewind state to the checkpoint) and `get_train_dataloader` (records the optimizer steps per epoch).
    The Trainer's `learning_rate`, `lr_scheduler_type` and warmup settings are ignored; the budget is the
    Trainer's. The logged `learning_rate` is the LR applied at each step; the `LOG_KEYS` join the Trainer's own
    log entries (at its logging steps, plus one entry at the switch), and `autowu.png` is written as for
    `AutoWUCallback`. Resuming with `trainer.train(resume_from_checkpoint=...)` continues the exact LR
    trajectory. With DeepSpeed, a config without a `scheduler` section is fine (the engine may step the
    scheduler itself); a `scheduler` section is refused.

    Args:
        *args: The base trainer's positional arguments.
        autowu_config (`AutoWUConfig` or `dict`, *optional*): The AutoWU options (defaults to `AutoWUConfig()`;
            `AutoWUArguments` take the run's seed).
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a class that puts `Trainer` before the mixin in its bases: the Trainer's own methods would run
        instead of the mixin's, and the run would train on the Trainer's schedule without a word."""
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(AutoWUTrainerMixin):
            bases = ", ".join(base.__name__ for base in cls.__bases__)
            raise TypeError(
                f"class {cls.__name__}({bases}): put AutoWUTrainerMixin first in the bases, e.g. "
                f"`class {cls.__name__}(AutoWUTrainerMixin, SFTTrainer)`; after a Trainer class its methods never run."
            )

    def __init__(self, *args: Any, autowu_config: AutoWUConfig | dict[str, Any] | None = None, **kwargs: Any):
        self.autowu_config = resolve_config(autowu_config, {}, "autowu_config")
        self._autowu_events = _AutoWUEvents(trainer=self)
        self._autowu_steps_per_epoch: int | None = None
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.lr_scheduler is not None:
            raise ValueError(f"{name} builds its own AutoWU scheduler: pass `optimizers=(optimizer, None)`.")
        if any(isinstance(callback, AutoWUCallback) for callback in self.callback_handler.callbacks):
            raise ValueError(f"{name} already runs AutoWU: remove the AutoWUCallback.")
        _refuse_unsupported(self, name)
        _warn_ignored_schedule_settings(self.args, name)
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
                config=config_for_run(self.autowu_config, self.args.seed),
                step_loss=self._autowu_events.step_loss,
            )
            self._created_lr_scheduler = True  # the Trainer rebuilds it at the next `train()`
        return self.lr_scheduler

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self._autowu_events.add_step_loss(loss)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        self._autowu_events.add_log_values(logs)
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        self._autowu_events.before_save()
        super()._save_checkpoint(model, trial, *args, **kwargs)
        self._autowu_events.after_save(trainer_hooks.checkpoint_dir(self, trial))


class AutoWUTrainer(AutoWUTrainerMixin, Trainer):
    """A `transformers.Trainer` whose learning rate is scheduled by AutoWU (see `AutoWUTrainerMixin`).

    Args:
        *args: `Trainer`'s positional arguments.
        autowu_config (`AutoWUConfig` or `dict`, *optional*): The AutoWU options (`AutoWUArguments` take the
            run's seed).
        **kwargs: `Trainer`'s keyword arguments (leave `optimizers[1]`, the scheduler, as `None`).

    Example:

    ```python
    from hf_autowu import AutoWUConfig, AutoWUTrainer

    trainer = AutoWUTrainer(model=model, args=args, train_dataset=train_dataset, autowu_config=AutoWUConfig())
    trainer.train()
    ```
    """


NO_STATE = "the checkpoint holds no AutoWU state"
STALE_STATE = "the checkpoint's AutoWU state is stale (a run without AutoWU went on from it)"


def _log_warming_up_again(reason: str, remaining: int) -> None:
    logger.warning(f"AutoWU: {reason}; warming up again over the remaining {remaining} steps.")


def _is_stale(saved: dict[str, Any], last_epoch: Any) -> bool:
    """Whether AutoWU's state in a checkpoint was written into a Trainer scheduler state that has moved on since
    (`SAVED_AT_KEY`); states written before the key existed are taken as they are."""
    written_at = saved.get(SAVED_AT_KEY)
    return written_at is not None and last_epoch is not None and written_at != last_epoch


def _steps_before(saved: Any) -> int:
    """The Trainer's optimizer steps before the AutoWU run of a saved state began: more than 0 when it warmed up
    again mid-run (its Trainer step when saved, `SAVED_AT_KEY`, less its own `last_step`); 0 for states written
    before the key existed."""
    if not isinstance(saved, dict) or saved.get(SAVED_AT_KEY) is None:
        return 0
    return max(int(saved[SAVED_AT_KEY]) - int(saved.get("last_step", 0)), 0)


def _option_value(option: Any) -> str:
    """A `TrainingArguments` choice (`lr_scheduler_type`, `optim`) as its string, whether given as the enum or as a
    string."""
    return str(getattr(option, "value", option))


def _warn_ignored_schedule_settings(args: TrainingArguments, entry_point: str) -> None:
    """One warning (main process) naming the Trainer's schedule settings that AutoWU overrides, when any is set away
    from its default (`learning_rate` included: every parameter group the Trainer builds gets it, so it fixes no
    ratio either)."""
    scheduler_type = _option_value(args.lr_scheduler_type)
    ignored = [f"learning_rate={args.learning_rate!r}"] if args.learning_rate != _DEFAULT_LEARNING_RATE else []
    if args.warmup_steps:
        ignored.append(f"warmup_steps={args.warmup_steps!r}")
    if scheduler_type != "linear":
        ignored.append(f"lr_scheduler_type={scheduler_type!r}")
    if args.lr_scheduler_kwargs:
        ignored.append(f"lr_scheduler_kwargs={args.lr_scheduler_kwargs!r}")
    if ignored and args.process_index == 0:
        logger.warning(
            f"{entry_point} sets the LR of every step: the Trainer's {', '.join(ignored)} "
            f"{'is' if len(ignored) == 1 else 'are'} ignored."
        )


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


def _load_rewind_state(rewinder: WarmupRewinder, checkpoint: str | None) -> bool:
    """Load this process's rewind state from a checkpoint folder (the main process's when this process has none
    there, e.g. after a change of world size), memory-mapped, so that a process that holds no snapshots never reads
    them. Returns whether a rewind state was found."""
    if checkpoint is None:
        return False
    path = own_or_main_file(checkpoint, REWIND_FILE)
    if path is None:
        return False
    rewinder.load_state_dict(torch.load(path, weights_only=True, mmap=True))
    return True


def _refuse_unsupported(trainer: Trainer, entry_point: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise `ValueError` for the setups in which AutoWU cannot own the learning rate."""
    args = trainer.args
    scheduler_type = _option_value(args.lr_scheduler_type)
    if scheduler_type in _UNSUPPORTED_SCHEDULER_TYPES:
        raise ValueError(
            f"{entry_point} sets the LR at every step, which lr_scheduler_type={scheduler_type!r} (stepped on "
            "evaluation metrics) would fight. Leave lr_scheduler_type at its default: AutoWU replaces it."
        )
    optim = _option_value(args.optim)
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
