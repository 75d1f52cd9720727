"""`hf-autowu`: replay AutoWU over a recorded loss curve, or draw the figure of a saved scheduler state.

```
hf-autowu replay output/trainer_state.json --min-lr 1e-5 --max-lr 1 --plot autowu.png
hf-autowu plot output/checkpoint-500
```
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from .config import AutoWUConfig
from .log_entries import blew_up_without_descent, capped_without_descent, capped_without_estimate
from .replay import (
    LOSS_TAGS,
    LR_TAGS,
    CurveError,
    Replay,
    latest_checkpoint,
    read_loss_curve,
    replay_curve,
)
from .scheduler import AutoWU

PROG = "hf-autowu"
STATE_KEYS = {"config", "total_steps", "history", "tests", "lr_changes", "tester"}
_REASONS = {
    "test": "passed switch tests in a row",
    "divergence": "the loss diverged",
    "spike": "the loss jumped far above its smoothed curve",
    "cap": "warmup reached its maximum length",
    "no_warmup": "the options or the budget (one step) leave no warmup",
}

REPLAY_HELP = f"""\
Replay AutoWU's warmup over a recorded training-loss curve: feed the losses, step by step, to AutoWU with the
given options and print when it would switch and which learning rate it would pick.

Reads LOG, one of:
  - a Trainer trainer_state.json, or an output folder (its own or its latest checkpoint's): log_history's "loss"
    and "autowu/lr" (else "learning_rate", group 0's LR), and "max_steps" as the budget. With logging_steps > 1
    each logged mean is repeated over its steps and the replay is approximate. The Trainer logs a non-finite loss
    as the mean of those before it unless logging_nan_inf_filter=False: set it for a replay that sees them.
  - a CSV with the header step,loss[,lr]: one row per step (step 1, or 0, for the first optimizer step).
  - a TensorBoard event file, or a folder with one run's event files, with the scalar tags
      loss: {", ".join(LOSS_TAGS)} (or --loss-tag)
      learning rate: {", ".join(LR_TAGS)} (or --lr-tag)
When the log has learning rates they must follow the warmup ramp of the options (min_lr, max_lr, budget,
max_warmup_fraction, warmup_type); only the steps on that ramp are replayed (a recorded AutoWU run: those before
its switch). Without learning rates, the curve is assumed to follow that ramp.

The budget (total steps) is --total-steps, else the log's max_steps (Trainer state), else inferred from the
logged learning rates: the ramp's growth per step gives the warmup length W (max_warmup_fraction times the budget,
or times sqrt(long_budget_steps * budget) for budgets above long_budget_steps), and the smallest budget with that
W is used (it replays the same decisions). A log without learning rates needs
--total-steps. A Trainer state of a run resumed with another max_steps: its logged learning rates
follow the ramp of the budget it began with, which is then inferred, and its cooldown the log's max_steps.

Writes the figure to --plot PATH when given (needs matplotlib); nothing otherwise."""

PLOT_HELP = """\
Draw the figure of a saved AutoWU scheduler state: training loss, the GP fit of the last switch test, the switch
and the chosen learning rate, and the LR schedule.

Reads CHECKPOINT: a Trainer checkpoint folder (scheduler.pt), a Trainer output folder (its latest checkpoint-N),
an Accelerate state folder (custom_checkpoint_N.pkl from register_for_checkpointing, or scheduler.bin), or one
such file. Files are loaded with torch.load(weights_only=True).

Writes the figure to --output (default autowu.png)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-autowu` (subcommands `replay` and `plot`)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="AutoWU: inspect and replay automatic learning-rate warmups."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = commands.add_parser(
        "replay",
        help="what AutoWU would do on a recorded loss curve",
        description=REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("log", metavar="LOG", help="trainer_state.json, a .csv, or a TensorBoard event file/folder")
    replay.add_argument(
        "--total-steps", type=int, help="the step budget (default: the log's max_steps, or inferred from its LRs)"
    )
    replay.add_argument(
        "--steps-per-epoch",
        type=int,
        help="optimizer steps per epoch, as in the recorded run: the paper preset tests once per epoch, and "
        "warmup_unit='epoch' and the per-epoch decay options need it (default: from a Trainer state's epochs)",
    )
    replay.add_argument("--loss-tag", help="TensorBoard tag of the loss")
    replay.add_argument("--lr-tag", help="TensorBoard tag of the learning rate")
    replay.add_argument("--plot", metavar="PATH", help="save the figure of the replay there (e.g. autowu.png)")
    replay.add_argument("-v", "--verbose", action="store_true", help="list every switch test")
    options = replay.add_argument_group("AutoWU options (default: AutoWU's defaults)")
    hints = typing.get_type_hints(AutoWUConfig)
    for option in dataclasses.fields(AutoWUConfig):
        options.add_argument(
            "--" + option.name.replace("_", "-"),
            type=_option_parser(hints[option.name]),
            metavar=option.name.upper(),
            help=_option_help(option),
        )

    plot = commands.add_parser(
        "plot",
        help="the figure of a saved scheduler state",
        description=PLOT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder or scheduler state file")
    plot.add_argument("-o", "--output", default="autowu.png", help="where to save the figure (default: autowu.png)")
    plot.add_argument("-v", "--verbose", action="store_true", help="list every switch test")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hf-autowu` with `argv` (default: the command line).

    Returns:
        `int`: the exit status: 0, or 2 with one error line on stderr for an unusable input.
    """
    args = build_parser().parse_args(argv)
    try:
        lines = _replay(args) if args.command == "replay" else _plot(args)
    except (CurveError, ValueError, OSError, OverflowError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # the reader stopped early (`| head`): what it took is all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush stays quiet
    return 0


def _replay(args: argparse.Namespace) -> list[str]:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AutoWUConfig)}
    config = AutoWUConfig(**{name: value for name, value in given.items() if value is not None})
    curve = read_loss_curve(args.log, args.loss_tag, args.lr_tag)
    result = replay_curve(curve, config, total_steps=args.total_steps, steps_per_epoch=args.steps_per_epoch)
    scheduler = result.scheduler
    every = "every step" if curve.logging_interval == 1 else f"every {curve.logging_interval} steps"
    lines = [
        f"read {len(curve.steps)} losses from {curve.source}: steps {curve.steps[0]}-{curve.steps[-1]}, "
        f"logged {every}",
        _ramp_line(result),
        *(f"note: {note}" for note in result.notes),
        f"replayed {scheduler.last_step} steps: {len(scheduler.tests)} switch tests",
    ]
    if args.verbose:
        lines += _test_lines(scheduler)
    if scheduler.switch_step is None:
        lines.append(f"AutoWU would not switch within the {scheduler.last_step} replayed steps{_last_test(scheduler)}")
    else:
        lines.append("AutoWU would " + _switch_sentence(scheduler))
    if args.plot:
        lines.append(f"wrote {_save_figure(scheduler, args.plot)}")
    return lines


def _plot(args: argparse.Namespace) -> list[str]:
    path, state = _load_scheduler_state(Path(args.checkpoint))
    try:
        scheduler = AutoWU.from_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise CurveError(f"{path}: not a usable AutoWU scheduler state ({type(err).__name__}: {err}).") from None
    lines = [f"read the AutoWU state of {path}: step {scheduler.last_step} of {scheduler.total_steps}"]
    if args.verbose:
        lines += _test_lines(scheduler)
    if scheduler.switch_step is None:
        lines.append(f"AutoWU has not switched yet{_last_test(scheduler)}")
    else:
        lines.append("AutoWU " + _switch_sentence(scheduler, past=True))
    lines.append(f"wrote {_save_figure(scheduler, args.output)}")
    return lines


def _ramp_line(result: Replay) -> str:
    cfg, scheduler = result.scheduler.config, result.scheduler
    ramp = (
        f"the {cfg.warmup_type} ramp from min_lr {cfg.min_lr:g} to max_lr {cfg.max_lr:g} over "
        f"{scheduler.warmup_steps} warmup steps (budget {scheduler.total_steps})"
    )
    if result.lr_recorded:
        return f"learning rate: logged, on {ramp} up to step {result.replayable_steps}"
    return f"learning rate: not logged, taken from {ramp}"


def _switch_sentence(scheduler: AutoWU, past: bool = False) -> str:
    reason = _REASONS.get(scheduler.switch_reason, scheduler.switch_reason)
    if scheduler.switch_reason == "test":
        reason = f"{scheduler.config.patience} {reason}"
    if blew_up_without_descent(scheduler):
        reason += "; it had not really fallen before, so a decade below the LR that blew up"
    if capped_without_estimate(scheduler):
        reason += "; too soon for a switch test, so a tenth of the LR at the lowest loss"
    if capped_without_descent(scheduler):
        reason += "; the loss had not really fallen over the whole warmup, so the ramp's first LR"
    if scheduler.retried is not None:
        reason += f"; warmup had gone on after the non-finite loss of step {scheduler.retried['loss_index'] + 1}"
    ramp = scheduler.lr_at(scheduler.switch_step - 1) if scheduler.switch_step > 0 else scheduler.config.max_lr
    verb = "switched" if past else "switch"
    return (
        f"{verb} after step {scheduler.switch_step} ({reason}) to peak LR {scheduler.peak_lr:.6g} "
        f"(the warmup ramp had reached {ramp:.6g})"
    )


def _last_test(scheduler: AutoWU) -> str:
    if not scheduler.tests:
        return " (no switch test ran)"
    test = scheduler.tests[-1]
    return (
        f"; last test after step {test.step}: P(minimum in past) {test.probability:.3f}, "
        f"{test.votes}/{scheduler.config.n_tests} votes"
    )


def _test_lines(scheduler: AutoWU) -> list[str]:
    return [
        f"  test after step {t.step:>6}: LR {t.lr:.4g}, P(minimum in past) {t.probability:.3f}, votes {t.votes}, "
        f"{'passed' if t.passed else 'failed'}, LR at the smoothed minimum {t.lr_estimate:.4g}"
        for t in scheduler.tests
    ]


def _save_figure(scheduler: AutoWU, path: str) -> str:
    try:
        from .plotting import plot_autowu

        if not Path(path).suffix:
            path = f"{path}.png"  # what matplotlib writes for a name without a format: say so
        plot_autowu(scheduler, path)
    except ImportError:
        raise CurveError("drawing the figure needs matplotlib (pip install hf-autowu[plot]).") from None
    return path


def _load_scheduler_state(path: Path) -> tuple[Path, dict[str, Any]]:
    """The first AutoWU state found at `path` (a file, a checkpoint folder, or an output folder of checkpoints)."""
    if not path.exists():
        raise CurveError(f"{path}: no such file or folder.")
    if path.is_file():
        state = _autowu_state(_torch_load(path))
        if state is None:
            raise CurveError(f"{path}: not an AutoWU scheduler state.")
        return path, state
    candidates = _state_files(path)
    latest = latest_checkpoint(path)
    if not candidates and latest is not None:
        candidates = _state_files(latest)
    if not candidates:
        raise CurveError(
            f"{path}: no scheduler state here (looked for scheduler.pt, custom_checkpoint_*.pkl, scheduler*.bin)."
        )
    for candidate in candidates:
        state = _autowu_state(_torch_load(candidate))
        if state is not None:
            return candidate, state
    names = ", ".join(c.name for c in candidates)
    raise CurveError(f"{path}: none of {names} holds an AutoWU scheduler state.")


def _state_files(folder: Path) -> list[Path]:
    patterns = ("scheduler.pt", "custom_checkpoint_*.pkl", "scheduler*.bin")
    return [file for pattern in patterns for file in sorted(folder.glob(pattern)) if file.is_file()]


def _torch_load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many error types on a file that is not a torch save
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CurveError(f"{path}: not loadable with torch.load(weights_only=True) ({first_line}).") from None


def _autowu_state(state: Any) -> dict[str, Any] | None:
    """`state` if it is an AutoWU state, else an AutoWU state among its values (`AutoWUCallback` keeps AutoWU's
    state inside the state of the Trainer's own scheduler), else `None`."""
    candidates = [state, *state.values()] if isinstance(state, dict) else []
    return next((c for c in candidates if isinstance(c, dict) and STATE_KEYS <= c.keys()), None)


def _option_help(option: dataclasses.Field) -> str:
    """The field's help, with its default unless the help already tells it."""
    text = option.metadata["help"]
    if "default" not in text:
        text = f"{text} (default: {option.default})"
    return text.replace("%", "%%")


def _option_parser(hint: Any) -> typing.Callable[[str], Any]:
    """The string-to-value converter of an `AutoWUConfig` field's type (`X` or `X | None`)."""
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return _parse_bool if hint is bool else hint


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


if __name__ == "__main__":
    raise SystemExit(main())
