"""nnU-Net-format datasets: reading (v1 and v2 ``dataset.json``), converting image/mask pairs
into the v2 layout, and loading volumes at a model's size with their original geometry.

Layout (nnU-Net v2, ``documentation/dataset_format.md``)::

    DatasetNNN_Name/
        imagesTr/<case>_<channel:04d>.nii.gz
        labelsTr/<case>.nii.gz
        dataset.json   # channel_names (v1: modality), labels, numTraining, file_ending

``labels`` is ``{name: int}`` in v2 and ``{"0": name}`` in v1; both are read. A data folder
is either one dataset (it holds ``dataset.json``) or a folder of such datasets.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Resize

from medseg.data.msd import read_scaled_volume
from medseg.data.staging import staged_folder
from medseg.errors import DataError

NIFTI = ".nii.gz"


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says: label values and names, channel names, file ending."""

    name: str
    labels: dict[int, str]
    channels: dict[int, str]
    file_ending: str = NIFTI
    num_training: int | None = None


def parse_labels(labels, where: str) -> dict[int, str]:
    """``{value: name}`` from v2 ``{name: value}`` or v1 ``{"value": name}``."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: 'labels' must be a non-empty mapping, got {labels!r}")
    values = list(labels.values())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return {int(v): str(k) for k, v in labels.items()}
    if all(isinstance(k, str) and k.isdigit() for k in labels) and all(isinstance(v, str) for v in values):
        return {int(k): v for k, v in labels.items()}
    raise DataError(f"{where}: 'labels' is neither nnU-Net v2 ({{name: int}}, e.g. "
                    f'{{"background": 0, "tumour": 1}}) nor v1 ({{"0": name}}); got {labels!r}')


def read_dataset_json(path: str | Path) -> DatasetInfo:
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; an nnU-Net dataset needs a dataset.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(f"{path} has no 'labels' entry (neither nnU-Net v1 nor v2)")
    labels = parse_labels(meta["labels"], str(path))
    channels = meta.get("channel_names", meta.get("modality", {"0": "image"}))
    if not isinstance(channels, dict) or not all(str(k).isdigit() for k in channels):
        raise DataError(f"{path}: 'channel_names' (v1: 'modality') must map channel numbers to "
                        f"names, got {channels!r}")
    return DatasetInfo(name=str(meta.get("name", path.parent.name)), labels=labels,
                       channels={int(k): str(v) for k, v in channels.items()},
                       file_ending=str(meta.get("file_ending", NIFTI)),
                       num_training=meta.get("numTraining"))


@dataclass
class NnunetDataset:
    """One nnU-Net dataset folder: its ``dataset.json`` and sorted case identifiers."""

    root: Path
    info: DatasetInfo
    cases: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    def image_path(self, case: str, channel: int = 0) -> Path:
        return self.root / "imagesTr" / f"{case}_{channel:04d}{self.info.file_ending}"

    def label_path(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{case}{self.info.file_ending}"

    @classmethod
    def open(cls, root: str | Path) -> NnunetDataset:
        root = Path(root)
        info = read_dataset_json(root / "dataset.json")
        images = root / "imagesTr"
        if not images.is_dir():
            raise DataError(f"{root} has no imagesTr/ folder")
        ending = info.file_ending
        first = f"_0000{ending}"
        cases = sorted(p.name[: -len(first)] for p in images.iterdir() if p.name.endswith(first))
        if not cases:
            raise DataError(f"{images} holds no <case>_0000{ending} image")
        dataset = cls(root, info, cases)
        for case in cases:
            if not dataset.label_path(case).is_file():
                raise DataError(f"{dataset.image_path(case)} has no label "
                                f"{dataset.label_path(case)}")
            for channel in info.channels:
                if not dataset.image_path(case, channel).is_file():
                    raise DataError(f"case {case} of {root} lacks channel {channel}: "
                                    f"{dataset.image_path(case, channel)} does not exist")
        return dataset


def find_datasets(data_dir: str | Path) -> list[NnunetDataset]:
    """A folder holding ``dataset.json`` is one dataset; otherwise each sub-folder holding
    one (``DatasetNNN_Name``) is a dataset, in name order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder of nnU-Net data")
    if (data_dir / "dataset.json").is_file():
        return [NnunetDataset.open(data_dir)]
    found = [NnunetDataset.open(p) for p in sorted(data_dir.iterdir())
             if p.is_dir() and (p / "dataset.json").is_file()]
    if not found:
        raise DataError(f"{data_dir} holds no dataset.json, nor sub-folders with one "
                        "(DatasetNNN_Name/dataset.json)")
    return found


