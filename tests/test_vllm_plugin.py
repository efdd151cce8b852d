"""`vllm_supernet.plugin` and `vllm_supernet.config`: registration and the config vLLM builds."""

from __future__ import annotations

import json

import pytest

from shared_spec import Apriel2TextConfig
from tests.vllm_helpers import FIXTURE_CHECKPOINT

# ---- registration (imports vLLM: slow) -------------------------------------------------------------


@pytest.mark.slow
def test_register_is_idempotent_and_registers_config_and_architecture():
    pytest.importorskip("vllm")
    from vllm import ModelRegistry
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from vllm_supernet.plugin import register

    register()
    register()
    assert "Apriel2ForCausalLM" in ModelRegistry.get_supported_archs()
    assert _CONFIG_REGISTRY["apriel2_text"].__name__ == "Apriel2VllmConfig"


@pytest.mark.slow
def test_config_sizes_the_model_and_keeps_windows_inside_mixers():
    pytest.importorskip("vllm")
    from vllm_supernet.config import Apriel2VllmConfig

    raw = json.loads((FIXTURE_CHECKPOINT / "config.json").read_text())
    config = Apriel2VllmConfig(**raw)
    assert (
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    ) == (
        3,
        6,
        3,
        16,
    )
    # A top-level sliding_window would make vLLM treat every attention layer as SWA.
    assert getattr(config, "sliding_window", None) is None
    assert config.get_text_config() is config
    assert (
        config.apriel2().to_json_dict()["decoder"]
        == Apriel2TextConfig.model_validate(raw).to_json_dict()["decoder"]
    )
