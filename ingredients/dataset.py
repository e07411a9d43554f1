"""``dataset`` ingredients: how each pipeline's data is generated and opened.

SADAAN: HDF5 splits (``metadata.json``, ``train.h5``, ``val.h5``, ``test.h5``) in the folder
named by the experiment's ``dataset_path``; ``generate_data`` writes them from the
``synthetic`` entries.

Lung tumour: PNG slices (``images/``, ``labels/``) in ``dataset_path``, converted from an MSD
task folder; the entries drive ``generate_msd``, ``convert`` and the volume-based split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingredients.fields import Field, FieldIngredient, SyntheticIngredient
from medseg import config as c
from medseg.data.hdf5 import (
    HDF5SegmentationDataset,
    check_contents,
    dataset_statistics,
    presence_rate,
    read_metadata,
    validate_split,
)
from medseg.data.npz_cubes import CACHE_MODES as CUBE_CACHE_MODES
from medseg.data.npz_cubes import (
    NUM_FOLDS,
    TEST_FOLD,
    CubeIndex,
    CubeRecord,
    cube_dataset,
    cube_statistics,
    scan_cubes,
    select_records,
)
from medseg.data.prepare_cubes import (
    CENTRES_FILE,
    PrepareSummary,
    find_volumes,
    prepare_cubes,
    read_centres,
)
from medseg.data.staging import refuse_to_overwrite
from medseg.data.synthetic.aneurysm import generate_aneurysm_volumes


from medseg.data.msd import ConversionSettings, convert_task
from medseg.data.png_slices import (
    PNGSliceDataset,
    scan_left_out,
    scan_slices,
    slice_images,
    split_whole_volumes,
)
from medseg.errors import ConfigError

SADAAN_SYNTHETIC_FIELDS = {
    "num_train": Field(160, c.integer(minimum=1), "generate_data: training cases"),
    "num_val": Field(32, c.integer(minimum=1), "generate_data: validation cases"),
    "num_test": Field(32, c.integer(minimum=0), "generate_data: test cases (0: no test.h5)"),
    "image_size": Field([64, 64, 32], c.sequence(c.integer(minimum=16), length=3),
                        "generate_data: volume size H, W, D"),
    "num_structures": Field(13, c.integer(minimum=1, maximum=13),
                            "generate_data: structures (the first N of the 13 BTCV organs)"),
    "in_channels": Field(1, c.integer(minimum=1, maximum=4),
                         "generate_data: image channels (>1 writes [N, C, H, W, D] images)"),
    "absent_probability": Field(0.15, c.number(minimum=0, maximum=1),
                                "generate_data: share of cases with a structure removed"),
    "noise_std": Field(8.0, c.number(minimum=0), "generate_data: image noise standard deviation"),
    "seed": Field(0, c.integer(minimum=0), "generate_data: random seed"),
    "overwrite": Field(False, c.boolean(), "generate_data: replace an existing dataset folder"),
}


class SADAANSyntheticIngredient(SyntheticIngredient):
    """``generate_data``'s settings: the arguments of
    :func:`medseg.data.synthetic.sadaan.generate_sadaan_dataset`, by the same names."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__(SADAAN_SYNTHETIC_FIELDS, defaults, generator="generate_data")


HDF5_FIELDS = {
    "check_cases": Field(16, c.integer(minimum=0),
                         "Cases per split whose values are checked before training or "
                         "`evaluate` (finite images, 0/1 masks, presence labels matching the "
                         "masks); 0 skips the check (very large sets)", resume_may_change=True),
}


