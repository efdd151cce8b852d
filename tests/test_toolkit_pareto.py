"""`toolkit.pareto_front`: the exact DP frontier equals brute force, and handles the paper's 48 layers in seconds."""

import time

import numpy as np
import pytest

from fast_llm_supernet.toolkit import pareto_front
from fast_llm_supernet.toolkit.pareto import brute_force_front, placement_terms


def random_instance(rng, num_layers, num_mixers, distances, integer_costs):
    single = rng.normal(size=(num_layers, num_mixers))
    pairs = {d: rng.normal(scale=0.3, size=(num_layers - d, num_mixers, num_mixers)) for d in distances}
    if integer_costs:  # many placements share a cost: ties must collapse to the best loss
        cost = rng.integers(0, 4, size=(num_layers, num_mixers)).astype(float)
    else:
        cost = rng.uniform(0.1, 1.0, size=(num_layers, num_mixers))
    return single, pairs, cost


def assert_same_front(front, reference):
    assert len(front) == len(reference)
    for (cost, loss, _placement), (ref_cost, ref_loss, _) in zip(front, reference, strict=True):
        assert cost == pytest.approx(ref_cost, rel=1e-9, abs=1e-12)
        assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_pareto_front_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_layers = int(rng.integers(1, 8))
    num_mixers = int(rng.integers(2, 4)) if num_layers > 5 else int(rng.integers(1, 5))
    distances = [d for d in (1, 2, 3) if rng.random() < 0.7 and d < max(num_layers, 2)]
    single, pairs, cost = random_instance(rng, num_layers, num_mixers, distances, integer_costs=seed % 2 == 0)
    front = pareto_front(single, pairs, cost)
    assert_same_front(front, brute_force_front(single, pairs, cost))
    costs = [c for c, _, _ in front]
    losses = [loss for _, loss, _ in front]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))  # strictly better loss for more cost
    for point_cost, point_loss, placement in front:  # each placement really has its point
        assert len(placement) == num_layers and all(0 <= m < num_mixers for m in placement)
        assert placement_terms(placement, single, pairs, cost) == pytest.approx((point_cost, point_loss), rel=1e-9)


def test_pareto_front_without_pairs_and_with_ties():
    single = np.array([[0.0, 1.0], [0.0, 1.0]])
    cost = np.array([[2.0, 1.0], [2.0, 1.0]])  # two placements cost 3 with the same loss: one point
    front = pareto_front(single, {}, cost)
    assert [(c, loss) for c, loss, _ in front] == [(2.0, 2.0), (3.0, 1.0), (4.0, 0.0)]
    assert front[2][2] == [0, 0]


def test_pareto_front_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"pairs\[1\] must have shape"):
        pareto_front(np.zeros((3, 2)), {1: np.zeros((3, 2, 2))}, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="cost must have"):
        pareto_front(np.zeros((3, 2)), {}, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        pareto_front(np.full((3, 2), np.nan), {}, np.zeros((3, 2)))


def test_pareto_front_48_layers_in_seconds():
    rng = np.random.default_rng(0)
    single, pairs, cost = random_instance(rng, 48, 4, (1, 2, 3), integer_costs=False)
    start = time.perf_counter()
    front = pareto_front(single, pairs, cost)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"{elapsed:.1f} s"
    assert len(front) > 10
    for point_cost, point_loss, placement in front[:: max(1, len(front) // 20)]:
        assert placement_terms(placement, single, pairs, cost) == pytest.approx((point_cost, point_loss), rel=1e-9)
    print(f"L=48, M=4, d=3: {len(front)} frontier points in {elapsed:.2f} s")
