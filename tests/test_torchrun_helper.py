"""The multi-process tests' launcher, `helpers.torchrun`, on a run that outlasts its timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import processes_running, torchrun

HANGING = """
import os, sys, time
open(os.path.join(sys.argv[1], "started" + os.environ["RANK"]), "w").close()
time.sleep(600)
"""


def test_a_run_past_its_timeout_fails_the_test_and_leaves_no_worker_running(tmp_path: Path) -> None:
    """torchrun starts its workers in sessions of their own; a timeout must end them too, not only torchrun."""
    (tmp_path / "hang.py").write_text(HANGING)
    with pytest.raises(pytest.fail.Exception, match="timed out after 8 s"):
        torchrun("hang.py", str(tmp_path), cwd=str(tmp_path), timeout=8)
    assert sorted(p.name for p in tmp_path.glob("started*")) == ["started0", "started1"]  # the workers had started
    assert processes_running("hang.py", str(tmp_path)) == []
