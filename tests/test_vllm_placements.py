"""`vllm_supernet.placements`: which placements a deployment serves, and request values resolved
against them (no vLLM import)."""

from __future__ import annotations

import json

import pytest

from shared_spec import Apriel2TextConfig, Placement, PlacementError, PresetsFile, SupernetSpec
from tests.vllm_helpers import FIXTURE_CHECKPOINT
from vllm_supernet.placements import ServingPlacements

PRESETS = PresetsFile.model_validate(
    {"default": "fast", "presets": {"fast": {"placement": ["gdn", "kda"]}, "quality": {"placement": "fa*"}}}
)


@pytest.fixture(scope="module")
def spec() -> SupernetSpec:
    return SupernetSpec.from_config(Apriel2TextConfig.from_file(FIXTURE_CHECKPOINT))


def test_unthinned_deployment_builds_every_mixer_and_uses_the_checkpoint_default(spec):
    serving = ServingPlacements(spec)
    assert serving.layer_mixers == [["fa", "gdn", "kda", "swa"], ["fa", "gdn", "kda", "swa"], ["attention"]]
    assert serving.resolve(None).mixers == ("swa", "swa", "attention")
    assert serving.resolve("gdn*").mixers == ("gdn", "gdn", "attention")
    assert not serving.is_thinned_out("model.decoder.blocks.0.mixer.mixers.kda.q_proj.weight")


def test_thinned_deployment_builds_only_the_allowed_mixers(spec):
    serving = ServingPlacements(spec, PRESETS, allowed=["fast", "quality"])
    assert serving.layer_mixers == [["fa", "gdn"], ["fa", "kda"], ["attention"]]
    assert serving.resolve(None).mixers == ("gdn", "kda", "attention")  # the presets' default
    assert serving.resolve("quality").mixers == ("fa", "fa", "attention")
    with pytest.raises(PlacementError, match="not served by this deployment.*allowed: gdn,kda,attention"):
        serving.resolve(["kda", "kda"])
    assert serving.is_thinned_out("model.decoder.blocks.0.mixer.mixers.kda.q_proj.weight")
    assert not serving.is_thinned_out("model.decoder.blocks.0.mixer.mixers.gdn.A_log")
    assert not serving.is_thinned_out("model.decoder.blocks.2.mixer.q_proj.weight")
    assert not serving.is_thinned_out("model.embed_tokens.weight")


def test_default_outside_the_allowed_set_falls_back_to_the_first_allowed(spec):
    serving = ServingPlacements(spec, PRESETS, allowed=["swa*", "quality"])
    assert serving.default.mixers == ("swa", "swa", "attention")


def test_bad_allowed_entry_names_the_option(spec):
    with pytest.raises(PlacementError, match="supernet_placements.*'nope'"):
        ServingPlacements(spec, PRESETS, allowed=["nope"])


def test_invalid_request_values_name_the_problem(spec):
    serving = ServingPlacements(spec, PRESETS)
    with pytest.raises(PlacementError, match="layer 1: 'bogus' is not a mixer of this layer; valid choices"):
        serving.resolve(["fa", "bogus"])
    with pytest.raises(PlacementError, match="5 entries"):
        serving.resolve(["fa"] * 5)
    with pytest.raises(PlacementError, match="got int"):
        serving.resolve(7)


def test_preset_listing(spec):
    listing = ServingPlacements(spec, PRESETS, allowed=["fast"]).preset_listing()
    assert list(listing["presets"]) == ["fast"]  # "quality" is not served
    assert listing["presets"]["fast"]["hash"] == Placement.parse("fast", spec, PRESETS).hash
    assert listing["allowed"] == ["gdn,kda,attention"]
    json.dumps(listing)


# ---- a step's requests per mixer ------------------------------------------------------------------


def test_a_string_is_parsed_once_then_looked_up(spec):
    serving = ServingPlacements(spec, PRESETS)
    first = serving.resolve("gdn,kda,attention")
    assert serving.resolve("gdn,kda,attention") is first  # the canonical string workers get each step
    assert serving.resolve("fast") == first


def rated_presets() -> PresetsFile:
    return PresetsFile.model_validate({"presets": {
        "fast": {"placement": "gdn,kda", "metrics": {"quality": 0.8, "speedup": 3.0}},
        "quality": {"placement": "fa*", "metrics": {"quality": 1.0, "speedup": 1.0}},
        "local": {"placement": "swa*", "metrics": {"quality": 0.95, "speedup": 1.8}},
        "unrated": {"placement": "kda*"},
    }})


@pytest.mark.parametrize(
    ("fields", "preset"),
    [
        ({"min_quality": 0.9}, "local"),
        ({"min_quality": 0.5}, "fast"),
        ({"min_quality": 1.0}, "quality"),
        ({"min_speedup": 1.5}, "local"),
        ({"min_speedup": 2.5}, "fast"),
        ({"min_quality": 0.9, "min_speedup": 1.0}, "local"),
    ],
)
def test_service_level_chooses_among_served_rated_presets(spec, fields, preset):
    serving = ServingPlacements(spec, rated_presets())
    placement, chosen = serving.resolve_request(fields)
    assert chosen == preset and placement == serving.resolve(preset)
    thinned = ServingPlacements(spec, rated_presets(), allowed=["quality", "fast"])
    if preset == "local" and "min_quality" in fields:  # not served there: the next qualifying one
        assert thinned.resolve_request(fields)[1] == "quality"


def test_service_level_errors_name_the_best_available(spec):
    serving = ServingPlacements(spec, rated_presets())
    with pytest.raises(PlacementError, match=r"no served preset meets min_quality 0.99 and min_speedup 2.0; "
                                             r"best quality available: 'quality' .*fastest: 'fast'"):
        serving.resolve_request({"min_quality": 0.99, "min_speedup": 2.0})
    with pytest.raises(PlacementError, match="either `placement` or a service level"):
        serving.resolve_request({"placement": "fast", "min_quality": 0.5})
    with pytest.raises(PlacementError, match="min_quality"):
        serving.resolve_request({"min_quality": "high"})
    with pytest.raises(PlacementError, match="serves no presets"):
        ServingPlacements(spec).resolve_request({"min_quality": 0.5})
    assert serving.resolve_request({"placement": "fast"}) == (serving.resolve("fast"), None)
