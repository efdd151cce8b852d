"""Paged causal attention over vLLM's KV cache, on any subset of a batch: a kernel and its reference.

A supernet layer runs each attention mixer on just the requests whose placement picked it, so both
functions take the batch's metadata plus the subset (`requests`, `token_index`) and write/attend
for those requests only.

* `paged_attention_cpu`: vLLM's CPU attention kernels (`cpu_attn_reshape_and_cache`,
  `get_scheduler_metadata`, `cpu_attention_with_kv_cache`, vllm/_custom_ops.py), the ones vLLM's
  own `CPUAttentionBackend` (vllm/v1/attention/backends/cpu_attn.py) runs. They take only the head
  sizes `CPUAttentionBackend.get_supported_head_sizes()` lists (32..512), keep keys in an ISA-specific
  layout inside each block, and plan the work over a batch with a schedule: here one schedule per
  (request subset, window), computed once per step and shared by every layer of the cache group.
* `paged_attention_reference`: plain PyTorch, any head size (upstream test exports use 16), the
  same math as the reference mixer (`fast_llm_supernet.model.attention.Attention`): each request's
  queries attend with `F.scaled_dot_product_attention` over the keys they may see.

The two lay the cache out differently, so a layer uses one of them for its whole life
(`uses_cpu_kernel`). The vLLM side (backend, metadata builder) is `attention_backend.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fast_llm_supernet.model.ops import attention_mask


def uses_cpu_kernel(head_size: int, device_type: str) -> bool:
    if device_type != "cpu":
        return False
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return head_size in CPUAttentionBackend.get_supported_head_sizes()


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


@dataclass
class _SubsetPlan:
    """The CPU kernel's inputs for one request subset, computed once per step (the cache group's
    layers share the metadata that holds them): where its tokens' K/V go, and the attention inputs."""

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
    from vllm import _custom_ops as ops
    from vllm import envs

    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    num_heads, head_size = query.shape[1], query.shape[2]
    # [num_blocks, Hkv, 2 * block_size, D]: keys in the first half of each block, values in the second.
    blocks = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_size)
    key_cache, value_cache = blocks.chunk(2, dim=2)
    plan = _SubsetPlan.of(metadata, requests, token_index)
    key_w, value_w = plan.rows_to_write(key, value)
    ops.cpu_attn_reshape_and_cache(key_w, value_w, key_cache, value_cache, plan.write_slots, metadata.isa)

    sliding_window = -1 if window is None else window  # the kernel's "no window"
    schedule_key = (num_heads, window, query.dtype)
    if schedule_key not in plan.schedules:
        plan.schedules[schedule_key] = ops.cpu_attn_get_scheduler_metadata(
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
    ops.cpu_attention_with_kv_cache(
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
        keys = cached[..., :head_size].to(query.dtype).transpose(0, 1)  # [Hkv, S, D]
        values = cached[..., head_size:].to(query.dtype).transpose(0, 1)
        query_positions = torch.arange(first_query, context, device=query.device)
        allowed = attention_mask(query_positions, positions, window)  # [T, S]
        q = query[start : start + num_query].transpose(0, 1)  # [Hq, T, D]
        # enable_gqa: query head h reads KV group h // (Hq / Hkv), as in the reference mixer.
        attended = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed, scale=scale, enable_gqa=True
        )
        output[start : start + num_query] = attended.transpose(0, 1)
        start += num_query
    return output
