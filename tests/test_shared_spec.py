"""shared_spec: config round trips, placement parsing/validation, presets, request schema."""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_spec import (
    Apriel2TextConfig,
    MixerKind,
    Placement,
    PlacementError,
    PlacementRequest,
    Preset,
    PresetsFile,
    SupernetSpec,
    format_compact,
    parse_compact,
    placement_request_json_schema,
    uniform_placement,
)

FIXTURE = Path(__file__).parent / "data" / "apriel2_upstream_small" / "checkpoint"
if not FIXTURE.exists():  # before the fixture is copied into tests/data
    FIXTURE = Path(__file__).parents[2] / "shared" / "fixtures" / "apriel2_upstream_small" / "checkpoint"

ATTENTION = {
    "type": "attention",
    "heads": 4,
    "head_groups": 2,
    "head_size": 8,
    "rotary": {"type": "mistral_1d", "theta": 10000.0},
}
MIXERS = {
    "attention": ATTENTION,
    "sliding_window": {**ATTENTION, "window_size": 16},
    "gdn": {"type": "gdn", "value_heads": 4, "key_heads": 2, "key_head_dim": 8, "value_head_dim": 8},
    "kda": {"type": "kda", "heads": 4, "head_dim": 8},
}


def supernet_config(num_layers: int = 4, mixers: dict | None = None) -> Apriel2TextConfig:
    mixers = mixers or MIXERS
    block = {
        "mixer": {"type": "stochastic", "main_mixer_name": next(iter(mixers)), "mixers": mixers},
        "mlp": {"type": "mlp", "intermediate_size": 64},
        "normalization": {"type": "rms_norm", "epsilon": 1e-5},
    }
    return Apriel2TextConfig.model_validate(
        {
            "hidden_size": 32,
            "vocab_size": 100,
            "decoder": {"type": "fixed", "num_blocks": num_layers, "block": block},
        }
    )


def fixture_spec() -> SupernetSpec:
    return SupernetSpec.from_config(Apriel2TextConfig.from_file(FIXTURE))


# --- config -----------------------------------------------------------------------------------


def test_upstream_config_round_trips_unchanged():
    original = json.loads((FIXTURE / "config.json").read_text())
    assert Apriel2TextConfig.model_validate(original).to_json_dict() == original


def test_unknown_keys_are_kept():
    data = supernet_config().to_json_dict()
    data["some_future_key"] = {"a": 1}
    data["decoder"]["block"]["mixer"]["mixers"]["gdn"]["future_option"] = 3
    assert Apriel2TextConfig.model_validate(data).to_json_dict() == data


def test_config_written_then_read(tmp_path):
    config = supernet_config()
    config.save(tmp_path)
    assert Apriel2TextConfig.from_file(tmp_path) == config
    assert (
        json.loads((tmp_path / "config.json").read_text())["decoder"]["block"]["mixer"]["type"]
        == "stochastic"
    )


def test_bad_config_names_the_problem():
    data = supernet_config().to_json_dict()
    data["decoder"]["block"]["mixer"]["main_mixer_name"] = "mamba"
    with pytest.raises(ValueError, match="main_mixer_name 'mamba' is not one of the mixers"):
        Apriel2TextConfig.model_validate(data)
    data = supernet_config().to_json_dict()
    data["decoder"]["block"]["mixer"]["mixers"]["attention"]["heads"] = 5
    with pytest.raises(ValueError, match="multiple of head_groups"):
        Apriel2TextConfig.model_validate(data)


def test_pattern_decoder_spec_from_fixture():
    spec = fixture_spec()
    assert spec.num_layers == 3
    assert spec.choice_layers == [0, 1]
    assert spec.layers[0].mixers == {
        "fa": MixerKind.ATTENTION,
        "swa": MixerKind.SLIDING_WINDOW,
        "gdn": MixerKind.GDN,
        "kda": MixerKind.KDA,
    }
    assert spec.layers[2].fixed and spec.layers[2].mixers == {"attention": MixerKind.ATTENTION}
    assert spec.default_names == ("swa", "swa", "attention")


# --- placements -------------------------------------------------------------------------------


def test_placement_spellings_agree():
    spec = SupernetSpec.from_config(supernet_config())
    expected = ("attention", "gdn", "gdn", "kda")
    for value in (list(expected), "attention,gdn*2,kda", " attention , gdn * 2 ,kda", "attention,gdn*,kda"):
        assert Placement.parse(value, spec).mixers == expected
    assert Placement.parse("kda*", spec).mixers == ("kda",) * 4
    assert Placement.parse(None, spec).mixers == ("attention",) * 4
    placement = Placement.parse(expected, spec)
    assert placement.canonical == "attention,gdn*2,kda"
    assert len(placement.hash) == 12 and placement.hash == Placement.parse("attention,gdn,gdn,kda", spec).hash


