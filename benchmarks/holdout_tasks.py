"""The held-out tasks of ``holdout.py``: model families and optimizers outside ``quality.py``'s suite.

Every task of ``quality.py`` trains with AdamW. The tasks here use other optimizers and other model families, all in
a plain hand-written loop with ``AutoWU(optimizer, total_steps=..., model=model)``. Each has a `HoldoutTask.role`:

``"chosen-on"``: six tasks that no setting was chosen on up to 64f9e55, whose ramps then helped choose the two rules
of 19c648e (``min_past_lengthscales``, ``max_descent_left``):

- ``mlp_sgd``: an MLP (64-128-128-10) on the digits of ``quality.py`` (same splits), SGD with momentum 0.9, batch 32,
  400 steps.
- ``bn_cnn_nesterov``: a CNN with BatchNorm (its running statistics are restored with the parameters) on the same
  digits, SGD with Nesterov momentum and weight decay 5e-4, batch 64, 300 steps.
- ``gru_adafactor``: a byte-level GRU language model (1 layer, width 128) on Python's documentation prose (the text of
  ``quality.py``'s fine-tuning task), transformers' Adafactor with an absolute LR, gradients clipped at norm 1,
  16 windows of 64 bytes per step, 300 steps.
- ``gru_adamw``: the same GRU with AdamW (torch's defaults), to tell the model family from the optimizer.
- ``gpt2_lora``: the fine-tuning task of ``quality.py`` (its GPT-2 pretrained on stdlib code, fine-tuned on the
  documentation prose, 200 steps), with PEFT LoRA adapters (rank 8) instead of every weight: the parameters rewind
  measures its shift on are the adapters (under ``--smoke`` the GPT-2 is not pretrained).
- ``t5_adafactor``: a small T5 encoder-decoder (2 + 2 layers, width 64, bytes as tokens) that reads 48 bytes of the
  documentation prose and writes the next 16, with Adafactor at an absolute LR (T5's usual optimizer), 16 windows
  per step, 300 steps: the seq2seq shape of HF training, which no task of ``quality.py`` has.

``"fresh"``: three tasks added after those rules were fixed (decision code 96ccde02eb8a), run once at that code and
never used to choose anything:

- ``timm_resnet_sgd``: timm's ``test_resnet`` (residual stages with BatchNorm) on the digits at 16x16, SGD with
  momentum 0.9 and weight decay 5e-5 (timm's usual optimizer), batch 64, 300 steps.
- ``lstm_code_adam``: a byte-level LSTM language model (2 layers, width 128) on the standard library's code (the text
  of ``quality.py``'s GPT-2 tasks, not the GRU's prose), torch's Adam, gradients clipped at norm 1, 16 windows of
  64 bytes per step, 300 steps.
- ``gpt2_classifier``: ``quality.py``'s pretrained GPT-2 under a new sequence-classification head
  (``GPT2ForSequenceClassification``), every weight fine-tuned with AdamW to tell which of four standard-library
  modules a 64-byte window of code comes from, 16 windows per step, 200 steps.

Since ``max_descent_left`` 0.06 (robust preset, 500d558) none of the nine tasks above is held out from every
choice: that value was picked by ``decisions.py`` on the ramps of the suite and of those nine tasks, and its
leave-one-task-out table is the check on tasks left out of the choice.

``"unseen"``: tasks added after every setting was fixed and run once, shapes that no task above has
(``decisions.py`` leaves them out, so that they stay unseen); the first four at decision code 55fe3620b1a3, the next
three at c727c8c944ee, ``digits_unet_adamw`` at 27a4544fdf75, ``mixtral_moe_adamw``, ``clip_adamw``,
``code_tagger_adamw`` and ``gpt2_dpo_adamw`` at 001b84b46859:

- ``friedman_mlp_adamw``: regression, not classification: an MLP (10-64-64-1) fitting Friedman's first problem
  (scikit-learn's generator, 2000 samples) by squared error on targets left unscaled, so the loss falls by two
  decades; AdamW, batch 64, 300 steps.
- ``convnext_lamb``: timm's ``test_convnext`` (LayerNorm, GELU, depthwise convolutions) on the digits at 32x32 with
  timm's LAMB, the layer-wise optimizer made for large batches, at batch 256 (a quarter of the training split per
  step), 300 steps.
- ``friedman_scaled_mlp_adamw``: the same regression with its targets standardized, to tell the loss's scale from
  the problem.
- ``bn_cnn_lion``: ``bn_cnn_nesterov``'s CNN with timm's Lion, whose sign updates make its LR scale about a decade
  below AdamW's.
- ``timm_transfer_adamw``: transfer learning on a short budget: timm's ``test_resnet`` pretrained on the digits 0-4
  at 16x16 (`TRANSFER_RECIPE`, trained once and cached), then fine-tuned under a new five-way head, every weight with
  AdamW, on the digits 5-9, batch 32, 100 steps (at 200 steps every LR from 4e-4 up reaches 99-100%).
- ``mlp_fullbatch_adamw``: ``mlp_sgd``'s MLP with AdamW on the whole training split at every step (1078 digits):
  full-batch training, whose loss has no sampling noise for the GP to smooth, 300 steps.
- ``gpt2_wide_finetune_adamw``: ``quality.py``'s fine-tuning task on a model 4x wider: a GPT-2 of width 256 (1.7M
  parameters) pretrained on the standard library's code (`tasks.WIDE_PRETRAIN_RECIPE`, trained once and cached),
  every weight fine-tuned with AdamW on the documentation prose, gradients clipped at norm 1 (the Trainer's
  default), 16 windows of 64 bytes per step, 200 steps: Adam's best LR falls as a model widens, so the ramp spends
  fewer steps below it, and the question is whether the LR chosen follows.
- ``digits_unet_adamw``: a diffusion model's training: diffusers' ``UNet2DModel`` from a small config (self-attention
  at 4x4) learns to predict the noise added to the digits (8x8) at a random one of DDPM's 1000 noise levels, with
  AdamW as diffusers' unconditional training script sets it up (betas 0.95, 0.999; weight decay 1e-6; clip 1.0),
  batch 64, 300 steps. The loss is a squared error whose noise comes mostly from the noise levels drawn, not the
  images; the score is the same error on the validation and test digits under fixed draws.
- ``mixtral_moe_adamw``: a mixture-of-experts decoder, transformers' ``MixtralForCausalLM`` from a small config
  (4 experts per layer, each byte routed to 2), trained on the documentation prose on the next-byte cross-entropy
  plus the router's load-balancing loss at Mixtral's default weight (0.001), as the model computes its loss; AdamW,
  clip 1.0 (the Trainer's default), 16 windows of 64 bytes per step, 300 steps. Its routing is discrete: a byte
  moving to another expert changes the loss in steps. Scored by the cross-entropy alone.
- ``clip_adamw``: contrastive image-text training: transformers' ``CLIPModel`` from a small config (a ViT on the
  digits at 16x16 and a causal text transformer on bytes) learns from captions ("a handwritten seven", "the digit
  7", ...; six templates, one drawn per image) by CLIP's symmetric contrastive loss with its learned temperature,
  AdamW as CLIP trains (beta2 0.98, eps 1e-6, weight decay 0.2 on the matrices), batch 64 (duplicate digits in a
  batch are false negatives, as duplicate captions are in CLIP's data), 300 steps. Scored by zero-shot accuracy (the
  nearest digit's mean caption embedding): a loss of another form and a metric read through two towers. Without
  warmup it does not learn: at a constant 2e-3 its loss stays at ln 64 for 120 steps.
- ``code_tagger_adamw``: token classification, the shape of HF's NER fine-tunes: ``tasks.bert_model``'s encoder,
  pretrained as a masked LM on the stdlib's code (`BERT_PRETRAIN_RECIPE`, trained once and cached), fine-tuned under
  a new ``BertForTokenClassification`` head, every weight with AdamW, to tag each byte of files it was not tuned on
  with what Python's tokenizer says it is part of (keyword, name, operator, number, string, comment or none),
  16 windows of 64 bytes per step, 200 steps. Scored by byte accuracy on 512 fixed windows of the validation and of
  the test files (tagging every byte "string", the commonest, scores 31%).
- ``gpt2_dpo_adamw``: preference tuning, the shape of TRL's ``DPOTrainer``: ``quality.py``'s GPT-2 pretrained on
  the stdlib's code is trained by DPO's sigmoid loss (beta 0.1, TRL's default; the reference a frozen copy of the
  starting point) on pairs that share a prompt of 48 bytes of the documentation prose and answer it with its own
  next 16 bytes (chosen) or with 16 bytes of code (rejected), every weight with AdamW, clip 1.0 (the Trainer's
  default), 16 pairs per step, 200 steps. The loss starts at ln 2 whatever the model (the policy is its reference),
  and the reference prefers the chosen answer on about half of the pairs: the policy has to move away from what it
  was pretrained on. Scored by the same loss on 1024 fixed pairs of the validation and of the test splits (ln 2:
  nothing learned).
"""

