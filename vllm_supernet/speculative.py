"""Self-speculative decoding in vLLM: a cheap placement of the served model drafts, the request's own verifies.

    LLM(model=CHECKPOINT, hf_overrides={"supernet_draft_placement": "gdn*"},
        speculative_config={"method": "custom_class", "model": "vllm_supernet.speculative.SelfSpeculator",
                            "num_speculative_tokens": 4})

vLLM builds `SelfSpeculator(vllm_config)` in each worker, hands it the served model (`load_model`), and
after every step asks it for each request's next drafts (`propose`); the next step runs the request's own
placement on its last token and the drafts together, and vLLM's rejection sampler keeps the drafts the
target agrees with (greedy: equal to its argmax; sampling: drafts are deterministic here, so a draft d is
kept with probability p(d) and a rejection draws from p without d, which leaves the output distributed as
the target's). Greedy output is therefore the target's own, token for token.

The draft runs the served model's own modules (embedding, norms, MLPs, mixers, head: every weight shared,
the tensor-parallel shards included) with the draft placement, on caches of its own: its hidden states
differ from the target's from the first layer where the placements differ, so no target cache can stand in
for one of its layers: keys and values of an attention mixer (`attention.KVBuffer`), the convolution and
delta-rule states of a GDN/KDA mixer (`LinearMixerCache`). Going back after a rejection is free: a KV buffer
is cut to a length, and a linear mixer's step replaces its state tensors rather than writing into them, so a
snapshot is a shallow copy.

The caches live in draft slots, inside the deployment's cache memory: at start-up `draft_reserve` takes
`supernet_draft_slots` (hf_overrides; default max_num_seqs) slots of the deployment draft placement's size at
`max_model_len` (`footprint.CacheFootprints.draft_slot`) out of the memory vLLM then sizes its KV-cache pool
from (`patches.py`), and the speculator allocates exactly them once vLLM has allocated its pool. A request
drafts in a slot of its own, its caches views of the slot's bytes, reused by the next request when it ends; a
request that finds no free slot (or whose draft placement needs more than a slot) is not drafted that round,
and decodes as without speculation. A linear mixer's step leaves fresh state tensors (transient, as
activations are); `keep_states` copies them into the slot's next of 1 + k state buffers.

The target's own GDN/KDA layers verify with one state page per drafted position (vLLM's
`num_speculative_blocks`) and resume from the last accepted one (`linear_mixer.DecodeSplit`); its attention
layers overwrite rejected keys on the next step, as vLLM's do.

Per round and request: the draft takes the tokens the target emitted since its last round (those of its own
drafts that were kept are already in its caches), then drafts `k` tokens one forward at a time, greedily.
Requests are drafted one after another (each forward is one request's); the `propose` contract gives
token lists, not a batch layout.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Annotated

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError

from fast_llm_supernet.model.speculative import restore, snapshot
from shared_spec import Placement
from vllm_supernet.footprint import DRAFT_CHUNK_TOKENS

SELF_SPECULATOR = f"{__name__}.SelfSpeculator"
# Prompt tokens the draft takes per forward when it catches up on a new request (a sliding-window draft cache
# holds its window plus this many tokens).
CATCH_UP_CHUNK = DRAFT_CHUNK_TOKENS
SLOTS_OVERRIDE_KEY = "supernet_draft_slots"  # hf_overrides: how many requests may draft at once


def speculates_with_self(vllm_config) -> bool:
    speculative = vllm_config.speculative_config
    return speculative is not None and speculative.method == "custom_class" and speculative.model == SELF_SPECULATOR


def draft_slots(vllm_config) -> int:
    """The deployment's number of draft slots: `supernet_draft_slots`, a whole number from 1 to max_num_seqs
    (more could never be used at once), default max_num_seqs; anything else is refused naming what is allowed."""
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    value = getattr(vllm_config.model_config.hf_config, SLOTS_OVERRIDE_KEY, None)
    if value is None:
        return max_num_seqs
    try:
        return TypeAdapter(Annotated[int, Field(strict=True, ge=1, le=max_num_seqs)]).validate_python(value)
    except ValidationError:
        raise ValueError(
            f"{SLOTS_OVERRIDE_KEY} = {value!r}: allowed: a whole number of draft slots from 1 to max_num_seqs "
            f"({max_num_seqs}); without it, max_num_seqs"
        ) from None


@dataclass(frozen=True)
class DraftReserve:
    """What a speculating deployment keeps out of its KV-cache pool for draft caches, per rank: `slots` slots of
    `slot_bytes`, sized for the deployment's draft placement at max_model_len."""

    slots: int
    slot_bytes: int
    placement: Placement

    @property
    def bytes(self) -> int:
        return self.slots * self.slot_bytes

    def describe(self) -> str:
        return (
            f"{self.bytes / 2**20:.1f} MiB per rank reserved for {self.slots} draft slots ({SLOTS_OVERRIDE_KEY}) of "
            f"{self.slot_bytes / 2**10:.0f} KiB (draft placement {self.placement.canonical!r})"
        )


