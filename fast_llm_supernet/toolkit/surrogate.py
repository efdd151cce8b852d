"""`fast_llm_supernet.toolkit.surrogate`: predict a placement's quality from per-layer and short-range pair terms.

The cluster expansion of the Super Apriel paper: loss(placement) = sum over layers l of single[l, m_l] + sum over
distances d <= D and layers l of pairs[d][l, m_l, m_{l+d}], with loss = 1 - top-1 agreement with the teacher
(so all-attention is 0). The terms are a ridge regression on one-hot features; D (0 = per-layer terms only, up to
3) and the ridge strength are chosen by cross-validation on the training placements. Fitted terms are exactly the
`single` / `pairs` arrays `pareto_front` searches (the intercept folded into layer 0), saved as a small JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from fast_llm_supernet.toolkit.evaluate import PlacementQuality
from shared_spec import SupernetSpec

ALPHAS = tuple(10.0**k for k in range(-4, 3))


class Surrogate(BaseModel):
    """A fitted cluster expansion; `predict_loss` and `pareto_front` read the same terms."""

    mixers: list[str]  # mixer index -> name (the same in every layer)
    num_layers: int
    distance: int  # D: pair terms for layers up to D apart (0: per-layer terms only)
    alpha: float
    single: list[list[float]]  # [L, M]
    pairs: dict[int, list[list[list[float]]]]  # {d: [L - d, M, M]}
    metrics: dict[str, float] = {}

    def arrays(self) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        return np.array(self.single), {d: np.array(t) for d, t in self.pairs.items()}

    def predict_loss(self, indices: np.ndarray) -> np.ndarray:
        """indices [N, L] mixer indices -> predicted loss [N]."""
        single, pairs = self.arrays()
        rows = np.arange(self.num_layers)
        loss = single[rows, indices].sum(-1)
        for d, terms in pairs.items():
            loss += terms[rows[:-d], indices[:, :-d], indices[:, d:]].sum(-1)
        return loss

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Surrogate:
        return cls.model_validate(json.loads(path.read_text()))


def mixer_names(spec: SupernetSpec) -> list[str]:
    """The mixer names every layer offers, in the checkpoint's order; the toolkit needs the same set everywhere."""
    names = list(spec.layers[0].mixers)
    for index, layer in enumerate(spec.layers):
        if list(layer.mixers) != names:
            raise ValueError(
                f"layer {index} offers {list(layer.mixers)}, layer 0 offers {names}: the placement toolkit needs "
                "every layer to offer the same mixers"
            )
    return names


def placement_indices(records: list[PlacementQuality], names: list[str], spec: SupernetSpec) -> np.ndarray:
    """[N, L] mixer indices of evaluated placements."""
    from shared_spec import Placement

    index = {name: i for i, name in enumerate(names)}
    return np.array([[index[m] for m in Placement.parse(r.placement, spec).mixers] for r in records], dtype=np.int64)


def features(indices: np.ndarray, num_mixers: int, distance: int) -> np.ndarray:
    """One-hot columns: (layer, mixer), then for each d <= distance (layer, mixer at l, mixer at l + d)."""
    n, num_layers = indices.shape
    blocks = [np.eye(num_mixers)[indices].reshape(n, num_layers * num_mixers)]
    for d in range(1, distance + 1):
        pair_index = indices[:, :-d] * num_mixers + indices[:, d:]  # [N, L - d]
        blocks.append(np.eye(num_mixers * num_mixers)[pair_index].reshape(n, -1))
    return np.concatenate(blocks, axis=1)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=alpha).fit(x, y)


def _cv_score(indices, y, num_mixers, distance, alpha, folds: int, seed: int) -> float:
    """Mean squared error of `folds`-fold cross-validation."""
    from sklearn.model_selection import KFold

    x = features(indices, num_mixers, distance)
    errors = []
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
        model = _ridge(x[train], y[train], alpha)
        errors.append(np.mean((model.predict(x[test]) - y[test]) ** 2))
    return float(np.mean(errors))


