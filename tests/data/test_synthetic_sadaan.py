"""The SADAAN generator writes the seed's HDF5 layout with learnable, varied anatomy."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from medseg.data.synthetic import sadaan
from medseg.data.synthetic.sadaan import STRUCTURE_NAMES, generate_sadaan_dataset
from medseg.errors import ConfigError, DataError

TINY = {"num_train": 10, "num_val": 3, "num_test": 2, "image_size": (16, 16, 16)}


def read_split(folder: Path, split: str) -> dict[str, np.ndarray]:
    with h5py.File(folder / f"{split}.h5", "r") as file:
        return {"images": file["images"][()], "masks": file["masks"][()],
                "presence_labels": file["presence_labels"][()],
                "scenarios": file["scenarios"].asstr()[()]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_sadaan_dataset(tmp_path_factory.mktemp("gen") / "tiny", seed=3,
                                   absent_probability=0.5, **TINY)


@pytest.fixture(scope="module")
def default_size(tmp_path_factory) -> Path:
    """A few cases at the pipeline's default 64 x 64 x 32."""
    return generate_sadaan_dataset(tmp_path_factory.mktemp("gen") / "default", num_train=8,
                                   num_val=1, num_test=0, absent_probability=0.0, seed=1)


def test_writes_the_seed_layout_with_one_chunk_per_case(tiny):
    files = sorted(p.name for p in tiny.iterdir())
    assert files == ["metadata.json", "test.h5", "train.h5", "val.h5"]
    for split, count in (("train", 10), ("val", 3), ("test", 2)):
        with h5py.File(tiny / f"{split}.h5", "r") as file:
            assert set(file) == {"images", "masks", "presence_labels", "scenarios"}
            assert file["images"].dtype == np.float32
            assert file["images"].shape == (count, 16, 16, 16)
            assert file["images"].chunks == (1, 16, 16, 16)
            assert file["masks"].dtype == np.uint8
            assert file["masks"].shape == (count, 13, 16, 16, 16)
            assert file["masks"].chunks == (1, 13, 16, 16, 16)
            assert file["presence_labels"].dtype == np.uint8
            assert file["presence_labels"].shape == (count, 13)
            assert h5py.check_string_dtype(file["scenarios"].dtype).encoding == "utf-8"
            assert file["scenarios"].shape == (count,)


def test_metadata_describes_the_dataset(tiny):
    metadata = json.loads((tiny / "metadata.json").read_text())
    assert metadata["structure_names"] == list(STRUCTURE_NAMES)
    assert metadata["structure_names"][:3] == ["spleen", "right_kidney", "left_kidney"]
    assert metadata["num_structures"] == 13
    assert metadata["image_size"] == [16, 16, 16]
    assert isinstance(metadata["dataset_info"], str) and metadata["dataset_info"]
    assert metadata["splits"] == {"train": 10, "val": 3, "test": 2}
    assert metadata["in_channels"] == 1
    assert metadata["intensity_range"] == [0.0, 255.0]
    assert metadata["generator"]["seed"] == 3
    assert metadata["generator"]["absent_probability"] == 0.5
    assert metadata["scenarios"]["splenectomy"] == ["spleen"]


def test_presence_labels_say_exactly_which_masks_are_non_empty(tiny):
    for split in ("train", "val", "test"):
        data = read_split(tiny, split)
        non_empty = data["masks"].reshape(*data["masks"].shape[:2], -1).any(axis=2)
        np.testing.assert_array_equal(data["presence_labels"], non_empty.astype(np.uint8))
        assert set(np.unique(data["masks"])) <= {0, 1}


def test_absent_structures_are_exactly_those_the_scenario_removes(tiny):
    removed_by = json.loads((tiny / "metadata.json").read_text())["scenarios"]
    data = read_split(tiny, "train")
    assert "normal" in set(data["scenarios"])
    assert set(data["scenarios"]) - {"normal"}, "absent_probability=0.5 gave no surgery"
    for scenario, presence in zip(data["scenarios"], data["presence_labels"]):
        absent = {STRUCTURE_NAMES[k] for k in np.flatnonzero(presence == 0)}
        assert absent == set(removed_by[scenario]), scenario


@pytest.mark.parametrize("probability, expect_normal", [(0.0, True), (1.0, False)])
def test_absent_probability_sets_how_many_cases_miss_a_structure(
        tmp_path, probability, expect_normal):
    folder = generate_sadaan_dataset(tmp_path / "d", absent_probability=probability, **TINY)
    data = read_split(folder, "train")
    assert all((s == "normal") == expect_normal for s in data["scenarios"])
    assert (data["presence_labels"].min(axis=1) == 1).all() == expect_normal


def test_high_absence_scenario_has_most_cases_miss_a_structure(tmp_path):
    folder = generate_sadaan_dataset(tmp_path / "d", num_train=40, num_val=1, num_test=0,
                                     image_size=(16, 16, 16), seed=4,
                                     absent_probability=sadaan.HIGH_ABSENCE_PROBABILITY)
    presence = read_split(folder, "train")["presence_labels"]
    assert (presence.min(axis=1) == 0).mean() >= 0.5
    default = generate_sadaan_dataset(tmp_path / "default", num_train=40, num_val=1, num_test=0,
                                      image_size=(16, 16, 16), seed=4)
    assert (read_split(default, "train")["presence_labels"].min(axis=1) == 0).mean() < 0.3
    # The organ surgery removes most often is absent in some cases, present in most.
    gallbladder = STRUCTURE_NAMES.index("gallbladder")
    assert 0 < presence[:, gallbladder].mean() < 0.95