class HDF5DatasetIngredient(FieldIngredient):
    """SADAAN's HDF5 splits: their checks and their datasets."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__("dataset", HDF5_FIELDS, defaults)

    @staticmethod
    def check_splits(dataset_path: str, splits: tuple[str, ...],
                     in_channels: int | None = None, check_cases: int = 0) -> dict[str, Any]:
        """Metadata and per-split layout, and the values of ``check_cases`` cases of each
        split, checked before a run starts (raises DataError)."""
        metadata = read_metadata(dataset_path)
        for split in splits:
            info = validate_split(dataset_path, split, metadata)
            if in_channels is not None and info.num_channels != in_channels:
                raise ConfigError(f"model.in_channels={in_channels} but {info.path} has images "
                                  f"with {info.num_channels} channel(s)")
            check_contents(info, metadata["structure_names"], check_cases)
        return metadata

    @staticmethod
    def statistics(dataset_path: str, metadata: dict[str, Any]) -> dict[str, Any]:
        return dataset_statistics(dataset_path, metadata)

    @staticmethod
    def has_split(dataset_path: str, split: str) -> bool:
        return (Path(dataset_path) / f"{split}.h5").is_file()

    @classmethod
    def presence_rate(cls, dataset_path: str, metadata: dict[str, Any]):
        """[S] presence rates of the training split, or ``None`` without one."""
        if not cls.has_split(dataset_path, "train"):
            return None
        return presence_rate(dataset_path, "train", metadata)

    @staticmethod
    def open_split(dataset_path: str, split: str, transform=None) -> HDF5SegmentationDataset:
        return HDF5SegmentationDataset(Path(dataset_path) / f"{split}.h5", transform=transform)


# Aneurysm cubes: NPZ folds in the folder named by the experiment's ``cubes_dir``, cut by the
# ``prepare`` command from NIfTI volumes in ``volumes_dir`` (which ``generate_volumes`` can
# fill with synthetic head CT angiographies).

CUBES_FIELDS = {
    "cube_shape": Field([32, 128, 128], c.sequence(c.integer(minimum=4), length=3),
                        "Cube size D, H, W: what `prepare` cuts and every cube must have"),
    "label_threshold": Field(0.1, c.number(minimum=0, maximum=0.999),
                             "Mask values above this are aneurysm voxels (binarises the "
                             "Gaussian masks)"),
    "small_dataset": Field(False, c.boolean(),
                           "Use `small_dataset_fraction` of each fold's positives and negatives"),
    "small_dataset_fraction": Field(0.1, c.number(above=0, maximum=1),
                                    "Share of the cubes kept by `small_dataset`"),
    "only_positive": Field(False, c.boolean(), "Train on positive cubes only"),
    "only_positive_val": Field(False, c.boolean(), "Validate on positive cubes only"),
    "cache": Field("none", c.choice(*CUBE_CACHE_MODES),
                   "'none': read each cube file every epoch (the seed); 'memory': MONAI "
                   "CacheDataset, every cube read once and kept z-scored; 'disk': MONAI "
                   "PersistentDataset in cache_dir, kept for later runs"),
    "cache_dir": Field("cache/aneurysm_cubes", c.text(), "PersistentDataset folder (cache='disk')",
                       resume_may_change=True),
}


def scan_cube_folder(cubes_dir: str, cube_shape: list[int], label_threshold: float) -> CubeIndex:
    """Every cube of ``cubes_dir``, validated (raises DataError naming the file)."""
    return scan_cubes(cubes_dir, cube_shape=cube_shape, label_threshold=label_threshold)


def split_cubes(index: CubeIndex, val_fold: int, small_dataset: bool,
                small_dataset_fraction: float, only_positive: bool,
                only_positive_val: bool) -> tuple[list[CubeRecord], list[CubeRecord]]:
    """Training cubes (every fold but ``val_fold``) and validation cubes."""
    fraction = small_dataset_fraction if small_dataset else 1.0
    train_folds = [fold for fold in range(NUM_FOLDS) if fold != val_fold]
    return (select_records(index.records(train_folds), only_positive=only_positive,
                           fraction=fraction),
            select_records(index.records([val_fold]), only_positive=only_positive_val,
                           fraction=fraction))


def test_cubes(index: CubeIndex, small_dataset: bool,
               small_dataset_fraction: float) -> list[CubeRecord]:
    fraction = small_dataset_fraction if small_dataset else 1.0
    return select_records(index.records([TEST_FOLD]), fraction=fraction)


def open_cube_dataset(records, transform, label_threshold: float, cache: str, cache_dir: str):
    """The cubes of ``records`` through ``transform``, read as ``dataset.cache`` says
    (:func:`medseg.data.npz_cubes.cube_dataset`)."""
    return cube_dataset(records, label_threshold=label_threshold, transform=transform,
                        cache=cache, cache_dir=cache_dir)


def cube_folder_statistics(index: CubeIndex, label_threshold: float) -> dict[str, Any]:
    return cube_statistics(index, label_threshold=label_threshold)


class AneurysmCubesDatasetIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("dataset", CUBES_FIELDS, defaults)
        self.scan = self.captured(scan_cube_folder)
        self.split = self.captured(split_cubes)
        self.test_records = self.captured(test_cubes)
        self.open_cubes = self.captured(open_cube_dataset)
        self.statistics = self.captured(cube_folder_statistics)


PREPARE_FIELDS = {
    "centres_csv": Field(None, c.optional(c.text()),
                         "CSV of aneurysm centres (null: volumes_dir/aneurysm_centres.csv)"),
    "negatives_per_series": Field(1, c.integer(minimum=0), "Negative cubes cut per series"),
    "mask_sigma_mm": Field(2.0, c.number(above=0),
                           "Standard deviation of the Gaussian mask around each centre (mm)"),
    "intensity_window": Field(None, c.optional(c.number_range()),
                              "[low, high] mapped to 0-255 (e.g. [-100, 700] HU); null: each "
                              "volume's 0.5-99.5 percentiles"),
    "target_spacing": Field(None, c.optional(c.sequence(c.number(above=0), length=3)),
                            "Resample volumes to this z, y, x spacing (mm) first (null: keep)"),
    "positive_jitter": Field(0.25, c.number(minimum=0, maximum=0.49),
                             "Largest shift of a positive cube's centre from its aneurysm, as a "
                             "share of the cube size"),
    "test_fraction": Field(0.15, c.number(minimum=0, maximum=0.9),
                           "Share of series held out in test/ (scored by the fold ensemble)"),
    "compress": Field(False, c.boolean(), "Write compressed NPZ (smaller, slower to read)"),
    "seed": Field(0, c.integer(minimum=0), "Seed of fold assignment, jitter and negatives"),
    "overwrite": Field(False, c.boolean(), "Replace an existing cubes folder"),
}


def run_prepare(volumes_dir: str, cubes_dir: str, cube_shape: list[int], centres_csv,
                negatives_per_series: int, mask_sigma_mm: float, intensity_window,
                target_spacing, positive_jitter: float, test_fraction: float, compress: bool,
                seed: int, overwrite: bool) -> PrepareSummary:
    return prepare_cubes(
        volumes_dir, cubes_dir, centres_csv=centres_csv, cube_shape=cube_shape,
        negatives_per_series=negatives_per_series, mask_sigma_mm=mask_sigma_mm,
        intensity_window=intensity_window, target_spacing=target_spacing,
        positive_jitter=positive_jitter, test_fraction=test_fraction,
        compress=compress, seed=seed, overwrite=overwrite)


def check_prepare_inputs(volumes_dir: str, cubes_dir: str, centres_csv, overwrite: bool) -> None:
    """Everything `prepare` reads exists and its output may be written."""
    volumes = find_volumes(volumes_dir)
    read_centres(centres_csv or Path(volumes_dir) / CENTRES_FILE, list(volumes))
    refuse_to_overwrite(cubes_dir, overwrite, "aneurysm cubes", "prepare.overwrite")


class AneurysmPrepareIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("prepare", PREPARE_FIELDS, defaults)
        self.run = self.captured(run_prepare)
        self.check_inputs = self.captured(check_prepare_inputs)

    def validate(self, config) -> None:
        super().validate(config)
        window = config[self.path]["intensity_window"]
        if window is not None and window[0] >= window[1]:
            raise ConfigError(f"{self.path}.intensity_window must be [low, high] with low < high, "
                              f"got {list(window)}")


SYNTHETIC_FIELDS = {
    "num_series": Field(100, c.integer(minimum=1), "generate_volumes: series (NIfTI volumes)"),
    "volume_shape": Field([64, 192, 192], c.sequence(c.integer(minimum=8), length=3),
                          "generate_volumes: volume size z, y, x (voxels)"),
    "spacing": Field([1.0, 0.9, 0.9], c.sequence(c.number(above=0), length=3),
                     "generate_volumes: voxel size z, y, x (mm)"),
    "aneurysm_fraction": Field(0.5, c.number(minimum=0, maximum=1),
                               "generate_volumes: share of series with aneurysms"),
    "noise_std": Field(15.0, c.number(minimum=0), "generate_volumes: noise (HU)"),
    "seed": Field(0, c.integer(minimum=0), "generate_volumes: random seed"),
    "overwrite": Field(False, c.boolean(), "generate_volumes: replace an existing folder"),
}


def make_aneurysm_volumes(volumes_dir: str, num_series: int, volume_shape: list[int], spacing,
                          aneurysm_fraction: float, noise_std: float, seed: int,
                          overwrite: bool) -> Path:
    return generate_aneurysm_volumes(
        volumes_dir, num_series=num_series, volume_shape=tuple(volume_shape),
        spacing=tuple(spacing), aneurysm_fraction=aneurysm_fraction,
        noise_std=noise_std, seed=seed, overwrite=overwrite)


def check_volumes_output(volumes_dir: str, overwrite: bool) -> None:
    refuse_to_overwrite(volumes_dir, overwrite, "synthetic volumes", "synthetic.overwrite")


class AneurysmVolumesIngredient(SyntheticIngredient):
    """``generate_volumes``'s settings (synthetic head CT angiographies)."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__(SYNTHETIC_FIELDS, defaults, generator="generate_volumes")
        self.generate = self.captured(make_aneurysm_volumes)
        self.check_output = self.captured(check_volumes_output)


