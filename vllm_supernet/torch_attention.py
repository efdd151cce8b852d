"""Paged causal attention in plain PyTorch, for vLLM's KV cache, on any subset of a batch.

Why not vLLM's CPU attention kernel: it supports head sizes 32..512 only (`CPUAttentionBackend.
get_supported_head_sizes`, vllm/v1/attention/backends/cpu_attn.py; upstream test exports use 16),
and its scheduler metadata covers the whole batch, while a supernet layer runs each attention
mixer on just the requests whose placement picked it. This backend keeps vLLM's cache layout and
block tables (so vLLM's KV manager, prefix caching and sliding-window block freeing all apply) and
computes each request's attention with `F.scaled_dot_product_attention` over the keys it may see,
the same math as the reference model (`fast_llm_supernet.mixers.attention.Attention`).

The vLLM side (backend, metadata builder) is `attention_backend.py`; this module is pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TorchAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [R + 1] request r's tokens are query_start_loc[r] .. [r+1]
    seq_lens: list[int]  # [R] context length including this step's tokens
    block_table: torch.Tensor  # [R, max_blocks] kernel block ids
    slot_mapping: torch.Tensor  # [num_tokens] cache slot per token, -1 for padding


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: TorchAttentionMetadata,
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
    num_kv_heads, block_size, head_size = kv_cache.shape[1], kv_cache.shape[2], query.shape[-1]
    slots = metadata.slot_mapping if token_index is None else metadata.slot_mapping[token_index]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key_w, value_w = slots[valid], key[valid], value[valid]
    else:
        key_w, value_w = key, value
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :head_size] = key_w.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_size:] = value_w.to(kv_cache.dtype)

    heads_per_group = query.shape[1] // num_kv_heads
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
        if heads_per_group > 1:  # query head h reads KV group h // heads_per_group
            keys = keys.repeat_interleave(heads_per_group, dim=0)
            values = values.repeat_interleave(heads_per_group, dim=0)
        query_positions = torch.arange(first_query, context, device=query.device)
        distance = query_positions[:, None] - positions[None, :]  # [T, S]
        allowed = distance >= 0
        if window is not None:
            allowed &= distance < window
        q = query[start : start + num_query].transpose(0, 1)  # [Hq, T, D]
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)
        output[start : start + num_query] = attended.transpose(0, 1)
        start += num_query
    return output
