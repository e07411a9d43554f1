"""Medical Segmentation Decathlon task folders, and their conversion to PNG slices.

A task folder (``Task006_Lung`` ...) holds::

    dataset.json        modality, labels, numTraining, training [{"image": ..., "label": ...}]
    imagesTr/*.nii.gz   the training volumes
    labelsTr/*.nii.gz   their label maps, same shape

Conversion writes the PNG slice dataset of :mod:`medseg.data.png_slices`: each axial slice
shown through a CT window as 8-bit grey, and its label with every non-zero class as 255.
Volumes are first turned to one display orientation, whatever the order they were stored
in (:data:`DISPLAY_AXES`, from the NIfTI affine): image rows run anterior to posterior, columns
from the patient's right to left (the radiological view), and slice ``k`` counts from
inferior to superior. Slices with tumour are all kept; of the others a sampled share is kept,
so training is not dominated by empty slices. Slice ``k`` of volume ``lung_001.nii.gz``
becomes ``lung_001_slice_0042.png`` in ``images/`` and ``labels/``. The empty slices not kept
go to ``left_out/images/`` and ``left_out/labels/`` (:data:`~medseg.data.png_slices.LEFT_OUT`):
training never reads them, validation scores them, so it covers whole volumes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import logging

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from nibabel import orientations
from PIL import Image

from medseg.data.nifti import nifti_stem, open_nifti
from medseg.data.png_slices import LEFT_OUT
from medseg.data.staging import staged_folder
from medseg.errors import DataError, describe

CONVERSION_RECORD = "conversion.json"
#: Voxel axes of the display orientation (nibabel axis codes): X toward the patient's left, Y
#: posterior, Z superior, so ``slice_to_image`` shows anterior up and the patient's right on
#: the image's left.
DISPLAY_AXES = ("L", "P", "S")
DISPLAY_ORIENTATION = ("rows anterior to posterior, columns the patient's right to left "
                       "(radiological view), slice index inferior to superior")

log = logging.getLogger(__name__)


def stored_axes(affine: np.ndarray) -> str:
    """The axis codes of a volume as stored (``"RAS"``, ``"LPS"`` ...)."""
    return "".join(orientations.aff2axcodes(affine))


def to_display(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A volume stored with ``affine`` in :data:`DISPLAY_AXES` order (flips and transposes
    only; no resampling)."""
    transform = orientations.ornt_transform(orientations.io_orientation(affine),
                                            orientations.axcodes2ornt(DISPLAY_AXES))
    return orientations.apply_orientation(data, transform)


