"""AutoWU with TRL's `SFTTrainer` (both entry points, with and without a PEFT LoRA adapter) on a tiny causal LM
built from a config: the LR applied and logged is AutoWU's, AutoWU's and TRL's values share the Trainer's log
entries at every logging step, and a resume from a late-warmup checkpoint continues the run exactly. And with
TRL's `DPOTrainer` (preference pairs, a frozen reference model) and `RewardTrainer`: the LR applied is AutoWU's fed
their loss."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, SFTTrainer

import hf_autowu.trainer
from hf_autowu import AutoWU, AutoWUCallback, AutoWUConfig, AutoWUTrainerMixin
from hf_autowu.trainer import LOG_KEYS

sys.path.insert(0, str(Path(__file__).parent / "multiprocess"))
from lm_toy import TRL_METRICS, byte_tokenizer, lm_dataset, lora_adapter, sft_config, tiny_llama, trl_run_options  # noqa: E402

# LRs from 1e-4 to 10 over 30 warmup steps: the loss falls, then blows up, and AutoWU switches inside the budget
OPTIONS = {"min_lr": 1e-4, "max_lr": 10.0}
STEPS, STEPS_PER_EPOCH, SAVE_STEPS = 60, 8, 3  # 64 rows in batches of 4, gradient accumulation 2
GRPO_STEPS, GRPO_SAVE_STEPS = 40, 10

# (entry point, how the LoRA adapter comes in, logging_steps)
SETUPS = [
    ("callback", None, 1),
    ("callback", "peft_config", 4),
    ("mixin", None, 4),
    ("mixin", "get_peft_model", 1),
]


@pytest.fixture(autouse=True)
def no_figure(monkeypatch):
    monkeypatch.setattr(hf_autowu.trainer, "SAVE_FIGURE", False)


class RecordingSteps:
    """A trainer keeping what `training_step` returns, per optimizer step (a record independent of hf_autowu)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.returned.setdefault(self.state.global_step, []).append(loss.detach().clone())
        return loss


class RecordingSFTTrainer(RecordingSteps, SFTTrainer):
    pass


class RecordingDPOTrainer(RecordingSteps, DPOTrainer):
    pass


class AutoWUDPOTrainer(AutoWUTrainerMixin, RecordingDPOTrainer):
    pass


class RecordingRewardTrainer(RecordingSteps, RewardTrainer):
    pass


class AutoWURewardTrainer(AutoWUTrainerMixin, RecordingRewardTrainer):
    pass


class AutoWUSFTTrainer(AutoWUTrainerMixin, RecordingSFTTrainer):
    pass


class LRRecorder(TrainerCallback):
    """The LR of every parameter group just before each optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


def make_trainer(
    entry_point: str, lora: str | None, output_dir: str, logging_steps: int, save: bool = True
) -> RecordingSFTTrainer:
    model = tiny_llama()
    adapter = lora_adapter()
    if lora == "get_peft_model":
        model = get_peft_model(model, adapter)
    args = sft_config(output_dir, STEPS, SAVE_STEPS, logging_steps, save)
    common = {
        "model": model,
        "args": args,
        "train_dataset": lm_dataset(),
        "processing_class": byte_tokenizer(),
        "peft_config": adapter if lora == "peft_config" else None,
        "callbacks": [LRRecorder()],
    }
    return with_autowu(entry_point, RecordingSFTTrainer, AutoWUSFTTrainer, common)


def with_autowu(entry_point: str, plain: type, mixed: type, kwargs: dict) -> RecordingSteps:
    """The trainer of `entry_point`: `plain` with an `AutoWUCallback` added, or `mixed` (AutoWU's mixin first)."""
    config = AutoWUConfig(**OPTIONS)
    if entry_point == "callback":
        trainer = plain(**kwargs)
        trainer.add_callback(AutoWUCallback(config))
    else:
        trainer = mixed(**kwargs, autowu_config=config)
    trainer.returned = {}
    return trainer


def scheduler_of(trainer: RecordingSteps) -> AutoWU:
    if isinstance(trainer, AutoWUTrainerMixin):
        return trainer.lr_scheduler
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoWUCallback)]
    return callback.scheduler


def recorder_of(trainer: RecordingSFTTrainer) -> LRRecorder:
    (recorder,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LRRecorder)]
    return recorder


