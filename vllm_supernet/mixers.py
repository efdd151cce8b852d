"""The four mixers as vLLM layers, each with its own vLLM cache, runnable on any subset of a batch.

Each class *is* the reference mixer of `fast_llm_supernet.mixers` (same parameters, same names as
the checkpoint, same math: one definition) plus what vLLM needs to give it a cache:

* `VllmAttention` (FA and SWA): the reference projections and rotary, and a vLLM `Attention`
  layer that only declares the KV cache (`FullAttentionSpec`, or `SlidingWindowSpec` through
  `per_layer_sliding_window`); the attention itself is `paged_attention.py` (vLLM's CPU kernel
  for the head sizes it takes, a PyTorch reference path otherwise).
* `VllmGatedDeltaNet`, `VllmKimiDeltaAttention`: `MambaBase` layers
  (vllm/model_executor/layers/mamba/abstract.py) whose state pages hold the conv state(s) and the
  float32 delta-rule state. The reference module's own `forward(x, cache)` runs on a
  `LinearMixerCache` built from those pages and written back after the step, except GDN decode
  steps of bfloat16 models on CPU, which run vLLM's kernel on the pages in place
  (`delta_rule_kernels.py`). Their metadata is
  vLLM's GDN metadata (`GDNAttentionMetadataBuilder`, vllm/v1/attention/backends/gdn_attn.py:
  `non_spec_state_indices_tensor` = each request's state slot, already resolved for prefix
  caching's "align" mode by `mamba_get_block_table_tensor`).

Cache layer names (the `prefix` each registers in `static_forward_context`) are the checkpoint
paths, e.g. `model.decoder.blocks.3.mixer.mixers.gdn`: exactly one integer (the layer index);
several cache layers of one decoder layer share that index
(vllm/v1/worker/utils.py: `bind_kv_cache`, `extract_layer_index`).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from fast_llm_supernet.mixers.attention import Attention as ReferenceAttention
from fast_llm_supernet.mixers.attention import apply_rotary, rotary_cos_sin
from fast_llm_supernet.mixers.common import LinearMixerCache
from fast_llm_supernet.mixers.gdn import GatedDeltaNet
from fast_llm_supernet.mixers.kda import CONVOLUTIONS as KDA_CONVOLUTIONS
from fast_llm_supernet.mixers.kda import KimiDeltaAttention
from shared_spec import AttentionMixerConfig, GDNMixerConfig, KDAMixerConfig
from vllm_supernet.attention_backend import SupernetAttentionBackend
from vllm_supernet.delta_rule_kernels import gdn_decode_cpu, uses_gdn_cpu_kernel
from vllm_supernet.paged_attention import paged_attention_cpu, paged_attention_reference, uses_cpu_kernel
from vllm_supernet.placements import StepRequests


def _layer_metadata(layer_name: str):
    """This layer's metadata for the step, or None in a dummy/profiling run."""
    attn_metadata = get_forward_context().attn_metadata
    if attn_metadata is None:
        return None
    if isinstance(attn_metadata, list):  # micro-batching (not used on CPU)
        raise NotImplementedError("supernet layers do not support micro-batched (ubatch) execution")
    return attn_metadata.get(layer_name)


