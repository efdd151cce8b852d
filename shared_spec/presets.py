"""Named placements stored next to a checkpoint, in `supernet_presets.json`.

Upstream Fast-LLM and Hugging Face readers never open this file, so adding it breaks no reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared_spec.placement import NAME_PATTERN, Placement, PlacementError
from shared_spec.spec import SupernetSpec

PRESETS_FILENAME = "supernet_presets.json"
# The metrics a request's service level is matched against (`supernet-place presets` records both, measured):
# top-1 agreement with the teacher on held-out text (all-attention = 1.0), and decode speed-up over
# all-attention at the context length in `SPEEDUP_CONTEXT_METRIC`.
QUALITY_METRIC = "quality"
SPEEDUP_METRIC = "speedup"
SPEEDUP_CONTEXT_METRIC = "speedup_context"
# Chat agreement with the teacher on held-out prompts (`supernet-place presets --chat-prompts`): the share of
# greedy answers whose first sentence / whole text equals the teacher's, and the teacher-forced mean log-prob per
# token of the teacher's answers. The first two lie in [0, 1], as `quality` does, and can stand in for it.
CHAT_FIRST_SENTENCE_METRIC = "chat_first_sentence"
CHAT_EXACT_METRIC = "chat_exact"
CHAT_LOGPROB_METRIC = "chat_logprob"


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
    # The recorded metric a service level's `min_quality` is matched against: top-1 agreement on held-out text
    # (the default) or a chat agreement (`chat_first_sentence`, `chat_exact`), for deployments that serve chat.
    quality_metric: Literal["quality", "chat_first_sentence", "chat_exact"] = QUALITY_METRIC

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

    def choose(self, names: list[str], min_quality: float | None, min_speedup: float | None) -> str:
        """Among the presets `names` (those a deployment serves), the fastest whose recorded quality is at least
        `min_quality`, or the best-quality one whose recorded speed-up is at least `min_speedup` (both given:
        the fastest meeting both). PlacementError naming the best available when none qualifies."""
        qualifying = self.qualifying(names, min_quality, min_speedup)
        if min_quality is not None:
            return max(qualifying, key=lambda n: (self.speedup(n), self.quality(n)))
        return max(qualifying, key=lambda n: (self.quality(n), self.speedup(n)))

    def qualifying(self, names: list[str], min_quality: float | None, min_speedup: float | None) -> list[str]:
        """The presets of `names` whose recorded figures meet the service level, or PlacementError naming the
        best available."""
        rated = self.rated(names)
        if not rated:
            raise PlacementError(
                f"no served preset records both {self.quality_metric!r} and {SPEEDUP_METRIC!r}, so a service level cannot "
                "be matched; name a placement instead (presets are measured by `supernet-place presets`)"
            )
        qualifying = [
            name for name in rated
            if (min_quality is None or self.quality(name) >= min_quality)
            and (min_speedup is None or self.speedup(name) >= min_speedup)
        ]
        if qualifying:
            return qualifying
        best_quality = max(rated, key=self.quality)
        fastest = max(rated, key=self.speedup)

        def describe(name: str) -> str:
            return f"{name!r} (quality {self.quality(name):.3f}, speed-up {self.speedup(name):.2f}x)"

        asked = " and ".join(
            text for text, value in ((f"min_quality {min_quality}", min_quality), (f"min_speedup {min_speedup}", min_speedup))
            if value is not None
        )
        raise PlacementError(
            f"no served preset meets {asked}; best quality available: {describe(best_quality)}, fastest: {describe(fastest)}"
        )

    def rated(self, names: list[str]) -> list[str]:
        """The presets of `names` that record both quality and speed-up (those a service level can pick)."""
        return [name for name in names if {self.quality_metric, SPEEDUP_METRIC} <= self.presets[name].metrics.keys()]

    def frontier(self, names: list[str]) -> list[str]:
        """The rated presets of `names` no other one beats on both figures, best quality (slowest) first:
        the steps a load-aware choice goes down (a preset both slower and worse than another is never worth it)."""
        ranked = sorted(self.rated(names), key=lambda n: (-self.quality(n), -self.speedup(n)))
        steps: list[str] = []
        for name in ranked:
            if not steps or self.speedup(name) > self.speedup(steps[-1]):
                steps.append(name)
        return steps

    def quality(self, name: str) -> float:
        return self.presets[name].metrics[self.quality_metric]

    def speedup(self, name: str) -> float:
        return self.presets[name].metrics[SPEEDUP_METRIC]

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
