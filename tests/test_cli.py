"""`hf-autowu replay` / `hf-autowu plot` and the curve readers, driven by a real (small) AutoWU training run."""

import json
import math

import pytest
import torch
from helpers import make_optimizer, valley_loss

from hf_autowu import AutoWU, AutoWUConfig, read_loss_curve, replay_curve, scheduler_from_state_dict
from hf_autowu.cli import main
from hf_autowu.replay import CurveError

OPTIONS = {"min_lr": 1e-2, "max_lr": 10.0}
TOTAL_STEPS = 400
OPTION_FLAGS = ["--min-lr", "0.01", "--max-lr", "10", "--total-steps", str(TOTAL_STEPS)]


@pytest.fixture(scope="module")
def recorded_run():
    """A small MLP trained with AutoWU on a synthetic classification task until shortly after the switch.

    Returns the scheduler and, for every step, (step, loss at full precision, LR it trained with, LR of the next
    step).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1024, 20, generator=generator)
    targets = (inputs @ torch.randn(20, 5, generator=generator)).argmax(dim=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    scheduler = AutoWU(optimizer, total_steps=TOTAL_STEPS, **OPTIONS)
    rows = []
    for step in range(1, TOTAL_STEPS + 1):
        batch = torch.randint(0, len(inputs), (64,), generator=generator)
        lr = optimizer.param_groups[0]["lr"]
        loss = torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(loss)
        rows.append((step, loss.item(), lr, optimizer.param_groups[0]["lr"]))
        if scheduler.switch_step is not None and step == scheduler.switch_step + 20:
            break
    assert scheduler.switch_reason == "test" and 20 < scheduler.switch_step < TOTAL_STEPS // 2
    return scheduler, rows


def write_csv(path, rows, with_lr=True):
    header = "step,loss,lr" if with_lr else "step,loss"
    lines = [f"{s},{loss!r},{lr!r}" if with_lr else f"{s},{loss!r}" for s, loss, lr, _ in rows]
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def write_trainer_state(path, rows, logging_steps=1, lr_of_next_step=False, batches_per_epoch=None):
    """A trainer_state.json as the Trainer writes it (transformers >= 5 logs the LR the step trained with; with
    `batches_per_epoch`, the `epoch` of each entry: whole epochs plus the fraction of the epoch's batches done)."""
    history = []
    for end in range(logging_steps, len(rows) + 1, logging_steps):
        chunk = rows[end - logging_steps : end]
        lr = chunk[-1][3] if lr_of_next_step else chunk[-1][2]
        history.append({"loss": sum(r[1] for r in chunk) / len(chunk), "learning_rate": lr, "step": end})
        if batches_per_epoch is not None:
            epochs, batches = divmod(end, batches_per_epoch)
            history[-1]["epoch"] = epochs + batches / batches_per_epoch
    history.append({"train_loss": 0.5, "step": len(rows)})
    state = {"global_step": len(rows), "max_steps": TOTAL_STEPS, "logging_steps": logging_steps}
    path.write_text(json.dumps({**state, "log_history": history}))
    return path


def replayed(path, **kwargs):
    return replay_curve(read_loss_curve(path), AutoWUConfig(**OPTIONS), **kwargs).scheduler


def test_replay_of_a_recorded_run_reproduces_its_switch_exactly(recorded_run, tmp_path):
    scheduler, rows = recorded_run
    for with_lr in (True, False):
        result = replayed(write_csv(tmp_path / f"run{with_lr}.csv", rows, with_lr), total_steps=TOTAL_STEPS)
        assert result.switch_step == scheduler.switch_step
        assert result.peak_lr == scheduler.peak_lr
        assert [t.probability for t in result.tests] == [t.probability for t in scheduler.tests]


def test_replay_of_a_csv_counting_steps_from_zero_is_exact(recorded_run, tmp_path):
    scheduler, rows = recorded_run
    log = write_csv(tmp_path / "run.csv", [(step - 1, *rest) for step, *rest in rows])
    result = replayed(log, total_steps=TOTAL_STEPS)
    assert (result.switch_step, result.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)


@pytest.mark.parametrize("lr_of_next_step", [False, True], ids=["lr_trained", "lr_of_next_step"])
def test_replay_of_a_per_step_trainer_state_is_exact(recorded_run, tmp_path, lr_of_next_step):
    scheduler, rows = recorded_run
    result = replayed(write_trainer_state(tmp_path / "trainer_state.json", rows, lr_of_next_step=lr_of_next_step))
    assert (result.switch_step, result.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)


def test_replay_of_a_tensorboard_log_is_exact(recorded_run, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    scheduler, rows = recorded_run
    with SummaryWriter(str(tmp_path / "runs" / "run1")) as writer:
        for step, loss, _, next_lr in rows:  # the Trainer's TensorBoard callback: at global_step, float32 values
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/learning_rate", next_lr, step)
    result = replayed(tmp_path / "runs", total_steps=TOTAL_STEPS)
    assert (result.switch_step, result.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)


def test_replay_infers_the_budget_from_logged_lrs(recorded_run, tmp_path, capsys):
    scheduler, rows = recorded_run
    log = str(write_csv(tmp_path / "run.csv", rows))
    assert main(["replay", log, "--min-lr", "0.01", "--max-lr", "10"]) == 0
    out = capsys.readouterr().out
    assert f"budget inferred from the logged LRs: {TOTAL_STEPS} steps" in out
    assert f"would switch after step {scheduler.switch_step} " in out and f"peak LR {scheduler.peak_lr:.6g}" in out
    # a log without learning rates cannot tell its budget
    assert main(["replay", str(write_csv(tmp_path / "no_lr.csv", rows, with_lr=False)), "--min-lr", "0.01"]) == 2
    assert "give `total_steps` (--total-steps)" in capsys.readouterr().err
    # LRs that grow, but not on the options' ramp: the error says the budget was inferred
    assert main(["replay", log, "--min-lr", "0.001", "--max-lr", "10"]) == 2
    err = capsys.readouterr().err
    assert "does not follow the warmup ramp" in err and "was inferred from the logged LRs" in err


def record_valley_run(total_steps: int, best_lr: float = 0.05, **options) -> tuple[AutoWU, list[tuple]]:
    """AutoWU driven by a synthetic valley-shaped loss until the switch: (scheduler, (step, loss, lr, next lr))."""
    generator = torch.Generator().manual_seed(total_steps)
    scheduler = AutoWU(make_optimizer(), total_steps=total_steps, **OPTIONS, **options)
    rows = []
    while scheduler.switch_step is None:
        lr = scheduler.get_last_lr()[0]
        loss = valley_loss(lr, best_lr, noise=0.02, generator=generator)
        scheduler.step(loss)
        rows.append((scheduler.last_step, loss, lr, scheduler.get_last_lr()[0]))
    for _ in range(5):  # a few steps after the switch, as a log would have them
        lr = scheduler.get_last_lr()[0]
        scheduler.step(1.0)
        rows.append((scheduler.last_step, 1.0, lr, scheduler.get_last_lr()[0]))
    return scheduler, rows


def smallest_budget_with_the_same_warmup(total_steps: int) -> int:
    """Written from the documented rule: W = floor(0.5 T) up to 500 steps, floor(0.5 sqrt(500 T)) beyond."""

    def warmup(budget: int) -> int:
        return int(0.5 * (budget if budget <= 500 else math.sqrt(500 * budget)))

    return next(budget for budget in range(1, total_steps + 1) if warmup(budget) == warmup(total_steps))


@pytest.mark.parametrize("total_steps", [400, 401, 1500, 3001])
@pytest.mark.parametrize("warmup_type", ["exp", "linear"])
@pytest.mark.parametrize("logging", ["per_step", "every_7", "tensorboard_next_lr"])
def test_replay_with_the_inferred_budget_reproduces_the_run(tmp_path, total_steps, warmup_type, logging):
    """Budgets that share the warmup length W (2W and 2W + 1 for short budgets, more for long ones, whose warmup
    grows with the square root of the budget): the smallest is inferred, and the decisions are the same."""
    scheduler, rows = record_valley_run(total_steps, warmup_type=warmup_type)
    config = AutoWUConfig(**OPTIONS, warmup_type=warmup_type)
    if logging == "tensorboard_next_lr":  # float32 values, the LR of the next step (as AutoWU's `autowu/lr`)
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tmp_path / "run")) as writer:
            for step, loss, _, next_lr in rows:
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("autowu/lr", next_lr, step)
        curve = read_loss_curve(tmp_path / "run")
    else:
        every = 1 if logging == "per_step" else 7
        curve = read_loss_curve(write_csv(tmp_path / "run.csv", rows[every - 1 :: every]))
    result = replay_curve(curve, config)
    assert any("budget inferred from the logged LRs" in note for note in result.notes)
    replayed = result.scheduler
    assert replayed.warmup_steps == scheduler.warmup_steps
    assert replayed.total_steps == smallest_budget_with_the_same_warmup(total_steps)
    assert replayed.total_steps < total_steps or total_steps % 2 == 0  # for 3001: 2997
    if logging != "every_7":  # a coarse log only approximates the losses
        assert replayed.switch_step == scheduler.switch_step and replayed.peak_lr == scheduler.peak_lr
        assert [(t.step, t.votes, t.passed) for t in replayed.tests] == [
            (t.step, t.votes, t.passed) for t in scheduler.tests
        ]  # (the probabilities too from a CSV; TensorBoard keeps the losses in float32)


