"""``dataset`` ingredients: how each pipeline's data is generated and opened.

SADAAN: HDF5 splits (``metadata.json``, ``train.h5``, ``val.h5``, ``test.h5``) in the folder
named by the experiment's ``dataset_path``; the entries here drive ``generate_data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.data.hdf5 import (
    HDF5SegmentationDataset,
    dataset_statistics,
    read_metadata,
    validate_split,
)
from medseg.data.synthetic.sadaan import generate_sadaan_dataset
from medseg.errors import ConfigError

HDF5_FIELDS = {
    "num_train": Field(160, c.integer(minimum=1), "generate_data: training cases"),
    "num_val": Field(32, c.integer(minimum=1), "generate_data: validation cases"),
    "num_test": Field(32, c.integer(minimum=0), "generate_data: test cases (0: no test.h5)"),
    "image_size": Field([64, 64, 32], c.sequence(c.integer(minimum=16), length=3),
                        "generate_data: volume size H, W, D"),
    "num_structures": Field(13, c.integer(minimum=1, maximum=13),
                            "generate_data: structures (the first N of the 13 BTCV organs)"),
    "channels": Field(1, c.integer(minimum=1, maximum=4),
                      "generate_data: image channels (>1 writes [N, C, H, W, D] images)"),
    "absent_probability": Field(0.15, c.number(minimum=0, maximum=1),
                                "generate_data: share of cases with a structure removed"),
    "noise_std": Field(8.0, c.number(minimum=0), "generate_data: image noise standard deviation"),
    "seed": Field(0, c.integer(minimum=0), "generate_data: random seed"),
    "overwrite": Field(False, c.boolean(), "generate_data: replace an existing dataset folder"),
}


class HDF5DatasetIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("dataset", HDF5_FIELDS, defaults)

        @self.capture
        def generate(dataset_path: str, num_train: int, num_val: int, num_test: int,
                     image_size: list[int], num_structures: int, channels: int,
                     absent_probability: float, noise_std: float, seed: int,
                     overwrite: bool) -> Path:
            return generate_sadaan_dataset(
                dataset_path, num_train=num_train, num_val=num_val, num_test=num_test,
                image_size=tuple(image_size), num_structures=num_structures,
                in_channels=channels, absent_probability=absent_probability,
                noise_std=noise_std, seed=seed, overwrite=overwrite)

        self.generate = generate

    @staticmethod
    def check_splits(dataset_path: str, splits: tuple[str, ...],
                     in_channels: int | None = None) -> dict[str, Any]:
        """Metadata and per-split layout, checked before a run starts (raises DataError)."""
        metadata = read_metadata(dataset_path)
        for split in splits:
            info = validate_split(dataset_path, split, metadata)
            if in_channels is not None and info.num_channels != in_channels:
                raise ConfigError(f"model.in_channels={in_channels} but {info.path} has images "
                                  f"with {info.num_channels} channel(s)")
        return metadata

    @staticmethod
    def statistics(dataset_path: str, metadata: dict[str, Any]) -> dict[str, Any]:
        return dataset_statistics(dataset_path, metadata)

    @staticmethod
    def has_split(dataset_path: str, split: str) -> bool:
        return (Path(dataset_path) / f"{split}.h5").is_file()

    @staticmethod
    def open_split(dataset_path: str, split: str, transform=None) -> HDF5SegmentationDataset:
        return HDF5SegmentationDataset(Path(dataset_path) / f"{split}.h5", transform=transform)
