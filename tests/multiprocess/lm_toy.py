"""A tiny causal LM from a config, a byte-level tokenizer built locally and a pre-tokenized dataset, for the TRL and
PEFT tests (no download)."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXT = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
TRL_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")
"""What TRL's `SFTTrainer` adds to each training log entry."""


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Two layers of width 32 over a 256-token (byte) vocabulary, randomly initialised."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id = byte value; id 0 pads. (The datasets are pre-tokenized: TRL only needs the pad token.)"""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, **{chr(i): i for i in range(1, 256)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>")


def lm_dataset(n: int = 64, seed: int = 0) -> Dataset:
    """`n` snippets of `TEXT` (12 to 20 bytes, so batches need padding) as `input_ids`."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        start = int(torch.randint(0, len(TEXT), (), generator=g))
        rows.append({"input_ids": [TEXT[(start + k) % len(TEXT)] for k in range(12 + i % 9)]})
    return Dataset.from_list(rows)


def lora_adapter() -> Any:
    """A LoRA adapter on every linear layer; on a randomly initialised model adapters alone barely move the loss,
    so the output layer trains in full."""
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"], task_type="CAUSAL_LM"
    )


def trl_run_options(output_dir: str, steps: int, save_steps: int, logging_steps: int = 1, save: bool = True) -> dict:
    """The options every TRL config of these tests shares: `steps` steps with batches of 4 on the CPU, seeded, quiet,
    a log entry every `logging_steps` steps and a checkpoint every `save_steps` steps when `save`."""
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "logging_steps": logging_steps,
        "save_strategy": "steps" if save else "no",
        "save_steps": save_steps,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
    }


def sft_config(output_dir: str, steps: int, save_steps: int, logging_steps: int = 1, save: bool = True) -> Any:
    """TRL's `SFTConfig` of the TRL tests (`trl_run_options`), with two micro-batches a step, on the pre-tokenized
    `lm_dataset` (no dataset preparation)."""
    from trl import SFTConfig

    return SFTConfig(
        **trl_run_options(output_dir, steps, save_steps, logging_steps, save),
        gradient_accumulation_steps=2,
        max_length=None,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
