"""In-context-learning episodes from nnU-Net datasets (Neuroverse3D).

A *task* is one (dataset, input channel). An *episode* draws a task (weighted by its sampling
weight), ``L + 1`` cases of it with replacement, and a random subset of its label values as
foreground; all ``L + 1`` label volumes are binarised with that subset and augmented together
(most random parameters shared). Each volume of the episode then takes its turn as the target,
the others being its context: one training item (one optimizer step) per turn, as the
original. Episodes are a function of the epoch's seed, so every turn of an episode
sees the same volumes and a resumed run sees the episodes an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    Rand3DElastic,
    RandFlip,
    RandGaussianNoise,
    RandRotate90,
    RandScaleIntensity,
    RandShiftIntensity,
    Rotate90,
    SobelGradients,
)
from torch.utils.data import Dataset

from medseg.data.nnunet import NnunetDataset, load_image, load_labels
from medseg.errors import DataError


@dataclass(frozen=True)
class TaskEntry:
    """One task: a dataset, the input channel used, its relative sampling weight."""

    dataset: NnunetDataset
    channel: int
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.dataset.name}:{self.channel}"


def select_tasks(available: Sequence[NnunetDataset], names: Sequence[str] | None = None,
                 weights: float | Sequence[float] | None = None) -> list[TaskEntry]:
    """Tasks of ``names`` (every dataset when ``None``): ``DatasetNNN`` or ``DatasetNNN_Name``
    (all its channels) or ``DatasetNNN_Name:C`` (channel C only). ``weights``: one sampling
    weight per name (a single number gives every task the same weight)."""
    chosen: list[tuple[NnunetDataset, list[int]]] = []
    for name in (names if names is not None else [d.name for d in available]):
        base, _, channel = str(name).partition(":")
        matches = [d for d in available if d.name == base or d.name.split("_")[0] == base]
        if len(matches) != 1:
            found = ", ".join(d.name for d in available)
            raise DataError(f"dataset {base!r} {'is ambiguous' if matches else 'does not exist'} "
                            f"in the data folder (found: {found})")
        dataset = matches[0]
        if channel:
            if not channel.isdigit() or int(channel) not in dataset.info.channels:
                raise DataError(f"{name}: {dataset.name} has channels "
                                f"{sorted(dataset.info.channels)}, not {channel!r}")
            chosen.append((dataset, [int(channel)]))
        else:
            chosen.append((dataset, sorted(dataset.info.channels)))
    if weights is None or isinstance(weights, (int, float)):
        per_name = [float(weights or 1.0)] * len(chosen)
    else:
        if len(weights) != len(chosen):
            raise ValueError(f"weights must give one weight per dataset ({len(chosen)}), got "
                             f"{len(weights)}")
        per_name = [float(w) for w in weights]
    if any(w <= 0 for w in per_name):
        raise ValueError(f"weights must be > 0, got {per_name}")
    return [TaskEntry(dataset, channel, weight)
            for (dataset, channels), weight in zip(chosen, per_name) for channel in channels]


def split_cases(cases: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The original's split: in name order, the last ``val_fraction`` of cases (at least one
    when there are two or more) are validation."""
    cases = sorted(cases)
    count = 0 if len(cases) < 2 or val_fraction == 0 else max(1, round(len(cases) * val_fraction))
    return cases[: len(cases) - count], cases[len(cases) - count:]


