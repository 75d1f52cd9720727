"""`AutoWU`: the learning-rate scheduler (phase machine and the torch scheduler contract)."""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .accelerate_steps import MICRO_BATCH, UPDATE, AccelerateSteps
from .config import AutoWUConfig, check_optional_positive_int, check_positive_int, is_number, resolve_config
from .distributed import MeanInFlight, broadcast_floats, mean_over_processes, process_rank, world_size
from .join import Joinable, JoinedSteps, join_device, join_enabled, join_process_group, leave_join, notify_join
from .loss_inputs import detach_loss, mean_loss, pending_to_tensor
from .param_groups import configured_lr, lr_scale, set_group_lr
from .ramp import cooldown_factor, warmup_lr
from .rewind import WarmupRewinder, check_ema
from .saved_state import autowu_state_of, check_saved_schedule, config_fields
from .switch_test import SwitchTester, SwitchTestOutcome, fell_over_ramp
from .watch import RELAY_EVERY, LossSpikeWatch

logger = logging.getLogger(__name__)

PHASES = ("warmup", "decay", "cooldown")
_PLATEAU_PATIENCE = 5
_PLATEAU_THRESHOLD = 1e-4
BLOW_UP_BACKOFF = 10.0
"""After a blow-up on a warmup curve with no real descent, decay from the blow-up's LR divided by this; also the
divisor of the LR range test's rule at a cap the GP gives no estimate for (`AutoWU._lr_without_estimate`)."""


class _SwitchCallback:
    """A plain function as a listener: called once, at the switch."""

    def __init__(self, function: Callable[[AutoWU], None]):
        self.function = function

    def on_switch(self, scheduler: AutoWU) -> None:
        self.function(scheduler)


@dataclass
class SwitchTestRecord:
    """One switch test, as kept in `AutoWU.tests`.

    Attributes:
        step (`int`): Optimizer steps done when the test ran.
        probability (`float`): Mean probability that the minimum is in the past.
        votes (`int`): Predictions that voted "past".
        passed (`bool`): Whether the test counts toward the switch: the minimum is confidently in the past, and
            the LR it would choose lies far enough before the end of the history (`SwitchTestOutcome.resolved`).
        lr_estimate (`float`): The LR at the smoothed minimum.
        lr (`float`): The LR of the most recent step.
    """

    step: int
    probability: float
    votes: int
    passed: bool
    lr_estimate: float
    lr: float


