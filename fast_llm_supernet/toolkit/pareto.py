"""`fast_llm_supernet.toolkit.pareto`: the exact quality/cost Pareto frontier of a short-range surrogate.

A surrogate (`toolkit.surrogate`) predicts a placement's loss as a sum of per-layer terms and pair terms
between layers at most `d` apart (a cluster expansion); a decode cost model (`toolkit.cost`) adds a cost per
layer and mixer. Because the pair terms are short-range, every placement's loss and cost are sums along a
chain whose state is the last `d` mixers, and the frontier over all M^L placements is found exactly by
dynamic programming over the layers: for each state, the set of (cost, loss) pairs no other prefix with the
same state dominates. A dominated prefix can never become part of a frontier point, since every
continuation adds the same terms to both. Work: L x M^(d+1) x (frontier size), seconds for L = 48, M = 4,
d = 3.

`brute_force_front` enumerates every placement: the reference the DP is tested against on small L.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Frontier points whose costs differ by less than this (relative) are one point: sums of the same terms in
# another order may differ in the last bits, which must not turn one point into two.
RELATIVE_TOLERANCE = 1e-12

FrontPoint = tuple[float, float, list[int]]


@dataclass
class _StateFront:
    """Non-dominated prefixes ending in one state: their cost, loss and where each came from."""

    cost: np.ndarray  # [n]
    loss: np.ndarray  # [n]
    parent_state: np.ndarray  # [n] index of the previous layer's state (-1 at layer 0)
    parent_index: np.ndarray  # [n] index within that state's front
    mixer: int  # the mixer this layer has in this state


def _non_dominated(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no other point dominates (lower or equal cost and loss, one of them lower), sorted
    by cost; of identical points one is kept."""
    order = np.lexsort((loss, cost))
    sorted_loss = loss[order]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], sorted_loss[:-1])))
    return order[sorted_loss < best_before]


