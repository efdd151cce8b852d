"""The surrogate: a ridge cluster expansion recovers a known one, picks pair terms when they matter, and its terms
are what `pareto_front` searches."""

import numpy as np
import pytest

from fast_llm_supernet.toolkit import pareto_front
from fast_llm_supernet.toolkit.evaluate import PlacementQuality
from fast_llm_supernet.toolkit.surrogate import Surrogate, fit_surrogate, placement_indices
from shared_spec import Apriel2TextConfig, Placement, SupernetSpec
from tests.test_training_trainer import TINY_SUPERNET

LAYERS = 8


@pytest.fixture(scope="module")
def spec():
    config = {**TINY_SUPERNET, "decoder": {**TINY_SUPERNET["decoder"], "num_blocks": LAYERS}}
    return SupernetSpec.from_config(Apriel2TextConfig.model_validate(config))


def synthetic_records(spec, count, pair_strength, seed=0):
    """Placements whose loss is a known cluster expansion with nearest-neighbour terms, plus a little noise."""
    rng = np.random.default_rng(seed)
    names = list(spec.layers[0].mixers)
    single = rng.uniform(0, 0.05, size=(LAYERS, 4))
    single[:, names.index("attention")] = 0
    pairs = rng.uniform(0, pair_strength, size=(LAYERS - 1, 4, 4))
    records = []
    for _ in range(count):
        indices = rng.integers(0, 4, size=LAYERS)
        loss = single[np.arange(LAYERS), indices].sum() + pairs[np.arange(LAYERS - 1), indices[:-1], indices[1:]].sum()
        loss += rng.normal(scale=0.002)
        placement = Placement.parse([names[i] for i in indices], spec)
        records.append(PlacementQuality(placement=placement.canonical, hash=placement.hash, top1=1 - loss, top1_se=0,
                                        kl=loss, kl_se=0, ppl=1, tokens=2048, attention_layers=0))
    return records


def test_fit_recovers_pair_terms_and_beats_per_layer_only(spec, tmp_path):
    records = synthetic_records(spec, 300, pair_strength=0.04)
    surrogate, report = fit_surrogate(records, spec, seed=0)
    assert surrogate.distance >= 1
    assert report["held_out"] == 60 and report["train"] == 240
    assert report["held_out_metrics"]["spearman"] > 0.95
    assert report["held_out_metrics"]["spearman"] > report["per_layer_only_held_out_metrics"]["spearman"]
    assert [point["train_placements"] for point in report["learning_curve"]] == [60, 120, 180, 240]
    surrogate.save(tmp_path / "s.json")
    loaded = Surrogate.load(tmp_path / "s.json")
    indices = placement_indices(records, loaded.mixers, spec)
    np.testing.assert_allclose(loaded.predict_loss(indices), surrogate.predict_loss(indices))
    # The terms are pareto_front's: its predicted loss of each frontier placement is the surrogate's.
    single, pairs = loaded.arrays()
    cost = np.tile(np.array([4.0, 2.0, 1.0, 1.5]), (LAYERS, 1))
    for _point_cost, point_loss, placement in pareto_front(single, pairs, cost):
        assert loaded.predict_loss(np.array([placement]))[0] == pytest.approx(point_loss, abs=1e-9)


def test_fit_without_interactions_keeps_it_simple(spec):
    records = synthetic_records(spec, 120, pair_strength=0.0)
    surrogate, report = fit_surrogate(records, spec, seed=1)
    assert report["held_out_metrics"]["spearman"] > 0.9
    with pytest.raises(ValueError, match="at least 10"):
        fit_surrogate(records[:5], spec)