def fit_terms(
    indices: np.ndarray, loss: np.ndarray, num_mixers: int, distances=(0, 1, 2, 3), alphas=ALPHAS, seed: int = 0
) -> tuple[int, float, np.ndarray, dict[int, np.ndarray]]:
    """(chosen distance, chosen alpha, single [L, M], pairs {d: [L-d, M, M]}) by cross-validated ridge."""
    folds = max(2, min(5, len(loss) // 4))
    num_layers = indices.shape[1]
    candidates = [(d, a) for d in distances if d < num_layers for a in alphas]
    distance, alpha = min(candidates, key=lambda c: _cv_score(indices, loss, num_mixers, *c, folds, seed))
    model = _ridge(features(indices, num_mixers, distance), loss, alpha)
    coefficients = model.coef_
    single = coefficients[: num_layers * num_mixers].reshape(num_layers, num_mixers).copy()
    single[0] += model.intercept_  # every placement has exactly one mixer in layer 0
    pairs, offset = {}, num_layers * num_mixers
    for d in range(1, distance + 1):
        size = (num_layers - d) * num_mixers * num_mixers
        pairs[d] = coefficients[offset : offset + size].reshape(num_layers - d, num_mixers, num_mixers)
        offset += size
    return distance, alpha, single, pairs


def rank_metrics(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    from scipy.stats import kendalltau, spearmanr

    residual = np.sum((measured - predicted) ** 2)
    total = np.sum((measured - measured.mean()) ** 2)
    return {
        "spearman": float(spearmanr(predicted, measured).statistic),
        "kendall": float(kendalltau(predicted, measured).statistic),
        "r2": float(1 - residual / total) if total > 0 else float("nan"),
    }


def split_held_out(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    held = max(1, int(round(count * fraction)))
    return order[held:], order[:held]  # training rows in random order: the learning curve takes prefixes


def fit_surrogate(
    records: list[PlacementQuality], spec: SupernetSpec, held_out_fraction: float = 0.2, seed: int = 0,
    max_distance: int = 3,
) -> tuple[Surrogate, dict]:
    """Fit on all but `held_out_fraction` of the records; report rank metrics on the held-out ones against the
    per-layer-only model, and a learning curve (held-out Spearman against the number of training placements).
    The saved surrogate is then refitted on every record with the chosen distance and alpha."""
    if len(records) < 10:
        raise ValueError(f"fitting needs at least 10 evaluated placements, got {len(records)}")
    names = mixer_names(spec)
    indices = placement_indices(records, names, spec)
    loss = np.array([1.0 - r.top1 for r in records])
    train, test = split_held_out(len(records), held_out_fraction, seed)
    num_mixers = len(names)

    def surrogate_of(distance, alpha, single, pairs, metrics=None) -> Surrogate:
        return Surrogate(mixers=names, num_layers=spec.num_layers, distance=distance, alpha=alpha,
                         single=single.tolist(), pairs={d: t.tolist() for d, t in pairs.items()}, metrics=metrics or {})

    def held_out_metrics(train_rows, distances) -> tuple[dict, int, float]:
        distance, alpha, single, pairs = fit_terms(indices[train_rows], loss[train_rows], num_mixers, distances, seed=seed)
        surrogate = surrogate_of(distance, alpha, single, pairs)
        return rank_metrics(-surrogate.predict_loss(indices[test]), -loss[test]), distance, alpha

    distances = tuple(range(0, max_distance + 1))
    full, distance, alpha = held_out_metrics(train, distances)
    per_layer, _, _ = held_out_metrics(train, (0,))
    curve = []
    for size in sorted({int(len(train) * f) for f in (0.25, 0.5, 0.75)} - {len(train)}):
        if size >= 10:
            metrics, d, _ = held_out_metrics(train[:size], distances)
            curve.append({"train_placements": size, "distance": d, **metrics})
    curve.append({"train_placements": len(train), "distance": distance, **full})  # the fit above
    report = {
        "placements": len(records), "train": len(train), "held_out": len(test), "distance": distance, "alpha": alpha,
        "held_out_metrics": full, "per_layer_only_held_out_metrics": per_layer, "learning_curve": curve,
    }
    surrogate = surrogate_of(*fit_terms(indices, loss, num_mixers, (distance,), (alpha,), seed=seed),
                             metrics={f"held_out_{k}": v for k, v in full.items()})
    return surrogate, report
