"""AutoWU with TRL's `SFTTrainer` and a PEFT LoRA adapter on two processes (torchrun, gloo on CPU), through both entry
points: every process applies the same LR, the one an AutoWU fed the cross-process mean of each step's loss by hand
gives; both restore the same snapshot at the switch and end with the same adapter; a resume from a checkpoint written
before the switch continues the uninterrupted run bit for bit on both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import torchrun

from hf_autowu import AutoWU

SCRIPTS = Path(__file__).parent / "multiprocess"
STEPS, STEPS_PER_EPOCH = 60, 8  # 64 rows a process in steps of 8 (two micro-batches of 4)
OPTIONS = {"min_lr": 1e-4, "max_lr": 10.0}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("trl_two_processes")
    torchrun("trl_two_processes.py", str(out), cwd=str(SCRIPTS))
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def hand_fed_lrs(step_losses: list[float]) -> tuple[list[float], int | None]:
    """The LR of every step, and the switch step, from one AutoWU fed `step_losses` by hand."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = AutoWU(optimizer, STEPS_PER_EPOCH, total_steps=STEPS, **OPTIONS)
    lrs = []
    for loss in step_losses:
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(loss)
    return lrs, scheduler.switch_step


@pytest.mark.parametrize("entry_point", ["callback", "mixin"])
def test_sft_lora_on_two_processes(ranks, entry_point):
    first, second = ranks[0][entry_point], ranks[1][entry_point]
    assert first["world_size"] == second["world_size"] == 2
    assert first["step_losses"] != second["step_losses"]  # each process trains on its own shard

    # the same LR on both processes at every step: what one AutoWU fed the processes' mean losses decides
    mean = [(a + b) / 2 for a, b in zip(first["step_losses"], second["step_losses"], strict=True)]
    expected_lrs, expected_switch = hand_fed_lrs(mean)
    assert len(first["lrs"]) == STEPS and first["lrs"] == second["lrs"]
    assert first["lrs"] == pytest.approx(expected_lrs, rel=1e-9, abs=0)
    assert first["switch_step"] == second["switch_step"] == expected_switch is not None
    warmup = len(first["autowu_losses"])
    assert warmup == first["switch_step"] and first["autowu_losses"] == second["autowu_losses"]
    torch.testing.assert_close(
        torch.tensor(first["autowu_losses"], dtype=torch.float64),
        torch.tensor(mean[:warmup], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )

    # both restored the same snapshot and ended with the same adapter (and head)
    assert first["rewound_to"] == second["rewound_to"] is not None
    assert first["final"].keys() == second["final"].keys() and any("lora" in name for name in first["final"])
    assert all(torch.equal(first["final"][name], value) for name, value in second["final"].items())

    # resumed between the restored snapshot and the switch: the uninterrupted run, bit for bit, on both
    assert first["rewound_to"]["step"] < first["start"] < first["switch_step"]
    for record in (first, second):
        resumed = record["resumed"]
        assert resumed["lrs"] == record["lrs"][record["start"] :]
        assert resumed["switch_step"] == record["switch_step"] and resumed["peak_lr"] == record["peak_lr"]
        assert resumed["rewound_to"] == record["rewound_to"]
        assert all(torch.equal(resumed["final"][name], value) for name, value in record["final"].items())
