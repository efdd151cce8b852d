"""Sliding-window attention through FlexAttention's block mask, held to the dense-mask path.

FlexAttention runs its forward on CPU in eager mode (no backward there), so these tests run the very block
mask and call the GPU path uses; its compiled CUDA kernels are checked by `scripts/gpu_check.sh`."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from fast_llm_supernet.model import ops, windowed_attention
from fast_llm_supernet.model.attention import Attention
from shared_spec import AttentionMixerConfig

pytestmark = [
    pytest.mark.skipif(windowed_attention.flex_attention is None, reason="needs torch >= 2.5 (FlexAttention)"),
    pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile"),
]


@pytest.fixture
def flex_on_cpu(monkeypatch):
    monkeypatch.setattr(windowed_attention, "FLEX_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(windowed_attention, "_failed_devices", set())


def dense(query, key, value, window, scale):
    length = query.shape[2]
    positions = torch.arange(length)
    allowed = ops.attention_mask(positions, positions, window)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)


@pytest.mark.parametrize(
    ("length", "window", "heads", "groups"),
    [(20, 5, 6, 3), (300, 37, 4, 2), (300, 128, 4, 4), (257, 1, 2, 1), (50, 200, 4, 1)],
)
def test_flex_matches_the_dense_mask(flex_on_cpu, length, window, heads, groups):
    torch.manual_seed(length + window)
    query = torch.randn(2, heads, length, 16)
    key, value = torch.randn(2, groups, length, 16), torch.randn(2, groups, length, 16)
    flex = windowed_attention.sliding_window_attention(query, key, value, window, 0.25)
    torch.testing.assert_close(flex, dense(query, key, value, window, 0.25), atol=2e-6, rtol=1e-5)


def _module(window, head_size=16):
    torch.manual_seed(7)
    config = AttentionMixerConfig.model_validate(
        {"heads": 4, "head_groups": 2, "head_size": head_size, "add_linear_biases": False, "window_size": window,
         "rotary": {"type": "mistral_1d", "theta": 1000.0}}
    )
    return Attention(config, 32)


@torch.no_grad()
def test_the_mixer_takes_the_flex_path_for_whole_sequences(flex_on_cpu, monkeypatch):
    module = _module(window=9)
    hidden = torch.randn(2, 150, 32)
    calls = []
    real = windowed_attention.sliding_window_attention
    monkeypatch.setattr(windowed_attention, "sliding_window_attention", lambda *a: calls.append(1) or real(*a))
    through_flex = module(hidden)
    assert calls == [1]
    monkeypatch.setattr(windowed_attention, "FLEX_DEVICE_TYPES", frozenset())
    torch.testing.assert_close(through_flex, module(hidden), atol=2e-6, rtol=1e-5)  # the dense path
    assert calls == [1]


@torch.no_grad()
def test_unsupported_head_sizes_and_decode_steps_stay_dense(flex_on_cpu):
    assert not windowed_attention.usable(torch.zeros(1, 2, 8, 24))
    assert not windowed_attention.usable(torch.zeros(1, 2, 8, 8))
    assert windowed_attention.usable(torch.zeros(1, 2, 8, 64))
    module = _module(window=4)  # prefill through FlexAttention, then decode steps on the dense path
    hidden = torch.randn(1, 12, 32)
    cache = module.new_cache(1)
    pieces = [module(hidden[:, :6], cache=cache)] + [module(hidden[:, t : t + 1], cache=cache) for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), module(hidden), atol=2e-6, rtol=1e-5)


@torch.no_grad()
def test_a_failing_flex_falls_back_to_the_dense_path_once(flex_on_cpu, monkeypatch, caplog):
    module = _module(window=5)
    hidden = torch.randn(1, 40, 32)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this head size")

    monkeypatch.setattr(windowed_attention, "flex_attention", broken)
    with caplog.at_level(logging.WARNING, logger=windowed_attention.__name__):
        first, second = module(hidden), module(hidden)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "dense-mask path" in caplog.records[0].getMessage()
    monkeypatch.setattr(windowed_attention, "FLEX_DEVICE_TYPES", frozenset())
    expected = module(hidden)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
