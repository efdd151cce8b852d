"""Frontend hooks: the `placement` request field, its validation, the prefix-cache salt, presets.

Installed by `plugin.register()` in every vLLM process (idempotent); each hook is a thin wrapper
that does nothing unless the served model is an Apriel2 supernet (`model_type: apriel2_text`).

vLLM internals relied on:
- `CompletionRequest` / `ChatCompletionRequest` (vllm/entrypoints/openai/{completion,chat_completion}/
  protocol.py) keep unknown top-level fields (`OpenAIBaseModel`: `extra="allow"`) but
  `to_sampling_params` drops them; the wrapper copies `placement` into `SamplingParams.extra_args`,
  where `vllm_xargs` already lands.
- `InputProcessor.process_inputs` (vllm/v1/engine/input_processor.py) turns every request, offline
  (`LLM.generate`) or online, into an `EngineCoreRequest` in the frontend process; a
  `VLLMValidationError` raised there becomes HTTP 400 and leaves the server serving. The wrapper
  validates the placement there, rewrites it to its canonical string, and appends the placement hash
  to `cache_salt` (prefix-cache block hashes cover tokens, LoRA, multimodal data and the salt only:
  vllm/v1/core/kv_cache_utils.py).
- `vllm.entrypoints.launchers.api_server.entry.build_app` builds the FastAPI app; the wrapper adds
  `GET /v1/supernet/presets`.
"""

from __future__ import annotations

import logging
from typing import Any

from shared_spec import PlacementError
from vllm_supernet.config import MODEL_TYPE
from vllm_supernet.placements import EXTRA_ARGS_KEY, ServingPlacements

# Under vLLM's logger tree so vLLM's logging config (level, format) applies.
logger = logging.getLogger("vllm.supernet")
_installed = False
PRESETS_ROUTE = "/v1/supernet/presets"


def _is_supernet(model_config) -> bool:
    return getattr(getattr(model_config, "hf_config", None), "model_type", None) == MODEL_TYPE


def install_api_server_hooks() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _patch_request_models()
    _patch_input_processor()
    _patch_build_app()


def _patch_request_models() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for request_cls in (CompletionRequest, ChatCompletionRequest):
        original = request_cls.to_sampling_params

        def to_sampling_params(self, *args, _original=original, **kwargs):
            params = _original(self, *args, **kwargs)
            extra = self.model_extra or {}
            if EXTRA_ARGS_KEY in extra:
                # A top-level `placement` (extra_body) wins over `vllm_xargs.placement`.
                params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: extra[EXTRA_ARGS_KEY]}
            return params

        request_cls.to_sampling_params = to_sampling_params


def _patch_input_processor() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if not (_is_supernet(self.model_config) and isinstance(params, SamplingParams)):
            return original(self, request_id, prompt, params, *args, **kwargs)
        serving = ServingPlacements.from_model_config(self.model_config)
        value: Any = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
        try:
            placement = serving.resolve(value)
        except PlacementError as error:
            raise VLLMValidationError(
                f"invalid placement: {error}", parameter=EXTRA_ARGS_KEY, value=value
            ) from None
        params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: placement.canonical}
        request = original(self, request_id, prompt, params, *args, **kwargs)
        salt = f"supernet-placement:{placement.hash}"
        request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
        logger.info("request %s: placement %s (hash %s)", request_id, placement.canonical, placement.hash)
        return request

    InputProcessor.process_inputs = process_inputs


def _patch_build_app() -> None:
    try:
        from vllm.entrypoints.launchers.api_server import entry
    except ImportError:  # other vLLM layouts: no presets route, everything else works
        return
    original = entry.build_app

    def build_app(args, supported_tasks, model_config=None, *rest, **kwargs):
        app = original(args, supported_tasks, model_config, *rest, **kwargs)
        if model_config is not None and _is_supernet(model_config):
            serving = ServingPlacements.from_model_config(model_config)
            listing = serving.preset_listing()

            @app.get(PRESETS_ROUTE)
            async def supernet_presets() -> dict[str, Any]:
                return listing

        return app

    entry.build_app = build_app
