"""The vLLM plugin's layers against the reference modules, without an engine.

Each layer is built inside a real (one-rank) vLLM config and tensor-parallel group, loads the
reference module's own state dict through its vLLM weight loaders and `stacked_params`
(`model.load_stacked_weights`, as the engine loads a checkpoint), and runs: the MLP as a whole, the
GDN and KDA mixers' prefill (`forward_sequence`) and decode steps. Decode steps read and write
request states in page pools at arbitrary slots; the reference is the module's own `forward` on a
dense `LinearMixerCache`. Sharded loading for a rank of a larger group is checked on its own.
"""

from __future__ import annotations

import contextlib
import copy
import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="the layers are vLLM's (pip install -e '.[cpu]')")

from fast_llm_supernet.model.gdn import GatedDeltaNet  # noqa: E402
from fast_llm_supernet.model.kda import CONVOLUTIONS as KDA_CONVOLUTIONS  # noqa: E402
from fast_llm_supernet.model.kda import KimiDeltaAttention  # noqa: E402
from fast_llm_supernet.model.supernet import MLP  # noqa: E402
from shared_spec import GDNMixerConfig, KDAMixerConfig, MLPConfig  # noqa: E402
from tests.vllm_helpers import FIXTURE_CHECKPOINT  # noqa: E402

HIDDEN = 64
NUM_SLOTS = 6
SLOTS = torch.tensor([4, 1, 3])  # three requests' pages, out of order; the others must not change


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank tensor-parallel group (gloo), as a vLLM worker has."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    from vllm_supernet.plugin import register

    register()
    if not model_parallel_is_initialized():
        with built_as_vllm(torch.float32):
            init_distributed_environment(
                world_size=1,
                rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                local_rank=0,
                backend="gloo",
            )
            initialize_model_parallel(1, 1)


@contextlib.contextmanager
def built_as_vllm(dtype: torch.dtype):
    """A real VllmConfig (the upstream fixture's, with `dtype`) set as current, and `dtype` as the
    default dtype, as vLLM builds a model; yields the config."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    model_config = ModelConfig(
        model=str(FIXTURE_CHECKPOINT), skip_tokenizer_init=True, dtype=dtype, max_model_len=64
    )
    vllm_config = VllmConfig(model_config=model_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with set_current_vllm_config(vllm_config):
            yield vllm_config
    finally:
        torch.set_default_dtype(previous)


def _served(layer_class, config, reference, dtype, prefix, parts=1):
    """The reference's weights in the vLLM layer; its state spread over `parts` pages (`supernet_state_parts`)."""
    from vllm_supernet.model import load_stacked_weights

    with built_as_vllm(dtype) as vllm_config:
        vllm_config.model_config.hf_config.supernet_state_parts = parts
        layer = layer_class(config, HIDDEN, vllm_config, prefix)
    assert len(layer.pages) == parts
    loaded = load_stacked_weights(layer, reference.state_dict().items())
    assert loaded == {name for name, _ in layer.named_parameters()}, "every parameter loaded"
    for module in layer.modules():  # vLLM's post-loading step (oneDNN packing on CPU)
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return layer


