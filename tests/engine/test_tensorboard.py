"""TensorBoard event files written through the reporter read back with tensorboard itself."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medseg.engine.reporting import RecordingReporter
from medseg.engine.tensorboard import TensorBoardReporter, writable_folder


def read(folder):
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_scalars_go_to_both_reporters_under_their_tags(tmp_path):
    inner = RecordingReporter()
    reporter = TensorBoardReporter(inner, tmp_path / "trn", tmp_path / "val",
                                   {"train_loss": [("train", "Loss/batch")],
                                    "best_val_loss": [("val", "A/best"), ("val", "B/best")]})
    for step in range(3):
        reporter.log_scalar("train_loss", 1.0 / (step + 1), step)
    reporter.log_scalar("best_val_loss", 0.5, 1)
    reporter.log_scalar("val_other", 2.0, 1)
    reporter.log_scalar("epoch_time_s", 3.0, 1)
    reporter.add_hparams({"lr": 1e-3, "channels": [1, 2]})
    reporter.close()
    assert inner.values("train_loss") == [1.0, 0.5, 1.0 / 3]
    train, val = read(tmp_path / "trn"), read(tmp_path / "val")
    assert [e.value for e in train.Scalars("Loss/batch")] == pytest.approx([1.0, 0.5, 1.0 / 3])
    assert [e.step for e in train.Scalars("Loss/batch")] == [0, 1, 2]
    assert "epoch_time_s" in train.Tags()["scalars"]
    assert {"A/best", "B/best", "val_other"} <= set(val.Tags()["scalars"])
    assert "hparams/json/text_summary" in train.Tags()["tensors"]


def test_writable_folder(tmp_path):
    assert writable_folder(tmp_path / "new" / "deeper")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert not writable_folder(blocker / "below")
