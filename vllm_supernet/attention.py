"""Full and sliding-window attention as a vLLM layer: the layer, its KV-cache backend, its paged attention.

The layer is built as vLLM's `llama.py` builds its attention: Q|K|V as one `QKVParallelLinear`
(query and KV heads sharded over tensor-parallel ranks, KV heads replicated where vLLM's rules
allow), the output a `RowParallelLinear`. Rotary and masks are the reference's math
(`fast_llm_supernet.model.ops`): the rotary tables are upstream Fast-LLM's (float64 angles rounded to
float32), which vLLM's own rotary layer does not reproduce.

A supernet layer runs each attention mixer on just the requests whose placement picked it, so the
attention itself takes the batch's metadata plus the subset (`requests`, `token_index`):

* `paged_attention_cpu`: vLLM's CPU attention kernels (`cpu_attn_reshape_and_cache`,
  `get_scheduler_metadata`, `cpu_attention_with_kv_cache`, vllm/_custom_ops.py), the ones vLLM's own
  `CPUAttentionBackend` runs, for the head sizes it takes (32..512). They keep keys in an
  ISA-specific layout inside each block and plan the work with a schedule: one per (request subset,
  window) per step, shared by every layer of the cache group.
* `paged_attention_reference`: plain PyTorch for any head size and device (upstream test exports
  use 16; on GPU this path runs), each request's queries attending with SDPA over the keys they may
  see (`ops.attention_mask`).

The two lay the cache out differently, so a layer uses one of them for its whole life.

vLLM internals relied on (besides the patches in `patches.py`):
- `Attention(..., attn_backend=...)` (vllm/model_executor/layers/attention/attention.py) accepts a
  backend class; the runner builds metadata with `backend.get_builder_cls()`. `get_name()` must name
  an existing enum member, so the backend reuses `CPU_ATTN`'s name and cache layout (each layer's
  cache is `[num_blocks, num_kv_heads, block_size, 2 * head_size]`).
- `CommonAttentionMetadata` (vllm/v1/attention/backend.py): `query_start_loc_cpu`, `seq_lens`
  (context length after this step), `block_table_tensor`, `slot_mapping` (-1: padding token).
- SWA groups (`SlidingWindowSpec`, through `per_layer_sliding_window`) keep blocks for the last
  `window - 1` computed tokens plus the new ones; earlier entries may point at the null block, so
  only the window is ever read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa

from fast_llm_supernet.model import ops
from fast_llm_supernet.model.attention import (
    check_attention_config,
    linear_bias_enabled,
    rotary_angle_scales,
    rotary_attention_factor,
    softmax_scale,
)
from shared_spec import AttentionMixerConfig
from vllm_supernet.batch import StepRequests, deferred_builder, layer_metadata

# The finest step of attention blocks (pages) vLLM's CPU kernel takes.
BLOCK_STEP = 16


def block_step(dtype: torch.dtype, head_sizes: list[int], cache_dtype: str) -> int:
    """Tokens by which the attention blocks (pages) of a deployment that also holds state pages step: 16, the
    finest the CPU kernel takes, unless blocks of 16 send it down a slower path than blocks of 32 would (on
    x86 its "vec16" path in place of "amx" or "vec"), then 32. The vec16 path costs more than the finer step
    saves: on the benchmark model at 8k tokens, all-FA decodes at 0.72x Llama's step on 144-token pages and at
    0.99x on 160-token ones (`bench_step_time.py --placement all-FA --context 8192 --supernet-block-sizes 144`),
    while a state that a coarser step fits worse can keep its convolution states apart (`page_layout`)."""
    slower = any(
        _get_attn_isa(dtype, BLOCK_STEP, head, cache_dtype) != _get_attn_isa(dtype, 2 * BLOCK_STEP, head, cache_dtype)
        for head in head_sizes
    )
    return 2 * BLOCK_STEP if slower else BLOCK_STEP


class SupernetAttention(nn.Module):
    """`mixer.mixers.{NAME}` of an attention (FA or SWA) mixer: checkpoint `{q,k,v,o}_proj` load
    into `qkv_proj` (stacked) and `o_proj`."""

    # Checkpoint name -> (parameter, shard) of the stacked projection (model.load_weights).
    stacked_params = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, config: AttentionMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        check_attention_config(config)
        biases = {linear_bias_enabled(config, layer) for layer in ("query_layer", "key_layer", "value_layer")}
        if len(biases) > 1:
            raise ValueError(
                f"{prefix}: query, key and value projections must all have biases or none "
                "(one stacked Q|K|V matmul); this checkpoint mixes them"
            )
        self.layer_name = prefix
        self.head_size = config.head_size
        self.window_size = config.window_size
        self.scale = softmax_scale(config)
        self.qkv_proj = QKVParallelLinear(
            hidden_size,
            config.head_size,
            config.heads,
            config.head_groups,
            bias=biases.pop(),
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.heads * config.head_size,
            hidden_size,
            bias=linear_bias_enabled(config, "dense_layer"),
            input_is_parallel=True,
            prefix=f"{prefix}.o_proj",
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.attn = Attention(
            self.num_heads,
            self.head_size,
            self.scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=None,
            # Fast-LLM window w: query i sees keys i-w+1 .. i; vLLM's sliding_window has the same meaning.
            per_layer_sliding_window=self.window_size,
            prefix=prefix,
            attn_backend=SupernetAttentionBackend,
        )
        device_type = vllm_config.device_config.device_type
        self.paged_attention = (
            paged_attention_cpu if uses_cpu_kernel(self.head_size, device_type) else paged_attention_reference
        )
        # Upstream's rotary tables for every position served: [positions, Dh] = cos | sin.
        angle_scales = rotary_angle_scales(config)
        self._cos_sin = None
        if angle_scales is not None:
            max_positions = vllm_config.model_config.max_model_len
            cos, sin = ops.rotary_cos_sin(angle_scales, 0, max_positions, rotary_attention_factor(config), "cpu")
            self._cos_sin = torch.cat([cos, sin], dim=-1)

    @staticmethod
    def check_parallel(config: AttentionMixerConfig, tp_size: int, where: str) -> None:
        """vLLM's sharding rules for `QKVParallelLinear`, with an error that names the mixer."""
        groups = config.head_groups
        if config.heads % tp_size or (groups % tp_size and tp_size % groups):
            raise ValueError(
                f"{where}: attention with {config.heads} heads and {groups} KV groups cannot be split over "
                f"tensor_parallel_size={tp_size} (heads must divide by it; KV groups must divide by it or "
                "it by them)"
            )

    def project(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden_states [N, D], positions [N] -> query [N, Hq, Dh], key, value [N, Hkv, Dh] (rotated)."""
        num_tokens = hidden_states.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)
        # [N, Hq + 2 Hkv, Dh] (this rank's heads): query heads, key heads, value heads.
        qkv = qkv.view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_size)
        query_key, value = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self._cos_sin is not None:
            if self._cos_sin.device != positions.device:
                self._cos_sin = self._cos_sin.to(positions.device)
            cos, sin = self._cos_sin.index_select(0, positions)[:, None].chunk(2, dim=-1)  # [N, 1, Dh/2]
            query_key = ops.apply_rotary(query_key, cos, sin)  # queries and keys rotated together
        query, key = query_key.split([self.num_heads, self.num_kv_heads], dim=1)
        return query, key, value

    def run(self, hidden_states: torch.Tensor, positions: torch.Tensor, step: StepRequests) -> torch.Tensor:
        """hidden_states [N, D], positions [N] of `step`'s tokens -> [N, D]."""
        query, key, value = self.project(hidden_states, positions)
        metadata = layer_metadata(self.layer_name)
        if metadata is None:  # dummy run: no cache to read or write
            attended = torch.zeros_like(query)
        else:
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
        output, _ = self.o_proj(attended.flatten(1))
        return output

    def forward_on_cache(self, hidden_states: torch.Tensor, positions: torch.Tensor, cache: KVBuffer) -> torch.Tensor:
        """One sequence's next tokens on a cache of its own (the speculative draft's), outside vLLM's
        paged cache: hidden_states [T, D], positions [T] (following the cache's) -> [T, D]."""
        query, key, value = self.project(hidden_states, positions)
        cache.append(key, value)
        first_key = 0 if self.window_size is None else max(0, int(positions[0]) - (self.window_size - 1))
        keys, values = cache.since(first_key)  # [S, Hkv, Dh]
        attended = attend(
            query, keys, values, positions,
            torch.arange(first_key, cache.length, device=positions.device), self.scale, self.window_size,
        )
        output, _ = self.o_proj(attended.flatten(1))
        return output


class KVBuffer:
    """One sequence's keys and values in fixed buffers [C, Hkv, Dh] (views of a draft slot, `speculative.py`):
    position p lies in row p % C, so the buffer holds the last C positions (full attention: C = max_model_len,
    all of them; sliding window: C covers the window, one forward and the drafts a rejection takes back,
    `footprint.CacheFootprints.draft_slot`). `length` positions have been written; going back to an earlier
    length (a rejected draft) is setting it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.length = 0

    def _rows(self, first: int, end: int) -> slice | torch.Tensor:
        capacity = self.keys.shape[0]
        if end - first > capacity:
            raise ValueError(f"positions {first}..{end - 1} do not fit a KV buffer of {capacity} tokens")
        start = first % capacity
        if start + end - first <= capacity:
            return slice(start, start + end - first)
        return torch.arange(first, end, device=self.keys.device) % capacity

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        end = self.length + key.shape[0]
        rows = self._rows(self.length, end)
        self.keys[rows] = key
        self.values[rows] = value
        self.length = end

    def since(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions first .. length - 1."""
        rows = self._rows(first, self.length)
        return self.keys[rows], self.values[rows]


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Causal (sliding-window) attention of one sequence: query [T, Hq, D] at `query_positions` [T] over
    keys/values [S, Hkv, D] at `key_positions` [S] -> [T, Hq, D]."""
    allowed = ops.attention_mask(query_positions, key_positions, window)  # [T, S]
    # enable_gqa: query head h reads KV group h // (Hq / Hkv), as in the reference mixer.
    attended = F.scaled_dot_product_attention(
        query.transpose(0, 1), keys.to(query.dtype).transpose(0, 1), values.to(query.dtype).transpose(0, 1),
        attn_mask=allowed, scale=scale, enable_gqa=True,
    )
    return attended.transpose(0, 1)


# ---- the KV cache backend --------------------------------------------------------------------------


@dataclass
class PagedAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [R + 1] request r's tokens are query_start_loc[r] .. [r+1]
    seq_lens: list[int]  # [R] context length including this step's tokens
    block_table: torch.Tensor  # [R, max_blocks] kernel block ids
    slot_mapping: torch.Tensor  # [num_tokens] cache slot per token, -1 for padding
    isa: str = "vec"  # the CPU kernel's instruction set for this cache group (cpu_attn._get_attn_isa)
    # Per-step memo of the CPU kernel's per-subset inputs, shared by the group's layers.
    _subsets: dict = field(default_factory=dict)


class SupernetAttentionMetadataBuilder(AttentionMetadataBuilder[PagedAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # The CPU kernel's instruction set for this group's block and head sizes, chosen as vLLM's
        # CPUAttentionMetadataBuilder chooses it (unused by the reference path).
        self.isa = _get_attn_isa(
            vllm_config.model_config.dtype,
            kv_cache_spec.block_size,
            kv_cache_spec.head_size,
            vllm_config.cache_config.cache_dtype,
        )

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> PagedAttentionMetadata:
        m = common_attn_metadata
        return PagedAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: m.num_reqs + 1].tolist(),
            seq_lens=m.seq_lens[: m.num_reqs].cpu().tolist(),
            block_table=m.block_table_tensor[: m.num_reqs],
            slot_mapping=m.slot_mapping[: m.num_actual_tokens],
            isa=self.isa,
        )


class SupernetAttentionImpl(AttentionImpl):
    """Holds the layer's constants; the computation is `paged_attention_*`, called by the mixer."""

    # vLLM's `Attention` passes these positionally (num_heads, head_size, scale, num_kv_heads, alibi_slopes,
    # sliding_window, ...); the rest (cache dtype, soft cap, ...) are not used by the mixers.
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None, *args, **kwargs):
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window

    def forward(self, *args, **kwargs):
        raise NotImplementedError("supernet attention mixers call paged_attention_cpu/_reference themselves")


