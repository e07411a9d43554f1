"""Synthetic abdominal CT-like volumes for the SADAAN pipeline, in its documented HDF5 layout.

Every case is an abdomen: an elliptical trunk (skin, subcutaneous fat, muscle wall), a spine
with discs and canal, unlabelled bowel loops, and the 13 BTCV organs placed where they sit in
a patient, each with its own position, size, orientation, smooth shape deformation and contrast.
Some cases have had surgery (splenectomy, nephrectomy, ...) and miss one or more organs; their
``scenarios`` entry names the operation and ``presence_labels`` mark the missing organs.

Axes of every volume: ``H`` runs anterior → posterior, ``W`` from the patient's right to left
(radiological convention: the patient's right is on the image's left), ``D`` superior →
inferior. Anatomy is described in body coordinates x (right → left) and y (anterior →
posterior) in [-1, 1] and z (superior → inferior) in [-Z_EXTENT, Z_EXTENT], so at the default
64 × 64 × 32 a voxel is about 1.5 times longer along D than in-plane, as in clinical CT.

Intensities are Hounsfield units seen through an abdominal window (``HU_WINDOW``) mapped to
0-255; air is 0. With ``in_channels > 1`` the channels are contrast phases (portal venous,
native, arterial, delayed) in which each organ enhances differently.

Layout written (the SADAAN seed's "HDF5 File Structure"), per split file::

    images            float32 [N, H, W, D]  ([N, C, H, W, D] when in_channels > 1)
    masks             uint8   [N, S, H, W, D]
    presence_labels   uint8   [N, S]        1 exactly when the structure's mask is non-empty
    scenarios         UTF-8 strings [N]      "normal", "splenectomy", ...

Each case is one chunk of ``images`` and one of ``masks``, so reading a sample is two reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from medseg.config import integer, number, sequence
from medseg.data.staging import refuse_to_overwrite, staged_directory

GENERATOR_NAME = "medseg.data.synthetic.sadaan"
GENERATOR_VERSION = 1

STRUCTURE_NAMES = (
    "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior_vena_cava", "portal_splenic_vein", "pancreas", "right_adrenal_gland",
    "left_adrenal_gland",
)
PHASES = ("portal_venous", "native", "arterial", "delayed")
HU_WINDOW = (-160.0, 240.0)
INTENSITY_RANGE = (0.0, 255.0)
Z_EXTENT = 0.75
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Measured at 64x64x32 (per case, warm page cache): images uncompressed 524 kB / 0.09 ms,
# LZF 202 kB / 0.9 ms, so images stay uncompressed. Masks uncompressed 1.7 MB / 0.24 ms,
# LZF 25 kB / 3.2 ms, gzip level 1 11 kB / 0.9 ms: gzip-1 decodes 3x faster than LZF, makes the
# dataset 4x smaller than no compression, reads faster from a cold cache, and is a filter every
# HDF5 reader has (LZF needs h5py).
IMAGE_STORAGE: dict = {}
MASK_STORAGE: dict = {"compression": "gzip", "compression_opts": 1}

# Surgeries and the structures each removes; weights make cholecystectomy the most common.
SCENARIOS = {
    "cholecystectomy": (("gallbladder",), 4.0),
    "splenectomy": (("spleen",), 2.0),
    "left_nephrectomy": (("left_kidney",), 2.0),
    "right_nephrectomy": (("right_kidney",), 2.0),
    "left_radical_nephrectomy": (("left_kidney", "left_adrenal_gland"), 1.0),
    "right_adrenalectomy": (("right_adrenal_gland",), 1.0),
    "left_adrenalectomy": (("left_adrenal_gland",), 1.0),
    "total_gastrectomy": (("stomach",), 1.0),
    "total_pancreatectomy": (("pancreas", "spleen", "gallbladder"), 1.0),
}

# ``absent_probability`` of the high-absence scenario: most cases miss a structure, as in the
# other public SADAAN generator (69 % of its cases miss one). With all 13 structures the
# removable organs are then present in 77 % (gallbladder) to 95 % (stomach, pancreas, right
# adrenal) of the cases; liver, aorta, vena cava, portal vein and oesophagus always.
HIGH_ABSENCE_PROBABILITY = 0.7

# Tissue attenuation in HU per phase, columns in PHASES order.
BACKGROUND_HU = {
    "air": (-1000, -1000, -1000, -1000),
    "skin": (40, 30, 35, 35),
    "subcutaneous_fat": (-100, -100, -100, -100),
    "wall_muscle": (60, 50, 55, 58),
    "visceral_fat": (-70, -75, -72, -72),
    "deep_muscle": (60, 50, 55, 58),
    "bone": (500, 500, 500, 500),
    "disc": (85, 80, 82, 85),
    "spinal_canal": (15, 15, 15, 15),
    "bowel": (80, 35, 70, 65),
    "bowel_gas": (-900, -900, -900, -900),
}
# Each structure's own tissue and, where it has one, its inner tissue (renal medulla, gastric
# content) that is labelled as the same structure.
STRUCTURE_HU = {
    "spleen": ((120, 50, 130, 80), None),
    "right_kidney": ((170, 35, 190, 130), (110, 30, 60, 150)),
    "left_kidney": ((170, 35, 190, 130), (110, 30, 60, 150)),
    "gallbladder": ((10, 10, 10, 10), None),
    "esophagus": ((80, 40, 70, 65), None),
    "liver": ((110, 58, 75, 85), None),
    "stomach": ((95, 40, 100, 75), (5, 5, 5, 5)),
    "aorta": ((165, 42, 300, 110), None),
    "inferior_vena_cava": ((135, 40, 70, 110), None),
    "portal_splenic_vein": ((170, 42, 90, 115), None),
    "pancreas": ((95, 42, 120, 75), None),
    "right_adrenal_gland": ((65, 30, 75, 55), None),
    "left_adrenal_gland": ((65, 30, 75, 55), None),
}

BACKGROUND = {name: code for code, name in enumerate(BACKGROUND_HU)}
NUM_TISSUE_CODES = len(BACKGROUND_HU) + 2 * len(STRUCTURE_NAMES)


def structure_code(index: int) -> int:
    return len(BACKGROUND_HU) + 2 * index


def structure_core_code(index: int) -> int:
    return structure_code(index) + 1


def _structure_of_code() -> np.ndarray:
    """Structure index of each tissue code; -1 for tissue that is no structure."""
    lookup = np.full(NUM_TISSUE_CODES, -1, dtype=np.int8)
    for index in range(len(STRUCTURE_NAMES)):
        lookup[[structure_code(index), structure_core_code(index)]] = index
    return lookup


STRUCTURE_OF_CODE = _structure_of_code()


def _codes_lookup(names: tuple[str, ...]) -> np.ndarray:
    lookup = np.zeros(NUM_TISSUE_CODES, dtype=bool)
    lookup[[BACKGROUND[name] for name in names]] = True
    return lookup


# Tissue that a painted shape may not replace: organs stay inside the abdominal wall and
# out of bone, which is what pushes them into plausible shapes where jitter makes them collide.
OUTSIDE_TRUNK = _codes_lookup(("air", "skin"))
OUTSIDE_FAT = _codes_lookup(("air", "skin", "subcutaneous_fat"))
OUTSIDE_CAVITY = _codes_lookup(("air", "skin", "subcutaneous_fat", "wall_muscle", "bone",
                                "disc", "spinal_canal"))


@dataclass(frozen=True)
class BlobSpec:
    """A deformed ellipsoid at its mean anatomical place (body coordinates, degrees)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)
    core: float = 0.0  # radius of the inner tissue as a fraction of the outer radius


