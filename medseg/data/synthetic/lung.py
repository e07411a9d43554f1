"""Synthetic chest CT in the Medical Segmentation Decathlon layout of Task006_Lung.

Each volume is a chest: an elliptical trunk (skin line, subcutaneous fat, chest-wall muscle,
ribs, sternum, spine with canal), the mediastinum with heart and descending aorta, two lungs
whose cross-section grows from the apex to the diaphragm dome, the trachea splitting into the
main bronchi, pulmonary vessels that branch out from the hila, and, in most volumes, one to
three lung tumours: lobulated, irregular solid lesions of 8 to 45 mm in a random lobe, some
touching the pleura. Vessel cross-sections have the tumours' attenuation, so a model has to
tell a round vessel from a small nodule by size and shape, as in real CT. The scanner adds a
point-spread blur and Gaussian noise; values are Hounsfield units stored as int16.

Layout written (the MSD convention)::

    <task_dir>/dataset.json              name, modality {"0": "CT"}, labels {"0": "background",
                                         "1": "cancer"}, numTraining, training [{image, label}]
    <task_dir>/imagesTr/lung_001.nii.gz  int16 HU [X, Y, Z]
    <task_dir>/labelsTr/lung_001.nii.gz  uint8 {0, 1}, same shape and affine

Axes: ``X`` runs from the patient's right to left, ``Y`` anterior to posterior, ``Z``
inferior to superior, so ``volume[:, :, k].T`` shows slice ``k`` in radiological view
(anterior up, patient's right on the image's left). The affine holds the voxel spacing in mm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from medseg.config import integer, number, sequence
from medseg.data.staging import staged_folder

GENERATOR_NAME = "medseg.data.synthetic.lung"
GENERATOR_VERSION = 1
FIELD_OF_VIEW_MM = 380.0
CHEST_HEIGHT_MM = 260.0
AIR_HU = -1000.0

HU = {
    "fat": -100.0, "muscle": 45.0, "lung": -860.0, "mediastinum": 35.0, "heart": 40.0,
    "aorta": 150.0, "cortical_bone": 750.0, "cancellous_bone": 260.0, "canal": 20.0,
    "airway_wall": 10.0, "vessel": 40.0,
}


@dataclass(frozen=True)
class LungGeneratorSettings:
    volume_size: tuple[int, int, int]
    tumor_free_fraction: float
    max_tumors: int
    noise_std: float
    seed: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm: the in-plane field of view and the chest height are fixed, so a
        smaller volume has coarser voxels rather than a smaller patient."""
        x, y, z = self.volume_size
        return FIELD_OF_VIEW_MM / x, FIELD_OF_VIEW_MM / y, CHEST_HEIGHT_MM / z


