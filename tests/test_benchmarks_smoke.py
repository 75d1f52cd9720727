"""Smoke test: every benchmark entry point runs end to end in its tiny ``--smoke`` mode.

No timings are asserted (benchmarks are not tests); outputs go to a temporary directory, never to the
committed ``benchmarks/results``.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fine_tune_loss, make_optimizer, processes_running

from hf_autowu import ramp
from hf_autowu.scheduler import SwitchTestRecord

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a benchmark script as a module (they import their sibling ``common``); restore torch threads."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)


def test_quality_smoke(bench, tmp_path: Path) -> None:
    quality = bench("quality")
    methods = bench("methods")
    quality.main(["--smoke", "--tasks", "digits_cnn", "--out-dir", str(tmp_path)])
    # each entry point's code path once: the Accelerate loop, the callback and optim="schedule_free_adamw",
    # optimizer_cls_and_kwargs (Prodigy) and the dict-batch LR range test, AutoWUTrainer, TRL with the mixin
    quality.main(["--smoke", "--tasks", "vit_digits", "--methods", "autowu,ramp", "--out-dir", str(tmp_path)])
    quality.main(["--smoke", "--tasks", "timm_digits", "--methods", "autowu,schedulefree", "--out-dir", str(tmp_path)])
    quality.main(["--smoke", "--tasks", "gpt2_stdlib", "--methods", "prodigy,lr_finder", "--out-dir", str(tmp_path)])
    quality.main(["--smoke", "--tasks", "llama_stdlib", "--methods", "autowu", "--out-dir", str(tmp_path)])
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert {r["method"] for r in runs.values() if r["task"] == "digits_cnn"} == set(methods.METHODS)
    assert len([r for r in runs.values() if r["task"] != "digits_cnn"]) == 7
    for run in runs.values():
        assert len(run["lrs"]) == len(run["losses"]) == run["steps"]
        assert run["compute"] >= run["steps"]
        if run["method"] == "autowu":
            assert run["info"]["switch_step"] is not None
    assert "<!-- quality:begin -->" in (tmp_path / "RESULTS.md").read_text()
    assert {"digits_cnn.png", "timm_digits.png", "gpt2_stdlib.png"} <= {p.name for p in tmp_path.glob("*.png")}
    cpu = bench("common").cpu_name()
    assert cpu and {run["machine"] for run in runs.values()} == {cpu}
    assert f"Runs by CPU: {cpu}: {len(runs)} runs (" in (tmp_path / "RESULTS.md").read_text()


def test_cpus_line_names_each_cpu_and_the_one_before_runs_named_theirs(bench) -> None:
    """Runs recorded without a CPU ran on `UNRECORDED_CPU`; more than one CPU gets the caveat on bit-for-bit runs."""
    common = bench("common")
    one = common.cpus_line([("Intel Xeon", "autowu"), ("Intel Xeon", "oracle"), ("Intel Xeon", "autowu")])
    assert one == "Runs by CPU: Intel Xeon: 3 runs (autowu, oracle)."
    mixed = common.cpus_line([("Intel Xeon", "autowu"), (None, "oracle"), (None, "oracle")])
    assert mixed.startswith(f"Runs by CPU: Intel Xeon: 1 runs (autowu); {common.UNRECORDED_CPU}: 2 runs (oracle). ")
    assert "not come out bit for bit the same" in mixed


def test_rows_of_older_code_stand_only_where_listed_as_deciding_the_same(
    bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AutoWU row recorded at an older fingerprint is refused as stale, unless `SAME_DECISIONS_AS` names that
    fingerprint for today's code (or for one it names, and so on); another code's listing does not count."""
    runner, report = bench("runner"), bench("report")
    current = runner.decision_fingerprint()

    def row(method: str, fingerprint: str | None, seed: int) -> dict:
        return {
            "task": "digits_cnn",
            "method": method,
            "seed": seed,
            "metric": "accuracy",
            "val": 0.9,
            "test": 0.9,
            "compute": 10,
            "wall_s": 1.0,
            "grid_lr": 1e-3,
            "info": {"peak_lr": 1e-3},
            "decision_fingerprint": fingerprint,
        }

    runs = [row("oracle", None, 0), row("autowu", "0ld0ld0ld0ld", 0), row("autowu", "0ther0ther00", 1)]
    monkeypatch.setattr(runner, "SAME_DECISIONS_AS", {})
    summary, stale = report.summarize(runs)
    assert [r["seed"] for r in stale] == [0, 1] and "autowu" not in summary["digits_cnn"]
    assert runner.decision_code_line() == current
    monkeypatch.setattr(runner, "SAME_DECISIONS_AS", {current: {"0ld0ld0ld0ld": "re-run on one CPU: same"}})
    summary, stale = report.summarize(runs)
    assert [r["seed"] for r in stale] == [1] and [r["seed"] for r in summary["digits_cnn"]["autowu"]["runs"]] == [0]
    assert runner.decision_code_line().startswith(f"{current} (rows recorded at 0ld0ld0ld0ld stand for it")
    monkeypatch.setattr(runner, "SAME_DECISIONS_AS", {"n0tcurrent00": {"0ld0ld0ld0ld": "another code's"}})
    assert [r["seed"] for r in report.summarize(runs)[1]] == [0, 1]


def test_quality_ablation_options_reach_autowu_and_are_recorded(bench, tmp_path: Path) -> None:
    quality = bench("quality")
    with pytest.raises(SystemExit):  # ablation rows never go to the committed results
        quality.parse_args(["--autowu-options", '{"max_warmup_fraction": 0.25}'])
    options = ["--autowu-options", '{"max_warmup_fraction": 0.25}', "--out-dir", str(tmp_path)]
    quality.main(["--smoke", "--tasks", "digits_cnn_short", "--methods", "autowu", *options])
    (run,) = json.loads((tmp_path / "quality.json").read_text())["runs"].values()
    assert run["autowu_options"] == {"max_warmup_fraction": 0.25}
    # the ramp took a quarter of the budget, not half: 5 decades in floor(steps / 4) steps
    growth = (1.0 / 1e-5) ** (1.0 / int(0.25 * run["steps"]))
    assert run["lrs"][1] / run["lrs"][0] == pytest.approx(growth, rel=1e-4)
    assert bench("methods").ABLATION_OPTIONS == {}


def test_autowu_at_forces_the_peak_and_scores_the_replayed_decisions(bench, tmp_path: Path) -> None:
    quality = bench("quality")
    methods = bench("methods")
    from hf_autowu import AutoWU

    original_switch = AutoWU._switch
    out = ["--out-dir", str(tmp_path)]
    quality.main(["--smoke", "--tasks", "digits_cnn_short", "--methods", "ramp,oracle,autowu_at", *out])
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"].values()
    forced = [r for r in runs if r["method"] == "autowu_at"]
    oracle_lrs = sorted(r["grid_lr"] for r in runs if r["method"] == "oracle")
    assert sorted(r["grid_lr"] for r in forced) == oracle_lrs  # the oracle's grid, point for point
    for run in forced:
        switch, peak = run["info"]["switch_step"], run["grid_lr"]
        assert run["info"]["peak_lr"] == peak
        # the ramp's LRs before the switch, then the forced peak held until the cooldown
        assert run["lrs"][switch - 1] < 1.0 and run["lrs"][switch] == pytest.approx(peak)
    assert AutoWU._switch is original_switch  # the override does not outlive its run
    assert "| autowu_at |" not in (tmp_path / "RESULTS.md").read_text()  # not a method to compare
    # decisions.py scores replayed LRs with these runs' curve once it covers the oracle's whole grid
    decisions = bench("decisions")
    oracle = decisions.quality_curves(list(runs), "digits_cnn_short")
    curves, source = decisions.scoring_curves(list(runs), "digits_cnn_short", oracle)
    assert source == "autowu_at"
    assert list(curves["val"][1]) == [r["val"] for r in sorted(forced, key=lambda r: r["grid_lr"])]
    _, source = decisions.scoring_curves(
        forced[:1] + [r for r in runs if r["method"] != "autowu_at"], "digits_cnn_short", oracle
    )
    assert source == "oracle"
    assert methods.ABLATION_OPTIONS == {}


def test_rewind_gate_replays_both_outcomes_of_each_run(bench, tmp_path: Path) -> None:
    quality, gate, report = bench("quality"), bench("rewind_gate"), bench("report")
    folders = {}
    for name, shift in (("kept", 1e9), ("restored", 0)):
        folders[name] = tmp_path / name
        options = ["--autowu-options", json.dumps({"rewind_min_shift": shift}), "--out-dir", str(folders[name])]
        quality.main(["--smoke", "--tasks", "digits_cnn_short", "--methods", "autowu", *options])
    quality.main(["--smoke", "--tasks", "digits_cnn_short", "--methods", "oracle", "--out-dir", str(tmp_path)])
    kept, restored = gate.load_runs(folders["kept"]), gate.load_runs(folders["restored"])
    (key,) = kept
    assert kept[key]["info"]["rewound_to"] is None and kept[key]["info"]["kept"]["shift"] > 0
    assert restored[key]["info"]["rewound_to"] is not None and restored[key]["info"]["kept"] is None
    md = tmp_path / "RESULTS.md"
    gate.main(
        ["--kept", str(folders["kept"]), "--restored", str(folders["restored"])]
        + ["--quality", str(tmp_path / "quality.json"), "--results-md", str(md)]
    )
    section = md.read_text().split("<!-- rewind_gate:begin -->")[1]
    summary, _ = report.summarize(list(json.loads((tmp_path / "quality.json").read_text())["runs"].values()))
    oracle = report.mean_std(summary["digits_cnn_short"]["oracle"]["test"])[0]
    for threshold, run in (("0", restored[key]), ("inf", kept[key])):
        expected = report.regret(run["test"], oracle, "accuracy")
        row = next(line for line in section.splitlines() if line.startswith(f"| {threshold} |"))
        assert float(row.split("|")[3]) == pytest.approx(expected, abs=0.006)
    # the default's line: its regret is the row of its threshold (the only run: kept below 0.2 of a shift, else not)
    default_row = next(line for line in section.splitlines() if line.startswith("| 0.2 |"))
    assert f"The default, 0.2: mean regret {float(default_row.split('|')[2]):.2f} (val)" in section