# ---------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class Geometry:
    """What writing a prediction back needs: the file's shape, affine and header."""

    shape: tuple[int, ...]
    affine: np.ndarray
    header: nib.Nifti1Header


def normalise_intensity(volume: np.ndarray) -> np.ndarray:
    """Clip to the 0.5 and 99.5 percentiles, then min-max to [0, 1] (the original z-scores
    in between, which min-max undoes)."""
    low, high = np.percentile(volume, [0.5, 99.5])
    volume = np.clip(volume, low, high)
    span = float(volume.max() - volume.min())
    return ((volume - volume.min()) / span if span > 0 else np.zeros_like(volume)).astype(np.float32)


def integer_labels(volume: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isfinite(volume)) or not np.all(volume == np.round(volume)) or volume.min() < 0:
        raise DataError(f"{path} is not a label volume: expected non-negative integer values, "
                        f"found e.g. {volume[volume != np.round(volume)][:1].tolist() or volume.min()}")
    return volume.astype(np.int64)


def resize_image(volume: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """``[X, Y, Z]`` -> ``[1, *size]`` float, trilinear."""
    return Resize(tuple(size), mode="trilinear")(torch.from_numpy(volume)[None]).as_tensor().float()


def resize_labels(volume: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """``[X, Y, Z]`` integer labels -> ``[1, *size]`` int64, nearest neighbour."""
    resized = Resize(tuple(size), mode="nearest")(torch.from_numpy(volume.astype(np.float32))[None])
    return resized.as_tensor().round().long()


def load_image(path: Path, size: Sequence[int]) -> tuple[torch.Tensor, Geometry]:
    data, image = read_scaled_volume(path)
    geometry = Geometry(tuple(data.shape), image.affine.copy(), image.header.copy())
    return resize_image(normalise_intensity(data), size), geometry


def load_labels(path: Path, size: Sequence[int], expected_shape=None) -> torch.Tensor:
    data, _ = read_scaled_volume(path)
    if expected_shape is not None and tuple(data.shape) != tuple(expected_shape):
        raise DataError(f"{path} has shape {list(data.shape)} but its image has "
                        f"{list(expected_shape)}; image and label must have the same size")
    return resize_labels(integer_labels(data, path), size)


def restore_geometry(labels: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """A ``[*size]`` label map resized back (nearest) to the file's shape."""
    resized = Resize(geometry.shape, mode="nearest")(labels[None].float()).as_tensor()[0]
    return resized.round().numpy().astype(np.uint8)


def write_labels(labels: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write a label map with the image's own affine and header (atomic: temp file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = geometry.header.copy()
    header.set_data_dtype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp{NIFTI}")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), geometry.affine, header), tmp)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------- preparing
def _pattern_suffix(pattern: str, what: str) -> str:
    if pattern.count("*") != 1 or not pattern.startswith("*"):
        raise DataError(f"{what} {pattern!r} must be one '*' followed by the file ending, "
                        "e.g. '*_img.nii.gz'")
    return pattern[1:]


def find_pairs(input_dir: Path, image_pattern: str, mask_pattern: str) -> dict[str, tuple[Path, Path]]:
    """``{case: (image, mask)}`` of ``input_dir``, matched by the name before the patterns'
    suffixes; an image without a mask, or a mask without an image, is an error."""
    image_suffix = _pattern_suffix(image_pattern, "image_pattern")
    mask_suffix = _pattern_suffix(mask_pattern, "mask_pattern")
    files = sorted(p.name for p in input_dir.iterdir() if p.is_file())
    images = {n[: -len(image_suffix)]: input_dir / n for n in files if fnmatch.fnmatch(n, image_pattern)}
    masks = {n[: -len(mask_suffix)]: input_dir / n for n in files if fnmatch.fnmatch(n, mask_pattern)}
    for case in sorted(set(images) - set(masks)):
        raise DataError(f"{images[case]} has no mask {input_dir / (case + mask_suffix)}")
    for case in sorted(set(masks) - set(images)):
        raise DataError(f"{masks[case]} has no image {input_dir / (case + image_suffix)}")
    return {case: (images[case], masks[case]) for case in sorted(images)}


def _prepare_one(pairs: dict[str, tuple[Path, Path]], out: Path, name: str, modality: str) -> dict:
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    values: set[int] = set()
    for case, (image_path, mask_path) in pairs.items():
        image_data, image = read_scaled_volume(image_path)
        mask_data, mask = read_scaled_volume(mask_path)
        if image_data.shape != mask_data.shape:
            raise DataError(f"{mask_path} has shape {list(mask_data.shape)} but {image_path} has "
                            f"{list(image_data.shape)}; image and mask must have the same size")
        labels = integer_labels(mask_data, mask_path)
        values.update(int(v) for v in np.unique(labels))
        shutil.copyfile(image_path, out / "imagesTr" / f"{case}_0000{NIFTI}")
        header = mask.header.copy()
        header.set_data_dtype(np.uint8 if labels.max() < 256 else np.int16)
        nib.save(nib.Nifti1Image(labels.astype(header.get_data_dtype()), image.affine, header),
                 out / "labelsTr" / f"{case}{NIFTI}")
    labels_json = {"background": 0, **{f"label_{v}": v for v in sorted(values - {0})}}
    meta = {"name": name, "channel_names": {"0": modality}, "labels": labels_json,
            "numTraining": len(pairs), "file_ending": NIFTI}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return meta


def prepare_nnunet(input_dir: str | Path, output_dir: str | Path, *, dataset_name: str,
                   modality: str, image_pattern: str = "*_img.nii.gz",
                   mask_pattern: str = "*_gt.nii.gz", overwrite: bool = False) -> list[dict]:
    """Convert image/mask pairs into the nnU-Net v2 layout; return each ``dataset.json``.

    Pairs directly in ``input_dir`` become one dataset at ``output_dir`` (named
    ``dataset_name``); otherwise each sub-folder holding pairs becomes
    ``output_dir/<sub-folder>``. Everything is written to a staging folder first, so bad
    input leaves nothing behind.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError(f"input_dir {input_dir} is not a folder")
    groups: dict[str | None, dict] = {}
    direct = find_pairs(input_dir, image_pattern, mask_pattern)
    if direct:
        groups[None] = direct
    else:
        for sub in sorted(p for p in input_dir.iterdir() if p.is_dir()):
            pairs = find_pairs(sub, image_pattern, mask_pattern)
            if pairs:
                groups[sub.name] = pairs
    if not groups:
        raise DataError(f"{input_dir} holds no {image_pattern} / {mask_pattern} pairs (nor do "
                        "its sub-folders)")
    written = []
    with staged_folder(output_dir, overwrite=overwrite, what="nnU-Net dataset") as staging:
        for sub, pairs in groups.items():
            target = staging if sub is None else staging / sub
            name = dataset_name if sub is None else sub.split("_", 1)[-1]
            written.append(_prepare_one(pairs, target, name, modality))
    return written
