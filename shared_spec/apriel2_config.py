"""Pydantic models of Fast-LLM's Apriel2 text `config.json` (model_type `apriel2_text`).

The checkpoint is the contract between training and serving, so these models are written to
round-trip an upstream export unchanged: every model keeps the keys it does not know
(`extra="allow"`), and `to_json_dict()` writes back only what was read or explicitly set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Node(BaseModel):
    """Base of every config node: unknown keys survive, assignment is validated."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, populate_by_name=True)

    # Fields written even when left at their default (readers tell node kinds apart by them).
    _always_written: ClassVar[tuple[str, ...]] = ()

    def model_post_init(self, context: Any) -> None:
        for name in self._always_written:
            if name in type(self).model_fields:
                self.model_fields_set.add(name)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


class _Typed(_Node):
    """A member of a discriminated union: its `type` is always written."""

    _always_written: ClassVar[tuple[str, ...]] = ("type",)


class RotaryConfig(_Node):
    type: str = "mistral_1d"
    theta: float = 10000.0


class NormalizationConfig(_Node):
    type: str = "rms_norm"
    epsilon: float = 1e-5


class ConvolutionConfig(_Node):
    kernel_size: int = Field(4, ge=1)


class AttentionMixerConfig(_Typed):
    """Causal self-attention with GQA and rotary; `window_size` makes it sliding-window."""

    type: Literal["attention"] = "attention"
    heads: int = Field(ge=1)
    head_groups: int = Field(ge=1)
    head_size: int = Field(ge=1)
    # Fast-LLM's default; its exporter writes the key only when it is False.
    add_linear_biases: bool = True
    rotary: RotaryConfig = Field(default_factory=RotaryConfig)
    window_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _groups_divide_heads(self) -> AttentionMixerConfig:
        if self.heads % self.head_groups:
            raise ValueError(
                f"attention heads ({self.heads}) must be a multiple of head_groups ({self.head_groups})"
            )
        return self


class GDNMixerConfig(_Typed):
    """Gated DeltaNet: scalar decay per value head, delta rule, gated RMSNorm output."""

    type: Literal["gdn"] = "gdn"
    value_heads: int = Field(ge=1)
    key_heads: int = Field(ge=1)
    key_head_dim: int = Field(ge=1)
    value_head_dim: int = Field(ge=1)
    convolution_layer: ConvolutionConfig = Field(default_factory=ConvolutionConfig)
    normalization: NormalizationConfig | None = None

    @model_validator(mode="after")
    def _key_heads_divide_value_heads(self) -> GDNMixerConfig:
        if self.value_heads % self.key_heads:
            raise ValueError(
                f"gdn value_heads ({self.value_heads}) must be a multiple of key_heads ({self.key_heads})"
            )
        return self


class KDAMixerConfig(_Typed):
    """Kimi Delta Attention: per-channel decay, low-rank gates, separate q/k/v convolutions."""

    type: Literal["kda"] = "kda"
    heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    convolution_layer: ConvolutionConfig = Field(default_factory=ConvolutionConfig)
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)


MixerConfig = Annotated[AttentionMixerConfig | GDNMixerConfig | KDAMixerConfig, Field(discriminator="type")]


class StochasticMixerConfig(_Typed):
    """A supernet layer: several named mixers, one of which runs per forward pass."""

    type: Literal["stochastic"] = "stochastic"
    main_mixer_name: str
    mixers: dict[str, MixerConfig]

    @model_validator(mode="after")
    def _main_mixer_exists(self) -> StochasticMixerConfig:
        if not self.mixers:
            raise ValueError("a stochastic mixer needs at least one sub-mixer in `mixers`")
        if self.main_mixer_name not in self.mixers:
            raise ValueError(
                f"main_mixer_name {self.main_mixer_name!r} is not one of the mixers {sorted(self.mixers)}"
            )
        return self


BlockMixerConfig = Annotated[
    AttentionMixerConfig | GDNMixerConfig | KDAMixerConfig | StochasticMixerConfig,
    Field(discriminator="type"),
]


class MLPConfig(_Node):
    type: str = "mlp"
    intermediate_size: int = Field(ge=1)
    activation: str = "silu"
    gated: bool = True
    # Fast-LLM's default, as for attention.
    add_linear_biases: bool = True


class BlockConfig(_Node):
    mixer: BlockMixerConfig
    mlp: MLPConfig
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)


class FixedDecoderConfig(_Typed):
    type: Literal["fixed"] = "fixed"
    num_blocks: int = Field(ge=1)
    block: BlockConfig

    def blocks_in_order(self) -> list[BlockConfig]:
        return [self.block] * self.num_blocks


class PatternDecoderConfig(_Typed):
    type: Literal["pattern"] = "pattern"
    num_blocks: int = Field(ge=1)
    pattern: list[str] = Field(min_length=1)
    blocks: dict[str, BlockConfig]

    @model_validator(mode="after")
    def _pattern_names_exist(self) -> PatternDecoderConfig:
        unknown = sorted(set(self.pattern) - set(self.blocks))
        if unknown:
            raise ValueError(
                f"decoder pattern names {unknown} have no entry in `blocks` (have {sorted(self.blocks)})"
            )
        return self

    def blocks_in_order(self) -> list[BlockConfig]:
        # Fast-LLM repeats the pattern cyclically up to num_blocks.
        return [self.blocks[self.pattern[i % len(self.pattern)]] for i in range(self.num_blocks)]


DecoderConfig = Annotated[FixedDecoderConfig | PatternDecoderConfig, Field(discriminator="type")]


class HeadConfig(_Node):
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)


class EmbeddingsConfig(_Node):
    max_position_embeddings: int = 2048


class Apriel2TextConfig(_Node):
    """The whole `config.json` of an Apriel2 text checkpoint."""

    _always_written: ClassVar[tuple[str, ...]] = ("model_type", "architectures", "tie_word_embeddings")

    model_type: Literal["apriel2_text"] = "apriel2_text"
    architectures: list[str] = Field(default_factory=lambda: ["Apriel2ForCausalLM"])
    hidden_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = False
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    decoder: DecoderConfig
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def num_layers(self) -> int:
        return self.decoder.num_blocks

    def blocks_in_order(self) -> list[BlockConfig]:
        """One block config per decoder layer (pattern decoders expanded)."""
        return self.decoder.blocks_in_order()

    @classmethod
    def from_file(cls, path: str | Path) -> Apriel2TextConfig:
        """Read `config.json` from a file or from a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.model_validate(json.loads(path.read_text()))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n")
        return path