def draft_reserve(vllm_config) -> DraftReserve | None:
    """The draft slots of a deployment that speculates with `SelfSpeculator` and names its draft placement;
    None otherwise."""
    if not speculates_with_self(vllm_config):
        return None
    from vllm_supernet.footprint import CacheFootprints
    from vllm_supernet.placements import ServingPlacements

    draft = ServingPlacements.from_model_config(vllm_config.model_config).draft_default
    if draft is None:  # refused when the speculator loads (`SelfSpeculator.load_model`)
        return None
    return DraftReserve(draft_slots(vllm_config), CacheFootprints.of(vllm_config).draft_slot(draft).bytes, draft)


@dataclass
class DraftRequest:
    """A request of the step as the runner patch sees it: id, draft placement (None: no drafting), and how
    many more tokens it may emit (None: no limit but the model length)."""

    req_id: str
    placement: Placement | None
    remaining_tokens: int | None


@dataclass
class DraftSequence:
    """One request's draft: its placement, its draft slot, a cache per layer, and where the caches stand.

    states[layer]: a linear mixer's 1 + k (conv, recurrent) state buffers in the slot (None for attention), used
    in turn (`writes`: states written so far); committed: the request's tokens in the caches; drafts: the last
    round's drafted tokens; snapshots[j]: the caches after `committed` tokens and the first j drafts.
    """

    placement: Placement
    slot: int
    caches: list
    states: list
    writes: int = 0
    committed: int = 0
    drafts: list[int] = field(default_factory=list)
    snapshots: list[list] = field(default_factory=list)


@dataclass
class DraftMemory:
    """The draft slots (one rank): how many, bytes each, bytes allocated for them (slots x slot bytes, once);
    the most requests drafting at once; request rounds not drafted for want of a free slot, or because the
    request's draft placement needs more than a slot."""

    slots: int = 0
    slot_bytes: int = 0
    allocated_bytes: int = 0
    peak_in_use: int = 0
    no_free_slot: int = 0
    too_large: int = 0


@dataclass
class DraftTiming:
    """What drafting cost since the last reset: wall seconds in `propose` for requests the draft already follows
    (`seconds`) and for new ones, whose prompt it first runs through (`catch_up_seconds`); rounds drafted, tokens
    drafted, draft forward passes."""

    seconds: float = 0.0
    catch_up_seconds: float = 0.0
    rounds: int = 0
    drafted: int = 0
    forwards: int = 0


