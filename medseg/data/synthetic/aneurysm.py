"""Synthetic head CT angiography volumes with saccular intracranial aneurysms.

Writes what the `prepare` command reads: one NIfTI per series and a CSV of aneurysm centres::

    volumes_dir/
        <series_id>.nii.gz       int16 Hounsfield units; affine in mm (RAS world)
        aneurysm_centres.csv     series_id, world_x, world_y, world_z, radius_mm, location

Series ids look like DICOM series UIDs (digits and dots). A series lists no row when it has
no aneurysm, as in the RSNA localiser table.

Each volume is an axial slab around the circle of Willis. Anatomy is laid out in mm with the
circle of Willis at the origin (RAS: x towards the patient's right, y anterior, z superior)
and then posed: every series draws its own head size, rotation and
position, vessel course (control points jittered), vessel calibre and contrast level.

- Head: scalp, skull (with dense skull base and petrous bones), brain with grey/white
  texture, ventricles.
- Arteries with contrast (250-480 HU): internal carotids, basilar, the circle of Willis
  (A1, anterior and posterior communicating, P1), middle, anterior and posterior cerebral
  arteries with their branches, and 8-18 small tortuous branches.
- Venous sinuses (transverse, sigmoid, straight), a little less dense than the arteries.
- Aneurysms in ``aneurysm_fraction`` of the series (1 to 3 each): ellipsoidal sacs of
  1.5-7 mm radius, some with a daughter bleb, on the necks of the typical sites (anterior
  communicating, MCA bifurcation, ICA terminus / PComm origin, basilar tip, pericallosal).
- Hard negatives any detector must learn to reject: vessel bends, crossings and
  bifurcations, bright wall calcifications in 40 % of the series, bone next to the carotids.
- Scanner: blur of the point-spread function, correlated noise of ``noise_std`` HU
  (x 0.7-1.3 per series).

Half the series are stored in LPS orientation (x and y axes flipped, the affine says so), as
DICOM-converted volumes often are, so `prepare` must reorient them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter, zoom
from scipy.spatial.transform import Rotation

from medseg.config import integer, number, sequence
from medseg.data.prepare_cubes import CENTRES_FILE
from medseg.data.staging import refuse_to_overwrite, staged_directory

GENERATOR_NAME = "medseg.data.synthetic.aneurysm"
CSV_COLUMNS = ("series_id", "world_x", "world_y", "world_z", "radius_mm", "location")
UID_ROOT = "1.2.826.0.1.3680043.8.498"

HU = {"air": -1000.0, "scalp": 40.0, "csf": 5.0, "brain": 32.0}
LPS = np.array([[0, -1], [1, -1], [2, 1]])

# Arteries: control points (x, y, z) in mm around the circle of Willis (x > 0 is the
# patient's right); a leading "±" pair is drawn once per side with x mirrored.
_SIDED_ARTERIES = {
    "ICA": (((20, 8, -34), (18, 11, -20), (15, 2, -9), (13, 4, 0)), 2.2),
    "A1": (((13, 4, 0), (8, 12, 1), (3, 16, 2)), 1.0),
    "A2": (((3, 16, 2), (3, 28, 12), (4, 40, 28), (4, 52, 40)), 1.0),
    "M1": (((13, 4, 0), (24, 5, 1), (36, 7, 3)), 1.5),
    "M2_superior": (((36, 7, 3), (46, 12, 14), (56, 10, 28), (62, 4, 40)), 1.1),
    "M2_inferior": (((36, 7, 3), (50, 2, -1), (60, -10, -4), (64, -24, -2)), 1.0),
    "PComm": (((13, 4, 0), (12, -4, 0), (9, -11, 0)), 0.6),
    "P1": (((0, -14, 0), (5, -13, 1), (9, -11, 0)), 1.1),
    "P2": (((9, -11, 0), (20, -24, 3), (28, -40, 6), (32, -60, 12)), 1.0),
}
_MIDLINE_ARTERIES = {
    "basilar": (((0, -24, -34), (0, -20, -16), (0, -14, 0)), 1.7),
    "AComm": (((-3, 16, 2), (0, 17, 2), (3, 16, 2)), 0.7),
}
_SINUSES = {
    "transverse_right": (((0, -80, 6), (30, -76, 4), (52, -58, 2), (60, -40, -8)), 3.2),
    "transverse_left": (((0, -80, 6), (-30, -76, 4), (-52, -58, 2), (-60, -40, -8)), 3.2),
    "sigmoid_right": (((60, -40, -8), (58, -30, -22), (52, -24, -36)), 2.8),
    "sigmoid_left": (((-60, -40, -8), (-58, -30, -22), (-52, -24, -36)), 2.8),
    "straight": (((0, -80, 6), (0, -62, 18), (0, -44, 34)), 2.2),
}
# Typical sites: (vessel, position along it 0-1, weight, location name).
_SITES = (
    ("AComm", 0.5, 0.28, "anterior communicating artery"),
    ("M1_R", 1.0, 0.13, "right MCA bifurcation"),
    ("M1_L", 1.0, 0.13, "left MCA bifurcation"),
    ("ICA_R", 0.97, 0.09, "right ICA terminus / PComm origin"),
    ("ICA_L", 0.97, 0.09, "left ICA terminus / PComm origin"),
    ("basilar", 1.0, 0.1, "basilar tip"),
    ("A2_R", 0.35, 0.04, "right pericallosal artery"),
    ("A2_L", 0.35, 0.04, "left pericallosal artery"),
    ("ICA_R", 0.55, 0.05, "right ICA siphon"),
    ("ICA_L", 0.55, 0.05, "left ICA siphon"),
)


@dataclass(frozen=True)
class VolumeSettings:
    volume_shape: tuple[int, int, int]  # z, y, x voxels
    spacing: tuple[float, float, float]  # z, y, x mm
    aneurysm_fraction: float
    noise_std: float
    seed: int


@dataclass(frozen=True)
class Aneurysm:
    centre: np.ndarray  # world (x, y, z) mm
    radius_mm: float
    location: str


@dataclass
class Series:
    series_id: str
    image: nib.Nifti1Image
    aneurysms: list[Aneurysm] = field(default_factory=list)


def series_uid(seed: int, index: int) -> str:
    return f"{UID_ROOT}.{seed}.{index + 1}"


def generate_aneurysm_volumes(
    output_dir: str | Path,
    *,
    num_series: int = 100,
    volume_shape: tuple[int, int, int] = (64, 192, 192),
    spacing: tuple[float, float, float] = (1.0, 0.9, 0.9),
    aneurysm_fraction: float = 0.5,
    noise_std: float = 15.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``num_series`` NIfTI volumes and ``aneurysm_centres.csv`` into ``output_dir``.

    ``volume_shape`` and ``spacing`` are (z, y, x). Series ``i`` depends only on
    ``(seed, i)``. The folder is written whole or not at all; a non-empty ``output_dir`` is
    replaced only with ``overwrite``.
    """
    integer(minimum=1)("num_series", num_series)
    sequence(integer(minimum=8), length=3)("volume_shape", volume_shape)
    sequence(number(above=0), length=3)("spacing", spacing)
    number(minimum=0, maximum=1)("aneurysm_fraction", aneurysm_fraction)
    number(minimum=0)("noise_std", noise_std)
    integer(minimum=0)("seed", seed)
    refuse_to_overwrite(output_dir, overwrite, "synthetic volumes")
    settings = VolumeSettings(tuple(volume_shape), tuple(float(s) for s in spacing),
                              float(aneurysm_fraction), float(noise_std), seed)
    with staged_directory(output_dir) as staging:
        with open(staging / CENTRES_FILE, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for index in range(num_series):
                series = render_series(index, settings)
                nib.save(series.image, staging / f"{series.series_id}.nii.gz")
                for aneurysm in series.aneurysms:
                    writer.writerow([series.series_id,
                                     *(f"{v:.2f}" for v in aneurysm.centre),
                                     f"{aneurysm.radius_mm:.2f}", aneurysm.location])
    return Path(output_dir)


def render_series(index: int, settings: VolumeSettings) -> Series:
    """Draw one patient and scan it."""
    rng = np.random.default_rng([settings.seed, index])
    pose = _Pose.draw(rng)
    grid = _Grid(settings.volume_shape, settings.spacing)
    hu = _head(grid, pose, rng)
    arteries = _arteries(rng)
    contrast = rng.uniform(250, 480)
    _paint(hu, grid, _tubes(_SINUSES, pose, rng, jitter=2.0), contrast * rng.uniform(0.7, 0.9))
    _paint(hu, grid, [pose.apply_tube(t) for t in arteries.values()], contrast)
    _paint(hu, grid, [pose.apply_tube(t) for t in _small_branches(arteries, rng)], contrast)
    aneurysms = _aneurysms(arteries, settings.aneurysm_fraction, rng)
    for sac in aneurysms:
        _paint_sac(hu, grid, sac, pose, contrast * rng.uniform(0.85, 1.0))
    _calcifications(hu, grid, arteries, pose, rng)
    image = _scan(hu, grid, settings.noise_std, rng)
    series_id = series_uid(settings.seed, index)
    nifti = _nifti(image, grid)
    if index % 2 == 1:
        nifti = nifti.as_reoriented(LPS)
    located = [Aneurysm(pose.apply(sac.centre), sac.radius_mm, sac.location) for sac in aneurysms]
    return Series(series_id, nifti, located)


class _Grid:
    """World coordinates (mm) of the voxel centres; the volume is centred on the origin."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing)  # z, y, x
        self.axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
        # The slab is centred a little above the circle of Willis: more brain than neck.
        self.axes[0] = self.axes[0] + 6.0

    def world_zyx(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = np.meshgrid(*[a.astype(np.float32) for a in self.axes], indexing="ij",
                              sparse=True)
        return z, y, x

    def index_of(self, z: float, y: float, x: float) -> np.ndarray:
        origin = np.array([a[0] for a in self.axes])
        return (np.array([z, y, x]) - origin) / self.spacing


@dataclass(frozen=True)
class _Pose:
    """Where this patient's head lies: rotation, translation and size."""

    rotation: np.ndarray  # 3 x 3 acting on (x, y, z)
    shift: np.ndarray     # (x, y, z) mm
    scale: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Pose:
        angles = [rng.normal(0, 4), rng.normal(0, 3), rng.normal(0, 6)]  # about x, y, z
        rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        shift = np.array([rng.normal(0, 4), rng.normal(0, 5), rng.normal(0, 3)])
        return cls(rotation=rotation, shift=shift, scale=float(rng.uniform(0.92, 1.08)))

    def apply(self, point: np.ndarray) -> np.ndarray:
        return self.rotation @ (np.asarray(point, dtype=float) * self.scale) + self.shift

    def apply_tube(self, tube: _Tube) -> _Tube:
        return _Tube(np.array([self.apply(p) for p in tube.points]), tube.radii * self.scale)

    def local(self, z, y, x, centre) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel coordinates in the head's own frame, relative to ``centre`` (x, y, z)."""
        inverse = self.rotation.T.tolist()  # Python floats keep float32 arrays float32
        dx, dy, dz = (x - float(self.shift[0]), y - float(self.shift[1]),
                      z - float(self.shift[2]))
        local = [inverse[i][0] * dx + inverse[i][1] * dy + inverse[i][2] * dz for i in range(3)]
        return tuple(local[i] / self.scale - float(centre[i]) for i in range(3))


@dataclass(frozen=True)
class _Tube:
    points: np.ndarray  # [N, 3] (x, y, z) mm, densely sampled
    radii: np.ndarray   # [N] mm


def _smooth_tube(control: np.ndarray, radius: float | np.ndarray, step: float = 1.0) -> _Tube:
    """A cubic spline through ``control`` points, sampled every ``step`` mm."""
    control = np.asarray(control, dtype=float)
    chord = np.r_[0, np.cumsum(np.linalg.norm(np.diff(control, axis=0), axis=1))]
    count = max(2, int(np.ceil(chord[-1] / step)) + 1)
    t = np.linspace(0, chord[-1], count)
    points = (CubicSpline(chord, control, bc_type="natural")(t) if len(control) > 2
              else control[0] + (control[1] - control[0]) * (t / chord[-1])[:, None])
    radii = np.interp(t, chord, np.broadcast_to(radius, len(control)))
    return _Tube(points, radii)


def _jittered(points, rng: np.random.Generator, jitter: float, keep_first: bool) -> np.ndarray:
    points = np.array(points, dtype=float)
    noise = rng.normal(0, jitter, points.shape)
    if keep_first:
        noise[0] = 0  # branches stay attached to their parent
    return points + noise


def _arteries(rng: np.random.Generator) -> dict[str, _Tube]:
    """The arterial tree in the head's frame; junctions are shared by the joining vessels."""
    calibre = rng.uniform(0.85, 1.15)
    ring = rng.uniform(0.85, 1.15)
    nodes: dict[tuple, np.ndarray] = {}

    def node(point) -> np.ndarray:
        key = tuple(point)
        if key not in nodes:  # circle-of-Willis nodes scale with the ring, the rest jitter
            near_ring = abs(point[2]) <= 3 and abs(point[0]) <= 14 and abs(point[1]) <= 18
            base = np.array(point, float) * (ring if near_ring else 1.0)
            nodes[key] = base + rng.normal(0, 1.0 if near_ring else 3.0, 3)
        return nodes[key]

    tubes = {}
    for name, (points, radius) in _SIDED_ARTERIES.items():
        for side, sign in (("R", 1), ("L", -1)):
            mirrored = [(sign * x, y, z) for x, y, z in points]
            control = np.array([node(p) for p in mirrored])
            tubes[f"{name}_{side}"] = _smooth_tube(control,
                                                   radius * calibre * rng.uniform(0.9, 1.1))
    for name, (points, radius) in _MIDLINE_ARTERIES.items():
        control = np.array([node(p) for p in points])
        tubes[name] = _smooth_tube(control, radius * calibre * rng.uniform(0.9, 1.1))
    return tubes


def _tubes(table, pose: _Pose, rng: np.random.Generator, jitter: float) -> list[_Tube]:
    return [pose.apply_tube(_smooth_tube(_jittered(points, rng, jitter, keep_first=False),
                                         radius * rng.uniform(0.85, 1.15)))
            for points, radius in table.values()]


def _small_branches(arteries: dict[str, _Tube], rng: np.random.Generator) -> list[_Tube]:
    """Thin tortuous branches leaving the larger arteries (their bends and junctions look
    a little like small sacs)."""
    parents = [t for name, t in arteries.items() if not name.startswith(("AComm", "PComm"))]
    branches = []
    for _ in range(rng.integers(8, 19)):
        parent = parents[rng.integers(len(parents))]
        start = parent.points[rng.integers(len(parent.points))]
        direction = start / max(np.linalg.norm(start), 1.0) + rng.normal(0, 0.6, 3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(10, 35)
        control = [start + direction * length * f + rng.normal(0, 2.5, 3) * (f > 0)
                   for f in np.linspace(0, 1, 4)]
        branches.append(_smooth_tube(np.array(control), rng.uniform(0.45, 0.8)))
    return branches


@dataclass(frozen=True)
class _Sac:
    """An aneurysm in the head's frame: an ellipsoid, maybe with a daughter bleb."""

    centre: np.ndarray
    radius_mm: float
    axes: np.ndarray      # [3] semi-axes mm
    rotation: np.ndarray  # 3 x 3
    bleb: tuple[np.ndarray, float] | None
    location: str


def _aneurysms(arteries: dict[str, _Tube], fraction: float,
               rng: np.random.Generator) -> list[_Sac]:
    if rng.random() >= fraction:
        return []
    count = rng.choice([1, 2, 3], p=[0.75, 0.2, 0.05])
    weights = np.array([w for *_, w, _ in _SITES])
    chosen = rng.choice(len(_SITES), size=count, replace=False, p=weights / weights.sum())
    return [_sac_at(arteries, _SITES[i], rng) for i in chosen]


def _sac_at(arteries: dict[str, _Tube], site, rng: np.random.Generator) -> _Sac:
    vessel, position, _, location = site
    tube = arteries[vessel]
    at = int(round(np.clip(position + rng.normal(0, 0.04), 0, 1) * (len(tube.points) - 1)))
    tangent = tube.points[min(at + 1, len(tube.points) - 1)] - tube.points[max(at - 1, 0)]
    tangent /= np.linalg.norm(tangent)
    # At a bifurcation the sac points on along the parent's flow; elsewhere sideways.
    side = rng.normal(0, 1, 3)
    side -= side.dot(tangent) * tangent
    side /= np.linalg.norm(side)
    outward = side + (0.8 * tangent if position >= 0.97 else 0)
    outward /= np.linalg.norm(outward)
    radius = float(np.clip(rng.lognormal(np.log(3.0), 0.35), 1.5, 7.0))
    centre = tube.points[at] + outward * (tube.radii[at] + 0.6 * radius)
    axes = radius * np.array([1.0, rng.uniform(0.75, 1.2), rng.uniform(0.75, 1.2)])
    rotation = Rotation.random(random_state=rng.integers(2**31)).as_matrix()
    bleb = None
    if rng.random() < 0.3:
        direction = outward + rng.normal(0, 0.5, 3)
        direction /= np.linalg.norm(direction)
        bleb = (centre + direction * radius * 0.9, radius * rng.uniform(0.3, 0.5))
    return _Sac(centre, radius, axes, rotation, bleb, location)


def _head(grid: _Grid, pose: _Pose, rng: np.random.Generator) -> np.ndarray:
    """Tissue in HU: air, scalp, skull with a dense base, brain texture and ventricles."""
    z, y, x = grid.world_zyx()
    semi_axes = np.array([74.0, 88.0, 84.0]) * rng.uniform(0.94, 1.06, 3)  # x, y, z
    lx, ly, lz = pose.local(z, y, x, centre=(0.0, -4.0, 30.0))
    radial = np.sqrt((lx / semi_axes[0]) ** 2 + (ly / semi_axes[1]) ** 2 + (lz / semi_axes[2]) ** 2)
    depth = (1 - radial) * semi_axes.min()  # approximate mm below the skin
    scalp, bone = rng.uniform(4, 6), rng.uniform(5, 8)
    hu = np.full(grid.shape, HU["air"], dtype=np.float32)
    hu[depth > 0] = HU["scalp"] + rng.normal(0, 5)
    diploe = np.abs(depth - scalp - bone / 2) / (bone / 2)  # 0 mid-skull, 1 at its tables
    skull = (depth > scalp) & (depth <= scalp + bone)
    hu[skull] = (rng.uniform(450, 650) + rng.uniform(600, 900) * diploe)[skull]
    brain = depth > scalp + bone
    hu[brain] = (HU["brain"] + rng.normal(0, 3) + _texture(grid, rng, amplitude=6.0))[brain]
    for side in (1, -1):
        vx, vy, vz = pose.local(z, y, x, centre=(side * 7.0, -4.0, 22.0))
        ventricle = (vx / 6.0) ** 2 + (vy / 24.0) ** 2 + (vz / 16.0) ** 2 <= 1
        hu[ventricle & brain] = HU["csf"]
    # Skull base: petrous ridges beside the carotids and the clivus in the midline.
    for centre, radii, angle in (((34, -12, -26), (11, 24, 9), 40),
                                 ((-34, -12, -26), (11, 24, 9), -40),
                                 ((0, -6, -30), (9, 14, 10), 0)):
        bx, by, bz = pose.local(z, y, x, centre=centre)
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        u, v = c * bx + s * by, -s * bx + c * by
        blob = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (bz / radii[2]) ** 2 <= 1
        hu[blob & (depth > 0)] = rng.uniform(700, 1100)
    return hu


def _texture(grid: _Grid, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth grey/white-matter-like variation, about 4 mm in scale."""
    coarse = [max(2, int(n * s / 4.0)) for n, s in zip(grid.shape, grid.spacing)]
    noise = gaussian_filter(rng.normal(0, 1, coarse), 1.0)
    noise *= amplitude / max(noise.std(), 1e-6)
    return zoom(noise, [n / c for n, c in zip(grid.shape, coarse)], order=1)[
        :grid.shape[0], :grid.shape[1], :grid.shape[2]].astype(np.float32)


def _paint(hu: np.ndarray, grid: _Grid, tubes: list[_Tube], value: float) -> None:
    """Fill tubes with ``value`` HU, blending partial voxels at their walls."""
    occupancy = np.zeros(grid.shape, dtype=np.float32)
    for tube in tubes:
        for a, b, ra, rb in zip(tube.points[:-1], tube.points[1:], tube.radii[:-1], tube.radii[1:]):
            _paint_segment(occupancy, grid, a, b, ra, rb)
    np.multiply(hu, 1 - occupancy, out=hu)
    hu += occupancy * value


def _box(grid: _Grid, low_xyz: np.ndarray, high_xyz: np.ndarray):
    """Index slices and world coordinates of the voxels in an axis-aligned world box."""
    lo = grid.index_of(low_xyz[2], low_xyz[1], low_xyz[0])
    hi = grid.index_of(high_xyz[2], high_xyz[1], high_xyz[0])
    start = np.maximum(np.floor(np.minimum(lo, hi)).astype(int), 0)
    stop = np.minimum(np.ceil(np.maximum(lo, hi)).astype(int) + 1, grid.shape)
    if np.any(stop <= start):
        return None
    slices = tuple(slice(a, b) for a, b in zip(start, stop))
    z, y, x = np.meshgrid(*[grid.axes[i][slices[i]] for i in range(3)], indexing="ij", sparse=True)
    return slices, x, y, z


def _paint_segment(occupancy: np.ndarray, grid: _Grid, a, b, ra: float, rb: float) -> None:
    edge = float(grid.spacing.mean())
    reach = max(ra, rb) + edge
    box = _box(grid, np.minimum(a, b) - reach, np.maximum(a, b) + reach)
    if box is None:
        return
    slices, x, y, z = box
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / max(ab.dot(ab), 1e-9)
    t = np.clip(t, 0, 1)
    distance = np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2
                       + (z - a[2] - t * ab[2]) ** 2)
    occupied = np.clip((ra + t * (rb - ra) - distance) / edge + 0.5, 0, 1)
    np.maximum(occupancy[slices], occupied, out=occupancy[slices])


def _paint_ball(occupancy: np.ndarray, grid: _Grid, centre, axes, rotation) -> None:
    edge = float(grid.spacing.mean())
    reach = float(np.max(axes)) + edge
    box = _box(grid, centre - reach, centre + reach)
    if box is None:
        return
    slices, x, y, z = box
    d = [x - centre[0], y - centre[1], z - centre[2]]
    local = [rotation[0, i] * d[0] + rotation[1, i] * d[1] + rotation[2, i] * d[2]
             for i in range(3)]
    radial = np.sqrt(sum((local[i] / axes[i]) ** 2 for i in range(3)))
    occupied = np.clip((1 - radial) * float(np.mean(axes)) / edge + 0.5, 0, 1)
    np.maximum(occupancy[slices], occupied, out=occupancy[slices])


def _paint_sac(hu: np.ndarray, grid: _Grid, sac: _Sac, pose: _Pose, value: float) -> None:
    occupancy = np.zeros(grid.shape, dtype=np.float32)
    rotation = pose.rotation @ sac.rotation
    _paint_ball(occupancy, grid, pose.apply(sac.centre), sac.axes * pose.scale, rotation)
    if sac.bleb is not None:
        centre, radius = sac.bleb
        _paint_ball(occupancy, grid, pose.apply(centre), np.full(3, radius * pose.scale),
                    np.eye(3))
    np.multiply(hu, 1 - occupancy, out=hu)
    hu += occupancy * value


def _calcifications(hu: np.ndarray, grid: _Grid, arteries: dict[str, _Tube], pose: _Pose,
                    rng: np.random.Generator) -> None:
    """Bright plaques on the walls of the carotids and the basilar in 40 % of the series."""
    if rng.random() >= 0.4:
        return
    occupancy = np.zeros(grid.shape, dtype=np.float32)
    walls = [arteries[n] for n in ("ICA_R", "ICA_L", "basilar", "M1_R", "M1_L")]
    for _ in range(rng.integers(1, 5)):
        tube = walls[rng.integers(len(walls))]
        at = rng.integers(len(tube.points))
        side = rng.normal(0, 1, 3)
        side /= np.linalg.norm(side)
        centre = tube.points[at] + side * tube.radii[at]
        _paint_ball(occupancy, grid, pose.apply(centre), np.full(3, rng.uniform(0.7, 1.5)),
                    np.eye(3))
    np.multiply(hu, 1 - occupancy, out=hu)
    hu += occupancy * rng.uniform(600, 1100)


def _scan(hu: np.ndarray, grid: _Grid, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Point-spread blur and correlated noise, rounded to int16 HU."""
    image = gaussian_filter(hu, 0.6)
    if noise_std > 0:
        noise = gaussian_filter(rng.normal(0, 1, grid.shape).astype(np.float32), 0.7)
        image += noise * (noise_std * rng.uniform(0.7, 1.3) / max(float(noise.std()), 1e-6))
    return np.clip(np.round(image), -1024, 3071).astype(np.int16)


def _nifti(image_zyx: np.ndarray, grid: _Grid) -> nib.Nifti1Image:
    """A RAS NIfTI (array axes x, y, z) whose affine maps voxels to the world in mm."""
    affine = np.eye(4)
    for column, axis in enumerate((2, 1, 0)):  # NIfTI i, j, k are x, y, z
        affine[column, column] = grid.spacing[axis]
        affine[column, 3] = grid.axes[axis][0]
    image = nib.Nifti1Image(np.ascontiguousarray(image_zyx.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image
