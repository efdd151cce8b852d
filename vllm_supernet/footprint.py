"""What a placement holds in the cache: pages at a given length, bytes per token, fixed state bytes.

With allocation by placement (`cache_allocation.py`) a request holds, in each (layer, mixer) its placement
runs, what vLLM's manager of that group gives it: full attention one page per `block_size` tokens, sliding
window at most the window plus one prefill chunk, a linear mixer (GDN, KDA) one state page (one per draft
position more when the deployment speculates). Every page has one size (vLLM unifies them: attention pages of
`block_size` tokens, state pages padded to it), and the pool has `num_gpu_blocks - 1` of them (block 0 is
vLLM's null block). A linear mixer's state too large for an attention page of `STATE_PAGE_TOKENS` tokens is
spread over several pages (`state_parts`), each holding an equal range of its heads, as the ranks of a larger
tensor-parallel group would: attention then keeps pages of vLLM's own size, so a request pays for at most one
part-filled page per attention layer whatever the deployment's linear mixers hold. Where the convolution states
live beside the pool (`page_layout`), a page costs its row of that table too (`block_bytes`).

These counts serve three checks, all in the words of `CacheFootprints.too_long`: a request that could not
fit the whole pool at its maximum length is a 400 at admission (`patches.py`), a deployment whose default
placement cannot fit one `max_model_len` request fails at start-up, and the presets endpoint lists each
served preset's bytes per token and fixed bytes.

A speculating deployment's draft caches (`speculative.py`) live in draft slots carved out of the same memory
before vLLM sizes its pool: `CacheFootprints.draft_slot` lays a draft placement's caches out in one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.utils.math_utils import cdiv

from shared_spec import Apriel2TextConfig, AttentionMixerConfig, MixerKind, Placement
from vllm_supernet.page_layout import PageLayout, conv_states_choice
from vllm_supernet.placements import ServingPlacements

# Tokens the self-speculator's draft runs per forward when it catches up on a request: with the window and the
# drafts it may take back, what a sliding-window draft cache keeps (`CacheFootprints.draft_slot`).
DRAFT_CHUNK_TOKENS = 512
# Each tensor of a draft slot starts on a multiple of this many bytes (a cache line; any dtype's alignment).
DRAFT_ALIGNMENT = 64


# A linear mixer's state is spread over as many pages as it takes for each to hold no more than this many tokens
# of the deployment's widest attention (vLLM's own block size on CPU, so all-FA requests hold Llama's pages).
STATE_PAGE_TOKENS = 128
PARTS_OVERRIDE_KEY = "supernet_state_parts"  # hf_overrides: `auto` (the default) or a number of pages per state


@dataclass(frozen=True)
class MixerCache:
    """One served (layer, mixer)'s cache on one rank."""

    kind: MixerKind
    token_bytes: int = 0  # attention: K and V of one token
    window: int | None = None  # sliding window: tokens it keeps
    state_bytes: int = 0  # linear mixer: one page of its state (conv + delta rule of one part)
    conv_bytes: int = 0  # linear mixer: the convolution part of `state_bytes`
    shapes: tuple = ()  # attention: (KV heads, head size) of one token's keys; linear mixer: (conv, recurrent) state shapes
    parts: int = 1  # linear mixer: pages its state is spread over, each an equal range of its heads
    page_shapes: tuple = ()  # linear mixer: (conv, recurrent) shapes of one part


def state_parts_choice(model_config) -> str | int:
    """The deployment's `supernet_state_parts` (`auto` by default; 1 with vLLM's own grouping, kept as it was)."""
    from vllm_supernet.cache_allocation import allocates_by_placement

    choice = getattr(model_config.hf_config, PARTS_OVERRIDE_KEY, None) or "auto"
    if choice != "auto" and not (isinstance(choice, int) and choice >= 1):
        raise ValueError(f"{PARTS_OVERRIDE_KEY} = {choice!r}; allowed: auto, or a positive number of pages per state")
    return choice if allocates_by_placement(model_config) else 1


def state_parts(allowed: list[int], delta_rule_bytes: int, attention_token_bytes: int, choice: str | int, where: str) -> int:
    """Pages a linear mixer's state is spread over, of the counts its heads `allowed`
    (`LinearMixerLayer.allowed_parts`): `choice`, or (`auto`) the fewest whose delta-rule part fits
    `STATE_PAGE_TOKENS` tokens of attention (the most allowed if none does; 1 where no attention is served)."""
    if choice != "auto":
        if choice not in allowed:
            raise ValueError(f"{where}: {PARTS_OVERRIDE_KEY} = {choice} does not split its heads evenly; "
                             f"allowed: auto, {', '.join(map(str, allowed))}")  # fmt: skip
        return choice
    if not attention_token_bytes:
        return 1
    page = STATE_PAGE_TOKENS * attention_token_bytes
    return next((parts for parts in allowed if delta_rule_bytes <= page * parts), allowed[-1])