class SupernetAttentionBackend(CPUAttentionBackend):
    # The mixer writes the cache itself (inside `paged_attention_*`).
    forward_includes_kv_cache_update: bool = True

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any: sizes vLLM's CPU kernel does not take run the reference path

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # vLLM's CPU kernel takes any multiple of 16 tokens (its slower "vec16" path where 32 does not divide;
        # the reference path any size). Which step a hybrid supernet's pages take: `block_step`.
        return [MultipleOf(BLOCK_STEP)]

    @staticmethod
    def get_impl_cls() -> type[SupernetAttentionImpl]:
        return SupernetAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SupernetAttentionMetadataBuilder]:
        return _DeferredAttentionMetadataBuilder


_DeferredAttentionMetadataBuilder = deferred_builder(SupernetAttentionMetadataBuilder)


# ---- paged attention on a subset of the batch: vLLM's CPU kernel and the PyTorch reference --------


def uses_cpu_kernel(head_size: int, device_type: str) -> bool:
    return device_type == "cpu" and head_size in CPUAttentionBackend.get_supported_head_sizes()


@dataclass
class _SubsetPlan:
    """One request subset's attention inputs, computed once per step (the cache group's layers
    share the metadata that holds them): where its tokens' K/V go, and the kernel's inputs."""

    write_slots: torch.Tensor  # [n] cache slot of each real token of the subset
    write_rows: torch.Tensor | None  # [n] which of the subset's rows those are; None: rows 0..n-1
    num_tokens: int  # the subset's real (scheduled) tokens, the first rows of its query
    query_start_loc: torch.Tensor  # [r + 1] int32
    seq_lens: torch.Tensor  # [r] int32
    block_table: torch.Tensor  # [r, max_blocks]
    schedules: dict = field(default_factory=dict)  # (heads, window, dtype) -> kernel schedule

    @classmethod
    def of(cls, metadata: PagedAttentionMetadata, requests: list[int], token_index) -> _SubsetPlan:
        key = tuple(requests)
        if key not in metadata._subsets:
            lengths = [metadata.query_start_loc[r + 1] - metadata.query_start_loc[r] for r in requests]
            if token_index is None:  # the whole batch: its first num_actual_tokens rows are real
                slots = metadata.slot_mapping[: metadata.num_actual_tokens]
            else:
                slots = metadata.slot_mapping.index_select(0, token_index)
            valid = slots >= 0  # padding has slot -1
            all_valid = bool(valid.all())
            all_requests = len(requests) == len(metadata.seq_lens)
            metadata._subsets[key] = cls(
                write_slots=slots if all_valid else slots[valid],
                write_rows=None if all_valid else valid.nonzero()[:, 0],
                num_tokens=sum(lengths),
                query_start_loc=torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32),
                seq_lens=torch.tensor([metadata.seq_lens[r] for r in requests], dtype=torch.int32),
                block_table=metadata.block_table if all_requests else metadata.block_table[requests],
            )
        return metadata._subsets[key]

    def rows_to_write(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The subset's key/value rows that `write_slots` receive (padding rows dropped)."""
        if self.write_rows is None:
            return key[: len(self.write_slots)], value[: len(self.write_slots)]
        return key.index_select(0, self.write_rows), value.index_select(0, self.write_rows)


def paged_attention_cpu(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: PagedAttentionMetadata,
    requests: list[int],
    token_index: torch.Tensor | None,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Same contract as `paged_attention_reference`, with vLLM's CPU kernels."""
    from vllm import _custom_ops as vllm_ops
    from vllm import envs

    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    num_heads, head_size = query.shape[1], query.shape[2]
    # [num_blocks, Hkv, 2 * block_size, D]: keys in the first half of each block, values in the second.
    blocks = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
    key_cache, value_cache = blocks.chunk(2, dim=2)
    plan = _SubsetPlan.of(metadata, requests, token_index)
    key_w, value_w = plan.rows_to_write(key, value)
    vllm_ops.cpu_attn_reshape_and_cache(key_w, value_w, key_cache, value_cache, plan.write_slots, metadata.isa)

    sliding_window = -1 if window is None else window  # the kernel's "no window"
    schedule_key = (num_heads, window, query.dtype)
    if schedule_key not in plan.schedules:
        plan.schedules[schedule_key] = vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(requests),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_size,
            seq_lens=plan.seq_lens,
            dtype=query.dtype,
            query_start_loc=plan.query_start_loc,
            causal=True,
            sliding_window_size=sliding_window,
            isa=metadata.isa,
            # As CPUAttentionBackend does: a long sequence's keys are split into partitions worked on apart.
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        )

    # Rows past the subset's real tokens (padding) stay zero; the kernel writes all the others.
    num_tokens = plan.num_tokens
    output = torch.empty_like(query) if num_tokens == query.shape[0] else torch.zeros_like(query)
    vllm_ops.cpu_attention_with_kv_cache(
        query=query[:num_tokens],
        key_cache=key_cache,
        value_cache=value_cache,
        output=output[:num_tokens],
        query_start_loc=plan.query_start_loc,
        seq_lens=plan.seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=sliding_window,
        block_table=plan.block_table,
        softcap=0.0,
        scheduler_metadata=plan.schedules[schedule_key],
        s_aux=None,
    )
    return output


def paged_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: PagedAttentionMetadata,
    requests: list[int],
    token_index: torch.Tensor | None,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Write this step's K/V of `requests` into the cache and attend.

    query [N, Hq, D], key/value [N, Hkv, D]: the tokens of `requests` (batch request indices, in
    order), concatenated; `token_index` [N] their positions in the full batch (None: the whole
    batch, requests = all). kv_cache: [num_blocks, Hkv, block_size, 2 * D]. Returns [N, Hq, D].
    """
    block_size, head_size = kv_cache.shape[2], query.shape[-1]
    plan = _SubsetPlan.of(metadata, requests, token_index)
    key_w, value_w = plan.rows_to_write(key, value)
    blocks, offsets = plan.write_slots // block_size, plan.write_slots % block_size
    kv_cache[blocks, :, offsets, :head_size] = key_w.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_size:] = value_w.to(kv_cache.dtype)

    output = torch.zeros_like(query)  # padding tokens stay zero
    start = 0
    for request in requests:
        num_query = metadata.query_start_loc[request + 1] - metadata.query_start_loc[request]
        if num_query == 0:
            continue
        context = metadata.seq_lens[request]
        first_query = context - num_query
        # Keys this request's queries may see: all of them, or the window of the first query.
        first_key = 0 if window is None else max(0, first_query - (window - 1))
        positions = torch.arange(first_key, context, device=query.device)
        key_blocks = metadata.block_table[request, positions // block_size]
        cached = kv_cache[key_blocks, :, positions % block_size]  # [S, Hkv, 2D]
        query_positions = torch.arange(first_query, context, device=query.device)
        output[start : start + num_query] = attend(
            query[start : start + num_query], cached[..., :head_size], cached[..., head_size:],
            query_positions, positions, scale, window,
        )
        start += num_query
    return output

