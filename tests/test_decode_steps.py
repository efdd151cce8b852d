"""The vLLM plugin's CPU decode steps against the reference mixers, without an engine.

Each step (`vllm_supernet.delta_rule_kernels`) reads and writes request states in page pools at
arbitrary slots; the reference is the mixer's own `forward` on a `LinearMixerCache` copied out of
those pages (what the plugin runs for everything the steps do not take).
"""

import copy

import pytest
import torch
from torch import nn

from fast_llm_supernet.model import ops
from fast_llm_supernet.model.gdn import GatedDeltaNet
from fast_llm_supernet.model.kda import CONVOLUTIONS as KDA_CONVOLUTIONS
from fast_llm_supernet.model.kda import KimiDeltaAttention
from shared_spec import GDNMixerConfig, KDAMixerConfig

pytest.importorskip("vllm", reason="the decode steps run vLLM's CPU ops (pip install -e '.[cpu]')")

from vllm_supernet import delta_rule_kernels, norms  # noqa: E402
from vllm_supernet.stacked_weights import stack_parameters  # noqa: E402

HIDDEN = 64
NUM_SLOTS = 6
SLOTS = torch.tensor([4, 1, 3])  # three requests' pages, out of order; the others must not change


def test_stack_parameters_makes_views_that_loading_writes_through():
    layers = [nn.Linear(8, 3, bias=False), nn.Linear(8, 5, bias=False)]
    before = [layer.weight.detach().clone() for layer in layers]
    stacked = stack_parameters(layers)
    assert stacked.shape == (8, 8)
    for layer, value in zip(layers, before, strict=True):
        assert isinstance(layer.weight, nn.Parameter)
        torch.testing.assert_close(layer.weight.detach(), value)
    with torch.no_grad():
        layers[1].weight.data.copy_(torch.ones(5, 8))  # what vLLM's default_weight_loader does
    torch.testing.assert_close(stacked[3:], torch.ones(5, 8))
    assert [name for name, _ in layers[0].named_parameters()] == ["weight"]


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar_decay", "per_channel_decay"])
def test_gated_delta_rule_step_is_one_token_of_the_recurrence(per_channel):
    generator = torch.Generator().manual_seed(0)
    batch, heads, key_dim, value_dim = 3, 2, 8, 5
    q = ops.l2norm(torch.randn(batch, 1, heads, key_dim, generator=generator))
    k = ops.l2norm(torch.randn(batch, 1, heads, key_dim, generator=generator))
    v = torch.randn(batch, 1, heads, value_dim, generator=generator)
    g = -torch.rand(batch, 1, heads, *((key_dim,) if per_channel else ()), generator=generator)
    beta = torch.rand(batch, 1, heads, generator=generator)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=generator)
    expected_out, expected_state = ops.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)

    log_decay = g[:, 0] if per_channel else g[:, 0, :, None]
    out = ops.gated_delta_rule_step(
        q[:, 0], k[:, 0], v[:, 0], log_decay, beta[:, 0], state, key_dim**-0.5
    )
    torch.testing.assert_close(out, expected_out[:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state, expected_state, atol=1e-6, rtol=1e-5)  # updated in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_match_the_reference(dtype):
    from fast_llm_supernet.model.supernet import RMSNorm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, generator=generator).to(dtype)
    gate = torch.randn(3, 4, 16, generator=generator).to(dtype)
    reference = RMSNorm(16, 1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    # bf16: the op rounds the normalised value before the weight multiplies it (one bf16 ulp).
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02}
    served = norms.VllmRMSNorm(16, 1e-5, "cpu").to(dtype)
    served.load_state_dict(reference.state_dict())
    torch.testing.assert_close(served(x), reference(x), **tolerance)
    torch.testing.assert_close(
        norms.gated_rms_norm(x, gate, reference.weight, 1e-5),
        ops.gated_rms_norm(x, gate, reference.weight, 1e-5),
        **tolerance,
    )


