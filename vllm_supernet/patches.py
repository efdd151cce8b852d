"""Every patch of vLLM internals the plugin makes, in one place.

Each patch is a thin wrapper that delegates to the original unless the served model is an Apriel2
supernet (`model_type: apriel2_text`). `install_frontend_patches` runs from `plugin.register()` in
every vLLM process (idempotent); `install_runner_patch` from the model's constructor, so only worker
processes that build an Apriel2 model are touched.

A request's placement is parsed once, in the frontend, and travels as its canonical string in
`SamplingParams.extra_args["placement"]`; workers look it up (`ServingPlacements.resolve` memoises
every string it has parsed).

vLLM 0.32 internals relied on:
- `CompletionRequest` / `ChatCompletionRequest` (vllm/entrypoints/openai/{completion,chat_completion}/
  protocol.py) keep unknown top-level fields (`OpenAIBaseModel`: `extra="allow"`) but
  `to_sampling_params` drops them. The serving classes call `to_sampling_params` before they start a
  stream, and an exception raised there reaches the app's exception handlers
  (vllm/entrypoints/serve/exception_handling/): a `VLLMValidationError` becomes HTTP 400, for streamed
  and non-streamed requests alike. The wrapper copies `placement` into `extra_args` (where `vllm_xargs`
  already lands) and validates it there, with the deployment that `build_app` was given.
- `InputProcessor.process_inputs` (vllm/v1/engine/input_processor.py) turns every request, offline
  (`LLM.generate`) or online, into an `EngineCoreRequest` in the frontend process; a
  `VLLMValidationError` raised there becomes HTTP 400 (offline: an exception) and leaves the engine
  serving. The wrapper validates the placement (offline requests reach only this point), rewrites it
  to its canonical string, and appends the placement hash to `cache_salt`: prefix-cache block hashes
  cover tokens, LoRA, multimodal data and the salt only (vllm/v1/core/kv_cache_utils.py), so two
  placements never share cached KV.
- `vllm.entrypoints.launchers.api_server.entry.build_app` builds the FastAPI app with the model
  config; the wrapper adds `GET /v1/supernet/presets`, keeps the deployment (and its load policy,
  `load_policy.py`, registered with prometheus_client's default registry) for request validation and wraps
  the app's built middleware stack (`app.middleware_stack`, Starlette) with `PlacementHeaders`.
- `GPUModelRunner._init_model_kwargs` (vllm/v1/worker/gpu_model_runner.py; `CPUModelRunner` inherits
  it) returns extra keyword arguments for `model.forward`; it runs in `_preprocess`, after
  `_prepare_inputs` has filled `query_start_loc` for the step. The batch order is
  `input_batch.req_ids` (already reordered decodes-first for the GDN metadata builder), each request's
  tokens are `query_start_loc[i] : query_start_loc[i + 1]`, `input_batch.num_computed_tokens_cpu[i]`
  counts the tokens already in its caches, and `runner.requests[req_id].sampling_params` holds its
  `extra_args`. The wrapper adds `supernet_batch` (`batch.SupernetBatch`).
- `GPUModelRunner.propose_draft_token_ids` calls a `custom_class` drafter's `propose(sampled_token_ids,
  num_tokens_no_spec, token_ids_cpu, ...)` with lists in `input_batch.req_ids` order, after the step's
  bookkeeping has appended the accepted tokens to `token_ids_cpu`. The wrapper first tells the
  `SelfSpeculator` each request's id and draft placement (`begin_step`): `propose` is given neither.
- Cache memory by placement (`cache_allocation.py`, `footprint.py`, `metrics.py`): `kv_cache_utils.get_kv_cache_groups`,
  `_max_memory_usage_bytes_from_groups`, `get_max_concurrency_for_kv_cache_config` and `get_kv_cache_configs`
  (also imported by name into vllm/v1/engine/core.py) are replaced by wrappers for supernets; `Scheduler.__init__`,
  `add_request` and `_free_blocks` (vllm/v1/core/sched/scheduler.py) install and feed the per-request views; in
  the worker, `mamba_utils.collect_mamba_copy_meta` (and `validate_mamba_state_copy_funcs`, which counts a spec's
  states: the conv-state table's copy is one more, `page_layout.py`), `MultiGroupBlockTable.compute_slot_mapping` /
  `commit_block_table` (vllm/v1/worker/block_table.py) and `GPUModelRunner._build_attention_metadata` /
  `_get_slot_mappings` / `_may_reorder_batch` skip groups no request of the step holds blocks in (the metadata
  pass reads groups by position: `kv_cache_config.kv_cache_groups`, `attn_groups`, `input_batch.block_table`, its
  `slot_mappings` argument; `_update_states` calls `_may_reorder_batch` once the step's rows are final, and
  `_dummy_run` builds a batch of its own); after `GPUModelRunner.initialize_kv_cache` (which rebuilds the input
  batch for several groups and binds each layer's views of `kv_cache_config.kv_cache_tensors` to its `kv_cache`)
  the CPU runner's `_postprocess_tensors` makes each block table one tensor again, the linear mixers get their
  rows of the conv-state table where the layout has one (`page_layout.allocate_conv_tables`), and
  on a CPU without Triton the slot mappings call `cpu_triton_utils._compute_slot_mapping_kernel_impl` directly;
  `OutputProcessor.add_request` / `process_outputs` / `abort_requests` (vllm/v1/engine/output_processor.py) feed
  the metrics; `InputProcessor.process_inputs` refuses what cannot fit (`cache_config.num_gpu_blocks`,
  `block_size`: the engine's, reported back to the frontend).
- `Platform.check_and_update_config` (the current platform's class; called from `VllmConfig.__post_init__` in the
  process that builds the config) is followed, for supernets holding attention and state pages, by the block
  size `page_layout.choose_block_size` picks and `Platform._align_hybrid_block_size`, which pads the state pages
  to it (`_patch_block_alignment`); the worker's later `update_block_size_for_backend` (after the model is built,
  before the cache specs are asked for) then finds the size already aligned.
- `vllm.triton_utils.dispatcher.register_kernels` (what the CPU platform's `register_triton_kernel_overrides`
  calls at worker start) swaps a Triton kernel for a Python/C++ stand-in; `fix_cpu_expand_kernel` registers a
  correct stand-in for `rejection_sampler.expand_kernel` (vLLM 0.32's CPU one writes into a copy) when the
  `SelfSpeculator` loads, in the worker, after the platform's own registration.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from shared_spec import Placement, PlacementError
from vllm_supernet import page_layout
from vllm_supernet.batch import SupernetBatch
from vllm_supernet.config import MODEL_TYPE
from vllm_supernet.metrics import placement_metrics
from vllm_supernet.placements import DRAFT_EXTRA_ARGS_KEY, EXTRA_ARGS_KEY, REQUEST_KEYS, ServingPlacements

# Under vLLM's logger tree so vLLM's logging config (level, format) applies.
logger = logging.getLogger("vllm.supernet")
PRESETS_ROUTE = "/v1/supernet/presets"
_frontend_installed = False
_runner_installed = False
# The deployment the API server serves (set by the `build_app` patch), for validating requests as
# they are parsed. None in offline use, where `process_inputs` validates.
_api_server_deployment: ServingPlacements | None = None
# The API server's load policy (`load_policy.py`; set by `build_app` when the deployment has one).
_api_server_policy = None
# Per HTTP request: the placement its completion runs with, for the response headers (PlacementHeaders).
_response_choice: ContextVar[dict[str, str] | None] = ContextVar("supernet_response_choice", default=None)


def is_supernet(model_config) -> bool:
    return getattr(getattr(model_config, "hf_config", None), "model_type", None) == MODEL_TYPE


def install_frontend_patches() -> None:
    global _frontend_installed
    if _frontend_installed:
        return
    _frontend_installed = True
    _patch_request_models()
    _patch_input_processor()
    _patch_build_app()
    _patch_block_alignment()
    _patch_cache_groups()
    _patch_scheduler()
    _patch_output_processor()


def _patch_block_alignment() -> None:
    """A deployment holding attention and state pages gets the smallest attention block, in steps of
    `attention.block_step` tokens (16, or 32 where blocks of 16 would slow the CPU kernel), whose page holds
    its largest state page, or its largest delta-rule state where the convolution states go apart (`page_layout`).

    vLLM gives every page of a hybrid model one size: attention blocks are made long enough to hold a state
    page and state pages are padded to them (`Platform._align_hybrid_block_size`), in steps of the larger of
    the backends' smallest kernel block and `cache_config.block_size`, which the CPU platform sets to 128 when
    nobody asked. Pages then overshoot the state by up to 128 tokens of keys and values: the benchmark model's
    137 KiB states went into 256 KiB pages, so an all-GDN request held 1.9x its bytes and a sliding window up
    to 128 tokens more than it needs. In steps of 32 tokens the same model's pages are 160 KiB, or 128 KiB with
    the convolution states in a table beside the pool (`page_layout.choose_block_size` picks).

    The size is settled when the config is built (`check_and_update_config`, in the process that builds it),
    not where vLLM aligns it (at worker start): the engine core's scheduler keeps a copy of the cache config
    taken before, and prefill chunks split at another block size than the state pages' never hit the prefix
    cache. A block size given on the command line is kept.
    """
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = platform.check_and_update_config

    def check_and_update_config(cls, vllm_config) -> None:
        original(vllm_config)
        if not is_supernet(vllm_config.model_config):
            return
        from vllm_supernet.attention import SupernetAttentionBackend, block_step
        from vllm_supernet.footprint import CacheFootprints
        from vllm_supernet.model import attention_head_sizes, holds_attention_and_states
        from vllm_supernet.page_layout import choose_block_size, conv_states_choice

        cache_config, model_config = vllm_config.cache_config, vllm_config.model_config
        choice = conv_states_choice(model_config)  # a bad value fails here, before any work
        if (
            not cache_config.user_specified_block_size
            and holds_attention_and_states(model_config)  # else one kind of page: vLLM's sizes
        ):
            step = block_step(model_config.dtype, attention_head_sizes(model_config), cache_config.cache_dtype)
            caches = CacheFootprints.of(vllm_config, block_size=step).caches
            cache_config.block_size = choose_block_size(caches, step, choice)
            cls._align_hybrid_block_size(vllm_config, SupernetAttentionBackend)  # pads the state pages to it

    platform.check_and_update_config = classmethod(check_and_update_config)


def _patch_cache_groups() -> None:
    """Supernets get one cache group per served (layer, mixer) (`cache_allocation.per_mixer_groups`)."""
    from vllm.v1.core import kv_cache_utils

    from vllm_supernet.cache_allocation import (
        allocates_by_placement,
        default_does_not_fit,
        default_groups,
        engine_footprints,
        per_mixer_groups,
        without_draft_reserve,
    )
    from vllm_supernet.page_layout import without_conv_table

    original = kv_cache_utils.get_kv_cache_groups

    def get_kv_cache_groups(vllm_config, kv_cache_spec):
        if allocates_by_placement(vllm_config.model_config) and kv_cache_spec:
            return per_mixer_groups(kv_cache_spec)
        return original(vllm_config, kv_cache_spec)

    kv_cache_utils.get_kv_cache_groups = get_kv_cache_groups

    # vLLM's start-up check (one max_model_len request must fit) and its "Maximum concurrency" line count
    # a request in every group; a supernet request holds its placement's groups: count the default's.
    original_usage = kv_cache_utils._max_memory_usage_bytes_from_groups
    original_concurrency = kv_cache_utils.get_max_concurrency_for_kv_cache_config

    def _max_memory_usage_bytes_from_groups(vllm_config, groups):
        return original_usage(vllm_config, default_groups(vllm_config, groups))

    def get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config):
        groups = default_groups(vllm_config, kv_cache_config.kv_cache_groups)
        if len(groups) == len(kv_cache_config.kv_cache_groups):
            return original_concurrency(vllm_config, kv_cache_config)
        return original_concurrency(vllm_config, replace(kv_cache_config, kv_cache_groups=groups))

    kv_cache_utils._max_memory_usage_bytes_from_groups = _max_memory_usage_bytes_from_groups
    kv_cache_utils.get_max_concurrency_for_kv_cache_config = get_max_concurrency_for_kv_cache_config

    # When the default placement cannot hold one max_model_len request, say so in the words of the 400
    # (footprint.CacheFootprints.too_long) rather than in GiB of the whole model. The engine core imports
    # the function by name.
    from vllm.v1.engine import core as engine_core

    original_configs = kv_cache_utils.get_kv_cache_configs

    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
        if is_supernet(vllm_config.model_config):  # the pool, its checks and its log lines get what drafts leave,
            available_memory = without_draft_reserve(vllm_config, available_memory)  # less the conv-state table
            available_memory = without_conv_table(engine_footprints(vllm_config, kv_cache_specs).layout, available_memory)
        try:
            return original_configs(vllm_config, kv_cache_specs, available_memory)
        except ValueError as error:
            model_config = vllm_config.model_config
            if not allocates_by_placement(model_config) or "max seq len" not in str(error):
                raise
            raise ValueError(default_does_not_fit(vllm_config, kv_cache_specs, min(available_memory)) or str(error)) from error

    kv_cache_utils.get_kv_cache_configs = get_kv_cache_configs
    engine_core.get_kv_cache_configs = get_kv_cache_configs


def _patch_scheduler() -> None:
    """The scheduler of a supernet allocates by placement (`cache_allocation.PlacementAllocation`): it
    learns each request's groups when the request arrives and forgets them when its blocks are freed."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_supernet.cache_allocation import PlacementAllocation, allocates_by_placement

    original_init, original_add, original_free_blocks = Scheduler.__init__, Scheduler.add_request, Scheduler._free_blocks

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        model_config = vllm_config.model_config
        self.supernet_allocation = None
        if allocates_by_placement(model_config) and self.kv_cache_config.kv_cache_groups:
            self.supernet_allocation = PlacementAllocation(self, ServingPlacements.from_model_config(model_config))
            self.supernet_allocation.check_default_fits(vllm_config)

    def add_request(self, request):
        allocation = getattr(self, "supernet_allocation", None)
        if allocation is not None and request.request_id not in self.requests:
            allocation.add(request)
        return original_add(self, request)

    def _free_blocks(self, request):
        original_free_blocks(self, request)
        allocation = getattr(self, "supernet_allocation", None)
        if allocation is not None:
            allocation.remove(request)

    Scheduler.__init__ = __init__
    Scheduler.add_request = add_request
    Scheduler._free_blocks = _free_blocks