def test_replay_of_a_paper_preset_trainer_state_reads_its_steps_per_epoch(tmp_path):
    """The paper preset tests once per epoch: a Trainer state's `epoch` gives the steps per epoch, and the replay
    without --steps-per-epoch reproduces the run's switch."""
    generator = torch.Generator().manual_seed(2)
    scheduler = AutoWU(make_optimizer(), 7, total_steps=TOTAL_STEPS, preset="paper", **OPTIONS)
    rows = []
    while scheduler.switch_step is None:
        lr = scheduler.get_last_lr()[0]
        loss = valley_loss(lr, 0.05, noise=0.02, generator=generator)
        scheduler.step(loss)
        rows.append((scheduler.last_step, loss, lr, None))
    config = AutoWUConfig(preset="paper", **OPTIONS)
    with_epochs = read_loss_curve(write_trainer_state(tmp_path / "trainer_state.json", rows, batches_per_epoch=7))
    assert with_epochs.steps_per_epoch == 7
    result = replay_curve(with_epochs, config)
    assert any("steps per epoch read from the log's epochs: 7" in note for note in result.notes)
    assert (result.scheduler.switch_step, result.scheduler.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)
    without = read_loss_curve(write_trainer_state(tmp_path / "trainer_state.json", rows))
    assert without.steps_per_epoch is None
    assert result.scheduler.tests != replay_curve(without, config).scheduler.tests  # tests every T // 50 steps


