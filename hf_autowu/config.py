"""`AutoWUConfig`: every option of the AutoWU scheduler, validated once at construction."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .ramp import COOLDOWN_TYPES, WARMUP_TYPES

PRESETS = ("robust", "paper")
WARMUP_UNITS = ("step", "epoch")
DECAY_PHASE_STATS = (None, "loss")
MAX_N_TESTS = 10_000
"""The most GP predictions a switch test may draw (`n_tests`): each costs a posterior sample over the history."""

PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "robust": {
        "test_lr_growth": 1.1,
        "long_budget_steps": 500,
        "standardize_losses": True,
        "divergence_guard": True,
        "spike_watch": True,
        "estimate_at_cap": True,
        "rewind": True,
        "rewind_min_shift": 0.2,
        "rise_margin": 0.0,
        "swing_margin": 2.0,
        "min_past_lengthscales": 1.0,
        "slowed_fraction": 0.3,
        "max_descent_left": 0.06,
        "descent_required_below": 30,
        "cooldown_type": "linear",
        "min_losses": 20,
        "fit_lr": 0.05,
        "noise_init": 0.1,
    },
    "paper": {
        "test_lr_growth": None,
        "long_budget_steps": 0,
        "standardize_losses": False,
        "divergence_guard": False,
        "spike_watch": False,
        "estimate_at_cap": False,
        "rewind": False,
        "rewind_min_shift": 0.0,
        "rise_margin": 0.0,
        "swing_margin": 0.0,
        "min_past_lengthscales": 0.0,
        "slowed_fraction": 0.0,
        "max_descent_left": 1.0,
        "descent_required_below": 0,
        "cooldown_type": "cosine",
        "min_losses": 3,
        "fit_lr": 0.01,
        "noise_init": 1e-3,
    },
}
"""Every setting a preset decides, in one place. All but the last three are options (`None`: "as the preset says");
`min_losses` (fewest finite losses a switch test needs), `fit_lr` (Adam's LR for the GP hyperparameters) and
`noise_init` (the GP's initial noise variance) are not: on standardised losses the robust values are scale-free."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _flag_help(text: str) -> dict[str, Any]:
    """Metadata of a `bool | None` option: with `HfArgumentParser`, `--name` alone means True, and `--name false`
    works too."""
    return {"help": text, "nargs": "?", "const": True}


@dataclass
class AutoWUConfig:
    """Options of the AutoWU learning-rate scheduler.

    The first group are the options of the reference implementation, with its names and defaults. The
    constants of the switch test (`confidence`, `patience`, `n_tests`) and its cadence (`test_interval`) are
    options too. `preset` selects between the behaviour of the paper and hf_autowu's robust default; the
    options that depend on it default to `None`, meaning "as the preset says" (see the `effective_*`
    properties).

    Every field carries `metadata["help"]`, so `transformers.HfArgumentParser` turns the dataclass into
    command-line flags.

    Raises:
        `ValueError`: when an option is out of range, naming the option and what is allowed.
    """

    min_lr: float = field(default=1e-5, metadata=_help("Learning rate at the start of warmup."))
    max_lr: float = field(
        default=1.0, metadata=_help("Ceiling of the warmup ramp (reached after the maximum warmup).")
    )
    max_warmup_fraction: float = field(
        default=0.5, metadata=_help("Largest fraction of the step budget that warmup may last, in [0, 1].")
    )
    long_budget_steps: int | None = field(
        default=None,
        metadata=_help(
            "Budgets T longer than this many steps get a warmup ramp that grows with sqrt(T) instead of T: "
            "max_warmup_fraction * sqrt(long_budget_steps * T) steps, so a long run does not spend a fixed share of "
            "its budget on LRs far below the useful ones; 0: always max_warmup_fraction * T, the paper's rule "
            "(default: 500 for 'robust', 0 for 'paper')."
        ),
    )
    warmup_type: str = field(default="exp", metadata=_help("Warmup ramp: 'exp' (geometric) or 'linear'."))
    warmup_unit: str = field(
        default="step", metadata=_help("Grow the LR every 'step' or once per 'epoch' (needs steps per epoch).")
    )
    immediate_cooldown: bool = field(
        default=False,
        metadata=_help("Cosine-decay right after the switch (True) or hold the LR until the cooldown (False)."),
    )
    decay_phase_stat: str | None = field(
        default=None,
        metadata=_help("While holding: None decays by `decay_phase_factor` per epoch; 'loss' reduces on plateau."),
    )
    decay_phase_factor: float = field(
        default=1.0, metadata=_help("Per-epoch (or per-plateau) LR factor while holding, in (0, 1].")
    )
    cooldown_fraction: float = field(
        default=0.2, metadata=_help("Fraction of the budget at its end spent in cooldown, in [0, 1].")
    )
    cooldown_type: str | None = field(
        default=None,
        metadata=_help(
            "Cooldown shape: 'cosine', 'half_cosine' or 'linear' (default: 'linear' for 'robust', 'cosine' for "
            "'paper')."
        ),
    )
    device: str | None = field(
        default=None,
        metadata=_help("Deprecated and ignored: the closed-form GP always runs on the CPU (the reference's option)."),
    )
    confidence: float = field(
        default=0.95, metadata=_help("A prediction votes 'minimum is in the past' above this probability.")
    )
    patience: int = field(default=3, metadata=_help("Number of consecutive passed switch tests needed to switch."))
    n_tests: int = field(default=5, metadata=_help("Number of GP predictions (votes) per switch test."))
    test_interval: int | None = field(
        default=None,
        metadata=_help(
            "Steps between switch tests. Default: with preset 'paper', one epoch (or 1/50 of the budget without "
            "epochs); with preset 'robust', whenever the warmup LR has grown by `test_lr_growth`."
        ),
    )
    preset: str = field(
        default="robust",
        metadata=_help("'robust' (hf_autowu's default) or 'paper' (the published algorithm, for reproduction)."),
    )
    test_lr_growth: float | None = field(
        default=None,
        metadata=_help("Robust cadence: test whenever the warmup LR has grown by this factor (default 1.1)."),
    )
    standardize_losses: bool | None = field(
        default=None, metadata=_flag_help("Standardise the losses before the GP fit (default: True for 'robust').")
    )
    divergence_guard: bool | None = field(
        default=None,
        metadata=_flag_help(
            "Switch at once, without patience, on a non-finite loss or a loss back above its starting level "
            "(default: True for 'robust')."
        ),
    )
    spike_watch: bool | None = field(
        default=None,
        metadata=_flag_help(
            "Watch every warmup step's loss (read one step late, no device sync) and switch at once when it jumps far "
            "above the smoothed curve; with several processes on the losses' means over them, averaged every 4 steps "
            "by an asynchronous all_reduce (default: True for 'robust')."
        ),
    )
    rise_margin: float | None = field(
        default=None,
        metadata=_help(
            "A prediction votes 'minimum in the past' only when the smoothed loss now lies this many GP noise "
            "standard deviations above its minimum, so a flat noisy stretch cannot pass (default: as the preset "
            "says)."
        ),
    )
    swing_margin: float | None = field(
        default=None,
        metadata=_help(
            "A prediction votes 'minimum in the past' only when the smoothed loss now lies more than this many times "
            "the largest bump of its descent (the most it climbed back, beyond one GP noise standard deviation, "
            "before its minimum) above its minimum: a loss that swings on its own (data in a fixed order, noise "
            "correlated over many steps) must rise more than it swung; 0 is the paper's test (default: 2 for "
            "'robust', 0 for 'paper')."
        ),
    )
    min_past_lengthscales: float | None = field(
        default=None,
        metadata=_help(
            "A passed switch test counts toward the switch only when the LR it would choose lies at least this many "
            "GP lengthscales (0.2 of the history) before the latest loss: nearer the end, the smoothed curve is "
            "shaped by the GP as much as by the losses, and a sharp drop into a flat stretch looks like a minimum "
            "already passed; 0 is the paper's test (default: 1 for 'robust', 0 for 'paper')."
        ),
    )
    slowed_fraction: float | None = field(
        default=None,
        metadata=_help(
            "The LR chosen at the switch: where the smoothed loss's descent (per log-LR) has slowed to this fraction "
            "of its steepest rate, before its minimum; 0 is the LR at the minimum, the paper's choice (default: as "
            "the preset says)."
        ),
    )
    max_descent_left: float | None = field(
        default=None,
        metadata=_help(
            "The LR chosen at the switch is never below the point where only this fraction of the smoothed loss's "
            "descent (from its highest point before the minimum down to the minimum) is still ahead, so that a "
            "descent going on well past the slowed point is followed; 1 sets no bound, the paper's choice (default: "
            "0.06 for 'robust', 1 for 'paper')."
        ),
    )
    descent_required_below: int | None = field(
        default=None,
        metadata=_help(
            "A passed switch test on a history of fewer than this many losses counts toward the switch only when "
            "the smoothed loss has really fallen (its minimum three GP noise standard deviations below its start): "
            "on the first few dozen losses of a flat, noisy start, such as a fine-tune's, the smoothed minimum can be "
            "noise; 0 never asks, the paper's test (default: 30 for 'robust', 0 for 'paper')."
        ),
    )
    estimate_at_cap: bool | None = field(
        default=None,
        metadata=_flag_help(
            "When warmup ends without a switch, decay from the GP's best LR instead of the LR reached, and from "
            "min_lr when the loss never really fell (default: True for 'robust')."
        ),
    )
    rewind: bool | None = field(
        default=None,
        metadata=_flag_help(
            "At the switch, restore a warmup snapshot of the parameters and optimizer state (and the model's buffers "
            "when the model is known) taken at or below the chosen LR (default: True for 'robust'; costs "
            "`rewind_snapshots` copies of that state in host memory, or on disk with `rewind_offload_dir`)."
        ),
    )
    rewind_snapshots: int = field(default=3, metadata=_help("Snapshots kept for rewind."))
    rewind_lr_factor: float = field(default=2.0, metadata=_help("LR growth between two rewind snapshots (> 1)."))
    rewind_min_shift: float | None = field(
        default=None,
        metadata=_help(
            "Rewind only when the parameters have moved since the snapshot by at least this fraction of its norm "
            "(||now - snapshot|| / ||snapshot||); below it the steps trained past the chosen LR are kept, as a model "
            "that barely moved there (e.g. a pretrained one) gains from them. After a blow-up rewind always restores. "
            "0: always restore (default: 0.2 for 'robust')."
        ),
    )
    rewind_memory_fraction: float = field(
        default=0.5,
        metadata=_help(
            "Rewind turns itself off, with one warning, when its snapshots would take more than this fraction of the "
            "host memory (or disk space, with `rewind_offload_dir`) available on the node, in (0, 1]."
        ),
    )
    rewind_offload_dir: str | None = field(
        default=None,
        metadata=_help("Keep the rewind snapshots as files in this local folder instead of host memory."),
    )
    seed: int = field(default=0, metadata=_help("Seed of the subsampling generator (same on every process)."))

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):  # numpy scalars become Python values (the state stays plain: a
            value = getattr(self, option.name)  # numpy string in it would not load with `weights_only`)
            if isinstance(value, numbers.Number) and hasattr(value, "item") and not isinstance(value, bool):
                setattr(self, option.name, value.item())
            elif isinstance(value, str) and type(value) is not str:
                setattr(self, option.name, str(value))
        if isinstance(self.rewind_offload_dir, os.PathLike):
            self.rewind_offload_dir = os.fspath(self.rewind_offload_dir)
        self._check_positive_finite("min_lr")
        self._check_positive_finite("max_lr")
        if not self.min_lr < self.max_lr:
            raise ValueError(
                f"`min_lr` must be smaller than `max_lr`, got min_lr={self.min_lr}, max_lr={self.max_lr}."
            )
        if not self.max_lr / self.min_lr < math.inf:
            raise ValueError(
                f"`max_lr / min_lr` must be finite, got min_lr={self.min_lr}, max_lr={self.max_lr}: the ramp grows "
                "geometrically from one to the other."
            )
        self._check_fraction("max_warmup_fraction")
        self._check_fraction("cooldown_fraction")
        if self.long_budget_steps is not None:
            self._check_int("long_budget_steps", minimum=0)
        self._check_choice("warmup_type", WARMUP_TYPES)
        self._check_choice("warmup_unit", WARMUP_UNITS)
        self._check_choice("decay_phase_stat", DECAY_PHASE_STATS)
        self._check_choice("cooldown_type", (None, *COOLDOWN_TYPES))
        self._check_choice("preset", PRESETS)
        if not isinstance(self.immediate_cooldown, bool):
            raise ValueError(f"`immediate_cooldown` must be True or False, got {self.immediate_cooldown!r}.")
        if not (_is_real(self.decay_phase_factor) and 0.0 < self.decay_phase_factor <= 1.0):
            raise ValueError(f"`decay_phase_factor` must be in (0, 1], got {self.decay_phase_factor!r}.")
        if not (_is_real(self.confidence) and 0.0 < self.confidence < 1.0):
            raise ValueError(f"`confidence` must be in (0, 1), got {self.confidence!r}.")
        self._check_int("patience")
        self._check_int("n_tests", maximum=MAX_N_TESTS)
        if self.test_interval is not None:
            self._check_int("test_interval")
        if self.test_lr_growth is not None and not (
            _is_real(self.test_lr_growth) and 1.0 < self.test_lr_growth < math.inf
        ):
            raise ValueError(f"`test_lr_growth` must be a finite number > 1, got {self.test_lr_growth!r}.")
        self._check_int("rewind_snapshots")
        if not (_is_real(self.rewind_lr_factor) and 1.0 < self.rewind_lr_factor < math.inf):
            raise ValueError(f"`rewind_lr_factor` must be a finite number > 1, got {self.rewind_lr_factor!r}.")
        self._check_optional_non_negative("rewind_min_shift")
        self._check_optional_non_negative("rise_margin")
        self._check_optional_non_negative("swing_margin")
        self._check_optional_non_negative("min_past_lengthscales")
        if self.max_descent_left is not None:
            self._check_fraction("max_descent_left")
        if self.descent_required_below is not None:
            self._check_int("descent_required_below", minimum=0)
        if self.slowed_fraction is not None and not (
            _is_real(self.slowed_fraction) and 0.0 <= self.slowed_fraction < 1.0
        ):
            raise ValueError(f"`slowed_fraction` must be in [0, 1), got {self.slowed_fraction!r}.")
        if not (_is_real(self.rewind_memory_fraction) and 0.0 < self.rewind_memory_fraction <= 1.0):
            raise ValueError(f"`rewind_memory_fraction` must be in (0, 1], got {self.rewind_memory_fraction!r}.")
        if self.rewind_offload_dir is not None and not isinstance(self.rewind_offload_dir, str):
            raise ValueError(f"`rewind_offload_dir` must be a folder path or None, got {self.rewind_offload_dir!r}.")
        if self.rewind_offload_dir is not None and os.path.exists(self.rewind_offload_dir):
            if not os.path.isdir(self.rewind_offload_dir):
                raise ValueError(f"`rewind_offload_dir` must be a folder, got a file: {self.rewind_offload_dir!r}.")
        for name in ("standardize_losses", "divergence_guard", "spike_watch", "estimate_at_cap", "rewind"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise ValueError(f"`{name}` must be None, True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"`seed` must be an int in [-2**63, 2**64) (a torch generator seed), got {self.seed!r}.")
        if self.device is not None:
            warnings.warn(
                "AutoWUConfig: `device` is deprecated and ignored (the closed-form GP always runs on the CPU); "
                "drop it.",
                FutureWarning,
                stacklevel=3,
            )
            self.device = None

    @property
    def is_robust(self) -> bool:
        """Whether the robust preset is selected."""
        return self.preset == "robust"

    def preset_setting(self, name: str) -> Any:
        """The value of setting `name`: the option when it is set, else what the preset says (`PRESET_SETTINGS`)."""
        value = getattr(self, name, None)
        return PRESET_SETTINGS[self.preset][name] if value is None else value

    @property
    def effective_test_lr_growth(self) -> float | None:
        """LR growth between two switch tests, or `None` when tests come every `test_interval` steps."""
        return None if self.test_interval is not None else self.preset_setting("test_lr_growth")

    def warmup_length(self, total_steps: int) -> int:
        """The maximum warmup `W` in steps for a budget of `total_steps`: `floor(max_warmup_fraction * T)`, with `T`
        replaced by `sqrt(long_budget_steps * T)` when the budget is longer than `long_budget_steps` (> 0).

        Args:
            total_steps (`int`): The step budget `T`.

        Returns:
            `int`: `W`, which the exponential ramp takes to grow from `min_lr` to `max_lr`.
        """
        reference = self.preset_setting("long_budget_steps")
        span = total_steps if not reference or total_steps <= reference else math.sqrt(reference * total_steps)
        return int(self.max_warmup_fraction * span)

    def cooldown_start(self, total_steps: int) -> int:
        """The step at which the cooldown begins at the latest for a budget of `total_steps`: its last
        `cooldown_fraction` (rounded down to whole steps).

        Args:
            total_steps (`int`): The step budget `T`.

        Returns:
            `int`: `T - floor(cooldown_fraction * T)`.
        """
        return total_steps - int(self.cooldown_fraction * total_steps)

    @property
    def effective_standardize_losses(self) -> bool:
        """Whether losses are standardised before the GP fit."""
        return self.preset_setting("standardize_losses")

    @property
    def effective_divergence_guard(self) -> bool:
        """Whether a non-finite or confidently rising loss switches at once."""
        return self.preset_setting("divergence_guard")

    @property
    def effective_spike_watch(self) -> bool:
        """Whether every warmup step's loss is watched for a blow-up."""
        return self.preset_setting("spike_watch")

    @property
    def effective_estimate_at_cap(self) -> bool:
        """Whether a warmup that hits its cap decays from the GP's estimate of the best LR."""
        return self.preset_setting("estimate_at_cap")

    @property
    def effective_cooldown_type(self) -> str:
        """The cooldown's shape (`ramp.cooldown_factor`)."""
        return self.preset_setting("cooldown_type")

    @property
    def effective_rewind(self) -> bool:
        """Whether warmup snapshots are restored at the switch."""
        return self.preset_setting("rewind")

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (JSON- and `weights_only`-safe)."""
        return dataclasses.asdict(self)

    def differing_options(self, other: AutoWUConfig) -> list[str]:
        """The names of the options whose values differ from `other`'s, sorted."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(name for name, value in mine.items() if value != theirs[name])

    def _check_positive_finite(self, name: str) -> None:
        value = getattr(self, name)
        if not (_is_real(value) and 0.0 < value < math.inf):
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")

    def _check_optional_non_negative(self, name: str) -> None:
        value = getattr(self, name)
        if value is not None and not (_is_real(value) and 0.0 <= value < math.inf):
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")

    def _check_fraction(self, name: str) -> None:
        value = getattr(self, name)
        if not (_is_real(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")

    def _check_choice(self, name: str, allowed: tuple) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")

    def _check_int(self, name: str, minimum: int = 1, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
        if maximum is not None and value > maximum:
            raise ValueError(f"`{name}` must be an int in [{minimum}, {maximum}], got {value!r}.")


def resolve_config(
    config: AutoWUConfig | dict[str, Any] | None, options: dict[str, Any], argument: str
) -> AutoWUConfig:
    """The options an entry point runs with: `config` (an `AutoWUConfig` or a dict of its fields; default: all
    defaults) with `options` (keyword options) on top.

    Raises:
        `ValueError`: when `config` is neither, naming `argument`, or for a name that is not an option.
    """
    known = {option.name for option in dataclasses.fields(AutoWUConfig)}
    given = config if isinstance(config, dict) else {}
    for name in [*given, *options]:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else " See `AutoWUConfig` for the options."
            raise ValueError(f"`{name}` is not an AutoWU option.{hint}")
    if config is None:
        return AutoWUConfig(**options)
    if isinstance(config, dict):
        return AutoWUConfig(**{**config, **options})
    if not isinstance(config, AutoWUConfig):
        raise ValueError(f"`{argument}` must be an AutoWUConfig, a dict of its options or None, got {config!r}.")
    if not options:
        return config
    if type(config) is not AutoWUConfig and not {"seed", "device"} & options.keys():
        return dataclasses.replace(config, **options)  # stays `AutoWUArguments` (its seed is the run's)
    return AutoWUConfig(**{**config.to_dict(), **options})


def check_positive_int(name: str, value: Any) -> int:
    """`value` as an int, when it is one >= 1 (not a bool); else a `ValueError` naming `name`.

    Args:
        name (`str`): The argument's name, for the error message.
        value (`Any`): The argument.

    Returns:
        `int`: the value.
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return int(value)


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """`check_positive_int`, letting `None` through."""
    return None if value is None else check_positive_int(name, value)


def is_number(value: Any) -> bool:
    """A real number (numpy's scalars included), not a bool; NaN included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """An option's number: a plain int or float (numpy's scalars are converted at construction; anything else would
    not load with `weights_only`), not NaN, and within a float's range (an int beyond it is no usable number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return not math.isnan(value)
    except OverflowError:
        return False
