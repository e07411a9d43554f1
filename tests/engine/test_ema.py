"""Model EMA as a trainer callback: the average is validated, checkpointed and resumed."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.ema import ModelEMA


def test_decay_ramps_up_to_its_setting():
    ema = ModelEMA(torch.nn.Linear(2, 2), decay=0.99, ramp_steps=10)
    assert ema.current_decay(0) == 0
    assert ema.current_decay(10) == pytest.approx(0.99 * (1 - math.exp(-1)))
    assert ema.current_decay(1000) == pytest.approx(0.99)
    assert ModelEMA(torch.nn.Linear(2, 2), decay=0.9, ramp_steps=0).current_decay(1) == 0.9


class _Steps:
    """The little a callback needs of a trainer: its model."""

    def __init__(self, model):
        self.model = model


def test_average_follows_the_exponential_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.9, ramp_steps=0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # moves the BatchNorm running statistics
        ema.on_optimizer_step(_Steps(model))
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = 0.9 * expected[name] + 0.1 * value
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, expected[name], atol=1e-6), name
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked)


def test_bad_decay_names_the_argument():
    with pytest.raises(ValueError, match="^decay must be between 0 and 1"):
        ModelEMA(torch.nn.Linear(1, 1), decay=1.0)


def test_validation_and_checkpoints_use_the_average(make_trainer, tmp_path):
    trainer = make_trainer(checkpoint_dir=tmp_path, num_epochs=2)
    ema = ModelEMA(trainer.model, decay=0.9, ramp_steps=0)
    trainer.callbacks.append(ema)
    trainer.fit()
    last = load_checkpoint(tmp_path / "last_model.pth")
    for name, value in ema.module.state_dict().items():
        assert torch.equal(last["model"][name], value), name
    raw_differs = any(not torch.equal(last["training_model"][n], v)
                      for n, v in ema.module.state_dict().items() if v.is_floating_point())
    assert raw_differs
    # The run ends with the best epoch's average, and that is what validates to the best Dice.
    best = load_checkpoint(tmp_path / "best_model.pth")
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(best["model"][name], value), name
    trainer.model.eval()
    with torch.no_grad():
        again = trainer.task.validate(trainer.model, trainer.val_loader, trainer.device,
                                      trainer.precision)
    assert again["dice"] == pytest.approx(trainer.early_stopping.best)


def test_checkpoint_without_ema_has_no_second_copy(make_trainer, tmp_path):
    make_trainer(checkpoint_dir=tmp_path, num_epochs=1).fit()
    assert "training_model" not in load_checkpoint(tmp_path / "last_model.pth")


def test_resumed_run_continues_the_average(make_trainer, tmp_path):
    def with_ema(trainer):
        trainer.callbacks.append(ModelEMA(trainer.model, decay=0.8, ramp_steps=2))
        return trainer

    common = dict(num_epochs=4, train_cases=16)
    straight = with_ema(make_trainer(checkpoint_dir=tmp_path / "straight", **common))
    straight.fit()
    first = with_ema(make_trainer(checkpoint_dir=tmp_path / "interrupted", **common))
    first.settings.num_epochs = 2
    first.fit()
    resumed = with_ema(make_trainer(checkpoint_dir=tmp_path / "resumed", seed=99, **common))
    resumed.resume(tmp_path / "interrupted" / "last_model.pth")
    resumed.fit()
    expected = straight.reporter.values("val_dice")[2:]
    assert resumed.reporter.values("val_dice") == pytest.approx(expected)
    for name, value in straight.callbacks[0].module.state_dict().items():
        assert torch.allclose(value.float(), resumed.callbacks[0].module.state_dict()[name].float(),
                              atol=1e-6), name
