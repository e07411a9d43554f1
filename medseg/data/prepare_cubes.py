"""Cutting aneurysm cubes out of whole volumes (the seed's ``prepare_aneurysm_cubes.py``).

Input: a folder of NIfTI volumes, ``<series_id>.nii.gz`` (or ``.nii``), and a CSV of
aneurysm centres with a ``series_id`` column and either voxel coordinates ``voxel_x, voxel_y,
voxel_z`` (indices ``i, j, k`` of the stored array) or world coordinates ``world_x, world_y,
world_z`` (mm, the NIfTI affine's frame). Plain ``x, y, z`` are refused: they could be either,
and millimetres that happen to fall inside the grid would silently be taken as voxels. Other
columns are ignored; a series without rows has no aneurysm.

For every series: reorient to RAS, optionally resample to ``target_spacing``, map
intensities to uint8 (a fixed window, or the volume's 0.5-99.5 percentiles), then cut

- one positive cube around each aneurysm, its centre shifted by up to ``positive_jitter`` of
  the cube size so the aneurysm is not always in the middle, and
- ``negatives_per_series`` negative cubes whose Gaussian mask stays below 0.01 everywhere:
  half cut where another series has an aneurysm (the same anatomy, vessels and bifurcations
  without the sac: the hard negatives, and the reason a model cannot tell positives by where
  they lie), half anywhere in the body,

each with a float16 mask holding a Gaussian of ``mask_sigma_mm`` around every aneurysm centre.
Series, not cubes, are assigned to folds (and a ``test_fraction`` of them to ``test/``),
positives and negatives stratified, so no series crosses folds. The output folder also gets
``series_folds.csv`` and ``preparation.json`` and is written whole or not at all.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import zoom

from medseg.config import integer, number, optional, sequence
from medseg.data.npz_cubes import NUM_FOLDS, TEST_FOLD, fold_folder, npz_array_header
from medseg.data.nifti import is_nifti, nifti_stem, open_nifti
from medseg.data.staging import refuse_to_overwrite, staged_directory
from medseg.errors import ConfigError, DataError, describe

log = logging.getLogger(__name__)

CENTRES_FILE = "aneurysm_centres.csv"
COORDINATE_COLUMNS = {"voxel": ("voxel_x", "voxel_y", "voxel_z"),
                      "world": ("world_x", "world_y", "world_z")}
AMBIGUOUS_COLUMNS = ("x", "y", "z")
_CHOICES = ("voxel_x, voxel_y, voxel_z (voxel indices i, j, k of the stored array) or world_x, "
            "world_y, world_z (mm in the NIfTI affine's frame)")
PERCENTILES = (0.5, 99.5)
NEGATIVE_MASK_LIMIT = 0.01
NEGATIVE_ATTEMPTS = 200
BODY_LEVEL = 25  # uint8 intensity above which a voxel counts as inside the body


@dataclass(frozen=True)
class Centre:
    """One CSV row: an aneurysm centre in voxel (i, j, k) or world (x, y, z) coordinates."""

    series_id: str
    coordinates: tuple[float, float, float]
    space: str
    line: int


@dataclass
class Volume:
    """A series ready to cut: uint8 intensities [z, y, x], spacing (z, y, x) mm, centres in
    (z, y, x) voxel coordinates, and the map from world (x, y, z, 1) to (z, y, x) voxels."""

    data: np.ndarray
    spacing: np.ndarray
    centres: list[np.ndarray]
    world_to_voxel: np.ndarray
    affine: np.ndarray  # the RAS-reoriented volume's affine, before any resampling
    grid_shape: tuple[int, int, int]  # (z, y, x) before any resampling

    def voxel_of(self, world: np.ndarray) -> np.ndarray:
        return (self.world_to_voxel @ np.r_[world, 1.0])[:3]


@dataclass
class PrepareSummary:
    output_dir: Path
    cubes: dict[str, dict[str, int]] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    negatives_not_placed: int = 0


def find_volumes(volumes_dir: str | Path) -> dict[str, Path]:
    """``series_id -> path`` of the NIfTI files in ``volumes_dir``."""
    volumes_dir = Path(volumes_dir)
    if not volumes_dir.is_dir():
        raise DataError(f"volumes folder {volumes_dir} does not exist; expected NIfTI volumes "
                        "<series_id>.nii.gz and a CSV of aneurysm centres")
    volumes = {}
    for path in sorted(volumes_dir.iterdir()):
        if is_nifti(path) and path.is_file():
            volumes[nifti_stem(path)] = path
    if not volumes:
        raise DataError(f"{volumes_dir} holds no NIfTI volumes; expected files named "
                        "<series_id>.nii.gz or <series_id>.nii")
    return volumes


def read_centres(csv_path: str | Path, series_ids: Sequence[str]) -> dict[str, list[Centre]]:
    """Aneurysm centres by series, checked: known series, numeric coordinates."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"aneurysm centres file {csv_path} does not exist; expected a CSV with "
                        f"series_id and {_CHOICES}")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        spaces = [s for s, names in COORDINATE_COLUMNS.items() if set(names) <= set(columns)]
        if len(spaces) > 1:
            raise DataError(f"{csv_path} has both voxel_x, voxel_y, voxel_z and world_x, "
                            "world_y, world_z columns; keep one of them")
        if not spaces and set(AMBIGUOUS_COLUMNS) <= set(columns):
            raise DataError(f"{csv_path}: columns x, y, z do not say whether they are voxel "
                            f"indices or millimetres; name them {_CHOICES}")
        if "series_id" not in columns or not spaces:
            raise DataError(f"{csv_path} has columns {', '.join(columns) or 'none'}; expected "
                            f"series_id and either {_CHOICES}")
        space = spaces[0]
        known = set(series_ids)
        centres: dict[str, list[Centre]] = {}
        for line, row in enumerate(reader, start=2):
            series = (row["series_id"] or "").strip()
            if series not in known:
                raise DataError(f"{csv_path}:{line}: series {series!r} has no volume "
                                f"{series}.nii.gz in the volumes folder")
            values = []
            for name in COORDINATE_COLUMNS[space]:
                try:
                    value = float(row[name])
                except (TypeError, ValueError):
                    raise DataError(f"{csv_path}:{line}: {name}={row[name]!r} is not a "
                                    "number") from None
                if not math.isfinite(value):
                    raise DataError(f"{csv_path}:{line}: {name}={row[name]!r} is not finite")
                values.append(value)
            centres.setdefault(series, []).append(Centre(series, tuple(values), space, line))
    return centres


