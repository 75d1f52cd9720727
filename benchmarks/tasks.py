"""The benchmark tasks: data, models and the training loop of each entry point (all offline, 2-core CPU sized).

Each task trains one small model from scratch (or, for the fine-tuning task, from a checkpoint pretrained inside
the benchmark and cached) in the shape HF users train it, through one entry point:

- ``loop``: a hand-written PyTorch loop, exactly as the README shows (`scheduler.step(loss)`, nothing attached);
- ``accelerate``: a hand-written loop through `accelerate.Accelerator`;
- ``trainer``: `transformers.Trainer` (AutoWU: `callbacks=[AutoWUCallback()]`);
- ``autowu_trainer``: `transformers.Trainer` (AutoWU: the `AutoWUTrainer` subclass);
- ``trl``: TRL's `SFTTrainer` (AutoWU: `AutoWUTrainerMixin` on it).

How a method sets the learning rate in each entry point lives in `methods.py`; this module only trains and scores.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import methods as m
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

CACHE_DIR = Path(__file__).resolve().parent / "results" / "cache"


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task.

    Attributes:
        name: key used on the command line and in the results.
        title: one-line description for the report.
        steps: optimizer steps of one training run (the budget every method gets).
        batch_size: training batch size.
        steps_per_epoch: optimizer steps per epoch (the paper's AutoWU tests once per epoch).
        metric: "accuracy" (higher is better) or "loss" (lower is better).
        entry: "loop", "accelerate", "trainer", "autowu_trainer" or "trl" (see the module docstring).
        runner: the function that trains and scores one run.
        oracle_center: grid LR the oracle's first 8 points are centred on (the grid grows while its best point
            is at an edge, so this only saves runs).
        finder_iters: steps of the LR range test.
        finder_skip: (skip_start, skip_end) when reading the suggestion off the range test.
    """

    name: str
    title: str
    steps: int
    batch_size: int
    steps_per_epoch: int
    metric: str
    entry: str
    runner: Callable[..., RunResult] = field(repr=False, compare=False)
    oracle_center: float = 3.2e-3
    finder_iters: int = 100
    finder_skip: tuple[int, int] = (10, 5)


def smoke_task(task: TaskSpec) -> TaskSpec:
    """A tiny version of ``task`` for the smoke test."""
    return replace(
        task,
        steps=4 * min(task.steps_per_epoch, 4),
        steps_per_epoch=min(task.steps_per_epoch, 4),
        finder_iters=8,
        finder_skip=(1, 1),
    )


@dataclass
class RunResult:
    """What one training run produced (a grid point of the oracle counts as one run)."""

    val: float
    test: float
    val_loss: float
    test_loss: float
    steps: int
    lrs: list[float]
    losses: list[float]
    compute: int = 0
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- data


@cache
def digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The 1797 digits, pixels scaled to [-1, 1], split 60/20/20 (stratified, fixed seed) into train/val/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 8.0 - 1.0).astype(np.float32)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest)
    return {
        name: (torch.from_numpy(a), torch.from_numpy(b).long())
        for name, a, b in (("train", x_tr, y_tr), ("val", x_va, y_va), ("test", x_te, y_te))
    }


def digits_at(size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits splits upsampled (bilinear) to ``size`` x ``size``."""
    return {
        name: (F.interpolate(x, size=size, mode="bilinear", align_corners=False), y)
        for name, (x, y) in digits_splits().items()
    }


class DictDataset(Dataset):
    """A dataset of dicts of tensors, indexed along the first dimension (what the Trainer expects)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def split_of(index: int) -> str:
    """The split a text's `index`-th piece (a file, a topic, a chunk) goes to: index % 10 == 0 validation, == 1 test,
    the rest training."""
    return "val" if index % 10 == 0 else "test" if index % 10 == 1 else "train"


def _split_by_index(pieces: list[bytes]) -> dict[str, torch.Tensor]:
    """Pieces dealt out by `split_of`; each split joined by newlines."""
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for i, piece in enumerate(pieces):
        parts[split_of(i)].append(piece)
    return {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8).long() for k, v in parts.items()}


