"""Figures of AutoWU's decisions: the loss, the GP fit of the last switch test, the switch and the LR schedule.

matplotlib is optional (`pip install hf-autowu[plot]`): it is only imported when a figure is drawn. Figures are
built without pyplot (no global state, no GUI backend), so they render and save anywhere, with or without a
display; in a notebook, a returned figure displays as usual.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .scheduler import AutoWU

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_SIZE = (8.0, 4.5)  # inches
FIGURE_DPI = 100
FIGURE_NAME = "autowu.png"
SWITCH_GID = "autowu-switch"
PEAK_LR_GID = "autowu-peak-lr"
_SCHEDULE_POINTS = 2000
_LOSS_CLIP_QUANTILE = 0.98


def plot_autowu(scheduler_or_state: AutoWU | Mapping[str, Any], path: str | os.PathLike | None = None) -> Figure:
    """Draw what AutoWU saw and decided, in one figure.

    Left axis: the recorded warmup loss, and the GP posterior mean with a ±2 sd band at the last switch test.
    Right axis (log scale): the LR schedule (solid where it is known, dotted where it is the plan). The switch is
    a dashed vertical line at the first step with the new LR (artist gid `"autowu-switch"`), and the chosen LR a
    star (gid `"autowu-peak-lr"`) joined by a dotted line to the warmup step that had that LR (about where the
    smoothed loss was lowest).

    Args:
        scheduler_or_state (`AutoWU` or `Mapping`): A scheduler, or its `state_dict()` (e.g. a loaded
            `scheduler.pt`).
        path (`str` or `os.PathLike`, *optional*): Save the figure there (the format follows the extension).

    Returns:
        `matplotlib.figure.Figure`: the figure (800 x 450 pixels when saved with the default DPI).

    Example:

    ```python
    from hf_autowu import plot_autowu

    plot_autowu(scheduler, "autowu.png")
    plot_autowu(torch.load("checkpoint-500/scheduler.pt", weights_only=True))
    ```
    """
    from matplotlib.figure import Figure

    from .replay import scheduler_from_state_dict  # a clear error for another scheduler's state

    scheduler = (
        scheduler_or_state if isinstance(scheduler_or_state, AutoWU) else scheduler_from_state_dict(scheduler_or_state)
    )
    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    loss_ax = fig.add_subplot()
    lr_ax = loss_ax.twinx()

    losses = scheduler.losses.tolist()
    loss_ax.plot(range(len(losses)), losses, color="C0", lw=0.8, alpha=0.45, label="training loss")
    band = _last_test_band(scheduler)
    if band is not None:
        x, mean, std, label = band
        loss_ax.fill_between(
            x,
            [m - 2 * s for m, s in zip(mean, std, strict=True)],
            [m + 2 * s for m, s in zip(mean, std, strict=True)],
            color="C0",
            alpha=0.2,
            lw=0,
            label="GP ±2 sd",
        )
        loss_ax.plot(x, mean, color="C0", lw=2, label=label)
    _limit_loss_axis(loss_ax, losses, band)

    known, planned = _schedule(scheduler)
    lr_ax.plot(*known, color="C1", lw=1.5, label="learning rate")
    if len(planned[0]) > 1:
        lr_ax.plot(*planned, color="C1", lw=1.2, ls=":", label="planned learning rate")
    lr_ax.set_yscale("log")
    shown = [lr for lr in known[1] + planned[1] if lr > 0]
    if scheduler.peak_lr:
        shown.append(scheduler.peak_lr)
    lr_ax.set_ylim(0.5 * min([scheduler.config.min_lr, *shown]), 2.0 * max(known[1] + planned[1]))

    if scheduler.switch_step is not None:
        switch, peak = scheduler.switch_step, scheduler.peak_lr
        loss_ax.axvline(
            switch,
            color="C3",
            ls="--",
            lw=1,
            gid=SWITCH_GID,
            label=f"switch after step {switch} ({scheduler.switch_reason})",
        )
        on_ramp = next((s for s in known[0] if s < switch and scheduler.lr_at(s) >= peak), switch)
        lr_ax.plot([on_ramp, switch], [peak, peak], color="C3", lw=0.8, ls=":")
        lr_ax.plot(
            [switch], [peak], ls="none", marker="*", ms=14, color="C3", gid=PEAK_LR_GID, label=f"chosen LR {peak:.3g}"
        )
        title = f"AutoWU: switched after step {switch} to LR {peak:.3g}"
    else:
        title = f"AutoWU: warming up, no switch yet (step {scheduler.last_step})"

    loss_ax.set_xlim(0, scheduler.total_steps)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss")
    lr_ax.set_ylabel("learning rate")
    loss_ax.set_title(title)
    handles = [h for ax in (loss_ax, lr_ax) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    if path is not None:
        fig.savefig(path)
    return fig


def save_autowu_figure(scheduler: AutoWU, output_dir: str | os.PathLike) -> str | None:
    """Write `plot_autowu(scheduler)` to `output_dir/autowu.png` when matplotlib is installed.

    The Trainer integration and the examples call it at the switch (from a switch listener) and at the end of
    training, on the main process only.

    Args:
        scheduler (`AutoWU`): The scheduler to draw.
        output_dir (`str` or `os.PathLike`): The folder (created if missing).

    Returns:
        `str` or `None`: the path written, or `None` without matplotlib.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FIGURE_NAME)
    plot_autowu(scheduler, path)
    return path