@pytest.mark.parametrize("resumed_budget", [300, 600])
def test_replay_of_a_run_resumed_with_another_budget_is_exact(tmp_path, resumed_budget):
    """A run saved in warmup and resumed with another budget keeps its ramp: the replay of its trainer_state.json,
    whose max_steps is the new budget, finds the ramp's budget from the logged LRs and reproduces the switch."""
    generator = torch.Generator().manual_seed(1)
    scheduler = AutoWU(make_optimizer(), total_steps=TOTAL_STEPS, **OPTIONS)
    losses = []

    def step_once():  # returns the LR the step trained with
        lr = scheduler.get_last_lr()[0]
        loss = valley_loss(lr, 0.05, noise=0.02, generator=generator)
        losses.append(loss)
        scheduler.step(loss)
        return lr

    trained = [step_once() for _ in range(60)]  # a checkpoint in warmup
    assert scheduler.phase == "warmup"
    state = scheduler.state_dict()
    scheduler = AutoWU(make_optimizer(), total_steps=resumed_budget, **OPTIONS)
    scheduler.load_state_dict(state)
    while scheduler.switch_step is None:
        trained.append(step_once())
    assert scheduler.switch_step > 60 and scheduler.total_steps == resumed_budget  # decided after the resume
    rows = [(step + 1, loss, lr, None) for step, (loss, lr) in enumerate(zip(losses, trained, strict=True))]
    log = write_trainer_state(tmp_path / "trainer_state.json", rows)
    state = json.loads(log.read_text())
    log.write_text(json.dumps({**state, "max_steps": resumed_budget}))

    result = replay_curve(read_loss_curve(log), AutoWUConfig(**OPTIONS))
    assert any("follow the ramp of a 400-step budget" in note for note in result.notes)
    assert (result.scheduler.switch_step, result.scheduler.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)
    with pytest.raises(CurveError, match="does not follow the warmup ramp"):  # a budget given by hand is the user's
        replay_curve(read_loss_curve(log), AutoWUConfig(**OPTIONS), total_steps=resumed_budget)