def _decode_both_ways(reference, served, dtype, prompt=7, steps=4, conv_table=False):
    """Prefill a dense cache with the reference, copy it into pages at SLOTS (part i of a state spread over
    several pages: its heads and conv channels at SLOTS + i * NUM_SLOTS, block ids of other cache groups; the other
    pages: poison), then decode `steps` tokens with the reference on the dense cache and the served layer on the
    pages. `conv_table`: the conv states in one table beside the pools, a row per block (`page_layout`). Returns
    the largest output and state differences; checks the poison is untouched."""
    hidden = torch.randn(len(SLOTS), prompt + steps, HIDDEN).to(dtype)
    cache = reference.new_cache(len(SLOTS), "cpu", dtype)
    reference(hidden[:, :prompt], cache)
    conv = torch.cat([cache.conv_states[name] for name in served.conv_names], dim=1)
    num_blocks = NUM_SLOTS * len(served.pages)
    slots = [SLOTS + part * NUM_SLOTS for part in range(len(served.pages))]
    (conv_channels, kernel), _ = served.pages[0].shapes
    table = torch.full((num_blocks, conv_channels * kernel * dtype.itemsize), 7, dtype=torch.int8)
    for part, part_slots in zip(served.pages, slots, strict=True):
        recurrent_pages = torch.full((num_blocks, *part.shapes[1]), 1e4)
        if conv_table:
            part.kv_cache = (recurrent_pages,)
            part.use_conv_table(table)
        else:
            part.kv_cache = (torch.full((num_blocks, conv_channels, kernel), 1e4, dtype=dtype), recurrent_pages)
        conv_pages, _ = part.state_pages
        conv_pages[part_slots] = conv if part.channels is None else conv[:, part.channels]
        recurrent_pages[part_slots] = cache.recurrent_state[:, part.heads]
    poison = {id(pages): pages.clone() for part in served.pages for pages in part.state_pages}
    worst_out = 0.0
    for t in range(prompt, prompt + steps):
        expected = reference(hidden[:, t : t + 1], cache)[:, 0]
        out = served.decode(hidden[:, t], slots)
        worst_out = max(worst_out, (out.float() - expected.float()).abs().max().item())
    recurrent = torch.cat([part.state_pages[1][part_slots] for part, part_slots in zip(served.pages, slots, strict=True)], dim=1)
    worst_state = (recurrent - cache.recurrent_state).abs().max().item()
    for part, part_slots in zip(served.pages, slots, strict=True):
        others = [block for block in range(num_blocks) if block not in part_slots.tolist()
                  and not any(block in s.tolist() for s in slots)]  # fmt: skip
        assert all(torch.equal(pages[others], poison[id(pages)][others]) for pages in part.state_pages)
    loaded = served.load_cache(slots, True, dtype)  # the pages read back as one state
    assert torch.equal(loaded.recurrent_state, recurrent)
    return worst_out, worst_state


def _prefill_both_ways(reference, served, dtype, length=70):
    """A prompt longer than a delta-rule chunk, through both; then states equal too."""
    hidden = torch.randn(1, length, HIDDEN).to(dtype)
    cache = reference.new_cache(1, "cpu", dtype)
    served_cache = copy.deepcopy(cache)
    expected = reference(hidden, cache)
    out = served.forward_sequence(hidden, served_cache)
    state_difference = (served_cache.recurrent_state - cache.recurrent_state).abs().max().item()
    return (out.float() - expected.float()).abs().max().item(), state_difference


def _kda(dtype, parts=1):
    config = KDAMixerConfig.model_validate({"type": "kda", "heads": 2, "head_dim": 16, "convolution_layer": {"kernel_size": 4}})
    torch.manual_seed(0)
    reference = KimiDeltaAttention(config, HIDDEN).to(dtype).eval()
    with torch.no_grad():
        reference.norm.weight.uniform_(0.5, 1.5)
        reference.f_b_proj.weight.mul_(4)  # decays that vary by channel
    from vllm_supernet.kda import SupernetKimiDeltaAttention

    return reference, _served(SupernetKimiDeltaAttention, config, reference, dtype, "model.decoder.blocks.0.mixer.mixers.kda", parts)


def _gdn(dtype, head_dim=16, parts=1):
    config = GDNMixerConfig(
        value_heads=4, key_heads=2, key_head_dim=head_dim, value_head_dim=head_dim, convolution_layer={"kernel_size": 4}
    )
    torch.manual_seed(0)
    reference = GatedDeltaNet(config, HIDDEN).to(dtype).eval()
    with torch.no_grad():
        reference.A_log.uniform_(-1, 1)
        reference.dt_bias.uniform_(-1, 1)
        reference.norm.weight.uniform_(0.5, 1.5)
        reference.in_proj_ba.weight.mul_(4)  # gates that vary: a swapped alpha/beta must show
    from vllm_supernet.gdn import SupernetGatedDeltaNet

    return reference, _served(SupernetGatedDeltaNet, config, reference, dtype, "model.decoder.blocks.0.mixer.mixers.gdn", parts)


