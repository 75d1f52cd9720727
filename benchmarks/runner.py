"""Runs the planned benchmark runs, records each as it finishes (resumable), grows the oracle grid as needed.

Several processes may run at once (``python benchmarks/quality.py ...`` in two shells): each run is claimed in
the results file before it starts, so they share the work instead of repeating it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import os
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any

import methods as m
import numpy as np
from common import command_line, cpu_name, locked_json
from tasks import TASKS, TaskSpec, smoke_task

import hf_autowu

REPO = Path(hf_autowu.__file__).resolve().parent.parent
"""The checkout whose `hf_autowu` the runs import (where pip's editable install points; not always the one these
scripts are in, e.g. in a second worktree): the fingerprint and revision recorded with each run are of that code."""
NOT_DECISION_CODE = ("__init__.py", "cli.py", "plotting.py", "replay.py", "log_entries.py", "reference.py")
"""Modules of `hf_autowu` that cannot change what AutoWU decides or trains (every other module can)."""

SAME_DECISIONS_AS: dict[str, dict[str, str]] = {
    "09c2a9f4b7a9": {
        "02fb9fe5ba55": "the losses' mean for standardizing them is taken on the losses scaled down where their sum "
        "overflows (losses near 1e306; no recorded row comes near), and `load_scheduler_state` reads its file without "
        "memory-mapping it; `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under 09c2a9f4b7a9 "
        "to their recorded switch step, reason and LR",
    },
    "02fb9fe5ba55": {
        "c96ee2bedbf1": "`hf_autowu.save_scheduler_state`/`load_scheduler_state` (a new module, `process_files`) for "
        "loops that checkpoint by hand, and the Trainer's and Accelerate's per-process files chosen and written by "
        "it; no step, test or switch changes, and `probe_rows.py --at` replays all 1131 recorded AutoWU rows with "
        "losses under 02fb9fe5ba55 to their recorded switch step, reason and LR",
    },
    "c96ee2bedbf1": {
        "2db6b58eae4f": "`register_for_checkpointing` refuses a scheduler already registered with the accelerator; "
        "`probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under c96ee2bedbf1 to their recorded "
        "switch step, reason and LR",
    },
    "2db6b58eae4f": {
        "3459a62a45bb": "`hf_autowu.register_for_checkpointing(accelerator, scheduler)`, a new module: Accelerate's "
        "`save_state`/`load_state` average the pending losses first and keep each process's own state; no step, test "
        "or switch changes, and `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under "
        "2db6b58eae4f to their recorded switch step, reason and LR",
    },
    "3459a62a45bb": {
        "7dfe70878585": "uneven inputs under `torch.distributed.algorithms.Join`: AutoWU is a `Joinable` whose hook "
        "shadows the steps of the processes still training, and loss averages under a `Join` are over the processes "
        "that hold each loss; nothing changes outside a `Join`, and `probe_rows.py --at` replays all 1131 recorded "
        "AutoWU rows with losses under 3459a62a45bb to their recorded switch step, reason and LR",
    },
    "7dfe70878585": {
        "e3c0d46d2f16": "review: a switch made while a state is loaded (a resume whose budget's cooldown point has "
        "passed) is flagged, so that the Trainer's rewinder and log, attached after the load, still hear of it; no "
        "recorded row resumes, and `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under "
        "7dfe70878585 to their recorded switch step, reason and LR",
    },
    "e3c0d46d2f16": {
        "d6d62a860338": "the losses' standard deviation is computed on deviations brought to order 1 when their "
        "spread is beyond 1e100 or below 1e-100 (squares that overflow or underflow; in between the plain one, bit "
        "for bit), and `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under e3c0d46d2f16 to "
        "their recorded switch step, reason and LR",
    },
    "d6d62a860338": {
        "51b8609b9188": "a warmup checkpoint resumed with a budget whose cooldown point has passed ends warmup at "
        "once and decays from the resumed step (no recorded row resumes), and `probe_rows.py --at` replays all 1131 "
        "recorded AutoWU rows with losses under d6d62a860338 to their recorded switch step, reason and LR",
    },
    "51b8609b9188": {
        "909794248805": "the spike watch reads the noise of its reference from as many of the latest losses as the "
        "reference will judge until the next test (at least 20, as before): false spikes at long budgets, "
        "`false_spikes.py`; every recorded row has fewer than 20 steps between tests, and `probe_rows.py --at` "
        "replays all 1131 recorded AutoWU rows with losses under 51b8609b9188 to their recorded switch step, reason "
        "and LR",
    },
    "909794248805": {
        "d1a31d827471": "`AutoWUArguments` (AutoWU's options beside `TrainingArguments` in one parser, with the run's "
        "seed): the Trainer's entry points build AutoWU with `args.seed` when given them, and options on top of them "
        "keep the class; no option of an `AutoWUConfig` changes, and `probe_rows.py --at` replays all 1131 recorded "
        "AutoWU rows with losses under 909794248805 to their recorded switch step, reason and LR",
    },
    "d1a31d827471": {
        "f53af25f5420": 'the plateau rule of `decay_phase_stat="loss"` counts an epoch as better by a share of the '
        "best's size below zero too (it never cut with negative losses); no recorded row uses it, and "
        "`probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under d1a31d827471 to their recorded "
        "switch step, reason and LR",
    },
    "f53af25f5420": {
        "8047bc575d5f": "review tidies: the epoch's losses are averaged over the processes by one method where "
        "`sync_pending_losses` and the per-epoch decay each had a copy; the damaged-state checks raise through one "
        "helper; `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under f53af25f5420 to "
        "their recorded switch step, reason and LR",
    },
    "8047bc575d5f": {
        "53389b8d2ea5": "a review of odd inputs and loss shapes: the spike watch arms on differences of losses only "
        "(no share of the loss's own level: a constant added to the loss changed when it armed) and takes the "
        "smallest change seen as its noise when the latest losses are all equal; micro-batch losses are averaged at "
        "their own precision; the state keeps the ramp's length (a second resume after a budget change rebuilt the "
        "ramp); a damaged state, a NumPy string option, an offload folder that is a file or gone, ints beyond "
        "floats and a group LR that would overflow are refused or handled; `probe_rows.py --at` replays all 1131 "
        "recorded AutoWU rows with losses under 8047bc575d5f to their recorded switch step, reason and LR",
    },
    "53389b8d2ea5": {
        "66a69eee6bbd": "review tidies: the per-step path reads the schedule through `_lr_at` (`lr_at` alone checks "
        "its argument), `AutoWU.from_state_dict` refuses another scheduler's state with a ValueError, and "
        "`LossSpikeWatch.forget_held` takes its one caller's `before` as required; `probe_rows.py --at` replays all "
        "1131 recorded AutoWU rows with losses under 53389b8d2ea5 to their recorded switch step, reason and LR",
    },
    "66a69eee6bbd": {
        "70c1edccc9a4": "`AutoWUTrainerMixin.__init_subclass__` refuses a class that puts a Trainer before the mixin "
        "in its bases (its methods never ran); no benchmark builds such a class, and `probe_rows.py --at` replays "
        "all 1131 recorded AutoWU rows with losses under 66a69eee6bbd to their recorded switch step, reason and LR",
    },
    "70c1edccc9a4": {
        "42d6620dd238": "fixes from a review of the entry points: a second "
        "non-finite loss right after a retried one with nothing restored ends warmup; `sync_pending_losses` in decay "
        "with `decay_phase_stat='loss'` averages the epoch's losses in place; `step_update` counts updates that fp16 "
        "overflow skipped under Accelerate; the state keeps the LR that later groups are scaled against; a load "
        "rebuilds the scheduler's own rewinder with the saved rewind options; `initial_lr` recorded in each group; "
        "a tensor LR, `lr_at`'s step and a bool loss checked; the Trainer warms up again after a checkpoint without "
        "scheduler state and refuses a second AutoWUCallback. `probe_rows.py --at` replays all 1131 recorded "
        "AutoWU rows with losses under 70c1edccc9a4 to their recorded switch step, reason and LR",
    },
    "42d6620dd238": {
        "1a36a306ba55": "a refactor: `distributed.mean_over_processes` is `MeanInFlight(values).wait()` (the same "
        "sums; the division by the process count moves from the device to the host, exact in float64 on both); "
        "`probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under 42d6620dd238 to their "
        "recorded switch step, reason and LR",
    },
    "1a36a306ba55": {
        "5e1f1b93bb1b": "`AutoWU.state_dict` never makes a collective for the relay: with gloo and CUDA losses it "
        "saves this process's own values among the pending losses (`MeanInFlight.needs_collective`); a path only "
        "several processes take, and `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses under "
        "1a36a306ba55 to their recorded switch step, reason and LR",
    },
    "5e1f1b93bb1b": {
        "e41f979b6e55": "with several processes the spike watch checks the processes' mean losses every 4th warmup "
        "step (an asynchronous `all_reduce` started on one step, read on the next: `distributed.MeanInFlight`, "
        "`AutoWU._relay_losses`) instead of at the next switch test; one process takes no new path (every "
        "benchmark row is one process), and `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses "
        "under 5e1f1b93bb1b to their recorded switch step, reason and LR",
    },
    "e41f979b6e55": {
        "30da64343630": "a refactor: `scheduler.py`'s helpers moved into modules of their own (`loss_inputs`, "
        "`param_groups`, `saved_state`; `config.check_positive_int`), the code unchanged; `probe_rows.py --at` "
        "replays all 1131 recorded AutoWU rows with losses under e41f979b6e55 to their recorded switch step, reason "
        "and LR",
    },
    "30da64343630": {
        "3cb347f3b064": "a refactor: `switch_test.level_fall` takes its sliding medians from two 1-D rank filters "
        "(`switch_test.sliding_medians`, equal bit for bit to `np.median` over a sliding window view, in memory "
        "linear in the history instead of a copy of every window); `probe_rows.py --at` replays all 1131 recorded "
        "AutoWU rows with losses under 30da64343630 to their recorded switch step, reason and LR",
    },
    "3cb347f3b064": {
        "102b02bbf624": "the robust switch test asks a rise to outgrow twice the largest bump of the smoothed loss "
        "before its minimum (`swing_margin` 2, bumps beyond one GP noise standard deviation: "
        "`switch_test.rise_backs`). Only the votes read it, and a run's training up to its switch depends only on "
        "the ramp: `probe_rows.py --at` replays all 1131 recorded AutoWU rows with losses (the 339 rows of the "
        "defaults, rewind and slowed_fraction settings and the 792 `autowu_at` rows, by switch step and reason) "
        "under 3cb347f3b064; 1095 reproduce their recorded switch, and the other 36 (the digits CNN's seeds 1 and 4, "
        "with its `autowu_at` rows of seed 1; the Friedman MLP's seed 3; the full-batch MLP's seeds 1 and 2, with "
        "their rewind, slowed_fraction 0.1 and `autowu_at` rows), exactly those `rule_probes.py`'s ``swing 2 1`` "
        "altered under 102b02bbf624, were removed and run again",
    },
    "102b02bbf624": {
        "35f450c04f7e": "a refactor: `SwitchTestOutcome.descended_from_start` and `fell_over_ramp` share one "
        "threshold test, `switch_test.level_fell` (the same comparison, the scale factor exactly 1.0 for medians of "
        "ten); the 339 recorded AutoWU rows with losses replay under 102b02bbf624 to their recorded switch step, "
        "reason and LR (`probe_rows.py`)",
    },
    "35f450c04f7e": {
        "77c3722ff918": "at the cap a fall of the losses' level over a third of the ramp "
        "(`switch_test.fell_over_ramp`, its threshold scaled to those medians' smaller noise) also counts as a fall, "
        "so such a cap decays from the GP's estimate instead of `min_lr`. Only a cap where medians of ten read no "
        "fall can decide otherwise: the 339 recorded AutoWU rows with losses replay under 35f450c04f7e to their "
        "recorded switch step, reason and LR (`probe_rows.py`), none of them ends at such a cap, and `autowu_at` "
        "rows force their LR at a switch whose step and reason the change leaves alone",
    },
    "77c3722ff918": {
        "d1e2362b1f19": "at a cap reached by a loss that never really fell (`SwitchTestOutcome.fell`, the blow-up "
        "rule's own test, now one property) AutoWU decays from `min_lr` instead of the GP's lowest point of that "
        "noise; the spike watch's MAD constant is `switch_test.MAD_TO_SD` (the same float). Only a cap without a fall "
        "decides otherwise: the 339 recorded AutoWU rows with losses replay under 77c3722ff918 to their recorded "
        "switch step, reason and LR (`probe_rows.py`), none of them ends at a cap without a fall, and `autowu_at` "
        "rows force their LR at the switch, whose step and reason the change leaves alone",
    },
    "d1e2362b1f19": {
        "7b68ae7a675c": "the spike watch checks each loss once (in one process the loss that arrived at a switch "
        "test was checked twice, so one high loss there confirmed a spike). Only the spike watch reads it, and a row "
        "decides as before unless its switch changes: replayed under d1e2362b1f19, 280 of the 339 recorded AutoWU "
        "rows with losses (`probe_rows.py`) and 675 of the 792 `autowu_at` rows (their switch step and reason) "
        "reproduce their recorded switch; the other 59 and 117 (13 task-seed pairs) were removed and run again",
    },
    "7b68ae7a675c": {
        "55b3ef67d22c": "the blow-up rule measures the fall from the start as the losses' level (the lowest median of "
        "ten in a row) instead of the GP's smoothed minimum, which can dip below flat losses before a sharp rise; "
        "nothing but the LR chosen at a blow-up reads it, and `probe_rows.py` replays all 339 recorded AutoWU rows "
        "with losses (the 15 run at 55b3ef67d22c and the 324 that stand for it) to their recorded switch step, "
        "reason and LR under 7b68ae7a675c: the same decisions, so the same runs",
    },
    "55b3ef67d22c": {
        "001b84b46859": "the robust blow-up rule judges the descent against the first losses' noise and, after a rise "
        "a test found, decays from the estimate of the latest test that saw no rise. Nothing but the LR chosen at a "
        "blow-up reads either, so a row recorded without the rule is the same bit for bit under it unless its switch "
        "changes; `probe_rows.py` replays every recorded AutoWU row with losses under both codes (all 339 reproduce "
        "their recorded switch under the old one) and finds 15 whose LR changes (DPO's seeds 1 and 2 and the "
        "transfer task's seed 0 in four settings each, `mlp_sgd`'s default seed 3, two `slowed_fraction 0.1` rows), "
        "which were removed and run again under the rule",
    },
    "001b84b46859": {
        "27a4544fdf75": "`AutoWU(..., ema=...)` and `WarmupRewinder(..., ema=...)` snapshot and restore a moving "
        "average of the weights with the model's buffers; without one (no benchmark loop passes one) the rewinder "
        "holds and restores the same tensors as before. Run under both on one Intel Xeon (family 6, model 167): the "
        "20 AutoWU and ramp rows of `digits_unet_adamw` recorded at 27a4544fdf75 on it, and the defaults of "
        "`bn_cnn_nesterov` and `mlp_sgd` (seeds 0-2, every one restoring a snapshot, the CNN's with BatchNorm's "
        "statistics): the same bit for bit",
    },
    "27a4544fdf75": {
        "c727c8c944ee": "the robust preset's `descent_required_below` 30: a switch test on fewer than 30 losses "
        "counts only after a real descent. Nothing but the switch by the test reads whether a test counted, so a "
        "row recorded without the rule is the same bit for bit under it unless it switched by the test with the "
        "streak begun before 30 losses; `first_tests_rows.py` finds those (26 rows, the LoRA and the wide "
        "fine-tune's seed 0: their defaults, rewind, fraction and `--at` rows), which were removed and run again "
        "under the rule",
    },
    "c727c8c944ee": {
        "e07abb401804": "12a712c snapshots and restores the optimizer state of the innermost optimizer that shares "
        "the parameter groups (timm's Lookahead keeps it in the one it wraps); no benchmark optimizer wraps another "
        "that way, and the same 218 rows run under both on one Intel Xeon (family 6, model 167): the same bit for bit",
    },
    "e07abb401804": {
        "84bfca3a86db": "df31d1c multiplies a parameter group's LR ratio by its `lr_scale` (timm's layer-wise LR "
        "decay); no benchmark optimizer has one, and the same 218 rows run under both on one Intel Xeon (family 6, "
        "model 167): the same bit for bit",
    },
    "84bfca3a86db": {
        "007a27d060a3": "a4bf86a makes `WarmupRewinder.load_state_dict` read the whole state before changing "
        "anything; no benchmark run loads a state, and the same 218 rows run under both on one Intel Xeon (family 6, "
        "model 167): the same bit for bit",
    },
    "007a27d060a3": {
        "addbb0a7f9eb": "d211872 runs a one-step budget at `min_lr` instead of `max_lr` and reads the retry's "
        "finiteness flags once per device; every benchmark budget is 100 steps or more and no recorded run has a "
        "non-finite loss, and the same 218 rows run under both on one Intel Xeon (family 6, model 167): the same bit "
        "for bit",
    },
    "addbb0a7f9eb": {
        "872fc700b323": "1f16cda decays from the LR range test's rule at a warmup cap the GP gives no estimate for "
        "(fewer than 20 losses: budgets under 40 steps; or a GP failure) instead of from the LR reached; every "
        "benchmark budget is 100 steps or more, and the same 218 rows run under both on one Intel Xeon (family 6, "
        "model 167): the same bit for bit",
    },
    "872fc700b323": {
        "682ce4758d33": "995a70b restores a snapshot at the first-NaN retry only when the training state is no longer "
        "finite; no benchmark run has a non-finite loss, and the same 218 rows run under both on one Intel Xeon "
        "(family 6, model 167): the same bit for bit",
    },
    "682ce4758d33": {
        "415c0e35e63a": "8cab63c retries the first non-finite loss of warmup (restore the snapshot before it, go on) "
        "instead of ending warmup on it; no benchmark run has a non-finite loss, and the same 218 rows run under both "
        "on one Intel Xeon (family 6, model 167): the same bit for bit",
    },
    "415c0e35e63a": {
        "1d0f42c45732": "9dbf2bd merged rewind's two tensor-mapping helpers into one and moved the Trainer's budget "
        "lowering into `AutoWU._load`; the same 218 rows run under both on one Intel Xeon (family 6, model 167): the "
        "same bit for bit",
    },
    "1d0f42c45732": {
        "6b21989a4941": "15cebc4 made `AutoWU.load_state_dict` all or nothing, which no benchmark run calls; the same "
        "218 rows run under both on one Intel Xeon (family 6, model 167): the same bit for bit",
    },
    "6b21989a4941": {
        "55fe3620b1a3": "68c2ab7 and 48b52dd changed what happens when a loop changes the training state (a parameter "
        "group added, a buffer's shape, lists of tensors in the optimizer state, a state of other groups) and "
        "several processes' checkpoints, which no benchmark loop does; the same 218 rows run under both on one Intel "
        "Xeon (family 6, model 167): the same bit for bit",
    },
    "55fe3620b1a3": {
        "034ac6663276": "e244764 reads whether an Accelerator exists from accelerate's public `is_initialized` and "
        "untangles a branch of `AutoWU.step`; the same 218 rows run under both on one AMD EPYC (family 23, model "
        "49): the same bit for bit",
    },
    "034ac6663276": {
        "b7ff47120d34": "e487c74 made a `step(loss)` call that follows no update under Accelerate (a micro-batch "
        "inside `accelerator.accumulate`, an fp16-skipped update) no step, which no benchmark loop makes; the same "
        "218 rows run under both on one AMD EPYC (family 23, model 49): the same bit for bit",
    },
    "b7ff47120d34": {
        "cea953cbc060": "5354275 and 10a3d70 changed rewind under DeepSpeed and with another process's snapshots "
        "only; 218 rows (the suite's 90 default and paper-preset rows, 48 `autowu_at` rows of two tasks, 80 AutoWU "
        "rows of four held-out tasks) run under both on one AMD EPYC (family 23, model 49): the same bit for bit",
    },
}
"""Per decision fingerprint, older fingerprints whose recorded AutoWU rows still stand for it, each with the check
that showed it: a change to a fingerprinted module that cannot alter what a benchmark run does (DeepSpeed's or
several processes' paths) leaves the rows as they are, and re-running them on another CPU would move them as a
new seed does (float rounding) instead of testing the change. An entry is added only after the same rows were
run under both codes on one CPU and came out bit for bit the same, or after a change that provably leaves all but
some rows as they are (`first_tests_rows.py`) had those rows removed and run again; RESULTS.md's closing note says
which. Entries chain: the same rows bit for bit under A and B, and under B and C, are the same under A and C."""

EMPTY_RESULTS: dict[str, Any] = {"runs": {}, "commands": [], "claims": {}}


def recorded_runs(results_path: Path) -> list[dict[str, Any]]:
    """Every run recorded in `results_path` (a ``quality.json``), read under its lock by `locked_json`, which
    creates the file, empty, when it does not exist yet."""
    with locked_json(results_path, EMPTY_RESULTS) as data:
        return list(data["runs"].values())


_STARTED = time.time()


def run_key(task: str, method: str, seed: int, peak_lr: float | None) -> str:
    """Identifier of one run in the results file."""
    return f"{task}|{method}|{seed}|{'' if peak_lr is None else f'{peak_lr:.3g}'}"


@cache
def library_revision() -> str:
    """The git commit of this checkout, with ``+dirty`` when ``hf_autowu/`` has uncommitted changes."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True).stdout.strip()

    dirty = "+dirty" if git("status", "--porcelain", "hf_autowu") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


PROSE_CALLS = frozenset({"_help", "_flag_help", "warn", "info", "warning", "debug", "error"})
"""Calls whose text arguments are for people (option help, warnings, log lines), not for the decision."""


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


class _DropProse(ast.NodeTransformer):
    """Removes from a syntax tree what is written for people: every statement that is a bare string (docstrings,
    attribute docstrings), and the text arguments of option help, warnings, log calls and raised exceptions."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if isinstance(body, list) and body and all(isinstance(s, ast.stmt) for s in body):
                kept = [s for s in body if not (isinstance(s, ast.Expr) and _is_text(s.value))]
                setattr(node, name, kept or [ast.Pass()])
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in PROSE_CALLS or name.endswith(("Error", "Warning", "Exception")):
            node.args = [ast.Constant("") if _is_text(a) else a for a in node.args]
        return node


@cache
def decision_fingerprint() -> str:
    """A hash of AutoWU's decision code as it is now: the syntax trees of every `hf_autowu` module that can change
    a decision (all but `NOT_DECISION_CODE`), without what is written for people (`_DropProse`: docstrings, option
    help, the text of warnings, log lines and errors), so comments and wording do not count.

    A recorded AutoWU run whose fingerprint differs from this one ran other decision code: the report refuses it.
    """
    digest = hashlib.sha256()
    for path in sorted((REPO / "hf_autowu").glob("*.py")):
        if path.name in NOT_DECISION_CODE:
            continue
        tree = _DropProse().visit(ast.parse(path.read_text()))
        digest.update(path.name.encode() + ast.dump(tree).encode())
    return digest.hexdigest()[:12]


def accepted_fingerprints() -> frozenset[str]:
    """The decision fingerprints whose AutoWU rows stand for the code as it is now: its own, those
    `SAME_DECISIONS_AS` names for it, those it names for them, and so on."""
    accepted, frontier = {decision_fingerprint()}, [decision_fingerprint()]
    while frontier:
        for older in SAME_DECISIONS_AS.get(frontier.pop(), {}):
            if older not in accepted:
                accepted.add(older)
                frontier.append(older)
    return frozenset(accepted)


def has_current_decisions(run: dict[str, Any]) -> bool:
    """Whether a recorded AutoWU run stands for today's decision code (see `accepted_fingerprints`)."""
    return run.get("decision_fingerprint") in accepted_fingerprints()


def decision_code_line() -> str:
    """The decision code a report speaks for (its fingerprint), and the older fingerprints whose rows it accepts,
    for the report's header."""
    older = sorted(accepted_fingerprints() - {decision_fingerprint()})
    if not older:
        return decision_fingerprint()
    return f"{decision_fingerprint()} (rows recorded at {', '.join(older)} stand for it: `runner.SAME_DECISIONS_AS`)"


def _alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def task_of(args: argparse.Namespace, name: str) -> TaskSpec | None:
    """The task ``name`` under these options (the smoke version with ``--smoke``), None if unknown."""
    task = TASKS.get(name)
    return None if task is None else smoke_task(task) if args.smoke else task


def _is_current(run: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether a recorded run still stands: same step count as its task now, and for AutoWU the current decision
    code."""
    task = task_of(args, run["task"])
    if task is None or run["steps"] != m.run_steps(run["method"], task):
        return False
    if run["method"] in m.AUTOWU_METHODS:
        return has_current_decisions(run)
    return True


def claim(results_path: Path, key: str, args: argparse.Namespace) -> bool:
    """Reserve run ``key`` for this process; False when it is done or another live process is running it.

    A recorded run counts as done unless it is stale (see `_is_current`), or ``--redo`` was given and it finished
    before this process started.
    """
    with locked_json(results_path, EMPTY_RESULTS) as data:
        run = data["runs"].get(key)
        if run is not None and _is_current(run, args):
            if not args.redo or run.get("finished", 0.0) >= _STARTED:
                return False
        claims = data.setdefault("claims", {})
        owner = claims.get(key)
        if owner is not None and owner != os.getpid() and _alive(owner):
            return False
        claims[key] = os.getpid()
        return True


def oracle_grid(runs: dict[str, dict[str, Any]], task: TaskSpec, seeds: list[int], smoke: bool) -> list[float]:
    """The oracle's grid for ``task``: 8 points a factor 2 apart around ``task.oracle_center``, plus 2 more past
    each edge that the best point (mean validation metric over ``seeds``) has reached, as far as the recorded
    runs tell."""
    if smoke:
        return [1e-3, 1e-2]
    center = m.grid_index(m.grid_lr(m.grid_index(task.oracle_center)))
    low, high = center - m.GRID_MIN_POINTS // 2, center + m.GRID_MIN_POINTS // 2 - 1
    while True:
        scores = {}
        for k in range(low, high + 1):
            done = [r for r in (runs.get(run_key(task.name, "oracle", s, m.grid_lr(k))) for s in seeds) if r]
            if len(done) < len(seeds):
                return [m.grid_lr(k) for k in range(low, high + 1)]  # the grid so far is not complete yet
            scores[k] = np.mean([score(r["val"], task.metric) for r in done])
        best = max(scores, key=scores.get)
        if best == low:
            low -= 2
        elif best == high:
            high += 2
        else:
            return [m.grid_lr(k) for k in range(low, high + 1)]


def score(value: float | None, metric: str) -> float:
    """Sortable score, higher is better; missing/non-finite values rank last."""
    if value is None or not np.isfinite(value):
        return -np.inf
    return value if metric == "accuracy" else -value


def planned_runs(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> list[tuple]:
    """Every (task, method, seed, grid LR or None) to run now."""
    planned = []
    for task_name in args.tasks:
        task = task_of(args, task_name)
        for seed in args.seeds:
            for method in args.methods:
                grid = oracle_grid(runs, task, args.seeds, args.smoke) if method in m.GRID_METHODS else [None]
                planned += [(task_name, method, seed, lr) for lr in grid]
    return planned


def execute(args: argparse.Namespace, results_path: Path) -> None:
    """Run every planned run that is not in the results file yet (or all of them with ``--redo``); plan again after
    each pass, since a finished grid may grow."""
    with locked_json(results_path, EMPTY_RESULTS) as data:
        command = command_line()
        if command not in data["commands"]:
            data["commands"].append(command)
    done_keys: set[str] = set()
    while True:
        with locked_json(results_path, EMPTY_RESULTS) as data:
            runs = dict(data["runs"])
        planned = [p for p in planned_runs(args, runs) if run_key(*p) not in done_keys]
        if not planned:
            return
        print(f"{len(planned)} runs planned ({results_path})", flush=True)
        for i, (task_name, method, seed, lr) in enumerate(planned, 1):
            key = run_key(task_name, method, seed, lr)
            done_keys.add(key)
            if not claim(results_path, key, args):
                continue
            task = task_of(args, task_name)
            start = time.perf_counter()
            with m.forced_peak_lr(lr) if method == "autowu_at" else contextlib.nullcontext():
                result = task.runner(task, method, seed, lr)
            wall = time.perf_counter() - start
            record = {
                "task": task_name,
                "method": method,
                "seed": seed,
                "grid_lr": lr,
                "metric": task.metric,
                "wall_s": round(wall, 2),
                "revision": library_revision(),
                "decision_fingerprint": decision_fingerprint(),
                "machine": cpu_name(),
                "finished": time.time(),
                **result.__dict__,
            }
            if method in ("autowu", "autowu_at") and m.ABLATION_OPTIONS:
                record["autowu_options"] = dict(m.ABLATION_OPTIONS)
            for name in ("lrs", "losses"):
                record[name] = [float(f"{v:.6g}") for v in record[name]]
            with locked_json(results_path, EMPTY_RESULTS) as data:
                data["runs"][key] = record
                data.setdefault("claims", {}).pop(key, None)
            print(
                f"[{i}/{len(planned)}] {task_name} {method} seed={seed} lr={lr} val={result.val:.4f} "
                f"test={result.test:.4f} {wall:.1f}s {result.info.get('peak_lr', '')}",
                flush=True,
            )