@dataclass(frozen=True)
class TubeSpec:
    """A tube around a polyline, its radius interpolated between control points."""

    points: tuple[tuple[float, float, float], ...]
    radii: tuple[float, ...]


ANATOMY: dict[str, tuple[BlobSpec | TubeSpec, ...]] = {
    "liver": (BlobSpec((-0.38, -0.02, -0.33), (0.36, 0.40, 0.40), (0, 0, -10)),
              BlobSpec((0.06, -0.28, -0.47), (0.28, 0.15, 0.20), (0, 10, 15))),
    "spleen": (BlobSpec((0.52, 0.24, -0.36), (0.12, 0.21, 0.22), (0, 0, -35)),),
    "stomach": (BlobSpec((0.30, -0.22, -0.40), (0.22, 0.16, 0.26), (10, 0, 30), core=0.7),),
    "right_kidney": (BlobSpec((-0.37, 0.30, 0.22), (0.12, 0.14, 0.29), (-12, 12, -10), core=0.55),),
    "left_kidney": (BlobSpec((0.37, 0.30, 0.12), (0.12, 0.14, 0.29), (-12, -12, 10), core=0.55),),
    "pancreas": (TubeSpec(((-0.12, -0.03, 0.06), (0.02, -0.05, -0.02), (0.22, 0.01, -0.08),
                           (0.44, 0.09, -0.22)), (0.09, 0.075, 0.07, 0.055)),),
    "gallbladder": (BlobSpec((-0.30, -0.30, -0.02), (0.10, 0.09, 0.17), (20, 0, 20)),),
    "right_adrenal_gland": (BlobSpec((-0.21, 0.22, -0.20), (0.065, 0.11, 0.15), (0, 0, 30)),),
    "left_adrenal_gland": (BlobSpec((0.21, 0.23, -0.14), (0.065, 0.11, 0.15), (0, 0, -30)),),
    "esophagus": (TubeSpec(((0.02, -0.02, -0.95), (0.10, -0.08, -0.58), (0.20, -0.14, -0.44)),
                           (0.065, 0.065, 0.07)),),
    "portal_splenic_vein": (TubeSpec(((-0.22, -0.05, -0.25), (-0.02, 0.03, -0.06),
                                      (0.28, 0.12, -0.12), (0.48, 0.15, -0.28)),
                                     (0.055, 0.05, 0.045, 0.045)),),
    "inferior_vena_cava": (TubeSpec(((-0.10, 0.04, -0.80), (-0.12, 0.07, 0.0), (-0.09, 0.10, 0.80)),
                                    (0.07, 0.075, 0.07)),),
    "aorta": (TubeSpec(((0.06, 0.10, -0.80), (0.05, 0.11, 0.0), (0.03, 0.09, 0.80)),
                       (0.07, 0.068, 0.062)),),
}
# Later structures are drawn over earlier ones: the gallbladder sits in the liver's surface,
# the intrahepatic vena cava runs through the liver, the splenic vein along the pancreas.
PAINT_ORDER = ("liver", "spleen", "stomach", "right_kidney", "left_kidney", "pancreas",
               "gallbladder", "right_adrenal_gland", "left_adrenal_gland", "esophagus",
               "portal_splenic_vein", "inferior_vena_cava", "aorta")


