"""The PNG slice dataset of the lung-tumour pipeline: layout checks, volume-based split, reading.

A dataset is a folder::

    images/<volume>_slice_<k>.png   8-bit grey CT slices (already windowed)
    labels/<volume>_slice_<k>.png   the same name: 0 = background, 255 = tumour, same size

Slices of one volume are strongly correlated, so the split into training and validation is
by volume: every slice of a volume lands on the same side, and validation measures the model
on patients it has not seen.

``left_out/images/`` and ``left_out/labels/`` (optional, same layout) hold the slices without
tumour that ``convert`` did not keep for training; :func:`split_whole_volumes` adds those of
the validation volumes to validation, so it scores every slice of each validation volume.

With ``context_slices=k`` an item's image holds ``2k + 1`` channels: the slices ``k`` below to
``k`` above it in its volume, found by name in ``images/`` or ``left_out/images/``
(:func:`slice_images`), the slice itself in the middle channel. A neighbour beyond the volume's
first or last slice (or missing) is replaced by the nearest slice towards the centre, so edge
slices are repeated (:func:`context_indices`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from medseg.errors import DataError

SLICE_NAME = re.compile(r"^(?P<volume>.+)_slice_(?P<index>\d+)\.png$", re.IGNORECASE)
IMAGE_MODES = ("L", "RGB")   # RGB slices are read as grey
LABEL_MODES = ("L", "1")
TUMOR_VALUE = 255
LEFT_OUT = "left_out"


@dataclass(frozen=True)
class SliceRecord:
    volume: str
    index: int
    image: Path
    label: Path
    size: tuple[int, int]   # (height, width)
    tumor_pixels: int


def scan_slices(dataset_dir: str | Path) -> list[SliceRecord]:
    """Every slice of a dataset folder, checked: names, a label per image, equal sizes, label
    values 0 and 255 only. Raises :class:`DataError` naming the first offending file."""
    dataset_dir = Path(dataset_dir)
    images_dir, labels_dir = dataset_dir / "images", dataset_dir / "labels"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir} does not exist; expected a dataset folder with images/ "
                        "and labels/ holding <volume>_slice_<k>.png files (write one with the "
                        "`convert` command)")
    image_paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".png")
    if not image_paths:
        raise DataError(f"{images_dir} holds no PNG files; expected <volume>_slice_<k>.png "
                        "slices (write them with the `convert` command)")
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir} does not exist; every image in {images_dir} needs a "
                        "label of the same name there")
    return [_record(path, labels_dir) for path in image_paths]


def _record(image_path: Path, labels_dir: Path) -> SliceRecord:
    match = SLICE_NAME.match(image_path.name)
    if match is None:
        raise DataError(f"{image_path}: the name does not follow <volume>_slice_<k>.png; the "
                        "volume-based split needs each slice's volume in its name")
    label_path = labels_dir / image_path.name
    if not label_path.is_file():
        raise DataError(f"{image_path} has no label; expected {label_path} (0 = background, "
                        "255 = tumour)")
    image_size, image_mode = _header(image_path)
    if image_mode not in IMAGE_MODES:
        raise DataError(f"{image_path} is a {image_mode!r} image; expected 8-bit grey (mode L) "
                        "slices already windowed, as `convert` writes them")
    label_size, label_mode = _header(label_path)
    if label_size != image_size:
        raise DataError(f"{label_path} is {label_size[1]}x{label_size[0]} (width x height) but "
                        f"its image {image_path} is {image_size[1]}x{image_size[0]}; expected "
                        "the same size")
    if label_mode not in LABEL_MODES:
        raise DataError(f"{label_path} is a {label_mode!r} image; expected a single-channel "
                        "8-bit mask (mode L) with values 0 and 255")
    mask = read_label(label_path)
    return SliceRecord(match["volume"], int(match["index"]), image_path, label_path, image_size,
                       int(np.count_nonzero(mask)))


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(height, width) and mode without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return (height, width), image.mode
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path} could not be read as an image ({error})") from None


def read_image(path: Path) -> np.ndarray:
    """A slice as float32 [H, W] in [0, 1]."""
    try:
        with Image.open(path) as image:
            grey = image.convert("L") if image.mode != "L" else image
            return np.asarray(grey, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path} could not be read as an image ({error})") from None


def read_label(path: Path) -> np.ndarray:
    """A label as bool [H, W] (tumour), after checking it holds only 0 and 255."""
    try:
        with Image.open(path) as image:
            if image.mode == "1":
                return np.asarray(image, dtype=bool)
            values = np.asarray(image)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path} could not be read as an image ({error})") from None
    found = np.unique(values)
    if not np.isin(found, (0, TUMOR_VALUE)).all():
        shown = ", ".join(str(v) for v in found[:8]) + (", ..." if len(found) > 8 else "")
        raise DataError(f"{path} has values {shown}; expected only 0 (background) and "
                        f"{TUMOR_VALUE} (tumour)")
    return values == TUMOR_VALUE


def split_by_volume(records: Sequence[SliceRecord], val_fraction: float,
                    seed: int) -> tuple[list[SliceRecord], list[SliceRecord]]:
    """Training and validation slices; a volume's slices all go to the same side.

    ``round(val_fraction * volumes)`` volumes (at least one) are drawn for validation with
    ``seed``; the draw depends only on the set of volume names, not on file order.
    """
    volumes = sorted({record.volume for record in records})
    if len(volumes) < 2:
        raise DataError(f"the dataset holds {len(volumes)} volume ({', '.join(volumes)}); the "
                        "volume-based split needs at least 2 volumes")
    count = min(len(volumes) - 1, max(1, round(val_fraction * len(volumes))))
    chosen = set(np.random.default_rng(seed).permutation(volumes)[:count])
    train = [r for r in records if r.volume not in chosen]
    val = [r for r in records if r.volume in chosen]
    return train, val


def scan_left_out(dataset_dir: str | Path) -> list[SliceRecord]:
    """The checked slices of ``dataset_dir/left_out`` (none when the folder does not exist or
    holds no PNG files)."""
    folder = Path(dataset_dir) / LEFT_OUT
    if not (folder / "images").is_dir() or not any(folder.glob("images/*.png")):
        return []
    return scan_slices(folder)


def split_whole_volumes(records: Sequence[SliceRecord], left_out: Sequence[SliceRecord],
                        val_fraction: float,
                        seed: int) -> tuple[list[SliceRecord], list[SliceRecord]]:
    """:func:`split_by_volume` of the volumes of ``records`` and ``left_out`` together:
    training gets the ``records`` of its volumes, validation every slice of its volumes
    (``left_out`` included), in volume and slice order."""
    train, val = split_by_volume([*records, *left_out], val_fraction, seed)
    left = set(left_out)
    return ([r for r in train if r not in left],
            sorted(val, key=lambda r: (r.volume, r.index)))


def slice_images(dataset_dir: str | Path) -> dict[tuple[str, int], Path]:
    """The images of ``dataset_dir/images`` and ``dataset_dir/left_out/images`` by (volume,
    slice index), from their names alone (neighbours for ``context_slices``)."""
    found = {}
    for folder in (Path(dataset_dir) / "images", Path(dataset_dir) / LEFT_OUT / "images"):
        if folder.is_dir():
            for path in folder.iterdir():
                if match := SLICE_NAME.match(path.name):
                    found[(match["volume"], int(match["index"]))] = path
    return found


def context_indices(index: int, available: Callable[[int], bool], context: int) -> list[int]:
    """The slice indices ``index - context`` ... ``index + context``, each one that is not
    ``available`` replaced by the nearest available one towards ``index`` (so the first and
    last slices of a volume are repeated beyond its ends)."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    indices = []
    for offset in range(-context, context + 1):
        target = index + offset
        while target != index and not available(target):
            target -= 1 if offset > 0 else -1
        indices.append(target)
    return indices


