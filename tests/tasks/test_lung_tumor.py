"""Lung-tumour scoring, figures, the overfit check, and prediction on PNG and NIfTI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medseg.data.msd import slice_to_image, window
from medseg.data.png_slices import PNGSliceDataset, SliceRecord
from medseg.data.slice_transforms import slice_transforms
from medseg.engine.checkpoint import atomic_save
from medseg.engine.precision import resolve_precision
from medseg.engine.reporting import RecordingReporter
from medseg.errors import ConfigError, DataError
from medseg.losses.dice_bce import SegmentationLoss
from medseg.models.attention_unet import AttentionUNet
from medseg.tasks.lung_tumor import (
    Counts,
    LungTumorTask,
    TumorScores,
    choose_examples,
    overfit_check,
    overfit_slices,
    remove_small_components,
    render_validation_predictions,
)
from medseg.tasks.lung_tumor_predict import (
    SlicePredictor,
    find_sources,
    predict_with_checkpoint,
    run_prediction,
)

CPU = torch.device("cpu")
FP32 = resolve_precision("none", CPU)


class Thresholding(nn.Module):
    """A 'model' whose tumour logit is the image brightness minus 0.5: bright is tumour."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), (x - 0.5) * 20], dim=1)


def masks(*rows):
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), 1, 1, -1)


def test_counts_give_dice_iou_and_accuracy():
    counts = Counts()
    counts.add(masks([1, 1, 0, 0]), masks([1, 0, 1, 0]))
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == (1, 1, 1, 1)
    assert counts.dice == 0.5 and counts.iou == pytest.approx(1 / 3) and counts.accuracy == 0.5
    assert math.isnan(Counts().dice)


def test_scores_pool_pixels_and_average_volumes():
    scores = TumorScores()
    # Volume a: perfect; volume b: a false positive on a slice without tumour; c: all empty.
    scores.update(masks([1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]),
                  masks([1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]),
                  ["a", "a", "b", "c"])
    summary = scores.summary()
    assert summary["tumor_dice_pooled"] == pytest.approx(4 / 5)  # 2TP / (2TP + FP + FN) pooled
    assert summary["tumor_dice"] == summary["tumor_dice_pooled"]
    assert summary["tumor_dice_per_volume"] == pytest.approx(0.5)  # a: 1, b: 0, c: undefined
    assert summary["tumor_dice_per_slice"] == pytest.approx(1.0)   # one tumour slice, perfect
    assert summary["pixel_accuracy"] == pytest.approx(15 / 16)
    assert summary["tumor_iou"] == pytest.approx(2 / 3)


