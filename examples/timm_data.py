"""Data, model and command-line helpers shared by the AutoWU timm examples.

`train_timm_accelerate.py` and `train_timm_trainer.py` both import this module. It turns a Hub dataset, a local
ImageNet-style folder or the embedded handwritten digits into `datasets` splits that yield preprocessed images,
builds the timm model and optimizer of the recipe, turns `AutoWUConfig` into command-line flags, and words what
the examples print when AutoWU ends warmup.
"""

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
import timm
import torch
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetNotFoundError
from PIL import Image
from sklearn.datasets import load_digits
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2

from hf_autowu import AutoWUArguments as LibraryAutoWUArguments
from hf_autowu import AutoWUConfig

# The paper's recipe (ImageNet) and the settings used when no data argument is given (scikit-learn's digits).
PAPER_DEFAULTS = {"model": "resnet50", "image_size": None, "batch_size": 256, "epochs": 120}
EMBEDDED_DEFAULTS = {"model": "test_resnet", "image_size": 32, "batch_size": 64, "epochs": 15}

# timm optimizers of the recipe and their extra arguments (AdamP as in the paper).
OPTIMIZER_KWARGS = {"adamp": {"delta": 0.1, "wd_ratio": 0.1}, "lamb": {}, "adamw": {}}
VALIDATION_SPLIT_NAMES = ("validation", "val", "valid", "test")


class ExampleInputError(ValueError):
    """A problem with the user's data or model arguments, reported as one line without a traceback."""


@dataclass
class ImageData:
    """Train and validation splits of an image classification dataset.

    Args:
        train (`datasets.Dataset` or `datasets.IterableDataset`): The training split.
        validation (`datasets.Dataset` or `datasets.IterableDataset`): The validation split.
        label_names (`list[str]`): The class names; their number is the number of classes.
        num_train_examples (`int`): Rows in the training split (known for streamed splits from the dataset info).
        image_column (`str`): The column holding the images.
        label_column (`str`): The column holding the integer labels.
        embedded (`bool`): Whether this is the embedded digits dataset.
    """

    train: datasets.Dataset | datasets.IterableDataset
    validation: datasets.Dataset | datasets.IterableDataset
    label_names: list[str]
    num_train_examples: int
    image_column: str = "image"
    label_column: str = "label"
    embedded: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def load_digits_dataset(seed: int = 0) -> datasets.DatasetDict:
    """Scikit-learn's bundled handwritten digits (1797 8x8 grayscale images) as an image dataset.

    Args:
        seed (`int`): Seed of the stratified 80/20 train/validation split.

    Returns:
        `datasets.DatasetDict`: "train" and "validation" splits with an `image` (PIL) and a `label` column.
    """
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    full = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features
    )
    splits = full.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict({"train": splits["train"], "validation": splits["test"]})