def test_replay_reads_an_accelerate_tensorboard_folder(recorded_run, tmp_path, capsys):
    """Accelerate's TensorBoard tracker writes the scalars in `<logging_dir>/<run>` and a hyperparameter sub-run
    beside them (the examples' folder): the run with the losses is read, and `autowu/lr` is its LR."""
    from accelerate.tracking import TensorBoardTracker

    scheduler, rows = recorded_run
    tracker = TensorBoardTracker("autowu", str(tmp_path / "output"))
    tracker.start()
    tracker.store_init_configuration({"model": "mlp", "epochs": 3})
    for step, loss, _, next_lr in rows:
        tracker.log({"train/loss": loss, "autowu/lr": next_lr}, step=step)
    tracker.finish()
    assert len({p.parent for p in (tmp_path / "output").rglob("*tfevents*")}) == 2
    assert main(["replay", str(tmp_path / "output"), "--min-lr", "0.01", "--max-lr", "10"]) == 0
    out = capsys.readouterr().out
    assert "learning rate: logged" in out and f"budget inferred from the logged LRs: {TOTAL_STEPS} steps" in out
    assert f"would switch after step {scheduler.switch_step} " in out

    second = tmp_path / "output" / "autowu" / "second"  # two runs with losses: which one is meant is unclear
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(second)) as writer:
        writer.add_scalar("train/loss", 1.0, 1)
    assert main(["replay", str(tmp_path / "output"), *OPTION_FLAGS]) == 2
    assert "training losses in 2 runs here (autowu, autowu/second)" in capsys.readouterr().err


def test_a_csv_with_a_byte_order_mark_is_read(recorded_run, tmp_path):
    """As spreadsheets write "CSV UTF-8": the first column is still `step`."""
    scheduler, rows = recorded_run
    log = write_csv(tmp_path / "run.csv", rows)
    log.write_bytes(b"\xef\xbb\xbf" + log.read_bytes())
    result = replayed(log, total_steps=TOTAL_STEPS)
    assert (result.switch_step, result.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)


def test_scheduler_from_state_dict_refuses_another_schedulers_state():
    with pytest.raises(ValueError, match="not an AutoWU scheduler state"):
        scheduler_from_state_dict({"base_lrs": [1.0], "last_epoch": 3})  # a plain Trainer's scheduler.pt
    for state in ({"base_lrs": [1.0], "last_epoch": 3}, [1.0]):
        with pytest.raises(ValueError, match="not an AutoWU scheduler state"):
            AutoWU.from_state_dict(state)
    pytest.importorskip("matplotlib")
    from hf_autowu import plot_autowu

    with pytest.raises(ValueError, match="not an AutoWU scheduler state"):
        plot_autowu({"base_lrs": [1.0], "last_epoch": 3})


def test_plot_to_a_name_without_a_format_says_the_file_it_wrote(recorded_run, tmp_path, capsys):
    scheduler, _ = recorded_run
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    assert main(["plot", str(tmp_path / "scheduler.pt"), "-o", str(tmp_path / "figure")]) == 0
    assert (tmp_path / "figure.png").exists() and str(tmp_path / "figure.png") in capsys.readouterr().out


def test_scheduler_from_state_dict_is_autowu_from_state_dict(recorded_run):
    scheduler, _ = recorded_run
    state = scheduler.state_dict()
    for rebuilt in (AutoWU.from_state_dict(state), scheduler_from_state_dict(state)):
        assert rebuilt.lr_schedule() == scheduler.lr_schedule()
        assert rebuilt.tests == scheduler.tests and torch.equal(rebuilt.losses, scheduler.losses)


