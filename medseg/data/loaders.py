"""DataLoaders whose every epoch is reproducible from ``(seed, epoch)`` alone."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd
from torch.utils.data import Dataset

from medseg.engine.seeding import epoch_seed


class EpochLoader:
    """A MONAI DataLoader re-seeded at the start of each epoch.

    The shuffle order and the workers' base seed come from the loader's generator, and with
    ``num_workers=0`` the augmentation transforms are re-seeded directly, so epoch ``k``
    draws the same batches whether the run started at epoch 1 or resumed at ``k``.
    Workers are not persistent for the same reason: each epoch starts them from its seed.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int,
                 seed: int, drop_last: bool = False, pin_memory: bool = False,
                 collate_fn=None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                 num_workers=num_workers, generator=self.generator,
                                 drop_last=drop_last, pin_memory=pin_memory,
                                 persistent_workers=False,
                                 **({"collate_fn": collate_fn} if collate_fn else {}))
        self._epoch = 0

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        seed = epoch_seed(self.seed, epoch)
        self.generator.manual_seed(seed)
        # A dataset that draws its items per epoch (Neuroverse3D episodes) is given the epoch's
        # seed here, before the workers copy it.
        if hasattr(self.dataset, "set_epoch_seed"):
            self.dataset.set_epoch_seed(seed)
        if self.loader.num_workers == 0:
            set_rnd(self.dataset, seed)

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