def test_structures_vary_in_position_and_size_between_cases(default_size):
    masks = read_split(default_size, "train")["masks"]
    liver = STRUCTURE_NAMES.index("liver")
    kidney = STRUCTURE_NAMES.index("left_kidney")
    for structure in (liver, kidney):
        volumes = masks[:, structure].reshape(len(masks), -1).sum(axis=1)
        centres = np.array([ndimage.center_of_mass(m[structure]) for m in masks])
        assert volumes.std() / volumes.mean() > 0.05
        assert np.ptp(centres, axis=0).max() > 1.0  # voxels


def test_organs_sit_where_they_sit_in_an_abdomen(default_size):
    data = read_split(default_size, "train")
    height, width, _ = data["images"].shape[1:]

    def centre(name: str) -> np.ndarray:
        mask = data["masks"][:, STRUCTURE_NAMES.index(name)]
        return np.mean([ndimage.center_of_mass(m) for m in mask], axis=0)

    # W runs from the patient's right (small index) to left; H from anterior to posterior.
    assert centre("liver")[1] < width / 2 < centre("spleen")[1]
    assert centre("right_kidney")[1] < width / 2 < centre("left_kidney")[1]
    assert centre("right_kidney")[0] > height / 2 and centre("left_kidney")[0] > height / 2
    assert centre("gallbladder")[1] < width / 2
    for vessel in ("aorta", "inferior_vena_cava"):
        slices_covered = data["masks"][:, STRUCTURE_NAMES.index(vessel)].any(axis=(1, 2))
        assert slices_covered.mean() > 0.8


def test_small_structures_are_learnable_at_the_default_size(default_size):
    masks = read_split(default_size, "train")["masks"]
    volumes = masks.reshape(*masks.shape[:2], -1).sum(axis=2)
    assert volumes.min() >= 30, dict(zip(STRUCTURE_NAMES, volumes.min(axis=0)))


def test_images_look_like_windowed_ct(default_size):
    data = read_split(default_size, "train")
    images, masks = data["images"], data["masks"]
    assert images.min() >= 0.0 and images.max() <= 255.0
    assert images[:, :3, :3, :].mean() < 10.0  # air in the corners
    liver = images[masks[:, STRUCTURE_NAMES.index("liver")] == 1]
    gallbladder = images[masks[:, STRUCTURE_NAMES.index("gallbladder")] == 1]
    assert liver.mean() - gallbladder.mean() > 30.0
    # Overlapping organ intensities: the spleen cannot be told from the liver by value alone.
    spleen = images[masks[:, STRUCTURE_NAMES.index("spleen")] == 1]
    assert abs(spleen.mean() - liver.mean()) < liver.std() + spleen.std()


def test_more_channels_are_contrast_phases_that_differ(tmp_path):
    folder = generate_sadaan_dataset(tmp_path / "d", in_channels=2, num_train=4, num_val=1,
                                     num_test=0, image_size=(32, 32, 16))
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["channel_names"] == ["portal_venous", "native"]
    data = read_split(folder, "train")
    assert data["images"].shape == (4, 2, 32, 32, 16)
    aorta = data["masks"][:, STRUCTURE_NAMES.index("aorta")] == 1
    venous, native = data["images"][:, 0][aorta], data["images"][:, 1][aorta]
    assert venous.mean() - native.mean() > 30.0  # contrast fills the aorta


def test_fewer_structures_label_the_first_ones_only(tmp_path):
    folder = generate_sadaan_dataset(tmp_path / "d", num_structures=3, absent_probability=1.0,
                                     **TINY)
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["structure_names"] == ["spleen", "right_kidney", "left_kidney"]
    assert "cholecystectomy" not in metadata["scenarios"]
    data = read_split(folder, "train")
    assert data["masks"].shape[1] == 3 and data["presence_labels"].shape[1] == 3
    assert (data["presence_labels"].min(axis=1) == 0).all()


def test_same_seed_same_data_and_each_split_its_own_cases(tmp_path):
    first = read_split(generate_sadaan_dataset(tmp_path / "a", seed=5, **TINY), "train")
    again = read_split(generate_sadaan_dataset(tmp_path / "b", seed=5, **TINY), "train")
    other = read_split(generate_sadaan_dataset(tmp_path / "c", seed=6, **TINY), "train")
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["images"], other["images"])
    val = read_split(tmp_path / "a", "val")
    assert not np.array_equal(first["masks"][0], val["masks"][0])


def test_refuses_a_non_empty_folder_unless_told_to_overwrite(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"already contains files.*overwrite=True"):
        generate_sadaan_dataset(folder, **TINY)
    assert (folder / "notes.txt").read_text() == "keep me"

    generate_sadaan_dataset(folder, overwrite=True, **TINY)
    assert not (folder / "notes.txt").exists()
    assert (folder / "train.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_an_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "d").mkdir()
    generate_sadaan_dataset(tmp_path / "d", **TINY)
    assert (tmp_path / "d" / "metadata.json").exists()


def test_an_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    real_render = sadaan.render_case
    calls = []

    def render_then_fail(rng, settings):
        calls.append(1)
        if len(calls) == 12:  # in val.h5, after train.h5 is complete
            raise KeyboardInterrupt
        return real_render(rng, settings)

    monkeypatch.setattr(sadaan, "render_case", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        generate_sadaan_dataset(tmp_path / "d", **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argument, value", [
    ("num_train", 0), ("image_size", (16, 16)), ("num_structures", 14), ("in_channels", 5),
    ("absent_probability", 1.5), ("noise_std", -1.0),
])
def test_rejects_bad_arguments_by_name(tmp_path, argument, value):
    with pytest.raises(ConfigError, match=argument):
        generate_sadaan_dataset(tmp_path / "d", **{**TINY, argument: value})
    assert not (tmp_path / "d").exists()