def log_figure_to_tensorboard(writer: Any, fig: Figure, step: int, tag: str = "autowu") -> None:
    """Send a figure to TensorBoard as an image.

    Works with `torch.utils.tensorboard.SummaryWriter` (the Trainer's `TensorBoardCallback.tb_writer`) and
    tensorboardX's writer alike.

    Args:
        writer: A TensorBoard summary writer (anything with `add_image(tag, array, step, dataformats=...)`).
        fig (`matplotlib.figure.Figure`): E.g. `plot_autowu(scheduler)`.
        step (`int`): The global step to log at.
        tag (`str`, *optional*, defaults to `"autowu"`): The image tag.

    Example:

    ```python
    log_figure_to_tensorboard(tb_writer, plot_autowu(scheduler), scheduler.last_step)
    ```
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    writer.add_image(tag, np.asarray(canvas.buffer_rgba())[..., :3], step, dataformats="HWC")


def _last_test_band(scheduler: AutoWU) -> tuple[list[float], list[float], list[float], str] | None:
    """(x, mean, sd, legend label) of the last test's posterior, on the step axis; `None` without one.

    The posterior lives on [0, 1], the normalised axis of the `n_losses` losses the test saw: x = i / n_losses is
    step i.
    """
    outcome = scheduler.last_outcome
    if outcome is None or not outcome.grid_mean:
        return None
    n = outcome.n_losses
    size = len(outcome.grid_mean)
    x = [n * i / (size - 1) for i in range(size)]
    label = f"GP mean at step {n} (P[min in past] = {outcome.probability:.2f})"
    return x, outcome.grid_mean, outcome.grid_std, label


def _limit_loss_axis(ax: Any, losses: list[float], band: tuple | None) -> None:
    """Keep a few exploding losses from flattening the curve: clip the axis at a high quantile (and the band)."""
    finite = sorted(v for v in losses if math.isfinite(v))
    if not finite:
        return
    top = finite[int(_LOSS_CLIP_QUANTILE * (len(finite) - 1))]
    bottom = finite[0]
    if band is not None:
        _, mean, std, _ = band
        top = max(top, max(m + 2 * s for m, s in zip(mean, std, strict=True)))
        bottom = min(bottom, min(m - 2 * s for m, s in zip(mean, std, strict=True)))
    if finite[-1] > top and top > bottom:
        pad = 0.05 * (top - bottom)
        ax.set_ylim(bottom - pad, top + pad)


def _schedule(scheduler: AutoWU) -> tuple[tuple[list[int], list[float]], tuple[list[int], list[float]]]:
    """The LR schedule as (steps, LRs) where it is known (up to `last_step`) and where it is planned (`lr_at`'s
    plan: before the switch, warmup to its cap and decay from there).

    Evaluated at up to `_SCHEDULE_POINTS` steps plus the steps where the LR jumps.
    """
    total = scheduler.total_steps
    count = min(_SCHEDULE_POINTS, total)
    steps = {round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}
    jumps = [step for step, _ in scheduler.lr_changes]
    if scheduler.switch_step is None:
        jumps.append(min(scheduler.warmup_steps, scheduler.cooldown_start))  # the planned end of warmup
    for jump in jumps:
        steps.update((jump - 1, jump))
    steps.update((scheduler.last_step - 1, scheduler.last_step))
    ordered = sorted(s for s in steps if 0 <= s < total)
    known = [s for s in ordered if s <= scheduler.last_step]
    planned = [s for s in ordered if s >= scheduler.last_step]
    return (known, [scheduler.lr_at(s) for s in known]), (planned, [scheduler.lr_at(s) for s in planned])
