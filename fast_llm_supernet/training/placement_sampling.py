"""`fast_llm_supernet.training.placement_sampling`: mixer sampling for stochastic distillation: which placement the student runs at a training step.

Strategies (the same names and semantics as upstream Fast-LLM's `StochasticMixerConfig`):

* `uniform`: every choice layer independently picks one of its mixers with equal probability.
* `weighted`: every choice layer independently picks a mixer with probability proportional to
  `weights[name]` (renormalised over the mixers that layer offers).
* `full_layout`: first draw how many choice layers each mixer gets (every composition of the
  layer count into the mixers is equally likely, "stars and bars"), then a random arrangement of
  that multiset over the choice layers. Compared with `uniform`, placements far from the 25/25/25/25
  mix (all-GDN, mostly-attention, ...) are drawn much more often, which is what a supernet served at
  many speeds needs.

`predefined` placements (any spelling `Placement.parse` accepts, presets included) are drawn with
their own probabilities first; the remaining probability mass falls through to the strategy.

Only choice (stochastic) layers are sampled; plain layers keep their only mixer.

The draw is a pure function of `(seed, step)`: every data-parallel rank, a resumed run and the
Fast-LLM plugin draw the same placement at the same step without talking to each other. This module
holds no trainer state and imports no torch.
"""

from __future__ import annotations

import random
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared_spec import Placement, PlacementError, PresetsFile, SupernetSpec


class SamplingStrategy(StrEnum):
    UNIFORM = "uniform"
    WEIGHTED = "weighted"
    FULL_LAYOUT = "full_layout"


class SamplingConfig(BaseModel):
    """How the training placement is drawn at each step."""

    model_config = ConfigDict(extra="forbid")

    strategy: SamplingStrategy = SamplingStrategy.UNIFORM
    # Mixer name -> non-negative weight; only for `weighted`. Every mixer of the choice layers must be named
    # (a weight of 0 never samples that mixer).
    weights: dict[str, float] | None = None
    # Placements drawn with the probabilities below before the strategy gets the remaining mass.
    predefined: list[str | list[str]] = Field(default_factory=list)
    predefined_probabilities: list[float] = Field(default_factory=list)
    # Added to the step to seed the draw; change it to get another placement sequence.
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if self.strategy == SamplingStrategy.WEIGHTED and not self.weights:
            raise ValueError("strategy 'weighted' needs `weights` (mixer name -> weight)")
        if self.strategy != SamplingStrategy.WEIGHTED and self.weights:
            raise ValueError(f"`weights` is only used by strategy 'weighted', not {self.strategy.value!r}")
        if self.weights and any(weight < 0 for weight in self.weights.values()):
            raise ValueError(f"`weights` must be non-negative, got {self.weights}")
        if len(self.predefined) != len(self.predefined_probabilities):
            raise ValueError(
                f"`predefined` has {len(self.predefined)} placements but `predefined_probabilities` has "
                f"{len(self.predefined_probabilities)} values; give one probability per placement"
            )
        if any(not 0.0 <= p <= 1.0 for p in self.predefined_probabilities):
            raise ValueError("each of `predefined_probabilities` must lie in [0, 1]")
        if sum(self.predefined_probabilities) > 1.0 + 1e-9:
            raise ValueError(f"`predefined_probabilities` sum to {sum(self.predefined_probabilities)}; at most 1")
        return self


def _step_rng(seed: int, step: int) -> random.Random:
    # Python's Mersenne Twister seeded from an int is stable across platforms and Python versions;
    # mixing seed and step through a string keeps (seed=1, step=0) and (seed=0, step=1) apart.
    return random.Random(f"supernet-sampling:{seed}:{step}")


def sample_composition(num_layers: int, num_mixers: int, rng: random.Random) -> list[int]:
    """How many layers each mixer gets: a uniformly random composition of `num_layers` into `num_mixers` parts.

    Stars and bars: choose `num_mixers - 1` bar positions among `num_layers + num_mixers - 1` slots; the gaps
    between bars are the counts. Every composition (including empty parts) is equally likely.
    """
    if num_mixers == 1:
        return [num_layers]
    bars = sorted(rng.sample(range(num_layers + num_mixers - 1), num_mixers - 1))
    edges = [-1, *bars, num_layers + num_mixers - 1]
    return [right - left - 1 for left, right in zip(edges[:-1], edges[1:], strict=False)]