from __future__ import annotations

import copy
import io
import itertools
import keyword
import math
import os
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import methods as m  # noqa: E402
import torch  # noqa: E402
from tasks import (  # noqa: E402
    WIDE_PRETRAIN_RECIPE,
    bert_model,
    cached_weights,
    digits_at,
    digits_splits,
    docs_bytes,
    gpt2_model,
    pretrain,
    pretrain_on_code,
    pretrained_gpt2,
    split_of,
    stdlib_bytes,
    text_chunks,
)
from torch import nn  # noqa: E402
from transformers.optimization import Adafactor  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class HoldoutTask:
    """One held-out task: how to build it, feed it and score it."""

    description: str
    metric: str  # "accuracy" (higher is better) or "loss" (nats per byte, lower is better)
    steps: int
    grid: tuple[float, ...]
    build: Callable[[float], tuple[nn.Module, torch.optim.Optimizer]]  # peak LR -> model, optimizer (seeded before)
    batches: Callable[[int], Iterator[Batch]]  # seed -> endless batches
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    score: Callable[[nn.Module], tuple[float, float]]  # model -> (val, test)
    max_grad_norm: float | None = None
    # the test metric of a model that learned nothing (for a loss: when None, ln 256, the loss of a uniform byte)
    chance: Callable[[], float] | None = None
    role: str = "chosen-on"  # or "fresh" (added after the rules of 19c648e were fixed) or "unseen" (see above)


def shuffled(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Iterator[Batch]:
    """Shuffled batches of `batch` examples, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        yield from ((x[i], y[i]) for i in (order[j : j + batch] for j in range(0, len(x) - batch + 1, batch)))


def digits(flat: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`quality.py`'s digits splits, as 64-vectors (`flat`) or 1x8x8 images."""
    return {name: (x.flatten(1) if flat else x, y) for name, (x, y) in digits_splits().items()}


@cache
def digits_16px() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`quality.py`'s digits splits upsampled to 1x16x16 (as its timm tasks see them)."""
    return digits_at(16)


@cache
def digits_32px() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`quality.py`'s digits splits upsampled to 1x32x32 (ConvNeXt's stem and three downsamplings need 32 pixels)."""
    return digits_at(32)


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's logits: a `transformers` model's output, or the module's own."""
    out = model(inputs)
    return getattr(out, "logits", out)


def accuracy(splits: Callable[[], dict[str, Batch]]) -> Callable[[nn.Module], tuple[float, float]]:
    """A scorer: the model's validation and test accuracy on the (inputs, labels) splits `splits()` returns."""

    def score(model: nn.Module) -> tuple[float, float]:
        data = splits()
        return tuple(
            (logits_of(model, x).argmax(-1) == y).float().mean().item() for x, y in (data["val"], data["test"])
        )

    return score


def majority_share(splits: Callable[[], dict[str, Batch]]) -> Callable[[], float]:
    """The test accuracy of always answering the most common class of the test split of `splits()`: a model that
    learned nothing scores this much (a tenth on the digits, 41% on `module_windows`, whose classes differ in size)."""

    @cache
    def share() -> float:
        labels = splits()["test"][1]
        return torch.bincount(labels).max().item() / len(labels)

    return share