def _resolve_or_400(
    serving: ServingPlacements, fields: dict[str, Any], by_load=None
) -> tuple[Placement, str | None, Placement | None]:
    """(placement, preset chosen for a service level, draft placement the request names or None) of a
    request's fields, or a 400 naming the problem; `by_load` as `ServingPlacements.resolve_request` takes it."""
    from vllm.exceptions import VLLMValidationError

    try:
        placement, preset = serving.resolve_request(fields, by_load)
        draft_value = fields.get(DRAFT_EXTRA_ARGS_KEY)
        draft = serving.resolve_draft(draft_value) if draft_value is not None else None
    except PlacementError as error:
        value = {key: fields[key] for key in REQUEST_KEYS if key in fields}
        raise VLLMValidationError(f"invalid placement: {error}", parameter=EXTRA_ARGS_KEY, value=value) from None
    return placement, preset, draft


def _replacing_request_fields(extra_args: dict | None, fields: dict[str, Any]) -> dict:
    """extra_args with this project's request fields (placement, service level, draft) replaced by `fields`."""
    kept = {key: value for key, value in (extra_args or {}).items() if key not in REQUEST_KEYS}
    return {**kept, **fields}


def _with_placement(extra_args: dict | None, placement: Placement, draft: Placement | None) -> dict:
    """extra_args with the canonical placement (and draft placement) in place of whatever chose them."""
    fields = {EXTRA_ARGS_KEY: placement.canonical}
    if draft is not None:
        fields[DRAFT_EXTRA_ARGS_KEY] = draft.canonical
    return _replacing_request_fields(extra_args, fields)


