"""The four mixers as vLLM layers, each with its own vLLM cache, runnable on any subset of a batch.

Each class *is* the reference mixer of `fast_llm_supernet.model` (same parameters, same names as
the checkpoint, same math: one definition) plus what vLLM needs to give it a cache:

* `VllmAttention` (FA and SWA): the reference projections and rotary, and a vLLM `Attention`
  layer that only declares the KV cache (`FullAttentionSpec`, or `SlidingWindowSpec` through
  `per_layer_sliding_window`); the attention itself is `paged_attention.py` (vLLM's CPU kernel
  for the head sizes it takes, a PyTorch reference path otherwise). Q, K and V come from one
  matmul and are rotated together (the weights stacked as in `stacked_weights.py`).
* `VllmGatedDeltaNet`, `VllmKimiDeltaAttention`: `MambaBase` layers
  (vllm/model_executor/layers/mamba/abstract.py) whose state pages hold the conv state(s) and the
  float32 delta-rule state. Decode steps on CPU run on the pages in place (`delta_rule_kernels.py`:
  GDN with vLLM's kernel for bfloat16 models, KDA with a few-operation PyTorch step); everything
  else runs the reference module's own `forward(x, cache)` on a `LinearMixerCache` copied out of
  the pages and written back after the step. Their metadata is vLLM's GDN metadata
  (`GDNAttentionMetadataBuilder`, vllm/v1/attention/backends/gdn_attn.py:
  `non_spec_state_indices_tensor` = each request's state slot, already resolved for prefix
  caching's "align" mode by `mamba_get_block_table_tensor`).

Why so few operations per call: on the CPU build a decode step of one request costs mostly fixed
per-operation time, and a batch that mixes placements calls every mixer it uses once per layer.

Cache layer names (the `prefix` each registers in `static_forward_context`) are the checkpoint
paths, e.g. `model.decoder.blocks.3.mixer.mixers.gdn`: exactly one integer (the layer index);
several cache layers of one decoder layer share that index
(vllm/v1/worker/utils.py: `bind_kv_cache`, `extract_layer_index`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from fast_llm_supernet.model.attention import Attention as ReferenceAttention
from fast_llm_supernet.model.gdn import GatedDeltaNet
from fast_llm_supernet.model.kda import CONVOLUTIONS as KDA_CONVOLUTIONS
from fast_llm_supernet.model.kda import KimiDeltaAttention
from fast_llm_supernet.model.linear_mixer import LinearMixerCache
from fast_llm_supernet.model.ops import apply_rotary, rotary_cos_sin
from shared_spec import AttentionMixerConfig, GDNMixerConfig, KDAMixerConfig
from vllm_supernet.attention_backend import SupernetAttentionBackend
from vllm_supernet.delta_rule_kernels import (
    GDNDecodeWeights,
    KDADecodeWeights,
    gdn_decode_cpu,
    kda_decode_cpu,
    uses_gdn_cpu_kernel,
)
from vllm_supernet.packed_linear import PackedLinear, free_weights
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
        self._cos_sin = None
        if self._angle_scales is not None:
            # The reference's own tables (float64 angles rounded to float32), for every position
            # served, side by side: [positions, Dh] = cos | sin.
            self._cos_sin = torch.cat(
                rotary_cos_sin(self._angle_scales, 0, max_positions, self._attention_factor, "cpu"), dim=-1
            )
        # Views: the checkpoint's q_proj, k_proj, v_proj weights (and biases) are rows of these.
        self.qkv_linear = PackedLinear.stacked([self.q_proj, self.k_proj, self.v_proj])
        self.output_linear = PackedLinear.of(self.o_proj)

    def packed_linears(self) -> list[PackedLinear]:
        return [self.qkv_linear, self.output_linear]

    def free_packed_weights(self) -> None:
        """Called once `packed_linears` are packed: `run` then multiplies only by the packed copies."""
        free_weights([self.q_proj, self.k_proj, self.v_proj, self.o_proj])

    def run(self, hidden_states: torch.Tensor, positions: torch.Tensor, step: StepRequests) -> torch.Tensor:
        """hidden_states [N, D], positions [N] of `step`'s tokens -> [N, D]."""
        num_tokens = hidden_states.shape[0]
        self.qkv_linear.check_still_stacked(self.q_proj.weight, self.layer_name)
        qkv = self.qkv_linear(hidden_states)
        # [N, Hq + 2 Hkv, Dh]: query heads, key heads, value heads.
        qkv = qkv.view(num_tokens, self.heads + 2 * self.head_groups, self.head_size)
        query_key, value = qkv.split([self.heads + self.head_groups, self.head_groups], dim=1)
        if self._cos_sin is not None:
            if self._cos_sin.device != positions.device:
                self._cos_sin = self._cos_sin.to(positions.device)
            cos, sin = self._cos_sin.index_select(0, positions)[:, None].chunk(2, dim=-1)  # [N, 1, Dh/2]
            query_key = apply_rotary(query_key, cos, sin)  # queries and keys rotated together
        query, key = query_key.split([self.heads, self.head_groups], dim=1)
        metadata = _layer_metadata(self.layer_name)
        if metadata is None:  # dummy run: no cache to read or write
            return self.output_linear(torch.zeros_like(query).flatten(1))
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
        return self.output_linear(attended.flatten(1))


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
        split = _DecodeSplit.of(step, metadata, hidden_states.shape[0])
        if split.rows is None:  # the common case: every token is a one-token continuation
            return self.decode(hidden_states, split.decode_slots)
        output = torch.zeros_like(hidden_states)
        if len(split.decode_slots):
            decoded = self.decode(hidden_states.index_select(0, split.rows), split.decode_slots)
            output.index_copy_(0, split.rows, decoded)
        for slots, start, length, has_state in split.others:  # prefills and chunks: one by one
            cache = self._load_cache(slots, torch.tensor([has_state]), hidden_states.dtype)
            output[start : start + length] = self(hidden_states[start : start + length][None], cache)[0]
            self._store_cache(slots, cache)
        return output


