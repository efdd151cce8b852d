"""How one model step's requests split over each layer's mixers.

Per step, the runner patch (`patches.py`) hands `Apriel2ForCausalLM.forward` a `SupernetBatch`: each
request's placement, in the runner's batch order, and the token layout. Each layer then runs each
mixer some request needs on exactly those requests' tokens (`StepRequests`) and scatters the outputs
back; a request's tokens never go through a mixer its placement does not name, so its output does
not depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import AttentionMetadataBuilder

from shared_spec import Placement


def layer_metadata(layer_name: str):
    """A cache layer's attention metadata for the step, or None in a dummy/profiling run."""
    attn_metadata = get_forward_context().attn_metadata
    if attn_metadata is None:
        return None
    if isinstance(attn_metadata, list):  # micro-batching (not used on CPU)
        raise NotImplementedError("supernet layers do not support micro-batched (ubatch) execution")
    metadata = attn_metadata.get(layer_name)
    return metadata.get() if isinstance(metadata, DeferredMetadata) else metadata


class DeferredMetadata:
    """A cache group's metadata for one step, built when the first layer of the group asks for it.

    vLLM builds every cache group's metadata before each step, but a supernet step often leaves whole
    groups unread: an all-SWA batch never touches the FA, GDN or KDA groups, whose builders (vLLM's GDN
    builder above all) would otherwise cost every step (measured: 0.3 ms of a 5 ms decode step of the
    benchmark model). Building later in the same step is safe: the builders read the runner's buffers,
    which the next step rewrites only after this step's forward has run.
    """

    def __init__(self, build: Callable[[], Any]):
        self._build = build
        self._value = None

    def get(self):
        if self._value is None:
            self._value = self._build()
            self._build = None  # drop the captured step inputs
        return self._value


def deferred_builder(builder_cls: type[AttentionMetadataBuilder]) -> type[AttentionMetadataBuilder]:
    """`builder_cls` whose `build` returns a `DeferredMetadata` (read through `layer_metadata`)."""

    def build(self, *args, **kwargs):
        return DeferredMetadata(lambda: builder_cls.build(self, *args, **kwargs))

    return type(f"Deferred{builder_cls.__name__}", (builder_cls,), {"build": build, "__module__": __name__})


@dataclass
class StepRequests:
    """Which requests of the current step a mixer runs on, and where their tokens are.

    requests: batch indices (the runner's `input_batch` order), ascending.
    token_index: [N] positions of their tokens in the step's flat token tensor (None: all tokens
    of all requests, i.e. the mixer runs on the whole batch).
    query_start_loc / num_computed: for the whole batch (lists, length R + 1 and R).
    """

    requests: list[int]
    token_index: torch.Tensor | None
    query_start_loc: list[int]
    num_computed: list[int]

    def query_len(self, request: int) -> int:
        return self.query_start_loc[request + 1] - self.query_start_loc[request]


@dataclass
class SupernetBatch:
    """Per-request placements of one model step, in the runner's batch order, and the token layout."""

    placements: list[Placement]
    query_start_loc: list[int]  # [R + 1]
    num_computed: list[int]  # [R] tokens already in each request's cache before this step
    _token_index: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> SupernetBatch:
        return cls(placements=[], query_start_loc=[0], num_computed=[])

    def layer_groups(self, default: Placement, num_layers: int, device: torch.device):
        """Per layer: [(mixer name, StepRequests)], one entry per mixer some request of the step uses
        (a dummy run, with no requests, runs `default`)."""
        everyone = list(range(len(self.placements)))
        result = []
        for layer in range(num_layers):
            if not self.placements:
                result.append([(default.mixers[layer], StepRequests([], None, self.query_start_loc, []))])
                continue
            by_name: dict[str, list[int]] = {}
            for request, placement in enumerate(self.placements):
                by_name.setdefault(placement.mixers[layer], []).append(request)
            if len(by_name) == 1:
                (name,) = by_name
                result.append([(name, StepRequests(everyone, None, self.query_start_loc, self.num_computed))])
                continue
            result.append(
                [
                    (name, StepRequests(requests, self.token_index(requests, device), self.query_start_loc, self.num_computed))
                    for name, requests in by_name.items()
                ]
            )
        return result

    def token_index(self, requests: list[int], device: torch.device) -> torch.Tensor:
        key = tuple(requests)
        if key not in self._token_index:
            ranges = [torch.arange(self.query_start_loc[r], self.query_start_loc[r + 1]) for r in requests]
            self._token_index[key] = torch.cat(ranges).to(device)
        return self._token_index[key]
