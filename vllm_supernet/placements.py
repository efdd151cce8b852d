"""Which placements a deployment serves, and how a step's requests split over each layer's mixers.

Serve-time thinning: set `supernet_placements` (a list of preset names / compact strings / name
lists) in the HF config through `hf_overrides`, e.g.
`--hf-overrides '{"supernet_placements": ["fast", "attention*"]}'`, or the environment variable
`VLLM_SUPERNET_PLACEMENTS` (entries separated by `;`, e.g. `fast;attention*`). Then only the
mixers those placements use are built, loaded and given cache memory; requests for any other
placement are rejected (HTTP 400) with the list of allowed ones. Without the option every mixer is
served. The default placement (no `placement` in the request) is the presets file's `default`,
else each layer's `main_mixer_name`; in a thinned deployment it must be allowed, else the first
allowed placement is the default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from shared_spec import Placement, PlacementError, PresetsFile, SupernetSpec

ENV_ALLOWED = "VLLM_SUPERNET_PLACEMENTS"
HF_OVERRIDE_KEY = "supernet_placements"
EXTRA_ARGS_KEY = "placement"


class ServingPlacements:
    """The placements one deployment serves; validates request values against them."""

    def __init__(
        self,
        spec: SupernetSpec,
        presets: PresetsFile | None = None,
        allowed: list[Any] | None = None,
    ) -> None:
        self.spec = spec
        self.presets = presets
        if presets is not None:
            presets.validate_against(spec)
        self.allowed: list[Placement] | None = None
        if allowed:
            resolved = []
            for value in allowed:
                try:
                    resolved.append(Placement.parse(value, spec, presets))
                except PlacementError as error:
                    raise PlacementError(
                        f"{HF_OVERRIDE_KEY} / {ENV_ALLOWED} entry {value!r}: {error}"
                    ) from None
            self.allowed = list(dict.fromkeys(resolved))
        default = Placement.parse(None, spec, presets)
        if self.allowed is not None and default not in self.allowed:
            default = self.allowed[0]
        self.default = default
        # Per layer, the mixers some served placement uses, in the checkpoint's order.
        served = self.allowed if self.allowed is not None else None
        self.layer_mixers: list[list[str]] = []
        for index, layer in enumerate(spec.layers):
            if served is None:
                self.layer_mixers.append(list(layer.mixers))
            else:
                used = {placement.mixers[index] for placement in served}
                self.layer_mixers.append([name for name in layer.mixers if name in used])
        self._built = [set(names) for names in self.layer_mixers]

    @classmethod
    def from_vllm_config(cls, vllm_config) -> ServingPlacements:
        return cls.from_model_config(vllm_config.model_config)

    @classmethod
    def from_model_config(cls, model_config) -> ServingPlacements:
        allowed = getattr(model_config.hf_config, HF_OVERRIDE_KEY, None)
        if allowed is None and os.environ.get(ENV_ALLOWED):
            allowed = [entry.strip() for entry in os.environ[ENV_ALLOWED].split(";") if entry.strip()]
        if isinstance(allowed, str):
            allowed = [allowed]
        return _cached(
            str(model_config.model),
            model_config.hf_config.apriel2().model_dump_json(),
            tuple(value if isinstance(value, str) else tuple(value) for value in (allowed or ())),
        )

    # ---- requests ---------------------------------------------------------------------------

    def resolve(self, value: Any) -> Placement:
        """A request's `placement` value (None: the default) -> Placement, or PlacementError."""
        if value is None:
            return self.default
        if isinstance(value, tuple):
            value = list(value)
        placement = Placement.parse(value, self.spec, self.presets)
        if self.allowed is not None and placement not in self.allowed:
            raise PlacementError(
                f"placement {placement.canonical!r} is not served by this deployment; "
                f"allowed: {', '.join(p.canonical for p in self.allowed)}"
            )
        return placement

    def preset_listing(self) -> dict[str, Any]:
        """What clients may ask for: presets (resolved), the default, the allowed set, the layer choices."""
        presets = {}
        if self.presets is not None:
            for name, preset in self.presets.presets.items():
                placement = Placement.parse(preset.placement, self.spec)
                if self.allowed is None or placement in self.allowed:
                    presets[name] = {
                        "placement": placement.canonical,
                        "hash": placement.hash,
                        "description": preset.description,
                        "metrics": preset.metrics,
                    }
        return {
            "default": {"placement": self.default.canonical, "hash": self.default.hash},
            "presets": presets,
            "allowed": None if self.allowed is None else [p.canonical for p in self.allowed],
            "layers": [
                {
                    "mixers": {name: kind.value for name, kind in layer.mixers.items()},
                    "default": layer.default,
                }
                for layer in self.spec.layers
            ],
        }

    # ---- weights --------------------------------------------------------------------------------

    _MIXER_WEIGHT = re.compile(r"^model\.decoder\.blocks\.(\d+)\.mixer\.mixers\.([^.]+)\.")

    def is_thinned_out(self, weight_name: str) -> bool:
        """True for a checkpoint tensor of a mixer this deployment does not build."""
        match = self._MIXER_WEIGHT.match(weight_name)
        if match is None:
            return False
        layer, name = int(match.group(1)), match.group(2)
        return (
            layer < len(self._built)
            and name in self.spec.layers[layer].mixers
            and name not in self._built[layer]
        )


