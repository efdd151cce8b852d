"""The supernet layout as both engines see it: which mixers each layer offers, and of what kind.

`SupernetSpec.from_config` reads it off an Apriel2 `config.json`. Placements are validated
against it, so the trainer, the PyTorch model and the vLLM plugin accept exactly the same ones.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared_spec.apriel2_config import (
    Apriel2TextConfig,
    AttentionMixerConfig,
    GDNMixerConfig,
    KDAMixerConfig,
    StochasticMixerConfig,
)


class MixerKind(StrEnum):
    """What a mixer computes; decides its cache and its kernel."""

    ATTENTION = "attention"  # full causal attention: KV cache grows with the context
    SLIDING_WINDOW = "sliding_window"  # attention over the last `window_size` tokens: bounded KV cache
    GDN = "gdn"  # Gated DeltaNet: constant-size recurrent state
    KDA = "kda"  # Kimi Delta Attention: constant-size recurrent state

    @classmethod
    def of(cls, mixer: AttentionMixerConfig | GDNMixerConfig | KDAMixerConfig) -> MixerKind:
        if isinstance(mixer, AttentionMixerConfig):
            return cls.SLIDING_WINDOW if mixer.window_size is not None else cls.ATTENTION
        if isinstance(mixer, GDNMixerConfig):
            return cls.GDN
        if isinstance(mixer, KDAMixerConfig):
            return cls.KDA
        raise TypeError(f"not a mixer config: {type(mixer).__name__}")


# The mixer names this project writes into checkpoints it creates.
DEFAULT_MIXER_NAMES: dict[MixerKind, str] = {
    MixerKind.ATTENTION: "attention",
    MixerKind.SLIDING_WINDOW: "sliding_window",
    MixerKind.GDN: "gdn",
    MixerKind.KDA: "kda",
}


class LayerChoices(BaseModel):
    """The mixers one decoder layer offers, by their checkpoint names.

    A plain (non-stochastic) layer offers exactly one mixer; it is named after its kind and
    `fixed` is set, so it never needs to be spelled out in a placement.
    """

    model_config = ConfigDict(frozen=True)

    mixers: dict[str, MixerKind] = Field(min_length=1)
    default: str
    fixed: bool = False

    @model_validator(mode="after")
    def _default_is_offered(self) -> LayerChoices:
        if self.default not in self.mixers:
            raise ValueError(f"default mixer {self.default!r} is not one of {sorted(self.mixers)}")
        return self


class SupernetSpec(BaseModel):
    """Per-layer mixer choices of a supernet checkpoint."""

    model_config = ConfigDict(frozen=True)

    layers: tuple[LayerChoices, ...] = Field(min_length=1)

    @classmethod
    def from_config(cls, config: Apriel2TextConfig) -> SupernetSpec:
        layers = []
        for block in config.blocks_in_order():
            mixer = block.mixer
            if isinstance(mixer, StochasticMixerConfig):
                kinds = {name: MixerKind.of(sub) for name, sub in mixer.mixers.items()}
                layers.append(LayerChoices(mixers=kinds, default=mixer.main_mixer_name))
            else:
                kind = MixerKind.of(mixer)
                layers.append(LayerChoices(mixers={kind.value: kind}, default=kind.value, fixed=True))
        return cls(layers=tuple(layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def choice_layers(self) -> list[int]:
        """Indices of the layers whose mixer a placement chooses (the stochastic ones)."""
        return [i for i, layer in enumerate(self.layers) if not layer.fixed]

    @property
    def default_names(self) -> tuple[str, ...]:
        return tuple(layer.default for layer in self.layers)

    def mixer_names(self) -> list[str]:
        """Every mixer name offered somewhere, in first-seen order."""
        seen: dict[str, None] = {}
        for layer in self.layers:
            seen.update(dict.fromkeys(layer.mixers))
        return list(seen)

    def names_of_kind(self, kind: MixerKind) -> list[str | None]:
        """Per layer, the name of the mixer of `kind` (None where the layer has none)."""
        return [next((n for n, k in layer.mixers.items() if k == kind), None) for layer in self.layers]