def from_display(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_display`: back to the order of the volume stored with
    ``affine`` (what a prediction saved with that affine needs)."""
    transform = orientations.ornt_transform(orientations.axcodes2ornt(DISPLAY_AXES),
                                            orientations.io_orientation(affine))
    return orientations.apply_orientation(data, transform)


@dataclass(frozen=True)
class MSDCase:
    name: str       # file name without .nii.gz: "lung_001"
    image: Path
    label: Path


@dataclass(frozen=True)
class MSDTask:
    path: Path
    description: dict[str, Any]
    cases: tuple[MSDCase, ...]

    @property
    def modality(self) -> str:
        return str(self.description.get("modality", {}).get("0", ""))


def read_task(task_dir: str | Path) -> MSDTask:
    """Read ``dataset.json`` of a task folder and check that its training files exist."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise DataError(f"MSD task folder {task_dir} does not exist; expected a folder with "
                        "dataset.json, imagesTr/ and labelsTr/ (e.g. .../Task006_Lung)")
    description = _read_dataset_json(task_dir / "dataset.json")
    cases = tuple(_training_cases(task_dir, description))
    if not cases:
        raise DataError(f"{task_dir / 'dataset.json'} lists no training cases; expected "
                        '"training": [{"image": "./imagesTr/x.nii.gz", "label": '
                        '"./labelsTr/x.nii.gz"}, ...]')
    return MSDTask(task_dir, description, cases)


def _read_dataset_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; an MSD task folder needs its dataset.json "
                        "(modality, labels and the list of training cases)")
    try:
        description = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(description, dict) or not isinstance(description.get("training"), list):
        raise DataError(f"{path} has no 'training' list; expected the MSD dataset.json with "
                        '"training": [{"image": ..., "label": ...}, ...]')
    return description


def _training_cases(task_dir: Path, description: dict[str, Any]) -> Iterator[MSDCase]:
    """The training pairs, resolved against the task folder by MONAI's decathlon reader once
    each entry's shape has been checked (MONAI's reader fails on a malformed entry with a
    bare ``TypeError``)."""
    dataset_json = task_dir / "dataset.json"
    for number, entry in enumerate(description["training"], start=1):
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise DataError(f"{dataset_json}: training entry {number} is {entry!r}; expected "
                            '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}')
    datalist = load_decathlon_datalist(dataset_json, is_segmentation=True,
                                       data_list_key="training", base_dir=task_dir)
    for number, (entry, resolved) in enumerate(zip(description["training"], datalist), start=1):
        image, label = Path(resolved["image"]), Path(resolved["label"])
        for kind, path in (("image", image), ("label", label)):
            if not path.is_file():
                raise DataError(f"{dataset_json}: training entry {number} names the {kind} "
                                f"{entry[kind]}, but {path} does not exist")
        yield MSDCase(nifti_stem(image), image, label)


def read_scaled_volume(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A 3D NIfTI volume as float32 (scaled values, e.g. HU) and the image it came from."""
    path = Path(path)
    image = open_nifti(path)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises several types for truncated files
        raise DataError(f"{path} could not be read as a NIfTI volume "
                        f"({describe(error)})") from None
    if data.ndim > 3 and all(size == 1 for size in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise DataError(f"{path} has shape {list(data.shape)}; expected a 3D volume [X, Y, Z]")
    return data, image


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """CT values seen through a window: ``center ± width/2`` mapped to 0-255 (uint8)."""
    low = center - width / 2
    scaled = (hu.astype(np.float32) - low) / width
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def slice_to_image(volume_slice: np.ndarray) -> np.ndarray:
    """Axial slice [X, Y] -> image rows and columns [Y, X], the radiological view of the MSD
    volumes (anterior up). Its own inverse."""
    return np.ascontiguousarray(volume_slice.T)


def slice_file_name(volume: str, index: int) -> str:
    return f"{volume}_slice_{index:04d}.png"


@dataclass(frozen=True)
class ConversionSettings:
    window_center: float = -300.0
    window_width: float = 1400.0
    empty_slice_fraction: float = 0.1
    seed: int = 0


def convert_task(task_dir: str | Path, output_dir: str | Path, settings: ConversionSettings, *,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write ``images/`` and ``labels/`` PNG slices of every training case into ``output_dir``.

    Every case is checked (readable, image and label of the same shape) before anything is
    written; the slices go to a hidden sibling folder renamed into place at the end, so bad
    input or an interrupted conversion leaves no half-written dataset. Returns the record
    also saved as ``conversion.json``.
    """
    task = read_task(task_dir)
    if not task.modality.upper().startswith("CT"):
        raise DataError(f"{task.path / 'dataset.json'} gives modality {task.modality!r}; CT "
                        "windowing needs a CT task")
    for case in task.cases:
        _check_pair(case)
    with staged_folder(output_dir, overwrite=overwrite, what="PNG slices") as staging:
        for folder in ("images", "labels", f"{LEFT_OUT}/images", f"{LEFT_OUT}/labels"):
            (staging / folder).mkdir(parents=True)
        volumes = [_convert_case(case, number, staging, settings)
                   for number, case in enumerate(task.cases)]
        record = {"task": str(task.path), "name": task.description.get("name"),
                  "window_center": settings.window_center, "window_width": settings.window_width,
                  "empty_slice_fraction": settings.empty_slice_fraction, "seed": settings.seed,
                  "orientation": {"axes": "".join(DISPLAY_AXES),
                                  "slices": DISPLAY_ORIENTATION},
                  "volumes": volumes,
                  "slices": sum(v["kept_slices"] for v in volumes),
                  "left_out_slices": sum(v["left_out_slices"] for v in volumes),
                  "tumour_slices": sum(v["tumour_slices"] for v in volumes)}
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_conversion_record(dataset_dir: str | Path) -> dict[str, Any] | None:
    """``conversion.json`` of a PNG slice folder written by :func:`convert_task`, or ``None``
    when there is none (a folder made otherwise)."""
    path = Path(dataset_dir) / CONVERSION_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); it is written by `convert`") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} holds {type(record).__name__}; expected the object `convert` "
                        "writes")
    return record


def partial_volumes_note(dataset_dir: str | Path) -> str | None:
    """One line when ``dataset_dir`` was converted before ``left_out/`` existed and dropped
    slices: then validation can score only the converted slices of its volumes."""
    record = read_conversion_record(dataset_dir)
    if record is None or "left_out_slices" in record:
        return None
    dropped = sum(v.get("slices", 0) - v.get("kept_slices", 0) for v in record.get("volumes", []))
    if dropped <= 0:
        return None
    return (f"{dataset_dir} holds {dropped} fewer slices than its volumes (converted before "
            f"{LEFT_OUT}/ was written): validation scores only the converted slices of each "
            "volume; run `convert` again to score whole volumes")


def _check_pair(case: MSDCase) -> None:
    image_shape = _header_shape(case.image)
    label_shape = _header_shape(case.label)
    if image_shape != label_shape:
        raise DataError(f"{case.label} has shape {list(label_shape)} but its image {case.image} "
                        f"has {list(image_shape)}; expected the same shape")


def _header_shape(path: Path) -> tuple[int, ...]:
    shape = tuple(int(s) for s in open_nifti(path).shape)
    shape = shape[:3] + tuple(s for s in shape[3:] if s != 1)
    if len(shape) != 3:
        raise DataError(f"{path} has shape {list(shape)}; expected a 3D volume [X, Y, Z]")
    return shape


def _convert_case(case: MSDCase, number: int, output: Path,
                  settings: ConversionSettings) -> dict[str, Any]:
    hu, image = read_scaled_volume(case.image)
    label, _ = read_scaled_volume(case.label)
    stored = stored_axes(image.affine)
    hu, label = to_display(hu, image.affine), to_display(label, image.affine)
    classes = [float(v) for v in np.unique(label) if v != 0]
    if len(classes) > 1:
        log.warning("%s: label values %s; every non-zero class counts as tumour (255 in "
                    "labels/)", case.label, ", ".join(f"{v:g}" for v in [0.0, *classes]))
    foreground = label > 0
    has_tumor = foreground.any(axis=(0, 1))
    empty = np.flatnonzero(~has_tumor)
    rng = np.random.default_rng([settings.seed, number])
    kept_empty = rng.choice(empty, size=int(round(settings.empty_slice_fraction * len(empty))),
                            replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(has_tumor), kept_empty])).astype(int)
    grey = window(hu, settings.window_center, settings.window_width)
    for index in range(hu.shape[2]):
        name = slice_file_name(case.name, index)
        folder = output if index in keep else output / LEFT_OUT
        Image.fromarray(slice_to_image(grey[:, :, index])).save(folder / "images" / name)
        mask = slice_to_image(foreground[:, :, index]).astype(np.uint8) * 255
        Image.fromarray(mask).save(folder / "labels" / name)
    return {"volume": case.name, "stored_orientation": stored,
            "label_values": [0, *(int(v) if v.is_integer() else v for v in classes)],
            "slices": int(hu.shape[2]), "kept_slices": len(keep),
            "left_out_slices": int(hu.shape[2]) - len(keep),
            "tumour_slices": int(has_tumor.sum()), "tumour_voxels": int(foreground.sum())}