# ----------------------------------------------------------------------------- lung tumour
# The lung-tumour pipeline: an MSD task folder (generated by `generate_msd`, or downloaded)
# is converted by `convert` into the PNG slice folder the experiment's `dataset_path` names.

LUNG_SYNTHETIC_FIELDS = {
    "num_volumes": Field(32, c.integer(minimum=1), "generate_msd: volumes in the synthetic task"),
    "volume_size": Field([256, 256, 64], c.sequence(c.integer(minimum=16), length=3),
                         "generate_msd: volume size X, Y, Z (voxels; the chest keeps its size)"),
    "tumor_free_fraction": Field(0.15, c.number(minimum=0, maximum=1),
                                  "generate_msd: share of volumes without tumour"),
    "max_tumors": Field(3, c.integer(minimum=1), "generate_msd: most tumours in one volume"),
    "noise_std": Field(20.0, c.number(minimum=0), "generate_msd: CT noise standard deviation (HU)"),
    "seed": Field(0, c.integer(minimum=0), "generate_msd: random seed of the volumes"),
    "overwrite": Field(False, c.boolean(), "generate_msd: replace an existing task folder"),
}


class LungSyntheticIngredient(SyntheticIngredient):
    """``generate_msd``'s settings: the arguments of
    :func:`medseg.data.synthetic.lung.generate_lung_task`, by the same names."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__(LUNG_SYNTHETIC_FIELDS, defaults, generator="generate_msd")


LUNG_FIELDS = {
    "window_center": Field(-300.0, c.number(),
                           "convert: CT window centre (HU); predict on NIfTI uses the window "
                           "the training slices' conversion.json recorded, this one only "
                           "without it"),
    "window_width": Field(1400.0, c.number(above=0),
                          "convert: CT window width (HU); predict on NIfTI as window_center"),
    "empty_slice_fraction": Field(0.1, c.number(minimum=0, maximum=1),
                                  "convert: share of the slices without tumour that are kept"),
    "seed": Field(0, c.integer(minimum=0), "convert: random seed of the kept empty slices"),
    "overwrite": Field(False, c.boolean(), "convert: replace an existing dataset_path"),
    "val_fraction": Field(0.2, c.number(above=0, maximum=0.9),
                          "Share of the volumes held out for validation (split by volume)"),
    "split_seed": Field(42, c.integer(minimum=0), "Random seed of the volume-based split"),
    "context_slices": Field(0, c.integer(minimum=0, maximum=8),
                            "2.5D input: the k neighbouring slices on each side (by name, edge "
                            "slices repeated) as extra input channels; the network takes 2k + 1 "
                            "channels, and predict / evaluate stack neighbours as the checkpoint "
                            "was trained"),
}


def convert_msd_task(task_dir: str, dataset_path: str, window_center: float, window_width: float,
                     empty_slice_fraction: float, seed: int, overwrite: bool) -> dict[str, Any]:
    settings = ConversionSettings(window_center=window_center, window_width=window_width,
                                  empty_slice_fraction=empty_slice_fraction, seed=seed)
    return convert_task(task_dir, dataset_path, settings, overwrite=overwrite)


def split_slices(dataset_path: str, val_fraction: float, split_seed: int):
    """Checked slice records of the training volumes (the slices ``convert`` kept) and of
    the validation volumes (every slice, ``left_out/`` included)."""
    return split_whole_volumes(scan_slices(dataset_path), scan_left_out(dataset_path),
                               val_fraction, split_seed)


def open_slices(records, transform, dataset_path: str, context_slices: int) -> PNGSliceDataset:
    """The slice dataset of ``records``, with ``context_slices`` neighbours on each side looked
    up among every slice of ``dataset_path`` (kept and ``left_out/``)."""
    return PNGSliceDataset(records, transform, context_slices=context_slices,
                           neighbours=slice_images(dataset_path) if context_slices else None)


class LungDatasetIngredient(FieldIngredient):
    """The lung PNG slices: ``convert`` from an MSD task, the volume-based split, and the
    slices as a dataset (``open(records, transform, dataset_path=...)``)."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__("dataset", LUNG_FIELDS, defaults)
        self.convert = self.captured(convert_msd_task)
        self.split = self.captured(split_slices)
        self.open = self.captured(open_slices)
