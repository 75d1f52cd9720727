"""The fast switch test agrees with the slow GPyTorch reference, which shares no code with it (not even the
sampler): decision for decision where neither subsamples, in distribution where their samplers draw different
points. Both presets: the paper's settings, and the robust preset's (standardised losses, its GP fit settings,
its minimum loss count and the rising-loss check)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from hf_autowu import ReferenceSwitchTest, SwitchTester
from hf_autowu.config import PRESET_SETTINGS
from hf_autowu.reference import random_subset_in_time_order
from hf_autowu.switch_test import subsample_sorted

SETTINGS = (
    "standardize_losses",
    "min_losses",
    "fit_lr",
    "noise_init",
    "rise_margin",
    "slowed_fraction",
    "min_past_lengthscales",
    "max_descent_left",
    "descent_required_below",
    "swing_margin",
)
MIN_LR = 1e-5


def settings(preset: str) -> dict:
    """What a preset decides for the switch test, from the one table that defines it."""
    return {name: PRESET_SETTINGS[preset][name] for name in SETTINGS}


def fast_tester(preset: str, seed: int, **overrides) -> SwitchTester:
    return SwitchTester(confidence=0.95, n_tests=5, seed=seed, **{**settings(preset), **overrides})


def reference_tester(preset: str, seed: int, cls: type = ReferenceSwitchTest, **overrides) -> ReferenceSwitchTest:
    return cls(confidence=0.95, n_tests=5, seed=seed, **{**settings(preset), **overrides})


def history(kind: str, n: int, seed: int) -> torch.Tensor:
    """Loss histories of several shapes, on an exponential LR ramp."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "valley":  # falls, bottoms out at 60%, rises far above where it started
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
    if kind == "drop_then_creep":  # a sharp drop, a slow fall for another 45% of the history, then a rise
        drop = torch.sigmoid((t - 0.3) / 0.02)
        return 2.0 - drop - 0.4 * ((t - 0.35) / 0.45).clamp(0, 1) + 30 * (t - 0.8).clamp_min(0) ** 2 + 0.02 * noise
    if kind == "swinging":  # a valley with a sine of 5 periods over the history: bumps on the way down
        return 2.0 - 1.5 * t + 40.0 * (t - 0.6).clamp_min(0) ** 2 + 0.15 * torch.sin(10 * math.pi * t) + 0.02 * noise
    if kind == "mostly_nan":  # 150 steps of which only every third loss is finite: 50 finite, no subsampling
        out = 2.0 - t + 0.05 * noise
        out[torch.arange(n) % 3 != 0] = math.nan
        return out
    raise ValueError(kind)


# ------------------------------------------------------------------ exact agreement: no subsampling

