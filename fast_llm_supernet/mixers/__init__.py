"""The four token mixers (FA, SWA, GDN, KDA) and `build_mixer`, which picks one from its config.

Every mixer has the same interface:
  `forward(hidden_states [B, T, D], cache=None) -> [B, T, D]` and
  `new_cache(batch_size, device, dtype)`; with a cache the input continues the cached sequence
  and the cache is updated in place.
"""

from __future__ import annotations

from torch import nn

from shared_spec import AttentionMixerConfig, GDNMixerConfig, KDAMixerConfig


def build_mixer(config: AttentionMixerConfig | GDNMixerConfig | KDAMixerConfig, hidden_size: int) -> nn.Module:
    """The mixer module for one (non-stochastic) mixer config; parameter names match the checkpoint."""
    if isinstance(config, AttentionMixerConfig):
        from fast_llm_supernet.mixers.attention import Attention

        return Attention(config, hidden_size)
    if isinstance(config, GDNMixerConfig):
        from fast_llm_supernet.mixers.gdn import GatedDeltaNet

        return GatedDeltaNet(config, hidden_size)
    if isinstance(config, KDAMixerConfig):
        from fast_llm_supernet.mixers.kda import KimiDeltaAttention

        return KimiDeltaAttention(config, hidden_size)
    raise TypeError(
        f"no mixer for config type {type(config).__name__} (type {getattr(config, 'type', '?')!r}); "
        "valid mixer types: attention, gdn, kda"
    )


__all__ = ["build_mixer"]
