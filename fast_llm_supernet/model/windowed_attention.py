"""`fast_llm_supernet.model.windowed_attention`: sliding-window attention at window cost, through FlexAttention
(torch core) with a sliding-window block mask.

SDPA's fused kernels take no window, so a window needs an explicit [T, T] mask, and with a mask SDPA computes
every query-key pair: at T = 16384, window 4096, 16 heads of 128, bf16 on an H200, 7.46 ms forward against full
attention's 1.75 ms. A block mask lets FlexAttention skip the key blocks outside every query's window, so the
cost follows the window (1.31 ms there).

Where it runs: whole sequences (training, evaluation, prefill: no cached keys before the queries) on CUDA, through
`torch.compile`d FlexAttention. Elsewhere the attention mixer keeps its dense-mask path: on CPU FlexAttention has
no backward and compiles C++ per shape, and a decode step's one query needs no mask worth skipping. If
FlexAttention fails on a device (an old torch, an unsupported head size), that device goes back to the dense
path with a warning rather than stopping a run.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = None

# Device types FlexAttention runs on here (compiled); tests add "cpu" to run its eager forward against the dense path.
FLEX_DEVICE_TYPES = frozenset({"cuda"})
_failed_devices: set[str] = set()


def usable(query: torch.Tensor) -> bool:
    """Whether `sliding_window_attention` takes `query` [B, H, T, D]: a FlexAttention device, and a head size
    its kernels tile (a power of two, at least 16)."""
    head_size = query.shape[-1]
    return (
        flex_attention is not None
        and query.device.type in FLEX_DEVICE_TYPES
        and str(query.device) not in _failed_devices
        and head_size >= 16
        and head_size & (head_size - 1) == 0
    )


@functools.lru_cache(maxsize=16)
def sliding_window_block_mask(length: int, window: int, device: str) -> BlockMask:
    """Query i attends keys i-w+1 .. i (`ops.attention_mask` with a window), for `length` queries and keys."""

    def in_window(batch, head, query, key):
        distance = query - key
        return (distance >= 0) & (distance < window)

    return create_block_mask(in_window, None, None, length, length, device=device)


@functools.cache
def _compiled_flex_attention():
    # Static shapes: a run sees a few sequence lengths (training, evaluation, prefill), each compiled once.
    return torch.compile(flex_attention, dynamic=False)


def sliding_window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, scale: float
) -> torch.Tensor | None:
    """Causal attention of query [B, H, T, D] over key, value [B, G, T, D] (query head h reads KV group
    h // (H / G)) within `window`; [B, H, T, D], or None when FlexAttention failed (the caller's dense path runs)."""
    # Compiled where it is fast; eager elsewhere (only tests reach it: CPU's eager forward, the reference path).
    kernel = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    try:
        block_mask = sliding_window_block_mask(query.shape[2], window, str(query.device))
        return kernel(
            query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
        )
    except Exception as error:  # never stop a run for a faster path: fall back, loudly, once per device
        _failed_devices.add(str(query.device))
        logger.warning(
            "FlexAttention failed on %s (%s: %s); sliding-window attention uses the dense-mask path there",
            query.device, type(error).__name__, error,
        )
        return None
