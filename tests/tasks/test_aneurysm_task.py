"""Scoring aneurysm cubes: sliding-window inference, cube classification, Dice on positives,
evaluation files and prediction on volumes of any size."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medseg.data.cube_transforms import cube_transforms
from medseg.data.npz_cubes import CubeRecord
from medseg.engine.checkpoint import atomic_save
from medseg.engine.precision import Precision
from medseg.engine.reporting import RecordingReporter
from medseg.errors import DataError
from medseg.losses.aneurysm import WeightedDiceCELoss
from medseg.models.ensemble import ProbabilityEnsemble
from medseg.tasks.aneurysm import (
    AneurysmTask,
    ensemble_of,
    evaluate_cubes,
    load_models,
    panel_records,
    predict_file,
    predict_probability,
    volume_score,
    write_sample_panels,
)
from medseg.tasks.aneurysm_cv import FoldOutcome, score_ensemble
from tests.cube_factory import write_cube

CPU = torch.device("cpu")
FP32 = Precision("cpu", None)
SHAPE = (8, 16, 16)


class Oracle(nn.Module):
    """Logits of +/-8: voxels more than 4 standard deviations above the mean of the (z-scored)
    cube are aneurysm; noise alone stays below that."""

    def forward(self, x):
        return torch.where(x > 4.0, 8.0, -8.0)


class CountingOracle(Oracle):
    def __init__(self):
        super().__init__()
        self.windows = []

    def forward(self, x):
        self.windows.append(tuple(x.shape))
        return super().forward(x)


def cube(positive: bool, *, corner=(2, 4, 4)):
    image = np.zeros((1, *SHAPE), np.float32)
    mask = np.zeros((1, *SHAPE), np.float32)
    if positive:
        z, y, x = corner
        image[0, z:z + 3, y:y + 3, x:x + 3] = 100
        mask[0, z:z + 3, y:y + 3, x:x + 3] = 1
    image += np.random.default_rng(0).normal(0, 1, image.shape).astype(np.float32)
    return {"image": image, "mask": mask, "label": np.float32(positive),
            "name": f"{'pos' if positive else 'neg'}_s_0.npz"}


def loader(samples):
    transform = cube_transforms(train=False, crop_size=(8, 8, 8))
    batches = []
    for sample in samples:
        item = transform(sample)
        batches.append({"image": item["image"][None], "mask": item["mask"][None],
                        "label": torch.tensor([item["label"]]), "name": [item["name"]]})
    return batches


def task(**options):
    settings = dict(roi_size=(8, 8, 8), sw_batch_size=2, sw_overlap=0.25, pos_thr=0.1)
    settings.update(options)
    return AneurysmTask(WeightedDiceCELoss(pos_weight=10.0), **settings)


def test_volume_scores():
    probability = torch.tensor([0.05, 0.2, 0.6, 0.9])
    assert volume_score(probability, "max", 0.1) == pytest.approx(0.9)
    assert volume_score(probability, "fraction", 0.1) == pytest.approx(0.75)
    assert volume_score(probability, "fraction", 0.7) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="score method"):
        volume_score(probability, "mean", 0.1)


def test_a_perfect_model_scores_dice_one_and_auc_one():
    samples = [cube(True), cube(True, corner=(4, 10, 10)), cube(False), cube(False)]
    metrics = task().validate(Oracle(), loader(samples), CPU, FP32)
    assert metrics["dice"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["auc"] == 1.0
    assert metrics["accuracy"] == metrics["pos_accuracy"] == metrics["neg_accuracy"] == 1.0
    assert math.isfinite(metrics["loss"])
    assert set(metrics) == {*task().metric_names(), "loss_dice", "loss_ce"}
    assert metrics["loss"] == pytest.approx(metrics["loss_dice"] + metrics["loss_ce"])


def test_sliding_windows_cover_the_whole_cube_in_crop_sized_batches():
    model = CountingOracle()
    results = task(sw_batch_size=3).score_loader(model, loader([cube(True, corner=(5, 12, 12))]),
                                                 CPU, FP32)
    # 8 x 16 x 16 in 8 x 8 x 8 windows overlapping by a quarter: 1 x 3 x 3 windows.
    assert sum(shape[0] for shape in model.windows) == 9
    assert all(shape[1:] == (1, 8, 8, 8) and shape[0] <= 3 for shape in model.windows)
    assert results[0].dice == pytest.approx(1.0, abs=1e-4)  # found in the far corner too


def test_pos_thr_decides_which_cubes_are_called_positive():
    class Faint(nn.Module):
        def forward(self, x):
            return torch.where(x > 4.0, -1.0, -8.0)  # sigmoid(-1) = 0.27 on the ball

    samples = loader([cube(True), cube(False)])
    low = task(pos_thr=0.1).validate(Faint(), samples, CPU, FP32)
    high = task(pos_thr=0.5).validate(Faint(), samples, CPU, FP32)
    assert (low["pos_accuracy"], high["pos_accuracy"]) == (1.0, 0.0)
    assert low["dice"] == 0.0  # nothing above 0.5: the segmentation is empty


def test_the_fraction_score_ranks_by_how_much_is_found():
    small_ball = cube(True)
    big = cube(True)
    big["image"][0, 0:4, 0:4, 0:4] = 100
    negative = cube(False)
    negative["image"][0, 0, 0, 0] = 100  # one bright voxel: max score as high as a positive
    samples = loader([small_ball, big, negative])
    by_max = task(score_method="max").score_loader(Oracle(), samples, CPU, FP32)
    by_fraction = task(score_method="fraction").score_loader(Oracle(), samples, CPU, FP32)
    assert by_max[2].score == pytest.approx(by_max[0].score)
    assert by_fraction[1].score > by_fraction[0].score > by_fraction[2].score
    assert [r.predicted for r in by_max] == [r.predicted for r in by_fraction]


def test_evaluation_writes_per_cube_metrics_roc_and_figures(tmp_path):
    samples = loader([cube(True), cube(False), cube(True, corner=(4, 9, 9))])
    report = evaluate_cubes(Oracle(), samples, task=task(), device=CPU, precision=FP32,
                            output_dir=tmp_path, split="fold", num_figures=1)
    record = json.loads((tmp_path / "per_cube_metrics.json").read_text())
    assert [c["label"] for c in record["cubes"]] == [1, 0, 1]
    assert record["cubes"][1]["dice"] is None
    assert record["cubes"][0]["dice"] == pytest.approx(1, abs=1e-4)
    assert (tmp_path / "roc_curve.png").is_file()
    assert sorted(p.name for p in tmp_path.glob("*_s_0.png")) == ["neg_s_0.png", "pos_s_0.png"]
    assert report.metrics["auc"] == 1.0 and report.info["confusion"]["tp"] == 2


def test_prediction_on_a_cube_matches_validation_and_covers_larger_volumes():
    sample = cube(True, corner=(3, 6, 9))
    volume = np.clip(sample["image"][0], 0, 255).astype(np.uint8)
    probability = predict_probability(Oracle(), volume, task=task(), cube_shape=SHAPE,
                                      device=CPU, precision=FP32)
    assert probability.shape == SHAPE
    assert ((probability > 0.5) == (sample["mask"][0] > 0)).all()
    # A volume three cubes wide: each cube-sized window is z-scored on its own.
    large = np.tile(volume, (1, 1, 3))
    probability = predict_probability(Oracle(), large, task=task(), cube_shape=SHAPE, device=CPU,
                                      precision=FP32)
    assert probability.shape == (8, 16, 48)
    assert (probability > 0.5).sum() == 3 * (sample["mask"] > 0).sum()


def test_load_models_builds_each_from_its_stored_config(tmp_path):
    def build(config):
        return nn.Conv3d(1, 1, config["kernel"], padding=config["kernel"] // 2)

    net = build({"kernel": 3})
    atomic_save({"model": net.state_dict(), "config": {"model": {"kernel": 3}}}, tmp_path / "a.pth")
    loaded = load_models([tmp_path / "a.pth"], build, CPU)[0]
    assert not loaded.training
    assert torch.equal(loaded.weight, net.weight)
    atomic_save({"model": net.state_dict(), "config": {}}, tmp_path / "b.pth")
    with pytest.raises(DataError, match=r"b\.pth holds no model config"):
        load_models([tmp_path / "b.pth"], build, CPU)
    atomic_save({"model": net.state_dict(), "config": {"model": {"kernel": 5}}}, tmp_path / "c.pth")
    with pytest.raises(DataError, match=r"c\.pth does not fit its own model config"):
        load_models([tmp_path / "c.pth"], build, CPU)


def test_one_model_is_used_as_it_is_and_several_are_averaged():
    single = Oracle()
    assert ensemble_of([single]) is single
    assert isinstance(ensemble_of([single, Oracle()]), ProbabilityEnsemble)


def test_predict_file_writes_the_probability_map_and_the_score(tmp_path):
    volume = np.random.default_rng(1).normal(90, 3, SHAPE).astype(np.uint8)
    volume[2:5, 4:7, 4:7] = 200  # the ball: far above the noise once z-scored
    mask = (volume == 200).astype(np.float16)
    source = write_cube(tmp_path / "pos_s_0.npz", volume, mask, label=1, fold=0)
    record, paths = predict_file(Oracle(), source, tmp_path / "out", task=task(),
                                 cube_shape=SHAPE, intensity_window=None, target_spacing=None,
                                 device=CPU, precision=FP32, checkpoints=["a.pth"])
    assert [p.name for p in paths] == ["pos_s_0_probability.nii.gz", "pos_s_0_prediction.json"]
    assert record["predicted_label"] == 1 and record["label"] == 1
    assert record["checkpoints"] == ["a.pth"] and record["score"] == pytest.approx(1.0, abs=1e-3)
    assert json.loads(paths[1].read_text()) == record
    assert nib.load(paths[0]).shape == SHAPE[::-1]


def test_sample_panels_alternate_positives_and_negatives(tmp_path):
    records = [CubeRecord(path=tmp_path / f"{kind}_{i}.npz", fold=0, label=label,
                          series_id=str(i), index=0, shape=SHAPE, mask_max=float(label))
               for i, (kind, label) in enumerate([("pos", 1), ("pos", 1), ("pos", 1),
                                                  ("neg", 0)])]
    chosen = panel_records(records, 3)
    assert [r.name for r in chosen] == ["pos_0.npz", "neg_3.npz", "pos_1.npz"]
    stored = [cube(True), cube(False)]
    paths = write_sample_panels(stored, cube_transforms(train=True, crop_size=(8, 8, 8)),
                                tmp_path / "panels", seed=0)
    assert [p.name for p in paths] == ["sample_00_pos_s_0.png", "sample_01_neg_s_0.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_the_fold_ensemble_is_scored_as_an_evaluation_of_its_own(tmp_path):
    for fold in range(2):
        directory = tmp_path / f"fold_{fold}"
        directory.mkdir()
        atomic_save({"model": {}, "config": {"model": {}}}, directory / "best_model.pth")
    (tmp_path / "fold_0" / "evaluation_test").mkdir()
    (tmp_path / "fold_0" / "evaluation_test" / "test_metrics.json").write_text('{"test_auc": 0.5}')
    outcomes = [FoldOutcome(fold, tmp_path / f"fold_{fold}", {},
                            tmp_path / f"fold_{fold}" / "best_model.pth") for fold in range(2)]
    reporter = RecordingReporter()
    scores = score_ensemble(outcomes, loader([cube(True), cube(False)]),
                            build=lambda config: Oracle(), task=task(), root=tmp_path,
                            device=CPU, precision=FP32, reporter=reporter)
    assert scores["ensemble_test_auc"] == 1.0 and scores["fold_models_test_auc_mean"] == 0.5
    assert (tmp_path / "evaluation_ensemble_test" / "ensemble_test_metrics.json").is_file()
    assert reporter.values("ensemble_test_dice") == [pytest.approx(1.0, abs=1e-4)]
