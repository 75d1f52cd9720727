"""Probe (not a method): Adam's preconditioned sharpness along AutoWU's ramp and at the switch.

Runs the default AutoWU run of a hand-loop classification task (`vit_digits` or `digits_cnn`) as
`tasks.run_classifier_loop` does, and measures, every 8 ramp steps and once at the switch (after any rewind), the
largest eigenvalue of `D^-1/2 H D^-1/2` on 256 fixed training samples: `H` the loss Hessian, `D` Adam's bias-corrected
`sqrt(v) + eps`. For Adam with `beta1` 0.9 a state is stable at LR `eta` while `eta * lambda < 38` (the "adaptive
edge of stability", Cohen et al. 2022), so `38 / lambda` at the switch is a curvature-based estimate of the largest
sustainable LR, to set beside the LR AutoWU chose and the oracle's best.

The measurement adds forward and backward passes in eval mode; runs are not bit for bit those of `quality.py` for
every seed.

Usage: `python benchmarks/sharpness_probe.py vit_digits 0,1,2,3,4` (about 1 minute per seed on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tasks as t
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MODELS = {"vit_digits": (t.timm_vit_model, lambda: t.digits_at(16)), "digits_cnn": (t.DigitsCNN, t.digits_splits)}
ADAM_EOS = 38.0  # 2 (1 + beta1) / (1 - beta1) at beta1 = 0.9


def preconditioned_sharpness(model, optimizer, x, y, iters: int = 20) -> float:
    """The largest (algebraic) eigenvalue of Adam's preconditioned Hessian at the model's current weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    _, beta2 = optimizer.param_groups[0]["betas"]
    eps = optimizer.param_groups[0]["eps"]
    scales = []
    for p in params:
        state = optimizer.state[p]
        scales.append(((state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps).rsqrt())
    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no double backward
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def apply(vector, shift):
        hv = torch.autograd.grad(
            grads, params, grad_outputs=[s * v for s, v in zip(scales, vector, strict=True)], retain_graph=True
        )
        return [s * h - shift * v for s, h, v in zip(scales, hv, vector, strict=True)]

    def power(shift):
        generator = torch.Generator().manual_seed(0)
        vector = [torch.randn(p.shape, generator=generator) for p in params]
        value = 0.0
        for _ in range(iters):
            norm = torch.sqrt(sum((v * v).sum() for v in vector))
            vector = [v / norm for v in vector]
            image = apply(vector, shift)
            value = float(sum((a * b).sum() for a, b in zip(vector, image, strict=True)))
            vector = image
        return value

    dominant = power(0.0)
    top = dominant if dominant > 0 else power(dominant) + dominant  # most negative first: shift past it
    model.train(was_training)
    return top


def probe(task_name: str, seed: int) -> dict:
    task = t.TASKS[task_name]
    make_model, make_splits = MODELS[task_name]
    x_train, y_train = make_splits()["train"]
    fixed = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(123))[:256]
    x_fixed, y_fixed = x_train[fixed], y_train[fixed]
    torch.manual_seed(seed)
    model = make_model()
    model, optimizer, scheduler, loader, accelerator = t.classifier_loop_setup(
        task, "autowu", seed, None, model, x_train, y_train
    )
    inner = getattr(optimizer, "optimizer", optimizer)
    record: dict = {"ramp": [], "switch": None}

    def at_switch(s):
        rewound = s.rewinder.rewound_to if s.rewinder is not None else None
        sharpness = preconditioned_sharpness(model, inner, x_fixed, y_fixed)
        record["switch"] = {
            "step": s.switch_step,
            "peak_lr": s.peak_lr,
            "rewound_lr": rewound["lr"] if rewound else None,
            "sharpness": sharpness,
        }

    scheduler.add_switch_listener(at_switch)
    batches = t._endless(loader)
    model.train()
    for step in range(task.steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss) if accelerator is not None else loss.backward()
        lr = inner.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step(loss.detach())
        if scheduler.phase == "warmup" and step % 8 == 7:
            record["ramp"].append([step, lr, preconditioned_sharpness(model, inner, x_fixed, y_fixed)])
        if record["switch"] is not None:
            break
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(MODELS))
    parser.add_argument("seeds", help="comma-separated, e.g. 0,1,2,3,4")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharpness_probe.json"))
    args = parser.parse_args()
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        record = results[seed] = probe(args.task, seed)
        switch = record["switch"]
        print(
            f"{args.task} seed {seed}: switch at step {switch['step']}, LR chosen {switch['peak_lr']:.3g}, "
            f"sharpness {switch['sharpness']:.3g}, LR x sharpness {switch['peak_lr'] * switch['sharpness']:.1f}, "
            f"{ADAM_EOS:.0f} / sharpness = {ADAM_EOS / switch['sharpness']:.3g}; ramp max LR x sharpness "
            f"{max(lr * s for _, lr, s in record['ramp']):.1f}",
            flush=True,
        )
    Path(args.out).write_text(json.dumps({args.task: results}, indent=1))


if __name__ == "__main__":
    main()
