"""BatchNorm calibration: the running statistics are those of the calibration batches, and
validation (eval mode) uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.engine.bn_calibration import BatchNormCalibration, calibrate_batchnorm


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 1, 1))


def test_running_statistics_are_the_average_of_the_calibration_chunks():
    model = net()
    model.train()
    for _ in range(5):  # statistics of other data before calibration
        model(torch.randn(8, 1, 8, 8) * 5 + 3)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    seen = calibrate_batchnorm(model, batches, slice_batch=4)
    assert seen == 24
    conv, bn = model[0], model[1]
    with torch.no_grad():
        chunks = [conv(chunk) for batch in batches for chunk in batch.split(4)]
    means = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    variances = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5)
    assert torch.allclose(bn.running_var, variances, atol=1e-5)
    assert bn.momentum == 0.1  # normal tracking restored for the next epoch


def test_validation_in_eval_mode_uses_the_calibrated_statistics():
    model = net()
    batches = [torch.randn(6, 1, 8, 8) + 2]
    calibrate_batchnorm(model, batches, slice_batch=3)
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    conv, bn = model[0], model[1]
    with torch.no_grad():
        expected = model[3](F.relu(F.batch_norm(conv(x), bn.running_mean, bn.running_var,
                                                bn.weight, bn.bias, False, 0.0, bn.eps)))
        assert torch.allclose(model(x), expected, atol=1e-6)
        # ...and not the statistics of the validation batch itself (the original's bug).
        own = model[3](F.relu(F.batch_norm(conv(x), None, None, bn.weight, bn.bias, True,
                                           0.0, bn.eps)))
        assert not torch.allclose(model(x), own, atol=1e-3)


class FakeTrainer:
    def __init__(self, loader):
        self.train_loader = loader
        self.device = torch.device("cpu")


def test_callback_calibrates_on_the_first_warmup_batches_of_the_training_loader():
    model = net()
    loader = [{"image": torch.randn(4, 1, 8, 8) + i} for i in range(5)]
    callback = BatchNormCalibration(lambda batch, device: batch["image"], warmup_batches=2,
                                    slice_batch=4)
    assert callback.model_for_validation(FakeTrainer(loader), model) is model
    assert callback.samples_seen == 8
    expected = net()
    calibrate_batchnorm(expected, [b["image"] for b in loader[:2]], slice_batch=4)
    assert torch.allclose(model[1].running_mean, expected[1].running_mean)


@pytest.mark.parametrize("kwargs, message", [({"warmup_batches": 0, "slice_batch": 1},
                                               "warmup_batches must be >= 1")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchNormCalibration(lambda b, d: b, **kwargs)
    with pytest.raises(ValueError, match="slice_batch must be >= 1"):
        calibrate_batchnorm(net(), [], slice_batch=0)
