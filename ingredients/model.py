"""``model`` ingredients: one per architecture, with the entries that architecture has."""

from __future__ import annotations

from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.models.sadaan import SADAAN

SADAAN_FIELDS = {
    "in_channels": Field(1, c.integer(minimum=1), "Image channels (1 for CT/MRI)"),
    "presence_threshold": Field(0.5, c.number(minimum=0, maximum=1),
                                "Presence probability above which a structure counts as present"),
    "base_channels": Field(8, c.integer(minimum=2), "Feature channels of the first level (doubling per level)"),
}


class SADAANModelIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("model", SADAAN_FIELDS, defaults)

        @self.capture
        def make_model(num_structures: int, in_channels: int, base_channels: int) -> SADAAN:
            return SADAAN(in_channels=in_channels, num_structures=num_structures,
                          base_channels=base_channels)

        self.make_model = make_model
