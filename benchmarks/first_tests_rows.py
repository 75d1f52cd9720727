"""Which recorded AutoWU rows a rule on the first switch tests can alter, and which it provably cannot.

`descent_required_below` (robust preset, 30) changes one thing: a switch test on a history of fewer than that many
losses counts toward the switch only when the smoothed loss `descended`. Nothing else reads whether a test counted
(the GP, its random draws, the divergence guard, the spike watch, the end of warmup at the cap and the rewinder do
not), and a test that counts under the rule counts without it. So a run recorded without the rule switches at the
same step with the same LR under it, bit for bit on the CPU it ran on, unless it switched by the test (patience
tests in a row counted) and the first test of that streak saw fewer losses than the rule's bound. AutoWU takes one
loss per optimizer step, so the history at a test after `t` steps holds `t` losses, and the test steps follow from the
budget alone (the robust cadence: a test whenever the ramp's LR has grown 1.1x).

This script lists the rows of `results/quality.json` and `results/holdout.json` that the rule can alter (switched by
the test with the streak begun before the bound; the paper preset's rows are not affected, its bound is 0), and with
``--drop`` removes them so that the resumable scripts (`quality.py`, `holdout.py`) run them again under the rule::

    python benchmarks/first_tests_rows.py          # list
    python benchmarks/first_tests_rows.py --drop   # remove them; then re-run quality.py / holdout.py as usual
"""

from __future__ import annotations

import argparse
import sys
from functools import cache
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import locked_json  # noqa: E402

from hf_autowu import AutoWU  # noqa: E402
from hf_autowu.config import PRESET_SETTINGS, AutoWUConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BOUND = PRESET_SETTINGS["robust"]["descent_required_below"]


@cache
def test_steps(total_steps: int) -> tuple[int, ...]:
    """The steps after which AutoWU's defaults run a switch test on a budget of `total_steps` (the cadence does not
    depend on the losses; a test due before the history holds the fewest losses a test needs is skipped)."""
    scheduler = AutoWU(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total_steps=total_steps)
    steps, t = [], scheduler._next_test
    while t < scheduler.warmup_steps:
        if t >= PRESET_SETTINGS["robust"]["min_losses"]:
            steps.append(t)
        t = scheduler._test_step_after(t)
    return tuple(steps)


def alterable(total_steps: int, switch_reason: str | None, switch_step: int | None) -> bool:
    """Whether the rule can alter a robust-preset run that ended warmup this way (see the module docstring)."""
    if switch_reason != "test":
        return False
    steps = test_steps(total_steps)
    if switch_step not in steps:
        return True  # not a test step of the default cadence: cannot tell, so re-run it
    last = steps.index(switch_step)
    return steps[max(0, last - AutoWUConfig().patience + 1)] < BOUND


def quality_rows(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Keys of `quality.py`'s robust-preset AutoWU rows the rule can alter."""
    return [
        key
        for key, r in runs.items()
        if r["method"] in ("autowu", "autowu_at")
        and alterable(r["steps"], r["info"].get("switch_reason"), r["info"].get("switch_step"))
    ]


def holdout_rows(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Keys of `holdout.py`'s robust-preset AutoWU rows the rule can alter."""
    keys = []
    for key, r in runs.items():
        _, setting, _, steps = key.split("|")
        if "decision_fingerprint" in r and setting not in ("paper preset", "ramp"):
            if alterable(int(steps), r.get("switch_reason"), r.get("switch_step")):
                keys.append(key)
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drop", action="store_true", help="remove the rows the rule can alter")
    args = parser.parse_args()
    for name, select in (("quality.json", quality_rows), ("holdout.json", holdout_rows)):
        with locked_json(RESULTS / name, {"runs": {}}) as data:
            keys = select(data["runs"])
            print(f"{name}: {len(keys)} of {len(data['runs'])} rows can be altered")
            for key in keys:
                print(f"  {key}")
                if args.drop:
                    del data["runs"][key]


if __name__ == "__main__":
    main()
