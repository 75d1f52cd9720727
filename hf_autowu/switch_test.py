"""The switch test: is the minimum of the smoothed warmup loss confidently in the past?

This is the fast path used by `AutoWU`. `hf_autowu.reference` holds a slow, step-by-step version written
from the specification; the tests check that both make the same decisions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from scipy.special import ndtr

from .gp import FIT_LR, GRID_SIZE, NOISE_INIT, VARIANCE_JITTER, ClosedFormLossCurveGP, kernel_features
from .ramp import lr_at_fraction

MIN_FINITE_LOSSES = 3
FIT_SUBSAMPLE = 100
PREDICT_SUBSAMPLE = 500
MAX_GP_FAILURES = 10
CONFIDENT_CHANGE_SD = 3.0
"""A change of the smoothed loss counts as real (a rise back, a descent) beyond this many GP noise standard
deviations."""
START_NOISE_LOSSES = 20
"""How many of the first finite losses `start_noise_sd` reads (the robust preset's `min_losses`: as many as the first
switch test needs)."""
LEVEL_WINDOW = 10
"""Losses per median in `level_fall`: the median of ten has about 0.4 of one loss's noise."""
RAMP_LEVEL_PARTS = 3
"""`fell_over_ramp` reads medians of a third of the ramp's losses (never fewer than `LEVEL_WINDOW`)."""
MAD_TO_SD = 1.4826
"""A normal distribution's standard deviation per median absolute deviation."""
SWING_FLOOR_SD = 1.0
"""A rise-back of the smoothed loss before its minimum counts as a swing (`rise_backs`) beyond this many GP noise
standard deviations; a smaller one is within the noise."""


@dataclass
class SwitchTestOutcome:
    """What one switch test found.

    Attributes:
        probabilities (`list[float]`): Per prediction, the probability that the minimum is in the past.
        votes (`int`): Predictions whose probability exceeds the confidence.
        passed (`bool`): Whether more than half of the predictions voted "past".
        lr_estimate (`float`): Mean over predictions of the LR at the argmin of the posterior mean.
        rising (`bool`): Whether the posterior mean now is above its value at the start of the history and
            more than three noise standard deviations above its minimum.
        grid_mean (`list[float]`): Posterior mean on the grid (loss units, averaged over predictions).
        grid_std (`list[float]`): Posterior standard deviation of the latent curve on the grid (loss units).
        n_losses (`int`): Length of the history the test saw; grid point `x` stands for step `x * n_losses`.
        noise_sd (`float`): The GP's observation noise standard deviation (loss units).
        descended (`bool`): Whether the posterior mean's minimum lies more than three noise standard deviations
            below its value at the start of the history: the loss has really fallen, so its minimum is not noise.
        descended_from_start (`bool` or `None`): Whether the losses' level fell (`level_fall`, medians of
            `LEVEL_WINDOW` losses in a row) by more than three standard deviations of the noise of the first losses
            (`start_noise_sd`); `None` when that noise cannot be measured (fewer than three finite losses among the
            first `START_NOISE_LOSSES`, or none at all). The blow-up rule reads it instead of `descended`: where the
            noise grows as the model learns (a preference loss, flat and quiet while the policy is its reference),
            the GP's one noise level is mostly the later noise and a real fall reads as none.
        resolved (`bool`): Whether the LR the test would choose lies at least `min_past_lengthscales` GP
            lengthscales before the end of the history and, on a history of fewer than `descent_required_below`
            losses, whether the loss `descended`; a passed test counts toward the switch only then.
        fell_over_ramp (`bool` or `None`): Set only for the test at the warmup cap, where `fell` read no fall:
            whether the level fell over the whole ramp, in medians of a third of it (`fell_over_ramp`); the cap
            decays from `min_lr` only when neither did.
    """

    probabilities: list[float]
    votes: int
    passed: bool
    lr_estimate: float
    rising: bool
    grid_mean: list[float] = field(repr=False)
    grid_std: list[float] = field(repr=False)
    n_losses: int = 0
    noise_sd: float = math.nan
    descended: bool = True
    resolved: bool = True
    descended_from_start: bool | None = None
    fell_over_ramp: bool | None = None

    @property
    def fell(self) -> bool:
        """Whether the loss really fell before this test, as the blow-up rule judges it: `descended_from_start` where
        the first losses' noise could be measured, else `descended`."""
        return self.descended if self.descended_from_start is None else self.descended_from_start

    @property
    def probability(self) -> float:
        """Mean probability over the predictions."""
        return sum(self.probabilities) / len(self.probabilities) if self.probabilities else math.nan


