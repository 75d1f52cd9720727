"""Train a timm image classifier with AutoWU in a hand-written Accelerate loop.

The same file runs on one CPU, one GPU or many GPUs and nodes:

    python examples/train_timm_accelerate.py                      # embedded digits, a few minutes on a CPU
    accelerate launch examples/train_timm_accelerate.py --dataset ILSVRC/imagenet-1k --mixed-precision bf16

AutoWU picks the warmup length and the peak learning rate from the training loss; the run ends with one summary
line: the step at which warmup ended, the peak learning rate it chose, the validation accuracy and the wall time.
"""

import argparse
import json
import math
import os
import re
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from timm.layers import convert_sync_batchnorm
from timm.utils import ModelEmaV3
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
    shard_for_process,
    topk_hits,
    with_image_transform,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from hf_autowu import (
    AutoWU,
    AutoWUConfig,
    autowu_log_entries,
    register_for_checkpointing,
    save_autowu_figure,
    switch_message,
)


class RunHistory:
    """The learning rate of every optimizer step so far; saved with each checkpoint so a resumed run continues it."""

    def __init__(self) -> None:
        self.lr: list[float] = []

    @property
    def completed_steps(self) -> int:
        return len(self.lr)

    def state_dict(self) -> dict[str, list[float]]:
        return {"lr": list(self.lr)}

    def load_state_dict(self, state_dict: dict[str, list[float]]) -> None:
        self.lr = list(state_dict["lr"])


def find_checkpoint(path: str, output_dir: str) -> str:
    """Resolve `--resume`: a checkpoint folder, or "latest" for the newest one under `output_dir/checkpoints`.

    Args:
        path (`str`): The `--resume` value.
        output_dir (`str`): The run's output folder.

    Returns:
        `str`: The checkpoint folder to load.
    """
    if path != "latest":
        if not os.path.isdir(path):
            raise ExampleInputError(f"--resume {path!r} is not a checkpoint folder")
        return path
    root = os.path.join(output_dir, "checkpoints")
    names = [name for name in os.listdir(root) if re.fullmatch(r"step_\d+", name)] if os.path.isdir(root) else []
    if not names:
        raise ExampleInputError(f"--resume latest: no checkpoint under {root!r}")
    return os.path.join(root, max(names, key=lambda name: int(name.split("_")[1])))


