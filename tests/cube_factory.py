"""Tiny aneurysm-cube folders for tests: a bright ball (the aneurysm, with a Gaussian mask) or
a bright straight tube (a vessel, no mask) in noise, so a small model learns them in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.data.npz_cubes import TEST_FOLD, fold_folder

SHAPE = (8, 32, 32)


def cube_arrays(rng: np.random.Generator, positive: bool, shape=SHAPE,
                sigma: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` uint8 and ``mask`` float16 of one cube."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    volume = rng.normal(90, 12, shape)
    centre = np.array(shape) / 2 + rng.uniform(-0.2, 0.2, 3) * np.array(shape)
    # Every cube has a vessel; the positives also have a ball on it.
    row = centre[1] + rng.uniform(-3, 3)
    volume[np.abs(y - row) + np.abs(z - centre[0]) <= 1.2] = 170
    mask = np.zeros(shape, dtype=np.float32)
    if positive:
        distance2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        volume[distance2 <= 9] = 200
        mask = np.exp(-distance2 / (2 * sigma ** 2))
    return np.clip(volume, 0, 255).astype(np.uint8), mask.astype(np.float16)


def write_cube(path: Path, volume: np.ndarray, mask: np.ndarray, *, label: int, fold: int,
               compress: bool = False, drop: str | None = None,
               replace: dict | None = None) -> Path:
    """One cube file; ``replace`` swaps arrays, ``drop`` leaves one out."""
    arrays = {"volume": volume, "mask": mask, "label": np.int64(label), "fold": np.int64(fold)}
    arrays.update(replace or {})
    if drop:
        arrays.pop(drop)
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    return path


def write_cubes_dir(root: Path, *, per_fold: tuple[int, int] = (2, 2), shape=SHAPE,
                    test: tuple[int, int] = (0, 0), seed: int = 0,
                    series_prefix: str = "1.2.840.") -> Path:
    """``per_fold`` = (positives, negatives) in each of the five folds, one series per
    positive (with its first negative) so folds are split by series."""
    rng = np.random.default_rng(seed)
    for fold in [0, 1, 2, 3, 4, TEST_FOLD]:
        positives, negatives = test if fold == TEST_FOLD else per_fold
        for i in range(max(positives, negatives)):
            series = f"{series_prefix}{fold % 10}{i}"
            for kind, count in (("pos", positives), ("neg", negatives)):
                if i < count:
                    volume, mask = cube_arrays(rng, kind == "pos", shape)
                    write_cube(fold_folder(root, fold) / f"{kind}_{series}_0.npz", volume, mask,
                               label=int(kind == "pos"), fold=fold)
    return root


def write_volumes(folder: Path, *, positives: int = 5, negatives: int = 2,
                  shape_xyz=(40, 40, 20), spacing_xyz=(1.0, 1.0, 2.0)) -> Path:
    """NIfTI volumes with one bright ball each in the first ``positives`` series, and the
    centres CSV (voxel coordinates) that `prepare` reads."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    ball = (14, 20, 10)
    rows = ["series_id,voxel_x,voxel_y,voxel_z"]
    for index in range(positives + negatives):
        rng = np.random.default_rng(index)
        data = rng.normal(30, 5, shape_xyz)
        if index < positives:
            i, j, k = np.meshgrid(*[np.arange(n) for n in shape_xyz], indexing="ij")
            near = sum(((a - b) * s) ** 2 for a, b, s in zip((i, j, k), ball, spacing_xyz)) <= 9
            data[near] = 300
            rows.append(f"9.8.{index},{ball[0]},{ball[1]},{ball[2]}")
        nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([*spacing_xyz, 1.0])),
                 folder / f"9.8.{index}.nii.gz")
    (folder / "aneurysm_centres.csv").write_text("\n".join(rows) + "\n")
    return folder
