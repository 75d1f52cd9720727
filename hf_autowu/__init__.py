"""hf_autowu: AutoWU, an automatic loss-driven learning-rate schedule, for PyTorch and the Hugging Face stack."""

from .accelerate_checkpointing import register_for_checkpointing
from .arguments import AutoWUArguments
from .config import AutoWUConfig
from .gp import ClosedFormLossCurveGP
from .log_entries import LOG_KEYS, autowu_log_entries, switch_message
from .plotting import log_figure_to_tensorboard, plot_autowu, save_autowu_figure
from .process_files import load_scheduler_state, save_scheduler_state
from .replay import read_loss_curve, replay_curve, scheduler_from_state_dict
from .rewind import WarmupRewinder
from .scheduler import AutoWU, SwitchTestRecord
from .switch_test import SwitchTester, SwitchTestOutcome, minimum_in_past_probability

__version__ = "0.1.0"

__all__ = [
    "LOG_KEYS",
    "AutoWU",
    "AutoWUArguments",
    "AutoWUCallback",
    "AutoWUConfig",
    "AutoWUTrainer",
    "AutoWUTrainerMixin",
    "ClosedFormLossCurveGP",
    "LossCurveGP",
    "ReferenceSwitchTest",
    "SwitchTestOutcome",
    "SwitchTestRecord",
    "SwitchTester",
    "autowu_log_entries",
    "WarmupRewinder",
    "load_scheduler_state",
    "log_figure_to_tensorboard",
    "minimum_in_past_probability",
    "plot_autowu",
    "read_loss_curve",
    "register_for_checkpointing",
    "replay_curve",
    "save_autowu_figure",
    "save_scheduler_state",
    "scheduler_from_state_dict",
    "switch_message",
]

_TRAINER_EXPORTS = ("AutoWUCallback", "AutoWUTrainer", "AutoWUTrainerMixin")
_REFERENCE_EXPORTS = ("LossCurveGP", "ReferenceSwitchTest")


def __getattr__(name: str):
    if name in _TRAINER_EXPORTS:  # the Trainer integration imports transformers only when asked for
        from . import trainer

        return getattr(trainer, name)
    if name in _REFERENCE_EXPORTS:  # GPyTorch is only needed by the reference implementation
        from . import reference

        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