def generate_sadaan_dataset(
    output_dir: str | Path,
    *,
    num_train: int = 160,
    num_val: int = 32,
    num_test: int = 32,
    image_size: tuple[int, int, int] = (64, 64, 32),
    num_structures: int = 13,
    in_channels: int = 1,
    absent_probability: float = 0.15,
    noise_std: float = 8.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``metadata.json`` and ``train.h5``, ``val.h5``, ``test.h5`` (when ``num_test``)
    into ``output_dir`` and return it.

    The first ``num_structures`` of :data:`STRUCTURE_NAMES` are labelled; the other organs are
    still drawn, unlabelled. Case ``i`` of a split depends only on ``(seed, split, i)``.
    Files are written into a hidden sibling folder that is renamed into place at the end, so
    an interrupted run leaves no half-written dataset; a non-empty ``output_dir`` is replaced
    only with ``overwrite=True``.
    """
    integer(minimum=1)("num_train", num_train)
    integer(minimum=1)("num_val", num_val)
    integer(minimum=0)("num_test", num_test)
    sequence(integer(minimum=4), length=3)("image_size", image_size)
    integer(minimum=1, maximum=len(STRUCTURE_NAMES))("num_structures", num_structures)
    integer(minimum=1, maximum=len(PHASES))("in_channels", in_channels)
    number(minimum=0, maximum=1)("absent_probability", absent_probability)
    number(minimum=0)("noise_std", noise_std)
    integer(minimum=0)("seed", seed)

    output_dir = Path(output_dir)
    refuse_to_overwrite(output_dir, overwrite, "SADAAN dataset")
    settings = GeneratorSettings(tuple(image_size), num_structures, in_channels,
                                 float(absent_probability), float(noise_std), seed)
    splits = {"train": num_train, "val": num_val, "test": num_test}
    splits = {split: count for split, count in splits.items() if count > 0}

    with staged_directory(output_dir) as staging:
        for split, count in splits.items():
            _write_split(staging / f"{split}.h5", split, count, settings)
        metadata = _metadata(settings, splits)
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return output_dir


@dataclass(frozen=True)
class GeneratorSettings:
    """What every case of a dataset shares (the arguments of the generator, checked)."""

    image_size: tuple[int, int, int]
    num_structures: int
    in_channels: int
    absent_probability: float
    noise_std: float
    seed: int

    @property
    def structure_names(self) -> tuple[str, ...]:
        return STRUCTURE_NAMES[:self.num_structures]


def _metadata(settings: GeneratorSettings, splits: dict[str, int]) -> dict:
    names = settings.structure_names
    return {
        "structure_names": list(names),
        "image_size": list(settings.image_size),
        "num_structures": settings.num_structures,
        "dataset_info": ("Synthetic abdominal CT-like volumes with the BTCV organs "
                         f"({GENERATOR_NAME}); axes H anterior->posterior, W patient "
                         "right->left, D superior->inferior; intensities are the HU window "
                         f"{list(HU_WINDOW)} mapped to 0-255"),
        "splits": splits,
        "in_channels": settings.in_channels,
        "channel_names": list(PHASES[:settings.in_channels]),
        "intensity_range": list(INTENSITY_RANGE),
        "spacing": None,
        "scenarios": {"normal": []} | {
            name: [s for s in removed if s in names]
            for name, removed in _available_scenarios(names)},
        "generator": {
            "name": GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "seed": settings.seed,
            "absent_probability": settings.absent_probability,
            "noise_std": settings.noise_std,
            "hu_window": list(HU_WINDOW),
            "case_seed": "numpy.random.default_rng([seed, split_code, case_index])",
            "split_codes": SPLIT_CODES,
        },
    }


def _available_scenarios(names: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """The surgeries that remove at least one labelled structure."""
    return [(name, removed) for name, (removed, _) in SCENARIOS.items()
            if any(structure in names for structure in removed)]


def _write_split(path: Path, split: str, count: int, settings: GeneratorSettings) -> None:
    size = settings.image_size
    image_shape = size if settings.in_channels == 1 else (settings.in_channels, *size)
    mask_shape = (settings.num_structures, *size)
    with h5py.File(path, "w") as file:
        images = file.create_dataset("images", shape=(count, *image_shape), dtype="float32",
                                     chunks=(1, *image_shape), **IMAGE_STORAGE)
        masks = file.create_dataset("masks", shape=(count, *mask_shape), dtype="uint8",
                                    chunks=(1, *mask_shape), **MASK_STORAGE)
        presence = file.create_dataset("presence_labels", shape=(count, settings.num_structures),
                                       dtype="uint8")
        scenarios = file.create_dataset("scenarios", shape=(count,),
                                        dtype=h5py.string_dtype("utf-8"))
        for index in range(count):
            rng = np.random.default_rng([settings.seed, SPLIT_CODES[split], index])
            case = render_case(rng, settings)
            images[index] = case.image if settings.in_channels > 1 else case.image[0]
            masks[index] = case.masks
            presence[index] = case.presence
            scenarios[index] = case.scenario


@dataclass(frozen=True)
class Case:
    """One rendered patient, before it is written."""

    image: np.ndarray     # float32 [C, H, W, D], 0-255
    masks: np.ndarray     # uint8 [S, H, W, D]
    presence: np.ndarray  # uint8 [S]
    scenario: str


def render_case(rng: np.random.Generator, settings: GeneratorSettings) -> Case:
    """Draw one patient: anatomy, surgery, contrast and scanner."""
    scenario, absent = _draw_scenario(rng, settings)
    frame = _BodyFrame.draw(rng)
    canvas = _Canvas(settings.image_size)
    _paint_trunk(canvas, frame, rng)
    _paint_spine_and_back_muscles(canvas, frame, rng)
    _paint_bowel(canvas, frame, rng)
    centres = {name: _paint_structure(canvas, name, frame, rng)
               for name in PAINT_ORDER if name not in absent}
    _keep_visible(canvas, centres)

    labels = STRUCTURE_OF_CODE[canvas.tissue]
    structures = np.arange(settings.num_structures, dtype=np.int8)
    masks = (labels[None] == structures[:, None, None, None]).astype(np.uint8)
    presence = masks.reshape(settings.num_structures, -1).max(axis=1)
    image = _scan(canvas, rng, settings)
    return Case(image=image, masks=masks, presence=presence, scenario=scenario)


def _draw_scenario(rng: np.random.Generator,
                   settings: GeneratorSettings) -> tuple[str, tuple[str, ...]]:
    available = _available_scenarios(settings.structure_names)
    if rng.random() >= settings.absent_probability:
        return "normal", ()
    weights = np.array([SCENARIOS[name][1] for name, _ in available])
    return available[rng.choice(len(available), p=weights / weights.sum())]


@dataclass(frozen=True)
class _BodyFrame:
    """Where this patient's body lies in the scanner: habitus, roll and table position."""

    scale: np.ndarray   # (x, y, z) body width, depth and craniocaudal stretch
    roll: np.ndarray    # 3 × 3 rotation about the craniocaudal axis
    shift: np.ndarray   # (x, y, z)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _BodyFrame:
        scale = np.array([rng.uniform(0.88, 1.08), rng.uniform(0.86, 1.1), rng.uniform(0.92, 1.08)])
        roll = Rotation.from_euler("z", rng.uniform(-6, 6), degrees=True).as_matrix()
        shift = np.array([rng.normal(0, 0.03), rng.normal(0, 0.03), rng.normal(0, 0.06)])
        return cls(scale=scale, roll=roll, shift=shift)

    def place(self, points: np.ndarray) -> np.ndarray:
        """Body coordinates of the standard anatomy → this patient's position in the scanner."""
        return (np.asarray(points) * self.scale) @ self.roll.T + self.shift


class Blob:
    """A rotated ellipsoid whose surface is pushed in and out by a few smooth waves."""

    def __init__(self, centre, radii, rotation, waves: np.ndarray) -> None:
        self.centre = np.asarray(centre, dtype=np.float32)
        self.radii = np.asarray(radii, dtype=np.float32)
        self.rotation = np.asarray(rotation, dtype=np.float32)
        # One row per wave: wave vector (3 terms), phase, amplitude.
        self.waves = np.asarray(waves, dtype=np.float32)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.radii.max() * np.sqrt(1.0 + np.abs(self.waves[:, 4]).sum())
        return self.centre - reach, self.centre + reach

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Squared normalised distance from the centre: below 1 inside."""
        offsets = (x - self.centre[0], y - self.centre[1], z - self.centre[2])
        local = [sum(self.rotation[row, col] * offsets[col] for col in range(3)) / self.radii[row]
                 for row in range(3)]
        level = local[0] ** 2 + local[1] ** 2 + local[2] ** 2
        for wx, wy, wz, phase, amplitude in self.waves:
            level += amplitude * np.sin(wx * local[0] + wy * local[1] + wz * local[2] + phase)
        return level


class Tube:
    """The set of points closer to a polyline than its (linearly varying) radius."""

    def __init__(self, points, radii) -> None:
        self.points = np.asarray(points, dtype=np.float32)
        self.radii = np.asarray(radii, dtype=np.float32)
        self.centre = self.points[len(self.points) // 2]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.radii[:, None]
        return (self.points - reach).min(axis=0), (self.points + reach).max(axis=0)

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Squared distance to the centre line over the squared local radius: below 1 inside."""
        nearest = None
        for start, end, start_radius, end_radius in zip(self.points[:-1], self.points[1:],
                                                        self.radii[:-1], self.radii[1:]):
            axis = end - start
            offsets = (x - start[0], y - start[1], z - start[2])
            along = (offsets[0] * axis[0] + offsets[1] * axis[1] + offsets[2] * axis[2])
            along = np.clip(along / float(axis @ axis), 0.0, 1.0)
            distance2 = sum((offsets[i] - along * axis[i]) ** 2 for i in range(3))
            radius = start_radius + along * (end_radius - start_radius)
            level = distance2 / radius ** 2
            nearest = level if nearest is None else np.minimum(nearest, level)
        return nearest


class _Canvas:
    """A tissue-code volume that shapes are painted into, each within its bounding box."""

    def __init__(self, image_size: tuple[int, int, int]) -> None:
        height, width, depth = image_size
        self.y = _voxel_centres(height, 1.0)[:, None, None]
        self.x = _voxel_centres(width, 1.0)[None, :, None]
        self.z = _voxel_centres(depth, Z_EXTENT)[None, None, :]
        self.tissue = np.full(image_size, BACKGROUND["air"], dtype=np.uint8)

    def region(self, shape: Blob | Tube) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """The voxel box around ``shape`` and the shape's level inside it (None: off-image)."""
        low, high = shape.bounds()
        box = (_index_span(self.y.ravel(), low[1], high[1]),
               _index_span(self.x.ravel(), low[0], high[0]),
               _index_span(self.z.ravel(), low[2], high[2]))
        if any(span.start >= span.stop for span in box):
            return None
        return box, shape.level(self.x[:, box[1]], self.y[box[0]], self.z[:, :, box[2]])

    def paint(self, shape: Blob | Tube, code: int, keep: np.ndarray,
              core_code: int = 0, core: float = 0.0) -> None:
        """Give ``code`` to the voxels inside ``shape`` whose tissue ``keep`` does not protect,
        and ``core_code`` to those within ``core`` of its normalised radius."""
        found = self.region(shape)
        if found is None:
            return
        box, level = found
        tissue = self.tissue[box]
        inside = (level < 1.0) & ~keep[tissue]
        tissue[inside] = code
        if core > 0:
            tissue[inside & (level < core ** 2)] = core_code

    def nearest_voxel(self, point: np.ndarray) -> tuple[int, int, int]:
        return (int(np.abs(self.y.ravel() - point[1]).argmin()),
                int(np.abs(self.x.ravel() - point[0]).argmin()),
                int(np.abs(self.z.ravel() - point[2]).argmin()))


def _voxel_centres(count: int, extent: float) -> np.ndarray:
    return ((np.arange(count, dtype=np.float32) + 0.5) / count * 2.0 - 1.0) * extent


def _index_span(centres: np.ndarray, low: float, high: float) -> slice:
    return slice(int(np.searchsorted(centres, low, "left")),
                 int(np.searchsorted(centres, high, "right")))


def _random_waves(rng: np.random.Generator, count: int = 3, strength: float = 0.1) -> np.ndarray:
    """Low-frequency surface waves: unit directions × 1.5-3 cycles per radius, random phase."""
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequencies = rng.uniform(1.5, 3.0, size=(count, 1))
    phases = rng.uniform(0, 2 * np.pi, size=(count, 1))
    amplitudes = rng.uniform(0.4, 1.0, size=(count, 1)) * strength
    return np.hstack([directions * frequencies, phases, amplitudes])


def _tube_along_z(frame: _BodyFrame, x: float, y: float, radius_top: float,
                  radius_bottom: float) -> Tube:
    ends = frame.place(np.array([[x, y, -1.2 * Z_EXTENT], [x, y, 1.2 * Z_EXTENT]]))
    return Tube(ends, [radius_top, radius_bottom])


def _paint_trunk(canvas: _Canvas, frame: _BodyFrame, rng: np.random.Generator) -> None:
    """Skin, subcutaneous fat, muscle wall and the fat-filled cavity, as nested ellipses."""
    centre = frame.shift
    cos, sin = float(frame.roll[0, 0]), float(frame.roll[1, 0])
    across = (canvas.x - centre[0]) * cos + (canvas.y - centre[1]) * sin
    front_back = -(canvas.x - centre[0]) * sin + (canvas.y - centre[1]) * cos
    taper = 1.0 + 0.05 * (canvas.z - centre[2])  # the trunk widens towards the pelvis
    semi_x, semi_y = 0.86 * frame.scale[0] * taper, 0.64 * frame.scale[1] * taper
    radius = np.sqrt((across / semi_x) ** 2 + (front_back / semi_y) ** 2)

    skin, fat, muscle = 0.025, rng.uniform(0.05, 0.14), rng.uniform(0.04, 0.07)
    tissue = canvas.tissue
    tissue[radius < 1.0] = BACKGROUND["skin"]
    tissue[radius < 1.0 - skin] = BACKGROUND["subcutaneous_fat"]
    tissue[radius < 1.0 - skin - fat] = BACKGROUND["wall_muscle"]
    tissue[radius < 1.0 - skin - fat - muscle] = BACKGROUND["visceral_fat"]


def _paint_spine_and_back_muscles(canvas: _Canvas, frame: _BodyFrame,
                                  rng: np.random.Generator) -> None:
    """Paraspinal and psoas muscles, then a vertebral column with discs, arch and canal."""
    vertebra_y, vertebra_radius = 0.30, 0.11 * rng.uniform(0.9, 1.1)
    canal_y = vertebra_y + vertebra_radius + 0.06
    for side in (-1, 1):
        canvas.paint(_tube_along_z(frame, side * 0.17, canal_y + 0.05, 0.11, 0.12),
                     BACKGROUND["deep_muscle"], OUTSIDE_FAT)
        canvas.paint(_tube_along_z(frame, side * 0.15, vertebra_y, 0.02, 0.12),
                     BACKGROUND["deep_muscle"], OUTSIDE_FAT)

    vertebral_body = _tube_along_z(frame, 0.0, vertebra_y, vertebra_radius, vertebra_radius)
    canvas.paint(vertebral_body, BACKGROUND["bone"], OUTSIDE_TRUNK)
    box, level = canvas.region(vertebral_body)
    # Discs: thin bands between vertebrae, one every ~0.3 body units along z.
    period = 0.3 * frame.scale[2]
    disc_band = (canvas.z.ravel()[box[2]] - rng.uniform(0, period)) % period < 0.06
    canvas.tissue[box][(level < 1.0) & disc_band] = BACKGROUND["disc"]
    canvas.paint(_tube_along_z(frame, 0.0, canal_y, 0.09, 0.09), BACKGROUND["bone"], OUTSIDE_TRUNK)
    canvas.paint(_tube_along_z(frame, 0.0, canal_y, 0.045, 0.045), BACKGROUND["spinal_canal"],
                 OUTSIDE_TRUNK)


def _paint_bowel(canvas: _Canvas, frame: _BodyFrame, rng: np.random.Generator) -> None:
    """Unlabelled bowel loops, some with gas, that look like soft-tissue organs."""
    for _ in range(rng.integers(4, 9)):
        centre = frame.place([rng.uniform(-0.45, 0.5), rng.uniform(-0.45, 0.05),
                              rng.uniform(-0.1, 0.7)])
        rotation = Rotation.from_euler("xyz", rng.uniform(-90, 90, 3), degrees=True).as_matrix()
        loop = Blob(centre, rng.uniform(0.06, 0.13, 3), rotation, _random_waves(rng))
        gas = rng.uniform(0.3, 0.6) if rng.random() < 0.4 else 0.0
        canvas.paint(loop, BACKGROUND["bowel"], OUTSIDE_CAVITY, BACKGROUND["bowel_gas"], gas)


def _paint_structure(canvas: _Canvas, name: str, frame: _BodyFrame,
                     rng: np.random.Generator) -> np.ndarray:
    """Draw one organ with this patient's variation; return the centre of its main part."""
    index = STRUCTURE_NAMES.index(name)
    code, core_code = structure_code(index), structure_core_code(index)
    organ_shift = rng.normal(0, [0.03, 0.03, 0.05])
    organ_size = rng.uniform(0.85, 1.15)
    shapes = []
    for spec in ANATOMY[name]:
        if isinstance(spec, BlobSpec):
            shape = _draw_blob(spec, frame, organ_shift, organ_size, rng)
            canvas.paint(shape, code, OUTSIDE_CAVITY, core_code, spec.core)
        else:
            shape = _draw_tube(spec, frame, organ_shift, organ_size, rng)
            canvas.paint(shape, code, OUTSIDE_CAVITY)
        shapes.append(shape)
    return shapes[0].centre


def _keep_visible(canvas: _Canvas, centres: dict[str, np.ndarray]) -> None:
    """Give every drawn organ that neighbours or the grid hid completely its centre voxel,
    so that an absent structure always means a surgery, never a coarse grid."""
    counts = np.bincount(canvas.tissue.ravel(), minlength=NUM_TISSUE_CODES)
    for name, centre in centres.items():
        index = STRUCTURE_NAMES.index(name)
        if counts[structure_code(index)] + counts[structure_core_code(index)] == 0:
            canvas.tissue[canvas.nearest_voxel(centre)] = structure_code(index)


def _draw_blob(spec: BlobSpec, frame: _BodyFrame, organ_shift: np.ndarray, organ_size: float,
               rng: np.random.Generator) -> Blob:
    centre = frame.place(spec.centre) + organ_shift
    radii = np.asarray(spec.radii) * organ_size * rng.uniform(0.9, 1.1, 3)
    angles = np.asarray(spec.angles) + rng.normal(0, 8, 3)
    # Local axes turn with the organ and with the patient's roll.
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ frame.roll.T
    return Blob(centre, radii, rotation, _random_waves(rng))


def _draw_tube(spec: TubeSpec, frame: _BodyFrame, organ_shift: np.ndarray, organ_size: float,
               rng: np.random.Generator) -> Tube:
    points = frame.place(spec.points) + organ_shift
    points += rng.normal(0, 0.02, points.shape)  # bends the course between control points
    radii = np.asarray(spec.radii) * organ_size * rng.uniform(0.9, 1.1, len(spec.radii))
    return Tube(points, radii)


def _tissue_hu_table() -> np.ndarray:
    """[tissue code, phase] attenuation in HU."""
    table = np.zeros((NUM_TISSUE_CODES, len(PHASES)), dtype=np.float32)
    for name, values in BACKGROUND_HU.items():
        table[BACKGROUND[name]] = values
    for index, name in enumerate(STRUCTURE_NAMES):
        own, core = STRUCTURE_HU[name]
        table[structure_code(index)] = own
        table[structure_core_code(index)] = own if core is None else core
    return table


TISSUE_HU = _tissue_hu_table()


def _scan(canvas: _Canvas, rng: np.random.Generator, settings: GeneratorSettings) -> np.ndarray:
    """Attenuation of each tissue for this patient → partial volume, texture, bias field,
    scanner calibration, windowing to 0-255 and noise. Returns float32 [C, H, W, D]."""
    channels = settings.in_channels
    native = TISSUE_HU[:, PHASES.index("native")][:, None]
    enhancement = rng.uniform(0.8, 1.2)  # contrast timing and cardiac output
    hu = native + enhancement * (TISSUE_HU[:, :channels] - native)
    # Each tissue's attenuation differs a little between patients, the same in every phase.
    hu = hu + rng.normal(0, 8, (NUM_TISSUE_CODES, 1)).astype(np.float32)
    volume = hu.T[:, canvas.tissue]
    # Partial volume at tissue borders (voxels are longer along D, so less blur there), then
    # a little heterogeneity within each tissue.
    volume = gaussian_filter(volume, sigma=(0, 0.6, 0.6, 0.4), truncate=3.0)
    volume += _smooth_field(canvas, rng, amplitude=6.0, frequencies=(3.0, 6.0))
    # Per channel: a smooth multiplicative bias field and the scanner's calibration.
    for channel in range(channels):
        bias = 1.0 + _smooth_field(canvas, rng, amplitude=0.05, frequencies=(0.5, 1.5))
        scale, offset = rng.uniform(0.93, 1.07), rng.normal(0, 8)
        volume[channel] = volume[channel] * bias * scale + offset

    low, high = HU_WINDOW
    image = (volume - low) * (INTENSITY_RANGE[1] / (high - low))
    image += rng.standard_normal(image.shape, dtype=np.float32) * settings.noise_std
    return np.clip(image, *INTENSITY_RANGE).astype(np.float32, copy=False)


def _smooth_field(canvas: _Canvas, rng: np.random.Generator, amplitude: float,
                  frequencies: tuple[float, float], components: int = 3) -> np.ndarray:
    """A sum of plane waves over the volume, peak magnitude at most ``amplitude``."""
    field = np.zeros(canvas.tissue.shape, dtype=np.float32)
    for _ in range(components):
        direction = rng.normal(size=3)
        wave = direction / np.linalg.norm(direction) * rng.uniform(*frequencies)
        wave = wave.astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(wave[0] * canvas.x + wave[1] * canvas.y + wave[2] * canvas.z + phase)
    return field * np.float32(amplitude / components)
