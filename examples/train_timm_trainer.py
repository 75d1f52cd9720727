"""Train a timm image classifier with AutoWU through `transformers.Trainer`.

The task and recipe of `train_timm_accelerate.py`, with the Trainer's loop, checkpoints and logging:

    python examples/train_timm_trainer.py                              # embedded digits, a few minutes on a CPU
    accelerate launch examples/train_timm_trainer.py --dataset ILSVRC/imagenet-1k --bf16

Options: the fields of `ScriptArguments` below (data and model), of `AutoWUConfig` (AutoWU's options, as
`AutoWUArguments`), and every `TrainingArguments` option (`--per_device_train_batch_size`, `--num_train_epochs`,
`--resume_from_checkpoint`, `--report_to`, ...; `--help` shows the common ones, `--help_all` all of them). AutoWU
sets the learning rate of every step: `--learning_rate`, `--lr_scheduler_type` and the warmup options are ignored.
"""

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from timm.layers import convert_sync_batchnorm
from timm_data import (
    EMBEDDED_DEFAULTS,
    OPTIMIZER_KWARGS,
    PAPER_DEFAULTS,
    AutoWUArguments,
    ExampleInputError,
    HelpFormatter,
    check_model_name,
    check_process_group,
    create_model,
    create_optimizer,
    create_transforms,
    leave_process_group,
    limit_cpu_threads,
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
    set_seed,
)

from hf_autowu import AutoWUCallback, AutoWUConfig

# The `TrainingArguments` that `--help` lists (`--help_all` lists every one; all of them work), and those that AutoWU
# makes meaningless.
COMMON_TRAINING_ARGUMENTS = (
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "label_smoothing_factor",
    "bf16",
    "fp16",
    "use_cpu",
    "seed",
    "dataloader_num_workers",
    "eval_strategy",
    "save_strategy",
    "save_steps",
    "logging_steps",
    "report_to",
    "resume_from_checkpoint",
)
IGNORED_TRAINING_ARGUMENTS = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
)


@dataclass
class ScriptArguments:
    """Data and model options of this example (AutoWU's are `AutoWUArguments`, the rest `TrainingArguments`)."""

    _argument_group_name = "data and model"

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
    layer_decay: float | None = field(default=None, metadata={"help": "timm's layer-wise LR decay, in (0, 1]."})
    sync_bn: bool | None = field(
        default=None,
        metadata={"help": "SyncBatchNorm on GPUs (default: on for EfficientNets).", "nargs": "?", "const": True},
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


def build_parser(defaults: dict, show_all: bool = False, add_help: bool = True) -> HfArgumentParser:
    """The command line: the data and model options, AutoWU's, and the `TrainingArguments`.

    Args:
        defaults (`dict`): `TrainingArguments` defaults of the recipe.
        show_all (`bool`, *optional*, defaults to `False`): List every `TrainingArguments` option in `--help`, not
            only `COMMON_TRAINING_ARGUMENTS`.
        add_help (`bool`, *optional*, defaults to `True`): Whether `-h/--help` prints the help.

    Returns:
        `HfArgumentParser`: the parser.
    """
    parser = HfArgumentParser(
        (ScriptArguments, AutoWUArguments, TrainingArguments),
        description=f"{__doc__.splitlines()[0]} The first options are the Trainer's TrainingArguments (the common "
        "ones; --help_all lists them all, and all of them work), then come this script's and AutoWU's.",
        usage="%(prog)s [-h] [--help_all] [OPTIONS]",
        formatter_class=HelpFormatter,
        add_help=add_help,
        allow_abbrev=False,  # among so many options an abbreviation is a typo more often than not
    )
    parser.add_argument("--help_all", action="store_true", help="list every TrainingArguments option, then exit")
    parser.set_defaults(**defaults)
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for action in parser._actions:  # argparse has no public way to edit an option's help
        if action.dest in IGNORED_TRAINING_ARGUMENTS:
            action.help = "Ignored, default or not: AutoWU sets the learning rate of every step (AutoWU options)."
        elif action.dest == "seed":
            action.help = f"{action.help} Also the seed of AutoWU's subsampling."
        elif action.dest in training_fields and action.dest not in COMMON_TRAINING_ARGUMENTS and not show_all:
            action.help = argparse.SUPPRESS
    return parser


def parse_args(
    argv: list[str] | None = None,
) -> tuple[HfArgumentParser, ScriptArguments, AutoWUConfig, TrainingArguments, dict]:
    """Parse the command line, with recipe defaults that depend on the data and model chosen.

    Args:
        argv (`list[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `tuple`: The parser, the script arguments, AutoWU's options, the training arguments and the resolved recipe.
    """
    argv = sys.argv[1:] if argv is None else argv
    known, _ = build_parser({}, add_help=False).parse_known_args(argv)
    recipe = recipe_defaults(
        ScriptArguments(**{f.name: getattr(known, f.name) for f in dataclasses.fields(ScriptArguments)})
    )
    parser = build_parser({k: v for k, v in recipe.items() if k not in ("model", "image_size")}, known.help_all)
    if known.help_all:
        parser.print_help()
        parser.exit()
    try:
        script_args, autowu_args, training_args, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as err:  # an AutoWU option out of range
        parser.error(str(err))
    return parser, script_args, autowu_args.to_config(seed=training_args.seed), training_args, recipe


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the top-1/top-5 hits of each evaluation batch instead of all its logits."""
    return topk_hits(logits, labels)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) from the hits that `preprocess_logits_for_metrics` kept."""
    top1, top5 = 100.0 * np.asarray(prediction.predictions, dtype=np.float64).mean(axis=0)
    return {"top1": top1, "top5": top5}


def build_model(name: str, label_names: list[str], seed: int) -> TimmWrapperForImageClassification:
    """A randomly initialised timm model wrapped for transformers (offline: built from a config, not the Hub).

    The weights are drawn after `set_seed(seed)`: the Trainer seeds only when it is built, after the model, so
    without it every run would start from other weights.

    Args:
        name (`str`): The timm architecture.
        label_names (`list[str]`): The class names.
        seed (`int`): The run's seed (`--seed`).

    Returns:
        `TimmWrapperForImageClassification`: The model, with timm's own weight initialisation.
    """
    set_seed(seed)
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


def train(
    script_args: ScriptArguments, autowu_config: AutoWUConfig, training_args: TrainingArguments, recipe: dict
) -> dict:
    """Train and evaluate one model with AutoWU and the Trainer.

    Args:
        script_args (`ScriptArguments`): Data and model options.
        autowu_config (`AutoWUConfig`): AutoWU's options.
        training_args (`TrainingArguments`): The Trainer's options.
        recipe (`dict`): The resolved model name and image size.

    Returns:
        `dict`: The summary: switch_step, switch_reason, peak_lr, rewound_to, top1, top5, steps.
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
    limit_cpu_threads(data, training_args.device)
    model = build_model(recipe["model"], data.label_names, training_args.seed)
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
    optimizer = create_optimizer(
        model.timm_model, script_args.opt, training_args.weight_decay, script_args.layer_decay
    )
    autowu = AutoWUCallback(config=autowu_config)
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
        "rewound_to": scheduler.rewinder.rewound_to if scheduler.rewinder is not None else None,
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
    parser, script_args, autowu_config, training_args, recipe = parse_args(argv)
    try:
        train(script_args, autowu_config, training_args, recipe)
    except ExampleInputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    leave_process_group()


if __name__ == "__main__":
    main()