def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) over the validation split, which the processes share out between them.

    Args:
        accelerator (`Accelerator`): The run's accelerator.
        model (`torch.nn.Module`): The (unwrapped) model.
        loader (`DataLoader`): This process's share of the validation split.

    Returns:
        `tuple[float, float]`: Top-1 and top-5 accuracy in percent.
    """
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            labels = batch["labels"].to(accelerator.device)
            logits = model(batch["pixel_values"].to(accelerator.device))
            counts[:2] += topk_hits(logits, labels).sum(dim=0)
            counts[2] += labels.numel()
    correct1, correct5, total = accelerator.reduce(counts, "sum").tolist()
    return 100.0 * correct1 / total, 100.0 * correct5 / total


def training_function(config: dict, autowu_config: AutoWUConfig, args: argparse.Namespace) -> dict:
    """Train and evaluate one model with AutoWU.

    Args:
        config (`dict`): Hyperparameters: model, image_size, batch_size, epochs, opt, weight_decay, layer_decay,
            label_smoothing, seed.
        autowu_config (`AutoWUConfig`): AutoWU's options.
        args (`argparse.Namespace`): Data, precision, checkpointing and logging options.

    Returns:
        `dict`: The summary: switch_step, switch_reason, peak_lr, rewound_to, top1, top5, wall_time_s, steps.
    """
    start_time = time.time()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_process_group(accelerator.num_processes)
    set_seed(config["seed"])
    check_model_name(config["model"])
    with accelerator.main_process_first():
        data = load_image_data(args.dataset, args.train_dir, args.val_dir, args.streaming, args.train_samples)
    limit_cpu_threads(data, accelerator.device)

    model = create_model(config["model"], data.num_classes)
    if args.sync_bn or (args.sync_bn is None and config["model"].startswith("efficientnet")):
        if accelerator.num_processes > 1 and accelerator.device.type != "cpu":
            model = convert_sync_batchnorm(model)
    train_transform, eval_transform = create_transforms(model, config["image_size"], data.embedded)
    loader_kwargs = {"batch_size": config["batch_size"], "num_workers": args.num_workers}
    val_shard = shard_for_process(data.validation, accelerator.process_index, accelerator.num_processes)
    val_split = with_image_transform(val_shard, eval_transform, data.image_column, data.label_column)
    # Its own generator: starting an evaluation then draws no seed from the global RNG, which the training
    # augmentation uses, so a run resumed from a checkpoint sees the same augmentation as the uninterrupted one.
    val_loader = DataLoader(val_split, generator=torch.Generator(), **loader_kwargs)
    if args.streaming:
        # Each process reads its own files (split_dataset_by_node); an epoch is cut to the same number of batches on
        # every process so that none waits for gradients the others never send.
        train_shard = shard_for_process(
            data.train.shuffle(seed=config["seed"], buffer_size=args.shuffle_buffer),
            accelerator.process_index,
            accelerator.num_processes,
        )
        train_split = with_image_transform(train_shard, train_transform, data.image_column, data.label_column)
        train_loader = DataLoader(train_split, **loader_kwargs)
        global_batch = config["batch_size"] * accelerator.num_processes * args.gradient_accumulation_steps
        batches_per_epoch = data.num_train_examples // global_batch * args.gradient_accumulation_steps
    else:
        train_split = with_image_transform(data.train, train_transform, data.image_column, data.label_column)
        train_loader = DataLoader(train_split, shuffle=True, drop_last=True, **loader_kwargs)
    optimizer = create_optimizer(model, config["opt"], config["weight_decay"], config["layer_decay"])
    if args.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ExampleInputError(f"the training split ({data.num_train_examples} images) is smaller than one batch")
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    # Not passed to `accelerator.prepare`: AutoWU is stepped once per optimizer step by this loop, with the loss.
    # With rewind on (the robust preset's default), AutoWU keeps a few host-memory snapshots of the model (its
    # buffers included, since it is given) and optimizer during warmup; at the switch both go back to the latest one
    # trained with LRs no larger than the chosen one. The snapshots travel in AutoWU's checkpointed state.
    # With `--model-ema-decay`, a moving average of the weights (timm's `ModelEmaV3`, as timm's train script keeps
    # one) is updated after every optimizer step; given to AutoWU, it is rewound with the model, so that the steps
    # the rewind undoes leave no trace in it.
    ema = None if args.model_ema_decay is None else ModelEmaV3(accelerator.unwrap_model(model), args.model_ema_decay)
    scheduler = AutoWU(
        optimizer,
        steps_per_epoch,
        config["epochs"],
        config=autowu_config,
        model=accelerator.unwrap_model(model),
        ema=ema,
    )

    def on_switch(scheduler: AutoWU) -> None:  # on the main process: what AutoWU decided, and its figure
        if accelerator.is_main_process:
            tqdm.write(switch_message(scheduler))  # between progress-bar updates
            save_autowu_figure(scheduler, args.output_dir)

    scheduler.add_switch_listener(on_switch)
    history = RunHistory()
    # `save_state` averages the losses each process holds first, and keeps each process's own AutoWU state (under
    # FSDP or DeepSpeed its rewind snapshots hold that process's shards); `load_state` gives each its own back
    register_for_checkpointing(accelerator, scheduler)
    accelerator.register_for_checkpointing(history)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.report_to != "none":
        accelerator.init_trackers("autowu", {k: str(v) if v is None else v for k, v in config.items()})

    if args.resume:
        checkpoint = find_checkpoint(args.resume, args.output_dir)
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(checkpoint)
    total_steps = steps_per_epoch * config["epochs"]
    max_steps = min(total_steps, args.max_train_steps or total_steps)
    start_epoch, skip_steps = divmod(history.completed_steps, steps_per_epoch)
    progress = tqdm(
        total=max_steps, initial=history.completed_steps, disable=not accelerator.is_local_main_process, desc="train"
    )
    top1 = top5 = ema_top1 = float("nan")
    for epoch in range(start_epoch, config["epochs"]):
        if history.completed_steps >= max_steps:
            break
        model.train()
        epoch_loader = train_loader
        if args.streaming:
            train_split.set_epoch(epoch)
        else:
            train_loader.set_epoch(epoch)
        skipped_batches = skip_steps * args.gradient_accumulation_steps if epoch == start_epoch else 0
        if skipped_batches:
            epoch_loader = accelerator.skip_first_batches(train_loader, skipped_batches)
        step_loss, micro_batches = 0.0, 0
        # The training loss logged every `--log-every` steps is the mean over those steps and over the processes,
        # as the Trainer logs it: summed on the device, read (one sync, one all-reduce) only when it is logged.
        logged_loss, logged_steps = torch.zeros((), device=accelerator.device), 0
        for batch_index, batch in enumerate(epoch_loader, start=skipped_batches):
            if args.streaming and batch_index >= batches_per_epoch:
                break
            with accelerator.accumulate(model):
                pixel_values = batch["pixel_values"].to(accelerator.device)
                labels = batch["labels"].to(accelerator.device)
                loss = criterion(model(pixel_values), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            step_loss, micro_batches = step_loss + loss.detach(), micro_batches + 1
            if not accelerator.sync_gradients:
                continue
            history.lr.append(max(group["lr"] for group in optimizer.param_groups))
            if ema is not None and not accelerator.optimizer_step_was_skipped:
                ema.update(accelerator.unwrap_model(model), step=history.completed_steps)
            # This process's loss, still on the device: AutoWU averages it over the processes itself, once per
            # switch test, so the loop adds neither a host sync nor a collective per step.
            autowu_loss = step_loss / micro_batches
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step(autowu_loss)
            step_loss, micro_batches = 0.0, 0
            logged_loss, logged_steps = logged_loss + autowu_loss.float(), logged_steps + 1
            progress.update(1)
            completed = history.completed_steps
            if args.report_to != "none" and completed % args.log_every == 0:
                mean_loss = accelerator.reduce(logged_loss / logged_steps, "mean").item()
                accelerator.log({"train/loss": mean_loss, **autowu_log_entries(scheduler)}, step=completed)
                logged_loss, logged_steps = torch.zeros_like(logged_loss), 0
            if args.checkpointing_steps and completed % args.checkpointing_steps == 0:
                folder = os.path.join(args.output_dir, "checkpoints", f"step_{completed}")
                accelerator.save_state(folder)
            if completed >= max_steps:
                break
        top1, top5 = evaluate(accelerator, accelerator.unwrap_model(model), val_loader)
        entries = {"eval/top1": top1, "eval/top5": top5}
        if ema is not None:
            ema_top1 = entries["eval/ema_top1"] = evaluate(accelerator, ema.module, val_loader)[0]
        if accelerator.is_main_process:  # with the LR of the epoch's last step
            averaged = "" if ema is None else f" (EMA top-1 {ema_top1:.2f}%)"
            progress.write(f"epoch {epoch}: top-1 {top1:.2f}% top-5 {top5:.2f}%{averaged} lr {history.lr[-1]:.3e}")
        if args.report_to != "none":
            accelerator.log({**entries, **autowu_log_entries(scheduler)}, step=completed)
    progress.close()
    accelerator.end_training()
    if accelerator.is_main_process:
        save_autowu_figure(scheduler, args.output_dir)

    summary = {
        "switch_step": scheduler.switch_step,
        "switch_reason": scheduler.switch_reason,
        "peak_lr": scheduler.peak_lr,
        "rewound_to": scheduler.rewinder.rewound_to if scheduler.rewinder is not None else None,
        "top1": top1,
        "top5": top5,
        "ema_top1": ema_top1,
        "wall_time_s": round(time.time() - start_time, 1),
        "steps": history.completed_steps,
    }
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump({**summary, "lr": history.lr}, f)
    peak = "n/a" if scheduler.peak_lr is None else f"{scheduler.peak_lr:.4g}"
    accelerator.print(
        f"AutoWU summary: switch_step={scheduler.switch_step} ({scheduler.switch_reason}) peak_lr={peak} "
        f"top1={top1:.2f}% top5={top5:.2f}% "
        f"steps={history.completed_steps} wall_time={summary['wall_time_s']}s"
    )
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[HfArgumentParser, AutoWUArguments, argparse.Namespace]:
    """Parse the command line: AutoWU's options (every `AutoWUConfig` field) and this script's own.

    Args:
        argv (`list[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `tuple`: The parser, AutoWU's options and the script's options.
    """
    parser = HfArgumentParser(
        AutoWUArguments,
        description=__doc__.splitlines()[0],
        usage="%(prog)s [-h] [OPTIONS]",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    data = parser.add_argument_group("data (none of them: the embedded digits dataset)")
    data.add_argument("--dataset", help="a Hub dataset with image and class-label columns, e.g. ILSVRC/imagenet-1k")
    data.add_argument("--train-dir", help="folder of training images, one subfolder per class (ImageNet layout)")
    data.add_argument("--val-dir", help="folder of validation images, same class subfolders")
    data.add_argument("--streaming", action="store_true", help="stream the dataset instead of preparing it on disk")
    data.add_argument("--train-samples", type=int, help="training split size, when streamed metadata lacks it")
    data.add_argument("--shuffle-buffer", type=int, default=10_000, help="shuffle buffer of a streamed dataset")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per training process")
    recipe = parser.add_argument_group(
        "recipe (defaults: the paper's ImageNet recipe; with the embedded dataset "
        f"model={EMBEDDED_DEFAULTS['model']}, image size {EMBEDDED_DEFAULTS['image_size']}, "
        f"batch {EMBEDDED_DEFAULTS['batch_size']}, {EMBEDDED_DEFAULTS['epochs']} epochs)"
    )
    recipe.add_argument("--model", help=f"timm architecture (default {PAPER_DEFAULTS['model']})")
    recipe.add_argument("--image-size", type=int, help="square input size (default: the model's)")
    recipe.add_argument(
        "--batch-size", type=int, help=f"per-process batch size (default {PAPER_DEFAULTS['batch_size']})"
    )
    recipe.add_argument("--epochs", type=int, help=f"the step budget in epochs (default {PAPER_DEFAULTS['epochs']})")
    recipe.add_argument("--opt", choices=sorted(OPTIMIZER_KWARGS), default="adamp", help="timm optimizer")
    recipe.add_argument("--weight-decay", type=float, default=0.1, help="weight decay")
    recipe.add_argument(
        "--layer-decay", type=float, help="layer-wise LR decay in (0, 1], timm's (AutoWU applies it; default: none)"
    )
    recipe.add_argument("--label-smoothing", type=float, help="default 0.1 for EfficientNets, else 0")
    recipe.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        help="SyncBatchNorm on GPUs (default: on for EfficientNets)",
    )
    recipe.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    recipe.add_argument(
        "--model-ema-decay",
        type=float,
        help="keep a moving average of the weights with this decay (timm's ModelEmaV3; AutoWU rewinds it with the "
        "model) and evaluate it too (default: none)",
    )
    recipe.add_argument(
        "--seed", type=int, default=0, help="seed of the model, the data order, the augmentation and AutoWU"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: from `accelerate config`")
    run.add_argument(
        "--cpu",
        action="store_true",
        help="train on the CPU (also how several processes form a group on a machine without GPUs)",
    )
    run.add_argument("--output-dir", default="outputs/timm_accelerate", help="summary, figure, logs and checkpoints")
    run.add_argument("--checkpointing-steps", type=int, help="save the full state every N optimizer steps")
    run.add_argument("--resume", help='a checkpoint folder, or "latest" (the newest under OUTPUT_DIR/checkpoints)')
    run.add_argument(
        "--max-train-steps", type=int, help="stop after N optimizer steps (the schedule stays as planned)"
    )
    run.add_argument("--report-to", default="tensorboard", help='an Accelerate tracker, "all" or "none"')
    run.add_argument(
        "--log-every", type=int, default=10, help="log the mean training loss of the last N optimizer steps"
    )
    try:
        autowu, args = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as err:  # an AutoWU option out of range
        parser.error(str(err))
    return parser, autowu, args


def main(argv: list[str] | None = None) -> None:
    parser, autowu, args = parse_args(argv)
    if args.model_ema_decay is not None and not 0.0 < args.model_ema_decay < 1.0:
        parser.error(f"--model-ema-decay must be in (0, 1), got {args.model_ema_decay}")
    embedded = not (args.dataset or args.train_dir or args.val_dir)
    defaults = EMBEDDED_DEFAULTS if embedded else PAPER_DEFAULTS
    model = args.model or defaults["model"]
    config = {
        "model": model,
        "image_size": args.image_size or defaults["image_size"],
        "batch_size": args.batch_size or defaults["batch_size"],
        "epochs": args.epochs or defaults["epochs"],
        "opt": args.opt,
        "weight_decay": args.weight_decay,
        "layer_decay": args.layer_decay,
        "label_smoothing": recipe_label_smoothing(model) if args.label_smoothing is None else args.label_smoothing,
        "seed": args.seed,
    }
    try:
        training_function(config, autowu.to_config(seed=args.seed), args)
    except ExampleInputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    leave_process_group()


if __name__ == "__main__":
    main()
