"""AutoWU in a hand-written two-process loop: every process applies the same LRs, equal to those of one
process fed the cross-process mean loss."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun

SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from scheduler_two_processes import NAN_STEP, TOTAL, local_loss  # noqa: E402

from hf_autowu import AutoWU  # noqa: E402


@pytest.mark.multiprocess
def test_two_processes_agree_with_the_mean_loss(tmp_path):
    torchrun("scheduler_two_processes.py", tmp_path, cwd=SCRIPTS, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "the processes disagree"
    assert ranks[0]["switch_step"] is not None

    # one process fed the mean of both processes' losses makes the same decisions
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    single = AutoWU(optimizer, total_steps=TOTAL, immediate_cooldown=True, divergence_guard=False)
    lrs = []
    for step in range(TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        single.step((local_loss(0, step, lrs[-1]) + local_loss(1, step, lrs[-1])) / 2)
    assert lrs == ranks[0]["lrs"]
    assert ranks[0]["losses"][NAN_STEP] is None, "one NaN makes the step's mean NaN on every process"
    assert all(math.isfinite(lr) for lr in lrs)
