"""`fast_llm_supernet.model.attention`: causal self-attention with GQA and rotary embeddings, the FA and
SWA mixers (config parsing, rotary frequencies, the `Attention` module, a supernet block's sub-mixer configs).

The definition is upstream Fast-LLM's (`fast_llm/layers/attention/attention.py`, `rotary/rotary.py`):

* query head h reads KV group h // (heads / head_groups) (Fast-LLM's query dim is laid out
  (head_groups, heads_per_group, head_size); K/V are `repeat_interleave`d across each group);
* softmax scale head_size ** -0.5;
* rotary in the real "half-split" layout (`rotate_half`): the first half of a head holds the real
  parts, the second half the imaginary parts; angles are computed in float64 and the cos/sin
  tables rounded to float32, as upstream does;
* sliding window w: query i attends keys i-w+1 .. i (upstream's mask `triu(-(w-1))`, flash
  `window=(w-1, 0)`).

The rotary tables, the rotation and the mask are functions of `ops` (shared with vllm_supernet). A whole
sequence with a window runs FlexAttention on GPUs (`windowed_attention`), the dense mask elsewhere.

Checkpoint parameter names: `q_proj`, `k_proj`, `v_proj`, `o_proj` (`.weight`, `.bias` if enabled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fast_llm_supernet.model import windowed_attention
from fast_llm_supernet.model.ops import apply_rotary, attention_mask, rotary_cos_sin
from shared_spec import AttentionMixerConfig, StochasticMixerConfig

# Rotary types this module computes. `mistral_1d` is how Fast-LLM's Apriel2 exporter names its
# `default` rotary; `llama3` and `yarn` are exported under their Fast-LLM names.
SUPPORTED_ROTARY_TYPES = ("mistral_1d", "default", "llama3", "yarn", "none")


def _extra(node, name: str, default=None):
    """A field of a config node that shared_spec keeps as an unknown (extra) key."""
    extra = node.model_extra or {}
    return extra.get(name, default)


def linear_bias_enabled(config, layer: str) -> bool:
    """Whether Fast-LLM gives the `layer` projection a bias (attention: query_layer, key_layer,
    value_layer, dense_layer; MLP: layer_1, layer_2).

    A per-layer `{layer: {bias: {enabled: ...}}}` override wins over `add_linear_biases`
    (Qwen2-style models bias q/k/v but not o). Fast-LLM's own default for `add_linear_biases`
    is True and its Apriel2 exporter writes the attention key only when it is False, so an
    attention config without the key means biases. (The exporter always writes the MLP key.)
    """
    override = _extra(config, layer)
    if isinstance(override, dict):
        enabled = (override.get("bias") or {}).get("enabled")
        if enabled is not None:
            return bool(enabled)
    if "add_linear_biases" in config.model_fields_set or not isinstance(config, AttentionMixerConfig):
        return config.add_linear_biases
    return True


def rotary_angle_scales(config: AttentionMixerConfig) -> torch.Tensor | None:
    """Per-channel-pair angular frequencies [head_size / 2] in float64; None for no rotary.

    Mirrors Fast-LLM's `DefaultRotary._get_angle_scales` and its llama3 / yarn subclasses.
    """
    rotary = config.rotary
    head_size = config.head_size
    kind = rotary.type
    if kind not in SUPPORTED_ROTARY_TYPES:
        raise ValueError(
            f"attention rotary type {kind!r} is not supported; valid choices: {', '.join(SUPPORTED_ROTARY_TYPES)}"
        )
    if kind == "none":
        return None
    if head_size % 2:
        raise ValueError(f"rotary embeddings need an even head_size, got {head_size}")
    scales = rotary.theta ** -torch.arange(0, 1, 2 / head_size, dtype=torch.float64)
    if kind == "llama3":
        scale_factor = float(_extra(rotary, "scale_factor", 8.0))
        low_factor = float(_extra(rotary, "low_frequency_factor", 1.0))
        high_factor = float(_extra(rotary, "high_frequency_factor", 4.0))
        context = float(_extra(rotary, "original_context_length", 8192))
        low_wavelength, high_wavelength = context / low_factor, context / high_factor
        new_scales = []
        for scale in scales:
            wavelength = 2 * math.pi / scale
            if wavelength < high_wavelength:
                new_scales.append(scale)
            elif wavelength > low_wavelength:
                new_scales.append(scale / scale_factor)
            else:
                smooth = (context / wavelength - low_factor) / (high_factor - low_factor)
                new_scales.append((1 - smooth) * scale / scale_factor + smooth * scale)
        scales = torch.stack(new_scales)
    elif kind == "yarn":
        scale_factor = float(_extra(rotary, "scale_factor", 8.0))
        context = float(_extra(rotary, "original_context_length", 8192))

        def correction(beta: float) -> float:
            return head_size * math.log(context / (beta * 2 * math.pi)) / (2 * math.log(rotary.theta))

        low = max(math.floor(correction(float(_extra(rotary, "beta_fast", 32.0)))), 0)
        high = min(math.ceil(correction(float(_extra(rotary, "beta_slow", 1.0)))), head_size - 1)
        if low == high:
            high += 0.001  # upstream's guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(head_size // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        scales = scales / scale_factor * ramp + scales * (1 - ramp)
    return scales


def rotary_attention_factor(config: AttentionMixerConfig) -> float:
    """Yarn multiplies the cos/sin tables by an attention factor; every other type by 1."""
    rotary = config.rotary
    if rotary.type != "yarn":
        return 1.0
    factor = _extra(rotary, "attention_factor")
    if factor is None:
        factor = 0.1 * math.log(float(_extra(rotary, "scale_factor", 8.0))) + 1.0
    return float(factor)


@dataclass
class AttentionCache:
    """Rotated keys and values of the tokens seen so far, before GQA expansion, in preallocated buffers.

    `key`, `value`: [B, head_groups, capacity, head_size]; positions 0 .. length-1 hold the last `length` tokens
    (oldest first). `position` counts every token the mixer has seen. A decode step writes its token in place
    after them, so a step costs its own token, not a copy of the whole cache (`torch.cat` per token did that:
    10 tok/s at 16k tokens on an H200). Full attention allocates its budget up front when `generate` knows it
    (`new_cache(max_length=...)`) and otherwise doubles; sliding-window attention keeps at most `capacity` tokens
    and, when full, moves the `window_size - 1` keys the next query can reach to a new buffer.

    Writes never touch positions below `length`, and reallocation makes new tensors: a shallow copy of the
    cache (speculative decoding's snapshot) keeps seeing what it saw.
    """

    key: torch.Tensor
    value: torch.Tensor
    length: int = 0
    position: int = 0
    window: int | None = None

    @property
    def seen_tokens(self) -> int:
        return self.position

    @property
    def capacity(self) -> int:
        return self.key.shape[2]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values [B, G, T, Dh] of T new tokens; returns what this step's queries attend:
        the kept tokens followed by the new ones, [B, G, S, Dh] (S = kept + T), in the new keys' dtype."""
        new = key.shape[2]
        self.position += new
        end = self.length + new
        if end <= self.capacity:  # room after the kept tokens: write in place
            start = self.length
            self.key[:, :, start:end] = key.detach()
            self.value[:, :, start:end] = value.detach()
            self.length = end
            if start == 0:
                # A prefill attends its own keys: contiguous, not a view with the buffer's strides, which change
                # with the budget (compiled FlexAttention specialises on strides: one compile per budget).
                return key, value
            return self.key[:, :, :end].to(key.dtype), self.value[:, :, :end].to(value.dtype)
        # Full: this step attends the kept tokens and the new ones (one copy, not one per token), and new buffers
        # keep what later queries can reach.
        if self.length:
            key = torch.cat([self.key[:, :, : self.length].to(key.dtype), key], dim=2)
            value = torch.cat([self.value[:, :, : self.length].to(value.dtype), value], dim=2)
        keep = end if self.window is None else min(end, self.window - 1)
        capacity = max(2 * (end if self.window is None else keep), 64)
        self.key = self.key.new_empty(*self.key.shape[:2], capacity, self.key.shape[3])
        self.value = self.value.new_empty(*self.value.shape[:2], capacity, self.value.shape[3])
        self.key[:, :, :keep] = key[:, :, end - keep :].detach()
        self.value[:, :, :keep] = value[:, :, end - keep :].detach()
        self.length = keep
        return key, value


def check_attention_config(config: AttentionMixerConfig) -> None:
    """Reject attention configs this project does not compute (the reference and the served layer both call it)."""
    if not isinstance(config, AttentionMixerConfig):
        raise TypeError(f"attention needs an AttentionMixerConfig, got {type(config).__name__}")
    if _extra(config, "causal", True) is False:
        raise ValueError("attention `causal: false` is not supported by a causal language model")
    for unsupported in ("query_norm", "key_norm", "value_norm"):
        if _extra(config, unsupported) is not None:
            raise ValueError(f"attention `{unsupported}` is not supported (Apriel2 exports never set it)")


def softmax_scale(config: AttentionMixerConfig) -> float:
    """head_size ** -softmax_scale_power (Fast-LLM's default power: 0.5)."""
    return config.head_size ** -float(_extra(config, "softmax_scale_power", 0.5))


class Attention(nn.Module):
    """Full (window_size None) or sliding-window causal self-attention."""

    def __init__(self, config: AttentionMixerConfig, hidden_size: int):
        super().__init__()
        check_attention_config(config)
        self.config = config
        self.hidden_size = hidden_size
        self.heads = config.heads
        self.head_groups = config.head_groups
        self.head_size = config.head_size
        self.heads_per_group = config.heads // config.head_groups
        self.window_size = config.window_size
        self.scale = softmax_scale(config)

        self.q_proj = nn.Linear(hidden_size, self.heads * self.head_size, bias=linear_bias_enabled(config, "query_layer"))
        self.k_proj = nn.Linear(
            hidden_size, self.head_groups * self.head_size, bias=linear_bias_enabled(config, "key_layer")
        )
        self.v_proj = nn.Linear(
            hidden_size, self.head_groups * self.head_size, bias=linear_bias_enabled(config, "value_layer")
        )
        self.o_proj = nn.Linear(self.heads * self.head_size, hidden_size, bias=linear_bias_enabled(config, "dense_layer"))

        # Plain tensors, not buffers: they are derived from the config and never saved.
        self._angle_scales = rotary_angle_scales(config)
        self._attention_factor = rotary_attention_factor(config)
        self._cos_sin_table: tuple[torch.Tensor, torch.Tensor] | None = None  # positions 0 .. N-1, grown on demand

        # Fast-LLM's default init: normal(0, hidden_size ** -0.5), zero biases.
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(linear.weight, std=hidden_size**-0.5)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def new_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
    ) -> AttentionCache:
        """An empty cache; `max_length` (prompt + new tokens) sizes the buffers so that decoding never reallocates
        (a sliding window holds at most twice what it can reach)."""
        capacity = 0
        if max_length is not None:
            capacity = max_length if self.window_size is None else min(max_length, max(2 * (self.window_size - 1), 64))
        shape = (batch_size, self.head_groups, capacity, self.head_size)
        dtype = dtype or self.q_proj.weight.dtype
        device = device if device is not None else self.q_proj.weight.device
        return AttentionCache(
            key=torch.empty(shape, device=device, dtype=dtype),
            value=torch.empty(shape, device=device, dtype=dtype),
            window=self.window_size,
        )

    def forward(self, hidden_states: torch.Tensor, cache: AttentionCache | None = None) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        start = cache.position if cache is not None else 0

        # [B, T, heads * Dh] -> [B, heads, T, Dh]; K and V have head_groups heads.
        query = self.q_proj(hidden_states).view(batch, length, self.heads, self.head_size).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, self.head_groups, self.head_size).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, self.head_groups, self.head_size).transpose(1, 2)

        if self._angle_scales is not None:
            cos, sin = self._rotary_tables(start, length, hidden_states.device)
            query = apply_rotary(query, cos, sin)
            key = apply_rotary(key, cos, sin)

        if cache is not None:
            key, value = cache.append(key, value)  # [B, G, S, Dh]: kept tokens, then these

        whole_sequence = key.shape[2] == length  # no cached keys before the queries
        attended = None
        if length == 1 and not whole_sequence:
            # Decode step: the one query reaches the last `window_size` keys (all without a window), so no mask;
            # SDPA reads each KV group for its query heads (no expanded copy of the cache per token).
            if self.window_size is not None:
                key, value = key[:, :, -self.window_size :], value[:, :, -self.window_size :]
            attended = F.scaled_dot_product_attention(
                query, key, value, scale=self.scale, enable_gqa=self.heads_per_group > 1
            )
        elif whole_sequence and self.window_size is not None and windowed_attention.usable(query):
            # Sliding window at window cost (GPU): FlexAttention skips the blocks outside the window.
            attended = windowed_attention.sliding_window_attention(query, key, value, self.window_size, self.scale)
        if attended is None:
            # GQA: expand each KV group over its query heads (query head h uses group h // heads_per_group).
            if self.heads_per_group > 1:
                key = key.repeat_interleave(self.heads_per_group, dim=1)
                value = value.repeat_interleave(self.heads_per_group, dim=1)
            if self.window_size is None and whole_sequence:
                # Plain causal attention over the whole sequence: no mask to build, fused kernels allowed.
                attended = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=self.scale)
            else:
                allowed = self._allowed(start, length, key.shape[2], query.device)
                attended = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=self.scale)
        # [B, heads, T, Dh] -> [B, T, heads * Dh]
        attended = attended.transpose(1, 2).reshape(batch, length, self.heads * self.head_size)
        return self.o_proj(attended)

    def _rotary_tables(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_size/2] for positions start .. start+T-1, sliced from a cached table."""
        table = self._cos_sin_table
        if table is None or table[0].shape[0] < start + length or table[0].device != device:
            size = max(start + length, 2 * table[0].shape[0] if table is not None else 256)
            table = rotary_cos_sin(self._angle_scales, 0, size, self._attention_factor, device)
            self._cos_sin_table = table
        return table[0][start : start + length], table[1][start : start + length]

    def _allowed(self, start: int, length: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """Boolean mask [T, S]: which keys each query may attend.

        Queries sit at absolute positions start .. start+T-1; the S keys end at the last query.
        """
        query_positions = torch.arange(start, start + length, device=device)
        key_positions = torch.arange(start + length - num_keys, start + length, device=device)
        return attention_mask(query_positions, key_positions, self.window_size)

    def extra_repr(self) -> str:
        window = f", window_size={self.window_size}" if self.window_size is not None else ""
        return f"heads={self.heads}, head_groups={self.head_groups}, head_size={self.head_size}{window}"


def effective_attention_configs(mixers: dict[str, object]) -> dict[str, AttentionMixerConfig]:
    """What each attention sub-mixer of one stochastic (supernet) block computes in upstream Fast-LLM.

    Fast-LLM preprocesses a stochastic mixer by calling every sub-mixer's `preprocess` on one shared
    kwargs dict (`StochasticMixer.preprocess`), in the order of `mixers`. Each attention sub-mixer
    writes its attention mask (causal, windowed when it has `window_size`) and its rotary table
    into the same keys, so the last attention sub-mixer's mask and rotary table are the ones every
    attention sub-mixer of the block uses on the dense-SDPA path (CPU, and CUDA without flash-attn).
    With sub-mixers `fa` (full) and `swa` (window 5) in that order, `fa` therefore attends over a
    5-token window too; the logits upstream Fast-LLM computes for the fixture in
    tests/data/apriel2_upstream_small show exactly this (full-causal `fa` is off by about 5).

    Returns, for every attention sub-mixer, its config with `window_size` and `rotary` taken from
    the last attention sub-mixer (a sub-mixer without rotary keeps none: upstream's NoRotary ignores
    the table). Projection shapes and biases stay the sub-mixer's own.
    """
    attention = {name: mixer for name, mixer in mixers.items() if isinstance(mixer, AttentionMixerConfig)}
    if not attention:
        return {}
    last = list(attention.values())[-1]
    rotary_sources = [mixer for mixer in attention.values() if mixer.rotary.type != "none"]
    effective = {}
    for name, mixer in attention.items():
        rotary = mixer.rotary if mixer.rotary.type == "none" or not rotary_sources else rotary_sources[-1].rotary
        effective[name] = mixer.model_copy(update={"window_size": last.window_size, "rotary": rotary})
    return effective


def stochastic_sub_mixer_configs(config: StochasticMixerConfig, upstream_mask_sharing: bool) -> dict[str, object]:
    """The config each sub-mixer of a supernet block computes with, by name, in `mixers` order.

    With `upstream_mask_sharing` the attention sub-mixers get `effective_attention_configs`;
    without it every sub-mixer keeps its own config. The PyTorch model and the vLLM plugin both
    build their sub-mixers from this.
    """
    configs = dict(config.mixers)
    if upstream_mask_sharing:
        configs.update(effective_attention_configs(config.mixers))
    return configs