def mixer_caches(config: Apriel2TextConfig, serving: ServingPlacements, dtype: torch.dtype, state_dtypes, tp_size: int,
                 parts_choice: str | int = 1):  # fmt: skip
    """{(layer, mixer name): MixerCache} of every served mixer, one rank's share."""
    from vllm_supernet.model import mixer_layer, served_mixer_configs

    served = list(served_mixer_configs(config, serving))
    token_bytes = attention_token_bytes([mixer for _, _, mixer in served], dtype, tp_size)
    caches = {}
    for layer, name, mixer in served:
        if isinstance(mixer, AttentionMixerConfig):
            caches[layer, name] = attention_cache(mixer, dtype, tp_size)
            continue
        where = f"layer {layer} mixer {name!r}"
        layer_class = mixer_layer(mixer)
        shapes = layer_class.page_shapes(mixer, tp_size, where)
        delta_rule = torch.Size(shapes[1]).numel() * state_dtypes[1].itemsize
        parts = state_parts(layer_class.allowed_parts(mixer, tp_size), delta_rule, token_bytes, parts_choice, where)
        page_shapes = layer_class.part_shapes(mixer, tp_size, parts)
        conv, delta_rule = (torch.Size(shape).numel() * d.itemsize for shape, d in zip(page_shapes, state_dtypes, strict=True))
        caches[layer, name] = MixerCache(MixerKind.of(mixer), state_bytes=conv + delta_rule, conv_bytes=conv,
                                         shapes=tuple(map(tuple, shapes)), parts=parts, page_shapes=page_shapes)  # fmt: skip
    return caches