EXACT_CASES = [
    # (preset, kind, history lengths tested in sequence (each <= 100 finite losses), ramp, rising at the end)
    ("paper", "valley", (40, 70, 100), "exp", None),
    ("paper", "falling", (60,), "exp", None),
    ("paper", "noisy_flat", (30, 90), "exp", None),
    ("paper", "late_blowup", (50, 90), "exp", None),
    ("paper", "valley", (80,), "linear", None),
    ("robust", "valley", (40, 70, 100), "exp", True),
    ("robust", "falling", (60, 100), "exp", False),
    ("robust", "noisy_flat", (30, 90), "exp", False),
    ("robust", "late_blowup", (50, 90), "exp", True),
    ("robust", "mostly_nan", (150,), "linear", False),
    ("robust", "drop_then_creep", (40, 70, 100), "exp", None),
    # the robust preset with a rise margin (an option, 0 by default), and a more slowed-down descent
    ("robust-margin", "valley", (40, 70, 100), "exp", True),
    ("robust-margin", "late_blowup", (50, 90), "exp", True),
    # a loss that swings on its own, with the robust preset's swing margin and without it
    ("robust", "swinging", (25, 40, 60, 100), "exp", None),
    ("robust-noswing", "swinging", (25, 40, 60, 100), "exp", None),
]
OVERRIDES = {"robust-margin": {"rise_margin": 1.0, "slowed_fraction": 0.3}, "robust-noswing": {"swing_margin": 0.0}}


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "kind", "lengths", "ramp", "rising"), EXACT_CASES)
def test_fast_path_matches_reference_exactly_without_subsampling(preset, kind, lengths, ramp, rising):
    overrides = OVERRIDES.get(preset, {})
    preset = preset.split("-")[0]
    fast, slow = fast_tester(preset, seed=0, **overrides), reference_tester(preset, seed=0, **overrides)
    full = history(kind, max(lengths), seed=len(kind))
    for n in lengths:
        losses = full[:n].clone()
        assert int(torch.isfinite(losses).sum()) <= 100  # neither fits nor predicts on a subsample
        current_lr = MIN_LR * (1e5 ** (n / max(lengths)))
        mine = fast.run(losses, current_lr=current_lr, min_lr=MIN_LR, warmup_type=ramp)
        ref = slow(losses, current_lr, MIN_LR, ramp)
        assert mine.passed == ref.passed
        assert mine.votes == ref.votes
        assert mine.probabilities == pytest.approx(ref.probabilities, abs=1e-5)
        assert mine.lr_estimate == pytest.approx(ref.lr_estimate, rel=1e-4)
        assert mine.rising == ref.rising
        assert mine.descended == ref.descended
        assert mine.descended_from_start == ref.descended_from_start
        assert mine.resolved == ref.resolved
    if rising is not None:  # the rising check is exercised both ways (it only matters to the robust preset)
        assert ref.rising is rising
    # the hyperparameters followed the same Adam trajectory
    ref_raw = [
        float(slow.model.mean_module.raw_constant.detach()),
        float(slow.model.covar_module.raw_outputscale.detach()),
        float(slow.likelihood.noise_covar.raw_noise.detach()),
    ]
    assert fast.gp.raw == pytest.approx(ref_raw, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_rise_no_larger_than_the_swings_before_it_passes_in_neither():
    """A valley with a sine on it (the 100-loss history, its bottom at 60%): on its first 40 and 60 losses the latest
    rise is the sine's upswing, no larger than the bumps before it. With the robust preset's `swing_margin` no
    prediction of either implementation votes "past"; without it every one does."""
    full = history("swinging", 100, seed=len("swinging"))
    for swing_margin, votes in ((PRESET_SETTINGS["robust"]["swing_margin"], 0), (0.0, 5)):
        fast = fast_tester("robust", seed=0, swing_margin=swing_margin)
        slow = reference_tester("robust", seed=0, swing_margin=swing_margin)
        for n in (40, 60):
            lr = MIN_LR * 1e5 ** (n / 100)
            mine = fast.run(full[:n].clone(), current_lr=lr, min_lr=MIN_LR, warmup_type="exp")
            assert mine.votes == slow(full[:n].clone(), lr, MIN_LR).votes == votes


@pytest.mark.slow
@pytest.mark.parametrize(("n", "seed"), [(25, 9), (28, 1)])
def test_the_first_tests_need_a_descent_in_both(n, seed):
    """Noise alone, a history shorter than the robust preset's `descent_required_below`: both implementations pass
    the test and find no descent; with the rule (the preset's) neither counts it, without it both do. (The swing
    margin is off: the smoothed noise has bumps beyond the noise on these seeds, and with it neither test passes.)"""
    losses = history("noisy_flat", n, seed=seed)
    for required, counts in ((PRESET_SETTINGS["robust"]["descent_required_below"], False), (0, True)):
        options = {"descent_required_below": required, "swing_margin": 0.0}
        mine = fast_tester("robust", seed=0, **options).run(losses, current_lr=1e-4, min_lr=MIN_LR, warmup_type="exp")
        ref = reference_tester("robust", seed=0, **options)(losses, 1e-4, MIN_LR)
        for outcome in (mine, ref):
            assert outcome.passed and not outcome.descended
            assert outcome.resolved is counts


@pytest.mark.parametrize(
    ("preset", "finite", "tested"), [("paper", 3, True), ("robust", 19, False), ("robust", 20, True)]
)
def test_minimum_loss_count_agrees(preset, finite, tested):
    losses = history("falling", 40, seed=0)
    losses[finite:] = math.nan  # the non-finite ones count on the time axis, not as losses
    mine = fast_tester(preset, seed=0).run(losses, current_lr=1e-3, min_lr=MIN_LR, warmup_type="exp")
    ref = reference_tester(preset, seed=0)(losses, 1e-3, MIN_LR)
    assert (mine is not None) is tested
    assert (ref is not None) is tested


# ------------------------------------------------------------------ agreement in distribution: subsampling

ALPHA = 1e-3  # significance of each comparison below
REFERENCE_DRAWS = 30  # ~0.3-0.4 s each (GPyTorch), against 200 fast-path draws of ~5 ms
FAST_DRAWS = 200
STATISTICAL_CASES = {
    # preset, history length, (position of the minimum, rise from there to the end, noise sd): curves whose
    # minimum is barely in the past, so that the pass rate, the probabilities and the LR estimate vary with the
    # subsample. 300 losses: the fit is on a subsample of 100, the predictions on all of them; 700: both subsample.
    "paper_700": ("paper", 700, (0.8, 0.05, 0.3)),  # fast path: passes 50%, probability 0.80 +- 0.11
    "robust_300": ("robust", 300, (0.9, 0.03, 0.1)),  # passes 45%, probability 0.949 +- 0.007
}


def borderline_history(n: int, minimum_at: float, rise: float, noise: float, seed: int = 1) -> torch.Tensor:
    """A falling line (slope -1.5) that bends into a parabola with its minimum at `minimum_at`, ending `rise` above
    that minimum, plus Gaussian noise."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    curvature = rise / (1 - minimum_at) ** 2
    bend = minimum_at - 0.75 / curvature
    noise_draws = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 2.0 - 1.5 * t + curvature * (t - bend).clamp_min(0) ** 2 + noise * noise_draws


def draw_outcomes(test, losses: torch.Tensor, seeds: range) -> dict[str, np.ndarray]:
    """One switch test on `losses` by a fresh tester per seed; `test(seed, losses)` returns its outcome."""
    outcomes = [test(seed, losses) for seed in seeds]
    # Rounded to 1e-6: the two implementations differ by ~1e-9 on the same draws, which would otherwise split the
    # LR estimates (argmins on a grid, so ties) into distinct values and mislead the KS test.
    return {
        "passed": np.array([o.passed for o in outcomes], dtype=float),
        "rising": np.array([o.rising for o in outcomes], dtype=float),
        "probability": np.round([np.mean(o.probabilities) for o in outcomes], 6),
        "log_lr": np.round([math.log(o.lr_estimate) for o in outcomes], 6),
    }


def distribution_disagreements(reference: dict[str, np.ndarray], fast: dict[str, np.ndarray]) -> list[str]:
    """The statistics whose reference and fast-path draws disagree at significance `ALPHA`.

    Probabilities and log LR estimates: two-sample Kolmogorov-Smirnov test (conservative with ties). Pass and
    rising rates: two-proportion z-test, |z| > 3.29. All seeds are fixed, so the outcome is deterministic: a false
    alarm (chance about 0.4% over the 4 statistics of one case, were the draws new) would fail on every run, not
    flake.
    """
    found = []
    for name in ("probability", "log_lr"):
        result = ks_2samp(reference[name], fast[name])
        if result.pvalue < ALPHA:
            found.append(f"{name}: KS D={result.statistic:.3f}, p={result.pvalue:.2g}")
    for name in ("passed", "rising"):
        a, b = reference[name], fast[name]
        pooled = np.concatenate([a, b]).mean()
        spread = math.sqrt(pooled * (1 - pooled) * (1 / a.size + 1 / b.size))
        if (spread == 0.0 and a.mean() != b.mean()) or (spread > 0 and abs(a.mean() - b.mean()) / spread > 3.29):
            found.append(f"{name} rate: reference {a.mean():.2f}, fast path {b.mean():.2f}")
    return found


def fast_draws(preset: str, losses: torch.Tensor) -> dict[str, np.ndarray]:
    def test(seed, h):
        return fast_tester(preset, seed).run(h, current_lr=0.1, min_lr=MIN_LR, warmup_type="exp")

    return draw_outcomes(test, losses, range(FAST_DRAWS))


def reference_draws(preset: str, losses: torch.Tensor, cls: type = ReferenceSwitchTest) -> dict[str, np.ndarray]:
    def test(seed, h):
        return reference_tester(preset, 10_000 + seed, cls)(h, 0.1, MIN_LR)

    return draw_outcomes(test, losses, range(REFERENCE_DRAWS))


@pytest.mark.slow
@pytest.mark.parametrize("case", STATISTICAL_CASES)
def test_fast_path_matches_reference_in_distribution_with_subsampling(case):
    preset, n, shape = STATISTICAL_CASES[case]
    losses = borderline_history(n, *shape)
    fast = fast_draws(preset, losses)
    assert 0.1 < fast["passed"].mean() < 0.9  # the case discriminates: decisions vary with the subsample
    assert distribution_disagreements(reference_draws(preset, losses), fast) == []


class FirstPointsReference(ReferenceSwitchTest):
    """A reference with a biased, deterministic sampler: always the first `size` finite points."""

    def _subsample(self, losses, finite_positions, size):
        chosen = finite_positions[:size]
        return chosen.to(self.dtype) / len(losses), losses[chosen]


class EarlyPointsReference(ReferenceSwitchTest):
    """A reference with a biased random sampler: a uniform subset, but never from the last tenth of the history."""

    def _subsample(self, losses, finite_positions, size):
        early = finite_positions[: int(0.9 * len(finite_positions))]
        chosen = random_subset_in_time_order(early, size, self.generator)
        return chosen.to(self.dtype) / len(losses), losses[chosen]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("biased", "case"),
    [(FirstPointsReference, "robust_300"), (EarlyPointsReference, "robust_300")],
    ids=["first_points", "early_points"],
)
def test_distribution_check_catches_a_biased_sampler(biased, case):
    preset, n, shape = STATISTICAL_CASES[case]
    losses = borderline_history(n, *shape)
    found = distribution_disagreements(reference_draws(preset, losses, biased), fast_draws(preset, losses))
    assert found, f"{biased.__name__} went unnoticed"


@pytest.mark.parametrize("sampler", [random_subset_in_time_order, subsample_sorted], ids=["reference", "fast_path"])
def test_samplers_are_uniform_without_replacement_in_time_order(sampler):
    """Every position is drawn with probability size / n, none twice, in time order (an independent check of each
    sampler: the distribution check above does not notice a sampler that draws with replacement)."""
    positions = torch.arange(10, 30)  # 20 positions, 5 drawn, 4000 times: expected count 1000 each
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(20)
    for _ in range(4000):
        chosen = sampler(positions, 5, generator)
        assert chosen.numel() == 5 and bool((chosen.diff() > 0).all())
        counts[chosen - 10] += 1
    # binomial sd sqrt(4000 * 0.25 * 0.75) = 27.4: within 4.5 sd of 1000
    assert float((counts - 1000).abs().max()) < 125
    assert torch.equal(sampler(positions, 20, generator), positions)
