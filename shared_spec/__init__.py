"""Vocabulary shared by the trainer and the server: checkpoint config, supernet layout, placements.

Pydantic only; importing this package never imports torch.
"""

from shared_spec.apriel2_config import (
    Apriel2TextConfig,
    AttentionMixerConfig,
    BlockConfig,
    FixedDecoderConfig,
    GDNMixerConfig,
    KDAMixerConfig,
    MLPConfig,
    PatternDecoderConfig,
    StochasticMixerConfig,
)
from shared_spec.placement import Placement, PlacementError, format_compact, parse_compact, uniform_placement
from shared_spec.presets import PRESETS_FILENAME, Preset, PresetsFile
from shared_spec.request import PlacementRequest, placement_request_json_schema
from shared_spec.spec import DEFAULT_MIXER_NAMES, LayerChoices, MixerKind, SupernetSpec

__all__ = [
    "DEFAULT_MIXER_NAMES",
    "PRESETS_FILENAME",
    "Apriel2TextConfig",
    "AttentionMixerConfig",
    "BlockConfig",
    "FixedDecoderConfig",
    "GDNMixerConfig",
    "KDAMixerConfig",
    "LayerChoices",
    "MLPConfig",
    "MixerKind",
    "PatternDecoderConfig",
    "Placement",
    "PlacementError",
    "PlacementRequest",
    "Preset",
    "PresetsFile",
    "StochasticMixerConfig",
    "SupernetSpec",
    "format_compact",
    "parse_compact",
    "placement_request_json_schema",
    "uniform_placement",
]