def _check_inputs(single, pairs, cost) -> tuple[np.ndarray, dict[int, np.ndarray], np.ndarray]:
    single = np.asarray(single, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if single.ndim != 2 or single.shape[0] < 1 or single.shape[1] < 1:
        raise ValueError(f"single must be an [L, M] array with L, M >= 1, got shape {single.shape}")
    if cost.shape != single.shape:
        raise ValueError(f"cost must have single's shape {single.shape}, got {cost.shape}")
    num_layers, num_mixers = single.shape
    checked = {}
    for distance, terms in (pairs or {}).items():
        if not isinstance(distance, int | np.integer) or distance < 1:
            raise ValueError(f"pairs keys are layer distances >= 1, got {distance!r}")
        terms = np.asarray(terms, dtype=np.float64)
        expected = (max(num_layers - distance, 0), num_mixers, num_mixers)
        if terms.shape != expected:
            raise ValueError(f"pairs[{distance}] must have shape [L - {distance}, M, M] = {expected}, got {terms.shape}")
        if expected[0]:
            checked[int(distance)] = terms
    for name, array in (("single", single), ("cost", cost), *((f"pairs[{d}]", t) for d, t in checked.items())):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds non-finite values")
    return single, checked, cost


def pareto_front(single, pairs, cost) -> list[FrontPoint]:
    """Every non-dominated (cost, predicted loss) point over all placements, with one placement for each.

    single: [L, M] per-layer loss terms; pairs: {distance: [L - distance, M, M]}, entry [l, a, b] applying
    when layer l has mixer a and layer l + distance has mixer b; cost: [L, M] additive costs. Lower loss and
    lower cost are better. Returns [(cost, loss, mixer index per layer)] sorted by cost (loss falls along it).
    """
    single, pairs, cost = _check_inputs(single, pairs, cost)
    num_layers, num_mixers = single.shape
    memory = max(pairs, default=0)  # the state: the last `memory` mixers
    layers: list[tuple[list[tuple[int, ...]], list[_StateFront]]] = []

    states = [(m,)[-memory:] if memory else () for m in range(num_mixers)]
    fronts: dict[tuple[int, ...], list] = {}
    for m in range(num_mixers):
        fronts.setdefault(states[m], []).append((np.array([cost[0, m]]), np.array([single[0, m]]), np.array([-1]),
                                                 np.array([0]), m))
    for layer in range(num_layers):
        if layer > 0:
            previous_states, previous_fronts = layers[-1]
            fronts = {}
            for state_index, (state, front) in enumerate(zip(previous_states, previous_fronts, strict=True)):
                for b in range(num_mixers):
                    # The terms layer `layer` adds with mixer b, given the last mixers in `state`.
                    added_loss = single[layer, b] + sum(
                        terms[layer - d, state[-d], b] for d, terms in pairs.items() if d <= layer
                    )
                    new_state = (state + (b,))[-memory:] if memory else ()
                    fronts.setdefault(new_state, []).append((
                        front.cost + cost[layer, b], front.loss + added_loss,
                        np.full(len(front.cost), state_index), np.arange(len(front.cost)), b,
                    ))
        kept_states, kept_fronts = [], []
        for state, candidates in fronts.items():
            # Prefixes ending in one state share their last mixer (memory >= 1) or no state at all.
            for mixer in sorted({c[4] for c in candidates}):
                parts = [c for c in candidates if c[4] == mixer]
                all_cost = np.concatenate([p[0] for p in parts])
                all_loss = np.concatenate([p[1] for p in parts])
                keep = _non_dominated(all_cost, all_loss)
                kept_states.append(state)
                kept_fronts.append(_StateFront(
                    all_cost[keep], all_loss[keep],
                    np.concatenate([p[2] for p in parts])[keep], np.concatenate([p[3] for p in parts])[keep], mixer,
                ))
        layers.append((kept_states, kept_fronts))

    final_fronts = layers[-1][1]
    all_cost = np.concatenate([f.cost for f in final_fronts])
    all_loss = np.concatenate([f.loss for f in final_fronts])
    owner = np.concatenate([np.full(len(f.cost), i) for i, f in enumerate(final_fronts)])
    position = np.concatenate([np.arange(len(f.cost)) for f in final_fronts])
    points = []
    for index in _merge_equal_costs(all_cost, all_loss, _non_dominated(all_cost, all_loss)):
        placement = [0] * num_layers
        state_index, point_index = int(owner[index]), int(position[index])
        for layer in range(num_layers - 1, -1, -1):
            front = layers[layer][1][state_index]
            placement[layer] = front.mixer
            state_index, point_index = int(front.parent_state[point_index]), int(front.parent_index[point_index])
        points.append((float(all_cost[index]), float(all_loss[index]), placement))
    return points


def _merge_equal_costs(cost: np.ndarray, loss: np.ndarray, front: np.ndarray) -> list[int]:
    """The front (sorted by cost) with points whose costs agree to RELATIVE_TOLERANCE merged into the lowest-loss one."""
    merged: list[int] = []
    for index in front:
        if merged and abs(cost[index] - cost[merged[-1]]) <= RELATIVE_TOLERANCE * max(1.0, abs(cost[index])):
            if loss[index] < loss[merged[-1]]:
                merged[-1] = int(index)
            continue
        merged.append(int(index))
    return merged


def placement_terms(placement, single, pairs, cost) -> tuple[float, float]:
    """(cost, predicted loss) of one placement: the sums `pareto_front` optimises."""
    single, pairs, cost = _check_inputs(single, pairs, cost)
    layers = range(len(placement))
    total_cost = sum(cost[layer, placement[layer]] for layer in layers)
    loss = sum(single[layer, placement[layer]] for layer in layers)
    loss += sum(
        terms[layer, placement[layer], placement[layer + d]] for d, terms in pairs.items() for layer in range(len(terms))
    )
    return float(total_cost), float(loss)


def brute_force_front(single, pairs, cost) -> list[FrontPoint]:
    """`pareto_front` by enumerating all M^L placements (small L only): the reference of the DP."""
    single, pairs, cost = _check_inputs(single, pairs, cost)
    num_layers, num_mixers = single.shape
    placements = list(itertools.product(range(num_mixers), repeat=num_layers))
    terms = np.array([placement_terms(p, single, pairs, cost) for p in placements])
    front = _merge_equal_costs(terms[:, 0], terms[:, 1], _non_dominated(terms[:, 0], terms[:, 1]))
    return [(float(terms[i, 0]), float(terms[i, 1]), list(placements[i])) for i in front]