def _decode_both_ways(reference, served_step, conv_names, state_shape, dtype, prompt=7, steps=4):
    """Prefill a dense cache with the reference, copy it into pages at SLOTS (the other pages:
    poison), then decode `steps` tokens with the reference on the dense cache and `served_step` on
    the pages. Returns the largest output and state differences; checks the poison is untouched."""
    hidden = torch.randn(len(SLOTS), prompt + steps, HIDDEN).to(dtype)
    cache = reference.new_cache(len(SLOTS), "cpu", dtype)
    reference(hidden[:, :prompt], cache)
    conv_channels = sum(cache.conv_states[name].shape[1] for name in conv_names)
    kernel_size = getattr(reference, conv_names[0]).weight.shape[-1]
    conv_pages = torch.full((NUM_SLOTS, conv_channels, kernel_size - 1), 1e4, dtype=dtype)
    recurrent_pages = torch.full((NUM_SLOTS, *state_shape), 1e4)
    conv_pages[SLOTS] = torch.cat([cache.conv_states[name] for name in conv_names], dim=1)
    recurrent_pages[SLOTS] = cache.recurrent_state
    worst_out = 0.0
    for t in range(prompt, prompt + steps):
        expected = reference(hidden[:, t : t + 1], cache)[:, 0]
        out = served_step(hidden[:, t], conv_pages, recurrent_pages, SLOTS)
        worst_out = max(worst_out, (out.float() - expected.float()).abs().max().item())
    worst_state = (recurrent_pages[SLOTS] - cache.recurrent_state).abs().max().item()
    others = [slot for slot in range(NUM_SLOTS) if slot not in SLOTS.tolist()]
    assert bool((recurrent_pages[others] == 1e4).all()) and bool((conv_pages[others] == 1e4).all())
    return worst_out, worst_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kda_decode_step_matches_reference_mixer(dtype):
    config = KDAMixerConfig.model_validate(
        {"type": "kda", "heads": 2, "head_dim": 16, "convolution_layer": {"kernel_size": 4}}
    )
    torch.manual_seed(0)
    reference = KimiDeltaAttention(config, HIDDEN).to(dtype).eval()
    with torch.no_grad():
        reference.norm.weight.uniform_(0.5, 1.5)
        reference.f_b_proj.weight.mul_(4)  # decays that vary by channel
    served = copy.deepcopy(reference)
    weights = delta_rule_kernels.KDADecodeWeights.stack(served)
    for linear in weights.linears():
        linear.pack()  # oneDNN, as the served model runs them

    def step(hidden, conv_pages, recurrent_pages, slots):
        return delta_rule_kernels.kda_decode_cpu(served, weights, hidden, conv_pages, recurrent_pages, slots)

    with torch.no_grad():
        worst_out, worst_state = _decode_both_ways(reference, step, KDA_CONVOLUTIONS, (2, 16, 16), dtype)
    # float32: the same math up to summation order; bf16: one-ulp roundings (conv op, norm op).
    assert worst_out < (1e-5 if dtype == torch.float32 else 3e-2)
    assert worst_state < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_gdn_decode_step_with_vllm_kernel_matches_reference_mixer(head_dim):
    """bfloat16 only: vLLM's GDN kernel's dtype."""
    config = GDNMixerConfig(
        value_heads=4, key_heads=2, key_head_dim=head_dim, value_head_dim=head_dim,
        convolution_layer={"kernel_size": 4},
    )  # fmt: skip
    torch.manual_seed(0)
    reference = GatedDeltaNet(config, HIDDEN).to(torch.bfloat16).eval()
    with torch.no_grad():
        reference.A_log.uniform_(-1, 1)
        reference.dt_bias.uniform_(-1, 1)
        reference.norm.weight.uniform_(0.5, 1.5)
        reference.in_proj_ba.weight.mul_(4)  # gates that vary: a swapped alpha/beta must show
    served = copy.deepcopy(reference)
    weights = delta_rule_kernels.GDNDecodeWeights.stack(served)
    for linear in weights.linears():
        linear.pack()  # oneDNN, as the served model runs them

    def step(hidden, conv_pages, recurrent_pages, slots):
        return delta_rule_kernels.gdn_decode_cpu(served, weights, hidden, conv_pages, recurrent_pages, slots)

    with torch.no_grad():
        worst_out, worst_state = _decode_both_ways(
            reference, step, ["convolution"], (4, head_dim, head_dim), torch.bfloat16
        )
    assert worst_out < 3e-2 and worst_state < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_packed_linear_matches_f_linear(dtype, rows):
    """oneDNN's packed matmul (packed_linear.py) on a strided slice, as the KDA step feeds it."""
    from vllm_supernet.packed_linear import PackedLinear, onednn_available

    torch.manual_seed(0)
    layer = nn.Linear(48, 40).to(dtype)
    packed = PackedLinear.of(layer)
    packed.pack()
    assert (packed._onednn is not None) == onednn_available(layer.weight.device)
    wide = torch.randn(rows, 100, dtype=dtype)
    x = wide[:, 10:58]  # rows 100 apart in memory
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    out = packed(x)
    assert out.shape == (rows, 40) and out.dtype == dtype
    torch.testing.assert_close(
        out.float(), expected, **({} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 1e-2})
    )