def test_cli_replay_prints_the_switch_and_writes_the_figure(recorded_run, tmp_path, capsys):
    scheduler, rows = recorded_run
    figure = tmp_path / "replay.png"
    status = main(["replay", str(write_csv(tmp_path / "run.csv", rows)), *OPTION_FLAGS, "--plot", str(figure), "-v"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"would switch after step {scheduler.switch_step} " in out
    assert f"peak LR {scheduler.peak_lr:.6g}" in out
    assert f"leaves the warmup ramp after step {scheduler.switch_step}" in out
    assert out.count("test after step") == len(scheduler.tests)
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_cli_replay_says_when_a_flat_curve_blew_up(tmp_path, capsys):
    """A loss that only wanders in its noise until it turns NaN above 1e-2: the replay retries the first NaN and
    switches at the next, a decade below the LR that produced it."""
    generator = torch.Generator().manual_seed(0)
    total = 400
    lrs = [1e-5 * 1e5 ** (step / (total // 2)) for step in range(total // 2)]  # the default ramp of a 400-step budget
    rows = [
        (
            step + 1,
            math.nan if step and lrs[step - 1] > 1e-2 else 2.0 + 0.05 * float(torch.randn((), generator=generator)),
            lr,
            0,
        )
        for step, lr in enumerate(lrs)
    ]
    status = main(["replay", str(write_csv(tmp_path / "run.csv", rows)), "--total-steps", str(total)])
    out = capsys.readouterr().out
    assert status == 0
    first_nan = next(step for step in range(1, len(lrs)) if lrs[step - 1] > 1e-2)
    assert (
        "(the loss diverged; it had not really fallen before, so a decade below the LR that blew up; warmup had gone "
        f"on after the non-finite loss of step {first_nan + 1})" in out
    )
    assert f"peak LR {lrs[first_nan] / 10:.6g}" in out  # the next loss, the first after the retry, is NaN too


def test_cli_replay_of_a_budget_too_short_for_a_test_says_how_the_lr_was_chosen(tmp_path, capsys):
    """A 30-step run's 15 ramp losses: no switch test can run before the cap, and the replay says the peak is a
    tenth of the LR at the lowest loss (loss `i` comes from the update at the ramp's LR `i - 1`)."""
    total, warmup = 30, 15
    lrs = [1e-5 * 1e5 ** (step / warmup) for step in range(warmup)]
    losses = [2.3 - 0.1 * step if step < 10 else 1.3 + 0.5 * (step - 10) for step in range(warmup)]  # lowest: 10
    rows = [(step + 1, loss, lr, 0) for step, (loss, lr) in enumerate(zip(losses, lrs, strict=True))]
    status = main(["replay", str(write_csv(tmp_path / "run.csv", rows)), "--total-steps", str(total)])
    out = capsys.readouterr().out
    assert status == 0
    assert "too soon for a switch test, so a tenth of the LR at the lowest loss" in out
    assert f"peak LR {lrs[9] / 10:.6g}" in out


def test_cli_replay_of_coarse_logging_says_it_is_approximate(recorded_run, tmp_path, capsys):
    scheduler, rows = recorded_run
    state = write_trainer_state(tmp_path / "trainer_state.json", rows, logging_steps=5)
    assert main(["replay", str(tmp_path), "--min-lr", "0.01", "--max-lr", "10"]) == 0
    out = capsys.readouterr().out
    assert "logged every 5 steps" in out and "one every 5 steps, the first at step 5" in out
    # only the logged means whose steps all trained on the ramp are replayed
    assert f"up to step {scheduler.switch_step // 5 * 5}\n" in out
    assert read_loss_curve(state).per_step_losses()[:5] == [read_loss_curve(state).losses[0]] * 5


def test_cli_plot_reads_trainer_and_accelerate_checkpoints(recorded_run, tmp_path, capsys):
    scheduler, _ = recorded_run
    trainer_output = tmp_path / "trainer"
    for step in (10, 200):  # the latest checkpoint is used
        (trainer_output / f"checkpoint-{step}").mkdir(parents=True)
    torch.save({"not": "autowu"}, trainer_output / "checkpoint-10" / "scheduler.pt")
    torch.save(scheduler.state_dict(), trainer_output / "checkpoint-200" / "scheduler.pt")
    accelerate_state = tmp_path / "accelerate"
    accelerate_state.mkdir()
    torch.save({"step": 3}, accelerate_state / "custom_checkpoint_0.pkl")  # another registered object
    torch.save(scheduler.state_dict(), accelerate_state / "custom_checkpoint_1.pkl")
    callback_checkpoint = tmp_path / "callback"  # AutoWUCallback: AutoWU's state inside the Trainer scheduler's
    callback_checkpoint.mkdir()
    torch.save({"base_lrs": [1.0], "autowu_state": scheduler.state_dict()}, callback_checkpoint / "scheduler.pt")

    for folder, found in (
        (trainer_output, "checkpoint-200/scheduler.pt"),
        (accelerate_state, "custom_checkpoint_1"),
        (callback_checkpoint, "callback/scheduler.pt"),
    ):
        figure = tmp_path / f"{folder.name}.png"
        assert main(["plot", str(folder), "-o", str(figure)]) == 0
        out = capsys.readouterr().out
        assert found in out
        assert f"switched after step {scheduler.switch_step} " in out
        assert figure.stat().st_size > 10_000


def test_cli_replay_of_lrs_beyond_floats_asks_for_the_budget(tmp_path, capsys):
    """Logged LRs so large that their logarithms overflow infer no budget: the error asks for it (it used to be
    Python's "cannot convert float NaN to integer")."""
    log = _write("a.csv", "step,loss,lr\n1,0.5,1e304\n2,0.4,1.0000000000000001e304\n3,0.4,1.1e304\n")(tmp_path)
    assert main(["replay", log]) == 2  # the default options
    assert "the step budget is unknown" in capsys.readouterr().err


def test_cli_output_into_a_closed_pipe_is_not_an_error(recorded_run, tmp_path):
    """`hf-autowu replay LOG | head -1`: a reader that stops early (here: before anything is written) makes no
    traceback and no failure."""
    import subprocess
    import sys

    _, rows = recorded_run
    log = write_csv(tmp_path / "run.csv", rows)
    command = [sys.executable, "-m", "hf_autowu.cli", "replay", str(log), *OPTION_FLAGS, "-v"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # long before the child has imported torch
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_cli_refuses_lrs_that_contradict_the_options(recorded_run, tmp_path, capsys):
    _, rows = recorded_run
    log = str(write_csv(tmp_path / "run.csv", rows))
    assert main(["replay", log, "--min-lr", "0.01", "--max-lr", "10", "--total-steps", "500"]) == 2
    assert "does not follow the warmup ramp" in capsys.readouterr().err
    assert main(["replay", log, "--total-steps", str(TOTAL_STEPS)]) == 2  # default min_lr 1e-5
    assert "at step 1 it is 0.01" in capsys.readouterr().err


def test_cli_refuses_a_curve_without_lr_ramp(tmp_path, capsys):
    constant = tmp_path / "constant.csv"
    constant.write_text("step,loss,lr\n" + "".join(f"{s},{3 - s / 100},0.01\n" for s in range(1, 50)))
    assert main(["replay", str(constant), *OPTION_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "no usable LR ramp" in err and "does not increase (at step 2)" in err


def _write(name, content):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)

    return make


MALFORMED = {
    "csv_without_loss": (["replay"], _write("a.csv", "step,lr\n1,0.1\n"), "needs the columns `step` and `loss`"),
    "csv_bad_number": (
        ["replay"],
        _write("a.csv", "step,loss\n1,0.5\n2,abc\n"),
        "line 3: `loss` is not a number ('abc')",
    ),
    "csv_bad_lr": (["replay"], _write("a.csv", "step,loss,lr\n1,0.5,x1\n"), "line 2: `lr` is not a number ('x1')"),
    "csv_short_row": (["replay"], _write("a.csv", "step,loss,lr\n1,0.5\n"), "line 2: `lr` is missing"),
    "csv_steps_repeat_badly": (["replay"], _write("a.csv", "step,loss\n-3,0.5\n"), "positive"),
    "bad_json": (["replay"], _write("trainer_state.json", "{not json"), "not readable as JSON"),
    "json_without_log_history": (["replay"], _write("s.json", '{"a": 1}'), "no `log_history` list"),
    "json_without_losses": (["replay"], _write("s.json", '{"log_history": [{"eval_loss": 1}]}'), "no training losses"),
    "json_bad_step": (["replay"], _write("s.json", '{"log_history": [{"loss": 1, "step": "x"}]}'), "`step`"),
    "unknown_format": (["replay"], _write("log.txt", "1 2 3"), "unknown log format"),
    "csv_two_runs_in_one": (
        ["replay"],
        _write("a.csv", "step,loss\n1,0.5\n2,0.4\n1,0.6\n2,0.45\n"),
        "line 4: step 1 was logged before with other values",
    ),
    "json_two_runs_in_one": (
        ["replay"],
        _write("s.json", '{"log_history": [{"loss": 1, "step": 1}, {"loss": 2, "step": 1}]}'),
        "step 1 was logged before",
    ),
    "json_step_beyond_any_run": (
        ["replay"],
        _write("s.json", '{"log_history": [{"loss": 1, "step": 1' + "0" * 400 + "}]}"),
        "beyond any training run's steps",
    ),
    "csv_step_beyond_any_run": (
        ["replay"],
        _write("a.csv", "step,loss\n1,0.5\n100000000000000000000,0.4\n"),
        "line 3: `step` is beyond any training run's steps",
    ),
    "corrupt_tensorboard": (["replay"], _write("events.out.tfevents.1", b"\x00\x01garbage"), "no scalars found"),
    "missing_file": (["replay"], lambda tmp_path: str(tmp_path / "nope.csv"), "no such file"),
    "plot_garbage": (["plot"], _write("scheduler.pt", b"garbage"), "not loadable with torch.load"),
    "plot_empty_folder": (["plot"], lambda tmp_path: str(tmp_path), "no scheduler state here"),
    "log_begins_after_the_first_step": (
        ["replay"],
        _write("a.csv", "step,loss\n51,0.5\n52,0.4\n53,0.4\n"),
        "the log begins at step 51 (a resumed run's own log?)",
    ),
    "log_past_the_budget": (
        ["replay"],
        _write("a.csv", "step,loss\n1,0.5\n100000000,0.4\n"),
        "goes on to step 100000000, past the budget",
    ),
}


@pytest.mark.parametrize("command, make, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_cli_malformed_inputs_give_one_error_line(tmp_path, capsys, command, make, message):
    assert main([*command, make(tmp_path), *(OPTION_FLAGS if command == ["replay"] else [])]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hf-autowu {command[0]}: error: ") and message in lines[0]


def test_cli_invalid_option_value_is_one_error_line(tmp_path, capsys):
    log = _write("a.csv", "step,loss\n1,0.5\n")(tmp_path)
    assert main(["replay", log, "--confidence", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "hf-autowu replay: error: `confidence` must be in (0, 1), got 1.5."


def test_help_says_what_each_command_reads_and_writes(capsys):
    for command, words in (
        ("replay", ("trainer_state.json", "step,loss[,lr]", "TensorBoard", "Writes the figure", "--patience")),
        ("plot", ("scheduler.pt", "custom_checkpoint_N.pkl", "weights_only=True", "Writes the figure")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words)


@pytest.mark.parametrize("groups", [1, 2])
def test_replay_and_plot_of_a_real_trainer_run(tmp_path, capsys, groups):
    """An `AutoWUTrainer` run logged every step: replaying its trainer_state.json and its TensorBoard log gives
    its switch exactly, and `plot` finds its checkpoint. With two parameter groups (the first at half the
    second's LR) the Trainer's `learning_rate` is the first group's, off AutoWU's ramp: the replay reads
    `autowu/lr`."""
    pytest.importorskip("transformers")
    trainer_steps = 200
    from transformers import TrainingArguments

    from hf_autowu import AutoWUTrainer

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4096, 20, generator=generator)
    labels = (inputs @ torch.randn(20, 5, generator=generator)).argmax(dim=1)
    dataset = [{"x": x, "labels": y} for x, y in zip(inputs, labels, strict=True)]
    args = TrainingArguments(
        str(tmp_path / "out"), per_device_train_batch_size=64, max_steps=trainer_steps, logging_steps=1,
        save_steps=trainer_steps, optim="sgd", report_to=["tensorboard"], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Classifier()
    optimizers = (None, None)
    if groups == 2:
        first, second = model.net[0].parameters(), model.net[2].parameters()
        optimizers = (torch.optim.SGD([{"params": first, "lr": 0.5}, {"params": second, "lr": 1.0}]), None)
    trainer = AutoWUTrainer(
        model=model, args=args, train_dataset=dataset, optimizers=optimizers, autowu_config=AutoWUConfig(**OPTIONS)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    scheduler = trainer.lr_scheduler
    assert scheduler.switch_reason in ("test", "divergence")  # a decision the replay must reproduce
    assert read_loss_curve(tmp_path / "out").steps_per_epoch == 4096 // 64  # from the Trainer's `epoch`
    if groups == 2:
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert logged[0]["learning_rate"] == pytest.approx(0.5 * scheduler.lr_at(0))  # the first group's

    for log in (
        tmp_path / "out",
        tmp_path / "out" / "runs",
    ):  # the latest checkpoint's trainer_state.json; TensorBoard
        result = replay_curve(read_loss_curve(log), AutoWUConfig(**OPTIONS), total_steps=trainer_steps).scheduler
        assert (result.switch_step, result.peak_lr) == (scheduler.switch_step, scheduler.peak_lr)
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "out"), "-o", str(tmp_path / "trainer.png")]) == 0
    assert f"switched after step {scheduler.switch_step} " in capsys.readouterr().out
