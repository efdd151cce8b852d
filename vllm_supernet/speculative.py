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
for one of its layers. The caches live outside vLLM's paged memory, per request: keys and values of an
attention mixer (`attention.KVBuffer`), the convolution and delta-rule states of a GDN/KDA mixer
(`LinearMixerCache`). Going back after a rejection is free: a KV buffer is cut to a length, and a linear
mixer's step replaces its state tensors rather than writing into them, so a snapshot is a shallow copy.

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

import numpy as np
import torch

from fast_llm_supernet.model.speculative import restore, snapshot
from shared_spec import Placement

SELF_SPECULATOR = f"{__name__}.SelfSpeculator"
# Prompt tokens the draft takes per forward when it catches up on a new request.
CATCH_UP_CHUNK = 2048


@dataclass
class DraftRequest:
    """A request of the step as the runner patch sees it: id, draft placement (None: no drafting), and how
    many more tokens it may emit (None: no limit but the model length)."""

    req_id: str
    placement: Placement | None
    remaining_tokens: int | None


@dataclass
class DraftSequence:
    """One request's draft: its placement, a cache per layer, and where the caches stand.

    committed: the request's tokens in the caches; drafts: the last round's drafted tokens;
    snapshots[j]: the caches after `committed` tokens and the first j drafts (the drafts fed back in).
    """

    placement: Placement
    caches: list
    committed: int = 0
    drafts: list[int] = field(default_factory=list)
    snapshots: list[list] = field(default_factory=list)


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
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.model = None
        self.sequences: dict[str, DraftSequence] = {}
        self.step_requests: list[DraftRequest] = []
        self.timing = DraftTiming()

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
        from vllm_supernet.patches import fix_cpu_expand_kernel

        fix_cpu_expand_kernel()  # sampled requests verify through vLLM's rejection sampler

    def begin_step(self, requests: list[DraftRequest]) -> None:
        """Each request of the step, in `propose`'s order (the runner patch)."""
        self.step_requests = requests

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_) -> list[list[int]]:
        """Each request's drafts: token_ids_cpu[i, :num_tokens_no_spec[i]] are request i's tokens so far;
        a request that sampled nothing this step (a prefill chunk that did not finish) gets none."""
        live = {request.req_id for request in self.step_requests}
        for finished in self.sequences.keys() - live:
            del self.sequences[finished]
        drafts = []
        for index, request in enumerate(self.step_requests[: len(sampled_token_ids)]):
            num_tokens = int(num_tokens_no_spec[index])
            # A request emits at most `remaining_tokens` more (accepted drafts first): drafts past them are waste.
            budget = min(self.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            if request.remaining_tokens is not None:
                budget = min(budget, request.remaining_tokens)
            if not sampled_token_ids[index] or request.placement is None or budget <= 0:
                self.sequences.pop(request.req_id, None)
                drafts.append([])
                continue
            catching_up = request.req_id not in self.sequences
            start = time.perf_counter()
            drafts.append(self.draft(request.req_id, request.placement, token_ids_cpu[index, :num_tokens], budget))
            seconds = time.perf_counter() - start
            if catching_up:
                self.timing.catch_up_seconds += seconds
            else:
                self.timing.seconds += seconds
            self.timing.rounds += 1
            self.timing.drafted += len(drafts[-1])
        return drafts

    def draft(self, req_id: str, placement: Placement, tokens: np.ndarray, count: int) -> list[int]:
        """`count` greedy drafts after `tokens` (all of the request's tokens so far)."""
        sequence = self.sequences.get(req_id)
        if sequence is None or sequence.placement != placement or sequence.committed > len(tokens):
            sequence = self.sequences[req_id] = DraftSequence(placement, self.new_caches(placement))
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

    def new_caches(self, placement: Placement) -> list:
        blocks = self.model.model.decoder.blocks
        dtype = self.model.model.embed_tokens.weight.dtype
        device = self.model.model.embed_tokens.weight.device
        return [block.get_mixer(name).new_cache(dtype, device) for block, name in zip(blocks, placement.mixers, strict=True)]

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
        return model.compute_logits(hidden_states[-1:])[0]


class SpeculatorTiming:
    """Worker extension (`LLM(..., worker_extension_cls="vllm_supernet.speculative.SpeculatorTiming")`):
    `llm.collective_rpc("draft_timing")` returns each rank's `DraftTiming` since the last call (as a dict)."""

    def draft_timing(self) -> dict:
        drafter = self.model_runner.drafter
        timing, drafter.timing = drafter.timing, DraftTiming()
        return asdict(timing)


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