def test_choice_layers_only_on_pattern_decoder():
    spec = fixture_spec()
    assert Placement.parse(["gdn", "kda"], spec).mixers == ("gdn", "kda", "attention")
    assert Placement.parse("gdn*", spec).mixers == ("gdn", "gdn", "attention")
    assert Placement.parse("fa,swa,attention", spec).mixers == ("fa", "swa", "attention")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            ["attention", "gdn", "mamba", "kda"],
            r"layer 2: 'mamba' is not a mixer of this layer; valid choices: attention, gdn, kda, sliding_window",
        ),
        (["attention"] * 3, "placement has 3 entries; this checkpoint has 4 layers"),
        ("gdn*5", "placement has 5 entries"),
        ("gdn*0,kda*4", "count must be at least 1"),
        ("gdn*,kda*", "at most one is allowed"),
        ("gdn,,kda", "bad run ''"),
        ("gdn*x", "bad run 'gdn\\*x'"),
        ("", "empty placement"),
        ("fast", "'fast' is neither a preset"),
        (42, "got int"),
        ([1, 2, 3, 4], "got list"),
    ],
)
def test_bad_placements_are_rejected_with_a_clear_message(value, message):
    spec = SupernetSpec.from_config(supernet_config())
    with pytest.raises(PlacementError, match=message):
        Placement.parse(value, spec)


def test_uniform_placement():
    spec = fixture_spec()
    assert uniform_placement(spec, MixerKind.GDN).mixers == ("gdn", "gdn", "attention")
    spec = SupernetSpec.from_config(supernet_config(mixers={"attention": ATTENTION}))
    with pytest.raises(PlacementError, match="layer 0 has no gdn mixer"):
        uniform_placement(spec, MixerKind.GDN)


NAMES = st.sampled_from(sorted(MIXERS))


@settings(max_examples=200, deadline=None)
@given(st.lists(NAMES, min_size=1, max_size=12))
def test_every_valid_placement_round_trips(names):
    spec = SupernetSpec.from_config(supernet_config(num_layers=len(names)))
    placement = Placement.parse(names, spec)
    assert placement.mixers == tuple(names)
    assert parse_compact(placement.canonical) == names
    assert Placement.parse(placement.canonical, spec) == placement
    assert Placement.parse(placement, spec) == placement
    # The canonical string is canonical: formatting it again changes nothing.
    assert format_compact(parse_compact(placement.canonical)) == placement.canonical
    assert Placement.parse(placement.canonical, spec).hash == placement.hash


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ak*,0123 \t-x")), max_size=20), st.integers(1, 6))
def test_malformed_strings_raise_placement_error_only(text, num_layers):
    spec = SupernetSpec.from_config(
        supernet_config(num_layers=num_layers, mixers={"a": ATTENTION, "k": MIXERS["kda"]})
    )
    try:
        placement = Placement.parse(text, spec)
    except PlacementError:
        return
    assert len(placement.mixers) == num_layers and set(placement.mixers) <= {"a", "k"}


# --- presets and request schema ---------------------------------------------------------------


def test_presets_file_round_trip_and_lookup(tmp_path):
    spec = SupernetSpec.from_config(supernet_config())
    presets = PresetsFile(
        default="balanced",
        presets={
            "balanced": Preset(
                placement="attention*2,gdn*2", description="half attention", metrics={"speedup": 1.7}
            ),
            "fastest": Preset(placement=["gdn", "gdn", "kda", "kda"]),
        },
    )
    presets.validate_against(spec)
    presets.save(tmp_path)
    loaded = PresetsFile.load(tmp_path)
    assert loaded == presets
    assert Placement.parse("fastest", spec, loaded).mixers == ("gdn", "gdn", "kda", "kda")
    assert Placement.parse(None, spec, loaded).canonical == "attention*2,gdn*2"
    with pytest.raises(PlacementError, match=r"'fasest' is neither a preset \(presets: balanced, fastest\)"):
        Placement.parse("fasest", spec, loaded)
    assert PresetsFile.load(tmp_path / "missing") is None


def test_presets_that_do_not_fit_are_rejected():
    spec = SupernetSpec.from_config(supernet_config())
    with pytest.raises(PlacementError, match="preset 'bad': layer 1"):
        PresetsFile(presets={"bad": Preset(placement="gdn,mamba,gdn,gdn")}).validate_against(spec)
    with pytest.raises(ValueError, match="preset name"):
        PresetsFile(presets={"a,b": Preset(placement="gdn*")})


def test_request_schema():
    schema = placement_request_json_schema()
    placement = schema["properties"]["placement"]
    kinds = {branch.get("type") for branch in placement["anyOf"]}
    assert {"string", "array", "null"} <= kinds
    assert PlacementRequest.model_validate({"placement": "gdn*", "other": 1}).placement == "gdn*"


def test_shared_spec_does_not_import_torch():
    import subprocess

    code = "import sys, shared_spec; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