def _built_in(dtype, *builders):
    """Modules built with `dtype` as the default, as vLLM builds its model: stacked weights (views) stay
    stacked, where a `.to(dtype)` afterwards would copy the parameters out of the stack."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        return [build() for build in builders]
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_served_mlp_packed_and_freed_matches_the_reference(dtype, gated):
    """The block MLP as served: gate|up stacked, both matmuls packed, the original weights freed."""
    from fast_llm_supernet.model.supernet import MLP
    from shared_spec import MLPConfig
    from vllm_supernet.model import VllmMLP
    from vllm_supernet.packed_linear import onednn_available, pack_and_free

    config = MLPConfig(intermediate_size=96, gated=gated)  # with biases (Fast-LLM's default)
    reference, served = _built_in(dtype, lambda: MLP(config, HIDDEN), lambda: VllmMLP(config, HIDDEN))
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.uniform_(-0.3, 0.3)
        served.load_state_dict(reference.state_dict())  # writes through the stacked views
    hidden = torch.randn(5, HIDDEN, dtype=dtype)
    with torch.no_grad():
        expected = reference(hidden)
        pack_and_free(served)  # what the served model does after loading
        out = served(hidden)
    if onednn_available(hidden.device):
        assert all(linear.weight.numel() == 0 for linear in (served.up_proj, served.down_proj))
    tolerance = {} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_prefill_runs_on_packed_weights_once_the_originals_are_freed(kind, dtype):
    """The reference `forward` (what the served GDN/KDA run for prefills) through the served mixin:
    input projections from the packed stacked matmul, the other linear layers routed through their
    packed copies, the original weights freed; outputs and carried states match the reference's."""
    from vllm_supernet.mixers import _PackedInputProjections
    from vllm_supernet.packed_linear import onednn_available, pack_and_free

    if kind == "gdn":
        config = GDNMixerConfig(
            value_heads=4,
            key_heads=2,
            key_head_dim=16,
            value_head_dim=16,
            convolution_layer={"kernel_size": 4},
        )
        reference_class, stack = GatedDeltaNet, delta_rule_kernels.GDNDecodeWeights.stack
    else:
        config = KDAMixerConfig.model_validate(
            {"type": "kda", "heads": 2, "head_dim": 16, "convolution_layer": {"kernel_size": 4}}
        )
        reference_class, stack = KimiDeltaAttention, delta_rule_kernels.KDADecodeWeights.stack
    served_class = type("Served", (_PackedInputProjections, reference_class), {})
    reference, served = _built_in(
        dtype, lambda: reference_class(config, HIDDEN).eval(), lambda: served_class(config, HIDDEN).eval()
    )
    served.decode_weights = stack(served)
    with torch.no_grad():
        served.load_state_dict(reference.state_dict())  # writes through the stacked views
        pack_and_free(served)  # what the served model does after loading
        if onednn_available(torch.device("cpu")):
            assert all(
                module.weight.numel() == 0 for module in served.modules() if isinstance(module, nn.Linear)
            )
        hidden = torch.randn(3, 9, HIDDEN, dtype=dtype)
        caches = [mixer.new_cache(3, "cpu", dtype) for mixer in (reference, served)]
        for chunk in (slice(0, 6), slice(6, 9)):  # a prefill, then a continuation of the carried state
            expected, out = reference(hidden[:, chunk], caches[0]), served(hidden[:, chunk], caches[1])
            torch.testing.assert_close(
                out, expected, **({} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2})
            )
    torch.testing.assert_close(caches[1].recurrent_state, caches[0].recurrent_state, atol=2e-2, rtol=1e-2)
