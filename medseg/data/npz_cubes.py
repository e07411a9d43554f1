"""The aneurysm-cubes NPZ format: layout, validation, fold selection and the cube dataset.

A cubes folder holds five cross-validation folds and, optionally, held-out test cubes::

    aneurysm_cubes/
        fold_0/ ... fold_4/
            pos_<series_id>_<i>.npz   cube around aneurysm i of a series
            neg_<series_id>_<i>.npz   cube i of a series cut away from every aneurysm
        test/                         (optional) series held out of every fold

Each NPZ holds ``volume`` (uint8 [D, H, W], intensities normalised to 0-255), ``mask``
(float [D, H, W] in [0, 1], written as float16: Gaussian blobs at the aneurysm centres),
``label`` (0 negative, 1 positive) and ``fold`` (0-4; -1 for test cubes). Axes are
(z, y, x) of the RAS-reoriented volume the cube was cut from, so the "RAS orientation" step of
the seed's preprocessing is already done: cubes carry no affine to reorient by.

Checks read the ``volume`` header only (shape, dtype) but the whole ``mask``, because its
range is part of the format; results are cached per file (path, size, mtime), so the check
before a run and the run itself read each file once.
"""

from __future__ import annotations

import functools
import math
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Transform
from torch.utils.data import Dataset

from medseg.data.fast_transforms import prepend
from medseg.errors import DataError

NUM_FOLDS = 5
TEST_FOLDER = "test"
TEST_FOLD = -1
CUBE_KEYS = ("volume", "mask", "label", "fold")
FILE_PATTERN = re.compile(r"^(?P<kind>pos|neg)_(?P<series>.+)_(?P<index>\d+)\.npz$")
# Float16 rounding puts a Gaussian peak of 1.0 at exactly 1.0; anything beyond this is a
# mask written on another scale (0-255, percent), not rounding.
MASK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CubeRecord:
    """One validated cube file."""

    path: Path
    fold: int
    label: int
    series_id: str
    index: int
    shape: tuple[int, int, int]
    mask_max: float

    @property
    def name(self) -> str:
        return self.path.name


def fold_folder(cubes_dir: str | Path, fold: int) -> Path:
    """``cubes_dir/fold_k``, or ``cubes_dir/test`` for :data:`TEST_FOLD`."""
    return Path(cubes_dir) / (TEST_FOLDER if fold == TEST_FOLD else f"fold_{fold}")


def check_cubes_dir(cubes_dir: str | Path, num_folds: int = NUM_FOLDS) -> list[Path]:
    """The ``fold_0`` ... ``fold_{num_folds-1}`` folders of ``cubes_dir``, all required."""
    cubes_dir = Path(cubes_dir)
    if not cubes_dir.is_dir():
        raise DataError(f"cubes folder {cubes_dir} does not exist; expected a folder with "
                        f"fold_0 ... fold_{num_folds - 1} (run the `prepare` command to make one)")
    folders = [fold_folder(cubes_dir, fold) for fold in range(num_folds)]
    present = [folder for folder in folders if folder.is_dir()]
    if not present:
        found = ", ".join(sorted(p.name for p in cubes_dir.iterdir())[:8]) or "nothing"
        raise DataError(f"{cubes_dir} has no fold_k folders; expected fold_0 ... "
                        f"fold_{num_folds - 1} with pos_*.npz and neg_*.npz cubes (found: "
                        f"{found}); run the `prepare` command to make them")
    missing = [folder.name for folder in folders if folder not in present]
    if missing:
        raise DataError(f"{cubes_dir} is missing {', '.join(missing)}; expected all of fold_0 "
                        f"... fold_{num_folds - 1}")
    return folders


def cube_files(folder: Path) -> list[Path]:
    """The ``pos_*.npz`` and ``neg_*.npz`` files of a fold folder, sorted by name."""
    files = sorted(folder.glob("*.npz"))
    strays = [f.name for f in files if not FILE_PATTERN.match(f.name)]
    if strays:
        raise DataError(f"{folder / strays[0]}: file name does not follow pos_<series_id>_<i>.npz "
                        "or neg_<series_id>_<i>.npz")
    return files