@cache
def stdlib_bytes() -> dict[str, torch.Tensor]:
    """The top-level ``.py`` files of this Python's standard library as bytes, split by file (sorted by name)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return _split_by_index([path.read_bytes() for path in files])


@cache
def docs_bytes() -> dict[str, torch.Tensor]:
    """English prose that ships with Python: the documentation topics of ``pydoc_data``, split by topic."""
    from pydoc_data.topics import topics

    return _split_by_index([topics[name].encode() for name in sorted(topics)])


class RandomWindows(Dataset):
    """``length`` windows of ``seq_len`` bytes at fresh random offsets: an "epoch" is ``length`` windows.

    The index is ignored; offsets come from the dataset's own seeded generator, so a single-process loader
    sees the same sequence for the same seed. With ``mask`` set, each window is also masked for a masked LM.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, length: int, seed: int, mask: bool = False) -> None:
        self.data, self.seq_len, self.length, self.mask = data, seq_len, length, mask
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(torch.randint(len(self.data) - self.seq_len, (1,), generator=self.generator))
        window = self.data[start : start + self.seq_len]
        return mask_tokens(window, self.generator) if self.mask else {"input_ids": window, "labels": window}


MASK_ID, RANDOM_VOCAB, MLM_VOCAB = 256, 256, 260


def mask_tokens(window: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """BERT's masking: 15% of the bytes are predicted; of those 80% become [MASK], 10% a random byte, 10% stay."""
    chosen = torch.rand(window.shape, generator=generator) < 0.15
    roll = torch.rand(window.shape, generator=generator)
    inputs = window.clone()
    inputs[chosen & (roll < 0.8)] = MASK_ID
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(RANDOM_VOCAB, (int(swap.sum()),), generator=generator)
    return {"input_ids": inputs, "labels": torch.where(chosen, window, torch.full_like(window, -100))}


def text_chunks(data: torch.Tensor, seq_len: int, count: int, mask_seed: int | None = None) -> DictDataset:
    """``count`` evenly spread, non-overlapping windows of ``seq_len`` bytes (the fixed val/test sets); masked with
    a fixed generator when ``mask_seed`` is given."""
    starts = torch.linspace(0, len(data) - seq_len, count).long()
    windows = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
    if mask_seed is None:
        return DictDataset(input_ids=windows, labels=windows)
    masked = mask_tokens(windows, torch.Generator().manual_seed(mask_seed))
    return DictDataset(**masked)


# --------------------------------------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a max-pool and a two-layer head (38k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of 1x8x8 images."""
        return self.net(x)


def timm_vit_model() -> nn.Module:
    """timm's ``test_vit`` (6 blocks, width 64) on 16x16 one-channel images in 4x4 patches."""
    import timm

    return timm.create_model("test_vit", num_classes=10, in_chans=1, img_size=16, patch_size=4)


def timm_digits_model() -> nn.Module:
    """timm's ``test_efficientnet_gn`` (GroupNorm, no BatchNorm) for 1-channel images, as a transformers model."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="test_efficientnet_gn", num_labels=10, model_args={"in_chans": 1})
    return TimmWrapperForImageClassification(config)


def gpt2_model(width: int = 64) -> nn.Module:
    """A 2-layer GPT-2 with a byte vocabulary, context 64, 4 heads, no dropout, `width` wide (64 in the suite)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=64,
        n_embd=width,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def llama_model() -> nn.Module:
    """A 2-layer Llama-style decoder (RMSNorm, SwiGLU, rotary, grouped-query attention) on bytes, width 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def bert_model() -> nn.Module:
    """A 2-layer BERT masked-LM encoder on bytes (+ [MASK]), width 64."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=MLM_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        pad_token_id=MLM_VOCAB - 1,
    )
    return BertForMaskedLM(config)