def classify(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the model's class logits on a batch of (inputs, labels)."""
    return nn.functional.cross_entropy(logits_of(model, batch[0]), batch[1])


def digits_mlp() -> nn.Module:
    """The MLP 64-128-128-10 of `mlp_sgd` and `mlp_fullbatch_adamw`."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def mlp_sgd(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The MLP and its SGD with momentum 0.9."""
    model = digits_mlp()
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def bn_cnn_nesterov(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The BatchNorm CNN and its SGD with Nesterov momentum 0.9 and weight decay 5e-4."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


class ByteRNN(nn.Module):
    """A byte-level recurrent language model: embedding 32, `layers` layers of a `cell` (GRU or LSTM) of width 128,
    a linear read-out."""

    def __init__(self, cell: type[nn.RNNBase], layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.rnn = cell(32, 128, num_layers=layers, batch_first=True)
        self.head = nn.Linear(128, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-byte logits for a batch of byte windows."""
        return self.head(self.rnn(self.embed(ids))[0])


SEQ_LEN, TEXT_BATCH = 64, 16


def gru_adafactor(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The GRU and transformers' Adafactor with an absolute LR (no parameter scaling, no relative step)."""
    model = ByteRNN(nn.GRU)
    optimizer = Adafactor(model.parameters(), lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return model, optimizer


def gru_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The GRU and torch's AdamW with its defaults."""
    model = ByteRNN(nn.GRU)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def byte_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) of per-position logits against the bytes that follow."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def next_byte_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte) on a batch of (inputs, next bytes)."""
    return byte_cross_entropy(logits_of(model, batch[0]), batch[1])


PRETRAINED = True  # False under --smoke: LoRA and the classifier then start from an untrained GPT-2 (no pretraining)


def base_gpt2() -> nn.Module:
    """The base model of the GPT-2 fine-tunes: `quality.py`'s GPT-2 pretrained on stdlib code (untrained when not
    `PRETRAINED`)."""
    return pretrained_gpt2() if PRETRAINED else gpt2_model()


def gpt2_lora_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`quality.py`'s GPT-2 pretrained on stdlib code (its fine-tuning task's base model) with PEFT LoRA adapters
    (rank 8, alpha 16, on the attention and MLP projections) and AdamW on the adapters, as `quality.py` sets it."""
    from peft import LoraConfig, get_peft_model

    base = base_gpt2()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(base, config)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **m.ADAMW)


SOURCE_LEN, TARGET_LEN = 48, 16


def t5_adafactor(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small T5 (2 encoder and 2 decoder layers, width 64, 4 heads, bytes as tokens; byte 0, absent from the prose,
    is its pad and decoder start) and transformers' Adafactor with an absolute LR."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=256,
        d_model=64,
        d_kv=16,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    optimizer = Adafactor(model.parameters(), lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return model, optimizer


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) of the target bytes given the source bytes."""
    return model(input_ids=batch[0], labels=batch[1]).loss


def next_bytes(windows: torch.Tensor) -> Batch:
    """A language model's (inputs, targets) from windows of `SEQ_LEN` + 1 bytes: each byte and the byte after it."""
    return windows[:, :-1], windows[:, 1:]


def continuation(windows: torch.Tensor) -> Batch:
    """A seq2seq model's (source, target) from windows of `SOURCE_LEN` + `TARGET_LEN` bytes."""
    return windows[:, :SOURCE_LEN].contiguous(), windows[:, SOURCE_LEN:].contiguous()


def text_batches(
    text: Callable[[], dict[str, torch.Tensor]], length: int, split: Callable[[torch.Tensor], Batch], seed: int
) -> Iterator[Batch]:
    """`TEXT_BATCH` windows of `length` bytes of the training split of `text()` (the prose or the code) at random
    offsets per step, `split` into a batch."""
    data, generator = text()["train"], torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(data) - length, (TEXT_BATCH,), generator=generator)
        yield split(torch.stack([data[s : s + length] for s in starts.tolist()]))


def text_score(
    text: Callable[[], dict[str, torch.Tensor]],
    length: int,
    split: Callable[[torch.Tensor], Batch],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
) -> Callable[[nn.Module], tuple[float, float]]:
    """A scorer: the model's mean `loss` on 128 fixed windows of `length` bytes of the validation and test splits of
    `text()`."""

    def score(model: nn.Module) -> tuple[float, float]:
        splits = text()
        return tuple(
            loss(model, split(text_chunks(splits[name], length, 128).tensors["input_ids"])).item()
            for name in ("val", "test")
        )

    return score


LM_BATCHES = partial(text_batches, docs_bytes, SEQ_LEN + 1, next_bytes)
LM_SCORE = text_score(docs_bytes, SEQ_LEN + 1, next_bytes, next_byte_loss)
SEQ2SEQ_BATCHES = partial(text_batches, docs_bytes, SOURCE_LEN + TARGET_LEN, continuation)
SEQ2SEQ_SCORE = text_score(docs_bytes, SOURCE_LEN + TARGET_LEN, continuation, seq2seq_loss)
CODE_LM_BATCHES = partial(text_batches, stdlib_bytes, SEQ_LEN + 1, next_bytes)
CODE_LM_SCORE = text_score(stdlib_bytes, SEQ_LEN + 1, next_bytes, next_byte_loss)


# ------------------------------------------------------------------ the fresh tasks (role "fresh")


def timm_resnet_sgd(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """timm's `test_resnet` (BatchNorm, residual stages, 373k parameters) for one-channel images, and SGD with
    momentum 0.9 and weight decay 5e-5, as timm's training script sets it up by default."""
    import timm

    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)


def lstm_adam(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A two-layer byte-level LSTM and torch's Adam with its defaults."""
    model = ByteRNN(nn.LSTM, layers=2)
    return model, torch.optim.Adam(model.parameters(), lr=lr)


CLASSIFIED_MODULES = ("argparse", "pickletools", "turtle", "_pydecimal")
"""The standard-library modules whose code `gpt2_classifier` tells apart: large ones of unlike subjects, one class
each (with eight modules this model stays near chance in 200 steps at every LR)."""
CHUNK = 1024  # bytes: each module's code is dealt out to the splits in chunks of this size


@cache
def module_windows() -> dict[str, Batch]:
    """64-byte windows of the code of `CLASSIFIED_MODULES`, labelled by module. Each file is cut into `CHUNK`-byte
    chunks dealt out as `tasks.py` deals out files (index % 10: 0 validation, 1 test, the rest training), so every
    split samples the whole file; training windows start every 16 bytes, validation and test windows every 128."""
    splits: dict[str, tuple[list[torch.Tensor], list[int]]] = {name: ([], []) for name in ("train", "val", "test")}
    for label, module in enumerate(CLASSIFIED_MODULES):
        code = Path(sysconfig.get_paths()["stdlib"], f"{module}.py").read_bytes()
        data = torch.frombuffer(bytearray(code), dtype=torch.uint8).long()
        for index, start in enumerate(range(0, len(data) - CHUNK + 1, CHUNK)):
            name = split_of(index)
            offsets = range(start, start + CHUNK - SEQ_LEN + 1, 16 if name == "train" else 128)
            splits[name][0].extend(data[o : o + SEQ_LEN] for o in offsets)
            splits[name][1].extend([label] * len(offsets))
    return {name: (torch.stack(windows), torch.tensor(labels)) for name, (windows, labels) in splits.items()}


def gpt2_classifier(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`quality.py`'s GPT-2 pretrained on stdlib code under a new sequence-classification head (one class per module of
    `CLASSIFIED_MODULES`; it reads the last byte, byte 0, absent from the code, being the pad), and AdamW on every
    weight, as `quality.py` sets it."""
    from transformers import GPT2ForSequenceClassification

    base = base_gpt2()
    config = copy.deepcopy(base.config)
    config.num_labels, config.pad_token_id = len(CLASSIFIED_MODULES), 0
    model = GPT2ForSequenceClassification(config)
    model.transformer.load_state_dict(base.transformer.state_dict())
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


# ------------------------------------------------------------------ the unseen tasks (role "unseen")


@cache
def friedman_splits() -> dict[str, Batch]:
    """Friedman's first regression problem (scikit-learn's `make_friedman1`: 10 uniform features, 5 of them used,
    `y = 10 sin(pi x0 x1) + 20 (x2 - 0.5)^2 + 10 x3 + 5 x4` plus unit Gaussian noise), 2000 samples drawn with a fixed
    seed and split 60/20/20. The targets are left as they are (mean about 14, variance about 24), as a first model
    often leaves them, so the squared error falls by two decades during training."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    cuts = {"train": (0, 1200), "val": (1200, 1600), "test": (1600, 2000)}
    return {name: (x[a:b], y[a:b]) for name, (a, b) in cuts.items()}


def friedman_mlp_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP 10-64-64-1 (SiLU) and AdamW with `quality.py`'s settings."""
    model = nn.Sequential(nn.Linear(10, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1), nn.Flatten(0))
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


def squared_error(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean squared error of the model's predictions on a batch of (features, targets)."""
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def squared_errors(splits: Callable[[], dict[str, Batch]]) -> Callable[[nn.Module], tuple[float, float]]:
    """A scorer: the model's validation and test mean squared error on the (features, targets) splits `splits()`
    returns."""

    def score(model: nn.Module) -> tuple[float, float]:
        data = splits()
        return tuple(squared_error(model, data[name]).item() for name in ("val", "test"))

    return score


def mean_prediction_error(splits: Callable[[], dict[str, Batch]]) -> Callable[[], float]:
    """The test squared error of always predicting the training targets' mean, on the splits `splits()` returns: a
    model that learned nothing scores this much."""

    @cache
    def error() -> float:
        data = splits()
        return (data["test"][1] - data["train"][1].mean()).square().mean().item()

    return error


@cache
def friedman_standardized() -> dict[str, Batch]:
    """`friedman_splits` with the targets standardized by the training split's mean and standard deviation, as a
    careful first model has them (squared errors are then in units of the targets' variance)."""
    data = friedman_splits()
    mean, std = data["train"][1].mean(), data["train"][1].std()
    return {name: (x, (y - mean) / std) for name, (x, y) in data.items()}


def bn_cnn_lion(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`bn_cnn_nesterov`'s CNN with BatchNorm, and timm's Lion (sign updates; betas 0.9, 0.99) with weight decay
    0.01."""
    from timm.optim import Lion

    model, _ = bn_cnn_nesterov(lr)
    return model, Lion(model.parameters(), lr=lr, weight_decay=0.01)


def convnext_lamb(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """timm's `test_convnext` (LayerNorm, GELU, depthwise convolutions) for one-channel images, and timm's LAMB (the
    layer-wise trust ratio made for large batches) with weight decay 0.01."""
    import timm
    from timm.optim import Lamb

    model = timm.create_model("test_convnext", num_classes=10, in_chans=1)
    return model, Lamb(model.parameters(), lr=lr, weight_decay=0.01)


TRANSFER_RECIPE = {"model": "test_resnet", "steps": 300, "batch_size": 64, "lr": 3e-3, "warmup": 15, "seed": 4321}
"""How `timm_transfer_adamw`'s base model is pretrained on the digits 0-4 (AdamW, linear warmup + cosine)."""


@cache
def digit_halves() -> dict[str, dict[str, Batch]]:
    """`digits_16px` cut by label: ``"source"`` holds the digits 0-4, ``"target"`` the digits 5-9 relabelled 0-4, each
    with its train, val and test split."""
    halves: dict[str, dict[str, Batch]] = {"source": {}, "target": {}}
    for name, (x, y) in digits_16px().items():
        low = y < 5
        halves["source"][name] = (x[low], y[low])
        halves["target"][name] = (x[~low], y[~low] - 5)
    return halves


def target_digits() -> dict[str, Batch]:
    """The digits 5-9 (labels 0-4), what `timm_transfer_adamw` is fine-tuned on."""
    return digit_halves()["target"]


def _pretrain_resnet() -> dict[str, torch.Tensor]:
    recipe = TRANSFER_RECIPE
    torch.manual_seed(recipe["seed"])
    model = resnet_for_halves()
    batches = shuffled(*digit_halves()["source"]["train"], recipe["batch_size"], recipe["seed"])
    return pretrain(model, batches, classify, recipe)


def resnet_for_halves() -> nn.Module:
    """timm's `TRANSFER_RECIPE` model (`test_resnet`) for one-channel images and five classes."""
    import timm

    return timm.create_model(TRANSFER_RECIPE["model"], num_classes=5, in_chans=1)


def timm_transfer_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """timm's `test_resnet` pretrained on the digits 0-4 (`TRANSFER_RECIPE`, trained once and cached; untrained when
    not `PRETRAINED`) under a new five-way head, as a fine-tune starts, and AdamW on every weight with `quality.py`'s
    settings."""
    model = resnet_for_halves()
    if PRETRAINED:
        model.load_state_dict(cached_weights("resnet_digits_0to4", TRANSFER_RECIPE, _pretrain_resnet))
    model.reset_classifier(5)
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


def gpt2_wide_finetune_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The GPT-2 of width 256 pretrained on stdlib code (`WIDE_PRETRAIN_RECIPE`, cached; untrained when not
    `PRETRAINED`) and AdamW on every weight with `quality.py`'s settings."""
    model = pretrained_gpt2(WIDE_PRETRAIN_RECIPE) if PRETRAINED else gpt2_model(WIDE_PRETRAIN_RECIPE["width"])
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


def mlp_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`mlp_sgd`'s MLP and AdamW with `quality.py`'s settings."""
    model = digits_mlp()
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


def full_batch(splits: Callable[[], dict[str, Batch]]) -> Iterator[Batch]:
    """The whole training split of `splits()` at every step: a loss without sampling noise."""
    return itertools.repeat(splits()["train"])


NoisedBatch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]
"""A denoising batch: (noisy images, noise levels) as the inputs, the noise added as the target."""
DENOISER_TIMESTEPS = 1000
"""The noise schedule's length: diffusers' `DDPMScheduler` default (betas linear from 1e-4 to 0.02)."""
DENOISER_SCORE_DRAWS = 4
"""Noise levels and noises drawn per image of the validation and test splits (fixed draws: a deterministic score)."""


@cache
def noise_schedule() -> object:
    """diffusers' DDPM noise schedule at its defaults (`DENOISER_TIMESTEPS` steps, linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=DENOISER_TIMESTEPS)


def noised(images: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
    """A denoising batch: each image noised at a uniform random step of the schedule, as the inputs (noisy images,
    steps), and the noise added, as the target."""
    steps = torch.randint(DENOISER_TIMESTEPS, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    return (noise_schedule().add_noise(images, noise, steps), steps), noise


def noised_digits(seed: int, batch: int = 64) -> Iterator[NoisedBatch]:
    """Shuffled batches of the training digits (1x8x8, pixels in [-1, 1]), each noised by `noised` with draws of
    its own (seeded by `seed`), epoch after epoch."""
    generator = torch.Generator().manual_seed(seed + 7919)
    for images, _labels in shuffled(*digits(False)["train"], batch, seed):
        yield noised(images, generator)


def digits_unet_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """diffusers' `UNet2DModel` from a small config (8x8 one-channel images; blocks of 16 and 32 channels, self-
    attention at the lower resolution; 177k parameters), and AdamW as diffusers' unconditional training script sets
    it up (betas 0.95, 0.999; weight decay 1e-6)."""
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return model, torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)


def noise_prediction_error(model: nn.Module, batch: NoisedBatch) -> torch.Tensor:
    """Mean squared error of the noise the model predicts (the DDPM objective) on a denoising batch."""
    (inputs, steps), noise = batch
    return nn.functional.mse_loss(model(inputs, steps).sample, noise)


@cache
def denoising_splits() -> dict[str, NoisedBatch]:
    """The validation and test digits, each image noised `DENOISER_SCORE_DRAWS` times with fixed draws."""
    splits = digits(False)
    return {
        name: noised(splits[name][0].repeat(DENOISER_SCORE_DRAWS, 1, 1, 1), torch.Generator().manual_seed(k))
        for k, name in enumerate(("val", "test"))
    }


def denoising_errors(model: nn.Module) -> tuple[float, float]:
    """The model's validation and test noise-prediction error (`denoising_splits`)."""
    data = denoising_splits()
    return tuple(noise_prediction_error(model, data[name]).item() for name in ("val", "test"))


def noise_variance() -> float:
    """The test error of predicting no noise at all (the noise's mean square, about 1): a model that learned
    nothing scores this much."""
    return denoising_splits()["test"][1].square().mean().item()


def mixtral_moe_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A mixture-of-experts decoder: transformers' `MixtralForCausalLM` from a small config (2 layers, width 64,
    grouped-query attention with 4 heads on 2 key-value heads, 4 experts of width 128 per layer, each byte routed to
    2 of them; bytes as tokens, 255k parameters), its router's load-balancing loss on at Mixtral's default weight, and
    AdamW (torch's defaults, as the suite's)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ_LEN,
        output_router_logits=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = MixtralForCausalLM(config)
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


def next_byte_and_router_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a mixture of experts trains on: the next-byte cross-entropy plus the router's load-balancing loss at
    the model's `router_aux_loss_coef`, as `MixtralForCausalLM` adds it when given labels."""
    out = model(batch[0])
    return byte_cross_entropy(out.logits, batch[1]) + model.config.router_aux_loss_coef * out.aux_loss


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten {name}",
    "the digit {digit}",
    "a scan of the number {name}",
    "{name}",
    "a small drawing of a {digit}",
    "number {name}, written by hand",
)
"""The captions of a digit: each training image gets one at random; the zero-shot classifier averages all six."""
CAPTION_LEN = 32
"""Bytes per caption: the caption, then byte 0 (CLIP's end-of-text token here, the one it pools at) as padding."""


@cache
def digit_captions() -> torch.Tensor:
    """Every caption of every digit as bytes, shape (10, len(CAPTION_TEMPLATES), CAPTION_LEN), padded with 0."""
    captions = torch.zeros(len(DIGIT_NAMES), len(CAPTION_TEMPLATES), CAPTION_LEN, dtype=torch.long)
    for digit, name in enumerate(DIGIT_NAMES):
        for k, template in enumerate(CAPTION_TEMPLATES):
            text = template.format(name=name, digit=digit).encode()
            captions[digit, k, : len(text)] = torch.tensor(list(text))
    return captions


def captioned_digits(seed: int, batch: int = 64) -> Iterator[Batch]:
    """Shuffled batches of (images, captions): the training digits at 16x16, each with one of its captions drawn at
    random (seeded by `seed`), epoch after epoch."""
    generator = torch.Generator().manual_seed(seed + 104729)
    captions = digit_captions()
    for images, labels in shuffled(*digits_16px()["train"], batch, seed):
        yield images, captions[labels, torch.randint(len(CAPTION_TEMPLATES), (len(labels),), generator=generator)]


def clip_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """transformers' `CLIPModel` from a small config (a ViT of 2 layers, width 64, on 4x4 patches of one-channel
    16x16 images; a causal text transformer of 2 layers, width 64, on bytes; projections to 32; 159k parameters) and
    AdamW as CLIP trains (betas 0.9, 0.98; eps 1e-6; weight decay 0.2 on the matrices, none on gains, biases,
    embeddings and the logit scale)."""
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 256, "max_position_embeddings": CAPTION_LEN}
        | {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0},
        vision_config=tower | {"image_size": 16, "patch_size": 4, "num_channels": 1},
        projection_dim=32,
    )
    model = CLIPModel(config)
    decayed = {name for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name}
    groups = [
        {"params": [p for name, p in model.named_parameters() if name in decayed], "weight_decay": 0.2},
        {"params": [p for name, p in model.named_parameters() if name not in decayed], "weight_decay": 0.0},
    ]
    return model, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def contrastive_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """CLIP's symmetric contrastive loss on a batch of (images, captions), as `CLIPModel` computes it."""
    return model(input_ids=batch[1], pixel_values=batch[0], return_loss=True).loss


def features(output: torch.Tensor | object) -> torch.Tensor:
    """Unit-norm features from `get_text_features`/`get_image_features` (a tensor, or an output whose
    `pooler_output` holds them, depending on the transformers version)."""
    return nn.functional.normalize(getattr(output, "pooler_output", output), dim=-1)


def zero_shot_accuracy(model: nn.Module) -> tuple[float, float]:
    """CLIP's zero-shot classification of the validation and test digits: each image takes the digit whose mean
    caption embedding (over `CAPTION_TEMPLATES`, the prompt ensemble of CLIP's paper) is nearest in cosine."""
    captions = digit_captions()
    texts = features(model.get_text_features(input_ids=captions.flatten(0, 1)))
    classes = nn.functional.normalize(texts.view(*captions.shape[:2], -1).mean(1), dim=-1)
    data = digits_16px()
    return tuple(
        ((features(model.get_image_features(pixel_values=x)) @ classes.T).argmax(-1) == y).float().mean().item()
        for x, y in (data["val"], data["test"])
    )


CODE_TAGS = ("other", "keyword", "name", "operator", "number", "string", "comment")
"""What a byte of Python code is part of, as Python's own tokenizer reads it ("other": whitespace, newlines and
indentation, which no token covers)."""
BERT_PRETRAIN_RECIPE = {"steps": 1500, "batch_size": 16, "seq_len": 64, "lr": 2e-3, "warmup": 75, "seed": 1234}
"""How `code_tagger_adamw`'s base is pretrained: `tasks.bert_model` as a masked LM on the stdlib's code (the training
split of `tasks.stdlib_bytes`), with `tasks.pretrain`'s loop."""


def tag_of(token: tokenize.TokenInfo) -> int:
    """The index in `CODE_TAGS` of a token's bytes."""
    if token.type == tokenize.NAME:
        return CODE_TAGS.index("keyword" if keyword.iskeyword(token.string) else "name")
    names = {tokenize.OP: "operator", tokenize.NUMBER: "number", tokenize.STRING: "string"}
    return CODE_TAGS.index(names.get(token.type, "comment" if token.type == tokenize.COMMENT else "other"))


def tagged_bytes(source: str) -> tuple[bytes, list[int]]:
    """A source file's UTF-8 bytes and the `CODE_TAGS` index of each (every byte of a character takes its tag)."""
    line_starts = list(itertools.accumulate((len(line) for line in source.splitlines(keepends=True)), initial=0))
    tags = [0] * len(source)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        start = line_starts[token.start[0] - 1] + token.start[1]
        end = line_starts[token.end[0] - 1] + token.end[1]
        tags[start:end] = [tag_of(token)] * (end - start)
    encoded = [character.encode() for character in source]
    return b"".join(encoded), [tag for character, tag in zip(encoded, tags, strict=True) for _ in character]


@cache
def tagged_code() -> dict[str, Batch]:
    """The stdlib's top-level files as (bytes, tags), split by file as `tasks.stdlib_bytes` splits them (index % 10: 0
    validation, 1 test, the rest training; each split joined by newlines, tagged "other")."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts: dict[str, tuple[list[bytes], list[int]]] = {name: ([], []) for name in ("train", "val", "test")}
    for index, path in enumerate(files):
        data, tags = tagged_bytes(path.read_text(encoding="utf-8"))
        name = split_of(index)
        parts[name][0].append(data + b"\n")
        parts[name][1].extend([*tags, 0])
    return {
        name: (torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long(), torch.tensor(tags))
        for name, (chunks, tags) in parts.items()
    }


def windows_at(split: Batch, starts: list[int]) -> Batch:
    """The `SEQ_LEN`-byte windows of a split's (bytes, tags) that begin at `starts`."""
    return tuple(torch.stack([tensor[s : s + SEQ_LEN] for s in starts]) for tensor in split)


def tagged_windows(seed: int) -> Iterator[Batch]:
    """`TEXT_BATCH` windows of `SEQ_LEN` bytes of the training code and their tags, at random offsets per step."""
    split, generator = tagged_code()["train"], torch.Generator().manual_seed(seed)
    while True:
        yield windows_at(split, torch.randint(len(split[0]) - SEQ_LEN, (TEXT_BATCH,), generator=generator).tolist())


@cache
def tagged_test_windows() -> dict[str, Batch]:
    """512 fixed windows of `SEQ_LEN` bytes, evenly spread, of the validation and of the test code, with their tags."""
    splits = tagged_code()
    return {
        name: windows_at(splits[name], torch.linspace(0, len(splits[name][0]) - SEQ_LEN, 512).long().tolist())
        for name in ("val", "test")
    }


def code_tagger_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`tasks.bert_model`'s encoder pretrained as a masked LM on the stdlib's code (`BERT_PRETRAIN_RECIPE`, cached;
    untrained under ``--smoke``) under a new token-classification head (one class per `CODE_TAGS`), and AdamW on
    every weight with `quality.py`'s settings."""
    from transformers import BertForTokenClassification

    base = bert_model()
    if PRETRAINED:
        base.load_state_dict(
            cached_weights(
                "bert_stdlib_pretrained",
                BERT_PRETRAIN_RECIPE,
                partial(pretrain_on_code, bert_model, BERT_PRETRAIN_RECIPE, mask=True),
            )
        )
    config = copy.deepcopy(base.config)
    config.num_labels = len(CODE_TAGS)
    model = BertForTokenClassification(config)
    model.bert.load_state_dict(base.bert.state_dict())
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


def tag_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the model's tag logits over every byte of a batch of (bytes, tags) windows."""
    return nn.functional.cross_entropy(logits_of(model, batch[0]).flatten(0, 1), batch[1].flatten())


DPO_BETA = 0.1
"""DPO's temperature: the scale of the policy's log-ratios before the sigmoid (TRL's `DPOConfig.beta` default)."""
PAIR_LEN = SOURCE_LEN + TARGET_LEN
"""Bytes in a preference pair's sequence: a prompt of `SOURCE_LEN` bytes and an answer of `TARGET_LEN`."""
EVAL_PAIRS = 1024
"""Fixed preference pairs in each of the validation and test sets (a DPO loss varies much from pair to pair)."""
PreferenceBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(chosen sequences, rejected sequences, the reference model's log-probability margins between them)."""


def dpo_base() -> nn.Module:
    """Where DPO's policy starts and what its reference is: `base_gpt2`, built under a fixed seed in a forked random
    state, so that the two are the same network under ``--smoke`` too (an untrained GPT-2 there) and building it
    draws nothing from a run's random state."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return base_gpt2()


@cache
def _frozen_reference(pretrained: bool) -> nn.Module:
    """`reference_gpt2`'s network, cached per value of `PRETRAINED` (`pretrained`, the cache's key)."""
    return dpo_base().eval().requires_grad_(False)


def reference_gpt2() -> nn.Module:
    """DPO's frozen reference: `dpo_base` in eval mode, without gradients; built once per process (and per
    `PRETRAINED`)."""
    return _frozen_reference(PRETRAINED)


def answer_logps(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """The log-probability the model gives the last `TARGET_LEN` bytes of each sequence (the answer) given the bytes
    before them (the prompt), summed over the answer's bytes, as DPO scores a completion."""
    logits = logits_of(model, sequences[:, :-1])[:, -TARGET_LEN:]
    answers = sequences[:, -TARGET_LEN:]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, answers.unsqueeze(-1)).squeeze(-1).sum(-1)