def inspect_cube(path: str | Path, *, fold: int,
                 cube_shape: Sequence[int] | None = None) -> CubeRecord:
    """Check one cube file against the format (and ``cube_shape`` when given).

    Raises :class:`DataError` naming the file for a missing key, a wrong dtype or shape, a
    mask outside [0, 1], a label that disagrees with the ``pos_``/``neg_`` prefix or a fold
    that disagrees with the folder.
    """
    path = Path(path)
    match = FILE_PATTERN.match(path.name)
    if match is None:
        raise DataError(f"{path}: file name does not follow pos_<series_id>_<i>.npz or "
                        "neg_<series_id>_<i>.npz")
    try:
        stat = path.stat()
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror})") from None
    shape = tuple(cube_shape) if cube_shape is not None else None
    return _inspect_cached(str(path), stat.st_size, stat.st_mtime_ns, fold, shape)


@functools.lru_cache(maxsize=None)
def _inspect_cached(path_text: str, size: int, mtime_ns: int, fold: int,
                    cube_shape: tuple[int, ...] | None) -> CubeRecord:
    path = Path(path_text)
    match = FILE_PATTERN.match(path.name)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in CUBE_KEYS if key not in npz.files]
            if missing:
                found = ", ".join(npz.files) or "none"
                raise DataError(f"{path} has no '{missing[0]}'; expected keys "
                                f"{', '.join(CUBE_KEYS)} (found: {found})")
            volume_shape, volume_dtype = npz_array_header(npz, "volume")
            mask = npz["mask"]
            label = _scalar(path, npz, "label")
            stored_fold = _scalar(path, npz, "fold")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} could not be read as an NPZ cube ({type(error).__name__}: "
                        f"{error})") from None
    _check_volume(path, volume_shape, volume_dtype, cube_shape)
    mask_max = _check_mask(path, mask, volume_shape)
    expected_label = 1 if match["kind"] == "pos" else 0
    if label != expected_label:
        raise DataError(f"{path}: 'label' is {label} but the file name says "
                        f"{match['kind']} (expected label {expected_label})")
    if stored_fold != fold:
        where = "the test folder" if fold == TEST_FOLD else f"folder fold_{fold}"
        raise DataError(f"{path}: 'fold' is {stored_fold} but the file lies in {where} "
                        f"(expected fold {fold})")
    return CubeRecord(path=path, fold=fold, label=label, series_id=match["series"],
                      index=int(match["index"]), shape=volume_shape, mask_max=mask_max)


def forget_inspections() -> None:
    """Drop the cached checks (they are keyed by path, size and mtime, so this is needed only
    to measure how long checking takes)."""
    _inspect_cached.cache_clear()