@pytest.mark.parametrize("parts", [1, 2], ids=["one_page", "two_pages"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kda_layer_prefill_and_decode_match_the_reference(one_rank, dtype, parts):
    reference, served = _kda(dtype, parts)
    with torch.no_grad():
        prefill_out, prefill_state = _prefill_both_ways(reference, served, dtype)
        decode_out, decode_state = _decode_both_ways(reference, served, dtype, conv_table=parts > 1)
    # float32: the same math up to summation order; bf16: roundings of the matmuls and the conv op.
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    assert max(prefill_out, decode_out) < tolerance
    assert max(prefill_state, decode_state) < tolerance


@pytest.mark.parametrize(("head_dim", "parts", "conv_table"),
                         [(16, 1, False), (64, 1, False), (128, 1, False), (16, 2, False), (16, 4, False), (16, 4, True)])  # fmt: skip
def test_gdn_layer_decode_with_vllm_kernel_matches_the_reference(one_rank, head_dim, parts, conv_table):
    """bfloat16: vLLM's CPU GDN kernel's dtype. Two parts: each holds one key head and its two value heads; four:
    one value head each, two parts holding a copy of the key head they share; in the page or in the conv table."""
    reference, served = _gdn(torch.bfloat16, head_dim, parts)
    assert served.decodes_on_pages
    with torch.no_grad():
        worst_out, worst_state = _decode_both_ways(reference, served, torch.bfloat16, conv_table=conv_table)
    assert worst_out < 3e-2 and worst_state < 2e-2


@pytest.mark.parametrize("parts", [1, 2, 4], ids=["one_page", "two_pages", "four_pages"])
def test_gdn_layer_float32_prefill_and_decode_match_the_reference(one_rank, parts):
    reference, served = _gdn(torch.float32, parts=parts)
    assert not served.decodes_on_pages
    with torch.no_grad():
        prefill_out, prefill_state = _prefill_both_ways(reference, served, torch.float32)
        decode_out, decode_state = _decode_both_ways(reference, served, torch.float32)
    assert max(prefill_out, decode_out, prefill_state, decode_state) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_mlp_matches_the_reference(one_rank, dtype, gated):
    from vllm_supernet.model import SupernetMLP, load_stacked_weights

    config = MLPConfig(intermediate_size=96, activation="silu", gated=gated, add_linear_biases=False)
    torch.manual_seed(0)
    reference = MLP(config, HIDDEN).to(dtype)
    with built_as_vllm(dtype):
        served = SupernetMLP(config, HIDDEN, "mlp")
    load_stacked_weights(served, reference.state_dict().items())
    for module in served.modules():
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    x = torch.randn(5, HIDDEN).to(dtype)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    with torch.no_grad():
        torch.testing.assert_close(served(x).float(), reference(x).float(), **tolerance)


def test_sharded_convolution_loads_a_ranks_channels():
    """Rank 1 of 2: its half of each block (Q, K, V), side by side; one block at a time for KDA."""
    from vllm_supernet.linear_mixer import ShardedConvolution

    blocks = [4, 4, 8]
    full = torch.arange(16, dtype=torch.float32)[:, None, None].expand(16, 1, 3).clone()
    conv = ShardedConvolution(blocks, 3, tp_size=2, tp_rank=1)
    assert conv.weight.shape == (8, 1, 3)
    conv.load(conv.weight, full)
    assert conv.weight[:, 0, 0].tolist() == [2, 3, 6, 7, 12, 13, 14, 15]
    separate = ShardedConvolution([4, 4, 4], 3, tp_size=2, tp_rank=1)
    for shard in range(3):
        separate.load(separate.weight, full[4 * shard : 4 * shard + 4], shard)
    assert separate.weight[:, 0, 0].tolist() == [2, 3, 6, 7, 10, 11]
    assert [block.shape[0] for block in separate.blocks()] == [2, 2, 2]


def test_kda_conv_names_are_the_reference_cache_names():
    from vllm_supernet.kda import SupernetKimiDeltaAttention

    assert SupernetKimiDeltaAttention.conv_names == KDA_CONVOLUTIONS