def attention_cache(mixer: AttentionMixerConfig, dtype: torch.dtype, tp_size: int) -> MixerCache:
    kv_heads = max(mixer.head_groups // tp_size, 1)  # replicated when the ranks outnumber them
    return MixerCache(MixerKind.of(mixer), token_bytes=2 * kv_heads * mixer.head_size * dtype.itemsize,
                      window=mixer.window_size, shapes=(kv_heads, mixer.head_size))  # fmt: skip


def attention_token_bytes(mixers: list, dtype: torch.dtype, tp_size: int) -> int:
    """Keys and values of one token (one rank) in the attention mixer of `mixers` that holds the most (0: none)."""
    attention = [mixer for mixer in mixers if isinstance(mixer, AttentionMixerConfig)]
    return max((attention_cache(mixer, dtype, tp_size).token_bytes for mixer in attention), default=0)


@dataclass(frozen=True)
class DraftSlotLayout:
    """A draft placement's caches in one draft slot (one rank): per layer, whether it is attention (keys, values)
    or a linear mixer (1 + k (conv, recurrent) states), and each tensor's (byte offset, shape, dtype)."""

    layers: list[tuple[bool, list[tuple[int, tuple[int, ...], torch.dtype]]]]
    bytes: int


class CacheFootprints:
    """Pages and bytes a request of each placement holds (one rank's pool; every rank holds the same count)."""

    def __init__(self, caches: dict, block_size: int, chunk_tokens: int, speculative_tokens: int, tp_size: int,
                 dtype: torch.dtype = torch.float32, max_model_len: int = 0, conv_states: str = "auto"):  # fmt: skip
        self.caches = caches
        self.block_size = block_size  # tokens per attention page
        self.chunk_tokens = chunk_tokens  # the scheduler's token budget per step (a prefill chunk)
        self.speculative_tokens = speculative_tokens
        self.tp_size = tp_size
        self.dtype = dtype  # the model's: attention keys and values, convolution states of a draft
        self.max_model_len = max_model_len
        self._draft_slots: dict[tuple[str, ...], DraftSlotLayout] = {}  # by the placement's mixers
        self.layout = PageLayout.of_caches(caches, block_size, conv_states)
        self.page_bytes = self.layout.page_bytes  # a page of vLLM's pool
        self.block_bytes = self.layout.block_bytes  # what a page costs: with its convolution-state row, if any

    @classmethod
    def of(cls, vllm_config, block_size: int | None = None) -> CacheFootprints:
        """The deployment's footprints; `block_size`: tokens per attention page (default: the cache config's,
        which the engine enlarges at start-up to fit a state page and reports back to the frontend)."""
        from vllm_supernet.linear_mixer import state_dtypes

        speculative = vllm_config.speculative_config
        return cls.of_model(
            vllm_config.model_config,
            tp_size=vllm_config.parallel_config.tensor_parallel_size,
            block_size=block_size or vllm_config.cache_config.block_size,
            chunk_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            speculative_tokens=speculative.num_speculative_tokens if speculative else 0,
            state_dtypes=state_dtypes(vllm_config),
        )

    @classmethod
    def of_model(cls, model_config, *, tp_size: int = 1, block_size: int = 16, chunk_tokens: int = 2048,
                 speculative_tokens: int = 0, state_dtypes=None) -> CacheFootprints:  # fmt: skip
        """From the model config alone (the API server's presets listing): one rank of `tp_size`."""
        if state_dtypes is None:  # vLLM's defaults: convolution states in the model dtype, delta-rule states in float32
            state_dtypes = (model_config.dtype, torch.float32)
        caches = mixer_caches(model_config.hf_config.apriel2(), ServingPlacements.from_model_config(model_config),
                              model_config.dtype, state_dtypes, tp_size, state_parts_choice(model_config))  # fmt: skip
        return cls(caches, block_size, chunk_tokens, speculative_tokens, tp_size, model_config.dtype, model_config.max_model_len,
                   conv_states_choice(model_config))  # fmt: skip

    def _used(self, placement: Placement):
        return [self.caches[layer, name] for layer, name in enumerate(placement.mixers) if (layer, name) in self.caches]

    def pages(self, placement: Placement, num_tokens: int) -> int:
        """Pages a request of `placement` holds at `num_tokens` tokens (its admission count)."""
        attention_blocks = cdiv(num_tokens, self.block_size)
        total = 0
        for cache in self._used(placement):
            if cache.state_bytes:
                total += (1 + self.speculative_tokens) * cache.parts
            elif cache.window is not None:
                kept = cdiv(cache.window - 1 + self.chunk_tokens, self.block_size) + 1
                total += min(attention_blocks, kept)
            else:
                total += attention_blocks
        return total

    def bytes_per_token(self, placement: Placement) -> int:
        """Cache bytes each further token adds (full-attention layers), all ranks."""
        return self.tp_size * sum(c.token_bytes for c in self._used(placement) if c.window is None)

    def fixed_bytes(self, placement: Placement) -> int:
        """Cache bytes that do not grow with the context (state pages, as many more per draft position when the
        deployment speculates; full windows), all ranks."""
        return self.tp_size * sum(c.state_bytes * c.parts * (1 + self.speculative_tokens) + (c.token_bytes * c.window if c.window else 0)
                                  for c in self._used(placement))  # fmt: skip

    def too_long(self, placement: Placement, num_tokens: int, num_pages: int) -> str | None:
        """None if a request of `placement` fits a pool of `num_pages` usable pages at `num_tokens` tokens,
        else the reason, naming what it needs and what the deployment has."""
        needed = self.pages(placement, num_tokens)
        if needed <= num_pages:
            return None
        mib = 2**20
        return (
            f"placement {placement.canonical!r} needs {needed} cache pages ({needed * self.block_bytes / mib:.1f} MiB "
            f"per rank) for {num_tokens} tokens, but this deployment's cache has {num_pages} pages "
            f"({num_pages * self.block_bytes / mib:.1f} MiB per rank); ask for fewer tokens (prompt + max_tokens), "
            "a placement with fewer full-attention layers, or start the deployment with more cache memory"
        )

    def draft_slot(self, placement: Placement) -> DraftSlotLayout:
        """How the self-speculator's caches of draft `placement` lie in one draft slot (one rank), and the bytes
        they need: per attention layer keys and values [C, KV heads, head size] in the model dtype, a ring of C
        tokens (full attention: C = max_model_len, every position; sliding window: the window, one catch-up forward
        and the drafts it may take back, `attention.KVBuffer`); per linear mixer 1 + k convolution (model dtype) and
        delta-rule (float32) states: the k states the drafts of a round leave, which a rejection goes back to, and
        the next round's first (`speculative.SelfSpeculator.keep_states`)."""
        layout = self._draft_slots.get(tuple(placement.mixers))
        if layout is not None:
            return layout
        offset, layers = 0, []
        for cache in self._used(placement):
            if cache.token_bytes:
                capacity = self.max_model_len
                if cache.window is not None:
                    kept = cache.window - 1 + max(DRAFT_CHUNK_TOKENS, self.speculative_tokens)
                    capacity = min(capacity, kept)
                tensors = [((capacity, *cache.shapes), self.dtype)] * 2
            else:
                conv, recurrent = cache.shapes
                tensors = [((1, *conv), self.dtype), ((1, *recurrent), torch.float32)] * (1 + self.speculative_tokens)
            placed = []
            for shape, dtype in tensors:
                placed.append((offset, shape, dtype))
                offset += cdiv(torch.Size(shape).numel() * dtype.itemsize, DRAFT_ALIGNMENT) * DRAFT_ALIGNMENT
            layers.append((bool(cache.token_bytes), placed))
        layout = self._draft_slots[tuple(placement.mixers)] = DraftSlotLayout(layers, offset)
        return layout

    def listing(self, placement: Placement) -> dict[str, int]:
        """The presets endpoint's figures for one placement."""
        return {"cache_bytes_per_token": self.bytes_per_token(placement), "fixed_cache_bytes": self.fixed_bytes(placement)}
