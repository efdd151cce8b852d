"""The vLLM plugin's pieces that need no engine: placements served, step grouping, paged attention.

The fast tests import torch and shared_spec only; those importing vLLM itself (15-40 s on two
cores) are marked slow.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from shared_spec import (  # noqa: E402
    Apriel2TextConfig,
    AttentionMixerConfig,
    Placement,
    PlacementError,
    PresetsFile,
    SupernetSpec,
)
from tests.vllm_helpers import FIXTURE_CHECKPOINT  # noqa: E402
from vllm_supernet.paged_attention import (  # noqa: E402
    PagedAttentionMetadata,
    paged_attention_cpu,
    paged_attention_reference,
)
from vllm_supernet.placements import ServingPlacements, SupernetBatch  # noqa: E402

PRESETS = PresetsFile.model_validate(
    {"default": "fast", "presets": {"fast": {"placement": ["gdn", "kda"]}, "quality": {"placement": "fa*"}}}
)


@pytest.fixture(scope="module")
def spec() -> SupernetSpec:
    return SupernetSpec.from_config(Apriel2TextConfig.from_file(FIXTURE_CHECKPOINT))


# ---- placements served ----------------------------------------------------------------------------


def test_unthinned_deployment_builds_every_mixer_and_uses_the_checkpoint_default(spec):
    serving = ServingPlacements(spec)
    assert serving.layer_mixers == [["fa", "gdn", "kda", "swa"], ["fa", "gdn", "kda", "swa"], ["attention"]]
    assert serving.resolve(None).mixers == ("swa", "swa", "attention")
    assert serving.resolve("gdn*").mixers == ("gdn", "gdn", "attention")
    assert not serving.is_thinned_out("model.decoder.blocks.0.mixer.mixers.kda.q_proj.weight")


def test_thinned_deployment_builds_only_the_allowed_mixers(spec):
    serving = ServingPlacements(spec, PRESETS, allowed=["fast", "quality"])
    assert serving.layer_mixers == [["fa", "gdn"], ["fa", "kda"], ["attention"]]
    assert serving.resolve(None).mixers == ("gdn", "kda", "attention")  # the presets' default
    assert serving.resolve("quality").mixers == ("fa", "fa", "attention")
    with pytest.raises(PlacementError, match="not served by this deployment.*allowed: gdn,kda,attention"):
        serving.resolve(["kda", "kda"])
    assert serving.is_thinned_out("model.decoder.blocks.0.mixer.mixers.kda.q_proj.weight")
    assert not serving.is_thinned_out("model.decoder.blocks.0.mixer.mixers.gdn.A_log")
    assert not serving.is_thinned_out("model.decoder.blocks.2.mixer.q_proj.weight")
    assert not serving.is_thinned_out("model.embed_tokens.weight")


def test_default_outside_the_allowed_set_falls_back_to_the_first_allowed(spec):
    serving = ServingPlacements(spec, PRESETS, allowed=["swa*", "quality"])
    assert serving.default.mixers == ("swa", "swa", "attention")


def test_bad_allowed_entry_names_the_option(spec):
    with pytest.raises(PlacementError, match="supernet_placements.*'nope'"):
        ServingPlacements(spec, PRESETS, allowed=["nope"])


def test_invalid_request_values_name_the_problem(spec):
    serving = ServingPlacements(spec, PRESETS)
    with pytest.raises(PlacementError, match="layer 1: 'bogus' is not a mixer of this layer; valid choices"):
        serving.resolve(["fa", "bogus"])
    with pytest.raises(PlacementError, match="5 entries"):
        serving.resolve(["fa"] * 5)
    with pytest.raises(PlacementError, match="got int"):
        serving.resolve(7)


def test_preset_listing(spec):
    listing = ServingPlacements(spec, PRESETS, allowed=["fast"]).preset_listing()
    assert list(listing["presets"]) == ["fast"]  # "quality" is not served
    assert listing["presets"]["fast"]["hash"] == Placement.parse("fast", spec, PRESETS).hash
    assert listing["allowed"] == ["gdn,kda,attention"]
    json.dumps(listing)


# ---- a step's requests per mixer ------------------------------------------------------------------


def test_uniform_step_runs_each_layer_once_on_the_whole_batch(spec):
    serving = ServingPlacements(spec)
    placement = serving.resolve("gdn*")
    batch = SupernetBatch(placements=[placement] * 3, query_start_loc=[0, 1, 2, 7], num_computed=[5, 9, 0])
    for groups, name in zip(batch.layer_groups(serving, torch.device("cpu")), placement.mixers, strict=True):
        assert len(groups) == 1
        assert (
            groups[0][0] == name and groups[0][1].token_index is None and groups[0][1].requests == [0, 1, 2]
        )


def test_mixed_step_gives_each_mixer_exactly_its_requests_tokens(spec):
    serving = ServingPlacements(spec)
    a, b = serving.resolve(["gdn", "fa"]), serving.resolve(["kda", "fa"])
    batch = SupernetBatch(placements=[a, b, a], query_start_loc=[0, 1, 4, 6], num_computed=[3, 0, 0])
    layer0, layer1, layer2 = batch.layer_groups(serving, torch.device("cpu"))
    by_name = {name: step for name, step in layer0}
    assert by_name["gdn"].requests == [0, 2] and by_name["gdn"].token_index.tolist() == [0, 4, 5]
    assert by_name["kda"].requests == [1] and by_name["kda"].token_index.tolist() == [1, 2, 3]
    assert [name for name, _ in layer1] == ["fa"] and layer1[0][1].token_index is None
    assert [name for name, _ in layer2] == ["attention"]


# ---- paged attention against the reference mixer ------------------------------------------------


KERNELS = [
    pytest.param(paged_attention_reference, id="reference"),
    # vLLM's CPU kernel: importing vLLM's ops takes seconds.
    pytest.param(paged_attention_cpu, id="vllm_cpu_kernel", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("window", [None, 3, 40])
@pytest.mark.parametrize("kernel", KERNELS)
def test_paged_attention_equals_reference_mixer_over_chunks_and_decode(kernel, window):
    """Three sequences, prefilled in chunks then decoded, in scattered cache blocks, some steps on a
    subset of the batch, against the reference mixer's full-sequence forward."""
    from fast_llm_supernet.model.attention import Attention
    from fast_llm_supernet.model.ops import apply_rotary, rotary_cos_sin

    if kernel is paged_attention_cpu:
        pytest.importorskip("vllm")
    torch.manual_seed(0)
    heads, head_groups, head_size, hidden_size = 4, 2, 32, 64  # 32: a head size both kernels take
    config = AttentionMixerConfig(
        heads=heads,
        head_groups=head_groups,
        head_size=head_size,
        add_linear_biases=False,
        window_size=window,
        rotary={"theta": 10000.0},
    )
    mixer = Attention(config, hidden_size).eval()
    lengths, block_size = [75, 40, 9], 32
    inputs = [torch.randn(1, n, hidden_size) for n in lengths]
    expected = [mixer(x)[0] for x in inputs]
    block_tables = torch.tensor([[7, 2, 5], [3, 6, 0], [1, 0, 0]], dtype=torch.int32)
    # Unwritten slots must never be attended to: keys of 1e4 there would swamp the softmax. (Not NaN:
    # the CPU kernel computes whole tiles and masks the scores, and NaN * 0 stays NaN.)
    cache = torch.full((8, head_groups, block_size, 2 * head_size), 1e4)
    cos, sin = rotary_cos_sin(mixer._angle_scales, 0, 128, 1.0, "cpu")
    done = [0, 0, 0]
    # Per step, tokens per request (0: not in this step's subset); chunks cross block boundaries.
    for step_lengths in ([30, 7, 0], [20, 33, 9], [25, 1, 0], [1, 0, 1], [0, 1, 0]):
        requests = [r for r in range(3) if step_lengths[r]]
        chunks = [(r, done[r], min(lengths[r], done[r] + step_lengths[r])) for r in requests]
        hidden = torch.cat([inputs[r][0, start:end] for r, start, end in chunks])
        positions = torch.cat([torch.arange(start, end) for _, start, end in chunks])
        slots = torch.cat([block_tables[r, positions_r // block_size] * block_size + positions_r % block_size
                           for r, start, end in chunks for positions_r in [torch.arange(start, end)]])  # fmt: skip
        # The batch holds all three requests; this step's subset is `requests` (the others: 0 tokens).
        query_start_loc, seq_lens = [0], []
        for r in range(3):
            chunk = next((c for c in chunks if c[0] == r), (r, done[r], done[r]))
            query_start_loc.append(query_start_loc[-1] + chunk[2] - chunk[1])
            seq_lens.append(chunk[2])
        metadata = PagedAttentionMetadata(
            num_actual_tokens=len(positions),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=block_tables,
            slot_mapping=slots,
            isa="vec",
        )
        n = len(positions)
        q = apply_rotary(mixer.q_proj(hidden).view(n, heads, head_size), cos[positions][:, None], sin[positions][:, None])
        k = apply_rotary(mixer.k_proj(hidden).view(n, head_groups, head_size), cos[positions][:, None], sin[positions][:, None])
        v = mixer.v_proj(hidden).view(n, head_groups, head_size)
        token_index = torch.arange(n)  # the subset's tokens are the whole flat batch here
        attended = kernel(q, k, v, cache, metadata, requests, token_index, mixer.scale, window)
        out = mixer.o_proj(attended.flatten(1))
        offset = 0
        for r, start, end in chunks:
            torch.testing.assert_close(
                out[offset : offset + end - start], expected[r][start:end], atol=1e-5, rtol=1e-5
            )
            offset += end - start
            done[r] = end
    assert done == lengths


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