def assign_folds(series_ids: Sequence[str], positive: set[str], *, num_folds: int,
                 test_fraction: float, rng: np.random.Generator) -> dict[str, int]:
    """Fold of each series (``TEST_FOLD`` for test), positives and negatives dealt round
    the folds separately so each fold gets its share of both."""
    with_aneurysm = [s for s in sorted(series_ids) if s in positive]
    without = [s for s in sorted(series_ids) if s not in positive]
    rng.shuffle(with_aneurysm)
    rng.shuffle(without)
    folds = {}
    for group in (with_aneurysm, without):
        held_out = int(round(test_fraction * len(group)))
        for series in group[:held_out]:
            folds[series] = TEST_FOLD
        group[:] = group[held_out:]
    if len(with_aneurysm) < num_folds:
        raise DataError(f"only {len(with_aneurysm)} series with aneurysms remain for the "
                        f"{num_folds} folds (test_fraction={test_fraction:g}); every fold needs "
                        "at least one")
    for position, series in enumerate(with_aneurysm + without):
        folds[series] = position % num_folds
    return folds


def world_centres(path: Path, centres: Sequence[Centre]) -> list[np.ndarray]:
    """World (x, y, z) mm of a series' centres, checked to lie inside its volume (reads the
    NIfTI header only)."""
    image = open_nifti(path)
    located = []
    for centre in centres:
        point = np.r_[centre.coordinates, 1.0]
        world = point[:3] if centre.space == "world" else (image.affine @ point)[:3]
        voxel = (np.linalg.inv(image.affine) @ np.r_[world, 1.0])[:3]
        if np.any(voxel < -0.5) or np.any(voxel > np.array(image.shape[:3]) - 0.5):
            raise DataError(f"centres CSV line {centre.line}: {centre.space} coordinates "
                            f"{list(centre.coordinates)} lie outside {path.name} (voxel "
                            f"{np.round(voxel, 1).tolist()}, volume shape "
                            f"{list(image.shape[:3])})")
        located.append(world)
    return located