def test_mean_regret_carries_the_standard_error_of_the_seeds(bench) -> None:
    report = bench("report")
    # accuracy: seeds 97, 98, 99% (std 1 pp, n 3) against an oracle at 99%: 1 pp behind = 2 tolerances of 0.5 pp
    accuracy = report.regret_with_error([0.97, 0.98, 0.99], [0.99, 0.99, 0.99], "accuracy")
    assert accuracy == pytest.approx((2.0, 2.0 / 3**0.5))
    # loss: seeds 2.0 and 2.2 (std 0.1414, standard error 0.1) against an oracle at 2.0, whose tolerance is 0.02
    loss = report.regret_with_error([2.0, 2.2], [1.9, 2.1], "loss")
    assert loss == pytest.approx((5.0, 5.0))
    mean, error = report.mean_regret({"digits": accuracy, "text": loss})
    assert mean == pytest.approx(3.5)
    assert error == pytest.approx((4.0 / 3 + 25.0) ** 0.5 / 2)


def test_band_is_the_oracles_spread_not_the_methods(bench) -> None:
    report = bench("report")
    oracle = {"metric": "accuracy", "test": [0.95, 0.95, 0.95]}  # no spread: the band is the 0.5 pp tolerance
    steady = {"metric": "accuracy", "test": [0.946, 0.946, 0.946]}  # 0.4 pp behind
    erratic = {"metric": "accuracy", "test": [0.95, 0.95, 0.80]}  # 5 pp behind on the mean, std 8.7 pp
    assert report.within_band(steady, oracle) == (True, pytest.approx(0.4))
    assert report.within_band(erratic, oracle) == (False, pytest.approx(5.0))
    spread = {"metric": "loss", "test": [2.0, 2.2, 2.4]}  # the oracle's own std (0.2) widens the band past 1%
    assert report.within_band({"metric": "loss", "test": [2.35]}, spread)[0]
    assert not report.within_band({"metric": "loss", "test": [2.45]}, spread)[0]


def test_decisions_replays_smoke_data(bench, tmp_path: Path) -> None:
    """`--smoke` ramps are replayed with the smoke task's budget, so the replayed switch lies within the ramp; the
    held-out tasks' ramps join the suite's in every table, except those of role "unseen", and their LRs are scored
    with their `autowu_at` runs once `holdout.py --at` has recorded them."""
    quality, holdout, decisions = bench("quality"), bench("holdout"), bench("decisions")
    quality.main(["--smoke", "--tasks", "digits_cnn", "--methods", "ramp,oracle", "--out-dir", str(tmp_path)])
    # the regression is an "unseen" task: recorded, but kept out of the replays that choose settings
    assert holdout.main(["--smoke", "--tasks", "mlp_sgd,friedman_mlp_adamw", "--out-dir", str(tmp_path)]) == 0
    runs = list(json.loads((tmp_path / "quality.json").read_text())["runs"].values())
    ramps = [r for r in runs if r["method"] == "ramp"]
    spec = decisions.recorded_spec("digits_cnn", ramps)
    assert spec.steps < decisions.TASKS["digits_cnn"].steps
    paths = ["--results", str(tmp_path / "quality.json"), "--holdout", str(tmp_path / "holdout.json")]
    assert decisions.main([*paths, "--results-md", str(tmp_path / "D.md")]) == 0
    switched = decisions.replay(spec, ramps[0]["losses"])
    assert switched.switch_step is not None and switched.switch_step <= len(ramps[0]["losses"])
    (held_out,) = decisions.held_out_cases(tmp_path / "holdout.json")
    assert held_out["task"] == "mlp_sgd" and held_out["steps"] == 30  # the smoke budget, the only one recorded
    replayed = held_out["replay"](held_out["ramps"][0])
    assert replayed.total_steps == 30 and replayed.switch_step is not None
    section = (tmp_path / "D.md").read_text()
    assert "| digits_cnn | oracle |" in section and "| mlp_sgd (held out) | oracle |" in section
    assert "| mlp_sgd (held out) | " in section.split("### Switch confidence")[1]  # its leave-one-out row
    assert "friedman" not in section
    # with `--at`, AutoWU's own schedule at each grid LR scores the held-out task's replayed LRs, as the suite's
    assert holdout.main(["--smoke", "--tasks", "mlp_sgd", "--at", "mlp_sgd", "--out-dir", str(tmp_path)]) == 0
    (held_out,) = decisions.held_out_cases(tmp_path / "holdout.json")
    assert held_out["source"] == "autowu_at"
    recorded = json.loads((tmp_path / "holdout.json").read_text())["runs"]
    forced = {lr: recorded[f"mlp_sgd|autowu_at {lr:g}|0|30"]["test"] for lr in holdout.TASKS["mlp_sgd"].grid[3:5]}
    assert held_out["scoring"]["test"][1].tolist() == pytest.approx([forced[lr] for lr in sorted(forced)])
    assert held_out["curves"]["test"][1].tolist() != held_out["scoring"]["test"][1].tolist()  # the oracle's stay
    assert decisions.main([*paths, "--results-md", str(tmp_path / "D.md")]) == 0
    assert "| mlp_sgd (held out) | autowu_at |" in (tmp_path / "D.md").read_text()