PRETRAIN_RECIPE = {"steps": 1500, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup": 75, "seed": 1234}
"""How the fine-tuning task's base model is pretrained (GPT-2 above, AdamW, linear warmup + cosine, stdlib code)."""


def cached_weights(
    name: str, recipe: dict[str, Any], train: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The state dict `train()` returns, trained once per `recipe` and cached on disk as `name_<recipe hash>.pt`.

    One process trains it while the others wait for the file and load it. `train` seeds itself; the caller's random
    state is left as it would be with the file already cached.
    """
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE_DIR / f"{name}_{key}.pt"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            with torch.random.fork_rng():
                torch.save(train(), path)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return torch.load(path, weights_only=True)


WIDE_PRETRAIN_RECIPE = {
    "width": 256,
    "steps": 1000,
    "batch_size": 16,
    "seq_len": 64,
    "lr": 1e-3,
    "warmup": 50,
    "seed": 1234,
}
"""How the held-out wide fine-tune's base model is pretrained: the GPT-2 above at width 256 (1.7M parameters), on the
same code with the same loop, a lower LR for the wider model and fewer steps (each costs ~4x more)."""


def pretrained_gpt2(recipe: dict[str, Any] | None = None) -> nn.Module:
    """The GPT-2 above pretrained on the stdlib's code with `recipe` (default `PRETRAIN_RECIPE`; a recipe's
    ``width`` sets the model's, 64 without), trained once and cached on disk."""
    recipe = PRETRAIN_RECIPE if recipe is None else recipe
    model = gpt2_model(recipe.get("width", 64))
    name = f"gpt2_w{recipe['width']}_stdlib_pretrained" if "width" in recipe else "gpt2_stdlib_pretrained"
    model.load_state_dict(cached_weights(name, recipe, partial(_pretrain_gpt2, recipe)))
    return model


def pretrain(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    recipe: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """Train a base model the way its recipe says: AdamW at ``recipe["lr"]`` with `quality.py`'s settings, linear
    warmup over ``recipe["warmup"]`` steps and cosine decay to zero at ``recipe["steps"]``.

    Args:
        model: the freshly initialised model, trained in place.
        batches: at least ``recipe["steps"]`` batches.
        loss: the training loss of the model on one batch.
        recipe: ``lr``, ``warmup`` and ``steps``.

    Returns:
        The trained model's state dict.
    """
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], **m.ADAMW)
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe["warmup"], recipe["steps"])
    for _, batch in zip(range(recipe["steps"]), batches, strict=False):
        loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return model.state_dict()


def pretrain_on_code(
    make_model: Callable[[], nn.Module], recipe: dict[str, Any], mask: bool = False
) -> dict[str, torch.Tensor]:
    """A base model pretrained on the stdlib's code (the training split of `stdlib_bytes`) with `pretrain`'s loop:
    seeded by ``recipe["seed"]`` before `make_model()` draws it; a masked LM (`mask_tokens`) when `mask` is set, else
    a causal LM.

    Args:
        make_model: builds the freshly initialised model (its `forward` takes a batch's keys and returns `.loss`).
        recipe: `pretrain`'s recipe, with ``seq_len`` and ``seed``.
        mask: whether the windows are masked for a masked LM.

    Returns:
        `dict`: the trained model's state dict.
    """
    torch.manual_seed(recipe["seed"])
    model = make_model()
    windows = RandomWindows(
        stdlib_bytes()["train"], recipe["seq_len"], recipe["steps"] * recipe["batch_size"], recipe["seed"], mask=mask
    )
    loader = DataLoader(windows, batch_size=recipe["batch_size"])
    return pretrain(model, loader, lambda model, batch: model(**batch).loss, recipe)