def preference_pairs(
    data: torch.Tensor, starts: list[int], elsewhere: torch.Tensor, others: list[int]
) -> PreferenceBatch:
    """Pairs of the same prompt (the `SOURCE_LEN` bytes of `data` at each of `starts`) with two answers: chosen, the
    `TARGET_LEN` bytes that follow it; rejected, the `TARGET_LEN` bytes of `elsewhere` at the matching offset of
    `others`. With the reference model's margin `log p_ref(chosen) - log p_ref(rejected)` of each pair."""
    chosen = torch.stack([data[s : s + PAIR_LEN] for s in starts])
    rejected = chosen.clone()
    rejected[:, SOURCE_LEN:] = torch.stack([elsewhere[o : o + TARGET_LEN] for o in others])
    with torch.no_grad():
        margin = answer_logps(reference_gpt2(), chosen) - answer_logps(reference_gpt2(), rejected)
    return chosen, rejected, margin


def preference_batches(seed: int) -> Iterator[PreferenceBatch]:
    """`TEXT_BATCH` preference pairs per step: prompts of the training prose, each preferring its own continuation to
    16 bytes of the training code, both at random offsets."""
    data, elsewhere = docs_bytes()["train"], stdlib_bytes()["train"]
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(data) - PAIR_LEN, (TEXT_BATCH,), generator=generator).tolist()
        others = torch.randint(len(elsewhere) - TARGET_LEN, (TEXT_BATCH,), generator=generator).tolist()
        yield preference_pairs(data, starts, elsewhere, others)


