"""Figure for the README: AutoWU's robust default against the paper's behaviour, per benchmark task.

Reads the runs recorded by `benchmarks/quality.py` (`benchmarks/results/quality.json`) and draws, for one seed
of each task, the training loss and the LR of every step for `autowu` (robust preset) and `autowu_paper`; only
runs recorded with the current decision code (`runner.decision_fingerprint`) are drawn.

Usage: `python benchmarks/plot_presets.py [--seed 0] [--tasks a,b,c] [--out docs/paper_vs_robust.png]`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from runner import has_current_decisions  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quality.json"
STYLES = {"autowu": ("robust (default)", "tab:blue"), "autowu_paper": ('preset="paper"', "tab:red")}
DEFAULT_TASKS = "digits_cnn,vit_digits,gpt2_stdlib,llama_stdlib,gpt2_finetune_docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated tasks, one column each")
    parser.add_argument("--out", type=Path, default=Path("docs/paper_vs_robust.png"))
    args = parser.parse_args()
    recorded = json.loads(RESULTS.read_text())["runs"].values()
    tasks = args.tasks.split(",")
    runs = [
        r
        for r in recorded
        if r["method"] in STYLES and r["seed"] == args.seed and r["task"] in tasks and has_current_decisions(r)
    ]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.5 * len(tasks), 6), sharex="col", squeeze=False)
    for col, task in enumerate(tasks):
        for run in (r for r in runs if r["task"] == task):
            label, color = STYLES[run["method"]]
            score = f"{100 * run['test']:.1f}%" if run["metric"] == "accuracy" else f"{run['test']:.2f}"
            axes[0, col].plot(run["losses"], color=color, lw=0.8, label=f"{label}: test {score}")
            axes[1, col].semilogy(run["lrs"], color=color, lw=1.2)
            switch = run["info"]["switch_step"]
            for ax in axes[:, col]:
                ax.axvline(switch, color=color, ls=":", lw=1)
        axes[0, col].set_title(task)
        axes[0, col].set_yscale("log")
        axes[0, col].legend(fontsize=8)
        axes[1, col].set_xlabel("optimizer step")
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("learning rate")
    fig.suptitle("AutoWU: robust default vs the paper's behaviour (dotted: the switch)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
