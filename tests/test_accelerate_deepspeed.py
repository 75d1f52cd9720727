"""AutoWU in an Accelerate loop under DeepSpeed ZeRO 2 and 3 (one process, `DS_ACCELERATOR=cpu`), built before
`accelerator.prepare` and handed to it, as Accelerate's documentation builds a scheduler: rewind finds DeepSpeed's
wrapper of the optimizer and runs exactly as with AutoWU built on the optimizer `prepare` returns, and its state
travels with `register_for_checkpointing` (Accelerate's, or `hf_autowu.register_for_checkpointing`), `save_state` and
`load_state` to an exact resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import same_tensors, torchrun

pytest.importorskip("deepspeed")
SCRIPTS = Path(__file__).parent / "multiprocess"
sys.path.insert(0, str(SCRIPTS))
from accelerate_deepspeed import RESUME_AT, STAGES, TOTAL  # noqa: E402

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate_deepspeed")
    for stage in STAGES:
        torchrun("accelerate_deepspeed.py", str(out), cwd=str(SCRIPTS), processes=1, args=(str(stage),))
    return lambda run: torch.load(out / f"{run}.pt", weights_only=True)


@pytest.mark.parametrize("stage", STAGES)
def test_autowu_built_before_prepare_rewinds_as_on_the_prepared_optimizer(load, stage):
    before, after = load(f"zero{stage}-before"), load(f"zero{stage}-after")
    assert before["scheduler"] == "AutoWU" and before["optimizer"].startswith("DeepSpeedZeroOptimizer")
    assert before["warnings"] == [] and before["enabled"] and before["mode"] == after["mode"] == "sharded"
    switch, target = before["switch_step"], before["rewound_to"]
    assert switch == after["switch_step"] is not None and target == after["rewound_to"] is not None
    assert same_tensors(before["states"][switch], before["states"][target["step"]])
    assert same_tensors(before["weights"][switch], before["weights"][target["step"]])
    assert before["lrs"] == after["lrs"] and len(before["lrs"]) == TOTAL
    assert same_tensors(before["states"][TOTAL], after["states"][TOTAL])


@pytest.mark.parametrize("registered", ["before", "after"])
@pytest.mark.parametrize("stage", STAGES)
def test_register_for_checkpointing_resumes_exactly(load, stage, registered):
    """Saved after the snapshot the switch restores and before the switch (with Accelerate's
    `register_for_checkpointing` when AutoWU was built before `prepare`, with hf_autowu's when after): the resumed run
    restores it from the loaded state and ends on the uninterrupted run's LRs, masters, AdamW state and weights, bit
    for bit."""
    full, resumed = load(f"zero{stage}-{registered}"), load(f"zero{stage}-{registered}-resumed")
    assert full["rewound_to"]["step"] < RESUME_AT < full["switch_step"]
    assert resumed["rewound_to"] == full["rewound_to"] and resumed["warnings"] == []
    assert resumed["lrs"] == {step: lr for step, lr in full["lrs"].items() if step >= RESUME_AT}
    assert same_tensors(resumed["states"][TOTAL], full["states"][TOTAL])
    assert same_tensors(resumed["weights"][TOTAL], full["weights"][TOTAL])