def _patch_request_models() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for request_cls in (CompletionRequest, ChatCompletionRequest):
        original = request_cls.to_sampling_params

        def to_sampling_params(self, *args, _original=original, **kwargs):
            params = _original(self, *args, **kwargs)
            extra = self.model_extra or {}
            top_level = {key: extra[key] for key in REQUEST_KEYS if key in extra}
            if top_level:
                # Top-level fields (extra_body) win over `vllm_xargs`.
                params.extra_args = _replacing_request_fields(params.extra_args, top_level)
            serving = _api_server_deployment
            if serving is not None:  # parsed here, before any stream starts: a bad one is a 400
                placement, preset, draft = _resolve_or_400(serving, params.extra_args or {}, _choice_by_load())
                params.extra_args = _with_placement(params.extra_args, placement, draft)
                choice = _response_choice.get()
                if choice is not None:  # reported in the response headers (PlacementHeaders)
                    choice.update(placement=placement.canonical, hash=placement.hash, preset=preset or "")
            return params

        request_cls.to_sampling_params = to_sampling_params


def _choice_by_load():
    """The API server's load policy as a chooser among qualifying presets, under the load seen now; None without one."""
    policy = _api_server_policy
    if policy is None:
        return None
    from vllm_supernet.load_policy import IDLE

    metrics = placement_metrics()  # None before the first request: idle
    window = policy.config.busy_window_s
    return lambda qualifying: policy.choose(qualifying, metrics.load(window) if metrics is not None else IDLE)


