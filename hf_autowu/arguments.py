"""`AutoWUArguments`: AutoWU's options as command-line flags beside `TrainingArguments` in one `HfArgumentParser`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import AutoWUConfig

_CONFIG_FIELDS = {option.name: option for option in dataclasses.fields(AutoWUConfig)}


def _flag(name: str) -> Any:
    """`AutoWUConfig`'s on/off field `name` whose default is None ("as the preset says"), as a flag that also takes a
    value: `--rewind` alone is `--rewind true` (`HfArgumentParser` asks an optional bool for a value otherwise)."""
    base = _CONFIG_FIELDS[name]
    return dataclasses.field(default=base.default, metadata={**base.metadata, "nargs": "?", "const": True})


@dataclass
class AutoWUArguments(AutoWUConfig):
    """Every option of `AutoWUConfig` as a command-line flag, beside `TrainingArguments` in one parser.

    `HfArgumentParser((TrainingArguments, AutoWUConfig))` fails: both have a `seed` field ("conflicting option string:
    --seed"). This class is `AutoWUConfig` without its own `seed` (nor the deprecated `device`): AutoWU's subsampling
    seed is the run's, `TrainingArguments.seed`. `AutoWUTrainer(autowu_config=...)` and `AutoWUCallback(...)` take it
    as it is and use `args.seed`; in a hand-written loop, pass `to_config(seed)` to `AutoWU`.

    Example:

    ```python
    from transformers import HfArgumentParser, TrainingArguments

    from hf_autowu import AutoWUArguments, AutoWUTrainer

    training_args, autowu_args = HfArgumentParser((TrainingArguments, AutoWUArguments)).parse_args_into_dataclasses()
    trainer = AutoWUTrainer(model=model, args=training_args, train_dataset=dataset, autowu_config=autowu_args)
    ```
    """

    _argument_group_name = "AutoWU (the fields of hf_autowu.AutoWUConfig; they set the learning rate of every step)"

    standardize_losses: bool | None = _flag("standardize_losses")
    divergence_guard: bool | None = _flag("divergence_guard")
    spike_watch: bool | None = _flag("spike_watch")
    estimate_at_cap: bool | None = _flag("estimate_at_cap")
    rewind: bool | None = _flag("rewind")
    device: str | None = dataclasses.field(default=None, init=False, repr=False)
    seed: int = dataclasses.field(default=0, init=False, repr=False)

    def to_config(self, seed: int) -> AutoWUConfig:
        """The options as an `AutoWUConfig`.

        Args:
            seed (`int`): AutoWU's subsampling seed (the run's seed, e.g. `TrainingArguments.seed`).

        Returns:
            `AutoWUConfig`: the same options, with `seed`.
        """
        options = {name: getattr(self, name) for name in _CONFIG_FIELDS if name not in ("device", "seed")}
        return AutoWUConfig(**options, seed=seed)


def config_for_run(config: AutoWUConfig, seed: int) -> AutoWUConfig:
    """The options a Trainer run uses: `config` itself, or for `AutoWUArguments` (no seed of its own) the same
    options with the run's `seed`.

    Args:
        config (`AutoWUConfig`): The options the entry point was given.
        seed (`int`): The run's seed (`TrainingArguments.seed`).

    Returns:
        `AutoWUConfig`: the options to build `AutoWU` with.
    """
    return config.to_config(seed) if isinstance(config, AutoWUArguments) else config