class _PackedInputProjections:
    """Mixed in first: once `decode_weights` are packed, the reference `forward` (prefills) takes its
    input projections from the stacked packed matmul too, and the original weights are freed."""

    decode_weights: GDNDecodeWeights | KDADecodeWeights | None

    def _packed(self) -> bool:
        weights = self.decode_weights
        return weights is not None and all(linear.packed for linear in weights.linears())

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._packed():
            return self.decode_weights.project_inputs(hidden_states)
        return super().project_inputs(hidden_states)

    def packed_linears(self) -> list[PackedLinear]:
        return self.decode_weights.linears() if self.decode_weights else []

    def free_packed_weights(self) -> None:
        """Called once `packed_linears` are packed."""
        self.decode_weights.free_originals(self)


@dataclass
class _DecodeSplit:
    """How a step's requests on one linear mixer split into one-token continuations (decoded together)
    and the rest (run one by one). Computed once per step and request subset: the layers of one
    vLLM cache group share their metadata object, which holds the memo.

    decode_slots [B] (int64): state pages of the continuations; rows [B]: their rows among the
    subset's tokens, None when they are all of them, in order. others: (state page [1], first row,
    length, has a state already) per other request.
    """

    decode_slots: torch.Tensor
    rows: torch.Tensor | None
    others: list[tuple[torch.Tensor, int, int, bool]]

    @classmethod
    def of(cls, step: StepRequests, metadata, num_tokens: int) -> _DecodeSplit:
        memo = metadata.__dict__.setdefault("_supernet_decode_splits", {})
        key = (tuple(step.requests), num_tokens)
        if key not in memo:
            memo[key] = cls._compute(step, metadata.non_spec_state_indices_tensor, num_tokens)
        return memo[key]

    @classmethod
    def _compute(cls, step: StepRequests, state_slots: torch.Tensor, num_tokens: int) -> _DecodeSplit:
        decodes, rows, others, offset = [], [], [], 0  # state_slots [R]: each request's state page
        for request in step.requests:
            length = step.query_len(request)
            if length == 1 and step.num_computed[request] > 0:
                decodes.append(request)
                rows.append(offset)
            elif length > 0:
                slot = state_slots[request : request + 1].long()
                others.append((slot, offset, length, step.num_computed[request] > 0))
            offset += length
        all_decodes = not others and rows == list(range(num_tokens))
        return cls(
            decode_slots=state_slots[decodes].long(),
            rows=None if all_decodes else torch.tensor(rows, dtype=torch.long, device=state_slots.device),
            others=others,
        )


class VllmGatedDeltaNet(_PackedInputProjections, GatedDeltaNet, _LinearMixerLayer):
    def __init__(self, config: GDNMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        GatedDeltaNet.__init__(self, config, hidden_size)
        self.conv_channels = {"convolution": self.conv_dim}
        self.kernel_size = config.convolution_layer.kernel_size
        self.recurrent_shape = (self.num_value_heads, self.key_head_dim, self.value_head_dim)
        self._init_vllm(vllm_config, prefix)
        self.uses_cpu_kernel = uses_gdn_cpu_kernel(self.model_dtype, vllm_config.device_config.device_type)
        # The checkpoint's in_proj_qkvz and in_proj_ba weights become rows of one (gdn_decode_cpu).
        self.decode_weights = GDNDecodeWeights.stack(self) if self.uses_cpu_kernel else None

    def decode(self, hidden_states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if not self.uses_cpu_kernel:
            return super().decode(hidden_states, slots)
        self.decode_weights.input.check_still_stacked(self.in_proj_qkvz.weight, self.layer_name)
        conv_pages, recurrent_pages = self.kv_cache
        return gdn_decode_cpu(self, self.decode_weights, hidden_states, conv_pages, recurrent_pages, slots)


class VllmKimiDeltaAttention(_PackedInputProjections, KimiDeltaAttention, _LinearMixerLayer):
    def __init__(self, config: KDAMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        KimiDeltaAttention.__init__(self, config, hidden_size)
        width = config.heads * config.head_dim
        self.conv_channels = dict.fromkeys(KDA_CONVOLUTIONS, width)
        self.kernel_size = config.convolution_layer.kernel_size
        self.recurrent_shape = (config.heads, config.head_dim, config.head_dim)
        self._init_vllm(vllm_config, prefix)
        self.uses_cpu_step = vllm_config.device_config.device_type == "cpu"
        # The checkpoint's q_proj, ..., v_conv weights become rows of stacked ones (kda_decode_cpu).
        self.decode_weights = KDADecodeWeights.stack(self) if self.uses_cpu_step else None

    def decode(self, hidden_states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if not self.uses_cpu_step:
            return super().decode(hidden_states, slots)
        self.decode_weights.input.check_still_stacked(self.q_proj.weight, self.layer_name)
        conv_pages, recurrent_pages = self.kv_cache
        return kda_decode_cpu(self, self.decode_weights, hidden_states, conv_pages, recurrent_pages, slots)


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