def stack_slices(paths: Sequence[Path], centre: Path) -> np.ndarray:
    """The images ``paths`` (the slice ``centre`` and its neighbours) as float32
    [len(paths), H, W]; raises :class:`DataError` naming a neighbour whose size differs."""
    images = [read_image(path) for path in paths]
    height, width = images[list(paths).index(centre)].shape
    for path, image in zip(paths, images):
        if image.shape != (height, width):
            raise DataError(f"{path} is {image.shape[1]}x{image.shape[0]} (width x height) but "
                            f"the slice {centre} it neighbours is {width}x{height}; the slices "
                            "of a volume stacked by context_slices must have one size")
    return np.stack(images)


class PNGSliceDataset(Dataset):
    """Slices as ``{"image": float32 [C, H, W] in [0, 1], "mask": float32 [1, H, W] in {0, 1},
    "volume": str, "slice": int}``; ``transform`` maps the image and mask.

    ``C = 2 * context_slices + 1``: the slice and its ``context_slices`` neighbours on each
    side, looked up in ``neighbours`` (:func:`slice_images`; by default the ``records``
    themselves), middle channel the slice itself.
    """

    def __init__(self, records: Sequence[SliceRecord], transform: Callable | None = None, *,
                 context_slices: int = 0,
                 neighbours: dict[tuple[str, int], Path] | None = None) -> None:
        if context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}")
        self.records = list(records)
        self.transform = transform
        self.context_slices = context_slices
        self.neighbours = (neighbours if neighbours is not None
                           else {(r.volume, r.index): r.image for r in self.records})

    def __len__(self) -> int:
        return len(self.records)

    def image_paths(self, record: SliceRecord) -> list[Path]:
        """The images stacked as ``record``'s channels."""
        if not self.context_slices:
            return [record.image]
        indices = context_indices(record.index,
                                  lambda k: (record.volume, k) in self.neighbours,
                                  self.context_slices)
        return [record.image if k == record.index else self.neighbours[(record.volume, k)]
                for k in indices]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        arrays = {"image": (stack_slices(self.image_paths(record), record.image) if self.context_slices
                            else read_image(record.image)[None]),
                  "mask": read_label(record.label)[None].astype(np.float32)}
        # The transform sees the arrays only: some MONAI transforms turn every value of the
        # dict into a tensor, which would break collating the volume names and indices.
        if self.transform is not None:
            arrays = self.transform(arrays)
        return {**arrays, "volume": record.volume, "slice": record.index}

    @property
    def volumes(self) -> list[str]:
        return sorted({record.volume for record in self.records})


