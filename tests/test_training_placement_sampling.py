"""Mixer sampling: distributions, determinism per step, predefined placements, validation."""

from collections import Counter
from math import comb

import pytest
from pydantic import ValidationError

from fast_llm_supernet.training.placement_sampling import MixerSampler, SamplingConfig, sample_composition
from shared_spec import LayerChoices, MixerKind, Placement, PlacementError, Preset, PresetsFile, SupernetSpec

KINDS = {
    "attention": MixerKind.ATTENTION,
    "sliding_window": MixerKind.SLIDING_WINDOW,
    "gdn": MixerKind.GDN,
    "kda": MixerKind.KDA,
}


def make_spec(num_choice_layers: int = 4, fixed_last: bool = True) -> SupernetSpec:
    layers = [LayerChoices(mixers=KINDS, default="attention") for _ in range(num_choice_layers)]
    if fixed_last:
        layers.append(LayerChoices(mixers={"attention": MixerKind.ATTENTION}, default="attention", fixed=True))
    return SupernetSpec(layers=tuple(layers))


def test_same_step_same_placement_across_instances():
    spec = make_spec()
    a = MixerSampler(spec, SamplingConfig(seed=3))
    b = MixerSampler(spec, SamplingConfig(seed=3))  # another "rank" or a resumed run
    assert [a.sample(step) for step in range(50)] == [b.sample(step) for step in range(50)]
    assert isinstance(a.sample(0), Placement)
    # Another seed gives another sequence; steps differ from each other.
    c = MixerSampler(spec, SamplingConfig(seed=4))
    assert [a.sample(s) for s in range(50)] != [c.sample(s) for s in range(50)]
    assert len({a.sample(s).canonical for s in range(50)}) > 10


def test_only_choice_layers_are_sampled():
    spec = make_spec()
    sampler = MixerSampler(spec)
    for step in range(200):
        placement = sampler.sample(step)
        assert placement.mixers[-1] == "attention"
        Placement.from_names(placement.mixers, spec)  # valid


def test_uniform_marginals():
    spec = make_spec()
    sampler = MixerSampler(spec)
    steps = 4000
    counts = [Counter() for _ in range(4)]
    for step in range(steps):
        for layer, name in enumerate(sampler.sample(step).mixers[:4]):
            counts[layer][name] += 1
    for layer_counts in counts:
        for name in KINDS:
            assert abs(layer_counts[name] / steps - 0.25) < 0.035


def test_weighted_marginals_and_zero_weight():
    spec = make_spec()
    config = SamplingConfig(strategy="weighted", weights={"attention": 0, "sliding_window": 1, "gdn": 1, "kda": 2})
    sampler = MixerSampler(spec, config)
    steps = 4000
    counts = Counter(name for step in range(steps) for name in sampler.sample(step).mixers[:4])
    total = steps * 4
    assert counts["attention"] == 0
    assert abs(counts["kda"] / total - 0.5) < 0.03
    assert abs(counts["gdn"] / total - 0.25) < 0.03
    assert sampler.probability_of_layer_mixer()[0] == pytest.approx(
        {"attention": 0, "sliding_window": 0.25, "gdn": 0.25, "kda": 0.5}
    )


def test_weighted_needs_every_mixer_and_known_names():
    spec = make_spec()
    with pytest.raises(PlacementError, match="miss mixers"):
        MixerSampler(spec, SamplingConfig(strategy="weighted", weights={"gdn": 1.0}))
    with pytest.raises(PlacementError, match="unknown mixers.*mamba"):
        MixerSampler(spec, SamplingConfig(strategy="weighted", weights={**dict.fromkeys(KINDS, 1.0), "mamba": 1.0}))
    with pytest.raises(ValidationError, match="needs `weights`"):
        SamplingConfig(strategy="weighted")


def test_composition_is_uniform_over_compositions():
    import random

    rng = random.Random(0)
    num_layers, num_mixers = 4, 3
    draws = Counter(tuple(sample_composition(num_layers, num_mixers, rng)) for _ in range(15000))
    expected = comb(num_layers + num_mixers - 1, num_mixers - 1)  # 15 compositions
    assert len(draws) == expected
    assert all(sum(c) == num_layers for c in draws)
    for count in draws.values():
        assert abs(count / 15000 - 1 / expected) < 0.015


def test_full_layout_counts_uniform_and_arrangement_shuffled():
    spec = make_spec(num_choice_layers=3)
    sampler = MixerSampler(spec, SamplingConfig(strategy="full_layout"))
    steps = 6000
    compositions = Counter()
    positions = Counter()
    for step in range(steps):
        mixers = sampler.sample(step).mixers[:3]
        compositions[tuple(mixers.count(name) for name in KINDS)] += 1
        positions[mixers[0]] += 1
    # C(3 + 4 - 1, 3) = 20 compositions of 3 layers into 4 mixers, each equally likely.
    assert len(compositions) == 20
    for count in compositions.values():
        assert abs(count / steps - 1 / 20) < 0.015
    # Uniform placements (all-GDN, ...) come up 1/20 each: far more than uniform sampling's 1/64.
    assert abs(compositions[(0, 0, 3, 0)] / steps - 1 / 20) < 0.015
    for name in KINDS:
        assert abs(positions[name] / steps - 0.25) < 0.03


def test_full_layout_needs_same_mixers_everywhere():
    layers = (
        LayerChoices(mixers=KINDS, default="attention"),
        LayerChoices(mixers={"attention": MixerKind.ATTENTION, "gdn": MixerKind.GDN}, default="attention"),
    )
    with pytest.raises(PlacementError, match="same mixers"):
        MixerSampler(SupernetSpec(layers=layers), SamplingConfig(strategy="full_layout"))


def test_predefined_placements_and_remainder():
    spec = make_spec()
    presets = PresetsFile(presets={"fast": Preset(placement="gdn*")})
    config = SamplingConfig(predefined=["fast", "attention,kda*3"], predefined_probabilities=[0.3, 0.2])
    sampler = MixerSampler(spec, config, presets)
    steps = 5000
    draws = Counter(sampler.sample(step).canonical for step in range(steps))
    assert abs(draws["gdn*4,attention"] / steps - (0.3 + 0.7 / 256)) < 0.03
    assert abs(draws["attention,kda*3,attention"] / steps - 0.2) < 0.03
    assert len(draws) > 50  # the remaining half is uniform
    marginals = sampler.probability_of_layer_mixer()
    assert marginals[0]["gdn"] == pytest.approx(0.3 + 0.5 * 0.25)
    assert sum(marginals[1].values()) == pytest.approx(1.0)


def test_bad_sampling_configs_name_the_field():
    with pytest.raises(ValidationError, match="predefined_probabilities"):
        SamplingConfig(predefined=["gdn*"], predefined_probabilities=[])
    with pytest.raises(ValidationError, match="sum to"):
        SamplingConfig(predefined=["gdn*", "kda*"], predefined_probabilities=[0.6, 0.6])
    with pytest.raises(ValidationError, match="strategy"):
        SamplingConfig(strategy="random")
    with pytest.raises(ValidationError, match="extra"):
        SamplingConfig(sead=1)
    with pytest.raises(PlacementError, match="layer 0"):
        MixerSampler(make_spec(), SamplingConfig(predefined=["mamba*"], predefined_probabilities=[0.5]))
