"""The GPyTorch model of the loss curve, and a slow switch test written step by step from the specification.

It uses GPyTorch the textbook way (exact marginal log likelihood, `torch.optim.Adam`, dense predictive
covariance) and is kept to check the fast path in `hf_autowu.switch_test`, decision for decision, and to
measure what the fast path saves. It is not used during training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

with warnings.catch_warnings():  # linear_operator scripts a function with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
    import gpytorch
    from linear_operator.utils.errors import NotPSDError

from .gp import FIT_ITERATIONS, FIT_LR, GRID_SIZE, LENGTHSCALE, NOISE_INIT, VARIANCE_JITTER
from .switch_test import subsample_sorted


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
    """Outcome of one reference switch test: per-prediction probabilities, votes, pass, new LR."""

    probabilities: list[float]
    votes: int
    passed: bool
    lr_estimate: float


class ReferenceSwitchTest:
    """The switch test of ALGORITHM.md with a persistent GPyTorch model and optimizer.

    Args:
        confidence (`float`, *optional*, defaults to 0.95): Vote threshold.
        n_tests (`int`, *optional*, defaults to 5): Predictions per test.
        standardize_losses (`bool`, *optional*, defaults to `False`): Standardise the finite losses first
            (hf_autowu's robust preset); `False` is the paper's behaviour.
        seed (`int`, *optional*, defaults to 0): Seed of the subsampling generator.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float64`): Precision of the GP; `torch.float32`
            reproduces the original implementation's cost.
    """

    def __init__(
        self,
        confidence: float = 0.95,
        n_tests: int = 5,
        standardize_losses: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        self.confidence = confidence
        self.n_tests = n_tests
        self.standardize_losses = standardize_losses
        self.dtype = dtype
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
        self.model = LossCurveGP(self.likelihood).to(dtype)
        self.model.covar_module.base_kernel.lengthscale = LENGTHSCALE
        self.likelihood.noise = NOISE_INIT
        trainable = [p for name, p in self.model.named_parameters() if "lengthscale" not in name]
        self.optimizer = torch.optim.Adam(trainable, lr=FIT_LR)
        self.mll = gpytorch.mlls.ExactMarginalLogLikelihood(self.likelihood, self.model)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, losses: torch.Tensor, current_lr: float, min_lr: float, warmup_type: str = "exp"
    ) -> ReferenceOutcome | None:
        """Run one test on the whole history `losses` (None when fewer than 3 losses are finite)."""
        losses = losses.to(self.dtype)
        n = len(losses)
        is_finite = torch.isfinite(losses)
        finite_positions = torch.arange(n)[is_finite]
        if len(finite_positions) < 3:
            return None
        if self.standardize_losses:
            finite_values = losses[is_finite]
            spread = finite_values.std(correction=0) if len(finite_values) > 1 else torch.tensor(0.0)
            spread = spread if 0 < spread < float("inf") else torch.tensor(1.0)
            losses = (losses - finite_values.mean()) / spread

        # 1. the constant mean starts from the mean of the finite losses
        self.model.mean_module.constant = losses[is_finite].mean()

        # 2. fit on at most 100 points, 100 Adam iterations on the exact MLL
        x, y = self._subsample(losses, finite_positions, 100)
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
        grid = torch.linspace(0, 1, GRID_SIZE, dtype=self.dtype)
        probabilities, lrs = [], []
        failures = 0
        while len(probabilities) < self.n_tests:
            x, y = self._subsample(losses, finite_positions, 500)
            self.model.set_train_data(x, y, strict=False)
            try:
                with torch.no_grad():
                    posterior = self.model(grid)
                    mu = posterior.mean
                    cov = posterior.covariance_matrix
            except NotPSDError:
                failures += 1  # a numerical failure: retry with another subsample, give up after 10
                if failures >= 10:
                    return None
                continue
            # 4. p = max_{i<k} P(f_i < f_k), f_i - f_k ~ N(mu_i - mu_k, S_ii + S_kk - 2 S_ik + 1e-4)
            k = GRID_SIZE - 1
            gaps = mu[:k] - mu[k]
            variances = (cov.diagonal()[:k] + cov[k, k] - 2 * cov[:k, k]).clamp_min(0) + VARIANCE_JITTER
            p = torch.distributions.Normal(gaps, variances.sqrt()).cdf(torch.zeros_like(gaps)).max()
            probabilities.append(float(p))
            # 7. the LR at the argmin of the posterior mean, on the warmup ramp
            x_star = float(grid[mu.argmin()])
            if warmup_type == "exp":
                lrs.append(min_lr * (current_lr / min_lr) ** x_star)
            else:
                lrs.append(min_lr + (current_lr - min_lr) * x_star)

        # 5. vote
        votes = sum(p > self.confidence for p in probabilities)
        return ReferenceOutcome(probabilities, votes, votes > self.n_tests / 2, sum(lrs) / len(lrs))

    def _subsample(self, losses: torch.Tensor, finite_positions: torch.Tensor, size: int):
        """At most `size` finite points in time order, at x = position / len(losses) (the shared sampler)."""
        chosen = subsample_sorted(finite_positions, size, self.generator)
        return chosen.to(self.dtype) / len(losses), losses[chosen]
