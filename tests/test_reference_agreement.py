"""The fast switch test makes the same decisions as the slow GPyTorch reference, test after test."""

import math

import pytest
import torch

from hf_autowu import ReferenceSwitchTest, SwitchTester


def history(kind: str, n: int, seed: int) -> torch.Tensor:
    """Loss histories of several shapes, on an exponential LR ramp."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "valley":  # falls, bottoms out at 60%, rises
        return 2.0 - 1.5 * t + 4.0 * (t - 0.6).clamp_min(0) ** 2 * 10 + 0.05 * noise
    if kind == "falling":  # no minimum in the past
        return 3.0 * torch.exp(-3 * t) + 0.05 * noise
    if kind == "noisy_flat":  # nothing but noise
        return 1.0 + 0.2 * noise
    if kind == "late_blowup":  # flat, then a sharp rise with non-finite values at the end
        out = 0.5 + 0.02 * noise + torch.where(t > 0.85, 30 * (t - 0.85), torch.zeros_like(t))
        out[-3:] = math.nan
        out[n // 3] = math.inf
        return out
    raise ValueError(kind)


CASES = [
    # (kind, lengths tested in sequence, standardise): short histories, subsampled fits (> 100) and
    # subsampled predictions (> 500), non-finite values, with and without standardisation
    ("valley", (40, 160, 700), False),
    ("falling", (520,), False),
    ("noisy_flat", (120,), False),
    ("late_blowup", (90, 600), False),
    ("valley", (300, 800), True),
    ("noisy_flat", (640,), True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "lengths", "standardize"), CASES)
def test_fast_path_matches_reference(kind, lengths, standardize):
    fast = SwitchTester(confidence=0.95, n_tests=5, standardize_losses=standardize, seed=0)
    slow = ReferenceSwitchTest(confidence=0.95, n_tests=5, standardize_losses=standardize, seed=0)
    full = history(kind, max(lengths), seed=len(kind))
    for n in lengths:
        losses = full[:n].clone()
        current_lr = 1e-5 * (1e5 ** (n / max(lengths)))
        mine = fast.run(losses, current_lr=current_lr, min_lr=1e-5, warmup_type="exp")
        ref = slow(losses, current_lr, 1e-5, "exp")
        assert mine.passed == ref.passed
        assert mine.votes == ref.votes
        assert mine.lr_estimate == pytest.approx(ref.lr_estimate, rel=1e-4)
        assert mine.probabilities == pytest.approx(ref.probabilities, abs=1e-5)
    # the hyperparameters followed the same Adam trajectory
    ref_raw = [
        float(slow.model.mean_module.raw_constant.detach()),
        float(slow.model.covar_module.raw_outputscale.detach()),
        float(slow.likelihood.noise_covar.raw_noise.detach()),
    ]
    assert fast.gp.raw == pytest.approx(ref_raw, rel=1e-5, abs=1e-6)


def test_linear_ramp_maps_argmin_like_reference():
    fast = SwitchTester(confidence=0.95, n_tests=5, standardize_losses=False, seed=0)
    slow = ReferenceSwitchTest(seed=0)
    losses = history("valley", 200, seed=3)
    mine = fast.run(losses, current_lr=0.4, min_lr=1e-5, warmup_type="linear")
    ref = slow(losses, 0.4, 1e-5, "linear")
    assert mine.lr_estimate == pytest.approx(ref.lr_estimate, rel=1e-4)
    assert mine.passed == ref.passed
