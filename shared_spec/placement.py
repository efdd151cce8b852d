"""Placements: which mixer each decoder layer runs.

Three spellings are accepted everywhere (trainer, PyTorch model, vLLM request):

* a list of mixer names, one per layer: `["attention", "gdn", "gdn", "kda"]`;
* a compact run-length string: comma-separated runs `NAME` or `NAME*COUNT`, and at most one
  `NAME*` with no count, which fills every layer the other runs leave:
  `"attention,gdn*2,kda"`, `"gdn*"` (all GDN), `"attention*2,sliding_window*"`;
* the name of a preset stored with the checkpoint (`supernet_presets.json`).

Lists and strings may name every layer, or only the layers that have a choice (the stochastic
ones); plain layers are then filled in. The canonical string names every layer, merges equal
neighbours into runs (`gdn*2`, never `gdn,gdn` or `gdn*1`), and its sha256 prefix is the
placement's short stable hash, used for prefix-cache salts, metric labels and file names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from itertools import groupby
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from shared_spec.spec import MixerKind, SupernetSpec

if TYPE_CHECKING:
    from shared_spec.presets import PresetsFile

NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_RUN = re.compile(rf"^\s*({NAME_PATTERN})\s*(?:\*\s*(\d*)\s*)?$")
HASH_LENGTH = 12


class PlacementError(ValueError):
    """A placement that is malformed or does not fit the checkpoint. The message says what to fix."""


def parse_compact(text: str, num_layers: int | None = None) -> list[str]:
    """Expand a compact run-length string into one name per layer.

    `num_layers` is needed only to expand a fill run (`NAME*` with no count).
    """
    if not isinstance(text, str) or not text.strip():
        raise PlacementError("empty placement string; expected runs like 'attention*2,gdn' or 'gdn*'")
    runs: list[tuple[str, int | None]] = []
    for position, token in enumerate(text.split(",")):
        match = _RUN.match(token)
        if match is None:
            raise PlacementError(
                f"bad run {token.strip()!r} at position {position} of placement {text!r}: "
                "each run is NAME, NAME*COUNT or NAME* (fill)"
            )
        name, count = match.group(1), match.group(2)
        has_star = "*" in token
        if has_star and count:
            if int(count) < 1:
                raise PlacementError(f"run {token.strip()!r} in {text!r}: a count must be at least 1")
            runs.append((name, int(count)))
        elif has_star:
            runs.append((name, None))
        else:
            runs.append((name, 1))
    fills = [name for name, count in runs if count is None]
    if len(fills) > 1:
        raise PlacementError(f"placement {text!r} has {len(fills)} fill runs (NAME*); at most one is allowed")
    fixed_total = sum(count for _, count in runs if count is not None)
    if fills:
        if num_layers is None:
            raise PlacementError(f"placement {text!r} uses a fill run (NAME*), which needs the layer count")
        if fixed_total > num_layers:
            raise PlacementError(
                f"placement {text!r} names {fixed_total} layers before filling; there are {num_layers}"
            )
    names: list[str] = []
    for name, count in runs:
        names.extend([name] * (count if count is not None else num_layers - fixed_total))
    return names


def format_compact(names: Sequence[str]) -> str:
    """The canonical run-length string for a list of names."""
    runs = []
    for name, group in groupby(names):
        count = len(list(group))
        runs.append(name if count == 1 else f"{name}*{count}")
    return ",".join(runs)


class Placement(BaseModel):
    """One mixer name per decoder layer, already checked against a `SupernetSpec`."""

    model_config = ConfigDict(frozen=True)

    mixers: tuple[str, ...] = Field(min_length=1)

    @classmethod
    def parse(
        cls,
        value: Placement | str | Sequence[str] | None,
        spec: SupernetSpec,
        presets: PresetsFile | None = None,
    ) -> Placement:
        """Resolve any accepted spelling to a validated placement; None gives the default."""
        if value is None:
            if presets is not None and presets.default is not None:
                return cls.parse(presets.default, spec, presets)
            return cls(mixers=spec.default_names)
        if isinstance(value, Placement):
            return cls.from_names(value.mixers, spec)
        if isinstance(value, str):
            key = value.strip()
            if presets is not None and key in presets.presets:
                return cls.parse(presets.presets[key].placement, spec)
            try:
                return cls._from_compact(value, spec)
            except PlacementError as error:
                if "," in key or "*" in key:
                    raise
                known = ", ".join(sorted(presets.presets)) if presets else ""
                raise PlacementError(
                    f"{key!r} is neither a preset (presets: {known or 'none'}) nor a valid placement: {error}"
                ) from None
        if isinstance(value, Sequence) and all(isinstance(name, str) for name in value):
            return cls.from_names(list(value), spec)
        raise PlacementError(
            f"a placement is a list of mixer names, a compact string or a preset name; got {type(value).__name__}"
        )

    @classmethod
    def _from_compact(cls, text: str, spec: SupernetSpec) -> Placement:
        # Counts and fill runs refer to all layers, or, where that does not fit, to the choice layers only
        # ("gdn*" on a checkpoint with plain attention layers means: every choice layer on GDN).
        layer_counts = [spec.num_layers]
        if len(spec.choice_layers) != spec.num_layers:
            layer_counts.append(len(spec.choice_layers))
        errors = []
        for num_layers in layer_counts:
            try:
                return cls.from_names(parse_compact(text, num_layers), spec)
            except PlacementError as error:
                errors.append(error)
        raise errors[0]

    @classmethod
    def from_names(cls, names: Sequence[str], spec: SupernetSpec) -> Placement:
        names = [name.strip() for name in names]
        choice_layers = spec.choice_layers
        if len(names) == len(choice_layers) and len(names) != spec.num_layers:
            full = list(spec.default_names)
            for layer, name in zip(choice_layers, names, strict=True):
                full[layer] = name
            names = full
        if len(names) != spec.num_layers:
            raise PlacementError(
                f"placement has {len(names)} entries; this checkpoint has {spec.num_layers} layers "
                f"({len(choice_layers)} with a choice of mixer): give one name per layer or per choice layer"
            )
        for index, (name, layer) in enumerate(zip(names, spec.layers, strict=True)):
            if name not in layer.mixers:
                raise PlacementError(
                    f"layer {index}: {name!r} is not a mixer of this layer; valid choices: {', '.join(sorted(layer.mixers))}"
                )
        return cls(mixers=tuple(names))

    def __str__(self) -> str:
        return self.canonical

    @property
    def canonical(self) -> str:
        return format_compact(self.mixers)

    @property
    def hash(self) -> str:
        """Short stable id: the first 12 hex digits of sha256 of the canonical string."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:HASH_LENGTH]

    def kinds(self, spec: SupernetSpec) -> list[MixerKind]:
        return [layer.mixers[name] for name, layer in zip(self.mixers, spec.layers, strict=True)]


def uniform_placement(spec: SupernetSpec, kind: MixerKind) -> Placement:
    """Every choice layer on the mixer of `kind` (fixed layers keep theirs)."""
    names = []
    for index, layer in enumerate(spec.layers):
        if layer.fixed:
            names.append(layer.default)
            continue
        match = [name for name, k in layer.mixers.items() if k == kind]
        if not match:
            raise PlacementError(f"layer {index} has no {kind.value} mixer; it offers {sorted(layer.mixers)}")
        names.append(match[0])
    return Placement(mixers=tuple(names))
