"""The SADAAN HDF5 dataset format: metadata, layout checks, a lazy dataset and its statistics.

A dataset is a folder::

    metadata.json   {"structure_names": [...], "num_structures": S, "image_size": [H, W, D], ...}
    train.h5        images [N, H, W, D] or [N, C, H, W, D], masks [N, S, H, W, D],
    val.h5          presence_labels [N, S], scenarios [N] (strings)
    test.h5         (optional)

Checks look at shapes and dtypes only and reading is one case at a time, so neither costs
memory in proportion to the number of cases.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from torch.utils.data import Dataset

from medseg.errors import DataError

SPLITS = ("train", "val", "test")
DATASET_NAMES = ("images", "masks", "presence_labels", "scenarios")
#: ``num_structures`` may be left out (it is ``len(structure_names)``; another public SADAAN
#: generator writes neither it nor ``dataset_info``); when given, the two must agree.
REQUIRED_METADATA = ("structure_names", "image_size")
PERCENTILES = (0.5, 5, 25, 50, 75, 95, 99.5)


@dataclass(frozen=True)
class SplitInfo:
    path: Path
    num_cases: int
    image_shape: tuple[int, int, int]  # spatial (H, W, D)
    num_channels: int
    num_structures: int


def read_metadata(dataset_dir: str | Path) -> dict[str, Any]:
    """``metadata.json`` of a dataset folder, checked for the keys the pipeline relies on;
    ``num_structures`` is filled in from ``structure_names`` when missing."""
    dataset_dir = Path(dataset_dir)
    expected = "expected a folder with metadata.json, train.h5 and val.h5 (test.h5 optional)"
    if not dataset_dir.exists():
        raise DataError(f"dataset folder {dataset_dir} does not exist; {expected}")
    if not dataset_dir.is_dir():
        raise DataError(f"dataset folder {dataset_dir} is a file, not a folder; {expected}")
    try:
        os.listdir(dataset_dir)
    except PermissionError:
        raise DataError(f"dataset folder {dataset_dir} cannot be read (permission denied); "
                        f"{expected}, readable by this user") from None
    path = dataset_dir / "metadata.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected the dataset's metadata "
                        f"with keys {', '.join(REQUIRED_METADATA)}")
    try:
        metadata = json.loads(path.read_text())
    except PermissionError:
        raise DataError(f"{path} cannot be read (permission denied)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise DataError(f"{path} must hold a JSON object, found {type(metadata).__name__}")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise DataError(f"{path} is missing {', '.join(missing)}; expected keys "
                        f"{', '.join(REQUIRED_METADATA)} (and optionally num_structures)")
    _check_metadata_values(path, metadata)
    names = metadata["structure_names"]
    return {**metadata, "num_structures": metadata.get("num_structures", len(names))}


def _check_metadata_values(path: Path, metadata: Mapping[str, Any]) -> None:
    names, size = metadata["structure_names"], metadata["image_size"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: structure_names must be a list of names, found {names!r}")
    if "num_structures" in metadata:
        count = metadata["num_structures"]
        if not _is_int(count) or count < 1:
            raise DataError(f"{path}: num_structures must be an integer >= 1, found {count!r}")
        if len(names) != count:
            raise DataError(f"{path}: structure_names lists {len(names)} names but "
                            f"num_structures is {count}")
    if not isinstance(size, list) or len(size) != 3 or not all(_is_int(s) and s > 0 for s in size):
        raise DataError(f"{path}: image_size must be [H, W, D] of positive integers, "
                        f"found {size!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_split(dataset_dir: str | Path, split: str, metadata: Mapping[str, Any]) -> SplitInfo:
    """Check ``<split>.h5`` against the documented layout and the folder's metadata."""
    path = Path(dataset_dir) / f"{split}.h5"
    info = inspect_split_file(path, num_structures=metadata["num_structures"])
    expected_size = tuple(metadata["image_size"])
    if info.image_shape != expected_size:
        raise DataError(f"{path}: dataset 'images' has spatial shape {list(info.image_shape)} "
                        f"but metadata.json gives image_size {list(expected_size)}")
    return info


