"""DataLoaders whose every epoch is reproducible from ``(seed, epoch)`` alone."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd
from torch.utils.data import Dataset, Subset

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
        self._options = {"num_workers": num_workers, "drop_last": drop_last,
                         "pin_memory": pin_memory, "persistent_workers": False,
                         **({"collate_fn": collate_fn} if collate_fn else {})}
        self.shuffle = shuffle
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                 generator=self.generator, **self._options)
        self._epoch = 0
        #: This process's rank among ``world`` (torchrun): training batches are its share.
        self.rank, self.world = 0, 1

    def distribute(self, rank: int, world: int, batch_size: int) -> None:
        """Train on this rank's share of every epoch's shuffled order, ``batch_size`` (the
        rank's part of the batch) at a time; see
        :class:`~medseg.engine.distributed.RankShuffleSampler`. Augmentation draws from a
        seed of its own per rank (rank 0 keeps the one-process seed)."""
        from medseg.engine.distributed import RankShuffleSampler

        if not self.shuffle:
            raise ValueError("distribute() is for shuffled training loaders; validation "
                             "takes validation_shard()")
        self.rank, self.world = rank, world
        sampler = RankShuffleSampler(len(self.dataset), self.generator, rank, world)
        options = dict(self._options)
        if rank and options["num_workers"]:
            options["worker_init_fn"] = functools.partial(_seed_rank_worker, rank=rank)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler,
                                 generator=self.generator, **options)

    def validation_shard(self, rank: int, world: int) -> "EpochLoader":
        """A loader over this rank's validation batches (see
        :func:`~medseg.engine.distributed.validation_indices`), in order."""
        from medseg.engine.distributed import validation_indices

        indices = validation_indices(len(self.dataset), self.batch_size, rank, world)
        options = {k: v for k, v in self._options.items() if k != "persistent_workers"}
        return EpochLoader(Subset(self.dataset, indices), batch_size=self.batch_size,
                           shuffle=False, seed=self.seed, **options)

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
            set_rnd(self.dataset, _rank_seed(seed, self.rank))

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps ``seed``; every other rank gets one derived from it and its rank."""
    return seed if rank == 0 else epoch_seed(seed, 1_000_003 * rank)


def _seed_rank_worker(worker_id: int, rank: int) -> None:
    """MONAI's worker seeding (``set_rnd`` from the worker's seed) with the rank mixed in."""
    info = torch.utils.data.get_worker_info()
    set_rnd(info.dataset, _rank_seed(info.seed % (2 ** 32), rank))