class VolumeStore:
    """Cases loaded once at the model's size: normalised images ``[1, *size]`` per channel,
    integer labels ``[1, *size]``."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(int(s) for s in size)
        self._images: dict[tuple, torch.Tensor] = {}
        self._labels: dict[tuple, torch.Tensor] = {}

    def image(self, dataset: NnunetDataset, case: str, channel: int) -> torch.Tensor:
        key = (str(dataset.root), case, channel)
        if key not in self._images:
            self._images[key], geometry = load_image(dataset.image_path(case, channel), self.size)
            self._shapes = getattr(self, "_shapes", {})
            self._shapes[(str(dataset.root), case)] = geometry.shape
        return self._images[key]

    def labels(self, dataset: NnunetDataset, case: str) -> torch.Tensor:
        key = (str(dataset.root), case)
        if key not in self._labels:
            self.image(dataset, case, min(dataset.info.channels))
            self._labels[key] = load_labels(dataset.label_path(case), self.size,
                                            expected_shape=self._shapes[key])
        return self._labels[key]


@dataclass(frozen=True)
class EpisodeSettings:
    """How episodes are drawn. ``random_context_range`` and ``random_context_probability``:
    with that probability, L is drawn uniformly from the (inclusive) range, else it is
    ``context_size``. ``background_in_pool``: label 0 may be among the foreground classes (as
    the original's ``'random'``)."""

    context_size: int = 3
    random_context_range: tuple[int, int] | None = None
    random_context_probability: float = 0.0
    max_classes: int = 5
    background_in_pool: bool = True

    def __post_init__(self) -> None:
        if self.context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {self.context_size}")
        if self.random_context_range is not None:
            low, high = self.random_context_range
            if not 1 <= low <= high:
                raise ValueError(f"random_context_range must be [low, high] with 1 <= low <= high, "
                                 f"got {list(self.random_context_range)}")
        if self.max_classes < 1:
            raise ValueError(f"max_classes must be >= 1, got {self.max_classes}")


@dataclass(frozen=True)
class Episode:
    task: int
    cases: tuple[str, ...]
    classes: tuple[int, ...]
    seed: int


def draw_episode(rng: np.random.Generator, tasks: Sequence[TaskEntry],
                 cases: Mapping[str, Sequence[str]], settings: EpisodeSettings) -> Episode:
    weights = np.array([t.weight for t in tasks], dtype=float)
    task = int(rng.choice(len(tasks), p=weights / weights.sum()))
    entry = tasks[task]
    size = settings.context_size
    if settings.random_context_range is not None and rng.random() < settings.random_context_probability:
        size = int(rng.integers(settings.random_context_range[0], settings.random_context_range[1] + 1))
    pool = cases[entry.dataset.name]
    chosen = tuple(pool[int(i)] for i in rng.integers(0, len(pool), size=size + 1))
    values = sorted(entry.dataset.info.labels)
    if not settings.background_in_pool:
        values = [v for v in values if v != 0]
    count = int(rng.integers(1, max(1, min(len(values) - 1, settings.max_classes)) + 1))
    classes = tuple(sorted(int(v) for v in rng.choice(values, size=count, replace=False)))
    return Episode(task, chosen, classes, int(rng.integers(2**31)))


@dataclass(frozen=True)
class AugmentationSettings:
    """Probabilities of the original's augmentations (0 turns one off)."""

    flip: float = 0.1
    rotate90: float = 0.1
    resample: float = 0.15
    intensity_shift: float = 0.2
    intensity_scale: float = 0.2
    noise: float = 0.1
    elastic: float = 0.05
    invert_label: float = 0.05
    invert_image: float = 0.05
    dilate: float = 0.05
    erode: float = 0.05
    edge: float = 0.05
    gin: float = 0.05
    volume_rotate90: float = 0.25
    volume_rotate90_datasets: str | None = "_syn_type"

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name != "volume_rotate90_datasets" and not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


class GlobalIntensityNonlinear:
    """GIN (global intensity non-linear augmentation, Ouyang et al., "Causality-inspired
    single-source domain generalization for medical image segmentation"): a shallow
    convolutional network with freshly drawn random weights (``layers`` convolutions of 1 or 3
    voxels, ``channels`` wide, leaky ReLU between) remaps the intensities; the result is blended
    with the input by a random ``alpha`` and scaled back to each volume's norm. Written here:
    MONAI's intensity transforms are voxel-wise curves (histogram shift, gamma), none is a
    random spatially-mixing network. One network per call, shared by the ``[N, *S]`` volumes
    (the episode's other random parameters are shared too)."""

    def __init__(self, layers: int = 4, channels: int = 2) -> None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.layers, self.channels = layers, channels

    def __call__(self, volumes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = volumes.float()[:, None]
        spatial = x.dim() - 2
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
        h = x
        for i in range(self.layers):
            c_in = 1 if i == 0 else self.channels
            c_out = 1 if i == self.layers - 1 else self.channels
            k = 3 if torch.rand((), generator=generator) < 0.5 else 1
            weight = torch.randn(c_out, c_in, *(k,) * spatial, generator=generator)
            bias = torch.randn(c_out, generator=generator)
            h = conv(h, weight, bias, padding=k // 2)
            if i < self.layers - 1:
                h = F.leaky_relu(h, 0.2)
        alpha = torch.rand((), generator=generator)
        mixed = alpha * h + (1 - alpha) * x
        norm_in = x.flatten(1).norm(dim=1)
        norm_out = mixed.flatten(1).norm(dim=1).clamp_min(1e-8)
        return (mixed * (norm_in / norm_out).view(-1, *(1,) * (x.dim() - 1)))[:, 0]


class EpisodeAugmentation:
    """Random transforms of a stacked episode (``images``, ``labels`` both ``[N, *S]``),
    their parameters shared by the N volumes: MONAI flips, 90-degree rotations and elastic
    deformation on images and labels together, MONAI intensity shift, scale and noise on the
    images, MONAI Sobel gradients for the label's edge map; label/image inversion, label
    dilation/erosion (3x3x3 max-pool) and slice resampling written here (MONAI has no
    binary-mask morphology, and no "keep every k-th slice" transform); GIN
    (:class:`GlobalIntensityNonlinear`) on the images; and, for datasets whose name contains
    ``volume_rotate90_datasets`` (every dataset when it is ``None``; the original: names with
    ``_syn_type``), a MONAI 90-degree rotation of each volume on its own (image with its label),
    so context and target need not share an orientation. The caller min-max normalises each
    volume afterwards (as the original after GIN)."""

    def __init__(self, settings: AugmentationSettings) -> None:
        s = settings
        self.settings = s
        self.spatial = Compose([*(RandFlip(prob=s.flip, spatial_axis=a) for a in range(3)),
                                *(RandRotate90(prob=s.rotate90, spatial_axes=axes)
                                  for axes in ((0, 1), (0, 2), (1, 2))),
                                Rand3DElastic(sigma_range=(7, 8), magnitude_range=(100, 200),
                                              prob=s.elastic, rotate_range=(0.3, 0.3, 0.3),
                                              scale_range=(0.2, 0.2, 0.2), padding_mode="zeros")])
        self.sobel = SobelGradients(kernel_size=3)
        self.intensity = Compose([RandShiftIntensity(offsets=0.2, prob=s.intensity_shift),
                                  RandScaleIntensity(factors=0.1, prob=s.intensity_scale),
                                  RandGaussianNoise(prob=s.noise, std=0.02)])
        self.gin = GlobalIntensityNonlinear()

    def _rotate_volumes(self, images, labels, rng):
        size = images.shape[1:]
        planes = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if size[a] == size[b]]
        if not planes:  # a rotation would change the shape of one volume only
            return images, labels
        images, labels = images.clone(), labels.clone()
        for i in range(images.shape[0]):
            if rng.random() < self.settings.volume_rotate90:
                rotate = Rotate90(k=int(rng.integers(1, 4)),
                                  spatial_axes=planes[int(rng.integers(len(planes)))])
                pair = torch.as_tensor(rotate(torch.stack([images[i], labels[i]])))
                images[i], labels[i] = pair[0], pair[1]
        return images, labels

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, dataset: str = ""):
        rng = np.random.default_rng(seed)
        self.spatial.set_random_state(seed=seed % 2**32)
        self.intensity.set_random_state(seed=(seed + 1) % 2**32)
        n = images.shape[0]
        both = torch.as_tensor(self.spatial(torch.cat([images, labels])))
        images, labels = both[:n], (both[n:] > 0.5).float()
        images = torch.as_tensor(self.intensity(images)).float()
        s = self.settings
        if rng.random() < s.invert_label:
            labels = 1 - labels
        if rng.random() < s.invert_image:
            images = 1 - images
        if rng.random() < s.dilate:
            labels = F.max_pool3d(labels[None], 3, stride=1, padding=1)[0]
        elif rng.random() < s.erode:
            labels = 1 - F.max_pool3d(1 - labels[None], 3, stride=1, padding=1)[0]
        if rng.random() < s.edge:  # the task becomes "segment the boundary"
            grads = torch.as_tensor(self.sobel(labels)).unflatten(0, (n, -1))
            labels = (grads.abs().sum(1) > 0).float()
        if rng.random() < s.resample:
            images, labels = _resample_slices(images, labels, axis=int(rng.integers(3)),
                                              step=int(rng.integers(2, 5)))
        if s.volume_rotate90_datasets is None or s.volume_rotate90_datasets in dataset:
            images, labels = self._rotate_volumes(images, labels, rng)
        if rng.random() < s.gin:
            images = self.gin(images, torch.Generator().manual_seed(int(rng.integers(2**31))))
        return images, labels


def _resample_slices(images: torch.Tensor, labels: torch.Tensor, axis: int, step: int):
    """Keep every ``step``-th slice along spatial ``axis`` and stretch back (nearest): a
    thick-slice acquisition, as the original's ``RandomResample``."""
    size = images.shape[1:]
    kept = [t.index_select(axis + 1, torch.arange(0, size[axis], step)) for t in (images, labels)]
    return tuple(F.interpolate(t[None], size=size, mode="nearest")[0] for t in kept)


def minmax(volumes: torch.Tensor) -> torch.Tensor:
    """Each ``[*S]`` volume of ``[N, *S]`` to [0, 1] (constant volumes to 0)."""
    flat = volumes.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    shape = (-1,) + (1,) * (volumes.dim() - 1)
    return (volumes - low.view(shape)) / span.view(shape)


class EpisodeDataset(Dataset):
    """One item per turn of each episode: ``target_in`` ``[1, *S]``, ``target_out``
    ``[1, *S]``, ``context_in`` / ``context_out`` ``[L, 1, *S]``, ``task`` (its name).

    ``episodes`` episodes per epoch; :meth:`set_epoch_seed` draws an epoch's episodes (the
    loader calls it each epoch; ``seed`` gives those drawn before). ``augmentation`` ``None``: none (validation).
    """

    def __init__(self, store: VolumeStore, tasks: Sequence[TaskEntry],
                 cases: Mapping[str, Sequence[str]], settings: EpisodeSettings, *,
                 episodes: int, seed: int, augmentation: EpisodeAugmentation | None = None) -> None:
        if not tasks:
            raise ValueError("tasks must hold at least one task")
        for task in tasks:
            if not cases.get(task.dataset.name):
                raise DataError(f"dataset {task.dataset.name} has no cases in this split")
        self.store, self.tasks, self.cases, self.settings = store, list(tasks), cases, settings
        self.episodes, self.augmentation = episodes, augmentation
        self.set_epoch_seed(seed)

    def set_epoch_seed(self, seed: int) -> None:
        """Draw the episodes of the epoch whose seed is ``seed`` (the loader's ``(seed, epoch)``
        seed, which a resumed run restores)."""
        rng = np.random.default_rng(seed)
        self.plan = [draw_episode(rng, self.tasks, self.cases, self.settings)
                     for _ in range(self.episodes)]
        self.items = [(e, turn) for e, episode in enumerate(self.plan)
                      for turn in range(len(episode.cases))]

    def __len__(self) -> int:
        return len(self.items)

    def episode_volumes(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """The episode's images and binarised labels, ``[N, *S]`` each, augmented."""
        entry = self.tasks[episode.task]
        images = torch.cat([self.store.image(entry.dataset, c, entry.channel) for c in episode.cases])
        raw = torch.cat([self.store.labels(entry.dataset, c) for c in episode.cases])
        labels = torch.isin(raw, torch.tensor(episode.classes)).float()
        if self.augmentation is not None:
            images, labels = self.augmentation(images, labels, episode.seed,
                                               dataset=entry.dataset.name)
        return minmax(images), labels

    def __getitem__(self, index: int) -> dict:
        e, turn = self.items[index]
        episode = self.plan[e]
        images, labels = self.episode_volumes(episode)
        others = [i for i in range(images.shape[0]) if i != turn]
        return {"target_in": images[turn][None], "target_out": labels[turn][None],
                "context_in": images[others][:, None], "context_out": labels[others][:, None],
                "task": self.tasks[episode.task].name}