def inspect_split_file(path: str | Path, num_structures: int | None = None) -> SplitInfo:
    """Shapes and dtypes of one split file, checked against each other (and against
    ``num_structures`` when given). Reads no array data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected an HDF5 file with datasets "
                        f"{', '.join(DATASET_NAMES)}")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path} could not be opened as an HDF5 file ({error})") from None
    with file:
        missing = [name for name in DATASET_NAMES if not isinstance(file.get(name), h5py.Dataset)]
        if missing:
            found = ", ".join(sorted(file)) or "none"
            raise DataError(f"{path} has no dataset '{missing[0]}'; expected datasets "
                            f"{', '.join(DATASET_NAMES)} (found: {found})")
        shapes = {name: tuple(file[name].shape) for name in DATASET_NAMES}
        dtypes = {name: file[name].dtype for name in DATASET_NAMES}
    return _check_layout(path, shapes, dtypes, num_structures)


def _check_layout(path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype],
                  num_structures: int | None) -> SplitInfo:
    images, masks = shapes["images"], shapes["masks"]

    def fail(name: str, expected: str) -> DataError:
        return DataError(f"{path}: dataset '{name}' must be {expected}, found shape "
                         f"{list(shapes[name])} ({dtypes[name]})")

    if len(images) not in (4, 5) or dtypes["images"].kind not in "fiub":
        raise fail("images", "numeric [N, H, W, D] or [N, C, H, W, D]")
    if len(masks) != 5 or dtypes["masks"].kind not in "iub":
        raise fail("masks", "integer or boolean [N, S, H, W, D]")
    if images[0] == 0:
        raise DataError(f"{path}: dataset 'images' holds no cases (shape {list(images)})")
    for name in ("masks", "presence_labels", "scenarios"):
        if shapes[name][:1] != images[:1]:
            cases = shapes[name][0] if shapes[name] else "no"
            raise DataError(f"{path}: dataset '{name}' has {cases} cases "
                            f"(shape {list(shapes[name])}) but 'images' has {images[0]} "
                            f"(shape {list(images)}); expected the same first dimension")
    if num_structures is not None and masks[1] != num_structures:
        raise DataError(f"{path}: dataset 'masks' has {masks[1]} structures (shape "
                        f"{list(masks)}) but metadata.json lists {num_structures} "
                        "structure_names; expected masks [N, S, H, W, D] with S equal to "
                        "that count")
    if images[-3:] != masks[-3:]:
        raise DataError(f"{path}: dataset 'images' has spatial shape {list(images[-3:])} "
                        f"(shape {list(images)}) but 'masks' has {list(masks[-3:])} "
                        f"(shape {list(masks)}); expected the same H, W, D")
    if shapes["presence_labels"] != masks[:2] or dtypes["presence_labels"].kind not in "fiub":
        raise fail("presence_labels", f"numeric [N, S] = {list(masks[:2])}")
    if len(shapes["scenarios"]) != 1 or h5py.check_string_dtype(dtypes["scenarios"]) is None:
        raise fail("scenarios", f"strings [N] = [{images[0]}]")
    return SplitInfo(path=path, num_cases=images[0], image_shape=tuple(images[-3:]),
                     num_channels=1 if len(images) == 4 else images[1], num_structures=masks[1])


def check_contents(info: SplitInfo, structure_names: list[str], max_cases: int) -> int:
    """Check the values of at most ``max_cases`` cases of a split, evenly spaced: finite
    images, masks of 0 and 1, presence labels of 0 and 1 that say present exactly when the
    structure's mask has voxels. Raises DataError naming the file, case and structure;
    returns the number of cases read."""
    if max_cases <= 0:
        return 0
    indices = np.unique(np.linspace(0, info.num_cases - 1, min(info.num_cases, max_cases))
                        .round().astype(int))
    with h5py.File(info.path, "r") as file:
        for index in indices:
            _check_case(info.path, int(index), file, structure_names)
    return len(indices)


def _check_case(path: Path, index: int, file: h5py.File, names: list[str]) -> None:
    where = f"{path}, case {index}"
    image = file["images"][index]
    if image.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise DataError(f"{where}: 'images' holds {bad} NaN or infinite values; expected "
                            "finite intensities")
    masks = file["masks"][index]
    values = np.unique(masks)
    if not set(values.tolist()) <= {0, 1}:
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
        hint = " (0/255 masks: divide them by 255)" if values.max() == 255 else ""
        raise DataError(f"{where}: 'masks' holds the values {shown}; expected 0 and 1 "
                        f"(one binary mask per structure){hint}")
    presence = np.asarray(file["presence_labels"][index])
    if not set(np.unique(presence).tolist()) <= {0, 1}:
        raise DataError(f"{where}: 'presence_labels' is {presence.tolist()}; expected 0 "
                        "(absent) or 1 (present) per structure")
    voxels = masks.reshape(len(masks), -1).sum(axis=1)
    for name, present, count in zip(names, presence, voxels):
        if bool(present) != bool(count):
            said = "present" if present else "absent"
            raise DataError(f"{where}: presence_labels says {name!r} is {said} but its mask "
                            f"has {int(count)} voxels; expected presence 1 exactly when the "
                            "mask is non-empty")


class HDF5SegmentationDataset(Dataset):
    """The cases of one split file, read one at a time.

    Each item is ``{"image": float32 [C, H, W, D], "mask": float32 [S, H, W, D],
    "presence": float32 [S], "scenario": str, "index": int}`` passed through ``transform``.
    The file is opened on first use in each process and never pickled: an h5py handle shared
    by forked DataLoader workers is not safe, so each worker opens its own.
    """

    def __init__(self, path: str | Path, transform: Callable | None = None) -> None:
        self.path = Path(path)
        self.transform = transform
        self.info = inspect_split_file(self.path)
        self._file: h5py.File | None = None
        self._opened_by: int | None = None

    def __len__(self) -> int:
        return self.info.num_cases

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"case {index} is out of range for {self.path} ({len(self)} cases)")
        file = self._open()
        image = file["images"][index].astype(np.float32, copy=False)
        sample = {
            "image": image[None] if image.ndim == 3 else image,
            "mask": file["masks"][index].astype(np.float32),
            "presence": file["presence_labels"][index].astype(np.float32),
            "scenario": file["scenarios"].asstr()[index],
            "index": index,
        }
        return sample if self.transform is None else self.transform(sample)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._opened_by = None, None

    def _open(self) -> h5py.File:
        if self._file is None or self._opened_by != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._opened_by = os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_opened_by"] = None, None
        return state


def dataset_statistics(dataset_dir: str | Path, metadata: Mapping[str, Any], *,
                       max_cases: int = 16, max_voxels_per_case: int = 65536) -> dict[str, Any]:
    """A small JSON-able fingerprint of a dataset folder for the run's info.

    Counts and presence rates use every case (they read only ``presence_labels`` and
    ``scenarios``); intensities and foreground fractions use at most ``max_cases`` cases of
    the training split, evenly spaced, so the cost does not grow with the dataset.
    """
    dataset_dir = Path(dataset_dir)
    splits = {split: validate_split(dataset_dir, split, metadata) for split in SPLITS
              if (dataset_dir / f"{split}.h5").exists()}
    if not splits:
        raise DataError(f"{dataset_dir} holds none of {', '.join(f'{s}.h5' for s in SPLITS)}")
    names = list(metadata["structure_names"])
    sampled_split = "train" if "train" in splits else next(iter(splits))
    sample = _sample_cases(splits[sampled_split], max_cases, max_voxels_per_case)
    presence_rate, absent_rate, scenarios = _presence_summary(splits.values(), len(names))
    spacing = metadata.get("spacing")
    return {
        "splits": {split: info.num_cases for split, info in splits.items()},
        "image_size": list(splits[sampled_split].image_shape),
        "num_channels": splits[sampled_split].num_channels,
        "spacing": spacing if spacing is not None else "not stored (sizes are in voxels)",
        "intensity": {"split": sampled_split, "cases_sampled": sample["cases"],
                      "channels": sample["intensity"]},
        "structures": {
            name: {"presence_rate": _rounded(presence_rate[k]),
                   "foreground_fraction": _rounded(sample["foreground"][k])}
            for k, name in enumerate(names)},
        "cases_with_absent_structures": _rounded(absent_rate),
        "scenario_counts": dict(scenarios.most_common()),
    }


def _sample_cases(info: SplitInfo, max_cases: int, max_voxels: int) -> dict[str, Any]:
    indices = np.unique(np.linspace(0, info.num_cases - 1, min(info.num_cases, max_cases))
                        .round().astype(int))
    voxels = math.prod(info.image_shape)
    stride = max(1, math.ceil(voxels / max_voxels))
    values: list[list[np.ndarray]] = [[] for _ in range(info.num_channels)]
    foreground = np.zeros(info.num_structures)
    with h5py.File(info.path, "r") as file:
        for index in indices:
            image = file["images"][index].reshape(info.num_channels, -1)
            for channel in range(info.num_channels):
                values[channel].append(image[channel, ::stride].astype(np.float64))
            masks = file["masks"][index].reshape(info.num_structures, -1)
            foreground += np.count_nonzero(masks, axis=1) / voxels
    return {"cases": len(indices),
            "intensity": [_intensity_summary(np.concatenate(v)) for v in values],
            "foreground": foreground / len(indices)}


def _intensity_summary(values: np.ndarray) -> dict[str, float]:
    percentiles = np.percentile(values, PERCENTILES)
    summary = {"mean": values.mean(), "std": values.std(), "min": values.min(),
               "max": values.max()}
    # Keys without dots: Mongo and incense treat dots as nesting.
    summary |= {f"p{str(p).replace('.', '_')}": v for p, v in zip(PERCENTILES, percentiles)}
    return {key: _rounded(value) for key, value in summary.items()}


def presence_rate(dataset_dir: str | Path, split: str, metadata: Mapping[str, Any]) -> np.ndarray:
    """[S]: the share of ``split``'s cases in which each structure is present."""
    info = validate_split(dataset_dir, split, metadata)
    return _presence_summary([info], metadata["num_structures"])[0]


def _presence_summary(infos, num_structures: int) -> tuple[np.ndarray, float, Counter]:
    present = np.zeros(num_structures)
    with_absent, cases = 0, 0
    scenarios: Counter = Counter()
    for info in infos:
        with h5py.File(info.path, "r") as file:
            for block in _blocks(file["presence_labels"]):
                present += (block > 0).sum(axis=0)
                with_absent += int((block <= 0).any(axis=1).sum())
                cases += len(block)
            for block in _blocks(file["scenarios"].asstr()):
                scenarios.update(block.tolist())
    return present / cases, with_absent / cases, scenarios


def _blocks(dataset, rows: int = 4096) -> Iterator[np.ndarray]:
    for start in range(0, len(dataset), rows):
        yield np.asarray(dataset[start:start + rows])


def _rounded(value: float) -> float:
    return round(float(value), 6)