def load_normalised_series(path: Path, centres: Sequence[Centre], *,
                           target_spacing: Sequence[float] | None,
                           intensity_window: Sequence[float] | None) -> Volume:
    """Read, reorient to RAS, resample and normalise one series; map its centres."""
    image = open_nifti(path)
    if len(image.shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, found shape {list(image.shape)}")
    canonical = nib.as_closest_canonical(image)
    try:
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except Exception as error:
        raise DataError(f"{path}: the voxel data could not be read ({describe(error)})") from None
    zyx = np.ascontiguousarray(data.transpose(2, 1, 0))
    spacing = np.array(canonical.header.get_zooms()[:3][::-1], dtype=float)
    world_to_voxel = _SWAP_XYZ @ np.linalg.inv(canonical.affine)
    mapped = [(world_to_voxel @ np.r_[world, 1.0])[:3] for world in world_centres(path, centres)]
    grid_shape = zyx.shape
    if target_spacing is not None:
        zyx, spacing, scale = _resample(zyx, spacing, np.asarray(target_spacing, float))
        mapped = [c * scale for c in mapped]
        world_to_voxel = np.diag([*scale, 1.0]) @ world_to_voxel
    return Volume(data=to_uint8(zyx, intensity_window), spacing=spacing, centres=mapped,
                  world_to_voxel=world_to_voxel, affine=canonical.affine, grid_shape=grid_shape)


# Canonical NIfTI voxels are (i, j, k) = (x, y, z); cubes are (z, y, x).
_SWAP_XYZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def _resample(zyx: np.ndarray, spacing: np.ndarray,
              target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample to ``target`` spacing; also return the factor that maps old voxel
    coordinates to new ones."""
    shape = np.array(zyx.shape)
    new_shape = np.maximum(np.round(shape * spacing / target).astype(int), 2)
    resampled = zoom(zyx, new_shape / shape, order=1)
    # scipy's zoom maps the first and last voxel centres onto each other.
    scale = (np.array(resampled.shape) - 1) / np.maximum(shape - 1, 1)
    return resampled, spacing / scale, scale


def to_uint8(data: np.ndarray, window: Sequence[float] | None) -> np.ndarray:
    """Map ``window`` [low, high] (or the 0.5-99.5 percentiles) linearly onto 0-255."""
    low, high = window if window is not None else np.percentile(data, PERCENTILES)
    scaled = (data - low) * (255.0 / max(high - low, 1e-6))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def cube_start(centre: np.ndarray, volume_shape: Sequence[int],
               cube_shape: Sequence[int]) -> np.ndarray:
    """First voxel of the cube centred (as nearly as the volume allows) on ``centre``."""
    start = np.round(np.asarray(centre) - np.asarray(cube_shape) / 2).astype(int)
    for axis, (size, dim) in enumerate(zip(cube_shape, volume_shape)):
        start[axis] = np.clip(start[axis], 0, dim - size) if dim >= size else (dim - size) // 2
    return start


def cut_cube(volume: np.ndarray, start: np.ndarray, cube_shape: Sequence[int]) -> np.ndarray:
    """The ``cube_shape`` block at ``start``; parts outside the volume are 0."""
    cube = np.zeros(tuple(cube_shape), dtype=volume.dtype)
    source, target = [], []
    for begin, size, dim in zip(start, cube_shape, volume.shape):
        low, high = max(begin, 0), min(begin + size, dim)
        source.append(slice(low, high))
        target.append(slice(low - begin, high - begin))
    cube[tuple(target)] = volume[tuple(source)]
    return cube


def gaussian_mask(start: np.ndarray, cube_shape: Sequence[int], centres: Sequence[np.ndarray],
                  spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """The largest of the Gaussians (``sigma_mm``, peak 1) around ``centres`` in the cube."""
    mask = np.zeros(tuple(cube_shape), dtype=np.float32)
    axes = [np.arange(size, dtype=np.float32) + begin for begin, size in zip(start, cube_shape)]
    for centre in centres:
        squared = [((axes[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)]
        distance = squared[0][:, None, None] + squared[1][None, :, None] + squared[2][None, None, :]
        np.maximum(mask, np.exp(-distance / (2 * sigma_mm ** 2)), out=mask)
    return mask.astype(np.float16)


def negative_starts(volume: Volume, cube_shape: Sequence[int], count: int, sigma_mm: float,
                    elsewhere: Sequence[np.ndarray], jitter: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``count`` cube positions whose mask stays below NEGATIVE_MASK_LIMIT: every other
    one at a (jittered) world position from ``elsewhere``, the others in the body."""
    data = volume.data
    body = np.argwhere(data > BODY_LEVEL)
    if len(body) == 0:
        body = np.argwhere(np.ones_like(data, dtype=bool))
    shape = np.asarray(cube_shape)
    starts: list[np.ndarray] = []
    tried: set[tuple[int, ...]] = set()
    for attempt in range(NEGATIVE_ATTEMPTS):
        if len(starts) == count:
            break
        if elsewhere and attempt % 2 == 0:
            world = elsewhere[rng.integers(len(elsewhere))]
            centre = volume.voxel_of(world) + rng.uniform(-jitter, jitter, 3) * shape
        else:
            centre = body[rng.integers(len(body))]
        start = cube_start(centre, data.shape, cube_shape)
        key = tuple(int(v) for v in start)
        if key in tried:
            continue
        tried.add(key)
        peak = mask_peak(start, cube_shape, volume.centres, volume.spacing, sigma_mm)
        if peak < NEGATIVE_MASK_LIMIT:
            starts.append(start)
    return starts


def mask_peak(start: np.ndarray, cube_shape: Sequence[int], centres: Sequence[np.ndarray],
              spacing: np.ndarray, sigma_mm: float) -> float:
    """``gaussian_mask(...).max()`` without drawing the mask: each Gaussian peaks in the
    cube at the voxel nearest its centre (per axis: the centre's index clipped to the cube),
    so testing a position costs nothing however large the cube (a cube as large as the
    volume made the search draw a volume-sized mask per attempt)."""
    peak = 0.0
    low = np.asarray(start, dtype=float)
    high = low + np.asarray(cube_shape) - 1
    for centre in centres:
        nearest = np.clip(np.round(centre), low, high)
        distance = float(np.sum(((nearest - centre) * spacing) ** 2))
        peak = max(peak, math.exp(-distance / (2 * sigma_mm ** 2)))
    return peak


def prepare_cubes(
    volumes_dir: str | Path,
    output_dir: str | Path,
    *,
    centres_csv: str | Path | None = None,
    cube_shape: Sequence[int] = (32, 128, 128),
    negatives_per_series: int = 1,
    mask_sigma_mm: float = 2.0,
    intensity_window: Sequence[float] | None = None,
    target_spacing: Sequence[float] | None = None,
    positive_jitter: float = 0.25,
    test_fraction: float = 0.15,
    num_folds: int = NUM_FOLDS,
    compress: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> PrepareSummary:
    """Write the cubes folder (see the module docstring); return what was written.

    ``centres_csv`` defaults to ``volumes_dir/aneurysm_centres.csv``. Everything is checked
    before the first file is written.
    """
    sequence(integer(minimum=1), length=3)("cube_shape", cube_shape)
    integer(minimum=0)("negatives_per_series", negatives_per_series)
    number(above=0)("mask_sigma_mm", mask_sigma_mm)
    optional(sequence(number(), length=2))("intensity_window", intensity_window)
    optional(sequence(number(above=0), length=3))("target_spacing", target_spacing)
    number(minimum=0, maximum=0.49)("positive_jitter", positive_jitter)
    number(minimum=0, maximum=0.9)("test_fraction", test_fraction)
    if intensity_window is not None and intensity_window[0] >= intensity_window[1]:
        raise ConfigError(f"intensity_window must be [low, high] with low < high, got "
                          f"{list(intensity_window)}")
    volumes = find_volumes(volumes_dir)
    centres_csv = Path(centres_csv) if centres_csv else Path(volumes_dir) / CENTRES_FILE
    centres = read_centres(centres_csv, list(volumes))
    refuse_to_overwrite(output_dir, overwrite, "aneurysm cubes")
    aneurysms_anywhere = [world for series, rows in centres.items()
                          for world in world_centres(volumes[series], rows)]
    # Every volume is read once before the first cube is cut, so a bad one is found before
    # the good series have been worked through.
    for series, path in volumes.items():
        _check_readable(path)
    _warn_about_cube_size(volumes, centres, cube_shape, target_spacing)
    rng = np.random.default_rng(seed)
    folds = assign_folds(list(volumes), set(centres), num_folds=num_folds,
                         test_fraction=test_fraction, rng=rng)
    summary = PrepareSummary(Path(output_dir))
    with staged_directory(output_dir) as staging:
        for fold in [*range(num_folds), *([TEST_FOLD] if TEST_FOLD in folds.values() else [])]:
            fold_folder(staging, fold).mkdir()
        rows = []
        for series, path in volumes.items():
            volume = load_normalised_series(path, centres.get(series, []),
                                            target_spacing=target_spacing,
                                            intensity_window=intensity_window)
            negatives = negative_starts(volume, cube_shape, negatives_per_series, mask_sigma_mm,
                                        aneurysms_anywhere, positive_jitter, rng)
            written = _write_series(staging, series, folds[series], volume, cube_shape,
                                    negatives, mask_sigma_mm, positive_jitter, compress, rng)
            summary.negatives_not_placed += negatives_per_series - written["negative"]
            rows.append((series, folds[series], len(volume.centres), written["positive"],
                         written["negative"]))
            key = "test" if folds[series] == TEST_FOLD else f"fold_{folds[series]}"
            counts = summary.cubes.setdefault(key, {"positive": 0, "negative": 0})
            for kind in counts:
                counts[kind] += written[kind]
            summary.series[key] = summary.series.get(key, 0) + 1
        _write_records(staging, rows, summary, {
            "volumes_dir": str(volumes_dir), "centres_csv": str(centres_csv),
            "cube_shape": list(cube_shape), "negatives_per_series": negatives_per_series,
            "mask_sigma_mm": mask_sigma_mm, "intensity_window": intensity_window,
            "target_spacing": target_spacing, "positive_jitter": positive_jitter,
            "test_fraction": test_fraction, "compress": compress, "seed": seed})
    if summary.negatives_not_placed:
        log.warning("%d negative cubes could not be placed clear of every aneurysm",
                    summary.negatives_not_placed)
    return summary


def _check_readable(path: Path) -> None:
    image = open_nifti(path)
    if len(image.shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, found shape {list(image.shape)}")
    try:
        data = np.asarray(image.dataobj)
    except Exception as error:
        raise DataError(f"{path}: the voxel data could not be read ({describe(error)})") from None
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values")


def _warn_about_cube_size(volumes: Mapping[str, Path], centres: Mapping[str, list],
                          cube_shape: Sequence[int], target_spacing) -> None:
    """Say up front when ``cube_shape`` exceeds a volume (zero padding; a single position on
    those axes) and when no negative cube can exist (the cube covers a volume with an
    aneurysm)."""
    for series, path in volumes.items():
        canonical = nib.as_closest_canonical(open_nifti(path))
        shape = np.array(canonical.shape[:3][::-1], dtype=float)  # (z, y, x)
        if target_spacing is not None:
            spacing = np.array(canonical.header.get_zooms()[:3][::-1], dtype=float)
            shape = np.maximum(np.round(shape * spacing / np.asarray(target_spacing)), 2)
        larger = [axis for axis, (c, v) in zip("zyx", zip(cube_shape, shape)) if c > v]
        if not larger:
            continue
        covers = len(larger) == 3 or all(c >= v for c, v in zip(cube_shape, shape))
        note = ("; it covers the whole volume, which holds an aneurysm, so no negative cube "
                "can be cut from it" if covers and series in centres else "")
        log.warning("cube_shape %s (z, y, x) is larger than series %s (%s voxels) on "
                    "axis %s: its cubes are padded with zeros%s", list(cube_shape), series,
                    [int(v) for v in shape], ", ".join(larger), note)


def _write_series(staging: Path, series: str, fold: int, volume: Volume, cube_shape,
                  negatives: list[np.ndarray], sigma_mm: float, jitter: float, compress: bool,
                  rng: np.random.Generator) -> dict[str, int]:
    save = np.savez_compressed if compress else np.savez
    folder = fold_folder(staging, fold)
    shape = np.asarray(cube_shape)
    positives = []
    for centre in volume.centres:
        shifted = centre + rng.uniform(-jitter, jitter, 3) * shape
        positives.append(cube_start(shifted, volume.data.shape, cube_shape))
    written = {"positive": 0, "negative": 0}
    for kind, starts in (("pos", positives), ("neg", negatives)):
        for index, start in enumerate(starts):
            save(folder / f"{kind}_{series}_{index}.npz",
                 volume=cut_cube(volume.data, start, cube_shape),
                 mask=gaussian_mask(start, cube_shape, volume.centres, volume.spacing, sigma_mm),
                 label=np.int64(kind == "pos"), fold=np.int64(fold))
            written["positive" if kind == "pos" else "negative"] += 1
    return written


def _write_records(staging: Path, rows, summary: PrepareSummary, settings: Mapping) -> None:
    with open(staging / "series_folds.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["series_id", "fold", "aneurysms", "positive_cubes", "negative_cubes"])
        writer.writerows(rows)
    record = {"settings": settings, "cubes": summary.cubes, "series": summary.series,
              "negatives_not_placed": summary.negatives_not_placed}
    (staging / "preparation.json").write_text(json.dumps(record, indent=2) + "\n")


@dataclass
class PredictionInput:
    """A volume to predict on, normalised as `prepare` normalises cubes.

    ``volume`` is uint8 (z, y, x); the probability map is written on the grid of ``affine``
    and ``grid_shape`` (the RAS-reoriented input; an NPZ cube has no affine: voxel units).
    """

    path: Path
    volume: np.ndarray
    affine: np.ndarray
    grid_shape: tuple[int, int, int]
    label: int | None


def check_prediction_input(path: str | Path) -> None:
    """An NPZ with a uint8 [D, H, W] ``volume``, or a 3D NIfTI (headers only)."""
    path = Path(path)
    if path.name.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "volume" not in npz.files:
                    raise DataError(f"{path} has no 'volume'; expected an NPZ cube with a uint8 "
                                    f"[D, H, W] volume (found: {', '.join(npz.files) or 'none'})")
                shape, dtype = npz_array_header(npz, "volume")
        except DataError:
            raise
        except Exception as error:  # zipfile and numpy raise many types for foreign files
            raise DataError(f"{path} could not be read as an NPZ cube ({type(error).__name__}: "
                            f"{error})") from None
        if dtype != np.uint8 or len(shape) != 3:
            raise DataError(f"{path}: 'volume' must be uint8 [D, H, W], found {dtype} of shape "
                            f"{list(shape)}")
    elif is_nifti(path):
        shape = open_nifti(path).shape
        if len(shape) != 3:
            raise DataError(f"{path}: expected a 3D volume, found shape {list(shape)}")
    else:
        raise DataError(f"{path}: expected an NPZ cube (.npz) or a NIfTI volume (.nii, .nii.gz)")


def read_prediction_input(path: str | Path, *, intensity_window: Sequence[float] | None,
                          target_spacing: Sequence[float] | None) -> PredictionInput:
    """An NPZ cube (its uint8 ``volume`` as stored) or a NIfTI volume (reoriented, resampled
    and mapped to uint8 as `prepare` does)."""
    path = Path(path)
    check_prediction_input(path)
    if path.name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            volume = npz["volume"]
            label = int(npz["label"].reshape(())) if "label" in npz.files else None
        return PredictionInput(path, volume, np.eye(4), volume.shape, label)
    loaded = load_normalised_series(path, [], target_spacing=target_spacing,
                                    intensity_window=intensity_window)
    return PredictionInput(path, loaded.data, loaded.affine, loaded.grid_shape, None)


def save_probability(probability: np.ndarray, source: PredictionInput, path: str | Path) -> Path:
    """Write a (z, y, x) probability map as a float32 NIfTI on the input's grid."""
    if probability.shape != tuple(source.grid_shape):
        probability = zoom(probability, np.array(source.grid_shape) / np.array(probability.shape),
                           order=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(probability.transpose(2, 1, 0), dtype=np.float32),
                            source.affine)
    nib.save(image, path)
    return path