def _patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if not (is_supernet(self.model_config) and isinstance(params, SamplingParams)):
            return original(self, request_id, prompt, params, *args, **kwargs)
        serving = ServingPlacements.from_model_config(self.model_config)
        # A canonical string from `to_sampling_params` is a look-up; anything else is parsed here.
        placement, _, draft = _resolve_or_400(serving, params.extra_args or {})
        if draft is not None and self.vllm_config.speculative_config is None:
            from vllm.exceptions import VLLMValidationError

            from vllm_supernet.speculative import SELF_SPECULATOR

            raise VLLMValidationError(
                "invalid draft_placement: this deployment does not speculate (start it with speculative_config "
                f'{{"method": "custom_class", "model": "{SELF_SPECULATOR}", ...}})',
                parameter=DRAFT_EXTRA_ARGS_KEY,
                value=draft.canonical,
            )
        _refuse_draft_beyond_a_slot(self.vllm_config, serving, draft)
        params.extra_args = _with_placement(params.extra_args, placement, draft)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        _refuse_what_cannot_fit(self.vllm_config, placement, request)
        placement_metrics(self.vllm_config)  # made once the engine is up; followed by the output processor
        salt = f"supernet-placement:{placement.hash}"
        request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
        logger.info("request %s: placement %s (hash %s)", request_id, placement.canonical, placement.hash)
        return request

    InputProcessor.process_inputs = process_inputs


def _patch_output_processor() -> None:
    """Per-placement metrics (`metrics.py`) follow each request through vLLM's output processor."""
    from vllm.v1.engine.output_processor import OutputProcessor

    original_add, original_process, original_abort = (
        OutputProcessor.add_request, OutputProcessor.process_outputs, OutputProcessor.abort_requests
    )

    def add_request(self, request, *args, **kwargs):
        result = original_add(self, request, *args, **kwargs)
        metrics = placement_metrics()
        if metrics is not None:
            metrics.add_request(request)
        return result

    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        metrics = placement_metrics()
        if metrics is not None:
            for output in engine_core_outputs:
                metrics.update(output)
        return original_process(self, engine_core_outputs, *args, **kwargs)

    def abort_requests(self, *args, **kwargs):
        aborted = original_abort(self, *args, **kwargs)
        metrics = placement_metrics()
        if metrics is not None:
            metrics.finish(aborted)
        return aborted

    OutputProcessor.add_request = add_request
    OutputProcessor.process_outputs = process_outputs
    OutputProcessor.abort_requests = abort_requests


def _refuse_what_cannot_fit(vllm_config, placement: Placement, request) -> None:
    """A 400 for a request whose placement could not hold its whole length (prompt + max_tokens) even in an
    empty cache: it would wait forever (`footprint.CacheFootprints.too_long`)."""
    from vllm_supernet.cache_allocation import allocates_by_placement

    num_pages = (vllm_config.cache_config.num_gpu_blocks or 0) - 1  # block 0 is vLLM's null block
    if num_pages <= 0 or request.prompt_token_ids is None or not allocates_by_placement(vllm_config.model_config):
        return
    max_len = vllm_config.model_config.max_model_len
    max_tokens = request.sampling_params.max_tokens if request.sampling_params is not None else None
    num_tokens = min(len(request.prompt_token_ids) + (max_tokens if max_tokens is not None else max_len), max_len)
    reason = _footprints(vllm_config).too_long(placement, num_tokens, num_pages)
    if reason is not None:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(f"request cannot fit the cache: {reason}", parameter="max_tokens", value=max_tokens)


