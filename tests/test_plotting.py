"""`plot_autowu` and its helpers: rendered files, and artists that carry exactly the scheduler's decisions."""

import importlib
import math
import struct
import sys

import pytest
import torch
from helpers import make_optimizer, valley_loss

import hf_autowu.plotting
from hf_autowu import AutoWU, log_figure_to_tensorboard, plot_autowu, save_autowu_figure
from hf_autowu.plotting import PEAK_LR_GID, SWITCH_GID

pytest.importorskip("matplotlib")

TOTAL_STEPS = 300


def drive(steps):
    """An AutoWU driven `steps` steps over a loss valley with its best LR at 1e-2."""
    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL_STEPS)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        scheduler.step(valley_loss(scheduler.get_last_lr()[0], 1e-2, 0.02, generator))
    return scheduler


@pytest.fixture(scope="module")
def switched():
    scheduler = drive(TOTAL_STEPS)
    assert scheduler.switch_reason == "test"
    return scheduler


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def artist(fig, gid):
    return next(a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid)


def test_figure_renders_to_png_of_the_documented_size(switched, tmp_path):
    path = tmp_path / "autowu.png"
    plot_autowu(switched, path)
    assert png_size(path) == (800, 450)
    assert path.stat().st_size > 20_000


def test_marked_switch_and_lr_are_the_schedulers_also_from_a_saved_state(switched, tmp_path):
    torch.save(switched.state_dict(), tmp_path / "scheduler.pt")
    saved = torch.load(tmp_path / "scheduler.pt", weights_only=True)
    for fig in (plot_autowu(switched), plot_autowu(saved)):
        assert list(artist(fig, SWITCH_GID).get_xdata()) == [switched.switch_step] * 2
        peak = artist(fig, PEAK_LR_GID)
        assert list(peak.get_xdata()) == [switched.switch_step]
        assert list(peak.get_ydata()) == [switched.peak_lr]
        assert fig.axes[1].get_yscale() == "log"


def test_gp_band_is_the_last_test_on_the_step_axis(switched):
    fig = plot_autowu(switched)
    mean_line = next(line for line in fig.axes[0].get_lines() if line.get_label().startswith("GP mean"))
    x = mean_line.get_xdata()
    assert x[0] == 0 and x[-1] == pytest.approx(switched.tests[-1].step) == switched.last_outcome.n_losses
    assert list(mean_line.get_ydata()) == switched.last_outcome.grid_mean


def test_lr_curve_is_the_schedule(switched):
    fig = plot_autowu(switched)
    lr_line = next(line for line in fig.axes[1].get_lines() if line.get_label() == "learning rate")
    steps, lrs = lr_line.get_xdata(), lr_line.get_ydata()
    assert list(lrs) == [switched.lr_at(int(s)) for s in steps]
    assert {switched.switch_step - 1, switched.switch_step} <= set(steps)


def test_figure_before_the_switch_has_no_switch_marks():
    scheduler = drive(60)
    fig = plot_autowu(scheduler.state_dict())
    assert "no switch yet" in fig.axes[0].get_title()
    assert not [a for ax in fig.axes for a in ax.get_children() if a.get_gid() in (SWITCH_GID, PEAK_LR_GID)]
    planned = next(line for line in fig.axes[1].get_lines() if line.get_label() == "planned learning rate")
    steps, lrs = planned.get_xdata(), planned.get_ydata()
    assert steps[0] == 60 and steps[-1] == TOTAL_STEPS - 1
    assert list(lrs) == [scheduler.lr_at(int(s)) for s in steps]  # the plan: warmup to its cap, then decay


def test_save_autowu_figure_writes_autowu_png(switched, tmp_path):
    path = save_autowu_figure(switched, tmp_path / "out")
    assert path == str(tmp_path / "out" / "autowu.png")
    assert png_size(tmp_path / "out" / "autowu.png") == (800, 450)


def test_log_figure_to_tensorboard_writes_an_image(switched, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        log_figure_to_tensorboard(writer, plot_autowu(switched), step=switched.switch_step)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("autowu")
    assert (image.step, image.width, image.height) == (switched.switch_step, 800, 450)


def test_matplotlib_stays_optional(switched, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    importlib.reload(hf_autowu.plotting)  # the module imports without it
    assert save_autowu_figure(switched, tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_a_chosen_lr_below_min_lr_is_on_the_lr_axis():
    """A flat loss that turns non-finite early on a long ramp: the LR chosen (below `min_lr`) and the schedule after
    the switch are inside the LR axis, not below it."""
    scheduler = AutoWU(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=3000)
    for step in range(100):
        scheduler.step(math.nan if step >= 40 else 2.0 + 0.01 * math.sin(step))
    assert scheduler.switch_reason == "divergence" and scheduler.peak_lr < 0.5 * scheduler.config.min_lr
    low, high = plot_autowu(scheduler).axes[1].get_ylim()
    assert low <= scheduler.peak_lr <= high