def minimum_in_past_probability(
    mean: np.ndarray, diff_variance: np.ndarray, margin: float | np.ndarray = 0.0
) -> np.ndarray:
    """`max_{i<k} P(f_k - f_i > margin)` for a Gaussian posterior, `k` the last grid point: the probability that
    the curve now lies more than `margin` above some earlier point (with `margin=0`, the paper's
    `max_{i<k} P(f_i < f_k)`).

    Args:
        mean (`np.ndarray`): Posterior means, shape (..., g).
        diff_variance (`np.ndarray`): Variances of `f_i - f_k` for i < k, shape (..., g - 1).
        margin (`float` or `np.ndarray`, *optional*, defaults to 0): How far above (in the units of `mean`); an
            array of shape (..., 1) sets one margin per curve.

    Returns:
        `np.ndarray`: the probability, shape (...).
    """
    gap = mean[..., -1:] - mean[..., :-1] - margin
    z = gap / np.sqrt(np.maximum(diff_variance, 0.0) + VARIANCE_JITTER)
    return ndtr(z.max(axis=-1))


def rise_backs(mean: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """The largest rise-back of each curve before its minimum: the most it climbs above the lowest point before it on
    its way down (0 for a curve that never climbs before its minimum). A loss with structure the GP does not model (a
    periodic swing from data in a fixed order, noise correlated over many steps) rises and falls on its own, and the
    smoothed curve shows it as bumps on its descent.

    Args:
        mean (`np.ndarray`): Posterior means, shape (p, g).
        floor (`float`, *optional*, defaults to 0): A rise-back no larger than this counts as 0 (in the units of
            `mean`).

    Returns:
        `np.ndarray`: the rise-backs, shape (p,).
    """
    before_minimum = np.arange(mean.shape[-1]) <= mean.argmin(axis=-1)[:, None]
    climbs = np.where(before_minimum, mean - np.minimum.accumulate(mean, axis=-1), 0.0).max(axis=-1)
    return np.where(climbs > floor, climbs, 0.0)


def start_noise_sd(values: np.ndarray) -> float:
    """A robust standard deviation of the step-to-step noise at the start of a loss history: the median absolute
    deviation of the differences of its first `START_NOISE_LOSSES` finite entries, scaled to a normal's standard
    deviation and divided by sqrt(2) (a difference holds two draws of the noise). The median takes out a steady
    trend and ignores a few outlying steps.

    Args:
        values (`np.ndarray`): The loss history, shape (n,); non-finite entries are skipped.

    Returns:
        `float`: the standard deviation, in the units of `values`; NaN with fewer than three finite entries.
    """
    finite = values[np.isfinite(values)][:START_NOISE_LOSSES]
    diffs = np.diff(finite)
    if diffs.size < 2:
        return math.nan
    return float(MAD_TO_SD * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2.0))


def level_fall(values: np.ndarray, window: int = LEVEL_WINDOW) -> float:
    """How far the loss's level fell below its start: the median of the first `window` finite entries minus the
    lowest median of `window` consecutive finite entries. Medians of raw losses, not the GP's smoothed curve: before
    a sharp rise a smooth posterior mean can dip below the losses it fits, a fall that never happened.

    Args:
        values (`np.ndarray`): The loss history, shape (n,); non-finite entries are skipped.
        window (`int`, *optional*, defaults to `LEVEL_WINDOW`): Losses per median.

    Returns:
        `float`: the fall, in the units of `values` (0 with fewer than `window` finite entries).
    """
    finite = values[np.isfinite(values)]
    if finite.size < window:
        return 0.0
    levels = sliding_medians(finite, window)
    return float(levels[0] - levels.min())


