"""The Gaussian process that smooths the warmup loss curve, in closed form.

The model is GPyTorch's exact GP `hf_autowu.reference.LossCurveGP`: constant mean, scaled RBF kernel with a
fixed lengthscale, Gaussian likelihood. `ClosedFormLossCurveGP` evaluates exactly the same model in NumPy,
without GPyTorch's per-call overhead: the RBF kernel on [0, 1] with lengthscale 0.2 has numerical rank ~21, so
a Nystroem factor reproduces it to ~1e-15 and turns every solve into a small r x r one. The hyperparameters
follow the same Adam trajectory as `torch.optim.Adam` on GPyTorch's raw parameters (same softplus constraints,
same update rule), which the tests check against `LossCurveGP`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

LENGTHSCALE = 0.2
NOISE_INIT = 1e-3
NOISE_FLOOR = 1e-4  # GPyTorch's GaussianLikelihood constraint: noise = softplus(raw) + 1e-4
FIT_ITERATIONS = 100
FIT_LR = 0.01
GRID_SIZE = 500
VARIANCE_JITTER = 1e-4  # added to the variance of f_i - f_k, as in ALGORITHM.md
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_FACTOR_TOLERANCE = 1e-15
_FACTOR_CANDIDATES = 4001
_EIGEN_CUTOFF = 1e-13


def softplus(x: float) -> float:
    """`torch.nn.functional.softplus` (threshold 20) on a float."""
    return x if x > 20.0 else math.log1p(math.exp(x))


def inverse_softplus(y: float) -> float:
    """Inverse of `softplus` (GPyTorch's `inv_softplus`)."""
    return y + math.log(-math.expm1(-y))


def _sigmoid(x: float) -> float:
    return 1.0 if x > 20.0 else 1.0 / (1.0 + math.exp(-x))


def rbf(a: np.ndarray, b: np.ndarray, lengthscale: float) -> np.ndarray:
    """RBF correlation `exp(-(a_i - b_j)^2 / (2 l^2))` between the points of `a` (n,) and `b` (m,)."""
    return np.exp(-0.5 * ((a[:, None] - b[None, :]) / lengthscale) ** 2)


@lru_cache(maxsize=8)
def _nystroem_basis(lengthscale: float) -> tuple[np.ndarray, np.ndarray]:
    """Pivot points `Z` and the inverse Cholesky factor of `rbf(Z, Z)`, pivots chosen greedily on a fine grid.

    With them, `features(x) = rbf(x, Z) @ inv_chol.T` satisfies `features(a) @ features(b).T == rbf(a, b)` to
    ~1e-15 anywhere in [0, 1] (21 pivots for lengthscale 0.2).
    """
    candidates = np.linspace(0.0, 1.0, _FACTOR_CANDIDATES)
    residual = np.ones_like(candidates)
    columns: list[np.ndarray] = []
    pivots: list[int] = []
    while residual.max() > _FACTOR_TOLERANCE and len(pivots) < _FACTOR_CANDIDATES:
        p = int(residual.argmax())
        pivots.append(p)
        column = rbf(candidates, candidates[p : p + 1], lengthscale)[:, 0]
        for previous in columns:
            column = column - previous * previous[p]
        column = column / math.sqrt(residual[p])
        columns.append(column)
        residual = residual - column**2
    points = candidates[pivots]
    return points, np.linalg.inv(np.linalg.cholesky(rbf(points, points, lengthscale)))


def kernel_features(x: np.ndarray, lengthscale: float = LENGTHSCALE) -> np.ndarray:
    """Low-rank features `H` (n, r) with `H @ H.T == rbf(x, x)` to ~1e-15, for points `x` (n,) in [0, 1]."""
    points, inv_chol = _nystroem_basis(lengthscale)
    return rbf(x, points, lengthscale) @ inv_chol.T


class ClosedFormLossCurveGP:
    """`LossCurveGP` and its persistent Adam optimizer, evaluated in closed form with NumPy.

    Holds the three trained raw hyperparameters (constant mean, raw outputscale, raw noise) and Adam's moments
    as plain floats, so its state is tiny, exact and `weights_only`-safe. All arrays are small (at most
    500 x 21): the work runs on the CPU in a single thread and never touches PyTorch's thread pools or a device.

    Args:
        fit_lr (`float`, *optional*, defaults to 0.01): Adam's learning rate.
        noise_init (`float`, *optional*, defaults to 1e-3): Initial noise variance.
    """

    def __init__(self, fit_lr: float = FIT_LR, noise_init: float = NOISE_INIT):
        self.fit_lr = fit_lr
        self.lengthscale = softplus(inverse_softplus(LENGTHSCALE))
        self.raw = [0.0, 0.0, inverse_softplus(noise_init - NOISE_FLOOR)]
        self.adam_step = 0
        self.exp_avg = [0.0, 0.0, 0.0]
        self.exp_avg_sq = [0.0, 0.0, 0.0]

    @property
    def mean(self) -> float:
        """The constant mean."""
        return self.raw[0]

    @property
    def outputscale(self) -> float:
        """The kernel's output scale (prior variance of the latent function)."""
        return softplus(self.raw[1])

    @property
    def noise(self) -> float:
        """The observation noise variance."""
        return softplus(self.raw[2]) + NOISE_FLOOR

    def fit(self, x: np.ndarray, y: np.ndarray, mean_init: float) -> None:
        """Continue training the hyperparameters on `(x, y)`: `FIT_ITERATIONS` Adam steps on the exact MLL.

        Args:
            x (`np.ndarray`): Inputs in [0, 1], shape (n,).
            y (`np.ndarray`): Targets, shape (n,), finite.
            mean_init (`float`): Value the constant mean is reset to before training.
        """
        n = y.size
        # eigenpairs of the kernel matrix F F^T from the small Gram matrix F^T F; directions with a negligible
        # eigenvalue join the null space
        feats = kernel_features(x, self.lengthscale)
        eig, vecs = np.linalg.eigh(feats.T @ feats)
        keep = eig > _EIGEN_CUTOFF * eig.max()
        eig, vecs = eig[keep], vecs[:, keep]
        u = feats @ vecs / np.sqrt(eig)
        uy, u1 = u.T @ y, u.sum(axis=0)
        yy, y1 = float(y @ y), float(y.sum())
        rest = n - eig.size  # directions of the kernel matrix with zero eigenvalue
        self.raw[0] = mean_init
        for _ in range(FIT_ITERATIONS):
            m, s, noise = self.raw[0], self.outputscale, self.noise
            z = uy - m * u1
            inv_d = 1.0 / (s * eig + noise)
            z_inv_d = z * inv_d
            zz = float(z @ z)
            resid = max(yy - 2.0 * m * y1 + m * m * n - zz, 0.0)
            # gradients of the negative MLL / n, as ExactMarginalLogLikelihood divides by n
            g_mean = (-float(z_inv_d @ u1) + (m * n - y1 + float(z @ u1)) / noise) / n
            g_dd = 0.5 * (inv_d - z_inv_d**2)
            g_scale = float(g_dd @ eig) / n
            g_noise = (float(g_dd.sum()) + 0.5 * (rest / noise - resid / noise**2)) / n
            self._adam_update((g_mean, g_scale * _sigmoid(self.raw[1]), g_noise * _sigmoid(self.raw[2])))

    def _adam_update(self, grads: tuple[float, float, float]) -> None:
        """One `torch.optim.Adam` step (default betas and eps) on the raw hyperparameters."""
        beta1, beta2 = _ADAM_BETAS
        self.adam_step += 1
        step_size = self.fit_lr / (1.0 - beta1**self.adam_step)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.adam_step)
        for i, g in enumerate(grads):
            self.exp_avg[i] += (g - self.exp_avg[i]) * (1.0 - beta1)
            self.exp_avg_sq[i] = self.exp_avg_sq[i] * beta2 + (1.0 - beta2) * g * g
            denom = math.sqrt(self.exp_avg_sq[i]) / bias_correction2_sqrt + _ADAM_EPS
            self.raw[i] -= step_size * self.exp_avg[i] / denom

    def predict(self, x: np.ndarray, y: np.ndarray, grid_features: np.ndarray) -> dict[str, np.ndarray]:
        """Posterior of the latent function on a grid, given observations `(x, y)`.

        Args:
            x (`np.ndarray`): Inputs, shape (n,).
            y (`np.ndarray`): Targets, shape (n,).
            grid_features (`np.ndarray`): `kernel_features` of the prediction points, shape (g, r); the last
                point is "now".

        Returns:
            `dict`: `mean` (g,), `variance` (g,), and `diff_variance` (g - 1,), the variance of
            `f(grid[i]) - f(grid[-1])`.

        Raises:
            `np.linalg.LinAlgError`: when the posterior is not numerically positive definite or not finite.
        """
        m, s, noise = self.mean, self.outputscale, self.noise
        feats = kernel_features(x, self.lengthscale)  # (n, r)
        rank = feats.shape[1]
        # K = s F F^T + noise I; with A = noise I + s F^T F, K^-1 F = F A^-1 (push-through identity), so
        # the posterior mean is m + s G A^-1 F^T (y - m) and the covariance noise * s * G A^-1 G^T
        chol = np.linalg.cholesky(noise * np.eye(rank) + s * (feats.T @ feats))
        inv_chol = np.linalg.inv(chol)
        weights = inv_chol.T @ (inv_chol @ (feats.T @ (y - m)))
        mean = m + s * (grid_features @ weights)
        half = grid_features @ inv_chol.T  # (g, r): rows L^-1 g_i
        variance = noise * s * (half**2).sum(axis=1)
        diff = half[:-1] - half[-1:]
        diff_variance = noise * s * (diff**2).sum(axis=1)
        if not (np.isfinite(mean).all() and np.isfinite(diff_variance).all()):
            raise np.linalg.LinAlgError("GP posterior is not finite")
        return {"mean": mean, "variance": variance, "diff_variance": diff_variance}

    def state_dict(self) -> dict:
        """Hyperparameters and Adam state as plain floats."""
        return {
            "raw": list(self.raw),
            "adam_step": self.adam_step,
            "exp_avg": list(self.exp_avg),
            "exp_avg_sq": list(self.exp_avg_sq),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.raw = [float(v) for v in state["raw"]]
        self.adam_step = int(state["adam_step"])
        self.exp_avg = [float(v) for v in state["exp_avg"]]
        self.exp_avg_sq = [float(v) for v in state["exp_avg_sq"]]
