"""The GPyTorch model of the loss curve, and a slow switch test written step by step from the specification.

It uses GPyTorch the textbook way (exact marginal log likelihood, `torch.optim.Adam`, dense predictive
covariance) and is kept to check the fast path in `hf_autowu.switch_test`, decision for decision, and to
measure what the fast path saves. It is not used during training. It shares no code with the fast path: its
constants are ALGORITHM.md's, written out here, and it draws its subsamples with its own sampler.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

with warnings.catch_warnings():  # linear_operator scripts a function with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
    import gpytorch
    from linear_operator.utils.errors import NotPSDError

# The constants of ALGORITHM.md, "The switch test".
LENGTHSCALE = 0.2  # 1. RBF lengthscale, fixed
NOISE_INIT = 1e-3  # 1. initial noise variance (the paper; the robust preset starts from 0.1)
FIT_POINTS = 100  # 2. at most this many points for the fit
FIT_ITERATIONS = 100  # 2. Adam iterations per fit
FIT_LR = 0.01  # 2. Adam's learning rate (the paper; the robust preset uses 0.05)
PREDICT_POINTS = 500  # 3. at most this many points per prediction
GRID_POINTS = 500  # 3. evenly spaced prediction points on [0, 1]
VARIANCE_JITTER = 1e-4  # 4. added to the variance of f_i - f_k
MAX_FAILURES = 10  # numerical failures before a test gives up
SWING_FLOOR_SDS = 1.0  # robust preset: a bump of the mean before its minimum counts beyond this many noise sds
START_NOISE_LOSSES = 20  # robust preset: the first losses whose noise a descent after a blow-up is judged against
LEVEL_WINDOW = 10  # robust preset: losses per median when that descent is measured
RISE_NOISE_SDS = 3.0  # robust preset: how far above its minimum the mean must be now to count as rising, and
# how far below its start the minimum must lie to count as a real descent


class LossCurveGP(gpytorch.models.ExactGP):
    """Exact GP regression of the loss curve on the normalised time axis [0, 1].

    Args:
        likelihood (`gpytorch.likelihoods.GaussianLikelihood`): The observation model.
        lengthscale (`float`, *optional*, defaults to 0.2): RBF lengthscale; it is fixed (not trained).
    """

    def __init__(self, likelihood: gpytorch.likelihoods.GaussianLikelihood, lengthscale: float = LENGTHSCALE):
        super().__init__(None, None, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        self.covar_module.base_kernel.lengthscale = lengthscale
        self.covar_module.base_kernel.raw_lengthscale.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@dataclass
class ReferenceOutcome:
    """Outcome of one reference switch test.

    Attributes:
        probabilities (`list[float]`): Per prediction, the probability that the minimum is in the past.
        votes (`int`): Predictions whose probability exceeds the confidence.
        passed (`bool`): Whether more than half of the predictions voted "past".
        lr_estimate (`float`): The LR to decay from (see `estimate_lr`).
        rising (`bool`): Whether the mean posterior mean (over the predictions) now is above its value at the
            start of the history and more than three noise standard deviations above its minimum.
        descended (`bool`): Whether the minimum of that mean lies more than three noise standard deviations
            below its value at the start of the history.
        descended_from_start (`bool` or `None`): Whether the lowest median of 10 consecutive finite losses lies
            more than three standard deviations of the noise of the first 20 (the median absolute deviation of
            their differences, as a normal's standard deviation, over sqrt 2) below the median of the first 10;
            `None` when that noise is not positive (fewer than three of them, or no spread).
        resolved (`bool`): Whether the chosen point (mean over the predictions) lies at least
            `min_past_lengthscales` lengthscales before the end of the history and, on a history of fewer than
            `descent_required_below` losses, whether the loss `descended`.
    """

    probabilities: list[float]
    votes: int
    passed: bool
    lr_estimate: float
    rising: bool
    descended: bool
    resolved: bool
    descended_from_start: bool | None


def random_subset_in_time_order(positions: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """At most `size` of `positions`: all of them when they fit, else a uniformly random subset drawn without
    replacement (the first `size` entries of a random permutation), sorted back into time order."""
    if len(positions) <= size:
        return positions
    chosen = torch.randperm(len(positions), generator=generator)[:size]
    return positions[chosen.sort().values]


def chosen_point(mu: torch.Tensor, slowed_fraction: float, max_descent_left: float = 1.0) -> int:
    """The grid point whose LR a prediction proposes: the argmin of its posterior mean (ALGORITHM.md step 7), or,
    with `slowed_fraction` > 0 (the robust preset), the first point after the steepest descent, and not past the
    argmin, where the descent per grid step is no steeper than `slowed_fraction` times the steepest one (the argmin
    when there is no such point); with `max_descent_left` < 1 (the robust preset), never before the first point
    from which at most that share of the descent (highest point before the argmin down to the argmin) is ahead."""
    lowest = int(mu.argmin())
    if slowed_fraction <= 0 or lowest == 0:
        return lowest
    (slope,) = torch.gradient(mu)
    steepest = int(slope[: lowest + 1].argmin())
    if slope[steepest] >= 0:
        return lowest
    point = lowest
    for i in range(steepest, lowest + 1):
        if slope[i] >= slowed_fraction * slope[steepest]:
            point = i
            break
    if max_descent_left < 1:
        top = float(mu[: lowest + 1].max())
        for i in range(lowest + 1):
            if mu[i] <= mu[lowest] + max_descent_left * (top - mu[lowest]):
                return max(point, i)
    return point


def estimate_lr(
    means: list[torch.Tensor],
    grid: torch.Tensor,
    current_lr: float,
    min_lr: float,
    warmup_type: str,
    slowed_fraction: float = 0.0,
    max_descent_left: float = 1.0,
) -> float:
    """ALGORITHM.md step 7: for each prediction the LR on the warmup ramp at its chosen point (`chosen_point`: the
    argmin with the paper's settings), then their mean.

    Args:
        means (`list[torch.Tensor]`): The posterior mean of each prediction on `grid`.
        grid (`torch.Tensor`): The prediction points on the normalised time axis [0, 1].
        current_lr (`float`): LR of the most recent step (x = 1).
        min_lr (`float`): LR at the start of the history (x = 0).
        warmup_type (`str`): `"exp"` or `"linear"`.
        slowed_fraction (`float`, *optional*, defaults to 0): See `chosen_point`.
        max_descent_left (`float`, *optional*, defaults to 1): See `chosen_point`.

    Returns:
        `float`: the new LR.
    """
    lrs = []
    for mu in means:
        x_star = float(grid[chosen_point(mu, slowed_fraction, max_descent_left)])
        if warmup_type == "exp":
            lrs.append(min_lr * (current_lr / min_lr) ** x_star)
        else:
            lrs.append(min_lr + (current_lr - min_lr) * x_star)
    return sum(lrs) / len(lrs)


class ReferenceSwitchTest:
    """The switch test of ALGORITHM.md with a persistent GPyTorch model and optimizer.

    The defaults are the paper's; the robust preset's settings are `hf_autowu.config.PRESET_SETTINGS["robust"]`
    (`standardize_losses=True, min_losses=20, fit_lr=0.05, noise_init=0.1`).

    Args:
        confidence (`float`, *optional*, defaults to 0.95): Vote threshold.
        n_tests (`int`, *optional*, defaults to 5): Predictions per test.
        standardize_losses (`bool`, *optional*, defaults to `False`): Standardise the finite losses first
            (the robust preset).
        seed (`int`, *optional*, defaults to 0): Seed of the subsampling generator.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float64`): Precision of the GP; `torch.float32`
            reproduces the original implementation's cost.
        min_losses (`int`, *optional*, defaults to 3): Fewest finite losses a test needs.
        fit_lr (`float`, *optional*, defaults to 0.01): Adam's learning rate for the hyperparameters.
        noise_init (`float`, *optional*, defaults to 1e-3): Initial noise variance.
        rise_margin (`float`, *optional*, defaults to 0): Vote "past" on `max_{i<k} P(f_k - f_i > margin)`, the
            margin this many noise standard deviations (0: the paper's test).
        slowed_fraction (`float`, *optional*, defaults to 0): The LR estimate's rule (see `chosen_point`).
        min_past_lengthscales (`float`, *optional*, defaults to 0): A test is `resolved` when the chosen point
            (mean over the predictions) lies at least this many lengthscales before the end of the history.
        max_descent_left (`float`, *optional*, defaults to 1): The LR estimate's bound (see `chosen_point`).
        descent_required_below (`int`, *optional*, defaults to 0): On a history of fewer than this many losses, a
            test is `resolved` only when the smoothed loss also `descended` (0: never asked).
        swing_margin (`float`, *optional*, defaults to 0): Each prediction's margin is at least this many times the
            largest bump of its mean before its minimum, counted beyond one noise standard deviation (0: none).
    """

    def __init__(
        self,
        confidence: float = 0.95,
        n_tests: int = 5,
        standardize_losses: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        min_losses: int = 3,
        fit_lr: float = FIT_LR,
        noise_init: float = NOISE_INIT,
        rise_margin: float = 0.0,
        slowed_fraction: float = 0.0,
        min_past_lengthscales: float = 0.0,
        max_descent_left: float = 1.0,
        descent_required_below: int = 0,
        swing_margin: float = 0.0,
    ):
        self.confidence = confidence
        self.descent_required_below = descent_required_below
        self.swing_margin = swing_margin
        self.rise_margin = rise_margin
        self.slowed_fraction = slowed_fraction
        self.min_past_lengthscales = min_past_lengthscales
        self.max_descent_left = max_descent_left
        self.n_tests = n_tests
        self.standardize_losses = standardize_losses
        self.min_losses = min_losses
        self.dtype = dtype
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
        self.model = LossCurveGP(self.likelihood).to(dtype)
        self.model.covar_module.base_kernel.lengthscale = LENGTHSCALE
        self.likelihood.noise = noise_init
        trainable = [p for name, p in self.model.named_parameters() if "lengthscale" not in name]
        self.optimizer = torch.optim.Adam(trainable, lr=fit_lr)
        self.mll = gpytorch.mlls.ExactMarginalLogLikelihood(self.likelihood, self.model)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, losses: torch.Tensor, current_lr: float, min_lr: float, warmup_type: str = "exp"
    ) -> ReferenceOutcome | None:
        """Run one test on the whole history `losses`.

        Returns:
            `ReferenceOutcome`, or `None` when fewer than `min_losses` losses are finite or the GP failed
            numerically `MAX_FAILURES` times.
        """
        losses = losses.to(self.dtype)
        n = len(losses)
        is_finite = torch.isfinite(losses)
        finite_positions = torch.arange(n)[is_finite]
        if len(finite_positions) < self.min_losses:
            return None
        if self.standardize_losses:
            finite_values = losses[is_finite]
            spread = finite_values.std(correction=0) if len(finite_values) > 1 else torch.tensor(0.0)
            spread = spread if 0 < spread < float("inf") else torch.tensor(1.0)
            losses = (losses - finite_values.mean()) / spread

        # 1. the constant mean starts from the mean of the finite losses
        self.model.mean_module.constant = losses[is_finite].mean()

        # 2. fit on at most 100 points, 100 Adam iterations on the exact MLL
        x, y = self._subsample(losses, finite_positions, FIT_POINTS)
        self.model.set_train_data(x, y, strict=False)
        self.model.train()
        self.likelihood.train()
        for _ in range(FIT_ITERATIONS):
            self.optimizer.zero_grad()
            loss = -self.mll(self.model(x), y)
            loss.backward()
            self.optimizer.step()

        # 3. n_tests predictions, each on its own subsample of at most 500 points
        self.model.eval()
        self.likelihood.eval()
        grid = torch.linspace(0, 1, GRID_POINTS, dtype=self.dtype)
        probabilities, means = [], []
        failures = 0
        while len(probabilities) < self.n_tests:
            x, y = self._subsample(losses, finite_positions, PREDICT_POINTS)
            self.model.set_train_data(x, y, strict=False)
            try:
                with torch.no_grad():
                    posterior = self.model(grid)
                    mu = posterior.mean
                    cov = posterior.covariance_matrix
            except NotPSDError:
                failures += 1  # a numerical failure: retry with another subsample, give up after 10
                if failures >= MAX_FAILURES:
                    return None
                continue
            # 4. p = max_{i<k} P(f_i < f_k - margin), f_i - f_k ~ N(mu_i - mu_k, S_ii + S_kk - 2 S_ik + 1e-4); the
            # margin (robust preset option, 0 in the paper) is `rise_margin` noise standard deviations
            k = GRID_POINTS - 1
            gaps = mu[:k] - mu[k]
            variances = (cov.diagonal()[:k] + cov[k, k] - 2 * cov[:k, k]).clamp_min(0) + VARIANCE_JITTER
            margin = self.rise_margin * math.sqrt(float(self.likelihood.noise.detach()))
            if self.swing_margin > 0:
                margin = max(margin, self.swing_margin * self._swing(mu))
            p = torch.distributions.Normal(gaps, variances.sqrt()).cdf(torch.full_like(gaps, -margin)).max()
            probabilities.append(float(p))
            means.append(mu)

        # 5. vote
        votes = sum(p > self.confidence for p in probabilities)
        # robust preset: does the chosen point lie a lengthscale or more before the end of the history? (nearer
        # the end the posterior's shape is the kernel's as much as the losses')
        chosen = [float(grid[chosen_point(mu, self.slowed_fraction, self.max_descent_left)]) for mu in means]
        resolved = 1 - sum(chosen) / len(chosen) >= self.min_past_lengthscales * LENGTHSCALE
        # robust preset: is the smoothed loss rising now, clearly above the noise?
        mean_curve = torch.stack(means).mean(dim=0)
        noise_sd = math.sqrt(float(self.likelihood.noise.detach()))
        rising = bool(mean_curve[-1] > mean_curve[0] and mean_curve[-1] - mean_curve.min() > RISE_NOISE_SDS * noise_sd)
        # robust preset: has it really fallen below where it started? (after a blow-up, else its minimum is noise)
        descended = bool(mean_curve[0] - mean_curve.min() > RISE_NOISE_SDS * noise_sd)
        # robust preset, after a blow-up: has the level of the losses (medians of 10 in a row) fallen below that of the
        # first 10 by more than three standard deviations of the noise of the first 20 finite losses?
        first = losses[is_finite][:START_NOISE_LOSSES]
        steps = first[1:] - first[:-1]
        start_sd = math.nan
        if len(steps) >= 2:
            # medians by quantile(0.5): of an even count, the mean of the two middle values (torch.median takes the
            # lower one)
            deviation = (steps - steps.quantile(0.5)).abs()
            start_sd = float(deviation.quantile(0.5)) * 1.4826 / math.sqrt(2.0)
        kept = losses[is_finite]
        levels = [float(kept[i : i + LEVEL_WINDOW].quantile(0.5)) for i in range(len(kept) - LEVEL_WINDOW + 1)]
        fall = levels[0] - min(levels) if levels else 0.0
        descended_from_start = fall > RISE_NOISE_SDS * start_sd if 0 < start_sd < math.inf else None
        # robust preset: on the first few dozen losses, a test counts only after such a descent
        resolved = resolved and (descended or n >= self.descent_required_below)
        # 7. the new LR
        lr = estimate_lr(means, grid, current_lr, min_lr, warmup_type, self.slowed_fraction, self.max_descent_left)
        return ReferenceOutcome(
            probabilities, votes, votes > self.n_tests / 2, lr, rising, descended, resolved, descended_from_start
        )

    def _swing(self, mu: torch.Tensor) -> float:
        """Robust preset: the most `mu` climbs back above its lowest value so far, walking from the start of the grid
        to its minimum; 0 unless more than `SWING_FLOOR_SDS` noise standard deviations."""
        lowest_so_far, largest = math.inf, 0.0
        for value in mu[: int(torch.argmin(mu)) + 1].tolist():
            lowest_so_far = min(lowest_so_far, value)
            largest = max(largest, value - lowest_so_far)
        floor = SWING_FLOOR_SDS * math.sqrt(float(self.likelihood.noise.detach()))
        return largest if largest > floor else 0.0

    def _subsample(self, losses: torch.Tensor, finite_positions: torch.Tensor, size: int):
        """At most `size` finite points in time order, at x = position / len(losses)."""
        chosen = random_subset_in_time_order(finite_positions, size, self.generator)
        return chosen.to(self.dtype) / len(losses), losses[chosen]
