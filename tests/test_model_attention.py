"""Attention mixers (FA, SWA) against an independent per-head loop reference, and their caches."""

from __future__ import annotations

import pytest
import torch

from fast_llm_supernet.model import build_mixer
from fast_llm_supernet.model.attention import (
    Attention,
    effective_attention_configs,
    linear_bias_enabled,
)
from shared_spec import AttentionMixerConfig, GDNMixerConfig

HIDDEN = 32


def attention_config(**overrides) -> AttentionMixerConfig:
    fields = {
        "heads": 4,
        "head_groups": 2,
        "head_size": 8,
        "add_linear_biases": False,
        "rotary": {"type": "mistral_1d", "theta": 1000.0},
    }
    fields.update(overrides)
    return AttentionMixerConfig.model_validate(fields)


def reference_attention(module: Attention, hidden: torch.Tensor) -> torch.Tensor:
    """Attention written out per batch row, head and query, in float64, rotary with complex numbers."""
    config = module.config
    heads, groups, size = config.heads, config.head_groups, config.head_size
    window = config.window_size
    batch, length, _ = hidden.shape
    x = hidden.double()

    def project(linear, count):
        out = x @ linear.weight.double().T
        if linear.bias is not None:
            out = out + linear.bias.double()
        return out.view(batch, length, count, size)

    query, key, value = project(module.q_proj, heads), project(module.k_proj, groups), project(module.v_proj, groups)

    # Rotary: channel c (first half) and c + size/2 (second half) are the real and imaginary part of one
    # complex number, rotated by position * theta^(-2c/size).
    half = size // 2
    angles = torch.arange(length, dtype=torch.float64)[:, None] * config.rotary.theta ** (
        -2 * torch.arange(half, dtype=torch.float64) / size
    )
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # [1, T, 1, half]

    def rotate(t):
        z = torch.complex(t[..., :half], t[..., half:]) * rotation
        return torch.cat([z.real, z.imag], dim=-1)

    query, key = rotate(query), rotate(key)
    out = torch.zeros(batch, length, heads, size, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)  # query head h reads KV group h // heads_per_group
            for i in range(length):
                first = 0 if window is None else max(0, i - window + 1)
                scores = key[b, first : i + 1, g] @ query[b, i, h] * size**-0.5
                out[b, i, h] = scores.softmax(0) @ value[b, first : i + 1, g]
    out = out.reshape(batch, length, heads * size)
    result = out @ module.o_proj.weight.double().T
    if module.o_proj.bias is not None:
        result = result + module.o_proj.bias.double()
    return result.float()


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("biases", [False, True])
def test_matches_loop_reference(window, biases):
    torch.manual_seed(0)
    module = Attention(attention_config(window_size=window, add_linear_biases=biases), HIDDEN)
    if biases:
        for linear in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
            torch.nn.init.normal_(linear.bias, std=0.5)
    hidden = torch.randn(2, 9, HIDDEN)
    torch.testing.assert_close(module(hidden), reference_attention(module, hidden), atol=2e-6, rtol=1e-5)


def test_window_reaches_exactly_w_keys():
    torch.manual_seed(1)
    window = 3
    module = Attention(attention_config(window_size=window), HIDDEN)
    hidden = torch.randn(1, 8, HIDDEN)
    base = module(hidden)
    query = 6
    for key, should_change in [(query - window, False), (query - window + 1, True), (query, True)]:
        changed = hidden.clone()
        changed[0, key] += 1.0
        moved = (module(changed)[0, query] - base[0, query]).abs().max().item()
        assert (moved > 1e-4) == should_change, (key, moved)


@pytest.mark.parametrize("window", [None, 2, 4])
def test_incremental_decode_matches_full_forward(window):
    torch.manual_seed(2)
    module = Attention(attention_config(window_size=window), HIDDEN)
    hidden = torch.randn(3, 11, HIDDEN)
    full = module(hidden)
    cache = module.new_cache(3, hidden.device, hidden.dtype)
    pieces = [module(hidden[:, :5], cache=cache)]
    for position in range(5, 11):
        pieces.append(module(hidden[:, position : position + 1], cache=cache))
        if window is None:
            assert cache.length == position + 1
        else:  # what the next query reaches, and never more than the buffer
            assert min(position + 1, window - 1) <= cache.length <= cache.capacity <= 64
    assert cache.position == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("budget", [False, True], ids=["growing", "allocated_to_budget"])
