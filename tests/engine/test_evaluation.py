import math

import pytest
import torch

from medseg.engine.evaluation import LossMeter


def test_loss_meter_averages_the_total_and_each_term_over_batches():
    meter = LossMeter()
    meter.add(torch.tensor(3.0), {"dice": torch.tensor(1.0), "ce": 2.0})
    meter.add(torch.tensor(5.0), {"dice": torch.tensor(2.0), "ce": 3.0})
    assert meter.summary() == pytest.approx({"loss": 4.0, "loss_dice": 1.5, "loss_ce": 2.5})


def test_an_empty_pass_reports_an_undefined_loss():
    assert math.isnan(LossMeter().summary()["loss"])
