"""The Hugging Face config class vLLM builds for `model_type: apriel2_text`.

vLLM sizes a model from a handful of flat attributes (layer count, heads, KV heads, head size,
max positions); an Apriel2 `config.json` nests them inside `decoder` blocks and mixers. This class
keeps the file's keys as they are and derives the flat ones from the first attention mixer found.

It deliberately never sets a top-level `sliding_window`: vLLM reads that attribute as "every
attention layer is sliding-window" (`CacheConfig.sliding_window` / `Attention.__init__`); windows
stay inside the mixer configs and reach each layer through `per_layer_sliding_window`.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from shared_spec import Apriel2TextConfig, AttentionMixerConfig, StochasticMixerConfig

MODEL_TYPE = "apriel2_text"


def _attention_mixers(config: Apriel2TextConfig) -> list[AttentionMixerConfig]:
    found = []
    for block in config.blocks_in_order():
        mixers = (
            block.mixer.mixers.values() if isinstance(block.mixer, StochasticMixerConfig) else [block.mixer]
        )
        found.extend(m for m in mixers if isinstance(m, AttentionMixerConfig))
    return found


class Apriel2VllmConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        # Keys of config.json that PretrainedConfig would otherwise consume or not know.
        decoder = kwargs.pop("decoder", None)
        embeddings = kwargs.pop("embeddings", None) or {}
        head = kwargs.pop("head", None) or {}
        hidden_size = kwargs.pop("hidden_size", None)
        vocab_size = kwargs.pop("vocab_size", None)
        kwargs.pop("sliding_window", None)  # see the module docstring
        super().__init__(**kwargs)
        self.decoder = decoder
        self.embeddings = embeddings
        self.head = head
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        if decoder is None or hidden_size is None or vocab_size is None:
            # A bare instance (transformers builds one to diff defaults); nothing to derive.
            return
        spec = self.apriel2()
        attention = _attention_mixers(spec)
        self.num_hidden_layers = spec.num_layers
        self.max_position_embeddings = spec.embeddings.max_position_embeddings
        if attention:
            self.num_attention_heads = attention[0].heads
            self.num_key_value_heads = attention[0].head_groups
            self.head_dim = attention[0].head_size
        else:
            # No attention anywhere: vLLM still wants positive numbers for its bookkeeping.
            self.num_attention_heads = 1
            self.num_key_value_heads = 1
            self.head_dim = hidden_size
        self.rms_norm_eps = spec.head.normalization.epsilon

    def get_text_config(self, *args, **kwargs) -> Apriel2VllmConfig:
        # transformers would take the `decoder` key for a sub-config; this config is its own text config.
        return self

    def apriel2(self) -> Apriel2TextConfig:
        """The typed view (shared_spec) of this config."""
        return Apriel2TextConfig.model_validate(
            {
                "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size,
                "tie_word_embeddings": self.tie_word_embeddings,
                "embeddings": self.embeddings,
                "head": self.head,
                "decoder": self.decoder,
            }
        )