class AutoWU(Joinable):
    """Automatic warmup and decay of the learning rate, driven by the training loss.

    The LR grows from `min_lr` (exponentially by default) while a Gaussian process smooths the loss; once
    the smoothed minimum is confidently in the past, the LR jumps to the LR at that minimum and decays to 0
    by the end of the step budget. Call `step(loss)` once after every optimizer step.

    Parameter groups keep their relative learning rates: the computed LR applies to the group(s) with the
    largest LR configured in the optimizer, and every other group is scaled by its configured ratio to it. A group's
    `lr_scale` (timm's layer-wise LR decay, `timm.optim.create_optimizer_v2(..., layer_decay=0.75)`) multiplies its
    ratio, as timm's own schedulers apply it.

    With several processes and uneven inputs, it is a `Joinable`: `with Join([ddp_model, scheduler]):` lets a process
    that runs out of batches keep taking the others' steps (`hf_autowu.join`).

    Args:
        optimizer (`torch.optim.Optimizer`): The optimizer whose LRs are set.
        steps_per_epoch (`int`, *optional*): Optimizer steps per epoch (the reference's second argument).
        total_epochs (`int` or `float`, *optional*): Epochs in the budget.
        total_steps (`int`, *optional*): The step budget; defaults to `steps_per_epoch * total_epochs`.
        config (`AutoWUConfig` or `dict`, *optional*): The options; keyword `options` override its fields.
        model (`torch.nn.Module`, *optional*): The model: with rewind on, its buffers (BatchNorm's statistics) are
            restored with the parameters.
        ema (*optional*): A moving average of the weights kept beside the model (timm's `ModelEmaV3`, torch's
            `AveragedModel`, diffusers' `EMAModel`, or a list of them; see `WarmupRewinder`): with rewind on, it is
            restored with the parameters, so that it leaves out the steps the rewind undoes.
        **options: Any field of `AutoWUConfig` (`min_lr`, `immediate_cooldown`, `preset`, ...).

    Example:

    ```python
    scheduler = AutoWU(optimizer, len(train_loader), total_epochs, immediate_cooldown=True)
    for epoch in range(total_epochs):
        for inputs, targets in train_loader:
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step(loss)
    ```

    Raises:
        `ValueError`: on an invalid budget or option.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int | None = None,
        total_epochs: float | None = None,
        *,
        total_steps: int | None = None,
        config: AutoWUConfig | dict[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        ema: Any = None,
        **options: Any,
    ):
        super().__init__()  # `Joinable`: outside any `Join` context until one is entered
        config = resolve_config(config, options, "config")
        if not hasattr(optimizer, "param_groups"):
            raise ValueError(
                f"`optimizer` must be a torch optimizer (with `param_groups`), got {type(optimizer).__name__}."
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"`model` must be a `torch.nn.Module` or None, got {type(model).__name__}.")
        check_ema(ema)
        self.config = config
        self.optimizer = optimizer
        self.steps_per_epoch = check_optional_positive_int("steps_per_epoch", steps_per_epoch)
        self.total_steps = self._resolve_budget(total_steps, total_epochs)
        if config.warmup_unit == "epoch" and self.steps_per_epoch is None:
            raise ValueError("`warmup_unit='epoch'` needs `steps_per_epoch`.")
        if not config.immediate_cooldown and (config.decay_phase_stat == "loss" or config.decay_phase_factor != 1.0):
            if self.steps_per_epoch is None:
                raise ValueError("`decay_phase_stat`/`decay_phase_factor` act per epoch and need `steps_per_epoch`.")

        configured = [configured_lr(i, group) for i, group in enumerate(optimizer.param_groups)]
        for group, lr in zip(optimizer.param_groups, configured, strict=True):
            # as torch's schedulers record it: a later scheduler on this optimizer (a second `train()`, whose
            # AutoWUTrainer builds a new AutoWU after this one's cooldown left every `lr` at 0) reads the same ratios
            group.setdefault("initial_lr", lr)
        self._top_configured_lr = max(configured)
        self.group_ratios = [self._ratio_of(i, group) for i, group in enumerate(optimizer.param_groups)]

        self._listeners: list[Any] = []
        self._model = model
        self._ema = ema
        self._own_rewinder: WarmupRewinder | None = None  # the rewinder built here: it follows the config
        self._accelerate_steps = AccelerateSteps(optimizer)
        # under `Join`: whether this process ran out of inputs and shadows the steps of the others (`join.py`)
        self.joined = False
        self._start()

    def _start(self) -> None:
        """Set the state of a run that has not stepped yet, for `self.total_steps` steps under `self.config`; builds
        this scheduler's own rewinder when the options ask for one, and sets the first step's LR."""
        config = self.config
        self.warmup_steps = config.warmup_length(self.total_steps)
        self.cooldown_start = config.cooldown_start(self.total_steps)
        self._tester = _make_tester(config)
        self._watch = LossSpikeWatch() if config.effective_spike_watch else None
        self._listener_states: dict[str, Any] = {}  # saved states of listeners not attached (yet)

        self.last_step = 0
        self.phase = "warmup"
        self.switch_step: int | None = None
        self.switch_reason: str | None = None
        self.peak_lr: float | None = None
        # after a blow-up: the step count of the first damaged state (its loss is the first bad one); rewind restores
        # only snapshots taken before it
        self.damaged_from: int | None = None
        # the first non-finite loss of warmup, after which warmup went on (`_retry_after_non_finite`)
        self.retried: dict[str, Any] | None = None
        # warmup ended while a state was loaded (`_replan_budget`): listeners attached after the load (the Trainer's,
        # in `on_train_begin`) have not heard of the switch yet
        self.switched_on_load = False
        self.tests: list[SwitchTestRecord] = []
        self.last_outcome: SwitchTestOutcome | None = None
        # the LR estimate of the latest test before `last_outcome` that saw no rise (`_lr_after_blow_up`)
        self._estimate_before_last: float | None = None
        self._history = torch.empty(0, dtype=torch.float64)
        self._pending: list[torch.Tensor | float | None] = []  # None: a step shadowed under `Join` (`join.py`)
        # in decay with `decay_phase_stat="loss"`: how many of the epoch's pending losses `sync_pending_losses` has
        # already averaged over the processes (they stay pending until the epoch ends)
        self._synced_pending = 0
        # updates that fp16 overflow skipped under Accelerate: not steps, but timm's `num_updates` counts them
        self._skipped_updates = 0
        # with several processes and the spike watch: the oldest pending losses, being averaged (`_relay_losses`)
        self._relay: MeanInFlight | None = None
        self._micro_batch_losses: list[torch.Tensor | float] = []  # of the update under way, under `accumulate`
        self._passes: list[bool] = []
        self._checked = 0  # losses before this index have been through the spike check
        self._spike_at: int | None = None
        self._next_test = self._test_step_after(0) if self.warmup_steps > 0 else 0
        self._lr = config.min_lr
        self._plateau_best = math.inf
        self._plateau_bad_epochs = 0
        self._cooldown_from: tuple[int, float] | None = None
        self.lr_changes: list[tuple[int, float]] = []  # (step, LR) whenever the post-warmup LR is set

        if config.effective_rewind and self.warmup_steps > 0:
            self._own_rewinder = WarmupRewinder(self._model, self.optimizer, self, ema=self._ema)
        if self.warmup_steps <= 0:
            self._enter_decay(step=0, lr=self._lr_without_warmup(), reason="no_warmup")
        self._apply_lr()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> AutoWU:
        """Rebuild a scheduler from its `state_dict()` (e.g. a loaded `scheduler.pt`), to read or plot it.

        Args:
            state (`dict`): What `state_dict()` returned.
            optimizer (`torch.optim.Optimizer`, *optional*): The optimizer to drive; by default a dummy one with
                one parameter group per saved group ratio. Listener states (rewind snapshots) are not restored.

        Returns:
            `AutoWU`: a scheduler in the saved state.

        Raises:
            `ValueError`: when `state` is not an AutoWU state (another scheduler's, or not a dict).
        """
        state = autowu_state_of(state)
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError(
                "AutoWU.from_state_dict: `state` is not an AutoWU scheduler state (no `config`): was it written by "
                "another scheduler?"
            )
        if optimizer is None:
            ratios = state.get("group_ratios") or [1.0]
            optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": ratio} for ratio in ratios], lr=1.0)
        config = AutoWUConfig(**config_fields(state["config"]))
        scheduler = cls(optimizer, state["steps_per_epoch"], total_steps=state["total_steps"], config=config)
        for listener in list(scheduler._listeners):
            scheduler.remove_listener(listener)
        scheduler.load_state_dict({**state, "listeners": {}})
        return scheduler

    # ------------------------------------------------------------------ public API

    def step(self, loss: torch.Tensor | float | None = None, metric: Any = None) -> None:
        """Record the loss of the optimizer step that just ran and set the LR of the next one.

        Args:
            loss (`torch.Tensor` or `float`): The step's training loss. A tensor may live on any device: it is
                only moved to the host at the next switch test (and, for the spike watch, copied to pinned host
                memory without a sync and read one step later; with several processes, averaged over them every
                `RELAY_EVERY` warmup steps by an asynchronous `all_reduce` read one step later), so this call adds
                no device sync. Needed during
                warmup, and every step with `decay_phase_stat="loss"`; may be `None` otherwise.
            metric: Only for timm's training loop, which calls `lr_scheduler.step(epoch, metric)` at the end of
                each epoch: such a call does nothing (AutoWU steps in `step_update`, once per optimizer step).

        In a loop that Accelerate runs, a call is a step only after a real update, as for the schedulers
        `accelerator.prepare` wraps: inside `accelerator.accumulate(model)` the loss of a micro-batch whose
        gradients are only accumulated joins the update's loss (their mean), and an update that fp16 overflow
        skipped is not a step (`accelerate_steps`).
        """
        if metric is not None:
            return
        joining = join_enabled(self)
        if joining:
            notify_join(self)
        kind = self._accelerate_steps.classify()
        if joining and kind != UPDATE:
            other = "a micro-batch of gradient accumulation" if kind == MICRO_BATCH else "an fp16-skipped update"
            raise RuntimeError(
                "AutoWU under `Join` (uneven inputs) needs one optimizer update per forward of the model: a process "
                f"that has joined cannot tell a step from {other}. Accumulate no gradients inside the `Join`, or keep "
                "the processes' batches even (Accelerate's default `even_batches=True`)."
            )
        if kind == UPDATE:
            self._step_after_update(loss)
        elif kind == MICRO_BATCH:
            if self._recording():
                self._micro_batch_losses.append(detach_loss(loss))
        else:  # an update that fp16 overflow skipped: not a step, and its losses are dropped
            self._micro_batch_losses.clear()
            self._skipped_updates += 1

    def _recording(self) -> bool:
        """Whether this step's loss is kept: during warmup, and in decay with `decay_phase_stat="loss"`."""
        return self.phase == "warmup" or (self.phase == "decay" and self.config.decay_phase_stat == "loss")

    def _step_after_update(self, loss: torch.Tensor | float | None, absent: bool = False) -> None:
        """`step(loss)` for a call known to follow an optimizer update (the Trainer integration calls it directly);
        with `absent`, a step this process shadows under `Join` and holds no loss of (`_step_while_joined`)."""
        if self._recording():
            if absent:
                loss = None
            else:
                loss = detach_loss(loss)
                if self._micro_batch_losses:
                    loss = mean_loss([*self._micro_batch_losses, loss])
            self._pending.append(loss)
        self._micro_batch_losses.clear()
        self.last_step += 1
        t = self.last_step
        if self.phase == "warmup":
            relayed = self._watch is not None and world_size() > 1
            if self._watch is not None and not relayed:
                self._spike_at = self._watch.observe(t - 1, self._pending[-1])  # checks loss t - 2
                self._checked = max(self._checked, t - 1)
            elif relayed and t % RELAY_EVERY == 1:  # the averages started a step ago: check them
                self._land_relay()
                self._scan_for_spike()
            if self._spike_at is not None:
                self._switch_on_spike(t)
            elif t >= self.warmup_steps or t >= self.cooldown_start:
                self._end_warmup_at_cap(t)
            elif t >= self._next_test:
                self._run_test(t)
            if relayed and self.phase == "warmup" and t % RELAY_EVERY == 0:
                self._relay_losses()
        elif self.phase == "decay" and self.steps_per_epoch is not None:
            self._maybe_decay_per_epoch(t)
        if self.phase != "cooldown" and t >= self.cooldown_start:
            self._enter_cooldown(t)
        self._apply_lr()
        for listener in self._listeners:
            on_step = getattr(listener, "on_step", None)
            if on_step is not None:
                on_step(self)

    def step_update(self, num_updates: int, metric: torch.Tensor | float | None = None) -> None:
        """timm's per-update scheduler call: `lr_scheduler.step_update(num_updates, metric)` after every optimizer
        step, so that AutoWU drops into a timm training loop.

        Args:
            num_updates (`int`): Optimizer steps done so far (timm's `num_updates`).
            metric (`torch.Tensor` or `float`): The step's training loss. (timm's own `train.py` passes the epoch's
                running mean loss, `losses_m.avg`: AutoWU then smooths an already smoothed, lagging curve; pass the
                step's loss for the decisions the documentation describes.)

        When timm's `train.py` resumes it calls `step_update(start_epoch * updates_per_epoch)`: load AutoWU's
        `state_dict()` first (timm's checkpoint does not hold it), and that call is a no-op.

        Under Accelerate an update that fp16 overflow skipped is not a step (`step`), and timm's `num_updates` still
        counts it: such updates are counted apart, so the next call's `num_updates` follows on.

        Raises:
            `ValueError`: when `num_updates` is not an int or skips steps (AutoWU needs the loss of every step).
        """
        if not isinstance(num_updates, numbers.Integral) or isinstance(num_updates, bool):
            raise ValueError(f"`num_updates` must be an int (timm's count of updates), got {num_updates!r}.")
        counted = self.last_step + self._skipped_updates
        if num_updates <= counted:
            return  # this update was already counted
        if num_updates != counted + 1:
            raise ValueError(
                f"`num_updates` went from {counted} to {num_updates}: AutoWU needs `step_update` after every "
                "optimizer step."
            )
        self.step(metric)

    def get_last_lr(self) -> list[float]:
        """The LR of every parameter group for the next optimizer step."""
        return [self._lr * ratio for ratio in self._current_group_ratios()]

    def lr_at(self, step: int) -> float:
        """The LR (of the largest group) that the schedule gives optimizer step `step`, as known now.

        Exact for every step up to `last_step`; for later steps it is the current plan (before the switch:
        warmup to its cap, then decay from the LR reached), without future decisions.

        Args:
            step (`int`): A step index in [0, total_steps).

        Returns:
            `float`: the learning rate.

        Raises:
            `ValueError`: when `step` is not an int >= 0.
        """
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
        return self._lr_at(int(step))

    def _lr_at(self, step: int) -> float:
        """`lr_at` without checking `step` (the per-step path and `lr_schedule` pass valid ones)."""
        if self.switch_step is not None and step < self.switch_step:
            return self._ramp(step)
        if self.switch_step is None:
            end = min(self.warmup_steps, self.cooldown_start)
            if step < end:
                return self._ramp(step)
            # the plan without a switch: warmup ends at its cap, from the LR reached (the ramp's first when the
            # budget is all cooldown)
            lr0 = self._ramp(max(end - 1, 0))
            start = end if self.config.immediate_cooldown else self.cooldown_start
            if step < start:
                return lr0
            progress = (step - start) / max(self.total_steps - start, 1)
            return lr0 * cooldown_factor(min(progress, 1.0), self.config.effective_cooldown_type)
        if self._cooldown_from is not None and step >= self._cooldown_from[0]:
            start, lr0 = self._cooldown_from
        elif step >= self.cooldown_start:
            start, lr0 = self.cooldown_start, self._lr
        else:
            return next(lr for s, lr in reversed(self.lr_changes) if s <= step)
        progress = (step - start) / max(self.total_steps - start, 1)
        return lr0 * cooldown_factor(min(progress, 1.0), self.config.effective_cooldown_type)

    def lr_schedule(self) -> list[float]:
        """`lr_at(step)` for every step of the budget (the largest group's LR)."""
        return [self._lr_at(step) for step in range(self.total_steps)]

    def restart(self, total_steps: int) -> None:
        """Warm up again from the start, over `total_steps` steps: the state a new `AutoWU` on this optimizer, with
        these options, model and group ratios, would have. Listeners attached from outside stay attached and keep
        their own state; the scheduler's own rewinder is built anew. The Trainer integration calls this when it
        resumes a checkpoint written without AutoWU.

        Args:
            total_steps (`int`): The new budget, in optimizer steps.

        Raises:
            `ValueError`: when `total_steps` is not an int >= 1.
        """
        self.total_steps = check_positive_int("total_steps", total_steps)
        if self._own_rewinder is not None:
            self.remove_listener(self._own_rewinder)
            self._own_rewinder = None
        self._start()

    def add_listener(self, listener: Any) -> None:
        """Attach a listener: any object with `on_step(scheduler)` (after every step's decisions) and/or
        `on_switch(scheduler)` (once, when warmup ends, after `peak_lr` and `switch_step` are set).

        A listener whose `state_key` attribute is a string has its `state_dict()` saved in this scheduler's
        `state_dict()` under that key, and restored by `load_state_dict()` (also when it attaches after the
        state was loaded); attaching it replaces a listener with the same key, and takes over the state the one it
        replaces hands over (its `hand_over()`, when it has one and returns a state rather than None): a rewinder
        attached after a load, or after training began, goes on from the snapshots the replaced one held.
        `WarmupRewinder` is such a listener (key `"rewind"`).
        """
        key = getattr(listener, "state_key", None)
        if key is not None:
            replaced = [o for o in self._listeners if getattr(o, "state_key", None) == key]
            for other in replaced:
                self.remove_listener(other)
            handed = [o.hand_over() for o in replaced if hasattr(o, "hand_over")]
            if key in self._listener_states:
                listener.load_state_dict(self._listener_states.pop(key))
            elif any(state is not None for state in handed):
                listener.load_state_dict(next(state for state in handed if state is not None))
        self._listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        """Detach a listener (nothing happens if it is not attached)."""
        self._listeners = [other for other in self._listeners if other is not listener]

    def add_switch_listener(self, listener: Callable[[AutoWU], None]) -> None:
        """Call `listener(scheduler)` once, when warmup ends (after `peak_lr` and `switch_step` are set)."""
        self.add_listener(_SwitchCallback(listener))

    @property
    def rewinder(self) -> WarmupRewinder | None:
        """The attached `WarmupRewinder`, if any."""
        return next((listener for listener in self._listeners if isinstance(listener, WarmupRewinder)), None)

    def sync_pending_losses(self) -> None:
        """Average the losses not yet tested over all processes now (a collective: call it on every process).

        Integrations call this before a checkpoint so that the saved state holds the cross-process mean
        losses; otherwise they are kept per process and averaged at the next test. In decay with
        `decay_phase_stat="loss"` the epoch's losses are averaged where they are and stay the epoch's, so a
        checkpoint changes no decision.
        """
        if self.phase == "warmup":
            self._flush_pending()
        else:
            self._average_epoch_losses()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit, as plain types and CPU tensors (`weights_only`-safe).

        With several processes, call `sync_pending_losses()` on every process first (the Trainer's entry points,
        `hf_autowu.register_for_checkpointing` and `hf_autowu.save_scheduler_state` do): the losses since the last
        switch test are held per process until then, and a state saved from one process would resume with that
        process's losses instead of their mean (a warning says so).
        """
        if self.joined:
            raise RuntimeError(
                "AutoWU.state_dict: this process has run out of inputs under `Join` and holds no loss for the steps "
                "it shadows; save after the `Join` block, where every process holds the same averaged losses."
            )
        if self._relay is not None and not self._relay.needs_collective:
            self._land_relay()  # only waits: the averaging was started on every process
        pending = pending_to_tensor(self._pending).cpu()
        if self._relay is not None:  # gloo with CUDA losses: reducing them would be a collective, from this process
            pending = torch.cat([self._relay.local_values(), pending])
        unsynced = pending.numel() - self._synced_pending
        if unsynced and world_size() > 1 and process_rank() == 0:
            warnings.warn(
                f"AutoWU.state_dict: {unsynced} losses of this process are not yet averaged over the "
                "processes; call `scheduler.sync_pending_losses()` on every process before saving, or a resume from "
                "this state uses this process's losses instead of their mean and differs from an uninterrupted run.",
                stacklevel=2,
            )
        return {
            "config": self.config.to_dict(),
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "group_ratios": list(self._current_group_ratios()),
            "last_step": self.last_step,
            "phase": self.phase,
            "switch_step": self.switch_step,
            "switch_reason": self.switch_reason,
            "peak_lr": self.peak_lr,
            "damaged_from": self.damaged_from,
            "retried": self.retried,
            "lr": self._lr,
            "tests": [asdict(record) for record in self.tests],
            "last_outcome": asdict(self.last_outcome) if self.last_outcome is not None else None,
            "estimate_before_last": self._estimate_before_last,
            "history": self._history.clone(),
            "pending": pending,
            "synced_pending": self._synced_pending,
            "skipped_updates": self._skipped_updates,
            "top_configured_lr": self._top_configured_lr,
            "passes": list(self._passes),
            "next_test": self._next_test,
            "plateau_best": self._plateau_best,
            "plateau_bad_epochs": self._plateau_bad_epochs,
            "cooldown_from": list(self._cooldown_from) if self._cooldown_from is not None else None,
            "lr_changes": [list(change) for change in self.lr_changes],
            "checked": self._checked,
            "spike_at": self._spike_at,
            "tester": self._tester.state_dict(),
            "watch": self._watch.state_dict() if self._watch is not None else None,
            "listeners": {
                **self._listener_states,
                **{
                    listener.state_key: listener.state_dict()
                    for listener in self._listeners
                    if getattr(listener, "state_key", None) is not None
                },
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()` (or a Trainer checkpoint's scheduler state that holds one); the optimizer's LRs
        are set to the restored schedule.

        Raises:
            `ValueError`: for a state that is not AutoWU's, is another optimizer's (more parameter groups) or cannot be
                loaded (a key missing, a value of the wrong kind); the scheduler and its rewinder are then left as
                they were.
        """
        state_dict = autowu_state_of(state_dict)
        if not isinstance(state_dict, dict) or "config" not in state_dict or "history" not in state_dict:
            raise ValueError(
                "AutoWU.load_state_dict: this is not an AutoWU state (no `config` or `history`); was the checkpoint "
                "written with another scheduler?"
            )
        before = dict(self.__dict__)
        try:
            self._load(state_dict)
        except Exception as error:
            self.__dict__.clear()
            self.__dict__.update(before)  # a state that cannot be loaded changes nothing
            if isinstance(error, ValueError):
                raise
            raise ValueError(
                f"AutoWU.load_state_dict: this state cannot be loaded ({type(error).__name__}: {error}); nothing was "
                "changed. Was it written by another version or edited?"
            ) from error

    def _load(self, state_dict: dict[str, Any]) -> None:
        """`load_state_dict`'s work, on a state known to be AutoWU's."""
        check_saved_schedule(state_dict)
        ratios = self._loaded_group_ratios(state_dict["group_ratios"])
        budget = self.total_steps
        saved_config = AutoWUConfig(**config_fields(state_dict["config"]))
        changed = saved_config.differing_options(self.config)
        if changed:
            self._report_other_options(changed)
            self.config = saved_config
        self.total_steps = int(state_dict["total_steps"])
        self.steps_per_epoch = state_dict["steps_per_epoch"]
        # the ramp's length: that of the budget the run began with, which a budget re-planned at a resume keeps
        # (a state from before it was saved: the saved budget's)
        self.warmup_steps = int(state_dict.get("warmup_steps", self.config.warmup_length(self.total_steps)))
        self.cooldown_start = self.config.cooldown_start(self.total_steps)
        self.group_ratios = ratios
        self.last_step = int(state_dict["last_step"])
        self.phase = state_dict["phase"]
        self.switch_step = state_dict["switch_step"]
        self.switch_reason = state_dict["switch_reason"]
        self.peak_lr = state_dict["peak_lr"]
        self.damaged_from = state_dict.get("damaged_from")
        self.retried = state_dict.get("retried")
        self._lr = float(state_dict["lr"])
        self.tests = [SwitchTestRecord(**record) for record in state_dict["tests"]]
        outcome = state_dict["last_outcome"]
        self.last_outcome = SwitchTestOutcome(**outcome) if outcome is not None else None
        before_last = state_dict.get("estimate_before_last")
        self._estimate_before_last = float(before_last) if before_last is not None else None
        self._history = state_dict["history"].to(torch.float64).clone()
        self._pending = [float(v) for v in state_dict["pending"].tolist()]
        self._synced_pending = int(state_dict.get("synced_pending", 0))
        self._skipped_updates = int(state_dict.get("skipped_updates", 0))
        top = state_dict.get("top_configured_lr")
        if top is not None:  # the LR that groups added later are scaled against (`_ratio_of`)
            self._top_configured_lr = float(top)
        self._relay = None
        self._micro_batch_losses = []
        self._passes = [bool(v) for v in state_dict["passes"]]
        self._next_test = int(state_dict["next_test"])
        self._plateau_best = float(state_dict["plateau_best"])
        self._plateau_bad_epochs = int(state_dict["plateau_bad_epochs"])
        cooldown_from = state_dict["cooldown_from"]
        self._cooldown_from = (int(cooldown_from[0]), float(cooldown_from[1])) if cooldown_from else None
        self.lr_changes = [(int(step), float(lr)) for step, lr in state_dict["lr_changes"]]
        self._checked = int(state_dict.get("checked", 0))
        self._spike_at = state_dict.get("spike_at")
        self._tester = _make_tester(self.config)
        self._tester.load_state_dict(state_dict["tester"])
        self._watch = LossSpikeWatch() if self.config.effective_spike_watch else None
        if self._watch is not None and state_dict.get("watch") is not None:
            self._watch.load_state_dict(state_dict["watch"])
        self._listener_states = dict(state_dict.get("listeners", {}))
        for listener in self._listeners:
            key = getattr(listener, "state_key", None)
            if key is not None and key in self._listener_states:
                listener.load_state_dict(self._listener_states.pop(key))
        if changed:
            self._follow_config_rewind(changed)
        if budget != self.total_steps:
            self._replan_budget(budget)
        self._apply_lr()

    def _loaded_group_ratios(self, saved: list[float]) -> list[float]:
        """The saved LR ratios of the parameter groups, checked against this optimizer's groups: more saved than there
        are groups is another optimizer's state (a `ValueError`, as torch's optimizers raise); fewer, and the groups
        after them keep the ratio of their configured LR that this scheduler read from them (with a warning)."""
        ratios = [float(r) for r in saved]
        groups = len(self.optimizer.param_groups)
        if len(ratios) > groups:
            raise ValueError(
                f"AutoWU.load_state_dict: the state holds the LR ratios of {len(ratios)} parameter groups, but the "
                f"optimizer has {groups}: it was saved with another optimizer."
            )
        if len(ratios) < groups:
            warnings.warn(
                f"AutoWU: the state holds the LR ratios of {len(ratios)} parameter groups and the optimizer has "
                f"{groups}; the groups after the first {len(ratios)} follow the ratio of their configured LR to the "
                "largest one configured when AutoWU was built, as groups added with `add_param_group` do.",
                stacklevel=3,
            )
            ratios += self._current_group_ratios()[len(ratios) :]  # this optimizer's own, as built or added
        return ratios

    def _ratio_of(self, index: int, group: dict[str, Any]) -> float:
        """Parameter group `index`'s LR ratio: its configured LR over the largest one configured when AutoWU was built,
        times its `lr_scale` (timm's layer-wise LR decay) when it has one."""
        top = self._top_configured_lr
        ratio = configured_lr(index, group) / top if top > 0 else 1.0
        ratio *= lr_scale(index, group)
        if not ratio * self.config.max_lr < math.inf:
            raise ValueError(
                f"Parameter group {index}: its LR ratio ({ratio:g}: its configured LR over the largest, times its "
                f"lr_scale) times max_lr ({self.config.max_lr:g}) is not a finite learning rate."
            )
        return ratio

    def _current_group_ratios(self) -> list[float]:
        """`group_ratios`, extended to groups added to the optimizer since (`optimizer.add_param_group`, as in
        gradual unfreezing): each gets the ratio of its configured LR (the optimizer's default LR when it set none),
        times its `lr_scale`. A group's `lr_scale` is read once, when its ratio is first needed (timm's schedulers read
        it at every update)."""
        groups = self.optimizer.param_groups
        if len(groups) > len(self.group_ratios):
            self.group_ratios += [self._ratio_of(i, groups[i]) for i in range(len(self.group_ratios), len(groups))]
        return self.group_ratios

    def _report_other_options(self, names: list[str]) -> None:
        """Say that the state being loaded was saved with other options (`names`), and that the saved ones are used:
        a `UserWarning`. The Trainer's scheduler logs it instead (the Trainer drops warnings while it loads one)."""
        warnings.warn(
            f"AutoWU: loading a state saved with other options ({', '.join(names)}); the saved options are used.",
            stacklevel=3,
        )

    def _replan_budget(self, total_steps: int) -> None:
        """Plan a loaded schedule for the budget this scheduler was built with (a run resumed with another
        `max_steps`). The ramp keeps its pace; until the cooldown has begun, the budget and the cooldown's start move
        to the new budget's (the cooldown begins now when that point has passed); once it has begun, the saved plan
        is kept, since changing it would rewrite LRs already used."""
        saved = self.total_steps
        if self.phase == "cooldown" or total_steps <= self.last_step:
            logger.warning(
                f"AutoWU: the saved schedule is planned for {saved} steps and this run for {total_steps}; at step "
                f"{self.last_step} ({self.phase}) it cannot be re-planned, so the saved plan is kept (steps past "
                f"{saved} train at LR 0)."
            )
            return
        self.total_steps = total_steps
        self.cooldown_start = max(self.config.cooldown_start(total_steps), self.last_step)
        logger.warning(
            f"AutoWU: the saved schedule was planned for {saved} steps; re-planned for this run's {total_steps}: the "
            f"cooldown starts at step {self.cooldown_start}."
        )
        if self.phase == "warmup" and self.last_step >= self.cooldown_start:
            # what `step()` does when its step count reaches the cooldown's start: warmup ends (at its cap: the
            # GP's estimate, as planned), and the next step already decays
            self._end_warmup_at_cap(self.last_step)
            self.switched_on_load = True
        if self.phase != "cooldown" and self.last_step >= self.cooldown_start:
            self._enter_cooldown(self.last_step)

    def _follow_config_rewind(self, changed: list[str]) -> None:
        """After a load that replaced the options (`changed` names them): the rewinder this scheduler builds itself is
        attached exactly when the options ask for rewind, and follows the saved rewind options (one attached by hand,
        or by an integration, is left alone)."""
        wanted = self.config.effective_rewind and self.warmup_steps > 0
        own = self._own_rewinder
        attached = own is not None and any(listener is own for listener in self._listeners)
        if wanted and self.rewinder is None:
            self._own_rewinder = WarmupRewinder(self._model, self.optimizer, self, ema=self._ema)  # the saved state
        elif not wanted and attached:
            self.remove_listener(own)
            self._own_rewinder = None
        elif wanted and attached and any(name == "preset" or name.startswith("rewind_") for name in changed):
            # built with the options given in code: rebuilt with the saved ones, taking over the snapshots it loaded
            self._own_rewinder = WarmupRewinder(self._model, self.optimizer, self, ema=self._ema)

    @property
    def losses(self) -> torch.Tensor:
        """The warmup losses read so far: at switch tests, checkpoints and, with several processes, the spike watch's
        relay (cross-process means, float64, CPU)."""
        return self._history

    # ------------------------------------------------------------------ warmup

    def _ramp(self, step: int) -> float:
        """LR of optimizer step `step` on the warmup ramp."""
        cfg = self.config
        if cfg.warmup_unit == "epoch":
            epochs = int(self.warmup_steps / self.steps_per_epoch)
            return warmup_lr(
                step // self.steps_per_epoch,
                min_lr=cfg.min_lr,
                max_lr=cfg.max_lr,
                length=max(epochs, 1),
                warmup_type=cfg.warmup_type,
            )
        return warmup_lr(
            step, min_lr=cfg.min_lr, max_lr=cfg.max_lr, length=self.warmup_steps, warmup_type=cfg.warmup_type
        )

    def _test_step_after(self, step: int) -> int:
        """The step count at which the next switch test runs, after one at `step`."""
        cfg = self.config
        growth = cfg.effective_test_lr_growth
        if growth is None or cfg.warmup_unit == "epoch":
            interval = cfg.test_interval or self.steps_per_epoch or max(1, self.total_steps // 50)
            return step + interval
        # robust cadence: the next step whose ramp LR has grown by `growth` since the last tested step
        target = growth * self._ramp(max(step - 1, 0))
        if cfg.warmup_type == "exp":
            per_step = math.log(cfg.max_lr / cfg.min_lr) / self.warmup_steps
            k = math.ceil(math.log(target / cfg.min_lr) / per_step - 1e-9)
        else:
            k = math.ceil((target - cfg.min_lr) / (cfg.max_lr - cfg.min_lr) * self.warmup_steps - 1e-9)
        return max(k + 1, step + 1)

    def _run_test(self, t: int) -> None:
        """A switch test after `t` steps; switch when the last `patience` tests passed."""
        self._next_test = self._test_step_after(t)
        relayed = self._relay.count if self._relay is not None else 0
        if len(self._history) + relayed + len(self._pending) < self._tester.min_losses:
            return  # too few losses for any test: decided without reading them (no sync, no collective)
        self._flush_pending()
        if self._scan_for_spike():
            self._switch_on_spike(t)
            return
        current_lr = self._ramp(t - 1)
        first_bad = self._first_non_finite_since_last_test(t) if self.config.effective_divergence_guard else None
        outcome = self._tester.run(
            self._history, current_lr=current_lr, min_lr=self.config.min_lr, warmup_type=self.config.warmup_type
        )
        # every process takes the main process's decision
        votes, estimate, rising, descended, resolved, from_start = broadcast_floats(
            [
                outcome.votes,
                outcome.lr_estimate,
                outcome.rising,
                outcome.descended,
                outcome.resolved,
                math.nan if outcome.descended_from_start is None else outcome.descended_from_start,
            ]
            if outcome
            else [-1, math.nan, 0, 1, 1, math.nan]
        )
        if votes >= 0:
            if outcome is None:  # cannot happen with identical inputs; keep the processes in step regardless
                outcome = SwitchTestOutcome([], 0, False, estimate, False, [], [])
            outcome.votes = int(votes)
            outcome.passed = votes > self.config.n_tests / 2
            outcome.lr_estimate = estimate
            outcome.rising = bool(rising)
            outcome.descended = bool(descended)
            outcome.resolved = bool(resolved)
            outcome.descended_from_start = None if math.isnan(from_start) else bool(from_start)
            self._keep_outcome(outcome)
            counts = outcome.passed and outcome.resolved
            self.tests.append(SwitchTestRecord(t, outcome.probability, outcome.votes, counts, estimate, current_lr))
            self._passes = (self._passes + [counts])[-self.config.patience :]
        if self._watch is not None:
            # the same cross-process means on every process
            self._watch.set_reference(self._history, judged=self._next_test - t)
        if first_bad is not None:  # a non-finite loss: the LR that produced it is too large, whatever the GP says
            self._switch_after_blow_up(t, first_bad, reason="divergence")
        elif self.config.effective_divergence_guard and outcome is not None and outcome.passed and outcome.rising:
            self._switch(t, self._lr_after_blow_up(ceiling=current_lr), reason="divergence")
        elif len(self._passes) == self.config.patience and all(self._passes):
            self._switch(t, estimate, reason="test")

    def _scan_for_spike(self) -> bool:
        """Run the spike check over the (cross-process mean) losses it has not seen; True when one was found."""
        if self._watch is not None and self._spike_at is None and self._checked < len(self._history):
            self._spike_at = self._watch.scan(self._history[self._checked :], self._checked)
        self._checked = max(self._checked, len(self._history))
        return self._spike_at is not None

    def _switch_on_spike(self, t: int) -> None:
        """The spike watch saw the loss blow up at step index `_spike_at` (reason "divergence" when it turned
        non-finite, else "spike")."""
        self._flush_pending()  # a local copy with one process; already done at the test with several
        self._switch_after_blow_up(t, self._spike_at, reason="divergence" if self._watch.non_finite else "spike")

    def _switch_after_blow_up(self, t: int, first_bad: int, reason: str) -> None:
        """The loss blew up at step index `first_bad`: decay from the LR `_lr_after_blow_up` chooses below the LR
        of the update that produced that loss; rewind only to states from before it. The first non-finite loss of
        a warmup with steps left is retried instead (`_retry_after_non_finite`)."""
        if reason == "divergence" and self.retried is None and t < min(self.warmup_steps, self.cooldown_start):
            self._retry_after_non_finite(t, first_bad)
            return
        self._switch(t, self._lr_after_blow_up(self._ceiling_before(first_bad)), reason=reason, damaged_from=first_bad)

    def _retry_after_non_finite(self, t: int, first_bad: int) -> None:
        """Go on with warmup after its first non-finite loss (index `first_bad`), once: one bad batch (every label of
        a batch masked, an overflow) produces one as surely as an LR too large does, and ending warmup on it would
        fix the whole run at an LR chosen from a curve barely begun (the floor `min_lr` before any test). When the
        training state is no longer finite (the NaN's update reached the weights), the rewinder restores its latest
        finite snapshot from before that loss (`WarmupRewinder.restore_before`) and the losses since that snapshot
        leave the history (NaN: the GP and the watch skip them); the ramp goes on from its current LR. A state still
        finite (zero gradients of an all-masked batch, an update loss scaling skipped) goes on as it is, as does one
        with nothing to restore (rewind off, no snapshot before the loss); the losses after the bad one then came
        from the state training goes on from, and are still checked. A second non-finite loss ends warmup as any
        blow-up does, so an LR that really diverges costs a few steps more. The same on every process: the history
        is the processes' mean."""
        rewinder = self.rewinder
        restored = rewinder.restore_before(self, first_bad) if rewinder is not None else None
        if restored is not None:
            self._history[restored["step"] :] = math.nan  # the steps rewound: another trajectory's losses
            settled = len(self._history)  # every loss up to now; the watch's held one among them
        else:
            settled = first_bad + 1  # the losses after it, the watch's held one included, are still to check
        self._checked = settled
        self._spike_at = None
        if self._watch is not None:
            self._watch.forget_held(before=settled)
            self._watch.set_reference(self._history, judged=self._next_test - t)
        self.retried = {
            "step": t,
            "loss_index": first_bad,
            "lr": self._ceiling_before(first_bad),
            "restored_step": None if restored is None else restored["step"],
        }
        if process_rank() == 0:
            where = "restored the state of step {}".format(restored["step"]) if restored else "nothing restored"
            logger.warning(
                f"AutoWU: the loss of step {first_bad + 1} was not finite (LR {self.retried['lr']:.4g}); warmup goes "
                f"on ({where}), and a second non-finite loss ends it."
            )

    def _keep_outcome(self, outcome: SwitchTestOutcome) -> None:
        """Make `outcome` the latest test's; the estimate of the one it replaces is kept when that one saw no rise."""
        previous = self.last_outcome
        if previous is not None and not previous.rising and 0.0 < previous.lr_estimate < math.inf:
            self._estimate_before_last = previous.lr_estimate
        self.last_outcome = outcome

    def _lr_after_blow_up(self, ceiling: float) -> float:
        """The LR to decay from when the loss blew up (or rose back above its start) at LR `ceiling`, kept at or
        below `ceiling`.

        - When the latest test saw no real descent before the blow-up (the losses' level, medians of ten in a row,
          never fell three standard deviations of the first losses' noise below where it started: a flat curve
          whose lowest point is noise, as in a fine-tune whose loss barely moves), `ceiling / BLOW_UP_BACKOFF`, the
          LR range test's rule of a decade below the blow-up (`SwitchTestOutcome.fell`: `descended_from_start`;
          where the first losses' noise cannot be measured, the GP's smoothed minimum against its own noise,
          `descended`).
        - When the latest test saw the loss rise back, the estimate of the latest test before it that saw no rise:
          the rising losses at the end of the history pull the smoothed minimum toward the LRs that made them.
        - Otherwise the latest estimate of the best LR (`_best_known_estimate`).
        """
        last = self.last_outcome
        if last is None:
            return min(self._best_known_estimate(), ceiling)
        if not last.fell:
            return ceiling / BLOW_UP_BACKOFF
        if last.rising and self._estimate_before_last is not None:
            return min(self._estimate_before_last, ceiling)
        return min(self._best_known_estimate(), ceiling)

    def _ceiling_before(self, index: int) -> float:
        """The LR of the update that produced loss number `index` (`min_lr` for the first one)."""
        return self._ramp(index - 1) if index > 0 else self.config.min_lr

    def _first_non_finite_since_last_test(self, t: int) -> int | None:
        """Step index of the first non-finite loss since the previous test, or since the retry after one (the
        retried loss when nothing was restored, else the retry's step: the losses before it left the history)."""
        since = self.tests[-1].step if self.tests else 0
        if self.retried is not None:
            restored = self.retried.get("restored_step") is not None
            since = max(since, self.retried["step"] if restored else self.retried["loss_index"] + 1)
        bad = (~torch.isfinite(self._history[since:t])).nonzero()
        return since + int(bad[0]) if bad.numel() else None

    def _best_known_estimate(self) -> float:
        """The LR at the smoothed minimum from the latest successful test, else `min_lr`."""
        if self.last_outcome is not None and math.isfinite(self.last_outcome.lr_estimate):
            return self.last_outcome.lr_estimate
        return self.config.min_lr

    def _end_warmup_at_cap(self, t: int) -> None:
        """Warmup ran out of steps without a switch: decay from the GP's estimate (robust preset), from the LR range
        test's rule when the GP gives none (`_lr_without_estimate`), from `min_lr` when the loss never really fell
        (`_lr_without_descent`), or from the LR reached (the paper). At the cap the whole ramp is in, so a fall that
        medians of ten losses miss in noisy losses (`SwitchTestOutcome.fell`) may still show over a third of the ramp
        (`switch_test.fell_over_ramp`): either counts, since decaying from `min_lr` after a real fall leaves the
        model untrained."""
        lr = self._ramp(t - 1)
        if self.config.effective_estimate_at_cap:
            self._flush_pending()
            if self._scan_for_spike():
                self._switch_on_spike(t)
                return
            outcome = self._tester.run(
                self._history, current_lr=lr, min_lr=self.config.min_lr, warmup_type=self.config.warmup_type
            )
            fell = outcome is None or outcome.fell or fell_over_ramp(self._history.numpy())
            estimate, fell = broadcast_floats([outcome.lr_estimate if outcome else math.nan, fell])
            if math.isfinite(estimate):
                if not outcome.fell:  # what the switch message reads: the decision, as the main process made it
                    outcome.fell_over_ramp = bool(fell)
                self._keep_outcome(outcome)
                lr = estimate if fell else self._lr_without_descent(t)
            else:
                lr = self._lr_without_estimate(t)
        self._switch(t, lr, reason="cap")

    def _lr_without_descent(self, t: int) -> float:
        """The LR to decay from at a cap reached by a loss that never really fell (`SwitchTestOutcome.fell`) and
        never blew up, over a ramp that went from `min_lr` to the cap: a loss that carries no signal of the LR (one
        that does not track training, as a policy-gradient loss that is always about 0; or a model whose trained
        weights are frozen). The GP's lowest point of such a curve is noise, anywhere on the ramp (up to `max_lr`),
        so AutoWU decays from `min_lr`, the ramp's first LR, and says so. Rewind then restores its oldest kept
        snapshot, which is not the ramp's first steps: the snapshots kept are those around the GP's latest estimate,
        noise too (on zero-mean noise over 300 steps, seeds 0-5, states trained with LRs up to 1e-4 to 2e-2)."""
        if process_rank() == 0:
            logger.warning(
                f"AutoWU: warmup reached its cap after {t} steps (LR {self._ramp(t - 1):.4g}) and the loss never "
                "really fell (its level, in medians of ten losses or of a third of the ramp, stayed within three "
                "standard deviations of the first losses' noise, scaled to the median) nor "
                f"blew up, so its lowest point is noise: decaying from min_lr {self.config.min_lr:.4g}. Check that "
                "the loss passed to `step` tracks training (a loss that is always about 0, as a policy-gradient loss "
                "can be, says nothing about the LR), or set the LR yourself."
            )
        return self.config.min_lr

    def _lr_without_warmup(self) -> float:
        """The LR of a run with no warmup step: `max_lr` when the options ask for none (`max_warmup_fraction=0`) or
        for the paper's behaviour; a robust run whose budget is too short for one (a single step: `max_steps=1`,
        as in a pipeline's smoke run) reaches its cap at once with no loss read, so it decays from `min_lr` (what
        `_lr_without_estimate` gives with no loss), as the two- and three-step budgets do."""
        if self.config.max_warmup_fraction > 0 and self.config.effective_estimate_at_cap:
            return self.config.min_lr
        return self.config.max_lr

    def _lr_without_estimate(self, t: int) -> float:
        """The LR to decay from at a cap the GP gives no estimate for: a budget too short for the `min_losses`
        losses a switch test needs (under twice that many steps with `max_warmup_fraction` 0.5), or a GP that
        failed. The ramp so far was a fast LR range test (five decades in fewer steps than a test needs), so its
        rule: the LR of the update that produced the lowest finite loss, divided by `BLOW_UP_BACKOFF`, and never
        below the ramp's first LR, `min_lr` (which is also the answer when no loss is finite). The LR reached
        instead, the paper's choice, lies near `max_lr` on such a ramp and wrecks the run. The same on every
        process: the history holds the processes' mean losses."""
        finite = torch.isfinite(self._history)
        lr = self.config.min_lr
        if bool(finite.any()):
            lowest = int(torch.where(finite, self._history, math.inf).argmin())
            lr = max(self._ceiling_before(lowest) / BLOW_UP_BACKOFF, lr)
        if process_rank() == 0:
            logger.warning(
                f"AutoWU: warmup reached its cap after {t} steps with no estimate from the GP "
                f"({int(finite.sum())} finite losses; a switch test needs {self._tester.min_losses} and a GP that "
                f"does not fail): decaying from {lr:.4g}, a tenth of the LR at the lowest loss (the LR range test's "
                f"rule). Too short a budget? A warmup of at least {self._tester.min_losses} steps "
                "(`max_warmup_fraction` times the budget) lets AutoWU choose from its test."
            )
        return lr

    def _switch(self, t: int, lr: float, reason: str, damaged_from: int | None = None) -> None:
        """Leave warmup after `t` steps, decaying from `lr`; `damaged_from`: after a blow-up, the index of its first
        loss (the state it was computed on, and every later one, must not be restored)."""
        self.damaged_from = damaged_from
        lr = min(max(lr, 0.0), self.config.max_lr) if math.isfinite(lr) else self.config.min_lr
        self._enter_decay(step=t, lr=lr, reason=reason)

    def _enter_decay(self, step: int, lr: float, reason: str) -> None:
        self._land_relay()
        self._clear_pending()
        self.switch_step = step
        self.switch_reason = reason
        self.peak_lr = lr
        self._lr = lr
        self.lr_changes.append((step, lr))
        self.phase = "decay"
        if self.config.immediate_cooldown:
            self._enter_cooldown(step)
        self._apply_lr()  # listeners see the optimizer at the new LR
        for listener in list(self._listeners):
            on_switch = getattr(listener, "on_switch", None)
            if on_switch is not None:
                on_switch(self)

    # ------------------------------------------------------------------ decay and cooldown

    def _maybe_decay_per_epoch(self, t: int) -> None:
        """Per-epoch decay while holding: by a factor, or by a factor on a plateau of the epoch's mean loss."""
        cfg = self.config
        if cfg.decay_phase_stat is None and cfg.decay_phase_factor == 1.0:
            return
        if (t - self.switch_step) % self.steps_per_epoch:
            return
        if cfg.decay_phase_stat is None:
            self._set_decay_lr(t, self._lr * cfg.decay_phase_factor)
            return
        if not self._pending:
            return
        self._average_epoch_losses()
        epoch_losses = torch.tensor(self._pending, dtype=torch.float64)
        self._clear_pending()
        finite = epoch_losses[torch.isfinite(epoch_losses)]
        mean_loss = float(finite.mean()) if finite.numel() else math.inf
        best = self._plateau_best  # better by a share of the best's size, below zero too (torch's 'rel' is not)
        if mean_loss < best * (1.0 - math.copysign(_PLATEAU_THRESHOLD, best)):
            self._plateau_best = mean_loss
            self._plateau_bad_epochs = 0
        else:
            self._plateau_bad_epochs += 1
        if self._plateau_bad_epochs > _PLATEAU_PATIENCE:
            self._set_decay_lr(t, self._lr * cfg.decay_phase_factor)
            self._plateau_bad_epochs = 0

    def _set_decay_lr(self, t: int, lr: float) -> None:
        self._lr = lr
        self.lr_changes.append((t, lr))

    def _enter_cooldown(self, t: int) -> None:
        self.phase = "cooldown"
        self._clear_pending()
        self._cooldown_from = (t, self._lr)

    # ------------------------------------------------------------------ uneven inputs (`Join`)

    def join_hook(self, **kwargs: Any) -> JoinedSteps:
        """The hook `torch.distributed.algorithms.Join` runs once this process has run out of inputs (see
        `hf_autowu.join`): it shadows each step the other processes take. Keyword arguments (the model's, such as
        DDP's `divide_by_initial_world_size`) are ignored.

        Returns:
            `JoinedSteps`: the hook.
        """
        return JoinedSteps(self)

    @property
    def join_device(self) -> torch.device:
        """The device of the `Join` context's own all-reduces when AutoWU is its first joinable."""
        return join_device()

    @property
    def join_process_group(self) -> Any:
        """The process group of AutoWU's collectives (the default one)."""
        return join_process_group()

    def _step_while_joined(self) -> None:
        """This process has run out of inputs: take the step the others take, without a loss of its own."""
        self.joined = True
        self._step_after_update(None, absent=True)

    def _leave_join(self) -> None:
        """Every process has joined: average the losses held per process (a collective, on every process alike)."""
        self.sync_pending_losses()
        self.joined = False
        leave_join(self)

    def _pending_payload(self, entries: list[torch.Tensor | float | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Buffered losses as one float64 tensor and, under `Join`, which of them this process holds (None for a
        step it shadowed; `MeanInFlight` then averages each over the processes that hold it)."""
        if not join_enabled(self):
            return pending_to_tensor(entries), None
        if all(v is not None for v in entries):  # a process that has not joined: no host copy, no sync
            values = pending_to_tensor(entries)
            return values, torch.ones(values.shape, dtype=torch.bool, device=values.device)
        present = torch.tensor([v is not None for v in entries], dtype=torch.bool)
        return pending_to_tensor([0.0 if v is None else v for v in entries]), present

    # ------------------------------------------------------------------ helpers

    def _apply_lr(self) -> None:
        """Set the LR of the next step (`self.last_step`) in every parameter group."""
        if self.phase != "decay":
            self._lr = self._lr_at(self.last_step)
        for group, ratio in zip(self.optimizer.param_groups, self._current_group_ratios(), strict=False):
            set_group_lr(group, self._lr * ratio)

    def _relay_losses(self) -> None:
        """With several processes, start averaging the pending losses over the processes without waiting
        (`MeanInFlight`), so that the spike watch checks them `RELAY_EVERY` steps at a time, a step later
        (`_land_relay`), instead of at the next switch test. Every process calls it at the same steps, with as many
        losses."""
        if self._pending and self._relay is None:
            self._relay = MeanInFlight(*self._pending_payload(self._pending))
            self._pending.clear()

    def _land_relay(self) -> None:
        """Append the averages `_relay_losses` started to the history (they precede every pending loss)."""
        if self._relay is not None:
            values = self._relay.wait()
            self._relay = None
            self._history = torch.cat([self._history, values])

    def _average_epoch_losses(self) -> None:
        """In decay, average over the processes the epoch's losses not averaged yet, where they are (every process
        holds as many: the same collective everywhere)."""
        unsynced = self._pending[self._synced_pending :]
        if unsynced:
            self._pending[self._synced_pending :] = mean_over_processes(*self._pending_payload(unsynced)).tolist()
            self._synced_pending = len(self._pending)

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._synced_pending = 0

    def _flush_pending(self) -> None:
        self._land_relay()
        if self._pending:
            values = mean_over_processes(*self._pending_payload(self._pending))
            self._history = torch.cat([self._history, values])
            self._pending.clear()

    def _resolve_budget(self, total_steps: int | None, total_epochs: float | None) -> int:
        if total_steps is None:
            if self.steps_per_epoch is None or total_epochs is None:
                raise ValueError("Give `total_steps`, or both `steps_per_epoch` and `total_epochs`.")
            if not (is_number(total_epochs) and 0 < total_epochs < math.inf):
                raise ValueError(f"`total_epochs` must be a finite number > 0, got {total_epochs!r}.")
            total_steps = math.ceil(self.steps_per_epoch * float(total_epochs))
        return check_positive_int("total_steps", total_steps)


def _make_tester(config: AutoWUConfig) -> SwitchTester:
    """The switch tester for `config` (its GP settings and fewest losses per test come from the preset)."""
    return SwitchTester(
        confidence=config.confidence,
        n_tests=config.n_tests,
        standardize_losses=config.effective_standardize_losses,
        seed=config.seed,
        min_losses=config.preset_setting("min_losses"),
        fit_lr=config.preset_setting("fit_lr"),
        noise_init=config.preset_setting("noise_init"),
        rise_margin=config.preset_setting("rise_margin"),
        swing_margin=config.preset_setting("swing_margin"),
        min_past_lengthscales=config.preset_setting("min_past_lengthscales"),
        slowed_fraction=config.preset_setting("slowed_fraction"),
        max_descent_left=config.preset_setting("max_descent_left"),
        descent_required_below=config.preset_setting("descent_required_below"),
    )
