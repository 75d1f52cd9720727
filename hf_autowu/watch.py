"""The spike watch: catch a warmup loss that blows up between two switch tests, on the next step, without a sync.

Each optimizer step's loss is read one step late: a CUDA loss is copied to pinned host memory with
`non_blocking=True` when `AutoWU.step(loss)` receives it, and read at the next step, by which time the GPU has
normally finished that copy (the only wait is for the previous step's work, never the current one's; a CPU loss
is read the same way, so decisions do not depend on the device).

The reference is set at each switch test: the median of the latest `LEVEL_WINDOW` losses (the level), the
step-to-step noise of the latest `NOISE_WINDOW`, or of as many as the reference will judge until the next test where
that is more (their median absolute change, as a standard deviation; when they are all equal, the smallest change
seen, the step of a coarsely rounded loss), and the progress made since warmup
began (the level of the first losses minus the level now). A blow-up undoes progress: the margin above the level is
the larger of `threshold` noise standard deviations and `PROGRESS_FRACTION` of the progress, so the check is
scale-free and shift-free (it reads differences of losses only: a constant added to the loss, or a negative loss,
changes nothing), a falling or slowly rising curve stays below it, and a bump before the loss has fallen clearly
(by `threshold` noise standard deviations) is left to the switch test. A spike is a
loss above the margin on `confirm` consecutive steps, a loss `EXTREME_FACTOR` margins above the level (at once),
or a non-finite loss (at once, always). Each loss is checked once, whether by the step that reads it or by a
switch test's scan.

With several processes each one only sees its own loss, and acting on it alone would let the processes disagree;
there the scheduler runs the same check on the cross-process mean losses: every `RELAY_EVERY` warmup steps it starts
averaging the losses it holds over the processes (one asynchronous `all_reduce`, no host wait) and checks the means
a step later, so a blow-up is caught at most `RELAY_EVERY - 1` steps after one process would catch it (a loss is
read 1 to `RELAY_EVERY` steps late instead of 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .switch_test import MAD_TO_SD

SPIKE_THRESHOLD = 6.0
"""How many noise standard deviations above the smoothed curve a loss must be to count as a spike."""
SPIKE_CONFIRM = 2
"""Consecutive losses above the threshold that make a spike (a non-finite loss is one at once)."""
EXTREME_FACTOR = 4.0
"""A loss this many times `threshold` noise standard deviations above the level is a spike at once."""
PROGRESS_FRACTION = 0.25
"""The share of the progress since warmup began that a loss must give back (at least) to count as a spike."""
LEVEL_WINDOW = 5
"""How many of the latest losses set the reference level (their median)."""
NOISE_WINDOW = 20
"""How many of the latest losses set the reference noise."""
RELAY_EVERY = 4
"""With several processes: warmup steps between two averagings of the losses for the watch (a collective every this
many steps, never a host wait for the current step's work)."""
_MAD_TO_SD = MAD_TO_SD / math.sqrt(2.0)  # median |x_t - x_{t-1}| of Gaussian noise, as its standard deviation


class LossSpikeWatch:
    """Reads each warmup loss one step late and says when a spike started.

    Args:
        threshold (`float`, *optional*, defaults to 6.0): Noise standard deviations above the smoothed curve.
        confirm (`int`, *optional*, defaults to 2): Consecutive losses above it that make a spike.
    """

    def __init__(self, threshold: float = SPIKE_THRESHOLD, confirm: int = SPIKE_CONFIRM):
        self.threshold = threshold
        self.confirm = confirm
        self.level: float | None = None
        self.noise_sd: float | None = None
        self.start_level: float | None = None
        self.margin: float | None = None  # how far above the level a loss counts as high; None while unarmed
        self._run_start: int | None = None
        self._run_length = 0
        self._previous: tuple[int, Any, Any] | None = None  # (index, value holder, CUDA event or None)
        self._pinned: torch.Tensor | None = None  # one pinned float: the previous loss is read before it is reused
        self.non_finite = False  # whether the spike found last began with a non-finite loss

    def set_reference(self, losses: torch.Tensor, judged: int = NOISE_WINDOW) -> None:
        """Set the level, noise and margin from the finite losses of `losses` (the history at a switch test).

        Args:
            losses (`torch.Tensor`): The warmup's losses so far.
            judged (`int`, *optional*, defaults to `NOISE_WINDOW`): How many losses this reference will judge (the
                steps until the next test). The noise is read from at least as many of the latest losses: one
                reference judges hundreds of losses at long budgets, and a noise read from 20 is too often low by
                chance for that.
        """
        finite = losses[torch.isfinite(losses)]
        if finite.numel() < LEVEL_WINDOW:
            return
        if self.start_level is None:
            self.start_level = float(finite[:LEVEL_WINDOW].median())
        recent = finite[-max(NOISE_WINDOW, judged) :]
        noise_sd = float((recent[1:] - recent[:-1]).abs().median()) * _MAD_TO_SD
        if noise_sd == 0.0:  # most recent losses equal (a float16 loss's coarse steps, a floor of exactly 0)
            noise_sd = _smallest_change(finite)
        level = float(finite[-LEVEL_WINDOW:].median())
        if not (math.isfinite(noise_sd) and math.isfinite(level)):
            return
        self.level, self.noise_sd = level, noise_sd
        progress = self.start_level - level  # differences only: a constant added to the loss changes nothing
        armed = noise_sd > 0 and progress > self.threshold * noise_sd
        self.margin = max(self.threshold * noise_sd, PROGRESS_FRACTION * progress) if armed else None

    def observe(self, index: int, loss: torch.Tensor | float) -> int | None:
        """Take loss number `index` and check the previous one.

        Returns:
            `int` or `None`: the index of the first loss of a spike, once confirmed.
        """
        found = None
        if self._previous is not None:
            found = self.check(self._previous[0], self._read(self._previous))
        self._previous = self._hold(index, loss)
        return found

    def check(self, index: int, value: float) -> int | None:
        """Check loss number `index` (they must come in order); the index of the first loss of a confirmed spike."""
        if not math.isfinite(value):
            self.non_finite = True
            return index
        if self.margin is None or value <= self.level + self.margin:
            self._run_start, self._run_length = None, 0
            return None
        if value > self.level + EXTREME_FACTOR * self.margin:
            self.non_finite = False
            return index if self._run_start is None else self._run_start
        if self._run_start is None:
            self._run_start = index
        self._run_length += 1
        if self._run_length < self.confirm:
            return None
        self.non_finite = False
        return self._run_start

    def scan(self, values: torch.Tensor, first_index: int) -> int | None:
        """`check` every value of `values` (losses `first_index`, `first_index + 1`, ...); the first spike found.

        A loss held for the next step (`observe`) that the scan checked is dropped: each loss is checked once, or one
        high loss that arrives at a switch test would count twice, a run of two (a confirmed spike).
        """
        found, last = None, first_index - 1
        for offset, value in enumerate(values.tolist()):
            last = first_index + offset
            found = self.check(last, value)
            if found is not None:
                break
        if self._previous is not None and first_index <= self._previous[0] <= last:
            self._previous = None
        return found

    def _hold(self, index: int, loss: torch.Tensor | float) -> tuple[int, Any, Any] | None:
        """Keep loss `index` to read at the next step: a float, a CPU tensor, or a pinned copy of a CUDA tensor."""
        if not isinstance(loss, torch.Tensor):
            return index, float(loss), None
        if loss.device.type == "cpu":
            return index, loss, None
        if loss.device.type != "cuda":
            return None  # reading it would sync; the check runs at the next switch test instead
        if self._pinned is None:
            self._pinned = torch.empty((), dtype=torch.float64, pin_memory=True)
        self._pinned.copy_(loss.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return index, self._pinned, event

    def _read(self, held: tuple[int, Any, Any]) -> float:
        _, value, event = held
        if event is not None:
            event.synchronize()  # the previous step's copy: normally finished already
        return float(value)

    def forget_held(self, before: int) -> None:
        """Drop the loss held for the next step, and any run of high losses: a retry after a non-finite loss has
        settled the losses so far (`AutoWU._retry_after_non_finite`).

        Args:
            before (`int`): Only the losses before this index are settled: a held loss from this index on stays
                held, to be checked at the next step.
        """
        if self._previous is not None and self._previous[0] < before:
            self._previous = None
        self._run_start, self._run_length = None, 0
        self.non_finite = False

    def state_dict(self) -> dict[str, Any]:
        """Reference, run of high losses, and the loss not read yet (read now: a checkpoint is a sync point)."""
        previous = None if self._previous is None else [self._previous[0], self._read(self._previous)]
        return {
            "level": self.level,
            "noise_sd": self.noise_sd,
            "start_level": self.start_level,
            "margin": self.margin,
            "run_start": self._run_start,
            "run_length": self._run_length,
            "previous": previous,
            "non_finite": self.non_finite,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.level, self.noise_sd = state["level"], state["noise_sd"]
        self.start_level, self.margin = state["start_level"], state["margin"]
        self._run_start, self._run_length = state["run_start"], int(state["run_length"])
        previous = state["previous"]
        self._previous = None if previous is None else (int(previous[0]), float(previous[1]), None)
        self.non_finite = bool(state.get("non_finite", False))


def _smallest_change(losses: torch.Tensor) -> float:
    """The smallest nonzero change between two consecutive losses of `losses` (the step of a coarsely rounded loss),
    as the noise of a window whose losses are all equal; 0 when no two differ."""
    changes = (losses[1:] - losses[:-1]).abs()
    changes = changes[changes > 0]
    return float(changes.min()) if changes.numel() else 0.0