def _pretrain_gpt2(recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    return pretrain_on_code(partial(gpt2_model, recipe.get("width", 64)), recipe)


# -------------------------------------------------------------------------------- hand-written loops


def _endless(loader: DataLoader) -> Iterator[Any]:
    """Cycle through a DataLoader forever, reshuffling each epoch."""
    while True:
        yield from loader


@torch.no_grad()
def _classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on a tensor split."""
    logits = model(x)
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


def classifier_loop_setup(
    task: TaskSpec,
    method: str,
    seed: int,
    peak_lr: float | None,
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
) -> tuple[nn.Module, Any, Any, DataLoader, Any]:
    """The model, optimizer, scheduler, shuffled training loader and Accelerator (None for a plain loop) of
    `run_classifier_loop`, prepared by Accelerate for ``entry="accelerate"``."""
    loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=task.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    accelerator = None
    if task.entry == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, loader = accelerator.prepare(model, loader)
    optimizer, scheduler = m.loop_optimizer(method, model, task, peak_lr)
    if accelerator is not None:
        optimizer = accelerator.prepare(optimizer)
    return model, optimizer, scheduler, loader, accelerator


def run_classifier_loop(
    task: TaskSpec,
    method: str,
    seed: int,
    peak_lr: float | None,
    make_model: Callable[[], nn.Module],
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> RunResult:
    """Train an image classifier in a hand-written loop (through Accelerate for ``entry="accelerate"``) and score
    it on val and test. The AutoWU loop is the README's: `scheduler.step(loss)` after every optimizer step."""
    x_train, y_train = splits["train"]
    torch.manual_seed(seed)
    model = make_model()
    info: dict[str, Any] = {}
    sweep_steps = 0
    if method in m.FINDER_METHODS:
        sweep_loader = DataLoader(
            TensorDataset(x_train, y_train),
            batch_size=task.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed + 10_000),
        )
        peak_lr, sweep_steps, info = m.lr_range_test(method, model, nn.CrossEntropyLoss(), sweep_loader, task)
    model, optimizer, scheduler, loader, accelerator = classifier_loop_setup(
        task, method, seed, peak_lr, model, x_train, y_train
    )
    batches = _endless(loader)
    lrs, losses = [], []
    model.train()
    m.set_optimizer_mode(optimizer, train=True)
    steps = m.run_steps(method, task)
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        lrs.append(m.effective_lr(optimizer))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        m.step_scheduler(method, scheduler, loss.detach())
        losses.append(loss.item())
    if method in m.AUTOWU_METHODS:
        info.update(m.autowu_info(scheduler))
    model.eval()
    m.set_optimizer_mode(optimizer, train=False)
    model = accelerator.unwrap_model(model) if accelerator is not None else model
    val, val_loss = _classify(model, *splits["val"])
    test, test_loss = _classify(model, *splits["test"])
    if accelerator is not None:
        accelerator.free_memory()
    return RunResult(val, test, val_loss, test_loss, steps, lrs, losses, steps + sweep_steps, info)


# --------------------------------------------------------------------------------------- Trainer tasks


class _LossOf(nn.Module):
    """Wraps a transformers model so that ``module(batch_dict)`` returns its loss (for torch-lr-finder)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own loss on a batch dict that holds ``labels``."""
        return self.model(**batch).loss