@lru_cache(maxsize=8)
def _cached(model_path: str, config_json: str, allowed: tuple) -> ServingPlacements:
    from shared_spec import Apriel2TextConfig

    config = Apriel2TextConfig.model_validate_json(config_json)
    presets = PresetsFile.load(model_path) if Path(model_path).is_dir() else None
    allowed_values = [value if isinstance(value, str) else list(value) for value in allowed]
    return ServingPlacements(SupernetSpec.from_config(config), presets, allowed_values or None)


# ---- a step's batch ---------------------------------------------------------------------------------


@dataclass
class StepRequests:
    """Which requests of the current step a mixer runs on, and where their tokens are.

    requests: batch indices (the runner's `input_batch` order), ascending.
    token_index: [N] positions of their tokens in the step's flat token tensor (None: all tokens
    of all requests, i.e. the mixer runs on the whole batch).
    query_start_loc / num_computed: for the whole batch (lists, length R + 1 and R).
    """

    requests: list[int]
    token_index: torch.Tensor | None
    query_start_loc: list[int]
    num_computed: list[int]

    def query_len(self, request: int) -> int:
        return self.query_start_loc[request + 1] - self.query_start_loc[request]


@dataclass
class SupernetBatch:
    """Per-request placements of one model step, in the runner's batch order, and the token layout."""

    placements: list[Placement]
    query_start_loc: list[int]  # [R + 1]
    num_computed: list[int]  # [R] tokens already in each request's cache before this step
    _token_index: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> SupernetBatch:
        return cls(placements=[], query_start_loc=[0], num_computed=[])

    def layer_groups(self, serving: ServingPlacements, device: torch.device):
        """Per layer: [(mixer name, StepRequests)], one entry per mixer some request of the step uses."""
        everyone = list(range(len(self.placements)))
        result = []
        for layer in range(serving.spec.num_layers):
            if not self.placements:
                result.append(
                    [(serving.default.mixers[layer], StepRequests([], None, self.query_start_loc, []))]
                )
                continue
            by_name: dict[str, list[int]] = {}
            for request, placement in enumerate(self.placements):
                by_name.setdefault(placement.mixers[layer], []).append(request)
            if len(by_name) == 1:
                (name,) = by_name
                result.append([(name, StepRequests(everyone, None, self.query_start_loc, self.num_computed))])
                continue
            groups = []
            for name, requests in by_name.items():
                groups.append(
                    (
                        name,
                        StepRequests(
                            requests,
                            self.token_index(requests, device),
                            self.query_start_loc,
                            self.num_computed,
                        ),
                    )
                )
            result.append(groups)
        return result

    def token_index(self, requests: list[int], device: torch.device) -> torch.Tensor:
        key = tuple(requests)
        if key not in self._token_index:
            ranges = [torch.arange(self.query_start_loc[r], self.query_start_loc[r + 1]) for r in requests]
            self._token_index[key] = torch.cat(ranges).to(device)
        return self._token_index[key]
