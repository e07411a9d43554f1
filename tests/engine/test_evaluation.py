import json
import math

import pytest
import torch

from medseg.engine.evaluation import (
    EvaluationReport,
    LossMeter,
    record_evaluation,
    validation_pass,
)
from medseg.engine.precision import Precision
from medseg.engine.reporting import RecordingReporter


def test_loss_meter_averages_the_total_and_each_term_over_batches():
    meter = LossMeter()
    meter.add(torch.tensor(3.0), {"dice": torch.tensor(1.0), "ce": 2.0})
    meter.add(torch.tensor(5.0), {"dice": torch.tensor(2.0), "ce": 3.0})
    assert meter.summary() == pytest.approx({"loss": 4.0, "loss_dice": 1.5, "loss_ce": 2.5})


def test_an_empty_pass_reports_an_undefined_loss():
    assert math.isnan(LossMeter().summary()["loss"])


CPU = torch.device("cpu")
FP32 = Precision("cpu", None)


def test_validation_pass_scores_each_batch_and_averages_the_loss_per_batch():
    batches = [{"image": torch.ones(2, 1, 2), "mask": torch.zeros(2, 1, 2), "name": ["a", "b"]},
               {"image": 3 * torch.ones(1, 1, 2), "mask": torch.zeros(1, 1, 2), "name": ["c"]}]
    seen = []
    losses = validation_pass(
        lambda image: 2 * image, batches, device=CPU, precision=FP32,
        loss=lambda output, batch: (output.mean(), {"half": output.mean() / 2}),
        on_batch=lambda batch, output, total, terms: seen.append(
            (batch["name"], float(output.sum()), float(total))))
    assert losses.summary() == pytest.approx({"loss": 4.0, "loss_half": 2.0})
    assert seen == [(["a", "b"], 8.0, 2.0), (["c"], 12.0, 6.0)]


def test_validation_pass_takes_a_forward_of_its_own():
    batches = [{"image": torch.ones(1, 1, 2), "mask": torch.zeros(1, 1, 2)}]
    losses = validation_pass(None, batches, device=CPU, precision=FP32,
                             forward=lambda image: image + 1,
                             loss=lambda output, batch: (output.sum(), {}),
                             on_batch=lambda *_: None)
    assert losses.summary() == {"loss": 4.0}


def test_record_evaluation_logs_writes_and_attaches_an_evaluation(tmp_path):
    def evaluate(model, loader, *, task, device, precision, output_dir, split):
        output_dir.mkdir(parents=True)
        figure = output_dir / "figure.png"
        figure.write_bytes(b"png")
        return EvaluationReport(metrics={"dice": 0.5, "auc": math.nan}, headline=["dice"],
                                artifacts=[figure], info={"cases": len(loader)})

    reporter = RecordingReporter()
    headline = record_evaluation(evaluate, torch.nn.Identity(), None, [1, 2], split="test",
                                 directory=tmp_path / "evaluation_test", device=CPU,
                                 precision=FP32, reporter=reporter)
    assert headline == {"test_dice": 0.5}
    assert dict(reporter.metrics) == {"test_dice": [(0, 0.5)]}  # an undefined AUC is not logged
    written = json.loads((tmp_path / "evaluation_test" / "test_metrics.json").read_text())
    assert written["test_dice"] == 0.5 and math.isnan(written["test_auc"])
    assert [name for _, name in reporter.artifacts] == ["test_metrics.json", "figure.png"]
    assert reporter.info == {"evaluation_test": {"cases": 2}}