def _dict_batches(loader: DataLoader) -> Any:
    """A torch-lr-finder iterator over dict batches: inputs are the dict, labels its ``labels``."""
    from torch_lr_finder import TrainDataLoaderIter

    class DictBatches(TrainDataLoaderIter):
        def inputs_labels_from_batch(self, batch_data: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
            return batch_data, batch_data["labels"]

    return DictBatches(loader)


def _accuracy(eval_pred: Any) -> dict[str, float]:
    """compute_metrics for classification: top-1 accuracy."""
    logits, labels = eval_pred
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (id = byte value, built locally with `tokenizers`), for TRL's trainers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of), strict=True)}
    tokenizer = Tokenizer(models.BPE(vocab={c: b for b, c in byte_to_char.items()}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=byte_to_char[0], pad_token=byte_to_char[0])


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-level alphabet maps to ``char``."""
    code = ord(char)
    if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
        return code
    shifted = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return shifted[code - 256]


def run_with_trainer(
    task: TaskSpec,
    method: str,
    seed: int,
    peak_lr: float | None,
    make_model: Callable[[], nn.Module],
    datasets: dict[str, Dataset],
    classification: bool,
) -> RunResult:
    """Train ``make_model()`` with the transformers Trainer (or TRL's SFTTrainer) under ``method``; score it on
    val and test."""
    from transformers import TrainerCallback, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(seed)
    model = make_model()
    info: dict[str, Any] = {}
    sweep_steps = 0
    if method in m.FINDER_METHODS:
        loader = DataLoader(
            datasets["finder"],
            batch_size=task.batch_size,
            shuffle=True,
            collate_fn=default_data_collator,
            generator=torch.Generator().manual_seed(seed + 10_000),
        )
        peak_lr, sweep_steps, info = m.lr_range_test(
            method, _LossOf(model), lambda loss, _labels: loss, _dict_batches(loader), task
        )
    trainer_cls, overrides, trainer_kwargs, callbacks = m.trainer_method_settings(method, task, peak_lr)
    if method == "ramp":
        trainer_kwargs["optimizers"] = m.ramp_optimizers(model, task.steps)
    lrs: list[float] = []

    class RecordLR(TrainerCallback):
        """Records the step size each optimizer step uses."""

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            lrs.append(m.effective_lr(optimizer))

    with tempfile.TemporaryDirectory() as tmp:
        common = {
            "output_dir": tmp,
            "max_steps": task.steps,
            "per_device_train_batch_size": task.batch_size,
            "per_device_eval_batch_size": 256,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "seed": seed,
            "disable_tqdm": True,
            "dataloader_pin_memory": False,
            "prediction_loss_only": not classification,
            **overrides,
        }
        if task.entry == "trl":
            from trl import SFTConfig

            args = SFTConfig(
                **common,
                max_length=None,
                packing=False,
                dataset_kwargs={"skip_prepare_dataset": True},
                remove_unused_columns=False,
            )
            trainer_kwargs = {
                **trainer_kwargs,
                "processing_class": byte_tokenizer(),
                "data_collator": default_data_collator,
            }
        else:
            from transformers import TrainingArguments

            args = TrainingArguments(**common)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=datasets["train"],
            callbacks=[*callbacks, RecordLR()],
            compute_metrics=_accuracy if classification else None,
            **trainer_kwargs,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        m.set_optimizer_mode(trainer.optimizer, train=False)
        val = trainer.evaluate(datasets["val"], metric_key_prefix="val")
        test = trainer.evaluate(datasets["test"], metric_key_prefix="test")
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    scheduler = m.trainer_autowu_scheduler(trainer, callbacks)
    if scheduler is not None:
        info.update(m.autowu_info(scheduler))
    key = "accuracy" if classification else "loss"
    return RunResult(
        val[f"val_{key}"],
        test[f"test_{key}"],
        val["val_loss"],
        test["test_loss"],
        trainer.state.global_step,
        lrs,
        losses,
        trainer.state.global_step + sweep_steps,
        info,
    )


# ------------------------------------------------------------------------------------------ the tasks


def run_digits_cnn(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The digits CNN in the README's hand-written loop."""
    return run_classifier_loop(task, method, seed, peak_lr, DigitsCNN, digits_splits())


def run_vit_digits(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """timm's test ViT on 16x16 digits in an Accelerate loop."""
    return run_classifier_loop(task, method, seed, peak_lr, timm_vit_model, digits_at(16))


def run_timm_digits(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The timm EfficientNet on 16x16 digits through the Trainer."""
    datasets: dict[str, Dataset] = {
        name: DictDataset(pixel_values=x, labels=y) for name, (x, y) in digits_at(16).items()
    }
    datasets["finder"] = datasets["train"]
    return run_with_trainer(task, method, seed, peak_lr, timm_digits_model, datasets, classification=True)


def _text_datasets(task: TaskSpec, seed: int, text: dict[str, torch.Tensor], mask: bool) -> dict[str, Dataset]:
    epoch_windows = task.steps_per_epoch * task.batch_size
    return {
        "train": RandomWindows(text["train"], 64, epoch_windows, seed, mask=mask),
        "finder": RandomWindows(text["train"], 64, epoch_windows, seed + 10_000, mask=mask),
        "val": text_chunks(text["val"], 64, 256, mask_seed=1 if mask else None),
        "test": text_chunks(text["test"], 64, 256, mask_seed=2 if mask else None),
    }


def run_gpt2_stdlib(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The tiny GPT-2 on the standard library's bytes through the Trainer (64-byte windows)."""
    datasets = _text_datasets(task, seed, stdlib_bytes(), mask=False)
    return run_with_trainer(task, method, seed, peak_lr, gpt2_model, datasets, classification=False)


def run_llama_stdlib(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The tiny Llama-style decoder on the standard library's bytes through the Trainer (AutoWUTrainer)."""
    datasets = _text_datasets(task, seed, stdlib_bytes(), mask=False)
    return run_with_trainer(task, method, seed, peak_lr, llama_model, datasets, classification=False)


def run_bert_docs(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The tiny BERT masked LM on Python's documentation prose through the Trainer (AutoWUTrainer)."""
    datasets = _text_datasets(task, seed, docs_bytes(), mask=True)
    return run_with_trainer(task, method, seed, peak_lr, bert_model, datasets, classification=False)


def run_gpt2_finetune_docs(task: TaskSpec, method: str, seed: int, peak_lr: float | None) -> RunResult:
    """The GPT-2 pretrained on code, fine-tuned on documentation prose with TRL's SFTTrainer (which takes
    `datasets.Dataset`s: the training windows are drawn up front, enough for the whole budget)."""
    from datasets import Dataset as HFDataset

    text = docs_bytes()
    windows = RandomWindows(text["train"], 64, task.steps * task.batch_size, seed)
    datasets = {
        "train": HFDataset.from_dict({"input_ids": [windows[i]["input_ids"].tolist() for i in range(len(windows))]}),
        "finder": RandomWindows(text["train"], 64, task.steps_per_epoch * task.batch_size, seed + 10_000),
        "val": text_chunks(text["val"], 64, 256),
        "test": text_chunks(text["test"], 64, 256),
    }
    datasets["train"] = datasets["train"].map(
        lambda row: {"labels": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])}
    )
    for split in ("val", "test"):
        tensors = datasets[split].tensors
        columns = {k: v.tolist() for k, v in tensors.items()}
        columns["attention_mask"] = torch.ones_like(tensors["labels"]).tolist()
        datasets[split] = HFDataset.from_dict(columns)
    return run_with_trainer(task, method, seed, peak_lr, pretrained_gpt2, datasets, classification=False)


TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in (
        TaskSpec(
            "digits_cnn",
            "sklearn digits, 38k-param CNN, README hand-written loop, batch 256 (4 steps/epoch)",
            300,
            256,
            4,
            "accuracy",
            "loop",
            run_digits_cnn,
            oracle_center=1.28e-2,
        ),
        TaskSpec(
            "digits_cnn_short",
            "the digits CNN on a short budget, batch 32 (33 steps/epoch), hand-written loop",
            240,
            32,
            33,
            "accuracy",
            "loop",
            run_digits_cnn,
            oracle_center=1.28e-2,
        ),
        TaskSpec(
            "timm_digits",
            "digits at 16x16, timm test_efficientnet_gn (101k params), Trainer, batch 64",
            255,
            64,
            17,
            "accuracy",
            "trainer",
            run_timm_digits,
            oracle_center=8e-4,
        ),
        TaskSpec(
            "vit_digits",
            "digits at 16x16, timm test_vit (4x4 patches, 253k params), Accelerate loop, batch 64",
            300,
            64,
            16,
            "accuracy",
            "accelerate",
            run_vit_digits,
            oracle_center=1.6e-3,
        ),
        TaskSpec(
            "gpt2_stdlib",
            "GPT-2 (2 layers, d=64, 120k params), bytes of the stdlib sources, Trainer, 16x64 tokens",
            300,
            16,
            20,
            "loss",
            "trainer",
            run_gpt2_stdlib,
            oracle_center=3.2e-3,
        ),
        TaskSpec(
            "gpt2_stdlib_long",
            "the GPT-2 task at a 10x longer budget",
            3000,
            16,
            20,
            "loss",
            "trainer",
            run_gpt2_stdlib,
            oracle_center=3.2e-3,
        ),
        TaskSpec(
            "llama_stdlib",
            "Llama-style decoder (2 layers, d=64, GQA, 125k params), stdlib bytes, AutoWUTrainer, 16x64 tokens",
            400,
            16,
            20,
            "loss",
            "autowu_trainer",
            run_llama_stdlib,
            oracle_center=3.2e-3,
        ),
        TaskSpec(
            "bert_mlm_docs",
            "BERT masked LM (2 layers, d=64), Python's documentation prose, AutoWUTrainer, 16x64 tokens",
            400,
            16,
            20,
            "loss",
            "autowu_trainer",
            run_bert_docs,
            oracle_center=3.2e-3,
        ),
        TaskSpec(
            "gpt2_finetune_docs",
            "the GPT-2 pretrained on stdlib code (cached), fine-tuned on documentation "
            "prose, TRL SFTTrainer, 16x64 tokens",
            200,
            16,
            20,
            "loss",
            "trl",
            run_gpt2_finetune_docs,
            oracle_center=1.6e-3,
        ),
    )
}