def _refuse_draft_beyond_a_slot(vllm_config, serving: ServingPlacements, draft: Placement | None) -> None:
    """A 400 for a request naming a draft placement whose caches need more than a draft slot, which is sized for
    the deployment's draft placement (`speculative.draft_reserve`): it could never be drafted."""
    from vllm_supernet.speculative import speculates_with_self

    if draft is None or serving.draft_default is None or not speculates_with_self(vllm_config):
        return
    footprints = _footprints(vllm_config)
    needed, slot = footprints.draft_slot(draft).bytes, footprints.draft_slot(serving.draft_default).bytes
    if needed > slot:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(
            f"invalid draft_placement: {draft.canonical!r} needs {needed / 2**10:.0f} KiB of draft cache per rank, "
            f"but this deployment's draft slots hold {slot / 2**10:.0f} KiB (sized for its draft placement "
            f"{serving.draft_default.canonical!r} at max_model_len = {vllm_config.model_config.max_model_len}); "
            "name a draft placement with fewer full-attention layers",
            parameter=DRAFT_EXTRA_ARGS_KEY,
            value=draft.canonical,
        )


_footprints_of: dict[int, Any] = {}


def _footprints(vllm_config):
    """The deployment's `CacheFootprints`, built once the engine has reported its block size."""
    from vllm_supernet.footprint import CacheFootprints

    key = id(vllm_config)
    known = _footprints_of.get(key)
    if known is None or known[0] is not vllm_config:
        known = _footprints_of[key] = (vllm_config, CacheFootprints.of(vllm_config))
    return known[1]


def _patch_build_app() -> None:
    try:
        from vllm.entrypoints.launchers.api_server import entry
    except ImportError:  # other vLLM layouts: no presets route, validation at process_inputs only
        return
    original = entry.build_app

    def build_app(args, supported_tasks, model_config=None, *rest, **kwargs):
        global _api_server_deployment, _api_server_policy
        app = original(args, supported_tasks, model_config, *rest, **kwargs)
        if model_config is not None and is_supernet(model_config):
            from vllm_supernet.load_policy import load_policy_of

            _api_server_deployment = ServingPlacements.from_model_config(model_config)
            _api_server_policy = load_policy_of(_api_server_deployment, model_config.hf_config)
            if _api_server_policy is not None:
                from prometheus_client import REGISTRY

                REGISTRY.register(_api_server_policy)
                logger.info("load policy: %s over presets %s", _api_server_policy.config, _api_server_policy.frontier)
            footprints = _listing_footprints(args, model_config)
            listing = {**_api_server_deployment.preset_listing(footprints), **_draft_listing(args, footprints)}

            @app.get(PRESETS_ROUTE)
            async def supernet_presets() -> dict[str, Any]:
                return listing

            # vLLM has built the app's middleware stack already (add_middleware would refuse): wrap it.
            app.middleware_stack = PlacementHeaders(app.middleware_stack or app.build_middleware_stack())

        return app

    entry.build_app = build_app


def _listing_footprints(args, model_config):
    """Cache figures for the presets listing (whole model, all ranks), with the state dtypes the server was
    started with."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator

    from vllm_supernet.footprint import CacheFootprints

    dtypes = MambaStateDtypeCalculator.kda_state_dtype(
        model_config.dtype, getattr(args, "mamba_cache_dtype", "auto"), getattr(args, "mamba_ssm_cache_dtype", "auto")
    )
    speculative = _self_speculation(args)
    k = int(speculative.get("num_speculative_tokens") or 0) if speculative else 0
    return CacheFootprints.of_model(model_config, state_dtypes=dtypes, speculative_tokens=k)


def _self_speculation(args) -> dict | None:
    """The server's speculative config when it speculates with the `SelfSpeculator`, else None."""
    from vllm_supernet.speculative import SELF_SPECULATOR

    speculative = getattr(args, "speculative_config", None)
    if isinstance(speculative, dict) and speculative.get("method") == "custom_class" and speculative.get("model") == SELF_SPECULATOR:
        return speculative
    return None


def _draft_listing(args, footprints) -> dict[str, Any]:
    """For a speculating server, the listing's `draft`: its draft placement and the cache bytes (all ranks) of the
    draft slot each drafting request holds, reserved at start-up beside the pool (`speculative.draft_reserve`)."""
    draft = _api_server_deployment.draft_default
    if _self_speculation(args) is None or draft is None:
        return {}
    return {"draft": {"placement": draft.canonical, "hash": draft.hash, "slot_cache_bytes": footprints.draft_slot(draft).bytes}}


