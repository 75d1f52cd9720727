"""Train a timm image classifier with AutoWU through `transformers.Trainer`.

The task and recipe of `train_timm_accelerate.py`, with the Trainer's loop, checkpoints and logging:

    python examples/train_timm_trainer.py                              # embedded digits, a few minutes on a CPU
    accelerate launch examples/train_timm_trainer.py --dataset ILSVRC/imagenet-1k --bf16

Script options are the fields of `ScriptArguments` below; every `TrainingArguments` option works too
(`--per_device_train_batch_size`, `--num_train_epochs`, `--resume_from_checkpoint`, `--report_to`, ...).
"""

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from timm.layers import convert_sync_batchnorm
from timm_data import (
    EMBEDDED_DEFAULTS,
    OPTIMIZER_KWARGS,
    PAPER_DEFAULTS,
    ExampleInputError,
    check_model_name,
    check_process_group,
    create_model,
    create_optimizer,
    create_transforms,
    load_image_data,
    recipe_label_smoothing,
    topk_hits,
    with_image_transform,
)
from transformers import (
    EvalPrediction,
    HfArgumentParser,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainingArguments,
)

from hf_autowu import AutoWUCallback


@dataclass
class ScriptArguments:
    """Data, model and AutoWU options of this example (the rest are `TrainingArguments`)."""

    dataset: str | None = field(
        default=None, metadata={"help": "A Hub dataset with image and class-label columns, e.g. ILSVRC/imagenet-1k."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Folder of training images, one subfolder per class (ImageNet layout)."}
    )
    val_dir: str | None = field(default=None, metadata={"help": "Folder of validation images, same class subfolders."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of preparing it on disk."})
    train_samples: int | None = field(
        default=None, metadata={"help": "Training split size, when a streamed dataset's metadata lacks it."}
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": f"timm architecture (default {PAPER_DEFAULTS['model']}; {EMBEDDED_DEFAULTS['model']} on the "
            "embedded digits)."
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Square input size (default: the model's)."})
    opt: str = field(default="adamp", metadata={"help": "timm optimizer.", "choices": sorted(OPTIMIZER_KWARGS)})
    decay: str = field(
        default="cos",
        metadata={"help": "Cosine from the switch, or constant then cosine.", "choices": ["cos", "const-cos"]},
    )
    preset: str = field(default="robust", metadata={"help": "AutoWU option preset.", "choices": ["robust", "paper"]})
    rewind: bool | None = field(
        default=None,
        metadata={"help": "Restore a warmup snapshot at the switch (default: on with the robust preset)."},
    )
    sync_bn: bool | None = field(
        default=None, metadata={"help": "SyncBatchNorm on GPUs (default: on for EfficientNets)."}
    )


def recipe_defaults(script_args: ScriptArguments) -> dict:
    """`TrainingArguments` defaults of the paper's recipe, or of the quick embedded run when no data is given."""
    embedded = not (script_args.dataset or script_args.train_dir or script_args.val_dir)
    defaults = EMBEDDED_DEFAULTS if embedded else PAPER_DEFAULTS
    model = script_args.model or defaults["model"]
    return {
        "model": model,
        "image_size": script_args.image_size or defaults["image_size"],
        "per_device_train_batch_size": defaults["batch_size"],
        "per_device_eval_batch_size": defaults["batch_size"],
        "num_train_epochs": defaults["epochs"],
        "label_smoothing_factor": recipe_label_smoothing(model),
        "weight_decay": 0.1,
        "output_dir": "outputs/timm_trainer",
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "logging_steps": 10,
        "report_to": "tensorboard",
        "remove_unused_columns": False,
    }


def parse_args(argv: list[str] | None = None) -> tuple[HfArgumentParser, ScriptArguments, TrainingArguments, dict]:
    """Parse the command line, with recipe defaults that depend on the data and model chosen.

    Args:
        argv (`list[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `tuple`: The parser, the script arguments, the training arguments and the resolved recipe.
    """
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    known, _ = parser.parse_known_args(argv)
    recipe = recipe_defaults(ScriptArguments(**{k: getattr(known, k) for k in ScriptArguments.__dataclass_fields__}))
    parser.set_defaults(**{k: v for k, v in recipe.items() if k not in ("model", "image_size")})
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return parser, script_args, training_args, recipe


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the top-1/top-5 hits of each evaluation batch instead of all its logits."""
    return topk_hits(logits, labels)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) from the hits that `preprocess_logits_for_metrics` kept."""
    top1, top5 = 100.0 * np.asarray(prediction.predictions, dtype=np.float64).mean(axis=0)
    return {"top1": top1, "top5": top5}


def build_model(name: str, label_names: list[str]) -> TimmWrapperForImageClassification:
    """A randomly initialised timm model wrapped for transformers (offline: built from a config, not the Hub).

    Args:
        name (`str`): The timm architecture.
        label_names (`list[str]`): The class names.

    Returns:
        `TimmWrapperForImageClassification`: The model, with timm's own weight initialisation.
    """
    config = TimmWrapperConfig(
        architecture=name,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={label: i for i, label in enumerate(label_names)},
    )
    model = TimmWrapperForImageClassification(config)
    # Built from a config, the wrapper re-initialises every weight the transformers way (normal, std 0.02); start
    # from timm's initialisation instead, as the Accelerate example does.
    model.timm_model.load_state_dict(create_model(name, len(label_names)).state_dict())
    return model


def train(script_args: ScriptArguments, training_args: TrainingArguments, recipe: dict) -> dict:
    """Train and evaluate one model with AutoWU and the Trainer.

    Args:
        script_args (`ScriptArguments`): Data, model and AutoWU options.
        training_args (`TrainingArguments`): The Trainer's options.
        recipe (`dict`): The resolved model name and image size.

    Returns:
        `dict`: The summary: switch_step, peak_lr, top1, top5, steps.
    """
    check_process_group(training_args.world_size)
    check_model_name(recipe["model"])
    with training_args.main_process_first():
        data = load_image_data(
            script_args.dataset,
            script_args.train_dir,
            script_args.val_dir,
            script_args.streaming,
            script_args.train_samples,
            seed=training_args.seed,
        )
    model = build_model(recipe["model"], data.label_names)
    sync_bn = recipe["model"].startswith("efficientnet") if script_args.sync_bn is None else script_args.sync_bn
    if sync_bn and training_args.world_size > 1 and training_args.device.type != "cpu":
        model.timm_model = convert_sync_batchnorm(model.timm_model)
    train_transform, eval_transform = create_transforms(model.timm_model, recipe["image_size"], data.embedded)
    if script_args.streaming:
        global_batch = (
            training_args.per_device_train_batch_size
            * training_args.world_size
            * training_args.gradient_accumulation_steps
        )
        steps_per_epoch = data.num_train_examples // global_batch
        training_args.max_steps = int(steps_per_epoch * training_args.num_train_epochs)
    optimizer = create_optimizer(model.timm_model, script_args.opt, training_args.weight_decay)
    autowu = AutoWUCallback(
        immediate_cooldown=script_args.decay == "cos", preset=script_args.preset, rewind=script_args.rewind
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=with_image_transform(data.train, train_transform, data.image_column, data.label_column),
        eval_dataset=with_image_transform(data.validation, eval_transform, data.image_column, data.label_column),
        optimizers=(optimizer, None),
        callbacks=[autowu],
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    scheduler = autowu.scheduler
    summary = {
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "top1": metrics["eval_top1"],
        "top5": metrics["eval_top5"],
        "steps": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        peak = "n/a" if scheduler.peak_lr is None else f"{scheduler.peak_lr:.4g}"
        print(
            f"AutoWU summary: switch_step={scheduler.switch_step} ({scheduler.switch_reason}) peak_lr={peak} "
            f"top1={summary['top1']:.2f}% top5={summary['top5']:.2f}% steps={summary['steps']}"
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser, script_args, training_args, recipe = parse_args(argv)
    try:
        train(script_args, training_args, recipe)
    except ExampleInputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
