"""Prometheus metrics per placement, on the server's `/metrics` beside vLLM's own.

Labelled `placement` = the served preset's name when the request's placement is one, else the placement's
hash (the canonical string is long; `GET /v1/supernet/presets` and the response headers map hashes to it):

    vllm_supernet_requests_running{placement}          requests the scheduler has scheduled, not finished
    vllm_supernet_requests_waiting{placement}          requests queued or preempted
    vllm_supernet_prompt_tokens_total{placement}       prompt tokens of the requests received
    vllm_supernet_generation_tokens_total{placement}   tokens generated
    vllm_supernet_cache_pages{placement}               cache pages the running requests hold at their length
    vllm_supernet_cache_bytes{placement}               the same in bytes (one rank's pages)
    vllm_supernet_draft_cache_bytes                    bytes (one rank) the self-speculator's draft slots hold
                                                       (`speculative.draft_reserve`; only where it speculates)

Everything is counted in the frontend process, which serves `/metrics`: a request is registered when vLLM's
output processor takes it (its canonical placement is in its `extra_args`), and followed through the engine's
outputs: new tokens, the scheduler's SCHEDULED / PREEMPTED events (sent when stats are logged, vLLM's default
for the server; without them a request counts as running from its first token), and its end. Cache pages are
`footprint.CacheFootprints.pages` at the request's current length: what allocation by placement gives it
(pages shared through prefix caching count once per request).

vLLM 0.32 internals relied on: `OutputProcessor.add_request(request, ...)`, `process_outputs(outputs, ...)`
(each `EngineCoreOutput`: `request_id`, `new_token_ids`, `finish_reason`, `events`) and
`abort_requests(...) -> internal ids aborted` (vllm/v1/engine/output_processor.py); the server's `/metrics`
exposes prometheus_client's default registry when one API server runs.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from shared_spec import Placement
from vllm_supernet.load_policy import LoadSnapshot


@dataclass
class TrackedRequest:
    label: str
    placement: Placement
    prompt_tokens: int
    received_at: float
    generated: int = 0
    running: bool = False


class PrefillBusyTime:
    """When some request was waiting for its first token (queued or in prefill): the intervals of the recent past,
    to tell what share of a window was so, i.e. how much of the deployment's prefill capacity arrivals use."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.pending = 0  # requests without a first token
        self.began = 0.0  # when `pending` last went from 0 to 1
        self.intervals: deque[tuple[float, float]] = deque()  # ended busy intervals, oldest first
        self.horizon_s = 0.0

    def started(self) -> None:
        if self.pending == 0:
            self.began = self.clock()
        self.pending += 1

    def ended(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.intervals.append((self.began, self.clock()))

    def share(self, window_s: float) -> float:
        """The share of the last `window_s` seconds during which some request waited for its first token
        (intervals that ended before the longest window asked so far are dropped)."""
        now = self.clock()
        self.horizon_s = max(self.horizon_s, window_s)
        while self.intervals and self.intervals[0][1] <= now - self.horizon_s:
            self.intervals.popleft()
        start = now - window_s
        busy = sum(max(0.0, end - max(begin, start)) for begin, end in self.intervals)
        if self.pending:
            busy += now - max(self.began, start)
        return min(1.0, busy / window_s)


class PlacementMetrics:
    """Per-placement counts of one deployment's requests; a prometheus_client collector."""

    def __init__(self, serving, footprints, num_pages: int = 0, clock=time.monotonic, draft_bytes: int = 0) -> None:
        self.serving = serving
        self.footprints = footprints
        self.num_pages = num_pages  # the engine's cache pages (0: unknown)
        # Draft slots are reserved whole at start-up, beside the pool, whichever requests draft in them.
        self.draft_bytes = draft_bytes
        self.clock = clock
        self.names = {placement: name for name, placement in serving.served_presets.items()}
        self.requests: dict[str, TrackedRequest] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.generation_tokens: dict[str, int] = {}
        self.prefill_busy = PrefillBusyTime(clock)

    def label(self, placement: Placement) -> str:
        return self.names.get(placement, placement.hash)

    def add_request(self, request) -> None:
        """An `EngineCoreRequest` as the output processor takes it (its placement already canonical)."""
        from vllm_supernet.placements import EXTRA_ARGS_KEY

        params = request.sampling_params
        if params is None or request.prompt_token_ids is None:
            return
        placement = self.serving.resolve((params.extra_args or {}).get(EXTRA_ARGS_KEY))
        self.add(request.request_id, placement, len(request.prompt_token_ids))

    def add(self, request_id: str, placement: Placement, prompt_tokens: int) -> None:
        label = self.label(placement)
        self.requests[request_id] = TrackedRequest(label, placement, prompt_tokens, self.clock())
        self.prefill_busy.started()
        self.prompt_tokens[label] = self.prompt_tokens.get(label, 0) + prompt_tokens
        self.generation_tokens.setdefault(label, 0)

    def update(self, output) -> None:
        """One `EngineCoreOutput` of the engine."""
        from vllm.v1.engine import EngineCoreEventType

        request = self.requests.get(output.request_id)
        if request is None:
            return
        for event in output.events or ():
            if event.type == EngineCoreEventType.SCHEDULED:
                request.running = True
            elif event.type == EngineCoreEventType.PREEMPTED:
                request.running = False
        if output.new_token_ids:
            if request.generated == 0:
                self.prefill_busy.ended()
            request.running = True
            request.generated += len(output.new_token_ids)
            self.generation_tokens[request.label] += len(output.new_token_ids)
        if output.finish_reason is not None:
            self.finish([output.request_id])

    def finish(self, request_ids) -> None:
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is not None and request.generated == 0:
                self.prefill_busy.ended()

    def load(self, busy_window_s: float = 10.0) -> LoadSnapshot:
        """The load as the frontend sees it now (`load_policy`): requests without a first token, how long the
        oldest has waited and the share of the last `busy_window_s` during which some did; the share of the cache
        pages the running ones hold."""
        waiting_since = [request.received_at for request in self.requests.values() if request.generated == 0]
        pages = sum(
            self.footprints.pages(request.placement, request.prompt_tokens + request.generated)
            for request in self.requests.values() if request.running
        )
        return LoadSnapshot(
            waiting=len(waiting_since),
            oldest_waiting_s=self.clock() - min(waiting_since) if waiting_since else 0.0,
            cache_use=pages / self.num_pages if self.num_pages else 0.0,
            prefill_busy=self.prefill_busy.share(busy_window_s),
        )

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        running = GaugeMetricFamily("vllm_supernet_requests_running", "Requests scheduled and not finished, by placement",
                                    labels=["placement"])  # fmt: skip
        waiting = GaugeMetricFamily("vllm_supernet_requests_waiting", "Requests queued or preempted, by placement",
                                    labels=["placement"])  # fmt: skip
        pages = GaugeMetricFamily("vllm_supernet_cache_pages", "Cache pages the running requests hold, by placement",
                                  labels=["placement"])  # fmt: skip
        cache_bytes = GaugeMetricFamily("vllm_supernet_cache_bytes",
                                        "Cache bytes (one rank's pages) the running requests hold, by placement",
                                        labels=["placement"])  # fmt: skip
        counts: dict[str, list[int]] = {label: [0, 0, 0] for label in self.prompt_tokens}
        for request in self.requests.values():
            count = counts[request.label]
            if request.running:
                count[0] += 1
                count[2] += self.footprints.pages(request.placement, request.prompt_tokens + request.generated)
            else:
                count[1] += 1
        for label, (num_running, num_waiting, num_pages) in counts.items():
            running.add_metric([label], num_running)
            waiting.add_metric([label], num_waiting)
            pages.add_metric([label], num_pages)
            cache_bytes.add_metric([label], num_pages * self.footprints.block_bytes)
        prompt = CounterMetricFamily("vllm_supernet_prompt_tokens", "Prompt tokens received, by placement",
                                     labels=["placement"])  # fmt: skip
        generation = CounterMetricFamily("vllm_supernet_generation_tokens", "Tokens generated, by placement",
                                         labels=["placement"])  # fmt: skip
        for label in self.prompt_tokens:
            prompt.add_metric([label], self.prompt_tokens[label])
            generation.add_metric([label], self.generation_tokens[label])
        families = [running, waiting, prompt, generation, pages, cache_bytes]
        if self.draft_bytes:
            families.append(GaugeMetricFamily("vllm_supernet_draft_cache_bytes",
                                              "Cache bytes (one rank) reserved for the self-speculator's draft slots",
                                              value=self.draft_bytes))  # fmt: skip
        return families


_metrics: PlacementMetrics | None = None


def placement_metrics(vllm_config=None) -> PlacementMetrics | None:
    """This process's metrics, made (and registered with prometheus_client) from the first supernet config
    seen once the engine is up; None before that or for other models."""
    global _metrics
    if _metrics is None and vllm_config is not None:
        from prometheus_client import REGISTRY

        from vllm_supernet.footprint import CacheFootprints
        from vllm_supernet.placements import ServingPlacements
        from vllm_supernet.speculative import draft_reserve

        num_pages = max((vllm_config.cache_config.num_gpu_blocks or 0) - 1, 0)  # block 0 is vLLM's null block
        reserve = draft_reserve(vllm_config)
        _metrics = PlacementMetrics(ServingPlacements.from_model_config(vllm_config.model_config),
                                    CacheFootprints.of(vllm_config), num_pages,
                                    draft_bytes=reserve.bytes if reserve is not None else 0)  # fmt: skip
        REGISTRY.register(_metrics)
    return _metrics