@cache
def preference_test_pairs() -> dict[str, PreferenceBatch]:
    """`EVAL_PAIRS` fixed preference pairs of the validation and of the test splits: prompts of the prose evenly
    spread, rejected answers from the code of the same split at offsets drawn by a fixed generator."""
    splits, elsewhere, generator = docs_bytes(), stdlib_bytes(), torch.Generator().manual_seed(0)
    pairs = {}
    for name in ("val", "test"):
        data = splits[name]
        starts = torch.linspace(0, len(data) - PAIR_LEN, EVAL_PAIRS).long().tolist()
        others = torch.randint(len(elsewhere[name]) - TARGET_LEN, (EVAL_PAIRS,), generator=generator).tolist()
        pairs[name] = preference_pairs(data, starts, elsewhere[name], others)
    return pairs


def dpo_loss(model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """DPO's sigmoid loss: `-log sigmoid(beta * (policy margin - reference margin))`, mean over the pairs, the policy's
    margin `log p(chosen) - log p(rejected)` from one forward pass over both answers. ln 2 where the policy is the
    reference."""
    chosen, rejected, reference_margin = batch
    logps = answer_logps(model, torch.cat([chosen, rejected]))
    margin = logps[: len(chosen)] - logps[len(chosen) :]
    return -nn.functional.logsigmoid(DPO_BETA * (margin - reference_margin)).mean()


def held_out_dpo_loss(model: nn.Module) -> tuple[float, float]:
    """`dpo_loss` on the fixed validation and test pairs (`preference_test_pairs`)."""
    pairs = preference_test_pairs()
    return tuple(dpo_loss(model, pairs[name]).item() for name in ("val", "test"))


def gpt2_dpo_adamw(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The DPO policy: `dpo_base`, `quality.py`'s GPT-2 pretrained on stdlib code (its reference, `reference_gpt2`,
    is a frozen copy), and AdamW on every weight with `quality.py`'s settings."""
    model = dpo_base()
    return model, torch.optim.AdamW(model.parameters(), lr=lr, **m.ADAMW)


def commonest_tag_share() -> float:
    """The test accuracy of tagging every byte with the commonest tag of the test code: a model that learned nothing
    scores this much."""
    tags = tagged_test_windows()["test"][1].flatten()
    return torch.bincount(tags).max().item() / len(tags)


def grid(first: int, count: int = 9) -> tuple[float, ...]:
    """`count` points of `quality.py`'s grid from its `first`-th, a factor 2 apart."""
    return tuple(m.grid_lr(k) for k in range(first, first + count))


TASKS: dict[str, HoldoutTask] = {
    "mlp_sgd": HoldoutTask(
        "MLP 64-128-128-10 on the digits, SGD + momentum 0.9, batch 32, 400 steps",
        "accuracy",
        400,
        grid(7),
        mlp_sgd,
        lambda seed: shuffled(*digits(True)["train"], 32, seed),
        classify,
        accuracy(partial(digits, True)),
        chance=majority_share(partial(digits, True)),
    ),
    "bn_cnn_nesterov": HoldoutTask(
        "CNN with BatchNorm on the digits, SGD + Nesterov momentum 0.9 + weight decay 5e-4, batch 64, 300 steps",
        "accuracy",
        300,
        grid(6),
        bn_cnn_nesterov,
        lambda seed: shuffled(*digits(False)["train"], 64, seed),
        classify,
        accuracy(partial(digits, False)),
        chance=majority_share(partial(digits, False)),
    ),
    "gru_adafactor": HoldoutTask(
        "byte-level GRU LM on Python's documentation prose, Adafactor (absolute LR), clip 1.0, 16x64 bytes, 300 steps",
        "loss",
        300,
        grid(1),
        gru_adafactor,
        LM_BATCHES,
        next_byte_loss,
        LM_SCORE,
        max_grad_norm=1.0,
    ),
    "gru_adamw": HoldoutTask(
        "the same GRU LM with AdamW (torch defaults, weight decay 0.01), clip 1.0, 16x64 bytes, 300 steps",
        "loss",
        300,
        grid(1),
        gru_adamw,
        LM_BATCHES,
        next_byte_loss,
        LM_SCORE,
        max_grad_norm=1.0,
    ),
    "gpt2_lora": HoldoutTask(
        "quality.py's pretrained GPT-2 fine-tuned on the documentation prose with PEFT LoRA (rank 8), AdamW, "
        "16x64 bytes, 200 steps",
        "loss",
        200,
        grid(3),
        gpt2_lora_adamw,
        LM_BATCHES,
        next_byte_loss,
        LM_SCORE,
    ),
    "t5_adafactor": HoldoutTask(
        "T5 encoder-decoder (2+2 layers, width 64) continuing 48 bytes of the documentation prose by 16, Adafactor "
        "(absolute LR), clip 1.0, 16 windows, 300 steps",
        "loss",
        300,
        grid(1),
        t5_adafactor,
        SEQ2SEQ_BATCHES,
        seq2seq_loss,
        SEQ2SEQ_SCORE,
        max_grad_norm=1.0,
    ),
    "timm_resnet_sgd": HoldoutTask(
        "timm test_resnet (BatchNorm, residual) on the digits at 16x16, SGD + momentum 0.9 + weight decay 5e-5, "
        "batch 64, 300 steps",
        "accuracy",
        300,
        grid(6),
        timm_resnet_sgd,
        lambda seed: shuffled(*digits_16px()["train"], 64, seed),
        classify,
        accuracy(digits_16px),
        chance=majority_share(digits_16px),
        role="fresh",
    ),
    "lstm_code_adam": HoldoutTask(
        "byte-level LSTM LM (2 layers, width 128) on the standard library's code, Adam (torch defaults), clip 1.0, "
        "16x64 bytes, 300 steps",
        "loss",
        300,
        grid(1),
        lstm_adam,
        CODE_LM_BATCHES,
        next_byte_loss,
        CODE_LM_SCORE,
        max_grad_norm=1.0,
        role="fresh",
    ),
    "gpt2_classifier": HoldoutTask(
        "quality.py's pretrained GPT-2 with a new classification head, fine-tuned (every weight, AdamW) to tell which "
        "of 4 stdlib modules a 64-byte window of code comes from, 16 windows per step, 200 steps",
        "accuracy",
        200,
        grid(1),
        gpt2_classifier,
        lambda seed: shuffled(*module_windows()["train"], TEXT_BATCH, seed),
        classify,
        accuracy(module_windows),
        chance=majority_share(module_windows),
        role="fresh",
    ),
    "friedman_mlp_adamw": HoldoutTask(
        "MLP 10-64-64-1 regressing Friedman's first problem (targets unscaled, squared error), AdamW, batch 64, "
        "300 steps",
        "loss",
        300,
        grid(2),
        friedman_mlp_adamw,
        lambda seed: shuffled(*friedman_splits()["train"], 64, seed),
        squared_error,
        squared_errors(friedman_splits),
        chance=mean_prediction_error(friedman_splits),
        role="unseen",
    ),
    "convnext_lamb": HoldoutTask(
        "timm test_convnext (LayerNorm, GELU) on the digits at 32x32, LAMB + weight decay 0.01, batch 256, 300 steps",
        "accuracy",
        300,
        grid(3),
        convnext_lamb,
        lambda seed: shuffled(*digits_32px()["train"], 256, seed),
        classify,
        accuracy(digits_32px),
        chance=majority_share(digits_32px),
        role="unseen",
    ),
    "friedman_scaled_mlp_adamw": HoldoutTask(
        "the same MLP regressing Friedman's first problem with standardized targets, AdamW, batch 64, 300 steps",
        "loss",
        300,
        grid(2),
        friedman_mlp_adamw,
        lambda seed: shuffled(*friedman_standardized()["train"], 64, seed),
        squared_error,
        squared_errors(friedman_standardized),
        chance=mean_prediction_error(friedman_standardized),
        role="unseen",
    ),
    "bn_cnn_lion": HoldoutTask(
        "the BatchNorm CNN on the digits with Lion (timm's, weight decay 0.01), batch 64, 300 steps",
        "accuracy",
        300,
        grid(0),
        bn_cnn_lion,
        lambda seed: shuffled(*digits(False)["train"], 64, seed),
        classify,
        accuracy(partial(digits, False)),
        chance=majority_share(partial(digits, False)),
        role="unseen",
    ),
    "timm_transfer_adamw": HoldoutTask(
        "timm test_resnet pretrained on the digits 0-4 (cached), fine-tuned under a new head (every weight, AdamW) on "
        "the digits 5-9 at 16x16, batch 32, 100 steps",
        "accuracy",
        100,
        grid(0),
        timm_transfer_adamw,
        lambda seed: shuffled(*target_digits()["train"], 32, seed),
        classify,
        accuracy(target_digits),
        chance=majority_share(target_digits),
        role="unseen",
    ),
    "mlp_fullbatch_adamw": HoldoutTask(
        "MLP 64-128-128-10 on the digits, full batch (all 1078 training digits at every step, no sampling noise), "
        "AdamW, 300 steps",
        "accuracy",
        300,
        grid(2),
        mlp_adamw,
        lambda seed: full_batch(partial(digits, True)),
        classify,
        accuracy(partial(digits, True)),
        chance=majority_share(partial(digits, True)),
        role="unseen",
    ),
    "gpt2_wide_finetune_adamw": HoldoutTask(
        "a GPT-2 of width 256 (1.7M parameters) pretrained on stdlib code (cached), fine-tuned (every weight, AdamW) "
        "on the documentation prose, clip 1.0, 16x64 bytes, 200 steps",
        "loss",
        200,
        grid(-2),
        gpt2_wide_finetune_adamw,
        LM_BATCHES,
        next_byte_loss,
        LM_SCORE,
        max_grad_norm=1.0,
        role="unseen",
    ),
    "digits_unet_adamw": HoldoutTask(
        "diffusers' UNet2DModel (177k parameters, self-attention) learning to denoise the digits (DDPM noise "
        "prediction, 1000 noise levels), AdamW as diffusers' training script sets it up, clip 1.0, batch 64, "
        "300 steps",
        "loss",
        300,
        grid(2),
        digits_unet_adamw,
        noised_digits,
        noise_prediction_error,
        denoising_errors,
        max_grad_norm=1.0,
        chance=noise_variance,
        role="unseen",
    ),
    "mixtral_moe_adamw": HoldoutTask(
        "a Mixtral-style mixture-of-experts decoder (2 layers, width 64, 4 experts, top-2 routing, 255k parameters) "
        "on the documentation prose, its router's load-balancing loss added, AdamW, clip 1.0, 16x64 bytes, 300 steps",
        "loss",
        300,
        grid(1),
        mixtral_moe_adamw,
        LM_BATCHES,
        next_byte_and_router_loss,
        LM_SCORE,
        max_grad_norm=1.0,
        role="unseen",
    ),
    "clip_adamw": HoldoutTask(
        "CLIP (a ViT and a byte-level text transformer, 2 layers each, width 64) learning the digits at 16x16 from "
        "captions by its contrastive loss, scored by zero-shot accuracy, AdamW as CLIP trains, batch 64, 300 steps",
        "accuracy",
        300,
        grid(0),
        clip_adamw,
        captioned_digits,
        contrastive_loss,
        zero_shot_accuracy,
        chance=majority_share(digits_16px),
        role="unseen",
    ),
    "code_tagger_adamw": HoldoutTask(
        "a BERT encoder pretrained on stdlib code (cached), fine-tuned (every weight, AdamW) under a token-"
        "classification head to tag each byte of unseen files with its token's kind, 16x64 bytes, 200 steps",
        "accuracy",
        200,
        grid(0),
        code_tagger_adamw,
        tagged_windows,
        tag_loss,
        accuracy(tagged_test_windows),
        chance=commonest_tag_share,
        role="unseen",
    ),
    "gpt2_dpo_adamw": HoldoutTask(
        "quality.py's GPT-2 pretrained on code, trained by DPO (beta 0.1, frozen reference) to prefer the "
        "continuation of a prose prompt to 16 bytes of code, every weight, AdamW, clip 1.0, 16 pairs per step, "
        "200 steps",
        "loss",
        200,
        grid(-1),
        gpt2_dpo_adamw,
        preference_batches,
        dpo_loss,
        held_out_dpo_loss,
        max_grad_norm=1.0,
        chance=lambda: math.log(2.0),
        role="unseen",
    ),
}
