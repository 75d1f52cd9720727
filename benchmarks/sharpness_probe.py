"""Probes (not methods): Adam's preconditioned sharpness along AutoWU's ramp and at the switch, or the noise-aware
greedy LR at the switch.

Runs the default AutoWU run of a hand-loop classification task (`vit_digits` or `digits_cnn`) as
`tasks.run_classifier_loop` does, and measures, every 8 ramp steps and once at the switch (after any rewind), the
largest eigenvalue of `D^-1/2 H D^-1/2` (Lanczos) on 256 fixed training samples: `H` the loss Hessian, `D` Adam's
bias-corrected `sqrt(v) + eps`. For Adam with `beta1` 0.9 a state is stable at LR `eta` while `eta * lambda < 38`
(the "adaptive edge of stability", Cohen et al. 2022), so `38 / lambda` at the switch is a curvature-based estimate
of the largest sustainable LR, to set beside the LR AutoWU chose and the oracle's best.

With `--measure greedy`, the state at the switch is measured once (the run up to it is `quality.py`'s): along
Adam's update direction `u = P g` (`P` Adam's `1 / (sqrt(v) + eps)`, `g` the gradient of one training batch of the
task's size), the expected loss on the fixed samples after a step `eta * u` is, to second order,
`L - eta E[G.u] + eta^2 / 2 E[u.H u]`, which is lowest at `eta* = E[G.u] / E[u.H u]`; the expectations are taken
over 16 batches, so the gradient's noise at the training batch size is in `E[u.H u]`. `eta*` is the one-step
optimal LR (known to be shorter than the best LR for a whole run, "short-horizon bias"); the question is whether it
is short by a factor that stays the same across seeds. Beside it: `eta*` without the noise (`u = P G`) and the
noise's share of `E[u.H u]`.

Runs use one intra-op thread, as `quality.py` does by default (with more, the digits CNN's convolutions round
differently and some seeds switch elsewhere). The sharpness measurement adds forward and backward passes in eval
mode during the ramp.

Usage: `python benchmarks/sharpness_probe.py vit_digits 0,1,2,3,4` (about 1 minute per seed on 2 cores);
`--measure greedy` writes `results/greedy_lr_probe.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tasks as t
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch.nn.attention import SDPBackend, sdpa_kernel

MODELS = {"vit_digits": (t.timm_vit_model, lambda: t.digits_at(16)), "digits_cnn": (t.DigitsCNN, t.digits_splits)}
ADAM_EOS = 38.0  # 2 (1 + beta1) / (1 - beta1) at beta1 = 0.9


def adam_denominators(model, optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's trained parameters, and Adam's bias-corrected `sqrt(v) + eps` for each."""
    params = [p for p in model.parameters() if p.requires_grad]
    _, beta2 = optimizer.param_groups[0]["betas"]
    eps = optimizer.param_groups[0]["eps"]
    denominators = []
    for p in params:
        state = optimizer.state[p]
        denominators.append((state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps)
    return params, denominators


def preconditioned_sharpness(model, optimizer, x, y, tol: float = 1e-3) -> float:
    """The largest (algebraic) eigenvalue of Adam's preconditioned Hessian at the model's current weights, by Lanczos
    iteration on Hessian-vector products (scipy's `eigsh`; plain power iteration, which converges to the eigenvalue
    largest in magnitude, is unreliable here, where large negative eigenvalues are common)."""
    params, denominators = adam_denominators(model, optimizer)
    scales = [d.rsqrt() for d in denominators]
    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no double backward
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sizes = [p.numel() for p in params]

    def apply(flat):
        pieces = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(-1)).split(sizes)
        vector = [s * v.view(p.shape) for s, v, p in zip(scales, pieces, params, strict=True)]
        hv = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)
        return torch.cat([(s * h).reshape(-1) for s, h in zip(scales, hv, strict=True)]).double().numpy()

    n = sum(sizes)
    start = np.random.default_rng(0).standard_normal(n)
    top = eigsh(LinearOperator((n, n), matvec=apply, dtype=np.float64), k=1, which="LA", v0=start, tol=tol)[0][0]
    model.train(was_training)
    return float(top)


GREEDY_GRID = [1e-5 * 2 ** (k / 2) for k in range(27)]  # 1e-5 to 8.2e-2, 2^0.5 apart