def test_three_dice_ways_differ_as_defined_on_a_hand_made_case():
    """Two volumes of 8-pixel slices. Volume a: a large tumour found exactly on one slice, a
    small one missed half on another, and an empty slice with 2 false positives; volume b: one
    small tumour slice with 1 false positive beside its 1 true pixel."""
    pred = masks([1, 1, 1, 1, 0, 0, 0, 0],   # a: tumour 4 px, all found         Dice 1
                 [1, 0, 0, 0, 0, 0, 0, 0],   # a: tumour 2 px, 1 found            Dice 2/3
                 [0, 0, 0, 0, 0, 0, 1, 1],   # a: no tumour, 2 false positives
                 [1, 1, 0, 0, 0, 0, 0, 0])   # b: tumour 1 px found, 1 FP         Dice 2/3
    truth = masks([1, 1, 1, 1, 0, 0, 0, 0],
                  [1, 1, 0, 0, 0, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0, 0, 0],
                  [1, 0, 0, 0, 0, 0, 0, 0])
    scores = TumorScores()
    scores.update(pred[:2], truth[:2], ["a", "a"])   # in two batches, as a loader gives them
    scores.update(pred[2:], truth[2:], ["a", "b"])
    summary = scores.summary()
    # Pooled: TP 6, FP 3, FN 1 -> 12 / 16.
    assert summary["tumor_dice_pooled"] == pytest.approx(12 / 16)
    # Per volume: a has TP 5, FP 2, FN 1 -> 10 / 13; b has TP 1, FP 1 -> 2 / 3.
    assert summary["tumor_dice_per_volume"] == pytest.approx((10 / 13 + 2 / 3) / 2)
    # Per tumour slice: 1, 2/3, 2/3 (the empty slice's false positives do not count).
    assert summary["tumor_dice_per_slice"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # Ranks that each scored part of the slices (one volume split between them) merge to the
    # same figures.
    first, second = TumorScores(), TumorScores()
    first.update(pred[:2], truth[:2], ["a", "a"])
    second.update(pred[2:], truth[2:], ["a", "b"])
    first.merge(second)
    assert first.summary() == pytest.approx(summary)


def test_small_3d_components_are_removed_per_volume_before_scoring():
    """Volume a: a tumour over slices 0 and 1, found, and a 2-voxel speck on slice 2; volume
    b holds no tumour and one false-positive pixel."""
    pred = masks([1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1],
                 [0, 0, 0, 1, 0, 0, 0, 0])
    truth = masks([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0] * 8, [0] * 8)
    volumes, slices = ["a", "a", "a", "b"], [0, 1, 2, 7]
    plain = TumorScores()
    plain.update(pred, truth, volumes, slices)
    assert plain.summary()["tumor_dice_per_volume"] == pytest.approx((10 / 13 + 0) / 2)
    # The 5-voxel tumour stays (its slices connect), the specks go: a has TP 5, FN 1; b
    # predicts nothing, so it counts for nothing.
    cleaned = TumorScores(min_component_voxels=3)
    cleaned.update(pred[2:], truth[2:], volumes[2:], slices[2:])   # batches in any order
    cleaned.update(pred[:2], truth[:2], volumes[:2], slices[:2])
    summary = cleaned.summary()
    assert summary["tumor_dice_per_volume"] == pytest.approx(10 / 11)
    assert summary["tumor_dice_pooled"] == pytest.approx(10 / 11)
    assert summary["tumor_dice_per_slice"] == pytest.approx((1 + 2 / 3) / 2)
    # Two ranks, volume a split between them, give the same figures.
    first, second = (TumorScores(min_component_voxels=3) for _ in range(2))
    first.update(pred[:1], truth[:1], volumes[:1], slices[:1])
    second.update(pred[1:], truth[1:], volumes[1:], slices[1:])
    first.merge(second)
    assert first.summary() == pytest.approx(summary)
    # Alone, a 2D image keeps its components of at least the size.
    image = np.zeros((6, 6), dtype=bool)
    image[0, 0] = image[3:5, 3:5] = True
    assert remove_small_components(image, 2).sum() == 4
    assert remove_small_components(image, 0).sum() == 5


def test_predict_removes_small_components_over_a_folder_volume(tmp_path):
    """Slices 0 and 1 of one volume each hold a 3-pixel blob (one component of 6 in 3D);
    a lone image holds the same blob: with min 5 the volume's survives, the lone one goes."""
    (tmp_path / "in").mkdir()
    for name in ("v_slice_0000.png", "v_slice_0001.png", "lone.png"):
        image = np.full((16, 16), 60, dtype=np.uint8)
        image[4, 4:7] = 230
        Image.fromarray(image).save(tmp_path / "in" / name)
    cleaning = SlicePredictor(Thresholding(), (16, 16), CPU, FP32, min_component_voxels=5)
    run_prediction(cleaning, find_sources(tmp_path / "in"), tmp_path / "out", save_overlay=False,
                   window_center=-300, window_width=1400)
    count = {name: int((np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png")) > 0).sum())
             for name in ("v_slice_0000", "v_slice_0001", "lone")}
    assert count == {"v_slice_0000": 3, "v_slice_0001": 3, "lone": 0}
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["min_tumor_voxels"] == 5


def slice_dataset(tmp_path, count=6, size=32):
    """Slices with a bright square (the tumour) in most of them, over three volumes."""
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    records = []
    rng = np.random.default_rng(0)
    for i in range(count):
        mask = np.zeros((size, size), dtype=bool)
        if i % 3:
            y, x = rng.integers(4, size - 10, 2)
            mask[y:y + 3 + i, x:x + 3 + i] = True
        image = np.clip(0.3 + 0.5 * mask + rng.normal(0, 0.05, mask.shape), 0, 1)
        name = f"v{i % 3}_slice_{i:04d}.png"
        Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "images" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "labels" / name)
        records.append(SliceRecord(f"v{i % 3}", i, tmp_path / "images" / name,
                                   tmp_path / "labels" / name, (size, size), int(mask.sum())))
    return PNGSliceDataset(records, slice_transforms((size, size), train=False))


def test_validate_reports_every_metric(tmp_path):
    dataset = slice_dataset(tmp_path)
    task = LungTumorTask(SegmentationLoss("dice_bce"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    metrics = task.validate(Thresholding(), loader, CPU, FP32)
    terms = ["loss_balanced_ce", "loss_dice"]
    assert sorted(metrics) == sorted([*task.metric_names(), *terms])
    assert metrics["loss"] == pytest.approx(sum(metrics[t] for t in terms))
    assert metrics["tumor_dice"] > 0.95 and metrics["tumor_dice_per_volume"] > 0.95
    assert metrics["tumor_dice_per_slice"] > 0.95
    inverted = task.validate(lambda x: -Thresholding()(x), loader, CPU, FP32)
    assert inverted["tumor_dice"] < 0.05 and inverted["loss"] > 3 * metrics["loss"]


def test_threshold_decides_which_pixels_are_tumour():
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1] = torch.tensor([-1.0, 0.0, 1.0])  # probabilities 0.27, 0.5, 0.73
    assert LungTumorTask(None, threshold=0.5).predict(logits).sum() == 1
    assert LungTumorTask(None, threshold=0.2).predict(logits).sum() == 3


def test_examples_spread_over_volumes_with_one_empty_slice(tmp_path):
    dataset = slice_dataset(tmp_path, count=9)
    chosen = choose_examples(dataset, 4)
    records = [dataset.records[i] for i in chosen]
    assert len(chosen) == 4
    assert [r.tumor_pixels > 0 for r in records] == [True, True, True, False]
    assert len({r.volume for r in records[:3]}) >= 2


def test_validation_figure_is_written(tmp_path):
    dataset = slice_dataset(tmp_path / "data")
    path = render_validation_predictions(Thresholding(), LungTumorTask(SegmentationLoss()),
                                         dataset, CPU, FP32, tmp_path / "val_predictions.png")
    with Image.open(path) as figure:
        assert figure.size[0] > 400


def test_prediction_snapshot_of_a_slice_is_written(tmp_path):
    dataset = slice_dataset(tmp_path / "data")
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    path = LungTumorTask(None).render_prediction(Thresholding(), batch, CPU, tmp_path / "p.png")
    with Image.open(path) as figure:
        assert figure.size[0] > 300


def test_overfit_check_memorises_a_few_slices(tmp_path):
    dataset = slice_dataset(tmp_path, count=6)
    samples = [dataset[i] for i in (1, 2, 4, 5)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "mask")}
    torch.manual_seed(0)
    model = AttentionUNet(2, 1, 2, [8, 16, 32])
    result = overfit_check(model, LungTumorTask(SegmentationLoss("dice_bce")), batch, steps=150,
                           learning_rate=3e-3, target_dice=0.95, device=CPU, precision=FP32,
                           report_every=10)
    assert result.passed and result.dice >= 0.95 and result.steps < 150
    assert result.history[0][2] < result.dice


def test_overfit_check_steps_through_the_precision_grad_scaler(tmp_path, monkeypatch):
    """fp16 on CUDA needs the scaler, or small gradients underflow and a sound model fails."""
    calls = []

    class SpyScaler(torch.amp.GradScaler):
        def scale(self, loss):
            calls.append("scale")
            return super().scale(loss)

        def step(self, optimizer, *args, **kwargs):
            calls.append("step")
            return super().step(optimizer, *args, **kwargs)

        def update(self, *args, **kwargs):
            calls.append("update")
            return super().update(*args, **kwargs)

    monkeypatch.setattr(type(FP32), "grad_scaler",
                        lambda self: SpyScaler("cpu", enabled=False))
    dataset = slice_dataset(tmp_path, count=3)
    samples = [dataset[i] for i in range(2)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "mask")}
    overfit_check(AttentionUNet(2, 1, 2, [8, 16]), LungTumorTask(SegmentationLoss("dice")), batch,
                  steps=2, learning_rate=1e-3, target_dice=1.0, device=CPU, precision=FP32)
    assert calls == ["scale", "step", "update"] * 2


# ----------------------------------------------------------------------------- predict
def predictor(threshold=0.5):
    return SlicePredictor(Thresholding(), (32, 32), CPU, FP32, threshold=threshold)


def grey_png(path: Path, size=(40, 50)):
    image = np.full(size, 60, dtype=np.uint8)
    image[10:20, 12:30] = 230
    image[25:30, 5:8] = 140  # probability about 0.45 at the model's scale
    Image.fromarray(image).save(path)
    return image


def test_predict_a_png_writes_a_mask_of_its_size(tmp_path):
    grey_png(tmp_path / "slice.png")
    summary = run_prediction(predictor(), find_sources(tmp_path / "slice.png"), tmp_path / "out",
                             save_overlay=False, window_center=-300, window_width=1400)
    mask = np.asarray(Image.open(tmp_path / "out" / "slice_mask.png"))
    assert mask.shape == (40, 50) and set(np.unique(mask)) == {0, 255}
    assert (mask[10:20, 12:30] == 255).mean() > 0.9 and mask[:8].max() == 0
    assert not (tmp_path / "out" / "slice_overlay.png").exists()
    record = json.loads(summary.read_text())["predictions"][0]
    assert record["tumour_pixels"] == int((mask > 0).sum())


def test_lower_threshold_marks_more_pixels(tmp_path):
    grey_png(tmp_path / "slice.png")
    counts = []
    for threshold in (0.5, 0.3):
        out = tmp_path / f"out{threshold}"
        run_prediction(predictor(threshold), [tmp_path / "slice.png"], out, save_overlay=False,
                       window_center=-300, window_width=1400)
        counts.append((np.asarray(Image.open(out / "slice_mask.png")) > 0).sum())
    assert counts[1] > counts[0]


def test_predict_a_folder_with_overlays(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        grey_png(tmp_path / "in" / name)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    run_prediction(predictor(), find_sources(tmp_path / "in"), tmp_path / "out",
                   save_overlay=True, window_center=-300, window_width=1400)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png",
                       "predictions.json"]
    overlay = np.asarray(Image.open(tmp_path / "out" / "a_overlay.png"))
    assert overlay.shape == (40, 50, 3)
    assert overlay[15, 20, 0] > overlay[15, 20, 1] and overlay[2, 2, 0] == overlay[2, 2, 1]


def test_predict_a_nifti_volume_slice_by_slice(tmp_path):
    hu = np.full((24, 20, 5), -800, dtype=np.int16)
    hu[5:10, 4:8, 2] = 300  # windowed to ~0.93: tumour for the thresholding model
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "case.nii.gz")
    run_prediction(predictor(), find_sources(tmp_path / "case.nii.gz"), tmp_path / "out",
                   save_overlay=True, window_center=-300, window_width=1400)
    mask_image = nib.load(tmp_path / "out" / "case_mask.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    assert mask.shape == hu.shape and mask.dtype == np.uint8
    assert np.allclose(mask_image.affine, affine)
    assert mask[5:10, 4:8, 2].mean() > 0.8 and mask[:, :, [0, 1, 3, 4]].sum() == 0
    overlays = sorted(p.name for p in (tmp_path / "out" / "case_overlays").iterdir())
    assert overlays == ["slice_0002.png"]
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"][0]
    assert record["tumour_slices"] == [2]
    millilitres = mask.sum() * 0.8 * 0.8 * 2.5 / 1000
    assert record["tumour_volume_ml"] == pytest.approx(millilitres, rel=1e-3)
    # The windowing is the conversion's: the same slice as a PNG predicts the same mask.
    png = slice_to_image(window(hu[:, :, 2].astype(np.float32), -300, 1400))
    Image.fromarray(png).save(tmp_path / "slice.png")
    run_prediction(predictor(), [tmp_path / "slice.png"], tmp_path / "png", save_overlay=False,
                   window_center=-300, window_width=1400)
    from_png = np.asarray(Image.open(tmp_path / "png" / "slice_mask.png")) > 0
    assert np.array_equal(slice_to_image(mask[:, :, 2]) > 0, from_png)


class SliceAbove(nn.Module):
    """A 2.5D 'model' on 3 channels (slice below, the slice, slice above) that marks as
    tumour what is bright in the slice above."""

    def forward(self, x):
        assert x.shape[1] == 3
        return torch.cat([torch.zeros_like(x[:, :1]), (x[:, 2:3] - 0.5) * 20], dim=1)


def test_predict_stacks_the_neighbouring_slices_of_a_volume_and_of_a_folder(tmp_path):
    hu = np.full((24, 20, 5), -800, dtype=np.int16)
    hu[5:10, 4:8, 2] = 300   # bright in slice 2 only
    hu[12:16, 10:14, 4] = 300   # and in the last slice, its own neighbour above
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "case.nii.gz")
    (tmp_path / "png").mkdir()
    for k in range(5):
        Image.fromarray(slice_to_image(window(hu[:, :, k].astype(np.float32), -300, 1400))).save(
            tmp_path / "png" / f"case_slice_{k:04d}.png")
    model = SliceAbove()
    predictor = SlicePredictor(model, (32, 32), CPU, FP32, context_slices=1)
    run_prediction(predictor, find_sources(tmp_path / "case.nii.gz"), tmp_path / "out",
                   save_overlay=False, window_center=-300, window_width=1400)
    mask = np.asarray(nib.load(tmp_path / "out" / "case_mask.nii.gz").dataobj)
    assert mask[5:10, 4:8, 1].mean() > 0.8 and mask[5:10, 4:8, 2].sum() == 0
    assert mask[12:16, 10:14, 3].mean() > 0.8 and mask[12:16, 10:14, 4].mean() > 0.8
    assert mask[:, :, 0].sum() == 0
    run_prediction(predictor, find_sources(tmp_path / "png"), tmp_path / "out_png",
                   save_overlay=False, window_center=-300, window_width=1400)
    for k in range(5):
        from_png = np.asarray(Image.open(tmp_path / "out_png" / f"case_slice_{k:04d}_mask.png"))
        assert np.array_equal(from_png > 0, slice_to_image(mask[:, :, k]) > 0), k
    summary = json.loads((tmp_path / "out_png" / "predictions.json").read_text())
    assert summary["context_slices"] == 1
    # One slice given alone finds its neighbours in its folder.
    run_prediction(predictor, [tmp_path / "png" / "case_slice_0001.png"], tmp_path / "one",
                   save_overlay=False, window_center=-300, window_width=1400)
    alone = np.asarray(Image.open(tmp_path / "one" / "case_slice_0001_mask.png")) > 0
    assert alone.sum() > 10 and np.array_equal(alone, slice_to_image(mask[:, :, 1]) > 0)
    # Components of the volume below 21 voxels removed: the 4 x 4 x 2 one stays (32 voxels
    # from slices 3 and 4), the 5 x 4 one of slice 1 goes.
    predictor = SlicePredictor(model, (32, 32), CPU, FP32, context_slices=1,
                               min_component_voxels=21)
    run_prediction(predictor, find_sources(tmp_path / "case.nii.gz"), tmp_path / "clean",
                   save_overlay=False, window_center=-300, window_width=1400)
    cleaned = np.asarray(nib.load(tmp_path / "clean" / "case_mask.nii.gz").dataobj)
    assert cleaned[:, :, :3].sum() == 0 and np.array_equal(cleaned[:, :, 3:], mask[:, :, 3:])


