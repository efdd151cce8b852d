"""`fast_llm_supernet.toolkit.sampling`: which placements to evaluate.

* `uniform`: every layer draws one of its mixers uniformly (what the surrogate sees most of);
* `stratified`: the number of full-attention layers runs evenly over 0..L, the layers that keep attention
  are drawn at random and the others draw uniformly among their other mixers (uniform sampling almost never
  gives the mostly-attention placements that presets near the teacher's quality are made of);
* a given list (any accepted placement spelling, one per line).

Draws are seeded and duplicates are dropped, so the same arguments give the same list.
"""

from __future__ import annotations

import random
from typing import Literal

from shared_spec import MixerKind, Placement, SupernetSpec

Strategy = Literal["uniform", "stratified"]


def sample_placements(spec: SupernetSpec, count: int, strategy: Strategy, seed: int = 0) -> list[Placement]:
    """`count` distinct placements (fewer only if the space is smaller)."""
    rng = random.Random(seed)
    choice_layers = [i for i, layer in enumerate(spec.layers) if not layer.fixed]
    seen: dict[str, Placement] = {}
    attempts = 0
    while len(seen) < count and attempts < count * 50:
        attempts += 1
        mixers = [next(iter(layer.mixers)) for layer in spec.layers]
        if strategy == "uniform":
            for i in choice_layers:
                mixers[i] = rng.choice(list(spec.layers[i].mixers))
        elif strategy == "stratified":
            with_attention = [i for i in choice_layers if MixerKind.ATTENTION in spec.layers[i].mixers.values()]
            keep = (len(seen) * (len(with_attention) + 1) // max(count, 1)) % (len(with_attention) + 1)
            kept = set(rng.sample(with_attention, keep))
            for i in choice_layers:
                layer = spec.layers[i].mixers
                if i in kept:
                    mixers[i] = next(name for name, kind in layer.items() if kind == MixerKind.ATTENTION)
                else:
                    others = [name for name, kind in layer.items() if kind != MixerKind.ATTENTION] or list(layer)
                    mixers[i] = rng.choice(others)
        else:
            raise ValueError(f"sampling strategy {strategy!r} is not one of: uniform, stratified")
        placement = Placement.parse(mixers, spec)
        seen.setdefault(placement.canonical, placement)
    return list(seen.values())