def sliding_medians(values: np.ndarray, window: int) -> np.ndarray:
    """The median of every `window` consecutive entries, as `np.median` over `sliding_window_view(values, window)`
    gives it (the mean of the two middle values for an even `window`), in O(n) memory: one or two 1-D rank filters
    (`scipy.ndimage.rank_filter`) instead of a copy of every window. `fell_over_ramp` reads windows of a third of
    the ramp, so a copy would take about n^2 / 4.5 floats (4 GB at 50,000 losses, on every process). scipy's 1-D
    rank filter takes O(n log window) time since scipy 1.15 (before, O(n window): 8-13 s for 30,000 losses and windows
    of 10,000 against 0.04 s).

    Args:
        values (`np.ndarray`): Finite entries, shape (n,) with n >= `window`.
        window (`int`): Entries per median, at least 1.

    Returns:
        `np.ndarray`: the medians, shape (n - window + 1,); entry i is the median of `values[i:i + window]`.
    """
    half = window // 2  # a filter of even size reaches `half` entries back and `half - 1` forward of its centre
    medians = ndimage.rank_filter(values, half, size=window, mode="nearest")
    if window % 2 == 0:
        medians = (ndimage.rank_filter(values, half - 1, size=window, mode="nearest") + medians) / 2
    return medians[half : half + values.size - window + 1]


def level_fell(values: np.ndarray, window: int = LEVEL_WINDOW) -> bool | None:
    """Whether the losses' level fell: `level_fall` in medians of `window` losses beyond three standard deviations
    of the first losses' noise (`start_noise_sd`), scaled by `sqrt(LEVEL_WINDOW / window)` (a median of `window`
    losses holds that much less of their noise than one of ten). With `window=LEVEL_WINDOW` this is
    `SwitchTestOutcome.descended_from_start`.

    Args:
        values (`np.ndarray`): The loss history, shape (n,); non-finite entries are skipped.
        window (`int`, *optional*, defaults to `LEVEL_WINDOW`): Losses per median.

    Returns:
        `bool` or `None`: whether the level fell; None when the first losses' noise cannot be measured or is 0.
    """
    sd = start_noise_sd(values)
    if not 0.0 < sd < math.inf:
        return None
    return bool(level_fall(values, window) > CONFIDENT_CHANGE_SD * sd * math.sqrt(LEVEL_WINDOW / window))


