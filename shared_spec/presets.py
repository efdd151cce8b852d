"""Named placements stored next to a checkpoint, in `supernet_presets.json`.

Upstream Fast-LLM and Hugging Face readers never open this file, so adding it breaks no reader.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared_spec.placement import NAME_PATTERN, Placement, PlacementError
from shared_spec.spec import SupernetSpec

PRESETS_FILENAME = "supernet_presets.json"


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    placement: str | list[str]
    description: str = ""
    # Measured figures (e.g. decode speedup, KL to teacher), free-form name -> number.
    metrics: dict[str, float] = Field(default_factory=dict)


class PresetsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    # A preset name or a placement used when a request names none; None: each layer's main mixer.
    default: str | list[str] | None = None
    presets: dict[str, Preset] = Field(default_factory=dict)

    @field_validator("presets")
    @classmethod
    def _names_are_plain(cls, presets: dict[str, Preset]) -> dict[str, Preset]:
        import re

        for name in presets:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(
                    f"preset name {name!r} must match {NAME_PATTERN} (no commas, stars or spaces)"
                )
        return presets

    def validate_against(self, spec: SupernetSpec) -> None:
        """Raise PlacementError naming the first preset that does not fit the checkpoint."""
        for name, preset in self.presets.items():
            try:
                Placement.parse(preset.placement, spec)
            except PlacementError as error:
                raise PlacementError(f"preset {name!r}: {error}") from None
        if self.default is not None:
            Placement.parse(self.default, spec, self)

    def resolved(self, spec: SupernetSpec) -> dict[str, Placement]:
        return {name: Placement.parse(preset.placement, spec) for name, preset in self.presets.items()}

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> PresetsFile | None:
        path = Path(checkpoint_dir) / PRESETS_FILENAME
        if not path.exists():
            return None
        return cls.model_validate_json(path.read_text())

    def save(self, checkpoint_dir: str | Path) -> Path:
        path = Path(checkpoint_dir) / PRESETS_FILENAME
        path.write_text(json.dumps(self.model_dump(mode="json", exclude_defaults=False), indent=2) + "\n")
        return path