def hand_fed_lrs(trainer: RecordingSFTTrainer) -> list[float]:
    """The LR of every step from an AutoWU fed, by hand, each step's sum of `training_step` returns."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, STEPS_PER_EPOCH, total_steps=STEPS, **OPTIONS)
    lrs = []
    for step in range(STEPS):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(torch.stack(trainer.returned[step]).sum())
    return lrs


def weights(trainer: RecordingSFTTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(("entry_point", "lora", "logging_steps"), SETUPS)
def test_sft_trainer(entry_point, lora, logging_steps, tmp_path):
    trainer = make_trainer(entry_point, lora, str(tmp_path / "full"), logging_steps)
    trainer.train()
    scheduler, recorder = scheduler_of(trainer), recorder_of(trainer)
    assert (lora is not None) == hasattr(trainer.model, "peft_config")
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(trainable) < len(list(trainer.model.parameters())) if lora else len(trainable) > 0
    assert scheduler.switch_step is not None and scheduler.rewinder.rewound_to is not None

    # the optimizer used AutoWU's LR at every step, as an AutoWU fed the same losses by hand says
    applied = [lrs[0] for lrs in recorder.lrs]
    assert all(len(set(lrs)) == 1 for lrs in recorder.lrs)
    assert applied == hand_fed_lrs(trainer)

    # every logging step (and the switch step) has one entry with the Trainer's, AutoWU's and TRL's values
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    expected_steps = sorted(set(range(logging_steps, STEPS + 1, logging_steps)) | {scheduler.switch_step})
    assert [entry["step"] for entry in entries] == expected_steps
    for entry in entries:
        assert set(LOG_KEYS) | set(TRL_METRICS) | {"learning_rate", "grad_norm"} <= set(entry), entry["step"]
        assert entry["learning_rate"] == applied[entry["step"] - 1]
        assert entry["autowu/lr"] == scheduler.lr_at(entry["step"])
    assert [entry["num_tokens"] for entry in entries] == sorted(entry["num_tokens"] for entry in entries)

    # resume from the last checkpoint between the snapshot the switch restores and the switch
    rewound, switch = scheduler.rewinder.rewound_to["step"], scheduler.switch_step
    start = max(s for s in range(SAVE_STEPS, STEPS, SAVE_STEPS) if rewound < s < switch)
    resumed = make_trainer(entry_point, lora, str(tmp_path / "resumed"), logging_steps, save=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{start}"))
    again = scheduler_of(resumed)
    assert [lrs[0] for lrs in recorder_of(resumed).lrs] == applied[start:]
    assert again.rewinder.rewound_to == scheduler.rewinder.rewound_to and again.peak_lr == scheduler.peak_lr
    final, reference = weights(resumed), weights(trainer)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], value) for name, value in reference.items())


WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")
REWARD_METRICS = ("accuracy", "margin", "mean_reward")


def preference_data(n: int = 64) -> tuple[Dataset, PreTrainedTokenizerFast]:
    """`n` (prompt, chosen, rejected) rows of three words and three more (chosen: sorted; rejected: reversed), and a
    word-level tokenizer over them built here."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2} | {w: i + 3 for i, w in enumerate(sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist()]
        rows.append(
            {
                "prompt": " ".join(words[:3]),
                "chosen": " " + " ".join(sorted(words[3:])),
                "rejected": " " + " ".join(words[:2:-1]),
            }
        )
    return Dataset.from_list(rows), wrapped


def preference_args(config_class: type, output_dir: Path) -> Any:
    """The DPO or reward config of these tests: 60 steps of 8 rows (two micro-batches), a log entry every step."""
    return config_class(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )


def assert_autowu_drove(trainer: RecordingSteps, metrics: tuple[str, ...]) -> None:
    """A pairwise loss starts at ln 2; the LR applied at every step is what an AutoWU fed each step's sum of
    `training_step` returns by hand gives; the run switched and rewound; every step's log entry has AutoWU's keys,
    the trainer's `metrics` and the LR applied."""
    scheduler = scheduler_of(trainer)
    assert scheduler.switch_step is not None and scheduler.rewinder.rewound_to is not None
    assert torch.stack(trainer.returned[0]).sum().item() == pytest.approx(math.log(2), rel=1e-3)
    applied = [lrs[0] for lrs in recorder_of(trainer).lrs]
    assert applied == hand_fed_lrs(trainer)
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(entries) == STEPS
    for entry in entries:
        assert set(LOG_KEYS) | set(metrics) <= set(entry), entry["step"]
        assert entry["learning_rate"] == applied[entry["step"] - 1]


@pytest.mark.parametrize("entry_point", ["callback", "mixin"])
def test_dpo_trainer(entry_point, tmp_path):
    """DPO's loss (ln 2 at the start, then falling as the policy moves from the frozen reference) drives AutoWU
    (`assert_autowu_drove`), and the rewind restores the policy only: the reference model is untouched."""
    dataset, tokenizer = preference_data()
    common = {
        "model": tiny_llama(),
        "ref_model": tiny_llama(),  # the same initial weights, built here: no hub
        "args": preference_args(DPOConfig, tmp_path),
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "callbacks": [LRRecorder()],
    }
    trainer = with_autowu(entry_point, RecordingDPOTrainer, AutoWUDPOTrainer, common)
    reference = {name: p.detach().clone() for name, p in trainer.ref_model.named_parameters()}
    trainer.train()
    assert_autowu_drove(trainer, DPO_METRICS)
    assert all(torch.equal(p, reference[name]) for name, p in trainer.ref_model.named_parameters())