class VllmAttention(ReferenceAttention):
    """Full or sliding-window attention with a paged KV cache."""

    def __init__(self, config: AttentionMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        super().__init__(config, hidden_size)
        self.layer_name = prefix
        self.attn = Attention(
            self.heads,
            self.head_size,
            self.scale,
            num_kv_heads=self.head_groups,
            cache_config=vllm_config.cache_config,
            quant_config=None,
            # Fast-LLM window w: query i sees keys i-w+1 .. i; vLLM's sliding_window has the same meaning.
            per_layer_sliding_window=self.window_size,
            prefix=prefix,
            attn_backend=SupernetAttentionBackend,
        )
        # One kernel for the layer's whole life: the two lay out the cache differently.
        device_type = vllm_config.device_config.device_type
        self.paged_attention = (
            paged_attention_cpu if uses_cpu_kernel(self.head_size, device_type) else paged_attention_reference
        )
        max_positions = vllm_config.model_config.max_model_len
        self._cos, self._sin = (None, None)
        if self._angle_scales is not None:
            # The reference's own tables (float64 angles rounded to float32), for every position served.
            self._cos, self._sin = rotary_cos_sin(
                self._angle_scales, 0, max_positions, self._attention_factor, "cpu"
            )

    def run(self, hidden_states: torch.Tensor, positions: torch.Tensor, step: StepRequests) -> torch.Tensor:
        """hidden_states [N, D], positions [N] of `step`'s tokens -> [N, D]."""
        num_tokens = hidden_states.shape[0]
        query = self.q_proj(hidden_states).view(num_tokens, self.heads, self.head_size)
        key = self.k_proj(hidden_states).view(num_tokens, self.head_groups, self.head_size)
        value = self.v_proj(hidden_states).view(num_tokens, self.head_groups, self.head_size)
        if self._cos is not None:
            if self._cos.device != positions.device:
                self._cos, self._sin = self._cos.to(positions.device), self._sin.to(positions.device)
            cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [N, 1, Dh/2]
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        metadata = _layer_metadata(self.layer_name)
        if metadata is None:  # dummy run: no cache to read or write
            return self.o_proj(torch.zeros_like(query).flatten(1))
        attended = self.paged_attention(
            query,
            key,
            value,
            self.attn.kv_cache,
            metadata,
            step.requests,
            step.token_index,
            self.scale,
            self.window_size,
        )
        return self.o_proj(attended.flatten(1))


class _LinearMixerLayer(MambaBase):
    """vLLM state pages for a reference GDN/KDA module; mixed into the module's class below.

    Page layout: (conv states of all convolutions stacked on the channel dim [C_total, K-1],
    delta-rule state [H, Dk, Dv] in float32).
    """

    # conv name -> channels, in page order; set by the subclass.
    conv_channels: dict[str, int]

    def _init_vllm(self, vllm_config: VllmConfig, prefix: str) -> None:
        self.layer_name = prefix
        self.model_dtype = vllm_config.model_config.dtype
        self.cache_config = vllm_config.cache_config
        compilation_config = vllm_config.compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))

    # ---- MambaBase -----------------------------------------------------------------------------

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.GDN_ATTN

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return (sum(self.conv_channels.values()), self.kernel_size - 1), self.recurrent_shape

    def get_state_dtype(self) -> tuple[torch.dtype, torch.dtype]:
        # float32 delta-rule state unless mamba_ssm_cache_dtype says otherwise (like vLLM's KDA).
        return MambaStateDtypeCalculator.kda_state_dtype(
            self.model_dtype, self.cache_config.mamba_cache_dtype, self.cache_config.mamba_ssm_cache_dtype
        )

    # ---- a step ----------------------------------------------------------------------------------

    def _load_cache(
        self, slots: torch.Tensor, has_state: torch.Tensor, dtype: torch.dtype
    ) -> LinearMixerCache:
        """Copy the states of `slots` out of the pages; zeros where a request starts from scratch."""
        conv_pages, recurrent_pages = self.kv_cache
        conv = conv_pages[slots].to(dtype)  # [B, C_total, K-1]
        recurrent = recurrent_pages[slots].float()  # [B, H, Dk, Dv]
        fresh = ~has_state
        if bool(fresh.any()):
            conv[fresh] = 0
            recurrent[fresh] = 0
        conv_states = dict(
            zip(self.conv_channels, conv.split(list(self.conv_channels.values()), dim=1), strict=True)
        )
        return LinearMixerCache(conv_states=conv_states, recurrent_state=recurrent)

    def _store_cache(self, slots: torch.Tensor, cache: LinearMixerCache) -> None:
        conv_pages, recurrent_pages = self.kv_cache
        conv = torch.cat([cache.conv_states[name] for name in self.conv_channels], dim=1)
        conv_pages[slots] = conv.to(conv_pages.dtype)
        recurrent_pages[slots] = cache.recurrent_state.to(recurrent_pages.dtype)

    def decode(self, hidden_states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One new token of each of B requests [B, D] -> [B, D]; their states continue in pages `slots`.

        The reference mixer on states copied out of the pages and back; subclasses may use a kernel."""
        cache = self._load_cache(slots, torch.ones(len(slots), dtype=torch.bool), hidden_states.dtype)
        out = self(hidden_states[:, None], cache)[:, 0]
        self._store_cache(slots, cache)
        return out

    def run(self, hidden_states: torch.Tensor, positions: torch.Tensor, step: StepRequests) -> torch.Tensor:
        """hidden_states [N, D] of `step`'s tokens -> [N, D]; each request continues its own state."""
        metadata = _layer_metadata(self.layer_name)
        if metadata is None:  # dummy run
            return torch.zeros_like(hidden_states)
        state_slots = metadata.non_spec_state_indices_tensor  # [R] state page of each request
        output = torch.zeros_like(hidden_states)
        # Split the subset into one-token continuations (decoded together) and the rest (one by one).
        decodes, others, offsets, offset = [], [], {}, 0
        for request in step.requests:
            length = step.query_len(request)
            offsets[request] = offset
            offset += length
            if length == 0:
                continue
            if length == 1 and step.num_computed[request] > 0:
                decodes.append(request)
            else:
                others.append(request)
        if decodes:
            rows = torch.tensor([offsets[r] for r in decodes], device=hidden_states.device)
            output[rows] = self.decode(hidden_states[rows], state_slots[decodes])
        for request in others:
            start, length = offsets[request], step.query_len(request)
            slots = state_slots[request : request + 1]
            has_state = torch.tensor([step.num_computed[request] > 0])
            cache = self._load_cache(slots, has_state, hidden_states.dtype)
            output[start : start + length] = self(hidden_states[start : start + length][None], cache)[0]
            self._store_cache(slots, cache)
        return output


class VllmGatedDeltaNet(GatedDeltaNet, _LinearMixerLayer):
    def __init__(self, config: GDNMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        GatedDeltaNet.__init__(self, config, hidden_size)
        self.conv_channels = {"convolution": self.conv_dim}
        self.kernel_size = config.convolution_layer.kernel_size
        self.recurrent_shape = (self.num_value_heads, self.key_head_dim, self.value_head_dim)
        self._init_vllm(vllm_config, prefix)
        self.uses_cpu_kernel = uses_gdn_cpu_kernel(self.model_dtype, vllm_config.device_config.device_type)

    def decode(self, hidden_states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if not self.uses_cpu_kernel:
            return super().decode(hidden_states, slots)
        conv_pages, recurrent_pages = self.kv_cache
        return gdn_decode_cpu(self, hidden_states, conv_pages, recurrent_pages, slots)


class VllmKimiDeltaAttention(KimiDeltaAttention, _LinearMixerLayer):
    def __init__(self, config: KDAMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        KimiDeltaAttention.__init__(self, config, hidden_size)
        width = config.heads * config.head_dim
        self.conv_channels = dict.fromkeys(KDA_CONVOLUTIONS, width)
        self.kernel_size = config.convolution_layer.kernel_size
        self.recurrent_shape = (config.heads, config.head_dim, config.head_dim)
        self._init_vllm(vllm_config, prefix)


def build_vllm_mixer(config, hidden_size: int, vllm_config: VllmConfig, prefix: str):
    if isinstance(config, AttentionMixerConfig):
        return VllmAttention(config, hidden_size, vllm_config, prefix)
    if isinstance(config, GDNMixerConfig):
        return VllmGatedDeltaNet(config, hidden_size, vllm_config, prefix)
    if isinstance(config, KDAMixerConfig):
        return VllmKimiDeltaAttention(config, hidden_size, vllm_config, prefix)
    raise TypeError(f"no vLLM mixer for {type(config).__name__}; valid mixer types: attention, gdn, kda")


def state_specs(
    config, vllm_config: VllmConfig
) -> tuple[tuple[tuple[int, ...], ...], tuple[torch.dtype, ...]]:
    """(shapes, dtypes) of a linear mixer's state page, without building the module (for page sizing)."""
    kernel = config.convolution_layer.kernel_size
    if isinstance(config, GDNMixerConfig):
        conv = 2 * config.key_heads * config.key_head_dim + config.value_heads * config.value_head_dim
        recurrent = (config.value_heads, config.key_head_dim, config.value_head_dim)
    else:
        conv = 3 * config.heads * config.head_dim
        recurrent = (config.heads, config.head_dim, config.head_dim)
    cache_config = vllm_config.cache_config
    dtypes = MambaStateDtypeCalculator.kda_state_dtype(
        vllm_config.model_config.dtype, cache_config.mamba_cache_dtype, cache_config.mamba_ssm_cache_dtype
    )
    return ((conv, kernel - 1), recurrent), dtypes