class PlacementHeaders:
    """ASGI middleware: a completion's response carries the placement it ran with (`x-supernet-placement`, its
    hash, and `x-supernet-preset` when a service level chose a preset). `to_sampling_params` fills the holder
    this puts in the request's context; the headers go out with the response start, after it (streams too)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        choice: dict[str, str] = {}
        token = _response_choice.set(choice)

        async def send_with_headers(message):
            if message["type"] == "http.response.start" and choice:
                headers = [*message.get("headers", []), (b"x-supernet-placement", choice["placement"].encode()),
                           (b"x-supernet-placement-hash", choice["hash"].encode())]
                if choice["preset"]:
                    headers.append((b"x-supernet-preset", choice["preset"].encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _response_choice.reset(token)


def install_runner_patch() -> None:
    global _runner_installed
    if _runner_installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._init_model_kwargs

    def _init_model_kwargs(self, num_reqs: int | None = None):
        kwargs = original(self, num_reqs)
        model = getattr(self, "model", None)
        if model is not None and getattr(model, "accepts_supernet_batch", False):
            kwargs["supernet_batch"] = _supernet_batch(self, model.serving, num_reqs)
        return kwargs

    GPUModelRunner._init_model_kwargs = _init_model_kwargs

    original_propose = GPUModelRunner.propose_draft_token_ids

    def propose_draft_token_ids(self, *args, **kwargs):
        from vllm_supernet.speculative import SelfSpeculator

        if isinstance(getattr(self, "drafter", None), SelfSpeculator):
            self.drafter.begin_step(_draft_requests(self, self.model.serving))
        return original_propose(self, *args, **kwargs)

    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids

    original_initialize = GPUModelRunner.initialize_kv_cache

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, *args, **kwargs):
        original_initialize(self, kv_cache_config, is_profiling, *args, **kwargs)
        from vllm_supernet.speculative import SelfSpeculator

        # vLLM's CPU runner makes each host/device buffer pair one tensor when it is built (`_postprocess_tensors`),
        # but `initialize_kv_cache` rebuilds the input batch for a model with several cache groups, and the new
        # block tables get a second CPU tensor each, copied into every step (16 copies a step for a 4-layer
        # supernet). Making them one tensor again is what the CPU runner means to run.
        if hasattr(self, "_postprocess_tensors"):
            self._postprocess_tensors()
        _share_block_counts(self.input_batch.block_table)
        _note_state_groups(self)
        page_layout.allocate_conv_tables(self)

        # The draft slots take the memory kept out of the pool (`speculative.draft_reserve`), now that the pool
        # is allocated: measured before it, they would have been counted as the model's own.
        if not is_profiling and isinstance(getattr(self, "drafter", None), SelfSpeculator):
            self.drafter.allocate_slots()

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    _patch_mamba_copies()
    _skip_idle_groups()
    _runner_installed = True


def _share_block_counts(multi_table) -> None:
    """Put every group's `num_blocks_per_row` (blocks held per batch row, vllm/v1/worker/block_table.py) in the
    rows of one [groups, max_num_reqs] array, so that `held_groups` asks numpy once a step, not once per group."""
    import numpy as np

    tables = multi_table.block_tables
    counts = np.stack([table.num_blocks_per_row for table in tables])
    for group, table in enumerate(tables):
        table.num_blocks_per_row = counts[group]  # a view: vLLM writes the counts in place
    multi_table.supernet_block_counts = counts


def _note_state_groups(runner) -> None:
    """The cache groups of state pages (`MambaSpec`), fixed once the runner has its cache config."""
    from vllm.v1.kv_cache_interface import MambaSpec

    groups = runner.kv_cache_config.kv_cache_groups
    runner.supernet_state_groups = frozenset(g for g, group in enumerate(groups) if isinstance(group.kv_cache_spec, MambaSpec))


def held_groups(multi_table, num_reqs: int, fresh: bool = False) -> list[int]:
    """The cache groups any of the step's first `num_reqs` batch rows holds blocks in.

    A step asks four times (reorder, slot mappings twice, metadata) about tables that do not change in between:
    the runner's `_update_states` works out the answer once its batch is final (`remember_held_groups`) and the
    metadata pass, the step's last reader, forgets it; `fresh` (or no answer kept) asks numpy."""
    import numpy as np

    kept = getattr(multi_table, "supernet_step_held", None)
    if not fresh and kept is not None and kept[0] == num_reqs:
        return kept[1]
    counts = getattr(multi_table, "supernet_block_counts", None)
    if counts is None:  # tables the runner built before `initialize_kv_cache` shared their counts
        return [group for group, table in enumerate(multi_table.block_tables)
                if table.num_blocks_per_row[:num_reqs].any()]  # fmt: skip
    return np.flatnonzero(counts[:, :num_reqs].any(axis=1)).tolist()


def remember_held_groups(multi_table, num_reqs: int) -> list[int]:
    held = held_groups(multi_table, num_reqs, fresh=True)
    multi_table.supernet_step_held = (num_reqs, held)
    return held


def forget_held_groups(multi_table) -> None:
    multi_table.supernet_step_held = None


