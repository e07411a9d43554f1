"""A run resumed from a checkpoint continues exactly as the uninterrupted run does."""

import pytest
import torch

from medseg.engine.checkpoint import load_checkpoint


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_run_matches_uninterrupted_run(make_trainer, tmp_path, num_workers):
    common = dict(num_epochs=4, scheduler="cosine_annealing", warmup_epochs=1,
                  num_workers=num_workers, train_cases=16)
    straight = make_trainer(checkpoint_dir=tmp_path / "straight", **common)
    straight.fit()

    first = make_trainer(checkpoint_dir=tmp_path / "interrupted", **{**common, "num_epochs": 4})
    first.settings.num_epochs = 2  # the process "dies" after epoch 2
    first.fit()
    resumed = make_trainer(checkpoint_dir=tmp_path / "resumed", seed=123, **common)
    resumed.resume(tmp_path / "interrupted" / "last_model.pth")
    resumed.fit()

    expected = straight.reporter.metrics["train_loss"][8:]  # optimizer steps 9..16
    got = resumed.reporter.metrics["train_loss"]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-7)
    for name, value in straight.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[name], atol=1e-6), name
    assert resumed.schedule.current_lr() == pytest.approx(straight.schedule.current_lr())


def test_checkpoint_holds_the_full_state_and_loads_safely(make_trainer, tmp_path):
    trainer = make_trainer(checkpoint_dir=tmp_path, num_epochs=1)
    trainer.fit()
    # The safe unpickler: any pickled class in the file would make this raise.
    state = torch.load(tmp_path / "last_model.pth", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "rng",
                "config", "early_stopping", "monitor_value"):
        assert key in state, key
    assert state["epoch"] == 1 and state["global_step"] == 8
    assert state["config"] == {"note": "test"}
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert load_checkpoint(tmp_path / "last_model.pth")["epoch"] == 1


def test_resume_finds_the_best_checkpoint_beside_a_weights_subfolder(make_trainer, tmp_path,
                                                                     caplog):
    names = {"best_name": "weights/best.pt", "last_name": "weights/last.pt",
             "periodic_name": "weights/epoch_{epoch}.pt"}
    make_trainer(checkpoint_dir=tmp_path / "first", checkpoint_options=names, num_epochs=2).fit()
    resumed = make_trainer(checkpoint_dir=tmp_path / "resumed", checkpoint_options=names,
                           num_epochs=3)
    resumed.resume(tmp_path / "first" / "weights" / "last.pt")
    with caplog.at_level("WARNING"):
        resumed.fit()
    assert "best weights are not available" not in caplog.text
