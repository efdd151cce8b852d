"""Hands each step's per-request placements to `Apriel2ForCausalLM.forward`.

vLLM internal relied on: `GPUModelRunner._init_model_kwargs` (vllm/v1/worker/gpu_model_runner.py;
`CPUModelRunner` inherits it) returns extra keyword arguments for `model.forward`; it runs in
`_preprocess`, after `_prepare_inputs` has filled `query_start_loc` for the step. The batch order
is `input_batch.req_ids` (already reordered decodes-first for the GDN metadata builder), each
request's tokens are `query_start_loc[i] : query_start_loc[i + 1]`, and
`input_batch.num_computed_tokens_cpu[i]` counts the tokens already in its caches.
The placement itself travels in `SamplingParams.extra_args["placement"]`, already validated and
canonicalised by the frontend (`serving.py`); it is parsed again here (cheap, cached per request).

The patch is installed from the model's constructor, so only worker processes that build an
Apriel2 model are touched, and it delegates to the original for every other model.
"""

from __future__ import annotations

import logging

from vllm_supernet.placements import EXTRA_ARGS_KEY, SupernetBatch

logger = logging.getLogger(__name__)
_installed = False


def install_runner_hook() -> None:
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._init_model_kwargs

    def _init_model_kwargs(self, num_reqs: int | None = None):
        kwargs = original(self, num_reqs)
        model = getattr(self, "model", None)
        if model is not None and getattr(model, "accepts_supernet_batch", False):
            kwargs["supernet_batch"] = _supernet_batch(self, model, num_reqs)
        return kwargs

    GPUModelRunner._init_model_kwargs = _init_model_kwargs
    _installed = True


def _supernet_batch(runner, model, num_reqs: int | None) -> SupernetBatch:
    if num_reqs == 0:  # dummy / profiling run
        return SupernetBatch.empty()
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    cache: dict = model.__dict__.setdefault("_placement_by_request", {})
    placements = []
    for req_id in batch.req_ids[:num_reqs]:
        placement = cache.get(req_id)
        if placement is None:
            params = runner.requests[req_id].sampling_params
            value = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
            placement = model.serving.resolve(value)
            if len(cache) > 4096:  # finished requests are never announced here; forget old entries
                cache.clear()
            cache[req_id] = placement
            logger.debug("request %s: placement %s (%s)", req_id, placement.canonical, placement.hash)
        placements.append(placement)
    return SupernetBatch(
        placements=placements,
        query_start_loc=runner.query_start_loc.np[: num_reqs + 1].tolist(),
        num_computed=batch.num_computed_tokens_cpu[:num_reqs].tolist(),
    )