class MixerSampler:
    """Draws the training placement of a step. Stateless: `sample(step)` depends only on the step."""

    def __init__(self, spec: SupernetSpec, config: SamplingConfig | None = None, presets: PresetsFile | None = None):
        self.spec = spec
        self.config = config or SamplingConfig()
        self.choice_layers = spec.choice_layers
        if not self.choice_layers:
            raise PlacementError("this checkpoint has no layer with a choice of mixer: nothing to sample")
        # Per choice layer: its mixer names in checkpoint order (the order fixes what a draw means).
        self.layer_mixers = [list(spec.layers[i].mixers) for i in self.choice_layers]
        self.predefined = [Placement.parse(value, spec, presets) for value in self.config.predefined]
        self.layer_probabilities = self._layer_probabilities()
        if self.config.strategy == SamplingStrategy.FULL_LAYOUT:
            names = set(self.layer_mixers[0])
            for layer, mixers in zip(self.choice_layers, self.layer_mixers, strict=True):
                if set(mixers) != names:
                    raise PlacementError(
                        f"strategy 'full_layout' needs every choice layer to offer the same mixers; layer {layer} "
                        f"offers {sorted(mixers)}, layer {self.choice_layers[0]} offers {sorted(names)}"
                    )

    def _layer_probabilities(self) -> list[list[float]]:
        if self.config.strategy != SamplingStrategy.WEIGHTED:
            return [[1.0 / len(mixers)] * len(mixers) for mixers in self.layer_mixers]
        weights = self.config.weights or {}
        known = set(self.spec.mixer_names())
        unknown = sorted(set(weights) - known)
        if unknown:
            raise PlacementError(f"sampling weights name unknown mixers {unknown}; mixers: {sorted(known)}")
        probabilities = []
        for layer, mixers in zip(self.choice_layers, self.layer_mixers, strict=True):
            missing = [name for name in mixers if name not in weights]
            if missing:
                raise PlacementError(f"sampling weights miss mixers {missing} of layer {layer}; give every mixer a weight")
            total = sum(weights[name] for name in mixers)
            if total <= 0:
                raise PlacementError(f"sampling weights of layer {layer} ({mixers}) are all zero")
            probabilities.append([weights[name] / total for name in mixers])
        return probabilities

    def sample(self, step: int) -> Placement:
        """The placement of training step `step` (same on every rank and on resume)."""
        rng = _step_rng(self.config.seed, step)
        draw = rng.random()
        cumulative = 0.0
        for placement, probability in zip(self.predefined, self.config.predefined_probabilities, strict=True):
            cumulative += probability
            if draw < cumulative:
                return placement
        names = list(self.spec.default_names)
        if self.config.strategy == SamplingStrategy.FULL_LAYOUT:
            chosen = self._full_layout(rng)
        else:
            chosen = [
                rng.choices(mixers, weights=probabilities)[0]
                for mixers, probabilities in zip(self.layer_mixers, self.layer_probabilities, strict=True)
            ]
        for layer, name in zip(self.choice_layers, chosen, strict=True):
            names[layer] = name
        return Placement(mixers=tuple(names))

    def _full_layout(self, rng: random.Random) -> list[str]:
        mixers = self.layer_mixers[0]
        counts = sample_composition(len(self.choice_layers), len(mixers), rng)
        layout = [name for name, count in zip(mixers, counts, strict=True) for _ in range(count)]
        rng.shuffle(layout)
        return layout

    def probability_of_layer_mixer(self) -> list[dict[str, float]]:
        """Marginal probability of each mixer at each choice layer (for tests and logging)."""
        residual = 1.0 - sum(self.config.predefined_probabilities)
        if self.config.strategy == SamplingStrategy.FULL_LAYOUT:
            # By symmetry every mixer is equally likely at every layer.
            strategy = [dict.fromkeys(mixers, 1.0 / len(mixers)) for mixers in self.layer_mixers]
        else:
            strategy = [
                dict(zip(mixers, probabilities, strict=True))
                for mixers, probabilities in zip(self.layer_mixers, self.layer_probabilities, strict=True)
            ]
        marginals = [{name: residual * p for name, p in layer.items()} for layer in strategy]
        for placement, probability in zip(self.predefined, self.config.predefined_probabilities, strict=True):
            for index, layer in enumerate(self.choice_layers):
                marginals[index][placement.mixers[layer]] += probability
        return marginals

