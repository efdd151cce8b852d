"""What the GDN and KDA layers share in vLLM: state pages, the step split, the sharded weights.

Both are `MambaBase` layers (vllm/model_executor/layers/mamba/abstract.py) whose state page holds
(conv states of all their convolutions stacked on the channel dim [C, K-1], delta-rule state
[H, Dk, Dv] in float32), sharded by head over tensor-parallel ranks as vLLM shards its own GDN
layers: each rank holds its heads' channels and states. Their metadata is vLLM's GDN metadata
(`GDNAttentionMetadataBuilder`, vllm/v1/attention/backends/gdn_attn.py:
`non_spec_state_indices_tensor` = each request's state page, already resolved for prefix caching's
"align" mode), built only in steps that run the group (`batch.DeferredMetadata`).

A step on a subset of the batch splits into one-token continuations, decoded together by the
subclass's `decode` (a kernel on the pages in place), and prefills or prefill chunks, run one by one
by the subclass's `forward_sequence` on a `LinearMixerCache` copied out of the pages and written back.

Cache layer names (the `prefix` each registers in `static_forward_context`) are the checkpoint paths,
e.g. `model.decoder.blocks.3.mixer.mixers.gdn`: exactly one integer, the layer index; several cache
layers of one decoder layer share it (vllm/v1/worker/utils.py: `bind_kv_cache`, `extract_layer_index`).

A state too large for an attention page of vLLM's size is spread over several pages (`footprint.state_parts`):
part i holds heads [i H/k, (i+1) H/k) of the delta-rule state and the convolution channels that feed them, what
rank i of a k-times larger tensor-parallel group would hold. Each part is a cache layer of its own
(`StatePages`): part 0 at the mixer's name, part i at `{name}.part{i}` (not an integer: the same layer index),
so vLLM gives it a cache group, block tables and metadata of its own, and a request holds one page of each.
vLLM finds cache layers in `static_forward_context` alone (`get_layers_from_vllm_config(vllm_config,
AttentionLayerBase)` for the specs, `bind_kv_cache_to_layers` for the pages), so a part needs no module of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.v1.attention.backends.gdn_attn import GDNAttentionBackend, GDNAttentionMetadataBuilder
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from fast_llm_supernet.model.linear_mixer import GatedRMSNorm, LinearMixerCache
from vllm_supernet.batch import StepRequests, deferred_builder, layer_metadata

# (conv state [C, K-1], delta-rule state [H, Dk, Dv]) of one rank's state.
PageShapes = tuple[tuple[int, int], tuple[int, int, int]]


def state_dtypes(vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
    """(conv, delta-rule) state dtypes: the model's, and float32 unless mamba_ssm_cache_dtype says
    otherwise (as vLLM's KDA)."""
    cache_config = vllm_config.cache_config
    return MambaStateDtypeCalculator.kda_state_dtype(
        vllm_config.model_config.dtype, cache_config.mamba_cache_dtype, cache_config.mamba_ssm_cache_dtype
    )


def head_sharded(parameter: nn.Parameter) -> nn.Parameter:
    """A per-head (or per-channel) parameter split over ranks along dim 0, loaded with vLLM's loader."""
    set_weight_attrs(parameter, {"weight_loader": sharded_weight_loader(0)})
    return parameter


def divide_heads(count: int, tp_size: int, what: str, where: str) -> int:
    if count % tp_size:
        raise ValueError(
            f"{where}: {what} = {count} does not divide by tensor_parallel_size={tp_size}; "
            f"serve it with a tensor_parallel_size that divides {count}"
        )
    return count // tp_size


def convolution_step(
    x: torch.Tensor, weight: torch.Tensor, conv_pages: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """One token of the causal depthwise convolution + SiLU for each of B requests with vLLM's CPU op
    (`causal_conv1d_update_cpu_vec`, its Qwen3.5 GDN decode path on CPU); states updated in place.

    x [B, C], weight [C, 1, K], conv_pages [num_slots, C, K-1], slots [B] -> y [B, C].
    The reference is `ops.causal_conv1d` for T = 1 (float32: equal within 5e-7).
    """
    from vllm import _custom_ops as vllm_ops

    channels, _, kernel_size = weight.shape
    return vllm_ops.causal_conv1d_update_cpu_vec(
        x, conv_pages, weight.view(channels, kernel_size), None, "silu", slots, None, -1
    )


class SupernetGatedRMSNorm(GatedRMSNorm):
    """The reference gated norm, rmsnorm(x) * weight * silu(gate) over the head dim, whose RMS norm runs
    vLLM's C++ `rms_norm` kernel on CPU (~10 us where `torch.rms_norm` of a decode step's few rows takes
    ~60 us here, once per GDN/KDA layer and step). The kernel rounds the normalised value to the model
    dtype before the weight multiplies it (bf16: one ulp off the reference; float32: within 5e-7)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x, gate)
        from vllm import _custom_ops as vllm_ops

        rows = x.to(self.weight.dtype).reshape(-1, x.shape[-1]).contiguous()
        normed = torch.empty_like(rows)
        vllm_ops.rms_norm(normed, rows, self.weight, self.eps)
        return normed.view(x.shape) * F.silu(gate)


class LinearMixerBackend(GDNAttentionBackend):
    """vLLM's GDN backend, its metadata built only when a layer of the group runs in the step."""

    @staticmethod
    def get_builder_cls() -> type[GDNAttentionMetadataBuilder]:
        return _DeferredGDNMetadataBuilder


_DeferredGDNMetadataBuilder = deferred_builder(GDNAttentionMetadataBuilder)


class StatePages(MambaBase):
    """One cache layer of a linear mixer: a page per request holding its whole state (one part) or one part of it,
    heads `heads` of the delta-rule state and conv channels `channels` (None: all of them) of the rank's."""

    def __init__(self, layer_name: str, shapes: PageShapes, dtypes: tuple, vllm_config: VllmConfig,
                 heads: slice, channels: torch.Tensor | None):  # fmt: skip
        self.layer_name = layer_name
        self.shapes, self.dtypes = shapes, dtypes
        self.vllm_config = vllm_config  # its block size, aligned after the model is built, settles `conv_apart`
        self.heads, self.channels = heads, channels
        compilation_config = vllm_config.compilation_config
        if layer_name in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {layer_name}")
        compilation_config.static_forward_context[layer_name] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))
        self.conv_in_table = False  # `use_conv_table`

    # ---- MambaBase -----------------------------------------------------------------------------

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.GDN_ATTN

    def get_attn_backend(self) -> type[GDNAttentionBackend]:
        return LinearMixerBackend

    def get_state_shape(self) -> PageShapes | tuple[tuple[int, int, int]]:
        """The state page: conv and delta-rule states, or the delta-rule state alone where the conv states
        live in the table beside the pool (`page_layout`)."""
        return self.shapes[1:] if self.conv_apart else self.shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return self.dtypes[1:] if self.conv_apart else self.dtypes

    # ---- where the states are ----------------------------------------------------------------------

    @property
    def conv_apart(self) -> bool:
        """Whether the deployment's layout keeps conv states in a table beside the pool (asked when vLLM
        builds the cache specs, after it aligned the block size)."""
        from vllm_supernet.footprint import CacheFootprints

        return CacheFootprints.of(self.vllm_config).layout.conv_apart

    def use_conv_table(self, table: torch.Tensor) -> None:
        """Keep the conv states in `table` [num_blocks, row bytes] (int8), a row per block beside the pool:
        vLLM bound this layer's pages ([delta-rule states]); its kv_cache becomes [delta-rule states, conv
        states], the order of `page_layout.copy_funcs(conv_apart=True)` (prefix caching's copies)."""
        (recurrent_pages,) = self.kv_cache
        conv_shape, conv_dtype = self.shapes[0], self.dtypes[0]
        row = torch.Size(conv_shape).numel() * conv_dtype.itemsize
        conv_pages = table[:, :row].view(conv_dtype).view(table.shape[0], *conv_shape)
        self.kv_cache = [recurrent_pages, conv_pages]
        self.conv_in_table = True

    @property
    def state_pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv states [num_blocks, C, K-1], delta-rule states [num_blocks, H, Dk, Dv]) of every block."""
        if self.conv_in_table:
            recurrent_pages, conv_pages = self.kv_cache
        else:
            conv_pages, recurrent_pages = self.kv_cache
        return conv_pages, recurrent_pages


class LinearMixerLayer(nn.Module):
    """Base of `SupernetGatedDeltaNet` and `SupernetKimiDeltaAttention`.

    A subclass sets `conv_names` (its convolutions, in page order) and `decodes_on_pages` (whether its
    kernel step applies), implements `conv_blocks(config, tp_size)` (one rank's (heads, head dim) of each block of
    conv channels, in page order), `page_shapes(config, tp_size, where)`,
    `forward_sequence(hidden_states [1, T, D], cache) -> [1, T, D]`, and for the kernel step
    `decode_inputs(hidden_states [B, D]) -> (conv inputs [B, C], rest)`, `delta_rule_step(conv outputs of a part,
    heads, rest, delta-rule pages, slots) -> [B, H/k, Dv]` and `decode_output([B, H, Dv], rest) -> [B, D]`; its
    `__init__` calls `_init_pages`, and `conv_weight` is its convolution's weight [C, 1, K].
    """

    conv_names: tuple[str, ...]
    decodes_on_pages: bool

    @classmethod
    def allowed_parts(cls, config, tp_size: int) -> list[int]:
        """How many equal parts one rank's state can be spread over: each part takes an equal range of the
        delta-rule heads, and of every block of conv channels either an equal range of its heads or, for a block
        with fewer heads than parts (GDN's key heads), the one head its value heads read (held in each such part;
        every copy sees the same inputs, so they stay equal)."""
        blocks = [heads for heads, _ in cls.conv_blocks(config, tp_size)]
        return [parts for parts in range(1, max(blocks) + 1)
                if all(heads % parts == 0 or parts % heads == 0 for heads in blocks) and max(blocks) % parts == 0]  # fmt: skip

    @classmethod
    def part_shapes(cls, config, tp_size: int, parts: int) -> PageShapes:
        """(conv state, delta-rule state) shapes of one part of one rank's state."""
        (_, width), (heads, *dims) = cls.page_shapes(config, tp_size, "")
        channels = sum(max(block_heads // parts, 1) * dim for block_heads, dim in cls.conv_blocks(config, tp_size))
        return (channels, width), (heads // parts, *dims)

    def _init_pages(self, config, vllm_config: VllmConfig, prefix: str) -> None:
        """This rank's place in the tensor-parallel group, its state shapes (`page_shapes` raises for head counts
        that do not divide), and its state's cache layers: one per part (`footprint.state_parts`)."""
        from vllm_supernet.footprint import attention_token_bytes, state_parts, state_parts_choice
        from vllm_supernet.model import deployment_mixer_configs

        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.page_shapes_of_rank = self.page_shapes(config, self.tp_size, prefix)
        dtypes = state_dtypes(vllm_config)
        model_config = vllm_config.model_config
        delta_rule_bytes = torch.Size(self.page_shapes_of_rank[1]).numel() * dtypes[1].itemsize
        token_bytes = attention_token_bytes(deployment_mixer_configs(model_config), model_config.dtype, self.tp_size)
        parts = state_parts(self.allowed_parts(config, self.tp_size), delta_rule_bytes, token_bytes,
                            state_parts_choice(model_config), prefix)  # fmt: skip
        shapes = self.part_shapes(config, self.tp_size, parts)
        part_heads = shapes[1][0]
        channels = part_channels(self.conv_blocks(config, self.tp_size), parts)
        self.pages = [
            StatePages(prefix if part == 0 else f"{prefix}.part{part}", shapes, dtypes, vllm_config,
                       slice(part * part_heads, (part + 1) * part_heads), channels[part])  # fmt: skip
            for part in range(parts)
        ]

    # ---- a step ----------------------------------------------------------------------------------

    def run(self, hidden_states: torch.Tensor, positions: torch.Tensor, step: StepRequests) -> torch.Tensor:
        """hidden_states [N, D] of `step`'s tokens -> [N, D]; each request continues its own state."""
        metadata = [layer_metadata(part.layer_name) for part in self.pages]
        if metadata[0] is None:  # dummy run: every rank skips the same way, so no collective is missed
            return torch.zeros_like(hidden_states)
        # One split per part: the same requests in the same order, each part's own pages.
        splits = [DecodeSplit.of(step, part_metadata, hidden_states.shape[0]) for part_metadata in metadata]
        split = splits[0]
        if split.rows is None:  # the common case: every token is a one-token continuation
            return self.decode(hidden_states, [s.decode_slots for s in splits])
        output = torch.zeros_like(hidden_states)
        if len(split.decode_slots):
            decoded = self.decode(hidden_states.index_select(0, split.rows), [s.decode_slots for s in splits])
            output.index_copy_(0, split.rows, decoded)
        for j, (rows, _, _) in enumerate(split.speculative):  # token j of every verifying request, j = 0, 1, ...
            slots = [s.speculative[j][2] for s in splits]
            self.copy_pages([s.speculative[j][1] for s in splits], slots)
            output.index_copy_(0, rows, self.decode(hidden_states.index_select(0, rows), slots))
        for i, (_, start, length, has_state) in enumerate(split.others):  # prefills and chunks: one by one
            slots = [s.others[i][0] for s in splits]
            cache = self.load_cache(slots, has_state, hidden_states.dtype)
            output[start : start + length] = self.forward_sequence(hidden_states[start : start + length][None], cache)[0]
            self.store_cache(slots, cache)
        return output

    def copy_pages(self, sources: list[torch.Tensor], slots: list[torch.Tensor]) -> None:
        """Per part, state pages `sources` [B] into pages `slots` [B] (where they differ)."""
        for part, part_sources, part_slots in zip(self.pages, sources, slots, strict=True):
            moved = part_sources != part_slots
            if bool(moved.any()):
                for pages in part.state_pages:
                    pages.index_copy_(0, part_slots[moved], pages.index_select(0, part_sources[moved]))

    def load_cache(self, slots: list[torch.Tensor], has_state: bool, dtype: torch.dtype) -> LinearMixerCache:
        """The states in pages `slots` (one [B] per part) as a reference cache (zeros for a request starting
        from scratch)."""
        conv_parts, recurrent_parts = [], []
        for part, part_slots in zip(self.pages, slots, strict=True):
            conv_pages, recurrent_pages = part.state_pages
            conv_parts.append(conv_pages.index_select(0, part_slots).to(dtype))  # [B, C / k, K-1]
            recurrent_parts.append(recurrent_pages.index_select(0, part_slots).float())  # [B, H / k, Dk, Dv]
        if len(self.pages) == 1:
            conv, recurrent = conv_parts[0], recurrent_parts[0]
        else:  # the rank's state: the parts' heads in order, each part's conv channels where they come from
            recurrent = torch.cat(recurrent_parts, dim=1)
            batch_size, _, width = conv_parts[0].shape
            conv = conv_parts[0].new_empty(batch_size, self.page_shapes_of_rank[0][0], width)
            for part, conv_part in zip(self.pages, conv_parts, strict=True):
                conv.index_copy_(1, part.channels.to(conv.device), conv_part)
        if not has_state:
            conv.zero_()
            recurrent.zero_()
        return self.as_cache(conv, recurrent)

    def as_cache(self, conv: torch.Tensor, recurrent: torch.Tensor) -> LinearMixerCache:
        """A rank's state (conv states [B, C_total, K-1] of every convolution stacked, recurrent state) as a
        reference cache."""
        channels = conv.shape[1] // len(self.conv_names)  # every convolution of a mixer has the same width
        return LinearMixerCache(
            conv_states=dict(zip(self.conv_names, conv.split(channels, dim=1), strict=True)),
            recurrent_state=recurrent,
        )

    def forward_on_cache(self, hidden_states: torch.Tensor, positions: torch.Tensor, cache: LinearMixerCache) -> torch.Tensor:
        """One sequence's next tokens [T, D] on its own cache (the speculative draft's, in a draft slot) -> [T, D]
        (positions: unused, the state has them); leaves new state tensors in `cache`."""
        return self.forward_sequence(hidden_states[None], cache)[0]

    def store_cache(self, slots: list[torch.Tensor], cache: LinearMixerCache) -> None:
        conv = torch.cat([cache.conv_states[name] for name in self.conv_names], dim=1)
        for part, part_slots in zip(self.pages, slots, strict=True):
            conv_pages, recurrent_pages = part.state_pages
            part_conv = conv if part.channels is None else conv.index_select(1, part.channels.to(conv.device))
            conv_pages.index_copy_(0, part_slots, part_conv.to(conv_pages.dtype))
            recurrent_pages.index_copy_(0, part_slots, cache.recurrent_state[:, part.heads].to(recurrent_pages.dtype))

    def decode(self, hidden_states: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
        """hidden_states [B, D]: one new token of each request -> [B, D]; their states continue in pages
        `slots` (one [B] per part, updated in place): the subclass's kernel step on the pages where it applies,
        else `forward_sequence` on one token per request, on states copied out of the pages and back."""
        if self.decodes_on_pages:
            return self.decode_on_pages(hidden_states, slots)
        cache = self.load_cache(slots, True, hidden_states.dtype)
        out = self.forward_sequence(hidden_states[:, None], cache)[:, 0]
        self.store_cache(slots, cache)
        return out

    def decode_on_pages(self, hidden_states: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
        """The kernel step: per part, its conv channels' convolution step and its heads' delta rule on its pages."""
        conv_inputs, rest = self.decode_inputs(hidden_states)  # [B, C], the subclass's gates and output inputs
        outputs = []
        for part, part_slots in zip(self.pages, slots, strict=True):
            conv_pages, recurrent_pages = part.state_pages
            x, weight = conv_inputs, self.conv_weight
            if part.channels is not None:
                channels = part.channels.to(x.device)
                x, weight = x.index_select(1, channels), weight.index_select(0, channels)
            x = convolution_step(x, weight, conv_pages, part_slots)
            outputs.append(self.delta_rule_step(x, part.heads, rest, recurrent_pages, part_slots))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # [B, H, Dv]
        return self.decode_output(out, rest)


def part_channels(blocks: list[tuple[int, int]], parts: int) -> list[torch.Tensor | None]:
    """Per part, the rank's conv channels it holds ([C'], in page order) of conv blocks `blocks` ((heads, head
    dim) each, side by side): an equal range of a block's heads, or the one head of a block with fewer heads than
    parts that part i's heads read (head i // (parts / heads)); [None] for one part (all channels)."""
    if parts == 1:
        return [None]
    channels, offset = [[] for _ in range(parts)], 0
    for heads, head_dim in blocks:
        share = max(heads // parts, 1)  # heads of this block in a part
        for part in range(parts):
            first = part * heads // parts  # its first head
            channels[part].append(torch.arange(offset + first * head_dim, offset + (first + share) * head_dim))
        offset += heads * head_dim
    return [torch.cat(part) for part in channels]


@dataclass
class DecodeSplit:
    """How a step's requests on one linear mixer split into one-token continuations (decoded together),
    speculative verifications and the rest (run one by one). Computed once per step and request subset:
    the layers of one vLLM cache group share their metadata object, which holds the memo.

    decode_slots [B] (int64): state pages of the continuations; rows [B]: their rows among the
    subset's tokens, None when they are all of them, in order. others: (state page [1], first row,
    length, has a state already) per other request.

    speculative: with speculative decoding, a request verifying drafts feeds 1 + k tokens and vLLM gives
    it k + 1 state pages (`MambaSpec.num_speculative_blocks`; GDN metadata `spec_state_indices_tensor`
    [S, k + 1], `num_accepted_tokens` [S]), as its own GDN layers: token j starts from the state after
    token j - 1 (token 0: after the last accepted token of the previous step, page
    `num_accepted_tokens - 1`) and leaves its state in page j, so the next step resumes from whichever
    token was accepted last. Per token position j: (rows [n], source pages [n], pages [n]) of the
    requests that have a token j.
    """

    decode_slots: torch.Tensor
    rows: torch.Tensor | None
    others: list[tuple[torch.Tensor, int, int, bool]]
    speculative: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, step: StepRequests, metadata, num_tokens: int) -> DecodeSplit:
        memo = metadata.__dict__.setdefault("_supernet_decode_splits", {})
        key = (tuple(step.requests), num_tokens)
        if key not in memo:
            memo[key] = cls._compute(step, metadata, num_tokens)
        return memo[key]

    @classmethod
    def _compute(cls, step: StepRequests, metadata, num_tokens: int) -> DecodeSplit:
        state_slots, verifying = request_state_pages(metadata, len(step.query_start_loc) - 1)
        device = metadata_device(metadata)
        decodes, rows, others, offset = [], [], [], 0
        speculative: list[tuple[list[int], list[int], list[int]]] = []
        for request in step.requests:
            length = step.query_len(request)
            if request in verifying:
                pages, accepted = verifying[request]
                for j in range(length):
                    if len(speculative) <= j:
                        speculative.append(([], [], []))
                    speculative[j][0].append(offset + j)
                    speculative[j][1].append(pages[accepted - 1] if j == 0 else pages[j - 1])
                    speculative[j][2].append(pages[j])
            elif length == 1 and step.num_computed[request] > 0:
                decodes.append(request)
                rows.append(offset)
            elif length > 0:
                slot = torch.tensor([state_slots[request]], dtype=torch.long, device=device)
                others.append((slot, offset, length, step.num_computed[request] > 0))
            offset += length
        all_decodes = not others and not speculative and rows == list(range(num_tokens))
        return cls(
            decode_slots=torch.tensor([state_slots[r] for r in decodes], dtype=torch.long, device=device),
            rows=None if all_decodes else torch.tensor(rows, dtype=torch.long, device=device),
            others=others,
            speculative=[
                tuple(torch.tensor(values, dtype=torch.long, device=device) for values in position)
                for position in speculative
            ],
        )


def metadata_device(metadata) -> torch.device:
    indices = metadata.non_spec_state_indices_tensor
    return (indices if indices is not None else metadata.spec_state_indices_tensor).device


def request_state_pages(metadata, num_requests: int) -> tuple[dict[int, int], dict[int, tuple[list[int], int]]]:
    """Each batch request's state page, and for requests verifying drafts their k + 1 pages and accepted
    count, from vLLM's GDN metadata (which lists verifying and other requests apart, each in batch order)."""
    masks = metadata.spec_sequence_masks_cpu
    if masks is None:
        return dict(enumerate(metadata.non_spec_state_indices_tensor[:num_requests].tolist())), {}
    spec_pages = metadata.spec_state_indices_tensor.tolist()
    accepted = metadata.num_accepted_tokens.tolist()
    other_pages = [] if metadata.non_spec_state_indices_tensor is None else metadata.non_spec_state_indices_tensor.tolist()
    state_slots, verifying = {}, {}
    for request, is_verifying in enumerate(masks[:num_requests].tolist()):
        if is_verifying:
            index = len(verifying)
            verifying[request] = (spec_pages[index], accepted[index])
        else:
            state_slots[request] = other_pages[len(state_slots)]
    return state_slots, verifying


class ShardedConvolution(nn.Module):
    """Depthwise causal-convolution weights [C / tp, 1, K] of one rank: blocks of channels (GDN's Q|K|V,
    KDA's q|k|v convolutions), each split over ranks as the heads they feed, this rank's parts side by
    side in block order (the layout of its conv-state page).

    Loads the blocks fused on disk (shard None: GDN's one `convolution.weight`) or one block at a time
    (shard i: KDA's `q_conv`, `k_conv`, `v_conv`, through `stacked_params`)."""

    def __init__(self, blocks: list[int], kernel_size: int, tp_size: int, tp_rank: int):
        super().__init__()
        self.blocks_on_disk = blocks
        self.rows = [block // tp_size for block in blocks]  # this rank's rows of each block
        self.tp_rank = tp_rank
        self.weight = nn.Parameter(torch.empty(sum(self.rows), 1, kernel_size), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.load})

    def load(self, parameter: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        blocks = list(range(len(self.rows))) if shard is None else [shard]
        parts = loaded.split([self.blocks_on_disk[block] for block in blocks], dim=0)
        for block, part in zip(blocks, parts, strict=True):
            start, rows = sum(self.rows[:block]), self.rows[block]
            parameter.data[start : start + rows].copy_(part.narrow(0, self.tp_rank * rows, rows))

    def blocks(self) -> tuple[torch.Tensor, ...]:
        """This rank's weight of each block, [C_b / tp, 1, K] (views)."""
        return self.weight.split(self.rows, dim=0)