def test_long_decode_writes_in_place_and_matches_full_forward(window, budget):
    torch.manual_seed(4)
    module = Attention(attention_config(window_size=window), HIDDEN)
    hidden = torch.randn(2, 150, HIDDEN)
    full = module(hidden)
    cache = module.new_cache(2, max_length=150 if budget else None)
    pieces = [module(hidden[:, :7], cache=cache)]
    buffers = set()
    for position in range(7, 150):
        pieces.append(module(hidden[:, position : position + 1], cache=cache))
        buffers.add(cache.key.data_ptr())
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=5e-6, rtol=1e-5)
    if window is None:
        # Allocated once for the budget; otherwise doubled: a handful of buffers for 143 steps, not one per step.
        assert len(buffers) == 1 if budget else len(buffers) <= 3
    else:
        assert cache.capacity <= 64 and len(buffers) <= 4  # bounded by the window, moved once per ~60 tokens


def test_chunked_prefill_with_cache_matches_full_forward():
    torch.manual_seed(3)
    module = Attention(attention_config(window_size=3), HIDDEN)
    hidden = torch.randn(2, 10, HIDDEN)
    cache = module.new_cache(2)
    pieces = [module(hidden[:, :4], cache=cache), module(hidden[:, 4:9], cache=cache), module(hidden[:, 9:], cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), module(hidden), atol=2e-6, rtol=1e-5)


def test_bias_flags_follow_fast_llm():
    # Fast-LLM defaults add_linear_biases to True and its exporter omits the key when True.
    implicit = AttentionMixerConfig.model_validate({"heads": 2, "head_groups": 1, "head_size": 4})
    assert linear_bias_enabled(implicit, "query_layer")
    # Qwen2 style: q/k/v biased, dense not.
    qwen = attention_config(add_linear_biases=True, dense_layer={"bias": {"enabled": False}})
    module = Attention(qwen, HIDDEN)
    assert module.q_proj.bias is not None and module.v_proj.bias is not None and module.o_proj.bias is None
    names = {name for name, _ in module.named_parameters()}
    assert names == {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
                     "v_proj.bias", "o_proj.weight"}


def test_unknown_rotary_type_is_rejected_with_choices():
    with pytest.raises(ValueError, match="rotary type 'spiral'.*mistral_1d"):
        Attention(attention_config(rotary={"type": "spiral", "theta": 10.0}), HIDDEN)


def test_default_rotary_name_is_the_same_math():
    torch.manual_seed(4)
    mistral = Attention(attention_config(), HIDDEN)
    default = Attention(attention_config(rotary={"type": "default", "theta": 1000.0}), HIDDEN)
    default.load_state_dict(mistral.state_dict())
    hidden = torch.randn(1, 6, HIDDEN)
    torch.testing.assert_close(default(hidden), mistral(hidden), atol=0, rtol=0)


def test_llama3_rotary_keeps_high_frequencies():
    from fast_llm_supernet.model.attention import rotary_angle_scales

    plain = rotary_angle_scales(attention_config())
    llama3 = rotary_angle_scales(
        attention_config(rotary={"type": "llama3", "theta": 1000.0, "scale_factor": 8.0, "original_context_length": 64})
    )
    assert llama3[0] == plain[0]  # wavelength 2*pi < 64/4: unchanged
    assert torch.isclose(llama3[-1], plain[-1] / 8)  # longest wavelength: scaled down


def test_upstream_mask_sharing_takes_the_last_attention_window():
    mixers = {
        "fa": attention_config(),
        "gdn": GDNMixerConfig(value_heads=2, key_heads=1, key_head_dim=8, value_head_dim=8),
        "swa": attention_config(window_size=5, rotary={"type": "mistral_1d", "theta": 77.0}),
    }
    effective = effective_attention_configs(mixers)
    assert set(effective) == {"fa", "swa"}
    assert effective["fa"].window_size == 5 and effective["fa"].rotary.theta == 77.0
    assert effective["swa"].window_size == 5
    reordered = effective_attention_configs({"swa": mixers["swa"], "fa": mixers["fa"]})
    assert reordered["swa"].window_size is None  # upstream then runs the SWA mixer fully causal
    assert mixers["fa"].window_size is None  # the input configs are untouched


def test_build_mixer_dispatch():
    assert isinstance(build_mixer(attention_config(), HIDDEN), Attention)
    with pytest.raises(TypeError, match="valid mixer types"):
        build_mixer(object(), HIDDEN)
