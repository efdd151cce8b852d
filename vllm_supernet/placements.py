"""Which placements a deployment serves, and how a request's placement value becomes a `Placement`.

Serve-time thinning: set `supernet_placements` (a list of preset names / compact strings / name
lists) in the HF config through `hf_overrides`, e.g.
`--hf-overrides '{"supernet_placements": ["fast", "attention*"]}'`, or the environment variable
`VLLM_SUPERNET_PLACEMENTS` (entries separated by `;`, e.g. `fast;attention*`). Then only the
mixers those placements use are built, loaded and given cache memory; requests for any other
placement are rejected (HTTP 400) with the list of allowed ones. Without the option every mixer is
served. The default placement (no `placement` in the request) is the presets file's `default`,
else each layer's `main_mixer_name`; in a thinned deployment it must be allowed, else the first
allowed placement is the default.

With self-speculative decoding (`speculative.py`), `supernet_draft_placement` names the deployment's draft
placement; a thinned deployment serves it too (its mixers are built), and a request's `draft_placement`
is resolved and checked as a placement is.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared_spec import Placement, PlacementError, PlacementRequest, PresetsFile, SupernetSpec

ENV_ALLOWED = "VLLM_SUPERNET_PLACEMENTS"
HF_OVERRIDE_KEY = "supernet_placements"
DRAFT_OVERRIDE_KEY = "supernet_draft_placement"  # the deployment's draft placement (self-speculation)
EXTRA_ARGS_KEY = "placement"
DRAFT_EXTRA_ARGS_KEY = "draft_placement"
# Every request field this project adds (shared_spec.request.PlacementRequest), and those naming a service level.
REQUEST_KEYS = tuple(PlacementRequest.model_fields)
SERVICE_LEVEL_KEYS = ("min_quality", "min_speedup")


class ServingPlacements:
    """The placements one deployment serves; validates request values against them."""

    def __init__(
        self,
        spec: SupernetSpec,
        presets: PresetsFile | None = None,
        allowed: list[Any] | None = None,
        draft: Any = None,
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
        self.draft_default: Placement | None = None
        if draft is not None:
            try:
                self.draft_default = Placement.parse(draft, spec, presets)
            except PlacementError as error:
                raise PlacementError(f"{DRAFT_OVERRIDE_KEY} {draft!r}: {error}") from None
            if self.allowed is not None and self.draft_default not in self.allowed:
                self.allowed.append(self.draft_default)  # a thinned deployment keeps the mixers its drafts need
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
        self._parsed: dict[str, Placement] = {}

    @classmethod
    def from_model_config(cls, model_config) -> ServingPlacements:
        """The deployment of a model config, built once per config object (this runs for every request)."""
        hf_config = model_config.hf_config
        known = _deployments.get(id(hf_config))
        if known is None or known[0] is not hf_config:
            allowed = getattr(hf_config, HF_OVERRIDE_KEY, None)
            if allowed is None and os.environ.get(ENV_ALLOWED):
                allowed = [entry.strip() for entry in os.environ[ENV_ALLOWED].split(";") if entry.strip()]
            if isinstance(allowed, str):
                allowed = [allowed]
            presets = PresetsFile.load(model_config.model) if Path(str(model_config.model)).is_dir() else None
            spec = SupernetSpec.from_config(hf_config.apriel2())
            draft = getattr(hf_config, DRAFT_OVERRIDE_KEY, None)
            known = _deployments[id(hf_config)] = (
                hf_config,
                cls(spec, presets, list(allowed) if allowed else None, draft),
            )
        return known[1]

    # ---- requests ---------------------------------------------------------------------------

    def resolve(self, value: Any) -> Placement:
        """A request's `placement` value (None: the default) -> Placement, or PlacementError.

        Strings (canonical forms, compact strings, preset names) are parsed once and then looked up:
        a request's canonical string reaches every worker on every step."""
        if value is None:
            return self.default
        if isinstance(value, str):
            known = self._parsed.get(value)
            if known is None:
                known = self._parsed[value] = self._parse(value)
                if len(self._parsed) > 4096:  # unthinned deployments take any placement: stay bounded
                    self._parsed = {value: known}
            return known
        return self._parse(list(value) if isinstance(value, tuple) else value)

    def resolve_request(self, fields: dict[str, Any], by_load=None) -> tuple[Placement, str | None]:
        """A request's fields (`placement`, or a service level `min_quality` / `min_speedup`) -> (placement,
        the preset chosen for the service level or None); PlacementError names what is wrong.

        by_load: None, or a function choosing among the presets that meet the service level (the API server's
        `load_policy.LoadPolicy`); else the choice is `PresetsFile.choose`'s, from the recorded figures alone."""
        if all(fields.get(key) is None for key in SERVICE_LEVEL_KEYS):
            # Every request in the frontend and every worker step: a memoised look-up, no validation model.
            return self.resolve(fields.get(EXTRA_ARGS_KEY)), None
        try:
            request = PlacementRequest.model_validate({key: fields[key] for key in REQUEST_KEYS if key in fields})
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in error.errors())
            raise PlacementError(problems) from None
        if not self.served_presets:
            raise PlacementError("this deployment serves no presets, so a service level cannot be matched; name a placement")
        served = list(self.served_presets)
        if by_load is not None:
            name = by_load(self.presets.qualifying(served, request.min_quality, request.min_speedup))
        else:
            name = self.presets.choose(served, request.min_quality, request.min_speedup)
        return self.served_presets[name], name

    def resolve_draft(self, value: Any) -> Placement | None:
        """A request's `draft_placement` value (None: the deployment's draft placement, maybe None) ->
        Placement, or PlacementError naming the field."""
        if value is None:
            return self.draft_default
        try:
            return self.resolve(value)
        except PlacementError as error:
            raise PlacementError(f"{DRAFT_EXTRA_ARGS_KEY}: {error}") from None

    def _parse(self, value: Any) -> Placement:
        placement = Placement.parse(value, self.spec, self.presets)
        if self.allowed is not None and placement not in self.allowed:
            raise PlacementError(
                f"placement {placement.canonical!r} is not served by this deployment; "
                f"allowed: {', '.join(p.canonical for p in self.allowed)}"
            )
        return placement

    @functools.cached_property
    def served_presets(self) -> dict[str, Placement]:
        """The checkpoint's presets whose placement this deployment serves, by name."""
        if self.presets is None:
            return {}
        resolved = self.presets.resolved(self.spec)
        return {name: p for name, p in resolved.items() if self.allowed is None or p in self.allowed}

    def preset_listing(self, footprints=None) -> dict[str, Any]:
        """What clients may ask for: presets (resolved), the default, the allowed set, the layer choices; with
        `footprints` (`footprint.CacheFootprints`), each placement's cache bytes per token and fixed bytes."""

        def cache(placement: Placement) -> dict[str, Any]:
            return {"cache": footprints.listing(placement)} if footprints is not None else {}

        presets = {
            name: {
                "placement": placement.canonical,
                "hash": placement.hash,
                "description": self.presets.presets[name].description,
                "metrics": self.presets.presets[name].metrics,
                **cache(placement),
            }
            for name, placement in self.served_presets.items()
        }
        return {
            "default": {"placement": self.default.canonical, "hash": self.default.hash, **cache(self.default)},
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


# id(hf_config) -> (hf_config, its deployment); the config is kept so that its id stays its own.
_deployments: dict[int, tuple[Any, ServingPlacements]] = {}