def _load_folders(
    train_dir: str, val_dir: str, streaming: bool
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    for flag, path in (("--train-dir", train_dir), ("--val-dir", val_dir)):
        if not os.path.isdir(path):
            raise ExampleInputError(f"{flag} {path!r} is not a directory")
    data_files = {"train": os.path.join(train_dir, "**"), "validation": os.path.join(val_dir, "**")}
    try:
        return datasets.load_dataset("imagefolder", data_files=data_files, streaming=streaming)
    except (FileNotFoundError, ValueError) as err:
        raise ExampleInputError(
            f"no images found under {train_dir!r} / {val_dir!r} (expected one subfolder of images per class): "
            f"{_first_line(err)}"
        ) from err


def _load_hub(name: str, streaming: bool) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    try:
        return datasets.load_dataset(name, streaming=streaming)
    except (DatasetNotFoundError, OSError) as err:
        raise ExampleInputError(
            f"cannot load dataset {name!r} from the Hub ({_first_line(err)}); a gated dataset needs `hf auth login` "
            "and accepted terms, an offline machine needs it in the local cache"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _num_examples(split: datasets.Dataset | datasets.IterableDataset, name: str) -> int:
    if isinstance(split, datasets.Dataset):
        return len(split)
    split_info = (split.info.splits or {}).get(name)
    if split_info is None or not split_info.num_examples:
        raise ExampleInputError(
            f"the size of the streamed {name!r} split is not in the dataset's metadata; pass --train-samples"
        )
    return split_info.num_examples


def load_image_data(
    dataset: str | None = None,
    train_dir: str | None = None,
    val_dir: str | None = None,
    streaming: bool = False,
    train_samples: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Load the training and validation splits of an image classification dataset.

    Exactly one source is used: a Hub dataset (`dataset`), a pair of local folders in the ImageNet layout
    (`train_dir`/`val_dir`, one subfolder per class, read by the `imagefolder` builder) or, with neither, the
    embedded digits dataset.

    Args:
        dataset (`str`, *optional*): Name of a dataset on the Hugging Face Hub, e.g. `"ILSVRC/imagenet-1k"`.
        train_dir (`str`, *optional*): Folder of training images, one subfolder per class.
        val_dir (`str`, *optional*): Folder of validation images with the same class subfolders.
        streaming (`bool`): Stream the splits (`datasets.IterableDataset`) instead of preparing them on disk.
        train_samples (`int`, *optional*): Size of the training split, for streamed datasets whose metadata lacks it.
        seed (`int`): Seed of the embedded dataset's train/validation split.

    Returns:
        `ImageData`: The splits, the class names and the column names.

    Raises:
        `ExampleInputError`: A missing or empty folder, an unreachable or gated Hub dataset, or a dataset without an
        image column, a class-label column or a validation split.
    """
    if dataset and (train_dir or val_dir):
        raise ExampleInputError("use either --dataset or --train-dir/--val-dir, not both")
    if bool(train_dir) != bool(val_dir):
        missing = "--train-dir" if not train_dir else "--val-dir"
        raise ExampleInputError(f"{missing} is missing: --train-dir and --val-dir go together")
    if not dataset and not train_dir:
        if streaming:
            raise ExampleInputError("--streaming needs --dataset or --train-dir/--val-dir")
        splits = load_digits_dataset(seed)
        return ImageData(
            splits["train"],
            splits["validation"],
            splits["train"].features["label"].names,
            len(splits["train"]),
            embedded=True,
        )

    splits = _load_hub(dataset, streaming) if dataset else _load_folders(train_dir, val_dir, streaming)
    source = dataset or f"{train_dir} / {val_dir}"
    if "train" not in splits:
        raise ExampleInputError(f"{source} has no 'train' split (splits: {', '.join(splits)})")
    val_name = next((name for name in VALIDATION_SPLIT_NAMES if name in splits), None)
    if val_name is None:
        raise ExampleInputError(f"{source} has no validation split (splits: {', '.join(splits)})")
    train = splits["train"]
    features = train.features or {}
    image_column = next((col for col, feat in features.items() if isinstance(feat, datasets.Image)), None)
    label_column = next((col for col, feat in features.items() if isinstance(feat, datasets.ClassLabel)), None)
    if image_column is None or label_column is None:
        raise ExampleInputError(f"{source} needs an image column and a class-label column (features: {features})")
    num_train_examples = train_samples or _num_examples(train, "train")
    return ImageData(
        train, splits[val_name], features[label_column].names, num_train_examples, image_column, label_column
    )


def check_process_group(num_processes: int) -> None:
    """Refuse to run when the launcher started more processes than joined the process group.

    On a machine without GPUs, `accelerate launch --multi_gpu` (torchrun) starts the processes but, unless they are
    told to use the CPU, each one trains alone on the whole dataset.

    Args:
        num_processes (`int`): The number of processes in the group (`accelerator.num_processes`).

    Raises:
        `ExampleInputError`: `WORLD_SIZE` says more processes were launched.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > num_processes:
        raise ExampleInputError(
            f"{launched} processes were launched but each runs alone; on a machine without GPUs pass --cpu "
            "(Trainer script: --use_cpu)"
        )


def shard_for_process(
    split: datasets.Dataset | datasets.IterableDataset, process_index: int, num_processes: int
) -> datasets.Dataset | datasets.IterableDataset:
    """The part of a split that one process reads (whole files for a streamed split when they divide evenly).

    Args:
        split (`datasets.Dataset` or `datasets.IterableDataset`): The split to share out.
        process_index (`int`): This process's rank.
        num_processes (`int`): The number of processes.

    Returns:
        The same type of dataset, holding this process's share; the shares are disjoint and cover the split.
    """
    return split_dataset_by_node(split, rank=process_index, world_size=num_processes)


def create_model(name: str, num_classes: int, **kwargs) -> torch.nn.Module:
    """A randomly initialised timm model.

    Args:
        name (`str`): A timm architecture name, e.g. `"resnet50"` or `"efficientnet_b0"`.
        num_classes (`int`): Size of the classifier head.
        kwargs: Passed on to `timm.create_model`.

    Returns:
        `torch.nn.Module`: The model.

    Raises:
        `ExampleInputError`: `name` is not a timm architecture.
    """
    check_model_name(name)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def check_model_name(name: str) -> None:
    """Raise `ExampleInputError` unless `name` is a timm architecture.

    Args:
        name (`str`): The architecture name to check.
    """
    if not timm.is_model(name):
        raise ExampleInputError(f"unknown timm model {name!r} (see `timm.list_models()`)")


def create_optimizer(
    model: torch.nn.Module, opt: str = "adamp", weight_decay: float = 0.1, layer_decay: float | None = None
) -> torch.optim.Optimizer:
    """The recipe's timm optimizer, without weight decay on biases and normalisation weights.

    Every group gets the configured LR 1.0: AutoWU sets the actual LR and keeps only the groups' ratios, times each
    group's `lr_scale` when `layer_decay` is given (timm's layer-wise LR decay, applied by AutoWU as by timm's
    schedulers).

    Args:
        model (`torch.nn.Module`): The model to optimise.
        opt (`str`): One of `OPTIMIZER_KWARGS` ("adamp", "lamb", "adamw").
        weight_decay (`float`): Weight decay.
        layer_decay (`float`, *optional*): Layer-wise LR decay in (0, 1]: each layer group's LR is this factor times
            the next one's, the head's at AutoWU's LR (fine-tuning a ViT: 0.65-0.75). None: every layer alike.

    Returns:
        `torch.optim.Optimizer`: The optimizer.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ExampleInputError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    return create_optimizer_v2(
        model, opt=opt, lr=1.0, weight_decay=weight_decay, layer_decay=layer_decay, **OPTIMIZER_KWARGS[opt]
    )


def recipe_label_smoothing(model_name: str) -> float:
    """The paper recipe's label smoothing: 0.1 for EfficientNets, none otherwise.

    Args:
        model_name (`str`): The timm architecture name.

    Returns:
        `float`: The label smoothing factor.
    """
    return 0.1 if model_name.startswith("efficientnet") else 0.0


def create_transforms(
    model: torch.nn.Module, image_size: int | None = None, embedded: bool = False
) -> tuple[Callable, Callable]:
    """Training and evaluation preprocessing from the model's timm data config.

    Args:
        model (`torch.nn.Module`): A timm model (its `pretrained_cfg` gives the defaults).
        image_size (`int`, *optional*): Square input size overriding the model's default.
        embedded (`bool`): Gentler augmentation for the embedded digits (no flips, milder crops).

    Returns:
        `tuple`: `(train_transform, eval_transform)`, each mapping a PIL image to a normalised tensor.
    """
    data_config = resolve_data_config({"input_size": (3, image_size, image_size)} if image_size else {}, model=model)
    augment = {"hflip": 0.0, "scale": (0.6, 1.0)} if embedded else {}
    return create_transform(**data_config, is_training=True, **augment), create_transform(**data_config)


class ImageTransform:
    """Maps a batch of dataset rows to model inputs: `{"pixel_values": [tensor, ...], "labels": [int, ...]}`.

    Args:
        transform (`Callable`): Maps an RGB PIL image to a tensor.
        image_column (`str`): The column holding the images.
        label_column (`str`): The column holding the integer labels.
    """

    def __init__(self, transform: Callable, image_column: str = "image", label_column: str = "label"):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [self.transform(image.convert("RGB")) for image in batch[self.image_column]],
            "labels": batch[self.label_column],
        }


def with_image_transform(
    split: datasets.Dataset | datasets.IterableDataset, transform: Callable, image_column: str, label_column: str
) -> datasets.Dataset | datasets.IterableDataset:
    """The split, yielding `pixel_values` (a tensor) and `labels` (an int) per row, preprocessed on the fly.

    Args:
        split (`datasets.Dataset` or `datasets.IterableDataset`): The split.
        transform (`Callable`): Maps an RGB PIL image to a tensor.
        image_column (`str`): The column holding the images.
        label_column (`str`): The column holding the integer labels.

    Returns:
        The same type of dataset; `torch.utils.data.default_collate` and the Trainer's default collator batch it.
    """
    batch_transform = ImageTransform(transform, image_column, label_column)
    if isinstance(split, datasets.IterableDataset):
        return split.map(batch_transform, batched=True, remove_columns=split.column_names)
    return split.with_transform(batch_transform)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Whether each row's label is among its `k` highest logits, for each `k`.

    Args:
        logits (`torch.Tensor`): `(batch, num_classes)` scores.
        labels (`torch.Tensor`): `(batch,)` integer labels.
        ks (`tuple[int, ...]`): The values of `k` (clipped to the number of classes).

    Returns:
        `torch.Tensor`: `(batch, len(ks))` booleans, on the device of `logits`.
    """
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return torch.stack([hits[:, :k].any(dim=-1) for k in ks], dim=-1)


# ---------------------------------------------------------------- command line and messages

_AUTOWU_FIELDS = {f.name: f for f in dataclasses.fields(AutoWUConfig)}


@dataclass
class AutoWUArguments(LibraryAutoWUArguments):
    """`hf_autowu.AutoWUArguments` (every AutoWU option as a flag, AutoWU's seed the run's `--seed`) with the examples'
    recipe: decay from the switch (`immediate_cooldown`, the paper's "cosine" schedule; linear with the robust
    preset, `--cooldown_type cosine` for the paper's shape; `--no_immediate_cooldown` holds the LR until the
    cooldown)."""

    immediate_cooldown: bool = dataclasses.field(default=True, metadata=_AUTOWU_FIELDS["immediate_cooldown"].metadata)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help only where the help does not tell the default already, and never
    "(default: None)" or to a plain flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def leave_process_group() -> None:
    """End a run launched as several processes (`WORLD_SIZE` > 1): wait for every process and destroy the process
    group if it still exists (`Accelerator.end_training` destroys it), then exit without interpreter finalization.
    A no-op in a single process.

    Gloo's worker threads can still be releasing the tensors of the last collectives when the interpreter shuts
    down; a release that needs the GIL then aborts the process ("terminate called without an active exception", exit
    code -6) after a run that succeeded (pytorch/pytorch#190489; a core dump of such an abort here shows
    `~AsyncAllreduceWork` taking the GIL inside `Py_FinalizeEx`). Destroying the group does not prevent it. Everything
    this script writes is closed by now (`end_training` and the Trainer close their trackers), so it flushes its
    streams and leaves with `os._exit(0)`, which skips finalization.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def limit_cpu_threads(data: ImageData, device: torch.device) -> None:
    """One intra-op thread per process for the embedded digits on a CPU.

    Their model is tiny: extra threads have little work to share, and on a busy machine each operation waits for the
    slowest of them (measured on a loaded 2-core machine: a training step of the embedded run took 0.25-2.2 s with
    2 threads, 0.03 s with 1). Runs on real data keep PyTorch's default.
    """
    if data.embedded and device.type == "cpu":
        torch.set_num_threads(1)