def npz_array_header(npz, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one NPZ member from its header, without reading its data."""
    with npz.zip.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(handle)
    return tuple(int(s) for s in shape), dtype


def _scalar(path: Path, npz, key: str) -> int:
    value = npz[key]
    if value.size != 1 or value.dtype.kind not in "iub":
        raise DataError(f"{path}: '{key}' must be one integer, found {value.dtype} array of "
                        f"shape {list(value.shape)}")
    return int(value.reshape(()))


def _check_volume(path: Path, shape: tuple[int, ...], dtype: np.dtype,
                  cube_shape: tuple[int, ...] | None) -> None:
    if dtype != np.uint8 or len(shape) != 3:
        raise DataError(f"{path}: 'volume' must be uint8 [D, H, W] (intensities 0-255), found "
                        f"{dtype} of shape {list(shape)}")
    if cube_shape is not None and shape != cube_shape:
        raise DataError(f"{path}: 'volume' has shape {list(shape)} but dataset.cube_shape is "
                        f"{list(cube_shape)}; prepare the cubes with that shape or set "
                        "dataset.cube_shape to match")


def _check_mask(path: Path, mask: np.ndarray, volume_shape: tuple[int, ...]) -> float:
    if mask.shape != volume_shape or mask.dtype.kind not in "fiub":
        raise DataError(f"{path}: 'mask' must be a numeric array of the volume's shape "
                        f"{list(volume_shape)}, found {mask.dtype} of shape {list(mask.shape)}")
    low, high = float(mask.min()), float(mask.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DataError(f"{path}: 'mask' contains NaN or infinite values; expected values in "
                        "[0, 1]")
    if low < -MASK_TOLERANCE or high > 1 + MASK_TOLERANCE:
        raise DataError(f"{path}: 'mask' values lie in [{low + 0.0:g}, {high + 0.0:g}]; "
                        "expected a Gaussian mask with values in [0, 1]")
    return high


@dataclass(frozen=True)
class CubeIndex:
    """The validated cubes of a folder, by fold (``TEST_FOLD`` for the test folder)."""

    cubes_dir: Path
    folds: dict[int, list[CubeRecord]]

    def records(self, folds: Iterable[int]) -> list[CubeRecord]:
        return [record for fold in folds for record in self.folds.get(fold, [])]


def scan_cubes(cubes_dir: str | Path, *, cube_shape: Sequence[int] | None = None,
               label_threshold: float = 0.1, num_folds: int = NUM_FOLDS,
               include_test: bool = True) -> CubeIndex:
    """Validate every cube of the folds (and of ``test/`` when present).

    Beyond each file's format: every fold has positive cubes, each positive cube's mask rises
    above ``label_threshold`` (else binarising leaves it empty), and no series lies in two
    folds (a series split across folds leaks into its own validation).
    """
    folders = check_cubes_dir(cubes_dir, num_folds)
    folds = {fold: _scan_folder(folder, fold, cube_shape) for fold, folder in enumerate(folders)}
    test_folder = fold_folder(cubes_dir, TEST_FOLD)
    if include_test and test_folder.is_dir():
        folds[TEST_FOLD] = _scan_folder(test_folder, TEST_FOLD, cube_shape, allow_empty=True)
    for fold, records in folds.items():
        if fold != TEST_FOLD and not any(r.label == 1 for r in records):
            raise DataError(f"{fold_folder(cubes_dir, fold)} has no positive cubes "
                            "(pos_*.npz); every fold needs some so that validating on it "
                            "measures Dice and sensitivity")
        for record in records:
            if record.label == 1 and record.mask_max <= label_threshold:
                raise DataError(f"{record.path}: positive cube's mask peaks at "
                                f"{record.mask_max:g}, not above dataset.label_threshold="
                                f"{label_threshold:g}; binarised it would be empty")
    _check_series_in_one_fold(folds)
    return CubeIndex(cubes_dir=Path(cubes_dir), folds=folds)


def _scan_folder(folder: Path, fold: int, cube_shape,
                 allow_empty: bool = False) -> list[CubeRecord]:
    files = cube_files(folder)
    if not files and not allow_empty:
        raise DataError(f"{folder} holds no cubes; expected pos_<series_id>_<i>.npz and "
                        "neg_<series_id>_<i>.npz files")
    return [inspect_cube(path, fold=fold, cube_shape=cube_shape) for path in files]


def _check_series_in_one_fold(folds: Mapping[int, list[CubeRecord]]) -> None:
    seen: dict[str, CubeRecord] = {}
    for records in folds.values():
        for record in records:
            first = seen.setdefault(record.series_id, record)
            if first.fold != record.fold:
                raise DataError(f"series {record.series_id} appears in two folds ({first.path} "
                                f"and {record.path}); folds must be split by series")


def select_records(records: Sequence[CubeRecord], *, only_positive: bool = False,
                   fraction: float = 1.0) -> list[CubeRecord]:
    """``only_positive`` keeps the positive cubes; ``fraction`` < 1 keeps that share of each
    fold's positives and negatives (at least one of each present), evenly spaced in name
    order, so every run and every fold sees the same subset."""
    if only_positive:
        records = [r for r in records if r.label == 1]
    if fraction >= 1:
        return list(records)
    groups: dict[tuple[int, int], list[CubeRecord]] = {}
    for record in records:
        groups.setdefault((record.fold, record.label), []).append(record)
    kept = []
    for group in groups.values():
        count = max(1, math.ceil(fraction * len(group)))
        picks = np.unique(np.linspace(0, len(group) - 1, count).round().astype(int))
        kept += [group[i] for i in picks]
    return sorted(kept, key=lambda r: (r.fold, r.path.name))


def read_cube(path: str | Path) -> dict[str, Any]:
    """The arrays of one cube file (unchecked; :func:`inspect_cube` checks)."""
    with np.load(path, allow_pickle=False) as npz:
        return {"volume": npz["volume"], "mask": npz["mask"],
                "label": int(npz["label"].reshape(())), "fold": int(npz["fold"].reshape(()))}


def cube_sample(record: CubeRecord, index: int, label_threshold: float) -> dict[str, Any]:
    """The training sample of one cube file (see :class:`NpzCubeDataset`), untransformed."""
    cube = read_cube(record.path)
    return {
        "image": cube["volume"][None].astype(np.float32),
        "mask": (cube["mask"][None] > label_threshold).astype(np.float32),
        "label": np.float32(record.label),
        "index": index,
        "name": record.name,
    }


class NpzCubeDataset(Dataset):
    """Cubes as training samples, each file read when its sample is asked for.

    Each item is ``{"image": float32 [1, D, H, W] (0-255, normalised by ``transform``),
    "mask": float32 [1, D, H, W] (1 where the stored mask exceeds ``label_threshold``),
    "label": float32, "index": int, "name": str}`` passed through ``transform``.
    """

    def __init__(self, records: Sequence[CubeRecord], *, label_threshold: float = 0.1,
                 transform: Callable | None = None) -> None:
        self.records = list(records)
        self.label_threshold = label_threshold
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = cube_sample(self.records[index], index, self.label_threshold)
        return sample if self.transform is None else self.transform(sample)


CACHE_MODES = ("none", "memory", "disk")


class ReadCubed(Transform):
    """The first, deterministic step of a cached cube pipeline: an item naming a cube
    (``path``, ``index``, ``label``) becomes the sample :class:`NpzCubeDataset` reads. The
    item also carries the file's size and modification time, the threshold and the names
    of the transforms, so that MONAI's ``PersistentDataset``, which keys its files by a hash
    of the item, reads a cube again when one of them changes."""

    def __init__(self, records: Sequence[CubeRecord]) -> None:
        self.records = list(records)

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        return cube_sample(self.records[item["index"]], item["index"], item["label_threshold"])


def _cache_items(records: Sequence[CubeRecord], label_threshold: float,
                 steps: Sequence[Callable]) -> list[dict[str, Any]]:
    # The step names keep the training and validation pipelines' disk caches apart.
    names = [type(step).__name__ for step in steps]
    items = []
    for index, record in enumerate(records):
        stat = record.path.stat()
        items.append({"path": str(record.path.resolve()), "size": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns, "index": index,
                      "label_threshold": label_threshold, "steps": names})
    return items


def cube_dataset(records: Sequence[CubeRecord], *, label_threshold: float = 0.1,
                 transform: Callable | None = None, cache: str = "none",
                 cache_dir: str | Path | None = None) -> Dataset:
    """The cubes of ``records`` as samples, read as ``cache`` says.

    ``none``: :class:`NpzCubeDataset`, each file read every time. ``memory``: MONAI's
    ``CacheDataset``, which reads every cube once, at construction, and keeps it after the
    transforms up to the first random one (the z-score; for validation, everything), so an
    epoch only crops and augments. ``disk``: MONAI's ``PersistentDataset``, the same
    deterministic part saved under ``cache_dir`` on first use and read from there later
    (also by the next run). Every mode gives the same samples; each dataset keeps
    ``records`` and ``transform``. ``transform`` must be a MONAI ``Compose`` (or None) for
    the cached modes, so that its deterministic head can be cached.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if cache == "none":
        return NpzCubeDataset(records, label_threshold=label_threshold, transform=transform)
    records = list(records)
    pipeline = prepend(transform, [ReadCubed(records)])
    items = _cache_items(records, label_threshold, pipeline.transforms[1:])
    if cache == "memory":
        dataset = CacheDataset(items, pipeline, cache_rate=1.0, num_workers=1,
                               progress=False)
    else:
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        # The cache holds this suite's own samples (numpy arrays, a name), not weights.
        dataset = PersistentDataset(items, pipeline, cache_dir=cache_dir,
                                    weights_only=False)
    dataset.records = records
    return dataset


def cube_statistics(index: CubeIndex, *, label_threshold: float,
                    max_cubes: int = 16) -> dict[str, Any]:
    """A small JSON-able fingerprint of a cubes folder for the run's info: counts per fold and
    class, series, cube shape, and intensity / foreground statistics of a few cubes."""
    all_records = index.records(sorted(index.folds))
    counts = {("test" if fold == TEST_FOLD else f"fold_{fold}"):
              dict(Counter("positive" if r.label else "negative" for r in records))
              for fold, records in sorted(index.folds.items())}
    sample = [all_records[i] for i in
              np.unique(np.linspace(0, len(all_records) - 1, min(max_cubes, len(all_records)))
                        .round().astype(int))]
    means, stds, foreground = [], [], []
    for record in sample:
        cube = read_cube(record.path)
        means.append(float(cube["volume"].mean()))
        stds.append(float(cube["volume"].std()))
        if record.label == 1:
            foreground.append(float((cube["mask"] > label_threshold).mean()))
    return {
        "cubes": counts,
        "series": len({r.series_id for r in all_records}),
        "cube_shape": list(all_records[0].shape) if all_records else None,
        "intensity": {"cubes_sampled": len(sample), "mean": round(float(np.mean(means)), 3),
                      "std": round(float(np.mean(stds)), 3)},
        "positive_foreground_fraction": (round(float(np.mean(foreground)), 6)
                                         if foreground else None),
    }
