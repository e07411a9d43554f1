import math
from pathlib import Path
import warnings

import pytest
import torch

from medseg.engine import trainer as trainer_module
from medseg.engine.trainer import StepOutput
from medseg.errors import TrainingDivergedError
from tests.engine.conftest import BlobTask


def test_training_lowers_loss_and_raises_dice(make_trainer):
    trainer = make_trainer(num_epochs=4)
    trainer.model.eval()
    with torch.no_grad():
        untrained = trainer.task.validate(trainer.model, trainer.val_loader, trainer.device,
                                          trainer.precision)
    result = trainer.fit()
    losses = trainer.reporter.values("train_loss")
    dice = trainer.reporter.values("val_dice")
    assert sum(losses[-4:]) < 0.3 * sum(losses[:4])
    assert untrained["dice"] < 0.5 and dice[-1] > 0.85
    assert result.best_metric == pytest.approx(max(dice))


def test_every_epoch_records_lr_time_throughput_and_memory(make_trainer):
    trainer = make_trainer(num_epochs=2)
    trainer.fit()
    metrics = trainer.reporter.metrics
    for name in ("lr", "epoch_time_s", "samples_per_s", "rss_mb", "rss_peak_mb", "val_loss",
                 "train_loss_epoch", "train_loss_bce_epoch"):
        assert [step for step, _ in metrics[name]] == [1, 2], name
    assert all(v > 0 for v in trainer.reporter.values("samples_per_s"))
    # CPU runs carry no GPU figures rather than zeros that look like measurements.
    assert "gpu_mem_max_allocated_mb" not in metrics
    assert trainer.reporter.info["best_epoch"] in (1, 2)


def test_log_frequency_sets_the_number_of_logged_training_points(make_trainer):
    every_step = make_trainer(num_epochs=1, log_frequency=1)
    every_step.fit()
    every_fourth = make_trainer(num_epochs=1, log_frequency=4)
    every_fourth.fit()
    assert len(every_step.reporter.values("train_loss")) == 8
    assert [s for s, _ in every_fourth.reporter.metrics["train_loss"]] == [4, 8]