class SelfSpeculator:
    """vLLM `custom_class` proposer drafting with another placement of the served supernet."""

    def __init__(self, vllm_config) -> None:
        self.vllm_config = vllm_config
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        draft_slots(vllm_config)  # a bad supernet_draft_slots fails here, before the weights load
        self.model = None
        self.footprints = None
        self.slots: torch.Tensor | None = None  # [slots, slot bytes], allocated with the KV cache (`allocate_slots`)
        self.free_slots: list[int] = []
        self.sequences: dict[str, DraftSequence] = {}
        self.step_requests: list[DraftRequest] = []
        self.timing = DraftTiming()
        self.memory = DraftMemory()

    def load_model(self, target_model) -> None:
        if not getattr(target_model, "accepts_supernet_batch", False):
            raise TypeError(f"{SELF_SPECULATOR} drafts for Apriel2 supernet models only, not {type(target_model).__name__}")
        if target_model.serving.draft_default is None:
            raise ValueError(
                f"{SELF_SPECULATOR} needs the deployment's draft placement: start the engine with "
                '--hf-overrides \'{"supernet_draft_placement": "<placement or preset>"}\' (requests may then '
                "name another with `draft_placement`)"
            )
        self.model = target_model
        from vllm_supernet.footprint import CacheFootprints
        from vllm_supernet.patches import fix_cpu_expand_kernel

        self.footprints = CacheFootprints.of(self.vllm_config)
        fix_cpu_expand_kernel()  # sampled requests verify through vLLM's rejection sampler

    def allocate_slots(self) -> None:
        """Allocate the draft slots, the memory `draft_reserve` kept out of vLLM's pool, once: the runner patch
        calls this after vLLM has allocated its KV cache (whose size was measured without them)."""
        if self.slots is not None:
            return
        reserve = draft_reserve(self.vllm_config)
        device = self.model.model.embed_tokens.weight.device
        self.slots = torch.empty(reserve.slots, reserve.slot_bytes, dtype=torch.uint8, device=device)
        self.free_slots = list(range(reserve.slots))[::-1]
        self.memory = DraftMemory(reserve.slots, reserve.slot_bytes, self.slots.numel())

    def begin_step(self, requests: list[DraftRequest]) -> None:
        """Each request of the step, in `propose`'s order (the runner patch)."""
        self.step_requests = requests

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_) -> list[list[int]]:
        """Each request's drafts: token_ids_cpu[i, :num_tokens_no_spec[i]] are request i's tokens so far;
        a request that sampled nothing this step (a prefill chunk that did not finish) gets none, nor one
        without a draft slot."""
        self.allocate_slots()
        live = {request.req_id for request in self.step_requests}
        for finished in self.sequences.keys() - live:
            self.release(finished)
        drafts = []
        for index, request in enumerate(self.step_requests[: len(sampled_token_ids)]):
            num_tokens = int(num_tokens_no_spec[index])
            # A request emits at most `remaining_tokens` more (accepted drafts first): drafts past them are waste.
            budget = min(self.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            if request.remaining_tokens is not None:
                budget = min(budget, request.remaining_tokens)
            if not sampled_token_ids[index] or request.placement is None or budget <= 0:
                self.release(request.req_id)
                drafts.append([])
                continue
            catching_up = request.req_id not in self.sequences
            sequence = self.sequence_for(request.req_id, request.placement, num_tokens)
            if sequence is None:
                drafts.append([])
                continue
            start = time.perf_counter()
            drafts.append(self.draft(sequence, token_ids_cpu[index, :num_tokens], budget))
            seconds = time.perf_counter() - start
            if catching_up:
                self.timing.catch_up_seconds += seconds
            else:
                self.timing.seconds += seconds
            self.timing.rounds += 1
            self.timing.drafted += len(drafts[-1])
        return drafts

    def sequence_for(self, req_id: str, placement: Placement, num_tokens: int) -> DraftSequence | None:
        """The request's draft, started afresh in its slot when it has none there for `placement` at most
        `num_tokens` long (a new request, a new draft placement, a preempted request computed again); None when
        no slot is free or the placement's caches need more than a slot."""
        sequence = self.sequences.get(req_id)
        if sequence is not None and sequence.placement == placement and sequence.committed <= num_tokens:
            return sequence
        layout = self.footprints.draft_slot(placement)
        if layout.bytes > self.memory.slot_bytes:
            self.release(req_id)
            self.memory.too_large += 1
            return None
        if sequence is not None:
            slot = sequence.slot
        elif self.free_slots:
            slot = self.free_slots.pop()
        else:
            self.memory.no_free_slot += 1
            return None
        from vllm_supernet.attention import KVBuffer

        caches, states = [], []
        blocks = self.model.model.decoder.blocks
        for block, name, (attention, tensors) in zip(blocks, placement.mixers, layout.layers, strict=True):
            views = [self.slots[slot, offset : offset + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
                     for offset, shape, dtype in tensors]  # fmt: skip
            if attention:
                caches.append(KVBuffer(*views))
                states.append(None)
            else:
                versions = list(zip(views[::2], views[1::2], strict=True))
                conv, recurrent = versions[0]
                conv.zero_()
                recurrent.zero_()
                caches.append(block.get_mixer(name).as_cache(conv, recurrent))
                states.append(versions)
        sequence = self.sequences[req_id] = DraftSequence(placement, slot, caches, states, writes=1)
        self.memory.peak_in_use = max(self.memory.peak_in_use, len(self.sequences))
        return sequence

    def release(self, req_id: str) -> None:
        sequence = self.sequences.pop(req_id, None)
        if sequence is not None:
            self.free_slots.append(sequence.slot)

    def draft(self, sequence: DraftSequence, tokens: np.ndarray, count: int) -> list[int]:
        """`count` greedy drafts after `tokens` (all of the request's tokens so far)."""
        # Back to the last of its own drafts the request kept that the caches hold (the last draft never is).
        kept = 0
        while (
            kept < len(sequence.drafts)
            and sequence.committed + kept < len(tokens)
            and int(tokens[sequence.committed + kept]) == sequence.drafts[kept]
        ):
            kept += 1
        if sequence.snapshots:
            # At least one token is fed again, for its logits (a request cut short by max_tokens can end on
            # a kept draft: nothing after it).
            usable = min(kept, len(sequence.snapshots) - 1, len(tokens) - sequence.committed - 1)
            restore(sequence.caches, sequence.snapshots[usable])
            sequence.committed += usable
        logits = self.feed(sequence, tokens[sequence.committed :].tolist(), sequence.committed)
        sequence.committed = len(tokens)
        sequence.snapshots = [snapshot(sequence.caches)]
        drafts = []
        for position in range(count):
            drafts.append(int(logits.argmax()))
            if position + 1 < count:
                logits = self.feed(sequence, drafts[-1:], len(tokens) + position)
                sequence.snapshots.append(snapshot(sequence.caches))
        sequence.drafts = drafts
        return drafts

    def feed(self, sequence: DraftSequence, token_ids: list[int], start: int) -> torch.Tensor:
        """Run the draft placement on `token_ids` (positions start, start + 1, ...); the next token's logits [V]."""
        model = self.model
        device = model.model.embed_tokens.weight.device
        self.timing.forwards += 1
        hidden_states = None
        for offset in range(0, len(token_ids), CATCH_UP_CHUNK):
            chunk = torch.tensor(token_ids[offset : offset + CATCH_UP_CHUNK], device=device)
            positions = torch.arange(start + offset, start + offset + len(chunk), device=device)
            mixes = [
                partial(block.get_mixer(name).forward_on_cache, positions=positions, cache=cache)
                for block, name, cache in zip(model.model.decoder.blocks, sequence.placement.mixers, sequence.caches, strict=True)
            ]
            hidden_states = model.run_blocks(model.embed_input_ids(chunk), mixes)
        self.keep_states(sequence)
        return model.compute_logits(hidden_states[-1:])[0]

    def keep_states(self, sequence: DraftSequence) -> None:
        """Move each linear mixer's new states into the slot: its next state buffer, in turn. 1 + k buffers
        suffice: a round keeps at most k states (the snapshots a rejection goes back to), and the next round's
        first state goes to the one buffer the last round did not write."""
        index = sequence.writes % (self.num_speculative_tokens + 1)
        sequence.writes += 1
        blocks = self.model.model.decoder.blocks
        for block, name, cache, versions in zip(blocks, sequence.placement.mixers, sequence.caches, sequence.states, strict=True):
            if versions is None:
                continue
            mixer = block.get_mixer(name)
            conv, recurrent = versions[index]
            conv.copy_(torch.cat([cache.conv_states[conv_name] for conv_name in mixer.conv_names], dim=1))
            recurrent.copy_(cache.recurrent_state)
            kept = mixer.as_cache(conv, recurrent)
            cache.conv_states, cache.recurrent_state = kept.conv_states, kept.recurrent_state


class SpeculatorTiming:
    """Worker extension (`LLM(..., worker_extension_cls="vllm_supernet.speculative.SpeculatorTiming")`):
    `llm.collective_rpc("draft_timing")` returns each rank's `DraftTiming` since the last call (as a dict),
    `llm.collective_rpc("draft_memory")` its `DraftMemory` and what one block of vLLM's pool costs."""

    def draft_timing(self) -> dict:
        drafter = self.model_runner.drafter
        timing, drafter.timing = drafter.timing, DraftTiming()
        return asdict(timing)

    def draft_memory(self) -> dict:
        """The draft slots' memory, and what one block of the pool costs (its page and conv-state row, if any)."""
        from vllm_supernet.footprint import CacheFootprints

        block_bytes = CacheFootprints.of(self.model_runner.vllm_config).block_bytes
        return {**asdict(self.model_runner.drafter.memory), "block_bytes": block_bytes}


def speculation_counts(llm) -> dict[str, int]:
    """vLLM's speculative-decoding counters so far (the engine needs `disable_log_stats=False`): drafting
    rounds, drafted tokens, accepted tokens."""
    names = {
        "vllm:spec_decode_num_drafts": "rounds",
        "vllm:spec_decode_num_draft_tokens": "drafted",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    counts = dict.fromkeys(names.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in names:
            counts[names[metric.name]] += int(metric.value)
    return counts
