"""AutoWU dropped into timm's own training-loop shape, with no glue: `lr_scheduler.step_update(num_updates=...,
metric=loss)` after every update and `lr_scheduler.step(epoch + 1, eval_metric)` at the end of every epoch."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_state_equal, make_optimizer

from hf_autowu import AutoWU

timm = pytest.importorskip("timm")
timm_optim = pytest.importorskip("timm.optim")
timm_scheduler = pytest.importorskip("timm.scheduler")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

BATCH = 32
TRAIN_BATCHES = 8  # 8 updates per epoch
EPOCHS = 12  # 96 updates, warmup capped at 48
# the warmup is short: the rewind may find no snapshot below the chosen LR, and says so
pytestmark = pytest.mark.filterwarnings("ignore:AutoWU rewind:UserWarning")


def digits_batches() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 digits, one channel scaled to [0, 1]: `TRAIN_BATCHES` training batches and a held-out one."""
    digits = sklearn_datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    batches = [
        (images[i * BATCH : (i + 1) * BATCH], labels[i * BATCH : (i + 1) * BATCH]) for i in range(TRAIN_BATCHES)
    ]
    held_out = (images[-256:], labels[-256:])
    return batches, held_out


@pytest.fixture(scope="module")
def timm_run():
    """A timm model trained by a loop written the way timm's `train.py` writes it, AutoWU as `lr_scheduler`.

    Returns the scheduler, the step losses, the LR each update used and, per epoch end, the state before and after
    `lr_scheduler.step(epoch + 1, eval_metric)`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        batches, (eval_images, eval_labels) = digits_batches()
        model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
        optimizer = timm_optim.create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05)
        lr_scheduler = AutoWU(optimizer, TRAIN_BATCHES, EPOCHS, immediate_cooldown=True)
        losses, applied_lrs, epoch_ends = [], [], []
        num_updates = 0
        for epoch in range(EPOCHS):
            model.train()
            for images, labels in batches:
                applied_lrs.append([group["lr"] for group in optimizer.param_groups])
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                num_updates += 1
                lr_scheduler.step_update(num_updates=num_updates, metric=loss)
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                eval_metric = (model(eval_images).argmax(dim=1) == eval_labels).float().mean().item()
            before = (copy.deepcopy(lr_scheduler.state_dict()), [group["lr"] for group in optimizer.param_groups])
            lr_scheduler.step(epoch + 1, eval_metric)
            after = (lr_scheduler.state_dict(), [group["lr"] for group in optimizer.param_groups])
            epoch_ends.append((before, after))
        return lr_scheduler, losses, applied_lrs, epoch_ends
    finally:
        torch.set_num_threads(threads)


def test_timm_loop_applies_the_lrs_of_autowu_stepped_by_hand(timm_run):
    lr_scheduler, losses, applied_lrs, _ = timm_run
    assert lr_scheduler.switch_step is not None  # warmup ended inside the run: both phases are compared
    by_hand = AutoWU(make_optimizer(), TRAIN_BATCHES, EPOCHS, immediate_cooldown=True)
    expected = []
    for loss in losses:
        expected.append(by_hand.get_last_lr()[0])
        by_hand.step(loss)
    assert [lrs[0] for lrs in applied_lrs] == expected
    assert all(lrs[1] == lrs[0] for lrs in applied_lrs)  # timm's two groups (decay / no decay) share the LR
    assert (by_hand.switch_step, by_hand.peak_lr) == (lr_scheduler.switch_step, lr_scheduler.peak_lr)


def test_timm_epoch_end_call_changes_nothing(timm_run):
    _, _, _, epoch_ends = timm_run
    assert len(epoch_ends) == EPOCHS
    for before, after in epoch_ends:
        assert_state_equal(after, before)


def test_timm_step_update_refuses_a_skipped_update():
    lr_scheduler = AutoWU(make_optimizer(), TRAIN_BATCHES, EPOCHS)
    lr_scheduler.step_update(num_updates=1, metric=2.0)
    lr_scheduler.step_update(num_updates=1, metric=2.0)  # an update already counted: nothing happens
    assert lr_scheduler.last_step == 1
    with pytest.raises(ValueError, match="`num_updates`"):
        lr_scheduler.step_update(num_updates=3, metric=2.0)
    assert lr_scheduler.last_step == 1 and len(lr_scheduler.state_dict()["pending"]) == 1


def test_timm_step_update_under_accelerate_goes_on_past_an_update_that_fp16_overflow_skipped():
    """timm's `num_updates` counts every update; under Accelerate one that loss scaling skipped is no AutoWU step
    (the LR holds over it), and the next `step_update` follows on instead of raising; a resume from a state saved
    after the skip continues the count."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # Accelerate makes none on the CPU: an inf loss skips the update
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Linear(4, 1))
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1.0))
    lr_scheduler = AutoWU(optimizer, total_steps=100, rewind=False)
    lrs, skipped = [], []
    for num_updates in range(1, 21):
        x = torch.randn(8, 4)
        loss = F.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        if num_updates == 6:
            loss = loss * math.inf
        accelerator.backward(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad()
        skipped.append(accelerator.optimizer_step_was_skipped)
        lr_scheduler.step_update(num_updates, metric=loss)
        if num_updates == 10:
            state = lr_scheduler.state_dict()
    assert skipped == [i == 5 for i in range(20)]
    assert lr_scheduler.last_step == 19
    assert lrs[6] == lrs[5] and lrs[5] > lrs[4] and lrs[7] > lrs[6]  # the ramp holds over the skipped update
    resumed = AutoWU(optimizer, total_steps=100, rewind=False)
    resumed.load_state_dict(state)
    resumed.step_update(10, metric=1.0)  # timm's call on resume, with the updates done so far: nothing happens
    assert resumed.last_step == 9
    resumed.step_update(11, metric=1.0)
    assert resumed.last_step == 10


def test_layer_wise_lr_decay_scales_every_group_as_timms_own_schedulers_do():
    """timm's layer-wise LR decay gives every group the same `lr` and an `lr_scale` that only timm's schedulers
    apply: AutoWU in their place must apply it too, through warmup, the switch and the decay, in a real run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        batches, _ = digits_batches()
        model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
        optimizer = timm_optim.create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.75)
        scales = [group["lr_scale"] for group in optimizer.param_groups]
        assert len(set(scales)) > 2 and max(scales) == 1.0  # the head at the full LR, earlier layers below
        lr_scheduler = AutoWU(optimizer, TRAIN_BATCHES, EPOCHS)
        # timm's own scheduler, on a twin optimizer with the same groups, turns one value into the groups' LRs
        twin = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 1.0, "lr_scale": s} for s in scales])
        reference = timm_scheduler.StepLRScheduler(twin, decay_t=10**9)
        warmup = lr_scheduler.warmup_steps
        for t in range(TRAIN_BATCHES * EPOCHS):
            applied = [group["lr"] for group in optimizer.param_groups]
            value = applied[scales.index(1.0)]
            if lr_scheduler.phase == "warmup":  # the closed-form ramp, 1e-5 to 1 over the warmup cap
                assert value == pytest.approx(1e-5 * (1 / 1e-5) ** (t / warmup), rel=1e-9)
            reference.update_groups(value)
            assert applied == pytest.approx([group["lr"] for group in twin.param_groups], rel=1e-12)
            images, labels = batches[t % TRAIN_BATCHES]
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr_scheduler.step(loss)
        assert lr_scheduler.switch_step is not None  # warmup ended inside the run: both phases were compared
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("scale", [math.nan, -0.5, math.inf, "0.5"])
def test_an_lr_scale_autowu_cannot_apply_is_refused(scale):
    optimizer = torch.optim.SGD(
        [{"params": [torch.zeros(1)], "lr": 1.0}, {"params": [torch.zeros(1)], "lr": 1.0, "lr_scale": scale}]
    )
    with pytest.raises(ValueError, match="group 1 has lr_scale"):
        AutoWU(optimizer, total_steps=100)
    scheduler = AutoWU(make_optimizer(), total_steps=100)  # a group added later is checked when it is first set
    scheduler.optimizer.add_param_group({"params": [torch.zeros(1)], "lr": 1.0, "lr_scale": scale})
    with pytest.raises(ValueError, match="group 1 has lr_scale"):
        scheduler.step(1.0)


def test_a_group_added_with_an_lr_scale_follows_it():
    scheduler = AutoWU(make_optimizer((0.5,)), total_steps=100)
    scheduler.step(1.0)
    scheduler.optimizer.add_param_group({"params": [torch.zeros(1)], "lr": 0.5, "lr_scale": 0.25})
    for t in range(1, 100):
        scheduler.step(1.0 / t)
        lrs = [group["lr"] for group in scheduler.optimizer.param_groups]
        assert lrs[1] == pytest.approx(0.25 * lrs[0], rel=1e-12)
