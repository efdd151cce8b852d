"""GDN and KDA mixers: checkpoint parameter layout, cached decode == full forward, finite gradients."""

import math

import pytest
import torch

from fast_llm_supernet.model.gdn import GatedDeltaNet
from fast_llm_supernet.model.kda import KimiDeltaAttention
from shared_spec import GDNMixerConfig, KDAMixerConfig

HIDDEN = 32


def make_gdn(dtype=torch.float64):
    config = GDNMixerConfig(
        value_heads=4, key_heads=2, key_head_dim=8, value_head_dim=6, convolution_layer={"kernel_size": 4}
    )
    return _randomise(GatedDeltaNet(config, HIDDEN)).to(dtype)


def make_kda(dtype=torch.float64):
    config = KDAMixerConfig(heads=3, head_dim=8, convolution_layer={"kernel_size": 4})
    return _randomise(KimiDeltaAttention(config, HIDDEN)).to(dtype)


def _randomise(mixer):
    """Perturb every parameter (no all-ones norm, no identical heads) so layout mistakes show."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return mixer


MIXERS = {"gdn": make_gdn, "kda": make_kda}


def test_gdn_parameter_layout():
    """Names and shapes as upstream Fast-LLM exports them (fixture layout, other sizes)."""
    shapes = {name: tuple(p.shape) for name, p in make_gdn().named_parameters()}
    assert shapes == {
        "in_proj_qkvz.weight": (2 * 2 * 8 + 2 * 4 * 6, HIDDEN),  # Q(2*8) | K(2*8) | V(4*6) | Z(4*6)
        "in_proj_ba.weight": (2 * 4, HIDDEN),  # beta(4) | alpha(4)
        "convolution.weight": (2 * 2 * 8 + 4 * 6, 1, 4),  # over Q|K|V
        "out_proj.weight": (HIDDEN, 4 * 6),
        "A_log": (4,),
        "dt_bias": (4,),
        "norm.weight": (6,),
    }


def test_kda_parameter_layout():
    shapes = {name: tuple(p.shape) for name, p in make_kda().named_parameters()}
    projection = 3 * 8
    assert shapes == {
        **{f"{name}_proj.weight": (projection, HIDDEN) for name in "qkv"},
        **{f"{name}_conv.weight": (projection, 1, 4) for name in "qkv"},
        "f_a_proj.weight": (8, HIDDEN),  # rank = head_dim
        "f_b_proj.weight": (projection, 8),
        "g_a_proj.weight": (8, HIDDEN),
        "g_b_proj.weight": (projection, 8),
        "beta_proj.weight": (3, HIDDEN),
        "o_proj.weight": (HIDDEN, projection),
        "A_log": (3,),
        "dt_bias": (projection,),
        "norm.weight": (8,),
    }


@pytest.mark.parametrize("kind", MIXERS)
def test_decode_matches_full_forward(kind):
    """Prefill then one token at a time through the cache == one full-sequence forward (float64)."""
    mixer = MIXERS[kind]()
    x = torch.randn(2, 75, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.new_cache(2, x.device, x.dtype)
        pieces = [mixer(x[:, :5], cache)]
        pieces += [mixer(x[:, t : t + 1], cache) for t in range(5, 75)]
    assert cache.seen_tokens == 75
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", MIXERS)
def test_chunk_split_prefill_matches_full_forward(kind):
    """Prefill in uneven pieces (spanning chunk boundaries) == one forward; the cache equals a fresh one's."""
    mixer = MIXERS[kind]()
    x = torch.randn(2, 150, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        whole_cache = mixer.new_cache(2, x.device, x.dtype)
        mixer(x, whole_cache)
        cache = mixer.new_cache(2, x.device, x.dtype)
        pieces = [mixer(x[:, start:end], cache) for start, end in [(0, 70), (70, 72), (72, 150)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(cache.recurrent_state, whole_cache.recurrent_state, atol=1e-12, rtol=1e-10)
    assert cache.conv_states.keys() == whole_cache.conv_states.keys()
    for name, state in cache.conv_states.items():
        torch.testing.assert_close(state, whole_cache.conv_states[name])


@pytest.mark.parametrize("kind", MIXERS)
def test_float32_decode_close_to_full_forward(kind):
    mixer = MIXERS[kind](torch.float32)
    x = torch.randn(1, 40, HIDDEN)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.new_cache(1, x.device, x.dtype)
        steps = torch.cat([mixer(x[:, t : t + 1], cache) for t in range(40)], dim=1)
    assert cache.recurrent_state.dtype == torch.float32
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", MIXERS)
def test_sequences_in_a_batch_are_independent(kind):
    mixer = MIXERS[kind]()
    x = torch.randn(3, 20, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        batched = mixer(x)
        alone = torch.cat([mixer(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone)


@pytest.mark.parametrize("kind", MIXERS)
def test_gradients_finite_at_strong_decay(kind):
    """Per-token log-decays around -1e4: every parameter still gets a finite gradient (upstream KDA: NaN)."""
    mixer = MIXERS[kind](torch.float32)
    with torch.no_grad():
        mixer.A_log.fill_(math.log(1000.0))
        mixer.dt_bias.fill_(10.0)
    x = torch.randn(2, 90, HIDDEN, requires_grad=True)
    out = mixer(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("kind", MIXERS)
def test_new_cache_shapes(kind):
    mixer = MIXERS[kind](torch.float32)
    cache = mixer.new_cache(5, "cpu", torch.bfloat16)
    assert cache.seen_tokens == 0 and cache.batch_size == 5
    assert cache.recurrent_state.dtype == torch.float32  # the recurrence always runs in float32 or wider
    for state in cache.conv_states.values():
        assert state.shape[0] == 5 and state.shape[-1] == 3 and state.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "config, field",
    [
        (GDNMixerConfig(value_heads=2, key_heads=1, key_head_dim=4, value_head_dim=4,
                        convolution_layer={"kernel_size": 4, "activation": "identity"}), "convolution_layer.activation"),
        (KDAMixerConfig(heads=2, head_dim=4, normalization={"epsilon": 1e-5, "activation": "sigmoid"}),
         "normalization.activation"),
    ],
)  # fmt: skip
def test_unsupported_upstream_options_are_rejected(config, field):
    mixer_class = GatedDeltaNet if config.type == "gdn" else KimiDeltaAttention
    with pytest.raises(ValueError, match=field):
        mixer_class(config, HIDDEN)


def test_cpu_path_never_imports_fla():
    import sys

    from fast_llm_supernet.model import delta_rule_kernels

    mixer = make_kda(torch.float32)
    with torch.no_grad():
        mixer(torch.randn(1, 5, HIDDEN))
    assert not delta_rule_kernels.uses_fla(torch.device("cpu"))
    assert "fla" not in sys.modules