def slice_statistics(train: Sequence[SliceRecord], val: Sequence[SliceRecord], *,
                     max_images: int = 32) -> dict[str, Any]:
    """A JSON-able fingerprint for the run's info: counts per split, tumour share, sizes and
    intensities (of at most ``max_images`` training slices, evenly spaced)."""
    sampled = [train[i] for i in np.unique(np.linspace(0, len(train) - 1,
                                                       min(len(train), max_images)).astype(int))]
    pixels = np.concatenate([read_image(r.image).ravel()[::7] for r in sampled])
    return {
        "splits": {"train": _split_summary(train), "val": _split_summary(val)},
        "val_volumes": sorted({r.volume for r in val}),
        "image_sizes": sorted({f"{w}x{h}" for h, w in (r.size for r in (*train, *val))}),
        "intensity": {"slices_sampled": len(sampled), "mean": round(float(pixels.mean()), 4),
                      "std": round(float(pixels.std()), 4)},
    }


def _split_summary(records: Iterable[SliceRecord]) -> dict[str, Any]:
    records = list(records)
    total_pixels = sum(h * w for h, w in (r.size for r in records))
    tumor_pixels = sum(r.tumor_pixels for r in records)
    tumor_slices = [r for r in records if r.tumor_pixels]
    tumor_slice_pixels = sum(h * w for h, w in (r.size for r in tumor_slices))
    return {"volumes": len({r.volume for r in records}), "slices": len(records),
            "tumour_slices": len(tumor_slices),
            "tumour_pixel_fraction": round(tumor_pixels / max(total_pixels, 1), 6),
            "tumour_pixel_fraction_in_tumour_slices":
                round(tumor_pixels / max(tumor_slice_pixels, 1), 6)}