def test_holdout_smoke(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    holdout = bench("holdout")
    assert holdout.main(["--smoke", "--fractions", "0.1", "--out-dir", str(tmp_path)]) == 0
    section = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- holdout:begin -->" in section
    assert f"Runs by CPU: {bench('common').cpu_name()}: " in section and "(AutoWU, oracle, ramp)" in section
    assert "| defaults (slowed_fraction 0.3) |" in section and "| slowed_fraction 0.1 |" in section
    assert "| always restore (rewind_min_shift 0) |" in section
    assert "| never restore (rewind_min_shift 1e9) |" in section
    assert all(f"### {name}:" in section for name in holdout.TASKS)
    roles = [task.role for task in holdout.TASKS.values()]
    assert f"| mean of {roles.count('fresh')} | fresh |" in section
    assert f"| mean of {roles.count('chosen-on')} | chosen-on |" in section
    assert f"| mean of {roles.count('unseen')} | unseen |" in section
    # every run is recorded, so a second invocation trains nothing and writes the same section
    recorded = json.loads((tmp_path / "holdout.json").read_text())["runs"]
    # every task: 2 grid points, the defaults, the paper preset and the ramp; the first also 2 rewind settings and 0.1
    assert len(recorded) == len(holdout.TASKS) * (2 + 2 + 1) + 3
    assert sum(key.startswith("mlp_sgd|") for key in recorded) == 2 + 5 + 1
    assert "| paper preset |" in section
    # the summary's regret of the default on the MLP: its test accuracy against the grid point best on validation
    grid = [run for key, run in recorded.items() if key.startswith("mlp_sgd|oracle ")]
    oracle = max(grid, key=lambda run: run["val"])["test"]
    default = recorded["mlp_sgd|defaults (slowed_fraction 0.3)|0|30"]["test"]
    assert f"| mlp_sgd | chosen-on | {(oracle - default) * 200:+.2f} |" in section

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(holdout, "run", no_training)
    assert holdout.main(["--smoke", "--fractions", "0.1", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "RESULTS.md").read_text() == section
    # the recorded ramp replayed with the defaults decides as the default run did (the same losses up to its switch)
    capsys.readouterr()
    assert holdout.main(["--smoke", "--out-dir", str(tmp_path), "--tasks", "mlp_sgd", "--replay", "{}"]) == 0
    default = recorded["mlp_sgd|defaults (slowed_fraction 0.3)|0|30"]
    assert (
        f"switch {default['switch_step']} ({default['switch_reason']}) at LR {default['lr']:.3g}"
        in capsys.readouterr().out
    )


def test_holdout_chance_level_of_the_regression_is_predicting_the_mean(bench) -> None:
    """A loss task with its own chance level (the regression's squared error) counts a run at chance against it, not
    against ln 256; the byte-level models keep ln 256."""
    holdout = bench("holdout")
    regression, language_model = holdout.TASKS["friedman_mlp_adamw"], holdout.TASKS["gru_adafactor"]
    splits = holdout.holdout_tasks.friedman_splits()
    y_test, train_mean = splits["test"][1], splits["train"][1].mean()
    chance = float(((y_test - train_mean) ** 2).mean())
    assert 15.0 < chance < 40.0  # the targets' variance (Friedman #1: about 24) plus the offset of the train mean
    assert regression.chance() == pytest.approx(chance)
    assert holdout.at_chance(regression, 0.96 * chance) and not holdout.at_chance(regression, 0.9 * chance)
    assert not holdout.at_chance(regression, 6.0)  # above 0.95 ln 256: the byte-level rule would count it
    assert holdout.at_chance(language_model, 5.3) and not holdout.at_chance(language_model, 5.0)


def test_holdout_refuses_fewer_default_seeds_than_seeds(bench, tmp_path: Path, capsys) -> None:
    holdout = bench("holdout")
    with pytest.raises(SystemExit):
        holdout.main(["--seeds", "3", "--default-seeds", "2", "--out-dir", str(tmp_path)])
    assert "--default-seeds must be at least --seeds (3), got 2" in capsys.readouterr().err
    assert not (tmp_path / "holdout.json").exists()


def test_holdout_grid_grows_past_a_best_point_at_its_edge(bench) -> None:
    """As `quality.py`'s oracle: the next grid point (a factor 2 on) beyond a best point at either end, else None."""
    holdout = bench("holdout")
    accuracy_task, loss_task = holdout.TASKS["mlp_sgd"], holdout.TASKS["gru_adafactor"]
    lrs = [0.0128, 0.0256, 0.0512]

    def runs(values):
        return {lr: [{"val": v}] for lr, v in zip(lrs, values, strict=True)}

    assert holdout.best_at_edge(accuracy_task, runs([0.5, 0.6, 0.7])) == 0.102
    assert holdout.best_at_edge(accuracy_task, runs([0.7, 0.6, 0.5])) == 0.0064
    assert holdout.best_at_edge(accuracy_task, runs([0.5, 0.7, 0.6])) is None
    assert holdout.best_at_edge(loss_task, runs([3.0, 2.0, 1.0])) == 0.102  # lower loss is better


def test_overhead_smoke(bench, tmp_path: Path) -> None:
    overhead = bench("overhead")
    overhead.main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert {r["implementation"] for r in data["switch_test"]["rows"]} == set(overhead.IMPLEMENTATIONS)
    rows = {r["variant"]: r for r in data["end_to_end"]["rows"]}
    assert set(rows) == set(overhead.E2E_VARIANTS)
    # the figure is timed apart from the switch tests, and drawn only in its own variant
    assert rows["trainer_figure"]["figures"] >= 1 and rows["trainer_figure"]["figure_s"] > 0
    assert rows["trainer"]["figures"] == rows["callback"]["figures"] == rows["constant"]["figures"] == 0
    assert rows["trainer"]["switch_tests"] >= 1 and rows["constant"]["switch_tests"] == 0
    assert "<!-- overhead:begin -->" in (tmp_path / "RESULTS.md").read_text()


def test_gpu_overhead_refuses_without_cuda_or_runs(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gpu_overhead = bench("gpu_overhead")
    if torch.cuda.is_available():
        assert gpu_overhead.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    else:
        assert gpu_overhead.main(["--out-dir", str(tmp_path)]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "gpu_overhead.json").exists()


def test_gpu_overhead_cpu_dry_run(bench, tmp_path: Path) -> None:
    gpu_overhead = bench("gpu_overhead")
    assert gpu_overhead.main(["--device", "cpu", "--smoke", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_overhead.json").read_text())
    assert {r["variant"] for r in data["throughput"]} == set(gpu_overhead.VARIANTS)
    # step by step: the constant LR does nothing but steps; AutoWU snapshots on its first step (LR milestones)
    kinds = data["steps_by_kind"]
    assert set(kinds["constant"]) == {"ordinary"} and kinds["constant"]["ordinary"]["steps"] == data["profile_steps"]
    assert sum(row["steps"] for row in kinds["autowu_tests"].values()) == data["profile_steps"]
    assert kinds["autowu_tests"]["snapshot"]["steps"] >= 1 and kinds["autowu_tests"]["ordinary"]["steps"] >= 1


def test_relay_overhead_smoke(bench, tmp_path: Path) -> None:
    relay_overhead = bench("relay_overhead")
    assert relay_overhead.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "relay_overhead.json").read_text())
    (size,) = data["sizes"].values()
    assert size["ranks_agree"] and size["mean_in_flight_exact"]
    assert set(size["variants"]) == set(relay_overhead.VARIANTS)
    for row in size["variants"].values():
        assert row["steps_per_s"] > 0
        assert all(row["scheduler_step_ms"][kind] > 0 for kind in relay_overhead.KINDS)
    assert "<!-- relay_overhead:begin -->" in (tmp_path / "RESULTS.md").read_text()


def test_relay_overhead_refuses_without_the_gpus_it_needs(bench, tmp_path: Path) -> None:
    relay_overhead = bench("relay_overhead")
    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs are here: the real run is `python benchmarks/relay_overhead.py --device cuda`")
    assert relay_overhead.main(["--device", "cuda", "--out-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "relay_overhead.json").exists()


def test_gpu_checks_refuses_without_cuda(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gpu_checks = bench("gpu_checks")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real checks are `python benchmarks/gpu_checks.py`")
    assert gpu_checks.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_gpu_checks_cpu_dry_run(bench, tmp_path: Path) -> None:
    """One Trainer run of each part (unsharded on a CPU; DeepSpeed with DS_ACCELERATOR=cpu), resumed, reported."""
    gpu_checks = bench("gpu_checks")
    assert gpu_checks.main(["--device", "cpu", "--smoke", "--out-dir", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "gpu_checks.json").read_text())["runs"]
    assert set(runs) == {"fsdp-callback", "deepspeed-trainer-optimizer"}
    assert all(run["ok"] and run["checks"]["resume_exact"] for run in runs.values())
    assert runs["deepspeed-trainer-optimizer"]["checks"]["rewind_on"]
    assert all(run["checks"]["rewind_restored_bit_for_bit"] for run in runs.values())
    assert "<!-- gpu_checks:begin -->" in (tmp_path / "RESULTS.md").read_text()


def test_gpu_checks_part_past_its_timeout_fails_and_leaves_no_worker_running(bench, tmp_path: Path) -> None:
    """A part cut by `--part-timeout` is a failed check with its log, and the worker torch.distributed.run started is
    ended with it (it would otherwise go on training beside the next part)."""
    gpu_checks = bench("gpu_checks")
    assert gpu_checks.main(["--device", "cpu", "--smoke", "--part-timeout", "6", "--out-dir", str(tmp_path)]) == 1
    runs = json.loads((tmp_path / "gpu_checks.json").read_text())["runs"]
    assert set(runs) == {"fsdp-worker", "deepspeed-worker"}
    assert all(not run["ok"] and run["error"].startswith("timed out after 6 s") for run in runs.values())
    assert (tmp_path / "gpu_checks_fsdp.log").read_text().startswith("timed out after 6 s\n")
    assert "| fsdp-worker | **error** |" in (tmp_path / "RESULTS.md").read_text()
    assert processes_running("--worker", str(tmp_path)) == []


def test_gpu_checks_rewind_check_fails_only_when_rewind_was_turned_off(bench) -> None:
    """On the H200 the DeepSpeed runs with an `optimizer` section restored the oldest snapshot with a warning (every
    kept one had trained above the chosen LR): rewind ran, so the check passes; a warning that rewind is off, or
    another mode, fails it."""
    gpu_checks = bench("gpu_checks")
    ran = {"rewind_enabled": True, "rewind_mode": "sharded"}
    oldest = "AutoWU rewind: every kept snapshot was trained with LRs above the chosen one; restoring the oldest."
    assert gpu_checks.rewind_on(ran, "sharded", []) and gpu_checks.rewind_on(ran, "sharded", [oldest])
    assert not gpu_checks.rewind_on(ran, "replicated", [])
    off = "AutoWU rewind is off: NVMe offload. Training goes on without rewind."
    assert not gpu_checks.rewind_on({"rewind_enabled": False, "rewind_mode": "sharded"}, "sharded", [off])
    assert not gpu_checks.rewind_on(ran, "sharded", [off])


def test_sharpness_probe_finds_the_top_eigenvalue_of_the_preconditioned_hessian(bench) -> None:
    """The probe's Lanczos estimate against the dense Hessian of a tiny MLP (an indefinite Hessian: the largest
    eigenvalue algebraically, not in magnitude), preconditioned by Adam's denominators; and its one-step line search
    never ends above the loss it starts from."""
    probe = bench("sharpness_probe")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    params, denominators = probe.adam_denominators(model, optimizer)
    names = [name for name, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def loss_of(vector):
        pieces = vector.split([p.numel() for p in params])
        pieces = {name: v.view(p.shape) for name, v, p in zip(names, pieces, params, strict=True)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, pieces, (x.double(),)), y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    scale = torch.cat([d.reshape(-1) for d in denominators]).double().rsqrt()
    spectrum = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])
    assert spectrum.min() < 0 < spectrum.max()
    sharpness = probe.preconditioned_sharpness(model, optimizer, x, y, tol=1e-8)
    assert sharpness == pytest.approx(spectrum.max().item(), rel=1e-3)

    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    greedy = probe.greedy_lr(model, optimizer, x, y, batches)
    assert greedy["greedy_lr"] in probe.GREEDY_GRID and greedy["greedy_lr_noiseless"] in probe.GREEDY_GRID
    assert min(greedy["clean_curve"]) <= greedy["start_loss"] and min(greedy["noisy_curve"]) <= greedy["start_loss"]


def test_post_switch_backs_off_where_the_loss_rises_after_the_switch(bench) -> None:
    """The back-off rule of `post_switch.py`: a rising post-switch loss halves the LR (scored on the curve at half the
    LR), a falling one leaves it; the slope statistic's sign and scale follow a line with known noise."""
    import numpy as np

    post_switch = bench("post_switch")
    rng = np.random.default_rng(0)
    noise = 0.01 * rng.standard_normal(40)
    switch = 5
    falling = [None] * switch + list(1.0 - 0.01 * np.arange(40) + noise)
    rising = [None] * switch + list(1.0 + 0.01 * np.arange(40) + noise)
    assert post_switch.slope_t(falling, switch, 20) < -10 < 10 < post_switch.slope_t(rising, switch, 20)
    assert np.isnan(post_switch.slope_t([None] * 10, 0, 10))  # too few finite losses to fit a line

    grid = np.log2([0.01, 0.02, 0.04])
    accuracy = np.array([0.9, 0.8, 0.5])  # the best peak is the lowest LR
    case = {
        "grid": grid,
        "at": {
            (0, 0): {"losses": falling, "info": {"switch_step": switch}},
            (0, 1): {"losses": falling, "info": {"switch_step": switch}},
            (0, 2): {"losses": rising, "info": {"switch_step": switch}},
        },
        "seeds": [0],
        "chosen": {0: 0.04, 1: 0.01},  # seed 1 reads seed 0's runs
        "scoring": {"val": (grid, accuracy), "test": (grid, accuracy)},
        "best": {"val": 0.9, "test": 0.9},
        "metric": "accuracy",
    }
    off = post_switch.replay_rule(case, None, 2.0)
    on = post_switch.replay_rule(case, 20, 2.0)
    # off: regret of 0.5 and 0.9 against 0.9, in units of 0.5 pp: (80 + 0) / 2; on: 0.04 backs off once to 0.02
    assert off["test"] == pytest.approx(40.0) and off["backed_off"] == 0
    assert on["test"] == pytest.approx(10.0) and on["backed_off"] == 1


def test_post_switch_trial_keeps_the_neighbour_with_the_lowest_loss(bench) -> None:
    """The comparing trial of `post_switch.py`: of the chosen LR's grid neighbours, the one whose first `k`
    post-switch losses have the lowest mean is kept (scored on the curve there); read on successive seeds' runs, each
    candidate's loss comes from another seed; with no trial the chosen LR stays."""
    import numpy as np

    post_switch = bench("post_switch")
    switch = 3
    grid = np.log2([0.01, 0.02, 0.04])
    accuracy = np.array([0.9, 0.8, 0.5])

    def run(level: float) -> dict:
        return {"losses": [None] * switch + [level] * 10 + [100.0] * 10, "info": {"switch_step": switch}}

    case = {
        "grid": grid,
        # seed 0: the lowest LR trains best over the first steps; seed 1: the highest
        "at": {(0, 0): run(0.5), (0, 1): run(1.0), (0, 2): run(2.0), (1, 0): run(3.0), (1, 1): run(2.0)}
        | {(1, 2): run(0.1)},
        "seeds": [0, 1],
        "chosen": {0: 0.02},
        "scoring": {"val": (grid, accuracy), "test": (grid, accuracy)},
        "best": {"val": 0.9, "test": 0.9},
        "metric": "accuracy",
    }
    assert post_switch.mean_loss([None, 1.0, 3.0, None], 0, 4) == 2.0
    assert post_switch.mean_loss([None, None], 0, 2) == math.inf
    none = post_switch.replay_trial(case, None, (0,), False)
    assert none["test"] == pytest.approx(20.0) and none["moved"] == 0  # 0.8 against 0.9, in units of 0.5 pp
    same = post_switch.replay_trial(case, 10, (-1, 0, 1), False)
    assert same["test"] == pytest.approx(0.0) and same["moved"] == 1  # x1/2 has the lowest loss on seed 0
    # on successive seeds: x1/2 read on seed 0 (0.5), x1 on seed 1 (2.0), x2 on seed 0 (2.0): x1/2 again
    assert post_switch.replay_trial(case, 10, (-1, 0, 1), True)["test"] == pytest.approx(0.0)
    # x1 on seed 0 (1.0) and x2 on seed 1 (0.1): x2, where the accuracy is 0.5
    assert post_switch.replay_trial(case, 10, (0, 1), True)["test"] == pytest.approx(80.0)
    # a candidate off the grid is not tried: at the grid's top, x2 does not exist and x1 stays
    top = case | {"chosen": {0: 0.04}}
    assert post_switch.replay_trial(top, 10, (0, 1), False)["moved"] == 0


def test_decision_fingerprint_ignores_prose_and_sees_code(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rewording an option's help, a warning, an error or an attribute docstring keeps every recorded AutoWU row
    current; changing a constant or a string the code compares with does not."""
    import shutil

    import hf_autowu

    runner = bench("runner")
    assert runner.REPO / "hf_autowu" == Path(hf_autowu.__file__).resolve().parent  # the code the runs import
    shutil.copytree(BENCH_DIR.parent / "hf_autowu", tmp_path / "hf_autowu")
    monkeypatch.setattr(runner, "REPO", tmp_path)

    def fingerprint_after(path: str, old: str, new: str) -> str:
        file = tmp_path / "hf_autowu" / path
        text = file.read_text()
        assert old in text
        file.write_text(text.replace(old, new, 1))
        runner.decision_fingerprint.cache_clear()
        try:
            return runner.decision_fingerprint()
        finally:
            file.write_text(text)

    runner.decision_fingerprint.cache_clear()
    current = runner.decision_fingerprint()
    prose = [
        ("config.py", '_help("Learning rate at the start of warmup.")', '_help("The ramp\'s first LR.")'),
        ("switch_test.py", '"AutoWU: the GP fit diverged numerically;', '"AutoWU: GP fit failed;'),
        ("switch_test.py", '"""A change of the smoothed loss counts as real', '"""A smoothed change counts as real'),
        ("config.py", 'raise ValueError(f"`test_lr_growth` must be', 'raise ValueError(f"`test_lr_growth` should be'),
    ]
    for edit in prose:
        assert fingerprint_after(*edit) == current, edit
    code = [
        ("switch_test.py", "CONFIDENT_CHANGE_SD = 3.0", "CONFIDENT_CHANGE_SD = 3.5"),
        ("ramp.py", 'if warmup_type == "exp":', 'if warmup_type == "expo":'),
    ]
    for edit in code:
        assert fingerprint_after(*edit) != current, edit
    runner.decision_fingerprint.cache_clear()


def test_pretraining_the_cached_base_model_leaves_the_callers_random_draws_alone(
    bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first run that needs the fine-tuning tasks' base model pretrains it (it seeds itself); the run's own
    draws after it are those of a run that found it cached."""
    tasks = bench("tasks")
    monkeypatch.setattr(tasks, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(tasks, "PRETRAIN_RECIPE", {**tasks.PRETRAIN_RECIPE, "steps": 2, "warmup": 1})
    draws = []
    for _ in range(2):  # pretrained and cached, then loaded
        torch.manual_seed(0)
        tasks.pretrained_gpt2()
        draws.append(torch.rand(4))
    assert len(list(tmp_path.glob("gpt2_stdlib_pretrained_*.pt"))) == 1
    assert torch.equal(draws[0], draws[1])


def test_transfer_task_fine_tunes_the_base_pretrained_on_the_other_digits_under_a_new_head(
    bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`timm_transfer_adamw`: the base model sees the digits 0-4 only; the fine-tune starts from its cached weights,
    every one but the head's, and learns the digits 5-9 relabelled 0-4."""
    tasks, holdout_tasks = bench("tasks"), bench("holdout_tasks")
    halves = holdout_tasks.digit_halves()
    for split, (x, y) in holdout_tasks.digits_16px().items():
        source, target = halves["source"][split], halves["target"][split]
        assert torch.equal(source[0], x[y < 5]) and torch.equal(source[1], y[y < 5])
        assert torch.equal(target[0], x[y >= 5]) and torch.equal(target[1], y[y >= 5] - 5)
        assert set(source[1].tolist()) == set(target[1].tolist()) == set(range(5))
    monkeypatch.setattr(tasks, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(holdout_tasks, "TRANSFER_RECIPE", {**holdout_tasks.TRANSFER_RECIPE, "steps": 3, "warmup": 1})
    monkeypatch.setattr(holdout_tasks, "PRETRAINED", True)  # holdout.py --smoke turns it off in this process
    model, _ = holdout_tasks.timm_transfer_adamw(1e-3)
    (cached,) = tmp_path.glob("resnet_digits_0to4_*.pt")
    base, state = torch.load(cached, weights_only=True), model.state_dict()
    assert all(torch.equal(state[name], base[name]) for name in state if not name.startswith("fc."))
    assert not torch.equal(state["fc.weight"], base["fc.weight"])  # a new head, drawn afresh
    torch.manual_seed(holdout_tasks.TRANSFER_RECIPE["seed"])
    initial = holdout_tasks.resnet_for_halves().state_dict()
    assert not torch.equal(initial["conv1.0.weight"], base["conv1.0.weight"])  # the base was trained, not just drawn


def test_rule_probes_feed_logs_cap_blow_ups_and_pick_by_leaving_one_task_out(bench) -> None:
    """The probe feeds the log of each loss (NaN where there is none), scales the LR chosen, caps the LR after a
    blow-up, counts only tests that saw a real descent and reads the estimate some steps earlier on the ramp, each
    only inside its context, and its leave-one-task-out
    pick on each fold is the variant with the lower mean validation regret on the other tasks, never using the
    unseen ones."""
    probe = bench("rule_probes")
    assert probe.scale("x 1.4") == 1.4 and probe.scale("cap 10") == 1.0 and probe.fed([2.0], "x 2") == [2.0]
    assert probe.fed([math.e, None, 1.0], "log")[0] == pytest.approx(1.0)
    assert math.isnan(probe.fed([math.e, None, 1.0], "log")[1]) and probe.fed([2.0], "loss") == [2.0]

    original = probe.AutoWU._lr_after_blow_up
    scheduler = probe.AutoWU(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=100)
    uncapped = scheduler._lr_after_blow_up(5e-5)  # before any test: the estimate is the ramp's start, 1e-5
    assert uncapped == pytest.approx(1e-5)
    with probe.blow_up_cap("cap 10"):
        assert scheduler._lr_after_blow_up(5e-5) == pytest.approx(5e-6)  # a tenth of the LR that blew up
    assert probe.AutoWU._lr_after_blow_up is original and scheduler._lr_after_blow_up(5e-5) == uncapped

    # a flat, noisy curve with a dip in it: its minimum is noise, so under "descended" no test counts
    generator = torch.Generator().manual_seed(0)
    flat = (2.0 + 0.1 * torch.randn(60, generator=generator, dtype=torch.float64)).index_put_(
        (torch.arange(14, 18),), torch.tensor(1.85, dtype=torch.float64)
    )
    tester = probe.SwitchTester(confidence=0.95, n_tests=5, standardize_losses=True, seed=0)
    plain = tester.run(flat, current_lr=1e-3, min_lr=1e-7, warmup_type="exp")
    assert not plain.descended and plain.resolved
    with probe.patched("descended"):
        tester = probe.SwitchTester(confidence=0.95, n_tests=5, standardize_losses=True, seed=0)
        assert not tester.run(flat, current_lr=1e-3, min_lr=1e-7, warmup_type="exp").resolved
    tester = probe.SwitchTester(confidence=0.95, n_tests=5, standardize_losses=True, seed=0)
    assert tester.run(flat, current_lr=1e-3, min_lr=1e-7, warmup_type="exp").resolved  # the patch is undone

    # a U-shaped curve, minimum near step 30 of 60: four steps earlier on a ramp from 1e-7 to 1e-3 is the estimate
    # times (1e-3 / 1e-7) ** (-4 / 60), the ramp's growth over four of its steps
    valley = torch.linspace(-1.0, 1.0, 60, dtype=torch.float64) ** 2 + 0.01 * torch.randn(
        60, generator=generator, dtype=torch.float64
    )

    def estimate() -> float:
        tester = probe.SwitchTester(confidence=0.95, n_tests=5, standardize_losses=True, seed=0)
        return tester.run(valley, current_lr=1e-3, min_lr=1e-7, warmup_type="exp").lr_estimate

    plain_estimate = estimate()
    with probe.patched("lag 4"):
        lagged_estimate = estimate()
    assert lagged_estimate == pytest.approx(plain_estimate * 1e4 ** (-4 / 60), rel=1e-9)
    assert estimate() == plain_estimate and probe.switch_test.lr_at_fraction is ramp.lr_at_fraction

    # `mean K`: a switch by the test decays from the geometric mean of the last K tests' finite estimates
    def switched(reason: str, variant: str) -> float:
        scheduler = probe.AutoWU(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=200)
        estimates = (1e-3, 4e-3, 2e-3, math.nan, 8e-3)
        scheduler.tests = [SwitchTestRecord(20 + i, 0.5, 3, True, e, 1e-2) for i, e in enumerate(estimates)]
        with probe.patched(variant):
            scheduler._switch(30, 8e-3, reason=reason)
        return scheduler.peak_lr

    assert switched("test", "mean 3") == pytest.approx(4e-3, rel=1e-12)  # sqrt(2e-3 * 8e-3): the NaN left out
    assert switched("test", "mean 5") == pytest.approx((1e-3 * 4e-3 * 2e-3 * 8e-3) ** 0.25, rel=1e-12)
    assert switched("spike", "mean 5") == switched("test", "loss") == pytest.approx(8e-3)
    assert probe.AutoWU._switch.__qualname__ == "AutoWU._switch"  # the patch is undone

    def row(group: str, loss: float, log: float) -> dict:
        return {
            "group": group,
            "loss": {"val": loss, "test": loss, "lrs": [1e-3]},
            "log": {"val": log, "test": log, "lrs": [2e-3]},
        }

    # the log scale wins on "a" only; the unseen task would tip every fold to it if it counted
    rows = {"a": row("suite", 5.0, 1.0), "b": row("suite", 1.0, 2.0), "c": row("held out", 1.0, 2.0)}
    rows["u"] = row("unseen", 100.0, 0.0)
    lines = probe.table(rows)
    # folds: a left out -> b, c prefer loss (test 5.0); b out -> a, c: loss 3.0 vs log 1.5 -> log (test 2.0);
    # c out -> a, b: log (test 2.0); mean 3.0, against 7/3 with the defaults held fixed
    assert "- leaving one of 3 tasks out: picks log, loss; mean test regret on the left-out tasks 3.00" in lines[-1]
    assert "(the defaults held fixed: 2.33)" in lines[-1]
    assert "- unseen (1 tasks), mean test regret: loss 100.00, log 0.00" in lines


def test_holdout_baselines_are_the_range_tests_and_schedule_free_as_users_run_them(bench, tmp_path: Path) -> None:
    """`--baselines`: each range-test rule's row is the oracle's schedule trained from the same start to the LR its
    sweep (the task's optimizer) suggested, the same run as a grid point at that LR; Schedule-Free's row is the task's
    model trained by Schedule-Free AdamW at its package defaults and scored with its eval weights, as a plain loop
    written here gets it; the summary gets a column per baseline."""
    holdout, methods = bench("holdout"), bench("methods")
    from schedulefree import AdamWScheduleFree

    args = ["--smoke", "--tasks", "mlp_sgd", "--out-dir", str(tmp_path), "--results-md", str(tmp_path / "R.md")]
    assert holdout.main([*args, "--baselines"]) == 0
    recorded = json.loads((tmp_path / "holdout.json").read_text())["runs"]
    task, lrs = holdout.TASKS["mlp_sgd"], {}
    for label in ("range test (steepest)", "range test (min/10)"):
        finder = holdout.BASELINES[label]
        row = recorded[f"mlp_sgd|{label}|0|30"]
        suggestion, sweep_steps = holdout.range_test_peak(task, 0, finder)
        assert row["lr"] == suggestion and row["sweep_steps"] == sweep_steps <= holdout.FINDER_ITERS
        assert 1e-7 < suggestion < 10.0
        again = holdout.run(task, 30, 0, suggestion)
        assert (again["val"], again["test"]) == (row["val"], row["test"])
        lrs[finder] = suggestion
    assert lrs["lr_finder"] != lrs["lr_finder_min10"]

    torch.manual_seed(0)
    model, _ = task.build(1.0)
    optimizer = AdamWScheduleFree(model.parameters(), lr=2.5e-3, warmup_steps=methods.warmup_steps(30))
    stream = task.batches(0)
    model.train()
    optimizer.train()
    for _ in range(30):
        loss = task.loss(model, next(stream))
        optimizer.zero_grad()
        loss.backward()
        assert task.max_grad_norm is None  # the task does not clip
        optimizer.step()
    optimizer.eval()
    model.eval()
    with torch.no_grad():
        val, test = task.score(model)
    row = recorded["mlp_sgd|Schedule-Free AdamW|0|30"]
    assert (row["val"], row["test"], row["lr"]) == (val, test, 2.5e-3)

    section = (tmp_path / "R.md").read_text()
    assert "| default | paper preset | range test (steepest) | range test (min/10) | Schedule-Free AdamW |" in section
    assert "- LR range test (min/10), with the task's optimizer" in section
    assert "- Schedule-Free AdamW at its package defaults (LR 0.0025, 5% warmup), not the task's optimizer" in section
    # without the flag the recorded rows are reported, none is run again
    before = (tmp_path / "holdout.json").read_text()
    assert holdout.main(args) == 0
    assert "| range test (steepest) | range test (min/10) | Schedule-Free AdamW |" in (tmp_path / "R.md").read_text()
    assert (tmp_path / "holdout.json").read_text() == before


def test_holdout_compares_the_default_with_each_setting_task_by_task(bench) -> None:
    """The held-out summary's all-task lines: mean and median regret per setting (over the tasks that have it), and
    the default minus each other setting on the tasks both have, with the standard error of those differences."""
    holdout = bench("holdout")
    summary = {
        "a": ("fresh", {"default": (1.0, 0), "x": (3.0, 0)}),
        "b": ("unseen", {"default": (5.0, 0), "x": (2.0, 1)}),
        "c": ("fresh", {"default": (0.0, 0)}),
    }
    lines = holdout.all_task_comparison(summary, ["default", "x"])
    assert "- default: +2.00 (+1.00)" in lines
    assert "- x: +2.50 (+2.50) (2 tasks)" in lines
    # differences -2 and +3: mean 0.5, sample std sqrt(12.5), standard error sqrt(12.5 / 2) = 2.5
    assert "- default minus x: +0.50 ± 2.50 (2 tasks: ahead on 1, behind on 1)" in lines


def test_holdout_pools_the_suites_rows_with_their_regret_against_the_suites_oracle(bench, tmp_path: Path) -> None:
    """The suite's tasks join the held-out summary (role `suite`) under this report's labels, each method's regret
    against the suite's oracle (its best grid LR on validation) and its runs at chance; stale AutoWU rows are refused;
    no results file, no rows."""
    holdout, runner = bench("holdout"), bench("runner")

    def row(method: str, seed: int, test: float, val: float = 0.5, lr: float | None = None, fp=None) -> dict:
        return {
            "task": "digits_cnn",
            "method": method,
            "seed": seed,
            "metric": "accuracy",
            "val": val,
            "test": test,
            "compute": 10,
            "wall_s": 1.0,
            "grid_lr": lr,
            "info": {},
            "decision_fingerprint": fp,
        }

    current = runner.decision_fingerprint()
    runs = [
        row("oracle", 0, 0.90, val=0.9, lr=1e-3),  # the best point on validation: its test, 90%, is the oracle's
        row("oracle", 0, 0.99, val=0.1, lr=1e-2),
        row("autowu", 0, 0.88, fp=current),
        row("autowu", 1, 0.86, fp=current),  # mean 87%: 3 pp behind, 6 tolerances of 0.5 pp
        row("autowu", 2, 0.10, fp="0ld0ld0ld0ld"),  # other decision code: refused
        row("schedulefree", 0, 0.91),  # 1 pp ahead: -2
        row("lr_finder", 0, 0.10),  # at chance: 80 pp behind, 160
        row("prodigy", 0, 0.5),  # no label in the held-out report: left out
    ]
    (tmp_path / "quality.json").write_text(json.dumps({"runs": {str(i): r for i, r in enumerate(runs)}}))
    rows = holdout.suite_outcomes(tmp_path / "quality.json", "default")
    assert rows == {
        "digits_cnn": (
            "suite",
            {
                "default": (pytest.approx(6.0), 0),
                "Schedule-Free AdamW": (pytest.approx(-2.0), 0),
                "range test (steepest)": (pytest.approx(160.0), 1),
            },
        )
    }
    assert holdout.suite_outcomes(tmp_path / "missing.json", "default") == {}


def test_holdout_recalibrates_batchnorm_under_schedule_frees_eval_weights(bench) -> None:
    """Before Schedule-Free's eval weights are scored, a BatchNorm model's running statistics are recomputed with
    them (forward passes only: the weights stay as they are); a model without BatchNorm is left alone."""
    holdout = bench("holdout")
    task = holdout.TASKS["bn_cnn_nesterov"]
    torch.manual_seed(0)
    model, _ = task.build(0.1)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and all(float(bn.running_mean.abs().max()) == 0.0 for bn in norms)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    holdout.recalibrate_batchnorm(model, task, task.batches(0), batches=7)
    assert all(int(bn.num_batches_tracked) == 7 and float(bn.running_mean.abs().max()) > 0.0 for bn in norms)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

    plain = holdout.TASKS["mlp_sgd"]
    mlp, _ = plain.build(0.1)
    stream, fresh = plain.batches(0), plain.batches(0)
    holdout.recalibrate_batchnorm(mlp, plain, stream)
    assert all(torch.equal(a, b) for a, b in zip(next(stream), next(fresh), strict=True))


def test_holdout_at_forces_the_peak_after_autowus_own_switch(bench, tmp_path: Path, capsys) -> None:
    """`--at`: AutoWU runs at each grid LR as its peak; the runs switch where the default run of the same seed does
    (the peak only changes what follows the switch), decay from the forced LR, and the task's section lists them."""
    holdout = bench("holdout")
    assert holdout.main(["--smoke", "--tasks", "mlp_sgd", "--at", "mlp_sgd", "--out-dir", str(tmp_path)]) == 0
    recorded = json.loads((tmp_path / "holdout.json").read_text())["runs"]
    default = recorded["mlp_sgd|defaults (slowed_fraction 0.3)|0|30"]
    forced = {key: run for key, run in recorded.items() if key.startswith("mlp_sgd|autowu_at ")}
    grid = sorted(float(key.split("|")[1].split()[1]) for key in recorded if key.startswith("mlp_sgd|oracle "))
    assert sorted(run["lr"] for run in forced.values()) == pytest.approx(grid) and default["lr"] not in grid
    assert all(run["switch_step"] == default["switch_step"] for run in forced.values())
    assert all(run["switch_reason"] == default["switch_reason"] for run in forced.values())
    section = (tmp_path / "RESULTS.md").read_text()
    assert "AutoWU's schedule with its peak forced to each grid LR (`--at`; test): " in section
    with pytest.raises(SystemExit):
        holdout.main(["--smoke", "--tasks", "mlp_sgd", "--at", "gru_adamw", "--out-dir", str(tmp_path)])
    assert "--at ['gru_adamw'] must be among --tasks ['mlp_sgd']" in capsys.readouterr().err


def test_bad_batch_smoke(bench, tmp_path: Path) -> None:
    """The short digits task with step 5's labels all masked: the run retries that NaN and ends far above chance
    (before the retry it decayed from `min_lr`: about 20%); the section has its row."""
    bad_batch = bench("bad_batch")
    bad_batch.main(["--smoke", "--out-dir", str(tmp_path), "--label", "now"])
    runs = json.loads((tmp_path / "bad_batch.json").read_text())["runs"]
    masked = runs["now|digits_cnn_short|5|0"]
    assert masked["retried"]["loss_index"] == 5 and masked["switch_reason"] != "divergence"
    assert masked["test"] > 0.9
    section = (tmp_path / "RESULTS.md").read_text().split("<!-- bad-batch:begin -->")[1]
    assert "| digits_cnn_short | 5 | " in section and "| digits_cnn_short | 40 |" not in section


def test_short_budget_smoke(bench, tmp_path: Path) -> None:
    """The short digits task cut to 30 steps: the ramp's cap comes before any switch test, and the run decays from a
    tenth of the LR at the lowest warmup loss instead of holding the LR reached (0.46, which left it at chance)."""
    short_budget = bench("short_budget")
    short_budget.main(["--smoke", "--out-dir", str(tmp_path), "--label", "now"])
    row = json.loads((tmp_path / "short_budget.json").read_text())["runs"]["now|digits_cnn_short|0"]
    assert row["switch_step"] == 15 and row["switch_reason"] == "cap"
    assert row["peak_lr"] < 0.05 and row["test"] > 0.5
    section = (tmp_path / "RESULTS.md").read_text().split("<!-- short-budget:begin -->")[1]
    assert "| digits_cnn_short | " in section and "| timm_digits |" not in section
    # another budget: its own rows and its own table, the 30-step one kept
    short_budget.main(["--smoke", "--out-dir", str(tmp_path), "--label", "now", "--steps", "44"])
    runs = json.loads((tmp_path / "short_budget.json").read_text())["runs"]
    assert runs["now|digits_cnn_short|0@44"]["steps"] == 44 and "now|digits_cnn_short|0" in runs
    assert runs["now|digits_cnn_short|0@44"]["switch_step"] >= 20  # a switch test (20 losses) came first
    section = (tmp_path / "RESULTS.md").read_text().split("<!-- short-budget:begin -->")[1]
    assert section.index("**30 steps**") < section.index("**44 steps**")
    with pytest.raises(SystemExit):
        short_budget.main(["--smoke", "--out-dir", str(tmp_path), "--steps", "30,x"])
    # under a rule probe's patch: `lag K` reads the estimate K steps of the ramp earlier, so at the same switch the
    # peak is the plain one over the ramp's growth per step to the K-th power (lag 4: lag 2's factor squared)
    short_budget.main(["--smoke", "--out-dir", str(tmp_path), "--steps", "44", "--probe", "lag 2"])
    short_budget.main(["--smoke", "--out-dir", str(tmp_path), "--steps", "44", "--probe", "lag 4", "--label", "l4"])
    runs = json.loads((tmp_path / "short_budget.json").read_text())["runs"]
    plain, lag4 = runs["now|digits_cnn_short|0@44"], runs["l4|digits_cnn_short|0@44"]
    (lag2,) = [row for key, row in runs.items() if key.endswith(" lag 2|digits_cnn_short|0@44")]
    assert lag2["switch_step"] == lag4["switch_step"] == plain["switch_step"]
    growth = (plain["peak_lr"] / lag2["peak_lr"]) ** 0.5
    assert 1.3 < growth < 2.0  # the ramp at 44 steps: 1e-5 to 1 in about 22 steps
    assert plain["peak_lr"] / lag4["peak_lr"] == pytest.approx(growth**4, rel=1e-6)
    assert "AutoWU l4" in (tmp_path / "RESULTS.md").read_text()
    with pytest.raises(SystemExit):
        short_budget.main(["--smoke", "--out-dir", str(tmp_path), "--probe", "x 2"])  # a feed, not a patch


def test_probe_runs_train_both_sides_and_resume(bench, tmp_path: Path, capsys) -> None:
    """`probe_runs.py` trains the defaults and the probe on each seed, records both, skips what is recorded (the
    second probe reuses the defaults' run), and the probe's patch reaches the real run: `lag 4` moves the LR chosen
    by lag 2's factor squared (the ramp's growth per step to the 4th power) at the same switch."""
    probe_runs = bench("probe_runs")
    out = tmp_path / "probe_runs.json"
    common = ["--tasks", "digits_cnn_short", "--seeds", "1", "--out", str(out)]
    assert probe_runs.main(["--probe", "lag 2", *common]) == 0
    assert probe_runs.main(["--probe", "lag 4", *common]) == 0
    printed = capsys.readouterr().out
    assert printed.count("defaults|digits_cnn_short|1:") == 1  # run once, then found recorded
    runs = json.loads(out.read_text())["runs"]
    plain, lag2, lag4 = (runs[f"{label}|digits_cnn_short|1"] for label in ("defaults", "lag 2", "lag 4"))
    assert plain["switch_step"] == lag2["switch_step"] == lag4["switch_step"]
    growth = (plain["lr"] / lag2["lr"]) ** 0.5
    assert 1.01 < growth < 1.2  # a 240-step budget's ramp
    assert plain["lr"] / lag4["lr"] == pytest.approx(growth**4, rel=1e-6)
    row = [line for line in printed.splitlines() if line.startswith("| digits_cnn_short |")][-1]
    assert row.count("|") == 8 and "| 1/1 |" in row
    with pytest.raises(SystemExit):
        probe_runs.main(["--probe", "x 2", *common])  # scales what AutoWU chose: not a patch to train under


def test_first_tests_rows_flags_every_run_the_first_tests_rule_alters(bench) -> None:
    """`first_tests_rows.py` carried 1086 recorded rows over to `descent_required_below` 30 without running them,
    on the argument that a run is the same under the rule unless its switch streak began before 30 losses. Here the
    same runs (the loss a function of the LR and a fixed noise draw per step) go under both settings: every run the
    script does not flag comes out with the same LR at every step, the one it flags (noise passing three tests on a
    flat start, `test_robust.py`) does not, and its test cadence is the scheduler's."""
    from hf_autowu import AutoWU

    rows = bench("first_tests_rows")

    def loss(kind: str, lr: float, noise: float) -> float:
        if kind == "flat_start":
            return fine_tune_loss(lr, 0.1 * noise)
        return 1.0 + 0.3 * math.log10(lr / 3e-3) ** 2 + 0.05 * noise  # a valley in log-LR at 3e-3

    def run(kind: str, total: int, seed: int, required: int) -> tuple[AutoWU, list[float]]:
        scheduler = AutoWU(make_optimizer(), total_steps=total, descent_required_below=required)
        noise = torch.randn(total, generator=torch.Generator().manual_seed(seed)).tolist()
        lrs = []
        for step in range(total):
            lrs.append(scheduler.optimizer.param_groups[0]["lr"])
            scheduler.step(loss(kind, lrs[-1], noise[step]))
        return scheduler, lrs

    flagged = []
    for kind, total, seed in [("flat_start", 200, 1), *(("valley", total, s) for total in (200, 400) for s in (0, 1))]:
        before, lrs_before = run(kind, total, seed, required=0)
        after, lrs_after = run(kind, total, seed, required=30)
        assert [t.step for t in before.tests] == list(rows.test_steps(total)[: len(before.tests)])
        if rows.alterable(total, before.switch_reason, before.switch_step):
            flagged.append((kind, total, seed))
            assert lrs_after != lrs_before
        else:
            assert lrs_after == lrs_before
    assert flagged == [("flat_start", 200, 1)]


def test_a_diverged_run_counts_at_chance_level_in_both_reports(bench) -> None:
    """A run whose metric is not finite (stored as null in the results file) counts at the task's chance level in the
    means, so that a mean over seeds stays finite and pays for the failure, and it counts as a run at chance."""
    report, holdout = bench("report"), bench("holdout")

    def run(method: str, seed: int, test: float | None, grid_lr: float | None = None) -> dict:
        return {
            "task": "digits_cnn",
            "method": method,
            "seed": seed,
            "metric": "accuracy",
            "grid_lr": grid_lr,
            "val": test,
            "test": test,
            "compute": 300,
            "wall_s": 1.0,
            "info": {},
        }

    runs = [run("oracle", s, 0.98, 3.2e-3) for s in (0, 1)] + [run("lr_finder", 0, 0.96), run("lr_finder", 1, None)]
    summary = report.summarize(runs)[0]["digits_cnn"]
    assert summary["lr_finder"]["test"] == [0.96, 0.1]  # the diverged seed at a tenth, the ten digits' chance
    assert report.failed(summary["lr_finder"]["runs"][1])
    regret, _ = report.regret_with_error(summary["lr_finder"]["test"], summary["oracle"]["test"], "accuracy")
    assert regret == pytest.approx((0.98 - 0.53) * 100 / 0.5)

    denoiser = holdout.TASKS["digits_unet_adamw"]
    chance = denoiser.chance()
    assert 0.95 < chance < 1.05  # predicting no noise: the mean square of unit Gaussian noise
    outcome = holdout.setting_outcome(denoiser, [{"test": 0.12}, {"test": None}, {"test": float("nan")}], 0.11)
    assert outcome == (pytest.approx(((0.12 + 2 * chance) / 3 - 0.11) / 0.0011), 2)


def test_the_mixture_of_experts_trains_on_the_loss_mixtral_computes(bench) -> None:
    """The MoE task's training loss is the one `MixtralForCausalLM` returns when given labels (next-token
    cross-entropy plus the router's load-balancing loss at its weight), and its score is the cross-entropy alone."""
    tasks = bench("holdout_tasks")
    task = tasks.TASKS["mixtral_moe_adamw"]
    torch.manual_seed(0)
    model, _ = task.build(1e-3)
    windows = torch.randint(256, (4, tasks.SEQ_LEN + 1))
    batch = windows[:, :-1], windows[:, 1:]
    own = model(input_ids=windows[:, :-1], labels=windows[:, :-1])  # the model shifts the labels itself
    cross_entropy = tasks.next_byte_loss(model, batch)
    # the model's loss leaves out the last position's target (it has no label for it); add it back as a mean
    expected = (own.loss - model.config.router_aux_loss_coef * own.aux_loss) * (tasks.SEQ_LEN - 1) / tasks.SEQ_LEN
    expected = expected + torch.nn.functional.cross_entropy(own.logits[:, -1], windows[:, -1]) / tasks.SEQ_LEN
    assert cross_entropy.item() == pytest.approx(expected.item(), rel=1e-5)
    trained_on = task.loss(model, batch)
    assert trained_on.item() == pytest.approx(cross_entropy.item() + 0.001 * own.aux_loss.item(), rel=1e-5)
    assert own.aux_loss.item() > 0.5  # a real term: Mixtral's balance loss is about top_k for balanced routing


def test_clip_trains_on_the_symmetric_contrastive_loss_and_pools_each_caption_at_its_end(bench) -> None:
    """The CLIP task's loss is CLIP's: the mean of the image-to-caption and caption-to-image cross-entropies of the
    scaled cosine similarities; a caption's embedding is read at its end-of-text byte, not at the padding; and the
    zero-shot score takes, for each image, the digit whose mean caption embedding is nearest."""
    tasks = bench("holdout_tasks")
    task = tasks.TASKS["clip_adamw"]
    torch.manual_seed(0)
    model, optimizer = task.build(1e-3)
    assert bytes(tasks.digit_captions()[7, 0].tolist()).rstrip(b"\0") == b"a handwritten seven"
    images, captions = next(task.batches(0))
    with torch.no_grad():
        image = tasks.features(model.get_image_features(pixel_values=images))
        text = tasks.features(model.get_text_features(input_ids=captions))
        logits = model.logit_scale.exp() * image @ text.T
        pairs = torch.arange(len(images))
        expected = (
            torch.nn.functional.cross_entropy(logits, pairs) + torch.nn.functional.cross_entropy(logits.T, pairs)
        ) / 2
        assert task.loss(model, (images, captions)).item() == pytest.approx(expected.item(), rel=1e-5)
        end = int((captions[0] != 0).sum())  # the caption's end-of-text byte (the first 0)
        states = model.text_model(input_ids=captions[:1]).last_hidden_state
        at_end = tasks.features(model.text_projection(states[0, end]))
        torch.testing.assert_close(at_end, text[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tasks.features(model.text_projection(states[0, -1])), text[0], atol=1e-3)

        model.eval()
        val_images, val_labels = tasks.digits_16px()["val"]
        centres = []
        for digit in range(10):
            embedded = [
                tasks.features(model.get_text_features(input_ids=c[None]))[0] for c in tasks.digit_captions()[digit]
            ]
            centres.append(torch.nn.functional.normalize(torch.stack(embedded).mean(0), dim=0))
        predicted = (
            tasks.features(model.get_image_features(pixel_values=val_images)) @ torch.stack(centres).T
        ).argmax(1)
        assert task.score(model)[0] == pytest.approx((predicted == val_labels).float().mean().item())
    # CLIP's weight decay: on the matrices only (not gains, biases, embeddings or the temperature)
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert id(model.logit_scale) not in decayed and id(model.text_projection.weight) in decayed
    assert id(model.text_model.embeddings.token_embedding.weight) not in decayed


def test_the_code_tagger_tags_each_byte_with_its_tokens_kind(
    bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each byte of code takes the kind of the token that covers it (whitespace none), a character of several bytes
    gives each of them its tag, and the tagger is the pretrained encoder under a new token-classification head."""
    tasks = bench("holdout_tasks")
    source = 'if x1 >= 0.5:  # é\n    s = "ü"\n'
    data, tags = tasks.tagged_bytes(source)
    assert data == source.encode() and len(tags) == len(data)
    letters = {
        "keyword": "k",
        "name": "n",
        "operator": "o",
        "number": "9",
        "string": "s",
        "comment": "c",
        "other": ".",
    }
    read = "".join(letters[tasks.CODE_TAGS[tag]] for tag in tags)
    # "é" and "ü" are two bytes each, both tagged as the comment or string they are in
    assert read == "kk.nn.oo.999o..cccc.....n.o.ssss."
    task = tasks.TASKS["code_tagger_adamw"]
    windows, labels = next(task.batches(0))
    assert windows.shape == labels.shape == (tasks.TEXT_BATCH, tasks.SEQ_LEN)
    monkeypatch.setattr(bench("tasks"), "CACHE_DIR", tmp_path)
    monkeypatch.setattr(tasks, "BERT_PRETRAIN_RECIPE", {**tasks.BERT_PRETRAIN_RECIPE, "steps": 3, "warmup": 1})
    monkeypatch.setattr(tasks, "PRETRAINED", True)  # holdout.py --smoke turns it off in this process
    torch.manual_seed(0)
    model, _ = task.build(1e-3)
    (cached,) = tmp_path.glob("bert_stdlib_pretrained_*.pt")
    base, state = torch.load(cached, weights_only=True), model.state_dict()
    assert all(torch.equal(state[name], base[name]) for name in state if name.startswith("bert."))
    assert model.classifier.out_features == len(tasks.CODE_TAGS)
    model.eval()  # BERT's dropout (0.1) off, so that both passes see the same network
    expected = torch.nn.functional.cross_entropy(model(windows).logits.transpose(1, 2), labels)
    assert task.loss(model, (windows, labels)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dpo_prefers_the_prompts_own_continuation_against_a_frozen_reference(
    bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preference pair shares its prompt and differs in the answer (the prompt's continuation against bytes from
    elsewhere); an answer's log-probability is what the model's own language-modelling loss says of it; the loss is
    DPO's sigmoid loss on the margins over the frozen reference's, ln 2 where the policy is still the reference, and
    a training step lowers it."""
    tasks = bench("holdout_tasks")
    monkeypatch.setattr(tasks, "PRETRAINED", False)  # an untrained GPT-2: nothing to pretrain here
    prompt_len, answer_len = tasks.SOURCE_LEN, tasks.TARGET_LEN
    text, elsewhere = torch.arange(200), torch.arange(200, 256)
    chosen, rejected, reference_margin = tasks.preference_pairs(text, [5, 100], elsewhere, [0, 30])
    assert torch.equal(chosen, torch.stack([torch.arange(5, 69), torch.arange(100, 164)]))
    assert torch.equal(rejected[:, :prompt_len], chosen[:, :prompt_len])
    assert torch.equal(rejected[:, prompt_len:], torch.stack([torch.arange(200, 216), torch.arange(230, 246)]))

    task = tasks.TASKS["gpt2_dpo_adamw"]
    torch.manual_seed(0)
    model, optimizer = task.build(1e-3)
    reference = tasks.reference_gpt2()
    assert not any(p.requires_grad for p in reference.parameters())
    frozen = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    assert model.state_dict().keys() == frozen.keys()
    assert all(torch.equal(tensor, frozen[name]) for name, tensor in model.state_dict().items())

    def logp_by_lm_loss(network: torch.nn.Module, sequences: torch.Tensor) -> torch.Tensor:
        labels = sequences.clone()
        labels[:, :prompt_len] = -100  # the prompt's bytes are not scored
        return torch.stack(
            [
                -network(input_ids=x[None], labels=y[None]).loss * answer_len
                for x, y in zip(sequences, labels, strict=True)
            ]
        )

    batch = next(task.batches(0))
    chosen, rejected, reference_margin = batch
    assert chosen.shape == rejected.shape == (tasks.TEXT_BATCH, prompt_len + answer_len)
    with torch.no_grad():
        torch.testing.assert_close(
            reference_margin,
            logp_by_lm_loss(reference, chosen) - logp_by_lm_loss(reference, rejected),
            rtol=1e-5,
            atol=1e-4,
        )
    loss = task.loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        margin = logp_by_lm_loss(model, chosen) - logp_by_lm_loss(model, rejected)
        expected = -torch.nn.functional.logsigmoid(tasks.DPO_BETA * (margin - reference_margin)).mean()
        after = task.loss(model, batch)
    assert after.item() == pytest.approx(expected.item(), rel=1e-5)
    assert after.item() < math.log(2.0)
    # the step moved the policy, not its reference
    assert all(torch.equal(tensor, frozen[name]) for name, tensor in tasks.reference_gpt2().state_dict().items())
    assert not torch.equal(model.state_dict()["lm_head.weight"], frozen["lm_head.weight"])
    assert task.chance() == pytest.approx(math.log(2.0))


def test_probe_rows_replays_every_recorded_row_and_lists_those_a_probe_alters(bench, tmp_path: Path, capsys) -> None:
    """Recorded rows (taken from the committed results) replay to their recorded decisions; ``mean 3``, a rule for the
    switch by the test, alters the LSTM's row, which switched by the test at step 125, and neither DPO's seed 1 (a
    rise at step 67) nor the suite's CNN (a spike); a row whose recorded LR its losses do not give is a mismatch, and
    the exit code says so, and ``--drop`` removes it from its file. With ``--at`` a row whose peak was forced to a
    grid LR reproduces by its switch step and reason alone."""
    probe_rows = bench("probe_rows")
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    held_out = json.loads((results / "holdout.json").read_text())["runs"]
    suite = json.loads((results / "quality.json").read_text())["runs"]
    dpo, lstm = (
        "gpt2_dpo_adamw|defaults (slowed_fraction 0.3)|1|200",
        "lstm_code_adam|defaults (slowed_fraction 0.3)|0|300",
    )
    cnn = "digits_cnn|autowu|0"
    (cnn_key,) = [key for key in suite if key.startswith(cnn + "|") or key == cnn]
    forced = "digits_cnn|autowu_at|0|0.0016"
    assert suite[forced]["info"]["peak_lr"] == 0.0016  # forced: not the LR the rule chose
    (tmp_path / "holdout.json").write_text(json.dumps({"runs": {dpo: held_out[dpo], lstm: held_out[lstm]}}))
    (tmp_path / "quality.json").write_text(json.dumps({"runs": {cnn_key: suite[cnn_key], forced: suite[forced]}}))
    paths = ["--results", str(tmp_path / "quality.json"), "--holdout", str(tmp_path / "holdout.json")]
    assert probe_rows.main(["--probe", "mean 3", *paths]) == 0
    out = capsys.readouterr().out
    assert "3 rows replayed; 0 do not reproduce" in out and "1 rows altered" in out
    assert f"- {lstm}: 125 test 0.00154 -> 125 test 0.0015" in out
    held_out[lstm]["lr"] *= 1.5  # a row its losses do not give
    (tmp_path / "holdout.json").write_text(json.dumps({"runs": {dpo: held_out[dpo], lstm: held_out[lstm]}}))
    assert probe_rows.main(["--probe", "mean 3", *paths]) == 1
    assert f"- mismatch {lstm}" in capsys.readouterr().out
    assert probe_rows.main(["--at", *paths]) == 1
    assert "4 rows replayed; 1 do not reproduce" in capsys.readouterr().out
    assert probe_rows.main(["--at", "--drop", *paths]) == 0
    assert list(json.loads((tmp_path / "holdout.json").read_text())["runs"]) == [dpo]
    assert probe_rows.main(["--at", *paths]) == 0
    with pytest.raises(SystemExit):
        probe_rows.main(["--probe", "x 2", *paths])  # not a patch: nothing to replay under


def test_cap_fall_tells_a_noisy_fall_from_zero_mean_noise(bench) -> None:
    """Zero-mean noise decays from `min_lr` on every seed; a fall of 2.8 that stays down, with noise 1.2 per loss,
    on the 160-step seeds where medians of ten read no fall (4, 6, 7, 8: `min_lr` before `fell_over_ramp`), decays
    from the GP's estimate; the smoke table has its two columns."""
    cap_fall = bench("cap_fall")
    assert cap_fall.from_min_lr(160, cap_fall.zero_mean, seeds=(0, 1, 2)) == 3
    assert cap_fall.from_min_lr(160, cap_fall.falling(1.2), seeds=(4, 6, 7, 8)) == 0
    table = cap_fall.main(["--smoke"])
    assert set(table) == {(160, "fall, noise 1.2"), (160, "zero-mean noise")} and table[(160, "zero-mean noise")] == 2


def test_structured_noise_smoke(bench) -> None:
    """With independent noise the default decays from about a quarter of the valley's best LR (where the descent
    slowed); the smoke run also prints the periodic row it documents as a limit."""
    structured_noise = bench("structured_noise")
    table = structured_noise.main(["--smoke"])
    ((reason, ratio),) = table[(300, "independent noise 0.05")]
    assert reason == "test" and 0.15 < ratio < 0.4
    assert len(table[(300, "period 25, amplitude 0.3")]) == 1


def test_false_spikes_smoke(bench) -> None:
    """A steadily falling loss with Gaussian or heavy-tailed noise over a 1e4-step budget: no run ends on a spike
    (the limit the script documents appears at 1e5 steps and beyond), every run reaches the cap."""
    false_spikes = bench("false_spikes")
    table = false_spikes.main(["--smoke"])
    assert set(table) == {(10**4, "gaussian"), (10**4, "student-t3")}
    assert all(reason == "cap" for rows in table.values() for reason, _ in rows)


def test_the_swing_probe_sets_the_margin_and_its_floor_and_undoes_them(bench) -> None:
    """``swing 0`` replays the code before `swing_margin` (the 300-step valley with a sine of period 25 and amplitude
    0.3, seed 0: a switch below 0.1 of the best LR; the defaults run on to 0.15-0.6 of it), ``swing 2`` counts every
    rise-back (no floor), and the patches are undone on exit."""
    probe = bench("rule_probes")
    structured_noise = bench("structured_noise")
    run, floor = probe.SwitchTester.run, probe.switch_test.SWING_FLOOR_SD
    reason, ratio = structured_noise.run(300, 0, "periodic", 25, 0.3)
    assert reason == "test" and 0.15 < ratio < 0.6
    with probe.patched("swing 0"):
        assert structured_noise.run(300, 0, "periodic", 25, 0.3)[1] < 0.1
    with probe.patched("swing 2"):
        assert probe.switch_test.SWING_FLOOR_SD == 0.0
    assert probe.SwitchTester.run is run and probe.switch_test.SWING_FLOOR_SD == floor == 1.0


def test_ideal_multiplier_finds_the_best_multiplier_and_a_feature_that_predicts_it(bench) -> None:
    """The best multiplier is the one with the lowest mean validation regret; the ramp's features are read from the
    losses AutoWU saw (a level of 2 falling to 1: a relative fall of 1/2); and when a feature sets the best multiplier
    (log2 of it = log of the feature), leaving one task out recovers it and beats the defaults, while a uniform bias
    cannot."""
    probe = bench("ideal_multiplier")
    k = probe.LOG2_MULTIPLIERS

    def row(best: float, feature: float, group: str = "suite") -> dict:
        seed = {"val": np.abs(k - best).tolist(), "test": np.abs(k - best).tolist()}
        seed |= {"noise_over_fall": feature, "relative_fall": 0.5, "growth_per_step": 0.1}
        seed |= {"descent_width": 10.0, "min_over_half": 3.0, "rise_after": 0.2}
        return {"group": group, "seeds": [seed, seed]}

    rows = {f"t{i}": row(b, math.exp(b)) for i, b in enumerate([-2.0, -1.0, 0.0, 1.0, 2.0])}
    rows["new"] = row(1.5, math.exp(1.5), "unseen")
    assert probe.best_log2_multiplier(rows["t0"]) == -2.0 and probe.test_regret_at(rows["t3"], 0.0) == 1.0
    intercept, slope = probe.fitted_line({t: r for t, r in rows.items() if t != "new"}, "noise_over_fall")
    assert intercept == pytest.approx(0.0, abs=1e-9) and slope == pytest.approx(1.0)
    lines = "\n".join(probe.summary(rows))
    assert (
        "noise_over_fall: leaving one of 5 tasks out, mean test regret 0.00 (defaults 1.20); unseen (1 tasks) 0.00"
        in lines
    )
    assert "uniform bias: leaving one of 5 tasks out, mean test regret 1.50 (defaults 1.20)" in lines

    losses = [2.0 + 0.05 * math.sin(i) for i in range(30)] + [1.0 + 0.05 * math.sin(i) for i in range(100)]
    scheduler = bench("decisions").replay(bench("tasks").TASKS["digits_cnn"], losses)
    features = probe.ramp_features(scheduler)
    assert features["relative_fall"] == pytest.approx(0.5, abs=0.05) and features["noise_over_fall"] < 0.1
    # the level of ten losses drops from 2 to 1 within one step of the ramp (the windows with five and six losses past
    # the step): every share of the fall is made within one step's LR growth, and the level barely moves after it
    one_step = scheduler._ramp(1) / scheduler._ramp(0)
    assert 1.0 <= features["descent_width"] <= one_step * (1 + 1e-9) and features["min_over_half"] >= 1.0
    assert 0.0 <= features["rise_after"] < 0.1
