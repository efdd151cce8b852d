"""The attention backend that gives supernet attention mixers their vLLM KV cache.

vLLM internals relied on:
- `Attention(..., attn_backend=...)` (vllm/model_executor/layers/attention/attention.py) accepts a
  backend class; the runner then asks the layer for it (`Attention.get_attn_backend`) and builds
  metadata with `backend.get_builder_cls()`. `get_name()` must name an existing enum member, so the
  class reuses `CPU_ATTN`'s name and cache layout (`KVCacheLayout.LBHNC`: each layer's cache is
  `[num_blocks, num_kv_heads, block_size, 2 * head_size]`; how K and V sit inside a block is up to
  the kernel, see `paged_attention.py`).
- `CommonAttentionMetadata` (vllm/v1/attention/backend.py): `query_start_loc_cpu`, `seq_lens`
  (context length after this step), `block_table_tensor`, `slot_mapping` (-1: padding token).
- SWA groups (`SlidingWindowSpec`) keep blocks for the last `window - 1` computed tokens plus the new
  ones; earlier table entries may point at the null block, so only the window is ever gathered.
"""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa

from vllm_supernet.paged_attention import PagedAttentionMetadata


class SupernetAttentionMetadataBuilder(AttentionMetadataBuilder[PagedAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # The CPU kernel's instruction set for this group's block and head sizes, chosen the way
        # vLLM's CPUAttentionMetadataBuilder chooses it (unused by the reference path).
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
    """Holds the layer's constants; the computation is in `paged_attention.py` (called by the mixer)."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes=None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        raise NotImplementedError(
            "supernet attention layers call vllm_supernet.paged_attention (paged_attention_cpu/_reference)"
        )


class SupernetAttentionBackend(CPUAttentionBackend):
    # The mixer writes the cache itself (inside `paged_attention_*`).
    forward_includes_kv_cache_update: bool = True

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any: sizes vLLM's CPU kernel does not take run the reference path (paged_attention.py)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @staticmethod
    def get_impl_cls() -> type[SupernetAttentionImpl]:
        return SupernetAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SupernetAttentionMetadataBuilder]:
        return SupernetAttentionMetadataBuilder
