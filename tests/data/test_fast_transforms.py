"""The faster ways of running the training transforms give the samples MONAI's plain ones give:
the same random draws, the same arrays (bit for bit, or to float rounding where a sum is done in
another order), and MONAI's tracking switch left as it was."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, get_track_meta
from monai.networks.layers import GaussianFilter
from monai.transforms import (
    Compose,
    Lambdad,
    Rand2DElasticd,
    Rand3DElasticd,
    RandFlipd,
    RandRotated,
    Resized,
)

from medseg.data.cube_transforms import cube_transforms
from medseg.data.fast_transforms import (
    MAX_PACKED_MASKS,
    FastRand2DElasticd,
    FastRand3DElasticd,
    PackMasksd,
    UnpackMasksd,
    UntrackedCompose,
    smooth,
)
from medseg.data.mri_transforms import augmentation
from medseg.data.slice_transforms import SliceAugmentation, slice_transforms
from medseg.data.transforms import sadaan_transforms


def draws(transform: Compose, samples: list[dict], seed: int = 7) -> list[dict]:
    transform.set_random_state(seed)
    return [transform(dict(sample)) for sample in samples]


def assert_same(first: list[dict], second: list[dict], keys) -> None:
    for a, b in zip(first, second):
        for key in keys:
            x, y = torch.as_tensor(a[key]), torch.as_tensor(b[key])
            assert x.dtype == y.dtype and torch.equal(x.as_subclass(torch.Tensor),
                                                      y.as_subclass(torch.Tensor)), key


def plain(transform: Compose, drop=()) -> Compose:
    """The same transform objects in a plain (tracking) Compose, without ``drop`` types."""
    return Compose([t for t in transform.transforms if not isinstance(t, drop)])


def test_untracked_compose_runs_its_tail_without_metadata_and_restores_the_switch():
    seen = []
    record = Lambdad(keys="image", func=lambda x: seen.append(get_track_meta()) or x)
    flip = RandFlipd(keys="image", prob=1.0, spatial_axis=0)
    compose = UntrackedCompose([record, flip, record], tracked_head=1)
    out = compose({"image": MetaTensor(torch.arange(6.0).reshape(1, 6))})
    assert seen == [True, False] and get_track_meta()
    assert torch.equal(out["image"].as_subclass(torch.Tensor),
                       torch.arange(5.0, -1, -1).reshape(1, 6))
    # The flip ran without bookkeeping; a plain Compose records it.
    assert not getattr(out["image"], "applied_operations", [])
    tracked = Compose([flip])({"image": MetaTensor(torch.arange(6.0).reshape(1, 6))})
    assert len(tracked["image"].applied_operations) == 1
    # A call covering only the head (a cache's deterministic part) keeps tracking on.
    seen.clear()
    compose({"image": torch.zeros(1, 6)}, end=1)
    assert seen == [True]
    with pytest.raises(ValueError, match="tracked_head must be >= 0"):
        UntrackedCompose([flip], tracked_head=-1)


def test_untracked_tail_restores_the_switch_after_an_error():
    def fail(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        UntrackedCompose([Lambdad(keys="image", func=fail)])({"image": torch.zeros(1, 2)})
    assert get_track_meta()


def _run_in_threads(*loops, timeout: float = 60.0) -> list[BaseException]:
    """Run each callable in its own thread at once; the errors they raised."""
    errors: list[BaseException] = []

    def guarded(loop):
        try:
            loop()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(loop,), daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "the threads waited for ever"
    return errors


def test_a_tracked_head_never_runs_while_another_thread_has_tracking_off():
    # A Ray trial's loader thread ran SMALabeller's metadata-reading head while a CacheDataset
    # caching thread ran an untracked tail: EnsureChannelFirstd found no metadata. Each
    # transform sleeps a little so the two threads interleave on every call.
    seen_by_head = []

    def head_step(x):
        for _ in range(3):
            seen_by_head.append(get_track_meta())
            time.sleep(0.001)
        return x

    def tail_step(x):
        time.sleep(0.002)
        return x

    head = UntrackedCompose([Lambdad(keys="image", func=head_step)], tracked_head=1)
    tail = UntrackedCompose([Lambdad(keys="image", func=tail_step)] * 2)
    sample = {"image": torch.zeros(1, 4)}
    errors = _run_in_threads(lambda: [head(dict(sample)) for _ in range(40)],
                             lambda: [tail(dict(sample)) for _ in range(40)],
                             lambda: [tail(dict(sample)) for _ in range(40)])
    assert not errors
    assert len(seen_by_head) == 120 and all(seen_by_head)
    assert get_track_meta()


def test_an_untracked_compose_nested_in_a_tracked_head_does_not_wait_for_itself():
    seen = []
    record = Lambdad(keys="image", func=lambda x: seen.append(get_track_meta()) or x)
    inner = UntrackedCompose([record, record], tracked_head=1)
    outer = UntrackedCompose([inner, record], tracked_head=1)
    errors = _run_in_threads(lambda: outer({"image": torch.zeros(1, 2)}), timeout=20)
    assert not errors and seen == [True, False, False] and get_track_meta()
    # The other way round would need tracking back on under other threads' untracked
    # blocks: refused with an error, not a wait for ever.
    backwards = UntrackedCompose([UntrackedCompose([record], tracked_head=1)])
    with pytest.raises(RuntimeError) as raised:  # MONAI's Compose names the step that failed
        backwards({"image": torch.zeros(1, 2)})
    assert "cannot run inside an untracked block" in str(raised.value.__cause__)
    assert get_track_meta()


def test_aneurysm_crops_are_the_plain_pipelines():
    rng = np.random.default_rng(0)
    cubes = [{"image": rng.integers(0, 255, (1, 12, 20, 20)).astype(np.float32),
              "mask": (rng.random((1, 12, 20, 20)) > 0.97).astype(np.float32), "label": 1.0}
             for _ in range(4)]
    fast = cube_transforms(train=True, crop_size=(8, 12, 12))
    assert isinstance(fast, UntrackedCompose)
    assert_same(draws(plain(fast), cubes * 3), draws(fast, cubes * 3), ("image", "mask"))


def sadaan_cases(structures: int, count: int = 3) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"image": rng.normal(100, 30, (1, 20, 18, 10)).astype(np.float32),
             "mask": (rng.random((structures, 20, 18, 10)) > 0.8).astype(np.float32),
             "presence": np.ones(structures, np.float32)} for _ in range(count)]


@pytest.mark.parametrize("train", [True, False])
def test_sadaan_masks_moved_as_one_bit_channel_are_the_masks_moved_one_by_one(train):
    # Resizing (16 x 16 x 8 from 20 x 18 x 10), rotation and flips: every mask equals what
    # MONAI's nearest-neighbour transforms make of it on its own.
    fast = sadaan_transforms(image_size=(16, 16, 8), train=train, augment=True,
                             rotation_degrees=20.0, flip_probability=0.5)
    reference = plain(fast, drop=(PackMasksd, UnpackMasksd))
    cases = sadaan_cases(13) * 2
    expected, got = draws(reference, cases), draws(fast, cases)
    assert_same(expected, got, ("image", "mask", "presence"))
    assert got[0]["mask"].shape == (13, 16, 16, 8) and set(got[0]) == set(cases[0])


def test_packing_leaves_more_masks_than_float32_holds_or_soft_masks_unpacked():
    case = sadaan_cases(MAX_PACKED_MASKS + 1, count=1)[0]
    packed = PackMasksd(keys="mask")(case)
    assert packed["mask"].shape[0] == MAX_PACKED_MASKS + 1
    assert np.array_equal(UnpackMasksd(keys="mask")(packed)["mask"], case["mask"])
    soft = dict(case, mask=case["mask"][:3] * 0.5)
    assert PackMasksd(keys="mask")(soft)["mask"].shape[0] == 3   # not binary: not packed
    full = sadaan_cases(MAX_PACKED_MASKS, count=1)[0]
    folded = PackMasksd(keys="mask")(full)
    assert folded["mask"].shape[0] == 1
    assert torch.equal(UnpackMasksd(keys="mask")(folded)["mask"], torch.as_tensor(full["mask"]))


def test_fast_2d_elastic_draws_and_returns_what_monais_does():
    rng = np.random.default_rng(2)
    slices = [{"image": torch.as_tensor(rng.random((1, 40, 36), dtype=np.float32)),
               "mask": torch.as_tensor((rng.random((1, 40, 36)) > 0.9).astype(np.float32))}
              for _ in range(10)]
    options = dict(keys=("image", "mask"), prob=0.4, spacing=6.0, magnitude_range=(0.5, 1.5),
                   mode=("bilinear", "nearest"), padding_mode="zeros")
    ours, theirs = FastRand2DElasticd(**options), Rand2DElasticd(**options)
    expected, got = draws(Compose([theirs]), slices), draws(Compose([ours]), slices)
    assert_same(expected, got, ("image", "mask"))
    assert ours.R.uniform() == theirs.R.uniform()   # the same draws, in the same order
    assert any(not torch.equal(g["image"], s["image"]) for g, s in zip(got, slices))


def test_lung_slices_are_the_plain_pipelines():
    rng = np.random.default_rng(3)
    slices = [{"image": rng.random((1, 32, 32), dtype=np.float32),
               "mask": (rng.random((1, 32, 32)) > 0.9).astype(np.float32)} for _ in range(12)]
    fast = slice_transforms((32, 32), train=True,
                            augmentation=SliceAugmentation(elastic_probability=0.5))
    reference = Compose([Rand2DElasticd(**_elastic_options(t)) if isinstance(t, FastRand2DElasticd)
                         else t for t in fast.transforms])
    assert_same(draws(reference, slices), draws(fast, slices), ("image", "mask"))


def _elastic_options(fast: FastRand2DElasticd) -> dict:
    elastic = fast.rand_2d_elastic
    return dict(keys=fast.keys, prob=fast.prob, spacing=elastic.deform_grid.spacing,
                magnitude_range=elastic.deform_grid.magnitude, mode=fast.mode,
                padding_mode=fast.padding_mode)


@pytest.mark.parametrize("sigma", [2.0, (3.0, 1.5, 2.5)])
def test_smoothing_along_each_axis_is_monais_gaussian_filter(sigma):
    field = torch.rand(1, 3, 14, 12, 9) * 2 - 1
    expected = GaussianFilter(spatial_dims=3, sigma=sigma, truncated=3.0)(field)
    assert torch.allclose(smooth(field, sigma, truncated=3.0), expected, atol=1e-6)


def test_fast_3d_elastic_draws_and_returns_what_monais_does():
    rng = np.random.default_rng(4)
    crops = [{"image": torch.as_tensor(rng.random((1, 16, 14, 10), dtype=np.float32)),
              "label": torch.as_tensor((rng.random((1, 16, 14, 10)) > 0.8).astype(np.float32))}
             for _ in range(8)]
    options = dict(keys=("image", "label"), prob=0.5, sigma_range=(2, 3),
                   magnitude_range=(3, 6), mode=("bilinear", "nearest"), padding_mode="border")
    ours, theirs = FastRand3DElasticd(**options), Rand3DElasticd(**options)
    expected, got = draws(Compose([theirs]), crops), draws(Compose([ours]), crops)
    assert ours.R.uniform() == theirs.R.uniform()
    moved = 0
    for e, g, c in zip(expected, got, crops):
        assert torch.allclose(g["image"], e["image"], atol=1e-4)
        # Nearest neighbours agree but where float rounding moves a point across a half voxel.
        assert (g["label"] != e["label"]).float().mean() < 1e-3
        moved += not torch.equal(g["image"], c["image"])
    assert moved   # some crops were deformed, so the comparison covers the smoothing


def test_smalabeller_augmentation_uses_the_fast_elastic_with_the_originals_settings():
    elastic = [t for t in augmentation((8, 8, 8), 1).transforms if isinstance(t, Rand3DElasticd)]
    assert len(elastic) == 1 and isinstance(elastic[0], FastRand3DElasticd)
    assert elastic[0].prob == 0.15 and elastic[0].rand_3d_elastic.sigma_range == (5, 8)


def test_sadaan_masks_are_packed_only_across_nearest_neighbour_steps():
    # PackMasksd's condition: no interpolating spatial step sees the packed masks.
    fast = sadaan_transforms(image_size=(16, 16, 8), train=True, augment=True)
    names = [type(step).__name__ for step in fast.transforms]
    packed = fast.transforms[names.index("PackMasksd") + 1:names.index("UnpackMasksd")]
    spatial = [step for step in packed if isinstance(step, (RandRotated, Resized))]
    assert len(spatial) == 2
    for step in spatial:
        assert str(dict(zip(step.keys, step.mode))["mask"]).lower().endswith("nearest")