def test_gradient_accumulation_matches_a_larger_batch():
    """Two accumulated batches of 2 make the same update as one batch of 4."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)

    def step(batches, accumulate):
        m = torch.nn.Linear(3, 1)
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for xb, yb in batches:
            loss = torch.nn.functional.mse_loss(m(xb), yb)
            (loss / accumulate).backward()
        opt.step()
        return m.weight.detach().clone()

    one = step([(x, y)], 1)
    two = step([(x[:2], y[:2]), (x[2:], y[2:])], 2)
    assert torch.allclose(one, two, atol=1e-6)


def test_accumulation_reduces_optimizer_steps(make_trainer):
    plain = make_trainer(num_epochs=1)
    plain.fit()
    accumulated = make_trainer(num_epochs=1, gradient_accumulation_steps=3)
    accumulated.fit()
    assert plain.global_step == 8
    assert accumulated.global_step == 3  # 8 batches in groups of 3, 3, 2


def test_gradient_clipping_bounds_the_update(make_trainer):
    clipped = make_trainer(num_epochs=1, gradient_clip_norm=1e-3, learning_rate=0.5)
    clipped.fit()
    norms = clipped.reporter.values("train_grad_norm")
    assert norms and all(n > 1e-3 for n in norms)  # logged norms are the pre-clip norms
    free = make_trainer(num_epochs=1, learning_rate=0.5)
    free.fit()
    assert "train_grad_norm" not in free.reporter.metrics


def test_nan_loss_stops_with_a_clear_message(make_trainer):
    class Exploding:
        def __init__(self):
            self.calls = 0

        def metric_names(self):
            return ["loss"]

        def training_step(self, model, batch, device):
            self.calls += 1
            out = model(batch["image"]).mean()
            loss = out * (float("nan") if self.calls == 3 else 1.0)
            return StepOutput(loss, {}, 1)

        def validate(self, model, loader, device, precision):
            return {"loss": 0.0}

    trainer = make_trainer(task=Exploding(), monitor="val_loss", monitor_mode="min")
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, optimizer step 3: loss=nan"):
        trainer.fit()


def test_unknown_monitor_names_the_choices(make_trainer):
    with pytest.raises(ValueError, match=r"settings.monitor='val_dcie'.*val_loss, val_dice"):
        make_trainer(monitor="val_dcie")


def test_early_stopping_stops_and_restores_the_best_weights(make_trainer):
    class Scripted:
        """Validation Dice peaks at epoch 2 and then falls."""

        def __init__(self):
            self.inner = make_trainer().task
            self.epoch = 0

        def metric_names(self):
            return ["loss", "dice"]

        def training_step(self, model, batch, device):
            return self.inner.training_step(model, batch, device)

        def validate(self, model, loader, device, precision):
            self.epoch += 1
            return {"loss": 1.0, "dice": [0.2, 0.9, 0.5, 0.4, 0.3, 0.2][self.epoch - 1]}

    snapshots = {}

    class Snapshot(trainer_module.Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            snapshots[epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer = make_trainer(task=Scripted(), num_epochs=6, early_stopping_patience=2)
    trainer.callbacks.append(Snapshot())
    result = trainer.fit()
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, snapshots[2][name]), name
    assert not torch.equal(snapshots[2]["body.0.weight"], snapshots[4]["body.0.weight"])


def test_memory_cleanup_runs_at_its_frequency(make_trainer, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "cleanup_memory", lambda device: calls.append(device))
    make_trainer(num_epochs=1, memory_cleanup_frequency=3).fit()
    assert len(calls) == 2  # steps 3 and 6 of 8
    calls.clear()
    make_trainer(num_epochs=1, memory_cleanup_frequency=0).fit()
    assert calls == []


def test_memory_cleanups_scan_only_what_is_new_during_an_epoch(make_trainer):
    import gc

    frozen = []

    class Watch(trainer_module.Callback):
        def on_optimizer_step(self, trainer):
            frozen.append(gc.get_freeze_count())

    trainer = make_trainer(num_epochs=2, memory_cleanup_frequency=3)
    trainer.callbacks.append(Watch())
    trainer.fit()
    # Before the epoch's first cleanup nothing is frozen; after it the survivors are, until
    # the epoch ends.
    assert frozen[:3] == [0, 0, 0] and frozen[3] > 0
    assert gc.get_freeze_count() == 0


def test_validation_metrics_undefined_this_epoch_are_left_out(make_trainer):
    class Partial(type(make_trainer().task)):
        def metric_names(self):
            return ["loss", "dice", "dice_rare"]

        def validate(self, model, loader, device, precision):
            return {**super().validate(model, loader, device, precision), "dice_rare": math.nan}

    trainer = make_trainer(task=Partial(), num_epochs=1)
    trainer.fit()
    assert "val_dice_rare" not in trainer.reporter.metrics and "val_dice" in trainer.reporter.metrics


def test_a_warning_during_an_epoch_gets_a_line_of_its_own(make_trainer, capsys):
    """Not glued to the progress bar's half-drawn line, on the terminal or in the output a
    run records."""
    class WarningTask(BlobTask):
        calls = 0

        def training_step(self, model, batch, device):
            self.calls += 1
            if self.calls == 3:
                warnings.warn("a warning in the middle of an epoch", UserWarning)
            return super().training_step(model, batch, device)

    trainer = make_trainer(task=WarningTask(), num_epochs=1, progress_bar=True)
    trainer.fit()
    err = capsys.readouterr().err
    [line] = [line for line in err.replace("\r", "\n").split("\n") if ": UserWarning: " in line]
    assert line.endswith("test_trainer.py:{}: UserWarning: a warning in the middle of an epoch"
                         .format(line.rsplit(":", 3)[1]))
    assert line.startswith(str(Path(__file__).parent))
    assert "epoch 1/1" in err