def _compute_slot_mapping_on_cpu():
    """vLLM's CPU fallback for the slot-mapping kernel called as the kernel launcher would (vLLM 0.32 on a CPU
    without Triton: `platforms/cpu.py` registers `cpu_triton_utils._compute_slot_mapping_kernel_impl`), or None
    where the launcher runs another kernel. The launcher binds its arguments by signature on every call, which
    costs more than the kernel at decode sizes, once per group with blocks."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:
        return None
    from vllm.utils.cpu_triton_utils import _compute_slot_mapping_kernel_impl
    from vllm.v1.worker.block_table import SlotMappingMode

    def compute(block_table, query_start_loc, positions) -> None:
        if block_table.slot_mapping_mode == SlotMappingMode.NONE:  # state groups read no slot mapping
            return
        _compute_slot_mapping_kernel_impl(
            positions.shape[0], block_table.max_num_batched_tokens, query_start_loc, positions,
            block_table.block_table.gpu, block_table.block_table.gpu.stride(0), block_table.slot_mapping.gpu,
            block_table.block_size,
        )  # fmt: skip

    return compute


def _skip_idle_groups() -> None:
    """Slot mappings, metadata and the decodes-first order only for the cache groups some request of the step
    holds blocks in.

    With allocation by placement (`cache_allocation`) a supernet has one group per served (layer, mixer), and a
    step's requests hold blocks in few of them (an all-SWA batch: the SWA layers'); vLLM's runner would map
    slots for every group every step (`MultiGroupBlockTable.compute_slot_mapping`, vllm/v1/worker/block_table.py).
    A group none of the step's rows holds blocks in is never read in that step: its layers run for no request
    and its metadata is never built (`batch.DeferredMetadata`). Block-table copies stay for every group on a
    device (vLLM relies on them to clear finished rows there) and are skipped on CPU, where the runner makes the
    host and device tables one tensor. Installed in the processes that build a supernet only."""
    from vllm.v1.worker.block_table import MultiGroupBlockTable

    compute_on_cpu = _compute_slot_mapping_on_cpu()

    def compute_slot_mapping(self, num_reqs, query_start_loc, positions):
        for group in held_groups(self, num_reqs):
            block_table = self.block_tables[group]
            if compute_on_cpu is not None and block_table.dcp_world_size == 1:
                compute_on_cpu(block_table, query_start_loc, positions)
            else:
                block_table.compute_slot_mapping(num_reqs, query_start_loc, positions)

    def commit_block_table(self, num_reqs):
        for block_table in self.block_tables:
            buffer = block_table.block_table
            if buffer.gpu is not buffer.cpu:  # the CPU runner makes them one tensor: a copy onto itself
                block_table.commit_block_table(num_reqs)

    MultiGroupBlockTable.compute_slot_mapping = compute_slot_mapping
    MultiGroupBlockTable.commit_block_table = commit_block_table

    # The runner's metadata pass (`GPUModelRunner._build_attention_metadata`) visits every group too (a copy of
    # the common metadata, its block table and encoder lengths, a builder call per group); it runs over the held
    # groups only, renumbered: the function reads groups by position (kv_cache_config.kv_cache_groups,
    # attn_groups, input_batch.block_table, slot_mappings) and keys its result by layer name.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original_build = GPUModelRunner._build_attention_metadata

    def _build_attention_metadata(self, num_tokens, num_reqs, *args, slot_mappings=None, **kwargs):
        multi_table = self.input_batch.block_table
        tables = multi_table.block_tables
        held = held_groups(multi_table, num_reqs)
        forget_held_groups(multi_table)  # the step's last reader
        if not held or len(held) == len(tables) or slot_mappings is None or kwargs.get("for_cudagraph_capture"):
            return original_build(self, num_tokens, num_reqs, *args, slot_mappings=slot_mappings, **kwargs)
        config, attn_groups = self.kv_cache_config, self.attn_groups
        self.kv_cache_config = replace(config, kv_cache_groups=[config.kv_cache_groups[g] for g in held])
        self.attn_groups = [attn_groups[g] for g in held]
        multi_table.block_tables = [tables[g] for g in held]
        try:
            return original_build(self, num_tokens, num_reqs, *args,
                                  slot_mappings={new: slot_mappings[g] for new, g in enumerate(held)}, **kwargs)  # fmt: skip
        finally:
            self.kv_cache_config, self.attn_groups, multi_table.block_tables = config, attn_groups, tables

    GPUModelRunner._build_attention_metadata = _build_attention_metadata

    # The slot mappings the step hands its metadata and its forward context: vLLM slices and pads one per group;
    # only the held groups' are read (above, and by the layers of the mixers the step runs).
    original_slot_mappings = GPUModelRunner._get_slot_mappings

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices=None):
        config = getattr(self, "kv_cache_config", None)
        multi_table = self.input_batch.block_table
        held = held_groups(multi_table, self.input_batch.num_reqs) if config is not None else []
        if ubatch_slices is not None or not held or len(held) == len(config.kv_cache_groups):
            return original_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices)
        by_group, by_layer = {}, {}
        for group in held:
            slot_mapping = multi_table[group].slot_mapping.gpu[:num_tokens_padded]
            slot_mapping[num_tokens_unpadded:num_tokens_padded].fill_(-1)  # padding slots, as vLLM writes them
            by_group[group] = slot_mapping
            by_layer.update(dict.fromkeys(config.kv_cache_groups[group].layer_names, slot_mapping))
        return by_group, by_layer

    GPUModelRunner._get_slot_mappings = _get_slot_mappings

    # vLLM's GDN metadata builder wants a step's decodes first, so the runner reorders every step's batch
    # (`_may_reorder_batch`, a Python pass over the requests) once any state group exists; a step none of whose
    # requests holds a state page never builds that metadata, so its order does not matter.
    original_reorder = GPUModelRunner._may_reorder_batch

    def _may_reorder_batch(self, scheduler_output):
        multi_table = self.input_batch.block_table
        # Called by `_update_states` once the step's rows are final (a reorder swaps rows, not their blocks).
        held = remember_held_groups(multi_table, self.input_batch.num_reqs)
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) == len(multi_table.block_tables) and self.supernet_state_groups.isdisjoint(held):
            return None
        return original_reorder(self, scheduler_output)

    GPUModelRunner._may_reorder_batch = _may_reorder_batch

    original_dummy_run = GPUModelRunner._dummy_run

    def _dummy_run(self, *args, **kwargs):
        forget_held_groups(self.input_batch.block_table)  # a dummy batch is not the last step's
        return original_dummy_run(self, *args, **kwargs)

    GPUModelRunner._dummy_run = _dummy_run


def _patch_mamba_copies() -> None:
    """Prefix caching's state copies ("align" mode, `mamba_utils.collect_mamba_copy_meta`) visit every state
    group for every request; with allocation by placement (`cache_allocation`) a request holds pages only in
    its own groups, so the others are skipped."""
    from vllm.v1.worker import mamba_utils

    original = mamba_utils.collect_mamba_copy_meta

    def collect_mamba_copy_meta(copy_bufs, kv_cache_config, copy_funcs, mamba_group_ids, *args, **kwargs):
        req_state = kwargs.get("req_state", args[3] if len(args) > 3 else None)
        held = [group for group in mamba_group_ids if req_state.block_ids[group]]
        return original(copy_bufs, kv_cache_config, copy_funcs, held, *args, **kwargs)

    mamba_utils.collect_mamba_copy_meta = collect_mamba_copy_meta

    # With the conv states in the table beside the pool (`page_layout`), a state page's spec lists the
    # delta-rule state alone and its layers' kv_cache the table's conv states after it: vLLM's check that a
    # spec has a state for each copy function sees one state fewer than is copied.
    original_validate = mamba_utils.validate_mamba_state_copy_funcs

    def validate_mamba_state_copy_funcs(mamba_groups, copy_funcs):
        apart = page_layout.copy_funcs(conv_apart=True)
        return original_validate(mamba_groups, {kind: funcs[:1] if funcs == apart else funcs for kind, funcs in copy_funcs.items()})

    mamba_utils.validate_mamba_state_copy_funcs = validate_mamba_state_copy_funcs


def fix_cpu_expand_kernel() -> None:
    """Replace vLLM 0.32's CPU stand-in for the rejection sampler's `expand_kernel`, which makes sampled
    (temperature > 0) speculative decoding on CPU follow the wrong distribution.

    `expand_batch_to_tokens` spreads each request's temperature (and top-k / top-p) over its draft tokens into
    a new float (int32) tensor; the CPU stand-in (`vllm.utils.cpu_triton_utils._expand_kernel_impl`) hands the
    C++ kernel `output.to(torch.int64)`, a copy, so the real output stays uninitialised memory and the target's
    probabilities are divided by garbage (seen here: a greedy draft accepted 91 % of the time where the
    target gives it 3.7 %). Greedy requests never read it. Registered again with vLLM's own kernel registry,
    on CPU builds that use the C++ stand-ins (no Triton)."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:
        return
    import torch
    from vllm.triton_utils.dispatcher import register_kernels

    def expand_kernel(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
        counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
        values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
        output.copy_(values.repeat_interleave(counts)[: output.numel()].to(output.dtype))

    register_kernels({"vllm.v1.sample.rejection_sampler.expand_kernel": expand_kernel})


def _draft_requests(runner, serving: ServingPlacements) -> list:
    """Each request of the step, in the batch order of `propose`'s lists: its id, draft placement, and how many
    more tokens it may emit (drafts past `max_tokens` are never used)."""
    from vllm_supernet.speculative import DraftRequest

    batch = runner.input_batch
    requests = []
    for req_id in batch.req_ids[: batch.num_reqs]:
        state = runner.requests[req_id]
        params = state.sampling_params
        draft = serving.resolve_draft((params.extra_args or {}).get(DRAFT_EXTRA_ARGS_KEY) if params else None)
        remaining = params.max_tokens - len(state.output_token_ids) if params and params.max_tokens else None
        requests.append(DraftRequest(req_id, draft, remaining))
    return requests


def _supernet_batch(runner, serving: ServingPlacements, num_reqs: int | None) -> SupernetBatch:
    if num_reqs == 0:  # dummy / profiling run
        return SupernetBatch.empty()
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    placements = []
    for req_id in batch.req_ids[:num_reqs]:
        params = runner.requests[req_id].sampling_params
        # The frontend's canonical string: a dictionary look-up after its first request.
        placements.append(serving.resolve((params.extra_args or {}).get(EXTRA_ARGS_KEY) if params else None))
    return SupernetBatch(
        placements=placements,
        query_start_loc=runner.query_start_loc.np[: num_reqs + 1].tolist(),
        num_computed=batch.num_computed_tokens_cpu[:num_reqs].tolist(),
    )