def test_sources_that_cannot_be_predicted(tmp_path):
    with pytest.raises(ConfigError, match="source .*missing.png does not exist"):
        find_sources(tmp_path / "missing.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        find_sources(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="neither an image"):
        find_sources(tmp_path / "notes.txt")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match="deep.png is a 'I;16' image"):
        run_prediction(predictor(), [tmp_path / "deep.png"], tmp_path / "out",
                       save_overlay=False, window_center=0, window_width=1)


def test_overfit_slices_trains_on_the_tumour_slices_of_a_folder(tmp_path):
    slice_dataset(tmp_path / "data", count=6)
    torch.manual_seed(0)
    result, names = overfit_slices(AttentionUNet(2, 1, 2, [4, 8]),
                                   LungTumorTask(SegmentationLoss("dice")), tmp_path / "data",
                                   image_size=(16, 16), samples=2, steps=2, learning_rate=1e-3,
                                   target_dice=1.0, device=CPU, precision=FP32)
    assert result.slices == 2 and result.steps == 2 and len(names) == 2
    assert all(name.startswith("v") and "_slice_" in name for name in names)
    reporter = RecordingReporter()
    result.report(reporter)
    assert len(reporter.values("overfit_loss")) == len(reporter.values("overfit_dice")) == 1
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    for name in ("images", "labels"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty" / name /
                                                         "v0_slice_0000.png")
    with pytest.raises(DataError, match="has no slice with tumour to overfit on"):
        overfit_slices(AttentionUNet(2, 1, 2, [4, 8]), LungTumorTask(SegmentationLoss("dice")),
                       tmp_path / "empty", image_size=(16, 16), samples=2, steps=2,
                       learning_rate=1e-3, target_dice=1.0, device=CPU, precision=FP32)


def test_predict_with_checkpoint_uses_the_network_and_size_it_was_trained_with(tmp_path):
    grey_png(tmp_path / "slice.png")
    atomic_save({"model": {}, "epoch": 3, "config": {"model": {"kind": "threshold"},
                                                     "training": {"image_size": [16, 16]}}},
                tmp_path / "w.pt")
    built = []
    summary = predict_with_checkpoint(
        tmp_path / "w.pt", find_sources(tmp_path / "slice.png"), tmp_path / "out",
        build=lambda config: built.append(config) or Thresholding(), image_size=(32, 32),
        threshold=0.5, save_overlay=False, window_center=-300, window_width=1400, device=CPU,
        precision=FP32)
    written = json.loads(summary.read_text())
    assert built == [{"kind": "threshold"}]
    assert written["image_size"] == [16, 16] and written["epoch"] == 3
    assert written["weights"] == str(tmp_path / "w.pt")