@pytest.mark.parametrize("entry_point", ["callback", "mixin"])
def test_reward_trainer(entry_point, tmp_path):
    """A reward model (a sequence classifier with one output) trained on the same pairs by TRL's `RewardTrainer`:
    its Bradley-Terry loss drives AutoWU as DPO's does (`assert_autowu_drove`)."""
    dataset, tokenizer = preference_data()
    config = tiny_llama().config  # the causal LM's shape, with one output on top
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    common = {
        "model": LlamaForSequenceClassification(config),
        "args": preference_args(RewardConfig, tmp_path),
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "callbacks": [LRRecorder()],
    }
    trainer = with_autowu(entry_point, RecordingRewardTrainer, AutoWURewardTrainer, common)
    trainer.train()
    assert_autowu_drove(trainer, REWARD_METRICS)


class AutoWUGRPOTrainer(AutoWUTrainerMixin, GRPOTrainer):
    pass


def grpo_trainer(entry_point: str, output_dir: Path, save: bool = True) -> GRPOTrainer:
    """TRL's `GRPOTrainer` on the tiny LM: 40 steps of 4 completions (8 bytes) of one prompt, rewarded for each "a",
    with AutoWU from `min_lr` 1e-5 to `max_lr` 0.1 (a ramp the policy survives), a checkpoint every 10 steps."""
    options = trl_run_options(str(output_dir), GRPO_STEPS, GRPO_SAVE_STEPS, save=save)
    args = GRPOConfig(**options, num_generations=4, max_completion_length=8)
    common = {
        "model": tiny_llama(),
        "reward_funcs": lambda completions, **kwargs: [float(text.count("a")) for text in completions],
        "args": args,
        "train_dataset": Dataset.from_list([{"prompt": "the quick brown "}] * 64),
        "processing_class": byte_tokenizer(),
        "callbacks": [LRRecorder()],
    }
    config = AutoWUConfig(min_lr=1e-5, max_lr=0.1)
    if entry_point == "callback":
        return GRPOTrainer(**{**common, "callbacks": [*common["callbacks"], AutoWUCallback(config)]})
    return AutoWUGRPOTrainer(**common, autowu_config=config)


@pytest.mark.parametrize("entry_point", ["callback", "mixin"])
def test_grpo_trainer_decays_from_min_lr_and_resumes_exactly(entry_point, tmp_path, caplog):
    """GRPO's loss is about 0 by construction (README, "Scaling out"): the ramp reaches its cap without a fall, and
    AutoWU decays from `min_lr` and says why; a resume from a checkpoint written in warmup repeats the LRs and ends on
    the uninterrupted run's weights, bit for bit."""
    full = grpo_trainer(entry_point, tmp_path / "full")
    with caplog.at_level(logging.WARNING, logger="hf_autowu"):
        full.train()
    scheduler = scheduler_of(full)
    assert scheduler.switch_reason == "cap" and scheduler.switch_step == GRPO_STEPS // 2
    assert scheduler.peak_lr == 1e-5 and "never really fell" in caplog.text
    applied = [lrs[0] for lrs in recorder_of(full).lrs]
    assert len(applied) == GRPO_STEPS and max(applied[scheduler.switch_step :]) <= 1e-5
    resumed = grpo_trainer(entry_point, tmp_path / "resumed", save=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{GRPO_SAVE_STEPS}"))
    assert [lrs[0] for lrs in recorder_of(resumed).lrs] == applied[GRPO_SAVE_STEPS:]
    final, reference = weights(resumed), weights(full)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], value) for name, value in reference.items())


def test_the_mixin_after_a_trainer_in_the_bases_is_refused_when_the_class_is_made():
    """After `SFTTrainer` in the bases the mixin's methods never run (`Trainer.__init__` calls no `super().__init__`):
    the run would train on the Trainer's own schedule without a word. The class statement itself says so."""
    with pytest.raises(TypeError, match="put AutoWUTrainerMixin first in the bases"):

        class Reversed(SFTTrainer, AutoWUTrainerMixin):
            pass

    class Right(AutoWUTrainerMixin, SFTTrainer):
        pass

    class Further(Right):  # a subclass of a class in the right order is fine
        pass

    assert Further.__mro__.index(AutoWUTrainerMixin) < Further.__mro__.index(SFTTrainer)
