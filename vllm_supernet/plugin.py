"""vLLM general plugin entry point (`vllm.general_plugins: supernet`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), so it must be
idempotent and cheap: it records names only; the model module is imported lazily by vLLM's
registry (`ModelRegistry.register_model(arch, "module:Class")`, vllm/model_executor/models/registry.py).
"""

from __future__ import annotations

ARCHITECTURE = "Apriel2ForCausalLM"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from vllm_supernet.config import MODEL_TYPE, Apriel2VllmConfig

    # vLLM's own config registry (vllm/transformers_utils/config.py: `_CONFIG_REGISTRY`, read by
    # `HFConfigParser.parse`), which also registers the class with transformers' AutoConfig.
    if MODEL_TYPE not in _CONFIG_REGISTRY:
        _CONFIG_REGISTRY[MODEL_TYPE] = Apriel2VllmConfig
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_supernet.model:Apriel2ForCausalLM")

    from vllm_supernet.patches import install_frontend_patches

    install_frontend_patches()
    _registered = True