@torch.no_grad()
def greedy_lr(model, optimizer, x, y, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The noise-aware one-step best LR along Adam's preconditioned direction (module docstring), and the same
    without the gradient's noise."""
    params, denominators = adam_denominators(model, optimizer)
    scales = [1.0 / d for d in denominators]
    was_training = model.training
    model.eval()

    def direction(bx, by):
        with torch.enable_grad():
            grads = torch.autograd.grad(F.cross_entropy(model(bx), by), params)
        return [s * g for s, g in zip(scales, grads, strict=True)]

    def loss_after(step, lr):
        for p, u in zip(params, step, strict=True):
            p.sub_(lr * u)
        loss = float(F.cross_entropy(model(x), y))
        for p, u in zip(params, step, strict=True):
            p.add_(lr * u)
        return loss

    start = float(F.cross_entropy(model(x), y))
    clean = direction(x, y)
    noisy = [direction(bx, by) for bx, by in batches]
    clean_curve = [loss_after(clean, lr) for lr in GREEDY_GRID]
    noisy_curve = [sum(loss_after(u, lr) for u in noisy) / len(noisy) for lr in GREEDY_GRID]
    model.train(was_training)
    return {
        "start_loss": start,
        "greedy_lr": GREEDY_GRID[int(np.argmin(noisy_curve))],
        "greedy_lr_noiseless": GREEDY_GRID[int(np.argmin(clean_curve))],
        "noisy_curve": noisy_curve,
        "clean_curve": clean_curve,
    }


def probe(task_name: str, seed: int, measure: str = "sharpness") -> dict:
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

    draw = torch.Generator().manual_seed(7)
    noise_batches = [
        (x_train[i], y_train[i])
        for i in (torch.randperm(len(x_train), generator=draw)[: task.batch_size] for _ in range(16))
    ]

    def at_switch(s):
        rewound = s.rewinder.rewound_to if s.rewinder is not None else None
        record["switch"] = {
            "step": s.switch_step,
            "peak_lr": s.peak_lr,
            "rewound_lr": rewound["lr"] if rewound else None,
        }
        if measure == "sharpness":
            record["switch"]["sharpness"] = preconditioned_sharpness(model, inner, x_fixed, y_fixed)
        else:
            record["switch"].update(greedy_lr(model, inner, x_fixed, y_fixed, noise_batches))

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
        if measure == "sharpness" and scheduler.phase == "warmup" and step % 8 == 7:
            record["ramp"].append([step, lr, preconditioned_sharpness(model, inner, x_fixed, y_fixed)])
        if record["switch"] is not None:
            break
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(MODELS))
    parser.add_argument("seeds", help="comma-separated, e.g. 0,1,2,3,4")
    parser.add_argument("--measure", choices=("sharpness", "greedy"), default="sharpness")
    parser.add_argument("--out", help="default: results/sharpness_probe.json or results/greedy_lr_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as quality.py runs: the runs up to the switch are its runs
    name = "sharpness_probe.json" if args.measure == "sharpness" else "greedy_lr_probe.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        record = results[seed] = probe(args.task, seed, args.measure)
        switch = record["switch"]
        if args.measure == "greedy":
            print(
                f"{args.task} seed {seed}: switch at step {switch['step']}, LR chosen {switch['peak_lr']:.3g} "
                f"(rewound to {switch['rewound_lr']}), greedy LR {switch['greedy_lr']:.3g}, without noise "
                f"{switch['greedy_lr_noiseless']:.3g}, loss at the switch {switch['start_loss']:.3f}",
                flush=True,
            )
            continue
        print(
            f"{args.task} seed {seed}: switch at step {switch['step']}, LR chosen {switch['peak_lr']:.3g}, "
            f"sharpness {switch['sharpness']:.3g}, LR x sharpness {switch['peak_lr'] * switch['sharpness']:.1f}, "
            f"{ADAM_EOS:.0f} / sharpness = {ADAM_EOS / switch['sharpness']:.3g}; ramp max LR x sharpness "
            f"{max(lr * s for _, lr, s in record['ramp']):.1f}",
            flush=True,
        )
    existing = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**existing, args.task: results}, indent=1))


if __name__ == "__main__":
    main()
