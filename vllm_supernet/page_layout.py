"""What a page of a supernet's cache holds: tokens per attention page, and whether the linear mixers'
convolution states sit in their state page or in a table beside the pool.

vLLM gives every page of a hybrid model one size: attention blocks long enough to hold the largest state
page, state pages padded to them (`patches._patch_block_alignment`), in steps of `attention.block_step` tokens
(32 on x86, where blocks of 16 send the CPU attention kernel down a slower path). A GDN or KDA state page is a
delta-rule state (heads x Dk x Dv in float32: often a whole number of steps) and small convolution states (the
last K - 1 inputs of each convolution channel). On the benchmark model that is 128 KiB + 6 KiB (GDN) or 9 KiB
(KDA) where a step is 32 KiB, so the convolution states alone cost a fifth step: 160 KiB pages for 134-137 KiB
states, and an all-GDN request held 1.19x its bytes (0.84x the requests of a deployment thinned to all-GDN under
one budget).

**Convolution states apart.** The state page is then the delta-rule state alone (128 KiB: no padding), and
each block of the pool has a row of a convolution-state table beside it (9 KiB, the largest conv state), addressed
by the block's id: a block belongs to one cache group at a time, so a state page's row is its own, and vLLM's block ids, prefix
caching's copies and speculation's per-draft pages carry the row along (`patches._patch_mamba_copies`,
`linear_mixer.StatePages.state_pages`). Every block then costs page + row, attention blocks included:
their keys and values fill 128 of 137 KiB. The table is carved out of the cache memory before vLLM sizes its
pool (`without_conv_table`), so pool and table stay within the budget.

**The choice** (`choose_block_size`, `supernet_conv_states` in `--hf-overrides`: `auto`, the default,
`in_page` or `apart`): the layout whose worst-used page is fuller. In the page, a linear mixer's state fills
state / page and attention fills its pages; apart, a state fills state / (page' + row) and attention
page' / (page' + row). The benchmark model: 134/160 = 0.84 in the page against 128/137 = 0.93 apart, so apart;
the upstream fixture (float32, 16-dim heads): 0.69 in the page against 0.64 apart, so in the page.

Every process derives the layout from the same two facts: conv states are apart exactly when an attention
page cannot hold a whole state page (and `in_page` was not asked for) (`PageLayout.of_caches`), so the
engine's block size, set once when the config is built, decides it everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv

OVERRIDE_KEY = "supernet_conv_states"  # hf_overrides: where the convolution states live
CHOICES = ("auto", "in_page", "apart")
ROW_ALIGNMENT = 64  # bytes: each table row starts on a cache line (any state dtype's alignment)


def conv_states_choice(model_config) -> str:
    """The deployment's `supernet_conv_states` (default `auto`), checked; `in_page` for vLLM's own grouping
    (`supernet_cache_layout: per_kind`), kept as it was to measure against."""
    from vllm_supernet.cache_allocation import allocates_by_placement

    choice = getattr(model_config.hf_config, OVERRIDE_KEY, None) or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{OVERRIDE_KEY} = {choice!r}; allowed: {', '.join(CHOICES)}")
    return choice if allocates_by_placement(model_config) else "in_page"


@dataclass(frozen=True)
class PageLayout:
    """One rank's cache pages: `page_bytes` per page of vLLM's pool (an attention page of `block_size`
    tokens; state pages padded to it) and `conv_row_bytes` per block in the convolution-state table (0:
    the convolution states are in their state page)."""

    block_size: int
    page_bytes: int
    conv_row_bytes: int = 0

    @property
    def conv_apart(self) -> bool:
        return self.conv_row_bytes > 0

    @property
    def block_bytes(self) -> int:
        """What one block of the pool costs: its page and its table row."""
        return self.page_bytes + self.conv_row_bytes

    @classmethod
    def of_caches(cls, caches, block_size: int, choice: str = "auto") -> PageLayout:
        """The layout of a deployment with these mixer caches (`footprint.mixer_caches`, one rank's) and
        attention pages of `block_size` tokens."""
        attention_page = block_size * token_bytes(caches)
        largest_state = max((c.state_bytes for c in states(caches)), default=0)
        if choice == "in_page" or attention_page == 0 or attention_page >= largest_state:
            return cls(block_size, max(attention_page, largest_state))
        delta_rule = max(c.state_bytes - c.conv_bytes for c in states(caches))
        return cls(block_size, max(attention_page, delta_rule), conv_row_bytes(caches))


def token_bytes(caches) -> int:
    """Keys and values of one token in the attention mixer that holds the most (0: no attention)."""
    return max((c.token_bytes for c in caches.values() if c.token_bytes), default=0)


def states(caches) -> list:
    """The linear mixers' caches."""
    return [c for c in caches.values() if c.state_bytes]


def conv_row_bytes(caches) -> int:
    """A row of the convolution-state table: the largest convolution state of a served linear mixer."""
    largest = max(c.conv_bytes for c in states(caches))
    return cdiv(largest, ROW_ALIGNMENT) * ROW_ALIGNMENT


def choose_block_size(caches, step: int, choice: str = "auto") -> int:
    """Tokens per attention page of a deployment holding attention and state pages, in steps of `step`: the
    smallest that holds every state page, or the smallest that holds every delta-rule state with the
    convolution states apart, whichever leaves its worst-used page fuller (`choice` may force one)."""
    step_bytes = step * token_bytes(caches)
    in_page = step * cdiv(max(c.state_bytes for c in states(caches)), step_bytes)
    apart = step * cdiv(max(c.state_bytes - c.conv_bytes for c in states(caches)), step_bytes)
    if choice == "in_page" or apart == in_page:
        return in_page
    if choice == "apart":
        return apart
    return apart if worst_use(caches, apart) > worst_use(caches, in_page) else in_page


def worst_use(caches, block_size: int) -> float:
    """The smallest share of a block's bytes that a served mixer's page uses (attention pages of the mixer with
    the most bytes per token; each linear mixer's state page), with the layout `block_size` gives."""
    layout = PageLayout.of_caches(caches, block_size)
    shares = [block_size * token_bytes(caches)] + [c.state_bytes for c in states(caches)]
    return min(shares) / layout.block_bytes


def without_conv_table(layout: PageLayout, available_memory: list[int]) -> list[int]:
    """Each rank's cache memory for vLLM's pool when a convolution-state row goes with every block: the pool's
    share page / (page + row), so that pool and table together fit what the rank has."""
    if not layout.conv_apart:
        return available_memory
    return [memory * layout.page_bytes // layout.block_bytes for memory in available_memory]


def copy_funcs(conv_apart: bool) -> tuple:
    """Prefix caching's ("align" mode) state copies of a linear mixer, in the order of its layer's kv_cache:
    whole-page copies of (conv, delta-rule) states in the page, or (delta-rule, conv) with the conv states in
    the table (`StatePages.use_conv_table`), whose copy vLLM's check of the spec's state count does not
    see (`patches._patch_mamba_copies`)."""
    from vllm.model_executor.layers.mamba.mamba_utils import get_conv_copy_spec, get_temporal_copy_spec

    return (get_temporal_copy_spec, get_conv_copy_spec) if conv_apart else (get_conv_copy_spec, get_temporal_copy_spec)


def allocate_conv_tables(runner) -> None:
    """Where the layout keeps conv states apart, give each linear mixer of the worker its conv-state table, a row
    per block: one table per place of the pool that pages occupy (the pool's tensors overlay each other, one
    per cache group, so every linear mixer shares one table with allocation by placement; a tensor of several
    layers, vLLM's own grouping, has a place per layer). Its memory was left out of the pool (`without_conv_table`)."""
    import torch

    from vllm_supernet.footprint import CacheFootprints
    from vllm_supernet.linear_mixer import StatePages

    layout = CacheFootprints.of(runner.vllm_config).layout
    if not layout.conv_apart:
        return
    config, layers = runner.kv_cache_config, runner.compilation_config.static_forward_context
    tables: dict[tuple[int, int], torch.Tensor] = {}
    for tensor in config.kv_cache_tensors:
        for index, name in enumerate(tensor.layers):
            if isinstance(layers.get(name), StatePages):
                place = (tensor.offset + index * tensor.layer_stride, tensor.block_stride)  # its block 0, and the step
                if place not in tables:
                    blocks = config.num_blocks_of(tensor)
                    tables[place] = torch.zeros(blocks, layout.conv_row_bytes, dtype=torch.int8, device=runner.device)
                layers[name].use_conv_table(tables[place])