def generate_lung_task(
    task_dir: str | Path,
    *,
    num_volumes: int = 32,
    volume_size: tuple[int, int, int] = (256, 256, 64),
    tumor_free_fraction: float = 0.15,
    max_tumors: int = 3,
    noise_std: float = 20.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic Task006_Lung folder to ``task_dir`` and return it.

    ``tumor_free_fraction`` of the volumes have no tumour; the others have 1 to
    ``max_tumors``. Volume ``i`` depends only on ``(seed, i)``. The folder is written beside
    ``task_dir`` and renamed into place at the end; a non-empty ``task_dir`` is replaced only
    with ``overwrite=True``.
    """
    integer(minimum=1)("num_volumes", num_volumes)
    sequence(integer(minimum=16), length=3)("volume_size", volume_size)
    number(minimum=0, maximum=1)("tumor_free_fraction", tumor_free_fraction)
    integer(minimum=1)("max_tumors", max_tumors)
    number(minimum=0)("noise_std", noise_std)
    integer(minimum=0)("seed", seed)
    settings = LungGeneratorSettings(tuple(volume_size), float(tumor_free_fraction),
                                     max_tumors, float(noise_std), seed)
    with staged_folder(task_dir, overwrite=overwrite, what="MSD task") as staging:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        names = [f"lung_{index + 1:03d}" for index in range(num_volumes)]
        # Voxel X toward the patient's left, Y posterior, Z superior (LPS), as documented above;
        # nibabel's affine maps to RAS+ world coordinates, hence -X and -Y.
        affine = np.diag([-settings.spacing[0], -settings.spacing[1], settings.spacing[2], 1.0])
        for index, name in enumerate(names):
            volume, label = render_volume(np.random.default_rng([seed, index]), settings)
            nib.save(nib.Nifti1Image(volume, affine), staging / "imagesTr" / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), staging / "labelsTr" / f"{name}.nii.gz")
        (staging / "dataset.json").write_text(json.dumps(_dataset_json(names, settings),
                                                         indent=2) + "\n")
    return Path(task_dir)


def _dataset_json(names: list[str], settings: LungGeneratorSettings) -> dict:
    return {
        "name": "Lung",
        "description": f"Synthetic lung and cancer segmentation ({GENERATOR_NAME})",
        "reference": "generated; layout of the Medical Segmentation Decathlon Task06_Lung",
        "licence": "CC-BY-SA 4.0",
        "release": f"{GENERATOR_NAME} v{GENERATOR_VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "cancer"},
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
                     for name in names],
        "test": [],
        "generator": {"seed": settings.seed, "volume_size": list(settings.volume_size),
                      "spacing_mm": [round(s, 4) for s in settings.spacing],
                      "tumor_free_fraction": settings.tumor_free_fraction,
                      "max_tumors": settings.max_tumors, "noise_std": settings.noise_std,
                      "volume_seed": "numpy.random.default_rng([seed, volume_index])"},
    }


class _Chest:
    """Voxel coordinates in mm and the patient's body plan, drawn once per volume."""

    def __init__(self, rng: np.random.Generator, settings: LungGeneratorSettings) -> None:
        self.rng = rng
        self.shape = settings.volume_size
        sx, sy, sz = settings.spacing
        nx, ny, nz = self.shape
        self.spacing = np.array(settings.spacing)
        self.x = ((np.arange(nx) + 0.5) * sx - FIELD_OF_VIEW_MM / 2)[:, None, None]
        self.y = ((np.arange(ny) + 0.5) * sy - FIELD_OF_VIEW_MM / 2)[None, :, None]
        self.z = ((np.arange(nz) + 0.5) * sz)[None, None, :]
        self.centre = np.array([rng.normal(0, 6), rng.normal(8, 5)])
        self.half_width = rng.uniform(135, 165)
        self.half_depth = rng.uniform(95, 120)
        self.fat = rng.uniform(6, 20)
        self.base = rng.uniform(0.0, 0.12) * CHEST_HEIGHT_MM    # dome of the diaphragm
        self.apex = rng.uniform(0.84, 0.97) * CHEST_HEIGHT_MM
        self.carina = rng.uniform(0.55, 0.68) * CHEST_HEIGHT_MM

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        """Inside an axis-aligned ellipse (centre and semi-axes may vary along z)."""
        inside = ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0
        return np.broadcast_to(inside, self.shape)

    def lung_height(self) -> np.ndarray:
        """0 at the diaphragm, 1 at the apex, per slice [1, 1, Z]."""
        return np.clip((self.z - self.base) / (self.apex - self.base), -1, 2)


def render_volume(rng: np.random.Generator,
                  settings: LungGeneratorSettings) -> tuple[np.ndarray, np.ndarray]:
    """One patient: (int16 HU [X, Y, Z], uint8 tumour label [X, Y, Z])."""
    chest = _Chest(rng, settings)
    hu = np.full(chest.shape, AIR_HU, dtype=np.float32)
    body = _paint_trunk(hu, chest)
    lungs = _paint_lungs(hu, chest, body)
    _paint_mediastinum(hu, chest, lungs)
    _paint_bones(hu, chest)
    _paint_airways(hu, chest)
    _paint_vessels(hu, chest, lungs)
    label = _paint_tumours(hu, chest, lungs, body, settings)
    return _scan(hu, rng, settings.noise_std), label


def _paint_trunk(hu: np.ndarray, chest: _Chest) -> np.ndarray:
    cx, cy = chest.centre
    # Shoulders: the trunk widens a little towards the top of the chest.
    widening = 1 + 0.06 * np.clip(chest.z / CHEST_HEIGHT_MM, 0, 1)
    body = chest.ellipse(cx, cy, chest.half_width * widening, chest.half_depth)
    inner = chest.ellipse(cx, cy, chest.half_width * widening - chest.fat,
                          chest.half_depth - chest.fat * 0.8)
    hu[body] = HU["fat"]
    hu[inner] = HU["muscle"]
    return body


def _lung_scale(height: np.ndarray) -> np.ndarray:
    """Cross-section scale along the lung: widest a third of the way up, zero at the apex."""
    upper = np.sqrt(np.clip(1 - ((height - 0.3) / 0.72) ** 2, 0, 1))
    lower = np.sqrt(np.clip(1 - ((0.3 - height) / 0.38) ** 2, 0, 1))
    return np.where(height >= 0.3, upper, lower)


def _paint_lungs(hu: np.ndarray, chest: _Chest, body: np.ndarray) -> np.ndarray:
    rng = chest.rng
    cx, cy = chest.centre
    height = chest.lung_height()
    scale = _lung_scale(height) + 1e-6
    lungs = np.zeros(chest.shape, dtype=bool)
    for side in (-1, 1):
        lx = rng.uniform(0.36, 0.42) * chest.half_width
        ly = rng.uniform(0.74, 0.84) * chest.half_depth
        centre_x = cx + side * rng.uniform(0.43, 0.48) * chest.half_width
        lungs |= chest.ellipse(centre_x, cy + rng.normal(4, 3), lx * scale, ly * scale)
    # The diaphragm dome rises into the base of each lung, leaving a rim of lung around it.
    dome_scale = np.sqrt(np.clip(1 - height / 0.22, 0, 1)) + 1e-6
    dome = chest.ellipse(cx, cy - 5, 0.75 * chest.half_width * dome_scale,
                         0.6 * chest.half_depth * dome_scale)
    lungs &= ~dome
    inner_wall = chest.ellipse(cx, cy, chest.half_width - chest.fat - 10,
                               chest.half_depth - chest.fat - 8)
    lungs &= inner_wall & body
    texture = gaussian_filter(rng.normal(0, 1, chest.shape).astype(np.float32), 1.5) * 60
    # Dependent density: the posterior (lower, supine) lung is denser.
    gravity = 45 * (chest.y - cy) / chest.half_depth
    hu[lungs] = (HU["lung"] + texture + gravity)[lungs]
    return lungs


def _paint_mediastinum(hu: np.ndarray, chest: _Chest, lungs: np.ndarray) -> None:
    rng = chest.rng
    cx, cy = chest.centre
    height = chest.lung_height()
    width = rng.uniform(0.14, 0.2) * chest.half_width * (1 + 0.5 * np.clip(0.6 - height, 0, 1))
    mediastinum = chest.ellipse(cx + rng.normal(0, 3), cy - 0.1 * chest.half_depth, width,
                                0.72 * chest.half_depth)
    heart_scale = np.sqrt(np.clip(1 - ((height - 0.2) / 0.38) ** 2, 0, 1)) + 1e-6
    heart = chest.ellipse(cx + rng.uniform(5, 20), cy - 0.25 * chest.half_depth,
                          rng.uniform(0.32, 0.4) * chest.half_width * heart_scale,
                          rng.uniform(0.4, 0.5) * chest.half_depth * heart_scale)
    hu[mediastinum & ~heart] = HU["mediastinum"]
    hu[heart] = HU["heart"] + rng.normal(0, 4)
    lungs &= ~(mediastinum | heart)
    aorta = chest.ellipse(cx + 0.12 * chest.half_width, cy + 0.5 * chest.half_depth, 11, 11)
    hu[aorta & (height < 0.85)] = HU["aorta"]
    lungs &= ~(aorta & (height < 0.85))


def _paint_bones(hu: np.ndarray, chest: _Chest) -> None:
    rng = chest.rng
    cx, cy = chest.centre
    spine_y = cy + chest.half_depth - chest.fat - 38
    vertebra = chest.ellipse(cx, spine_y, 20, 17)
    hu[vertebra] = HU["cortical_bone"]
    hu[chest.ellipse(cx, spine_y, 16, 13)] = HU["cancellous_bone"]
    hu[chest.ellipse(cx, spine_y + 26, 22, 9)] = HU["cortical_bone"]  # posterior arch
    hu[chest.ellipse(cx, spine_y + 24, 7, 7)] = HU["canal"]
    hu[chest.ellipse(cx, cy - chest.half_depth + chest.fat + 10, 14, 6)] = HU["cortical_bone"]
    # Ribs: cross-sections in the chest wall whose angles drift from slice to slice.
    phase = rng.uniform(0, 2 * np.pi)
    for angle in np.linspace(0.25 * np.pi, 1.75 * np.pi, 9):
        theta = angle + 0.15 * np.sin(chest.z / 23.0 + phase)
        rib_x = cx + (chest.half_width - chest.fat - 6) * np.sin(theta)
        rib_y = cy + (chest.half_depth - chest.fat - 5) * np.cos(theta)
        hu[chest.ellipse(rib_x, rib_y, 6, 5)] = HU["cortical_bone"]


def _paint_airways(hu: np.ndarray, chest: _Chest) -> None:
    cx, cy = chest.centre
    trachea_y = cy - 0.05 * chest.half_depth
    above = chest.z >= chest.carina
    tube = chest.ellipse(cx, trachea_y, 10, 9) & above
    hu[tube] = HU["airway_wall"]
    hu[chest.ellipse(cx, trachea_y, 8, 7) & above] = AIR_HU
    # Main bronchi: leave the carina sideways and downwards for 45 mm.
    below = np.clip((chest.carina - chest.z) / 45.0, 0, 1)
    within = (chest.z < chest.carina) & (chest.z > chest.carina - 45)
    for side in (-1, 1):
        bx = cx + side * (8 + 45 * below)
        hu[chest.ellipse(bx, trachea_y + 4, 7, 6) & within] = HU["airway_wall"]
        hu[chest.ellipse(bx, trachea_y + 4, 5, 4) & within] = AIR_HU


def _paint_vessels(hu: np.ndarray, chest: _Chest, lungs: np.ndarray) -> None:
    """Tapering tubes from each hilum to the periphery, drawn inside the lungs only."""
    rng = chest.rng
    cx, cy = chest.centre
    hilum_z = 0.45 * (chest.apex - chest.base) + chest.base
    voxels = np.argwhere(lungs)
    if len(voxels) == 0:
        return
    for _ in range(int(rng.integers(24, 40))):
        side = rng.choice((-1, 1))
        start = np.array([cx + side * rng.uniform(25, 45), cy + rng.normal(0, 10),
                          hilum_z + rng.normal(0, 15)])
        end_voxel = voxels[rng.integers(len(voxels))]
        end = (end_voxel + 0.5) * chest.spacing - [FIELD_OF_VIEW_MM / 2, FIELD_OF_VIEW_MM / 2, 0]
        if np.sign(end[0] - cx) != side:
            end[0] = 2 * cx - end[0]
        radii = (rng.uniform(2.5, 4.5), rng.uniform(0.7, 1.3))
        _paint_tube(hu, chest, start, end, radii, lungs, HU["vessel"] + rng.normal(0, 8))


def _paint_tube(hu, chest, start, end, radii, inside, value) -> None:
    low = np.minimum(start, end) - radii[0]
    high = np.maximum(start, end) + radii[0]
    box = _box(chest, low, high)
    if box is None:
        return
    xs, ys, zs = box
    px, py, pz = chest.x[xs], chest.y[:, ys], chest.z[:, :, zs]
    direction = end - start
    length2 = float(direction @ direction) + 1e-9
    t = np.clip(((px - start[0]) * direction[0] + (py - start[1]) * direction[1]
                 + (pz - start[2]) * direction[2]) / length2, 0, 1)
    distance2 = ((px - start[0] - t * direction[0]) ** 2 + (py - start[1] - t * direction[1]) ** 2
                 + (pz - start[2] - t * direction[2]) ** 2)
    radius = radii[0] + (radii[1] - radii[0]) * t
    tube = (distance2 <= radius ** 2) & inside[xs, ys, zs]
    hu[xs, ys, zs][tube] = value


def _box(chest: _Chest, low: np.ndarray, high: np.ndarray):
    """Index slices of the voxels between ``low`` and ``high`` (mm), or None when empty."""
    origin = np.array([-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, 0.0])
    first = np.maximum(np.floor((low - origin) / chest.spacing).astype(int), 0)
    last = np.minimum(np.ceil((high - origin) / chest.spacing).astype(int) + 1, chest.shape)
    if np.any(last <= first):
        return None
    return tuple(slice(a, b) for a, b in zip(first, last))


def _paint_tumours(hu: np.ndarray, chest: _Chest, lungs: np.ndarray, body: np.ndarray,
                   settings: LungGeneratorSettings) -> np.ndarray:
    rng = chest.rng
    label = np.zeros(chest.shape, dtype=np.uint8)
    if rng.random() < settings.tumor_free_fraction:
        return label
    voxels = np.argwhere(lungs)
    if len(voxels) == 0:
        return label
    # At least 2.5 voxels across, so that every labelled tumour is visible at this resolution.
    smallest = max(8.0, 2.5 * float(chest.spacing.max()))
    for _ in range(int(rng.integers(1, settings.max_tumors + 1))):
        diameter = float(np.exp(rng.uniform(np.log(smallest), np.log(max(45.0, smallest * 1.5)))))
        for _attempt in range(20):
            centre_voxel = voxels[rng.integers(len(voxels))]
            tumour = _lobulated_blob(chest, centre_voxel, diameter)
            if tumour is None:
                continue
            box, shape = tumour
            # Mostly in the lung; a part may reach the pleura or the mediastinum.
            if (lungs[box] & shape).sum() >= 0.6 * shape.sum() and shape.any():
                _fill_tumour(hu, label, box, shape & body[box], rng, diameter)
                break
    return label


def _lobulated_blob(chest: _Chest, centre_voxel: np.ndarray, diameter: float):
    """A union of 1-4 overlapping ellipsoids with an irregular surface, in its bounding box."""
    rng = chest.rng
    centre = (centre_voxel + 0.5) * chest.spacing - [FIELD_OF_VIEW_MM / 2, FIELD_OF_VIEW_MM / 2, 0]
    radius = diameter / 2
    box = _box(chest, centre - 1.6 * radius, centre + 1.6 * radius)
    if box is None:
        return None
    xs, ys, zs = box
    px, py, pz = chest.x[xs], chest.y[:, ys], chest.z[:, :, zs]
    field = np.full((px.shape[0], py.shape[1], pz.shape[2]), np.inf, dtype=np.float32)
    for lobe in range(int(rng.integers(1, 5))):
        offset = rng.normal(0, 0.35 * radius, 3) if lobe else np.zeros(3)
        axes = radius * rng.uniform(0.6, 1.0, 3) * (1.0 if lobe == 0 else 0.75)
        distance = np.sqrt(((px - centre[0] - offset[0]) / axes[0]) ** 2
                           + ((py - centre[1] - offset[1]) / axes[1]) ** 2
                           + ((pz - centre[2] - offset[2]) / axes[2]) ** 2)
        field = np.minimum(field, distance)
    roughness = gaussian_filter(rng.normal(0, 1, field.shape).astype(np.float32), 1.0)
    shape = field + 0.15 * roughness / (roughness.std() + 1e-6) <= 1.0
    return box, shape


def _fill_tumour(hu, label, box, shape, rng, diameter) -> None:
    solid = rng.uniform(15, 60)
    inner = gaussian_filter(rng.normal(0, 1, shape.shape).astype(np.float32), 1.0) * 12
    values = solid + inner
    if diameter > 30 and rng.random() < 0.5:
        # Large tumours may have a darker necrotic centre.
        core = gaussian_filter(shape.astype(np.float32), 2.0) > 0.9
        values = np.where(core, solid - 30, values)
    hu[box][shape] = values[shape]
    label[box][shape] = 1


def _scan(hu: np.ndarray, rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Point-spread blur (a little wider across slices) and quantum noise, as int16 HU."""
    blurred = gaussian_filter(hu, sigma=(0.6, 0.6, 0.4))
    noise = rng.normal(0, noise_std, hu.shape).astype(np.float32) if noise_std else 0.0
    noisy = blurred + noise
    return np.clip(np.round(noisy), -1024, 3071).astype(np.int16)
