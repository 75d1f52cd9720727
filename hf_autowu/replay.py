"""Recorded training curves: read them (Trainer logs, CSV, TensorBoard) and replay AutoWU's warmup over them.

A replay asks "what would AutoWU have done with these options on this recorded warmup?": it feeds the recorded
losses, step by step, into an `AutoWU` driving a dummy optimizer and stops at the switch. It is only meaningful
while the recorded run trained on the same LR ramp as the options describe, so the logged learning rates are
checked against that ramp first.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import AutoWUConfig, is_number
from .scheduler import AutoWU

LOSS_TAGS = ("train/loss", "loss", "train_loss", "train/train_loss")
# AutoWU's own LR (of the largest group) first: with several parameter groups a Trainer's `learning_rate` is group 0's
LR_TAGS = ("train/autowu/lr", "autowu/lr", "train/learning_rate", "learning_rate", "train/lr", "lr")
LR_RELATIVE_TOLERANCE = 1e-3
MAX_STEP = 10**9
"""The largest step number a log may hold (a billion optimizer steps: beyond any training run)."""


class CurveError(ValueError):
    """A recorded curve (or scheduler state) that cannot be read or replayed; the message is one line."""


@dataclass
class LossCurve:
    """A recorded training-loss curve.

    Attributes:
        steps (`list[int]`): For each logged loss, the optimizer steps done when it was logged (1 after the first
            step), strictly increasing. A loss logged every `k` steps stands for the `k` steps up to its entry.
        losses (`list[float]`): The logged losses (means over their steps when logging is coarse).
        lrs (`list[float]`, *optional*): The learning rate logged with each loss: either the LR its last step
            trained with, or the LR of the next step (the Trainer's convention before transformers 5).
        total_steps (`int`, *optional*): The step budget, when the log records it.
        source (`str`): What was read, for messages.
        steps_per_epoch (`int`, *optional*): Optimizer steps per epoch, when the log records epochs (a Trainer
            state's `epoch`).
    """

    steps: list[int]
    losses: list[float]
    lrs: list[float] | None = None
    total_steps: int | None = None
    source: str = "curve"
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if not self.steps:
            raise CurveError(f"{self.source}: no training losses found.")
        if len(self.losses) != len(self.steps) or (self.lrs is not None and len(self.lrs) != len(self.steps)):
            raise CurveError(f"{self.source}: steps, losses and learning rates differ in length.")
        if self.steps[0] < 1 or any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise CurveError(f"{self.source}: the steps must be positive and strictly increasing.")

    @property
    def logging_interval(self) -> int:
        """The most common number of steps between two logged losses (1 for a per-step log)."""
        gaps = [b - a for a, b in zip([0, *self.steps], self.steps, strict=False)]
        return Counter(gaps).most_common(1)[0][0]

    def per_step_losses(self, limit: int | None = None) -> list[float]:
        """One loss per optimizer step: each logged loss repeated over the steps it stands for (the first `limit`
        steps only, when given)."""
        losses: list[float] = []
        for step, loss in zip(self.steps, self.losses, strict=False):
            if limit is not None and step > limit:
                losses.extend([loss] * (limit - len(losses)))
                break
            losses.extend([loss] * (step - len(losses)))
        return losses


@dataclass
class Replay:
    """The outcome of `replay_curve`.

    Attributes:
        scheduler (`AutoWU`): The scheduler after the replay: `switch_step`, `peak_lr`, `tests`, ... say what
            AutoWU decided (`switch_step` is `None` when it would not have switched within the replayed steps).
        replayable_steps (`int`): Leading steps of the curve that trained on the options' warmup ramp.
        lr_recorded (`bool`): Whether the ramp was checked against logged LRs (else it was assumed).
        notes (`list[str]`): What the reader should know about the replay (approximations, truncation).
    """

    scheduler: AutoWU
    replayable_steps: int
    lr_recorded: bool
    notes: list[str] = field(default_factory=list)


def dummy_optimizer() -> torch.optim.Optimizer:
    """A one-parameter SGD optimizer for schedulers that only compute LRs (replays, rebuilt states)."""
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)


def scheduler_from_state_dict(state: Mapping[str, Any]) -> AutoWU:
    """Rebuild an `AutoWU` (on a dummy optimizer) from its `state_dict()`, e.g. a loaded `scheduler.pt`.

    An alias of `AutoWU.from_state_dict(state)`, kept for code that imports it from `hf_autowu`.

    Args:
        state (`Mapping`): What `AutoWU.state_dict()` returned.

    Returns:
        `AutoWU`: a scheduler in the saved state; its `lr_at`, `losses`, `tests`, ... are those of the saved one.
    """
    return AutoWU.from_state_dict(dict(state) if isinstance(state, Mapping) else state)


# ---------------------------------------------------------------------------------------------------- readers


def latest_checkpoint(folder: Path) -> Path | None:
    """The `checkpoint-N` subfolder of a Trainer output folder with the largest N, or `None`."""
    checkpoints = [p for p in folder.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[1]), default=None)


def read_loss_curve(path: str | os.PathLike, loss_tag: str | None = None, lr_tag: str | None = None) -> LossCurve:
    """Read a recorded loss curve, choosing the reader from the path.

    - `*.json`, or a folder holding `trainer_state.json` (itself or in its latest `checkpoint-N`): a Trainer
      state, see `read_trainer_state`.
    - `*.csv`: see `read_csv_curve`.
    - a file whose name contains `tfevents`, or a folder holding such files: see `read_tensorboard_curve`.

    Args:
        path (`str` or `os.PathLike`): The file or folder.
        loss_tag (`str`, *optional*): TensorBoard tag of the loss (default: the first of `LOSS_TAGS` present).
        lr_tag (`str`, *optional*): TensorBoard tag of the learning rate (default: the first of `LR_TAGS`).

    Returns:
        `LossCurve`: the curve.

    Raises:
        `CurveError`: when the path is missing, of no known kind, or malformed.
    """
    path = Path(path)
    if path.is_dir():
        for folder in (path, latest_checkpoint(path)):
            if folder is not None and (folder / "trainer_state.json").is_file():
                return read_trainer_state(folder / "trainer_state.json")
        if not any("tfevents" in p.name for p in path.rglob("*")):
            raise CurveError(f"{path}: neither a trainer_state.json nor TensorBoard event files in this folder.")
        return read_tensorboard_curve(path, loss_tag, lr_tag)
    if not path.is_file():
        raise CurveError(f"{path}: no such file or folder.")
    if path.suffix == ".json":
        return read_trainer_state(path)
    if path.suffix == ".csv":
        return read_csv_curve(path)
    if "tfevents" in path.name:
        return read_tensorboard_curve(path, loss_tag, lr_tag)
    raise CurveError(f"{path}: unknown log format (expected trainer_state.json, a .csv, or a TensorBoard event file).")


def read_trainer_state(path: str | os.PathLike) -> LossCurve:
    """Read the training losses of a Trainer's `trainer_state.json`.

    Uses the `log_history` entries with a `"loss"` (with their `"step"` and `"learning_rate"`) and `"max_steps"`
    as the step budget. With `logging_steps > 1` each logged loss is the mean of its steps.

    Args:
        path (`str` or `os.PathLike`): The `trainer_state.json` file.

    Returns:
        `LossCurve`: the curve (`lrs` is `None` unless every loss entry carries a learning rate).

    Raises:
        `CurveError`: on a file that is not a Trainer state.

    The Trainer logs a non-finite loss as the mean of the losses before it unless `logging_nan_inf_filter=False`:
    a replay of such a log cannot see it.
    """
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CurveError(f"{path}: not readable as JSON ({err}).") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise CurveError(f"{path}: not a Trainer state (no `log_history` list).")
    entries = [entry for entry in state["log_history"] if isinstance(entry, dict) and "loss" in entry]
    # AutoWU's own LR (of the largest group; the next step's) when every entry has it: with several parameter groups
    # `learning_rate` is group 0's, whose ramp is not the options'
    lr_key = "autowu/lr" if entries and all("autowu/lr" in entry for entry in entries) else "learning_rate"
    points: dict[int, tuple[float, float | None]] = {}
    for entry in entries:
        step = _as_int(entry.get("step"), f"{path}: log entry {entry}: `step`")
        point = (
            _as_float(entry["loss"], f"{path}: step {step}: `loss`"),
            _as_float(entry[lr_key], f"{path}: step {step}: `{lr_key}`") if lr_key in entry else None,
        )
        _add_point(points, step, point, str(path))
    max_steps = state.get("max_steps")
    total_steps = _as_int(max_steps, f"{path}: `max_steps`") if max_steps else None
    curve = _curve_from_points(points, total_steps, f"{path} (Trainer state)", zero_based_allowed=False)
    curve.steps_per_epoch = _steps_per_epoch_of(entries)
    return curve


def _steps_per_epoch_of(entries: list[dict[str, Any]]) -> int | None:
    """Optimizer steps per epoch from the Trainer's log entries of the first epoch: `epoch` is the fraction of the
    epoch's batches done, so that `step / epoch` is the epoch's batches over the accumulation steps, rounded up as
    the Trainer counts updates (None when no entry of the first epoch has a usable `epoch`)."""
    for entry in reversed(entries):  # the latest entry of the first epoch: the longest span, the least rounding
        step, epoch = entry.get("step"), entry.get("epoch")
        if is_number(step) and is_number(epoch) and 0 < epoch <= 1 and step >= 1:
            return max(math.ceil(step / epoch - 1e-6), 1)
    return None


def read_csv_curve(path: str | os.PathLike) -> LossCurve:
    """Read a CSV with a header `step,loss` and optionally `lr` (or `learning_rate`).

    One row per logged loss. `step` counts optimizer steps: 1 for the first (as the Trainer's `global_step`), or
    0 for the first when the first row has step 0. `lr` is the LR of that step (or of the next one).

    Args:
        path (`str` or `os.PathLike`): The CSV file.

    Returns:
        `LossCurve`: the curve.

    Raises:
        `CurveError`: on a missing column or a value that is not a number.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a byte-order mark, as spreadsheets write
            table = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CurveError(f"{path}: not readable as CSV ({err}).") from None
    columns = [name.strip() for name in table[0]] if table else []
    if "step" not in columns or "loss" not in columns:
        raise CurveError(f"{path}: a CSV needs the columns `step` and `loss` (found: {', '.join(columns) or 'none'}).")
    rows = [(line, dict(zip(columns, row, strict=False))) for line, row in enumerate(table[1:], start=2) if row]
    lr_column = next((name for name in ("lr", "learning_rate") if name in columns), None)
    points: dict[int, tuple[float, float | None]] = {}
    for line, row in rows:
        step = _as_int(_csv_number(row, "step", f"{path}: line {line}"), f"{path}: line {line}: `step`")
        point = (
            _csv_number(row, "loss", f"{path}: line {line}"),
            _csv_number(row, lr_column, f"{path}: line {line}") if lr_column else None,
        )
        _add_point(points, step, point, f"{path}: line {line}")
    return _curve_from_points(points, None, f"{path} (CSV)")


def _add_point(points: dict[int, tuple[float, float | None]], step: int, point: tuple, where: str) -> None:
    """Record a logged (loss, LR) at `step`; a step logged before with other values is refused (two runs' logs in
    one file would otherwise replay as one curve mixing both)."""
    if step in points and not _same_values(points[step], point):
        raise CurveError(
            f"{where}: step {step} was logged before with other values ({points[step][0]!r} then {point[0]!r}): "
            "two runs in one log? Give one run's log."
        )
    points[step] = point


def _same_values(a: tuple, b: tuple) -> bool:
    return all(
        x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in zip(a, b, strict=True)
    )


def read_tensorboard_curve(
    path: str | os.PathLike, loss_tag: str | None = None, lr_tag: str | None = None
) -> LossCurve:
    """Read the loss (and LR) scalars of a TensorBoard event file, or of the event files of one run under a folder.

    A folder may hold several runs (folders of event files), e.g. the hyperparameter sub-run that Accelerate's
    tracker writes beside the run's scalars: the one run with loss scalars is read.

    Args:
        path (`str` or `os.PathLike`): An event file (`events.out.tfevents.*`) or a folder of them.
        loss_tag (`str`, *optional*): Tag of the loss; default: the first of `LOSS_TAGS` present.
        lr_tag (`str`, *optional*): Tag of the learning rate; default: the first of `LR_TAGS` present (the LR is
            then optional).

    Returns:
        `LossCurve`: the curve; the last value wins where a step was logged twice.

    Raises:
        `CurveError`: when no run holds such scalars, or several do.
    """
    path = Path(path)
    if path.is_dir():
        runs = sorted({p.parent for p in path.rglob("*tfevents*") if p.is_file()})
        if not runs:
            raise CurveError(f"{path}: no TensorBoard event files in this folder.")
        scalars_of = {run: _tensorboard_scalars(run) for run in runs}
        with_loss = [run for run, scalars in scalars_of.items() if _loss_tag(scalars, loss_tag) is not None]
        if len(with_loss) > 1:
            names = ", ".join(str(run.relative_to(path)) for run in with_loss)
            raise CurveError(
                f"{path}: training losses in {len(with_loss)} runs here ({names}); give one run's folder or file."
            )
        if not with_loss and len(runs) > 1:
            found = ", ".join(sorted({tag for scalars in scalars_of.values() for tag in scalars})) or "none"
            raise CurveError(
                f"{path}: no loss scalars in the {len(runs)} runs here (tags found: {found}); name the loss tag with "
                "--loss-tag."
            )
        path = with_loss[0] if with_loss else runs[0]
        scalars = scalars_of[path]
    else:
        scalars = _tensorboard_scalars(path)
    if not scalars:
        raise CurveError(f"{path}: no scalars found (not a TensorBoard event file, or an empty one).")
    found = ", ".join(sorted(scalars))
    loss_tag = _loss_tag(scalars, loss_tag)
    if loss_tag is None:
        raise CurveError(f"{path}: no loss scalars (tags found: {found}); name the loss tag with --loss-tag.")
    if lr_tag is not None and lr_tag not in scalars:
        raise CurveError(f"{path}: no scalars tagged {lr_tag!r} (tags found: {found}).")
    lr_tag = lr_tag or next((tag for tag in LR_TAGS if tag in scalars), None)
    lrs = scalars.get(lr_tag, {})
    points = {step: (loss, lrs.get(step)) for step, loss in scalars[loss_tag].items()}
    return _curve_from_points(points, None, f"{path} (TensorBoard, tag {loss_tag!r})")


def _tensorboard_scalars(path: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of an event file, or of the event files directly in a folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()  # stops quietly at a corrupt record
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]
    }


def _loss_tag(scalars: dict[str, dict[int, float]], loss_tag: str | None) -> str | None:
    """`loss_tag` if given and present, else the first of `LOSS_TAGS` present, else `None`."""
    if loss_tag is not None:
        return loss_tag if loss_tag in scalars else None
    return next((tag for tag in LOSS_TAGS if tag in scalars), None)


def _curve_from_points(
    points: dict[int, tuple[float, float | None]],
    total_steps: int | None,
    source: str,
    zero_based_allowed: bool = True,
) -> LossCurve:
    """A `LossCurve` from {step: (loss, lr)}; a log whose first step is 0 counts from 0 and is shifted by one."""
    if not points:
        raise CurveError(f"{source}: no training losses found.")
    steps = sorted(points)
    shift = 1 if zero_based_allowed and steps[0] == 0 else 0
    lrs = [points[step][1] for step in steps]
    return LossCurve(
        steps=[step + shift for step in steps],
        losses=[points[step][0] for step in steps],
        lrs=lrs if all(lr is not None for lr in lrs) else None,
        total_steps=total_steps,
        source=source,
    )


def _csv_number(row: dict[str, str], column: str, where: str) -> float:
    """The number in `row[column]`; a `CurveError` naming `where`, the column and the offending text otherwise."""
    text = row.get(column)
    if text is None:
        raise CurveError(f"{where}: `{column}` is missing (the row has fewer values than the header).")
    try:
        return float(text)
    except ValueError:
        raise CurveError(f"{where}: `{column}` is not a number ({text.strip()!r}).") from None


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CurveError(f"{what} is not a number ({value!r}).")
    return float(value)


def _as_int(value: Any, what: str) -> int:
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise CurveError(f"{what} is not a whole number ({value!r}).")
    if abs(value) > MAX_STEP:
        raise CurveError(f"{what} is beyond any training run's steps (at most {MAX_STEP:.0e}).")
    return int(value)


# ---------------------------------------------------------------------------------------------------- replay


def replay_curve(
    curve: LossCurve,
    config: AutoWUConfig | None = None,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> Replay:
    """Run AutoWU's warmup and switch tests over a recorded curve.

    The recorded losses are fed, one per optimizer step, into an `AutoWU` with the given options until it
    switches or the curve's ramp ends. With logged LRs, only the leading steps whose LR follows the options' ramp
    are used (the ramp ends where the recorded run switched or ended warmup); a logged LR that contradicts the
    ramp is refused. Without logged LRs, the whole curve is assumed to have trained on the options' ramp.
    Replaying a per-step log of an AutoWU run with that run's options reproduces its switch exactly.

    Args:
        curve (`LossCurve`): The recorded curve.
        config (`AutoWUConfig`, *optional*): The options to replay with (default: AutoWU's defaults).
        total_steps (`int`, *optional*): The step budget (default: the curve's).
        steps_per_epoch (`int`, *optional*): Steps per epoch, for options that act per epoch (default: the
            curve's, when its log recorded epochs).

    Returns:
        `Replay`: the scheduler after the replay, and notes on the replay.

    Raises:
        `CurveError`: when the budget is unknown, the options leave no warmup, or the curve has no usable ramp.
    """
    config = config or AutoWUConfig()
    notes = []
    from_log = total_steps is None and curve.total_steps is not None
    total_steps = curve.total_steps if total_steps is None else total_steps
    inferred = total_steps is None
    if inferred:
        total_steps = budget_from_lrs(curve, config)
        if total_steps is None:
            raise CurveError(
                f"{curve.source}: the step budget is unknown (no learning rates logged, or too few on a warmup ramp "
                "to infer it from); give `total_steps` (--total-steps)."
            )
        notes.append(
            f"budget inferred from the logged LRs: {total_steps} steps (the smallest budget whose warmup, "
            f"max_warmup_fraction {config.max_warmup_fraction:g}, is as long as the logged ramp; give --total-steps "
            "to override)."
        )
    if curve.steps[-1] > total_steps:
        raise CurveError(
            f"{curve.source}: the log goes on to step {curve.steps[-1]}, past the budget of {total_steps} steps; give "
            "the recorded run's budget (--total-steps)."
        )
    if curve.steps[0] > curve.logging_interval:
        raise CurveError(
            f"{curve.source}: the log begins at step {curve.steps[0]} (a resumed run's own log?): a replay needs the "
            "losses from the first step; give the whole run's log."
        )
    if steps_per_epoch is None and curve.steps_per_epoch is not None:
        steps_per_epoch = curve.steps_per_epoch
        notes.append(f"steps per epoch read from the log's epochs: {steps_per_epoch} (--steps-per-epoch overrides).")
    scheduler = AutoWU(dummy_optimizer(), steps_per_epoch, total_steps=total_steps, config=config)
    if config.preset == "paper" and steps_per_epoch is None:
        notes.append(
            "the paper preset tests once per epoch: without the recorded run's steps per epoch (--steps-per-epoch) "
            "it tests as for a run without epochs, and may switch elsewhere."
        )
    if scheduler.warmup_steps <= 0:
        raise CurveError("these options leave no warmup (max_warmup_fraction * total_steps < 1): nothing to replay.")

    if curve.steps[-1] != len(curve.steps):
        notes.append(
            f"the log does not hold every step's loss (one every {curve.logging_interval} steps, the first at step "
            f"{curve.steps[0]}): each logged value is repeated over the steps up to it, so the replay only "
            "approximates the run (log every step for an exact replay)."
        )
    if curve.lrs is None:
        replayable = curve.steps[-1]
        notes.append("no learning rates logged: the curve is assumed to follow the options' warmup ramp.")
    else:
        try:
            replayable = _ramp_steps(curve, scheduler)
        except CurveError as err:
            if inferred:
                raise CurveError(f"{err} The budget, {total_steps} steps, was inferred from the logged LRs.") from None
            ramp_budget = budget_from_lrs(curve, config) if from_log else None
            if ramp_budget is None or ramp_budget == total_steps:
                raise
            # a run resumed with another `max_steps` keeps the ramp of the budget it began with, and plans its
            # cooldown for the new one (`AutoWU.load_state_dict`): replay it so
            scheduler = AutoWU(dummy_optimizer(), steps_per_epoch, total_steps=ramp_budget, config=config)
            scheduler.total_steps = total_steps
            scheduler.cooldown_start = config.cooldown_start(total_steps)
            replayable = _ramp_steps(curve, scheduler)
            notes.append(
                f"the logged learning rates follow the ramp of a {ramp_budget}-step budget, not that of the log's "
                f"max_steps ({total_steps}): a run resumed with another max_steps keeps its ramp and plans its "
                f"cooldown for the new budget; replayed so (if the resumed run's cooldown was due before the step it "
                "resumed at, it ended warmup at that step instead)."
            )
        if replayable < curve.steps[-1]:
            notes.append(
                f"the logged learning rate leaves the warmup ramp after step {replayable} (the recorded run switched "
                f"or ended warmup there): the {replayable} steps before are replayed."
            )
    for loss in curve.per_step_losses(limit=min(replayable, scheduler.warmup_steps)):  # no replay goes past warmup
        scheduler.step(loss)
        if scheduler.phase != "warmup":
            break
    if scheduler.retried is not None:
        notes.append(
            f"the loss of step {scheduler.retried['loss_index'] + 1} was not finite and the replay went on from it as "
            "a run whose weights stayed finite does; if the recorded run's weights turned non-finite it restored a "
            "snapshot, trained on from there, and its later decisions may differ from this replay's."
        )
    return Replay(scheduler, replayable, curve.lrs is not None, notes)


def budget_from_lrs(curve: LossCurve, config: AutoWUConfig) -> int | None:
    """The step budget of a recorded run, inferred from the warmup ramp of its logged learning rates.

    On the options' ramp, the LR of step `t` sits at the fraction `t / W` of the way from `min_lr` to `max_lr`
    (in log scale for the exponential ramp), `W = AutoWUConfig.warmup_length(T)` the warmup length
    (`floor(max_warmup_fraction * T)` up to `long_budget_steps`). Two logged LRs on the ramp give `W` from their
    distance in steps; it is refined over the leading logged LRs that stay on the ramp it predicts (the widest span
    gives the most precise value) and rounded. Several budgets share that `W` (with the default fraction 0.5 and
    short budgets, `T = 2W` and `2W + 1`; a few more for long budgets); the smallest is returned. They give the
    same ramp, the same robust test cadence and the same warmup cap unless the cooldown starts before the cap, so a
    replay reproduces the recorded decisions; only the paper preset's cadence without epochs (a test every
    `T // 50` steps) can differ, when a multiple of 50 lies among those budgets (never with the fraction 0.5).

    Args:
        curve (`LossCurve`): The recorded curve.
        config (`AutoWUConfig`): The options of the recorded run (`min_lr`, `max_lr`, `warmup_type`,
            `max_warmup_fraction`).

    Returns:
        `int` or `None`: the budget, or `None` without at least two logged LRs growing on a per-step ramp.
    """
    if curve.lrs is None or config.warmup_unit != "step" or config.max_warmup_fraction <= 0:
        return None
    low, high, exponential = config.min_lr, config.max_lr, config.warmup_type == "exp"

    def fraction(lr: float) -> float:  # where `lr` sits on the ramp, 0 at min_lr and 1 at max_lr
        return math.log(lr / low) / math.log(high / low) if exponential else (lr - low) / (high - low)

    def lr_at(value: float) -> float:
        return low * (high / low) ** value if exponential else low + (high - low) * value

    points = list(zip(curve.steps, curve.lrs, strict=True))
    if len(points) < 2 or not (math.isfinite(points[1][1]) and 0 < points[0][1] < points[1][1]):
        return None
    (first_step, first_lr), previous = points[0], points[1][1]
    start = fraction(first_lr)
    warmup = (points[1][0] - first_step) / (fraction(points[1][1]) - start)
    for step, lr in points[2:]:
        if not (math.isfinite(lr) and lr > previous):
            break
        predicted = lr_at(start + (step - first_step) / warmup)
        if abs(math.log(lr / predicted)) > math.log1p(LR_RELATIVE_TOLERANCE):
            break  # off the ramp: the recorded run switched
        warmup, previous = (step - first_step) / (fraction(lr) - start), lr
    if not math.isfinite(warmup):  # LRs so large that their logarithms overflow
        return None
    warmup = round(warmup)
    if warmup < 1:
        return None
    # the smallest T with config.warmup_length(T) == W (the length never decreases with T): bisection
    high = 1
    while config.warmup_length(high) < warmup:
        high *= 2
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if config.warmup_length(middle) < warmup else (low, middle)
    return high if config.warmup_length(high) == warmup else None


def _ramp_steps(curve: LossCurve, scheduler: AutoWU) -> int:
    """Leading steps of `curve` known to have trained on `scheduler`'s ramp, checked against the logged LRs.

    A logged LR is either that of the entry's last step or that of the next step; the alignment that fits the
    ramp (best, when both do) is used.
    """
    fits, mismatches = [], []
    for offset in (0, 1):
        try:
            fits.append(_ramp_extent(curve, scheduler, offset))
        except _RampMismatch as mismatch:
            mismatches.append(mismatch)
    if not fits:
        worst = max(mismatches, key=lambda m: m.matched)
        cfg = scheduler.config
        raise CurveError(
            f"{curve.source}: the logged learning rate does not follow the warmup ramp of these options: at step "
            f"{worst.step} it is {worst.recorded:.6g}, but the {cfg.warmup_type} ramp from min_lr={cfg.min_lr:g} to "
            f"max_lr={cfg.max_lr:g} over {scheduler.warmup_steps} warmup steps (budget {scheduler.total_steps}) "
            f"gives {worst.expected:.6g}; give the recorded run's options (min_lr, max_lr, total_steps, "
            "max_warmup_fraction, warmup_type)."
        )
    ramp_end, _ = min(fits, key=lambda fit: fit[1])
    usable = [step for step in curve.steps if step <= ramp_end]
    if len(usable) < 2:  # the LR was never seen to grow
        stop = curve.steps[1] if len(curve.steps) > 1 else curve.steps[0]
        raise CurveError(
            f"{curve.source}: no usable LR ramp: the logged learning rate does not increase (at step {stop}); a "
            "replay needs the LR warmup of the recorded run."
        )
    return usable[-1]


class _RampMismatch(Exception):
    def __init__(self, step: int, recorded: float, expected: float, matched: int):
        self.step, self.recorded, self.expected, self.matched = step, recorded, expected, matched


def _ramp_extent(curve: LossCurve, scheduler: AutoWU, offset: int) -> tuple[int, float]:
    """(steps known to be on the ramp, mean |log error| of the matched LRs) with the LR of entry step `s` taken as
    that of step index `s - 1 + offset`.

    Walks the entries while the logged LR matches the ramp; stops at the warmup cap, or at the first LR that does
    not match and is not above the previous one (the ramp ended: AutoWU never switches to a larger LR). A rising
    LR off the ramp raises `_RampMismatch`.
    """
    tolerance = math.log1p(LR_RELATIVE_TOLERANCE)
    cap = min(scheduler.warmup_steps, scheduler.cooldown_start)
    ramp_end, errors, previous = 0, [], None
    for step, lr in zip(curve.steps, curve.lrs, strict=False):
        if not (math.isfinite(lr) and lr > 0):
            raise CurveError(f"{curve.source}: the learning rate logged at step {step} is {lr!r}.")
        index = step - 1 + offset
        if index >= cap:
            break
        expected = scheduler.lr_at(index)  # the ramp (the scheduler has not stepped)
        error = abs(math.log(lr / expected))
        if error <= tolerance:
            ramp_end, previous = index + 1, lr
            errors.append(error)
        elif previous is not None and lr <= previous:
            break
        else:
            raise _RampMismatch(step, lr, expected, len(errors))
    return ramp_end, sum(errors) / max(len(errors), 1)