def fell_over_ramp(values: np.ndarray) -> bool:
    """Whether the losses' level fell over a whole warmup ramp, judged with long windows: `level_fell` with
    `max(LEVEL_WINDOW, n // RAMP_LEVEL_PARTS)` losses per median (`n` finite losses). Medians of ten see a real fall
    as none when one loss's noise is a large part of its level (a regression on small batches: the loss falls from
    3.2 to 0.4, each loss +-0.9); a third of a long ramp averages that noise out. On losses that carry no signal it
    passes as rarely as medians of ten (in simulations of Gaussian, Student-t and log-normal noise, 20 to 600
    losses, under 0.3% of histories, against up to 1.4% for medians of ten).

    Args:
        values (`np.ndarray`): The loss history, shape (n,); non-finite entries are skipped.

    Returns:
        `bool`: whether the level fell; False when the first losses' noise cannot be measured or is 0.
    """
    window = max(LEVEL_WINDOW, int(np.isfinite(values).sum()) // RAMP_LEVEL_PARTS)
    return bool(level_fell(values, window))


def slowed_descent_index(mean: np.ndarray, fraction: float, max_descent_left: float = 1.0) -> int:
    """Where the posterior mean's descent has slowed to `fraction` of its steepest rate, before its minimum.

    On the warmup ramp the grid is linear in log-LR (exponential ramp), so the slope is the loss's change per
    log-LR. The loss falls fastest at some LR, then flattens before it turns up; the returned point is the first
    one after the steepest descent where the slope is no steeper than `fraction` of that steepest slope: the LR
    beyond which more LR bought little more progress in the ramp. With `fraction` 0 it is the argmin (the
    paper's choice).

    A descent can pause and go on: a steep drop, then a long, slower fall to a minimum far beyond it. More LR still
    bought progress there, so with `max_descent_left` < 1 the point is never earlier than the first one where at
    most that fraction of the descent (from the highest point before the minimum down to the minimum) is still
    ahead.

    Args:
        mean (`np.ndarray`): Posterior mean on the grid, shape (g,).
        fraction (`float`): Share of the steepest slope, in [0, 1).
        max_descent_left (`float`, *optional*, defaults to 1): Largest share of the descent still ahead of the
            point, in [0, 1]; 1 sets no bound.

    Returns:
        `int`: the grid index.
    """
    lowest = int(mean.argmin())
    if fraction <= 0.0 or lowest == 0:
        return lowest
    slope = np.gradient(mean)
    steepest = int(slope[: lowest + 1].argmin())
    if slope[steepest] >= 0.0:
        return lowest
    slowed = np.flatnonzero(slope[steepest : lowest + 1] >= fraction * slope[steepest])
    index = steepest + int(slowed[0]) if slowed.size else lowest  # never slowed: the descent ends at the minimum
    if max_descent_left < 1.0:
        descent = mean[: lowest + 1]
        mostly_done = np.flatnonzero(descent <= mean[lowest] + max_descent_left * (descent.max() - mean[lowest]))
        index = max(index, int(mostly_done[0]))
    return index


def subsample_sorted(indices: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """At most `size` of `indices`, drawn without replacement by `generator`, in their original order.

    Floyd's algorithm: `size` uniform draws give `size` distinct positions, so the cost does not grow with the
    history. The generator is only consumed when there is something to draw, so equal histories draw equally.
    """
    n = indices.numel()
    if n <= size:
        return indices
    draws = torch.rand(size, generator=generator, dtype=torch.float64).tolist()
    chosen: set[int] = set()
    for j, u in zip(range(n - size, n), draws, strict=True):
        t = min(int(u * (j + 1)), j)
        chosen.add(j if t in chosen else t)
    return indices[torch.tensor(sorted(chosen))]


_SQUARES_SAFE = (1e-100, 1e100)
"""Spreads of the losses whose squares a float64 standard deviation computes without underflow or overflow."""


def standardize(values: np.ndarray, finite: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Shift and scale `values` so that its finite entries have mean 0 and standard deviation 1.

    Returns:
        `tuple`: the standardised values, and the (shift, scale) that undo it.
    """
    kept = values[finite]
    with np.errstate(over="ignore"):
        shift = float(kept.mean())
    if not math.isfinite(shift):  # a sum past float64's range (losses near 1e306): the mean of the values scaled down
        peak = float(np.abs(kept).max())
        shift = peak * float((kept / peak).mean())
    spread = float(np.abs(kept - shift).max()) if kept.size > 1 else 0.0
    if 0.0 < spread < math.inf and not _SQUARES_SAFE[0] < spread < _SQUARES_SAFE[1]:
        # losses whose squares overflow (beyond ~1e154) or underflow (below ~1e-154): the same standard deviation,
        # computed on the deviations brought to order 1 (in between, the plain one: decisions stay bit for bit)
        scale = spread * float(((kept - shift) / spread).std())
    else:
        scale = float(kept.std()) if kept.size > 1 else 0.0
    if not (scale > 0.0 and scale < math.inf):
        scale = 1.0
    return (values - shift) / scale, shift, scale


class SwitchTester:
    """Runs switch tests on a growing loss history, keeping the GP and the subsampling generator between tests.

    Args:
        confidence (`float`): A prediction votes "past" when its probability exceeds this.
        n_tests (`int`): Number of predictions per test.
        standardize_losses (`bool`): Standardise the losses before fitting (scale-invariant decisions).
        seed (`int`): Seed of the subsampling generator.
        min_losses (`int`, *optional*, defaults to 3): Fewest finite losses a test needs.
        fit_lr (`float`, *optional*, defaults to 0.01): Adam's learning rate for the hyperparameters.
        noise_init (`float`, *optional*, defaults to 1e-3): Initial GP noise variance.
        rise_margin (`float`, *optional*, defaults to 0): A prediction votes "past" only when the curve now lies
            more than this many GP noise standard deviations above its minimum (0: the paper's test).
        swing_margin (`float`, *optional*, defaults to 0): A prediction votes "past" only when the curve now lies
            more than this many times its largest rise-back before its minimum (`rise_backs`, counting rise-backs of
            more than `SWING_FLOOR_SD` GP noise standard deviations) above that minimum: a rise no larger than the
            swings the loss made while it was still falling is no evidence that the minimum is past (0: the paper's
            test).
        slowed_fraction (`float`, *optional*, defaults to 0): The LR estimate is at `slowed_descent_index(mean,
            slowed_fraction, max_descent_left)` of each prediction (0: the argmin, the paper's choice).
        min_past_lengthscales (`float`, *optional*, defaults to 0): A test is `resolved` only when the chosen
            point (mean over the predictions) lies at least this many GP lengthscales before the latest loss (0:
            always, the paper's test). Within a lengthscale of the end of the data the posterior is shaped by the
            kernel as much as by the losses: after a sharp drop into a flat stretch the smoothed curve dips below
            the losses at the corner and seems to rise after it, so a minimum at the very end seems confidently
            past.
        max_descent_left (`float`, *optional*, defaults to 1): See `slowed_descent_index` (1: no bound).
        descent_required_below (`int`, *optional*, defaults to 0): On a history of fewer than this many losses a
            test is `resolved` only when it also `descended` (0: never asked, the paper's test). The first tests
            see a few dozen losses and a lengthscale of a few steps; on a flat, noisy start (a fine-tune's) the
            smoothed minimum can be noise that a later rise seems to confirm.
    """

    def __init__(
        self,
        *,
        confidence: float,
        n_tests: int,
        standardize_losses: bool,
        seed: int,
        min_losses: int = MIN_FINITE_LOSSES,
        fit_lr: float = FIT_LR,
        noise_init: float = NOISE_INIT,
        rise_margin: float = 0.0,
        swing_margin: float = 0.0,
        slowed_fraction: float = 0.0,
        min_past_lengthscales: float = 0.0,
        max_descent_left: float = 1.0,
        descent_required_below: int = 0,
    ):
        self.confidence = confidence
        self.swing_margin = swing_margin
        self.descent_required_below = descent_required_below
        self.rise_margin = rise_margin
        self.slowed_fraction = slowed_fraction
        self.min_past_lengthscales = min_past_lengthscales
        self.max_descent_left = max_descent_left
        self.n_tests = n_tests
        self.standardize_losses = standardize_losses
        self.min_losses = min_losses
        self.gp = ClosedFormLossCurveGP(fit_lr=fit_lr, noise_init=noise_init)
        self.generator = torch.Generator().manual_seed(seed)
        self._grid = np.linspace(0.0, 1.0, GRID_SIZE)
        self._grid_features = kernel_features(self._grid, self.gp.lengthscale)

    def run(
        self, losses: torch.Tensor, *, current_lr: float, min_lr: float, warmup_type: str
    ) -> SwitchTestOutcome | None:
        """Fit the GP to `losses` and test whether the minimum is in the past.

        Args:
            losses (`torch.Tensor`): All losses recorded in warmup, float64 on the CPU; non-finite ones hold
                their place on the time axis but are not fitted.
            current_lr (`float`): LR of the most recent step (the end of the time axis).
            min_lr (`float`): LR at the start of the history.
            warmup_type (`str`): `"exp"` or `"linear"`, to map the argmin back to an LR.

        Returns:
            `SwitchTestOutcome`, or `None` when the test cannot be made (fewer than `min_losses` finite losses,
            or the GP failed numerically `MAX_GP_FAILURES` times; a warning says so).
        """
        values = losses.detach().to("cpu", torch.float64).numpy()
        finite = np.isfinite(values)
        valid = torch.from_numpy(np.flatnonzero(finite))
        if valid.numel() < self.min_losses:
            return None
        shift, scale = 0.0, 1.0
        if self.standardize_losses:
            values, shift, scale = standardize(values, finite)
        n_total = values.size

        fit_idx = subsample_sorted(valid, FIT_SUBSAMPLE, self.generator).numpy()
        before = self.gp.state_dict()
        with np.errstate(all="ignore"):
            self.gp.fit(fit_idx / n_total, values[fit_idx], mean_init=float(values[finite].mean()))
        if not all(math.isfinite(v) for v in self.gp.raw):
            self.gp.load_state_dict(before)
            warnings.warn("AutoWU: the GP fit diverged numerically; this switch test is skipped.", stacklevel=2)
            return None

        predictions = self._predict(valid, values, n_total)
        if predictions is None:
            return None
        mean, variance, diff_variance = predictions
        margin = self.rise_margin * math.sqrt(self.gp.noise)
        if self.swing_margin > 0.0:  # one margin per prediction: its own swings
            swings = rise_backs(mean, SWING_FLOOR_SD * math.sqrt(self.gp.noise))
            margin = np.maximum(margin, self.swing_margin * swings)[:, None]
        probabilities = minimum_in_past_probability(mean, diff_variance, margin)
        votes = int((probabilities > self.confidence).sum())
        chosen = self._grid[[slowed_descent_index(m, self.slowed_fraction, self.max_descent_left) for m in mean]]
        avg_mean = mean.mean(axis=0)
        lr_estimates = [
            lr_at_fraction(float(x), min_lr=min_lr, current_lr=current_lr, warmup_type=warmup_type) for x in chosen
        ]
        lowest = avg_mean.min()
        confident_change = CONFIDENT_CHANGE_SD * math.sqrt(self.gp.noise)
        descended = bool(avg_mean[0] - lowest > confident_change)
        descended_from_start = level_fell(values)
        resolved = 1.0 - float(chosen.mean()) >= self.min_past_lengthscales * self.gp.lengthscale
        return SwitchTestOutcome(
            probabilities=probabilities.tolist(),
            votes=votes,
            passed=votes > self.n_tests / 2,
            lr_estimate=sum(lr_estimates) / len(lr_estimates),
            rising=bool(avg_mean[-1] > avg_mean[0] and avg_mean[-1] - lowest > confident_change),
            grid_mean=(avg_mean * scale + shift).tolist(),
            grid_std=(np.sqrt(np.maximum(variance.mean(axis=0), 0.0)) * scale).tolist(),
            n_losses=n_total,
            noise_sd=math.sqrt(self.gp.noise) * scale,
            descended=descended,
            resolved=bool(resolved and (descended or n_total >= self.descent_required_below)),
            descended_from_start=descended_from_start,
        )

    def _predict(
        self, valid: torch.Tensor, values: np.ndarray, n_total: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """`n_tests` posterior predictions, each conditioned on its own subsample (one when all fit in one).

        A numerical failure is retried with another subsample; after `MAX_GP_FAILURES` the test is skipped.
        """
        distinct = valid.numel() > PREDICT_SUBSAMPLE
        results, failures = [], 0
        while len(results) < (self.n_tests if distinct else 1):
            idx = subsample_sorted(valid, PREDICT_SUBSAMPLE, self.generator).numpy()
            try:
                with np.errstate(all="ignore"):
                    post = self.gp.predict(idx / n_total, values[idx], self._grid_features)
            except np.linalg.LinAlgError:
                failures += 1
                if failures >= MAX_GP_FAILURES or not distinct:  # without subsampling a retry cannot differ
                    warnings.warn(
                        f"AutoWU: the GP failed numerically {failures} time(s); this switch test is skipped.",
                        stacklevel=3,
                    )
                    return None
                continue
            results.append((post["mean"], post["variance"], post["diff_variance"]))
        if failures:
            warnings.warn(f"AutoWU: the GP failed numerically {failures} time(s) and was retried.", stacklevel=3)
        repeat = 1 if distinct else self.n_tests
        return tuple(np.stack([r[i] for r in results] * repeat) for i in range(3))

    def state_dict(self) -> dict:
        """GP hyperparameters, optimizer moments and generator state."""
        return {"gp": self.gp.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.gp.load_state_dict(state["gp"])
        self.generator.set_state(state["generator"])
