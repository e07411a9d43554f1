"""Synthetic brain-MRI-like datasets for in-context learning, as ``*_img`` / ``*_gt`` NIfTI pairs.

Each dataset is a folder ``DatasetNNN_<Name>`` of cases: a head (ellipsoid brain inside a
bright skull, a bias field and noise) holding ``structures`` labelled structures (labels
1..structures). A dataset has its own kinds of structure (ball, box, shell, rod, disc),
each with its own intensity (well apart from the others' and from the brain's) and size,
placed at random. Every case of a dataset holds all of
them, so a target alone does not say which one an episode segments: only the context labels
do (the episode's foreground is a random subset of the labels). The last dataset
(``..._HeldOut``) uses kinds and intensities of its own and is meant never to be trained on,
so in-context learning is judged on it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.staging import staged_folder

KINDS = ("ball", "box", "shell", "rod", "disc")


BRAIN, SKULL = 0.45, 0.9
LEVELS = (0.05, 1.45)  # range of structure intensities
LEVEL_GAP = 0.22  # least difference between two structures of a dataset
TISSUE_GAP = 0.15  # least difference from the brain and the skull


def _levels(rng: np.random.Generator, count: int) -> list[float]:
    """``count`` intensities in ``LEVELS``, ``LEVEL_GAP`` apart and ``TISSUE_GAP`` from brain
    and skull: with the bias field (+-15 %) and case jitter (+-8 %) each structure of a dataset
    stays told apart from the others and from the tissue by intensity, so a context of labelled
    pairs says which one is asked, and one dataset's levels do not fit the next. Drawn one at a
    time among the candidates still free (a grid of 0.005), starting again on a dead end."""
    grid = np.arange(LEVELS[0], LEVELS[1] + 1e-9, 0.005)
    grid = grid[(abs(grid - BRAIN) >= TISSUE_GAP) & (abs(grid - SKULL) >= TISSUE_GAP)]
    for _ in range(1000):
        free, levels = grid, []
        while len(levels) < count and len(free):
            level = float(free[rng.integers(len(free))])
            levels.append(level)
            free = free[abs(free - level) >= LEVEL_GAP]
        if len(levels) == count:
            return levels
    raise ValueError(f"cannot place {count} structure intensities {LEVEL_GAP} apart in {LEVELS}")


def _structure_specs(rng: np.random.Generator, count: int, held_out: bool,
                     radius=(0.16, 0.24)) -> list[dict]:
    """Kinds and intensities of a dataset's ``count`` structures. Intensities are the
    dataset's own (:func:`_levels`, from a child generator of ``rng``; ``held_out`` seeds it
    differently)."""
    kinds = list(rng.permutation(KINDS))[:count] if count <= len(KINDS) else list(
        rng.choice(KINDS, count))
    levels = _levels(np.random.default_rng(rng.integers(2**31) + (7919 if held_out else 0)),
                     count)
    return [{"kind": str(kind), "radius": float(rng.uniform(*radius)), "intensity": level}
            for kind, level in zip(kinds, levels)]


def _grid(shape) -> tuple[np.ndarray, ...]:
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    return tuple(np.meshgrid(*axes, indexing="ij"))


def _structure_mask(kind: str, grid, centre, radius, rng) -> np.ndarray:
    x, y, z = (g - c for g, c in zip(grid, centre))
    if kind == "box":
        return np.maximum(np.maximum(abs(x), abs(y)), abs(z)) < radius * 0.85
    if kind == "shell":
        r = np.sqrt(x * x + y * y + z * z)
        return (r < radius * 1.1) & (r > radius * 0.6)
    if kind == "rod":
        axis = rng.integers(3)
        parts = [x, y, z]
        stretched = [p / (radius * (2.2 if i == axis else 0.55)) for i, p in enumerate(parts)]
        return sum(p * p for p in stretched) < 1
    if kind == "disc":  # flattened along one random axis
        axis = rng.integers(3)
        parts = [x, y, z]
        return sum((p / (radius * (0.5 if i == axis else 1.25))) ** 2
                   for i, p in enumerate(parts)) < 1
    return x * x + y * y + z * z < radius * radius  # ball


def synthetic_case(rng: np.random.Generator, shape, specs, noise_std: float):
    """One case: ``(image float32, labels uint8)`` of ``shape``."""
    grid = _grid(shape)
    x, y, z = grid
    head = (x / 0.9) ** 2 + (y / 0.95) ** 2 + (z / 0.85) ** 2
    image = np.zeros(shape, np.float32)
    image[head < 1] = SKULL
    brain = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2 < 1
    image[brain] = BRAIN
    labels = np.zeros(shape, np.uint8)
    placed: list[np.ndarray] = []
    for value, spec in enumerate(specs, start=1):
        radius = spec["radius"] * rng.uniform(0.85, 1.15)
        for _ in range(50):  # apart from the structures already placed
            centre = rng.uniform(-0.5, 0.5, size=3)
            if all(np.linalg.norm(centre - other) > 2.2 * radius + 0.05 for other in placed):
                break
        placed.append(centre)
        mask = _structure_mask(spec["kind"], grid, centre, radius, rng) & brain
        labels[mask] = value
        image[mask] = spec["intensity"] * rng.uniform(0.92, 1.08)
    bias = 1 + 0.15 * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y + rng.uniform(-1, 1) * z)
    image = image * bias + rng.normal(0, noise_std, shape).astype(np.float32)
    return (image * 1000).astype(np.float32), labels


def generate_neuroverse3d_data(data_dir: str | Path, *, num_datasets: int = 4,
                               cases_per_dataset: int = 12, volume_shape=(40, 48, 40),
                               structures: int = 4, noise_std: float = 0.03,
                               spacing: float = 1.2, seed: int = 0,
                               overwrite: bool = False,
                               structure_radius: tuple[float, float] = (0.16, 0.24)) -> list[Path]:
    """Write ``num_datasets`` folders of ``*_img.nii.gz`` / ``*_gt.nii.gz`` pairs; the last
    one is the held-out dataset. ``structure_radius``: range of a structure's radius as a
    fraction of the half-width of the volume (the brain's is ~0.8). Returns the dataset folders."""
    if num_datasets < 2:
        raise ValueError(f"num_datasets must be >= 2 (one is held out), got {num_datasets}")
    low, high = structure_radius
    if not 0 < low <= high:
        raise ValueError(f"structure_radius must be (low, high) with 0 < low <= high, got "
                         f"{tuple(structure_radius)}")
    if structures < 2:
        raise ValueError(f"structures must be >= 2, got {structures}")
    rng = np.random.default_rng(seed)
    names = [f"Dataset{index:03d}_SynBrain{chr(ord('A') + index - 1)}"
             for index in range(1, num_datasets)] + [f"Dataset{num_datasets:03d}_HeldOut"]
    shape = tuple(int(s) for s in volume_shape)
    with staged_folder(data_dir, overwrite=overwrite, what="synthetic Neuroverse3D data") as staging:
        for dataset_index, name in enumerate(names):
            specs = _structure_specs(rng, structures, held_out=dataset_index == num_datasets - 1,
                                     radius=structure_radius)
            folder = staging / name
            folder.mkdir()
            for case in range(cases_per_dataset):
                image, labels = synthetic_case(rng, shape, specs, noise_std)
                affine = np.diag([spacing, spacing, spacing, 1.0])
                affine[:3, 3] = rng.uniform(-80, -60, size=3)
                nib.save(nib.Nifti1Image(image, affine), folder / f"case_{case:03d}_img.nii.gz")
                nib.save(nib.Nifti1Image(labels, affine), folder / f"case_{case:03d}_gt.nii.gz")
    return [Path(data_dir) / name for name in names]
