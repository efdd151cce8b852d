"""Cache memory that follows the placement (`vllm_supernet/cache_allocation.py`, `footprint.py`).

Fast tests hold the group bookkeeping and the footprint arithmetic; engine tests run the real vLLM engine on
the upstream fixture (two four-mixer layers and one plain attention layer; the engine makes its attention
pages 128 tokens long so that a state page fits one) with a cache of a few pages, set by
`num_gpu_blocks_override` (one of them is vLLM's null block).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.vllm_helpers import FIXTURE, FIXTURE_CHECKPOINT, copy_fixture, run_engine

# ------------------------------------------------------------------------------------------- fast


def test_cache_layer_names_map_to_layer_and_mixer():
    from vllm_supernet.cache_allocation import cache_layer_key, group_users

    assert cache_layer_key("model.decoder.blocks.3.mixer.mixers.gdn") == (3, "gdn")
    assert cache_layer_key("model.decoder.blocks.12.mixer") == (12, None)
    assert cache_layer_key("model.decoder.blocks.3.mixer.mixers.gdn.part2") == (3, "gdn"), "a state's further page"
    with pytest.raises(ValueError, match="not a supernet cache layer"):
        cache_layer_key("model.layers.0.self_attn.attn")
    with pytest.raises(ValueError, match="one \\(layer, mixer\\)"):
        group_users([["model.decoder.blocks.0.mixer.mixers.fa", "model.decoder.blocks.1.mixer.mixers.fa"]])


def test_a_request_holds_the_groups_of_its_placement_and_of_plain_layers():
    from shared_spec import Apriel2TextConfig, Placement, SupernetSpec
    from vllm_supernet.cache_allocation import groups_of

    config = json.loads((FIXTURE_CHECKPOINT / "config.json").read_text())
    spec = SupernetSpec.from_config(Apriel2TextConfig.model_validate(config))
    users = [(0, "fa"), (0, "gdn"), (0, "swa"), (1, "fa"), (1, "kda"), (2, None)]
    placement = Placement.parse(["gdn", "kda"], spec)
    assert groups_of([placement], users) == {1, 4, 5}
    draft = Placement.parse(["fa", "fa"], spec)
    assert groups_of([placement, draft], users) == {0, 1, 3, 4, 5}


def test_held_groups_are_asked_once_a_step_and_follow_the_tables():
    """The runner's groups with blocks among a step's rows: from the shared counts, kept from `_update_states`
    (`remember_held_groups`) to the metadata pass, which forgets them; a different row count asks again."""
    from types import SimpleNamespace

    import numpy as np

    from vllm_supernet.patches import (
        _share_block_counts,
        forget_held_groups,
        held_groups,
        remember_held_groups,
    )

    tables = SimpleNamespace(block_tables=[SimpleNamespace(num_blocks_per_row=np.zeros(4, dtype=np.int32))
                                           for _ in range(5)])  # fmt: skip
    tables.block_tables[1].num_blocks_per_row[0] = 3
    assert held_groups(tables, 4) == [1]  # tables whose counts are not shared yet: one query per group
    _share_block_counts(tables)
    tables.block_tables[3].num_blocks_per_row[2] = 1  # vLLM writes in place: the shared array sees it
    assert held_groups(tables, 4) == [1, 3] and held_groups(tables, 2) == [1]
    assert remember_held_groups(tables, 4) == [1, 3]
    tables.block_tables[4].num_blocks_per_row[0] = 1  # (no runner changes tables between reorder and metadata)
    assert held_groups(tables, 4) == [1, 3], "kept for the step"
    assert held_groups(tables, 2) == [1, 4], "another row count asks again"
    forget_held_groups(tables)
    assert held_groups(tables, 4) == [1, 3, 4]


def _fixture_footprints(block_size=128, chunk_tokens=128, speculative_tokens=0):
    from shared_spec import MixerKind
    from vllm_supernet.footprint import CacheFootprints, MixerCache

    token = 2 * 3 * 16 * 4  # K and V, 3 KV heads of 16, float32
    state = 10_000
    caches = {}
    for layer in (0, 1):
        caches[layer, "fa"] = MixerCache(MixerKind.ATTENTION, token_bytes=token)
        caches[layer, "swa"] = MixerCache(MixerKind.SLIDING_WINDOW, token_bytes=token, window=5)
        caches[layer, "gdn"] = MixerCache(MixerKind.GDN, state_bytes=state)
        caches[layer, "kda"] = MixerCache(MixerKind.KDA, state_bytes=state)
    caches[2, "attention"] = MixerCache(MixerKind.ATTENTION, token_bytes=token)
    return CacheFootprints(caches, block_size, chunk_tokens, speculative_tokens, tp_size=1), token, state


class _Placement:
    def __init__(self, mixers):
        self.mixers = mixers
        self.canonical = ",".join(mixers)


def test_footprint_counts_pages_per_mixer_kind():
    footprints, token, state = _fixture_footprints()
    all_fa = _Placement(["fa", "fa", "attention"])
    linear = _Placement(["gdn", "kda", "attention"])
    window = _Placement(["swa", "swa", "attention"])
    assert footprints.page_bytes == 128 * token  # attention pages of 128 tokens are larger than a state page
    assert footprints.pages(all_fa, 1000) == 3 * 8
    assert footprints.pages(linear, 1000) == 1 + 1 + 8
    # The window keeps its last tokens plus one prefill chunk: cdiv(4 + 128, 128) + 1 pages at most.
    assert footprints.pages(window, 1000) == 3 + 3 + 8
    assert footprints.pages(window, 100) == 1 + 1 + 1
    assert footprints.bytes_per_token(linear) == token
    assert footprints.fixed_bytes(linear) == 2 * state
    assert footprints.fixed_bytes(window) == 2 * 5 * token
    speculating, _, _ = _fixture_footprints(speculative_tokens=4)
    assert speculating.pages(linear, 1000) == 5 + 5 + 8  # one state page per draft position more
    assert speculating.fixed_bytes(linear) == 2 * 5 * state


def test_a_large_state_is_spread_over_pages_of_vllms_attention_size():
    from shared_spec import GDNMixerConfig
    from vllm_supernet.footprint import STATE_PAGE_TOKENS, state_parts
    from vllm_supernet.gdn import SupernetGatedDeltaNet

    gdn = GDNMixerConfig(value_heads=8, key_heads=2, key_head_dim=128, value_head_dim=128, convolution_layer={"kernel_size": 4})
    allowed = SupernetGatedDeltaNet.allowed_parts(gdn, tp_size=1)
    assert allowed == [1, 2, 4, 8]
    # Four parts: two value heads each, with a copy of the key head they read (Q and K channels of one head).
    assert SupernetGatedDeltaNet.part_shapes(gdn, 1, 4) == ((128 + 128 + 2 * 128, 3), (2, 128, 128))
    state = 8 * 128 * 128 * 4  # float32: 512 KiB
    token = 2 * 2 * 128 * 2  # 2 KV heads of 128 in bf16: 1 KiB, so vLLM's 128-token attention page is 128 KiB
    assert STATE_PAGE_TOKENS == 128 and state_parts(allowed, state, token, "auto", "gdn") == 4
    assert state_parts(allowed, state, 0, "auto", "gdn") == 1, "no attention served: no page size to meet"
    assert state_parts(allowed, state // 4, token, "auto", "gdn") == 1
    assert state_parts(allowed, state, token, 2, "gdn") == 2
    with pytest.raises(ValueError, match="supernet_state_parts = 3 does not split its heads evenly; allowed: auto, 1, 2, 4, 8"):
        state_parts(allowed, state, token, 3, "gdn")


def test_too_long_names_what_is_needed_and_what_there_is():
    footprints, _, _ = _fixture_footprints()
    assert footprints.too_long(_Placement(["gdn", "kda", "attention"]), 1000, 10) is None
    reason = footprints.too_long(_Placement(["fa", "fa", "attention"]), 1000, 10)
    assert "placement 'fa,fa,attention' needs 24 cache pages" in reason and "has 10 pages" in reason


# ------------------------------------------------------------------------------------------- engine

MIXED = [["fa", "fa"], ["swa", "gdn"], ["kda", "swa"], ["gdn", "kda"], ["gdn", "gdn"], ["kda", "kda"], "swa*", ["fa", "gdn"]]
NEW_TOKENS = 110
LOGPROB_ATOL = 2e-5


def _prompts() -> list[list[int]]:
    return json.loads((FIXTURE / "reference.json").read_text())["input_ids"]


def _mixed_requests() -> list[dict]:
    """Requests that cross a 128-token page while decoding: a small cache must preempt some of them."""
    prompts = _prompts()
    return [
        {"prompt_token_ids": (prompts[i % len(prompts)] * 4)[: 40 + 7 * i], "placement": placement,
         "max_tokens": NEW_TOKENS, "logprobs": 0, "ignore_eos": True}
        for i, placement in enumerate(MIXED)
    ]  # fmt: skip


def _engine(**options) -> dict:
    # Pages of 128 tokens, given (the counts below are in them; by default the fixture's pages are 32 tokens).
    return {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 256, "max_num_seqs": 16,
            "max_num_batched_tokens": 128, "block_size": 128, "enforce_eager": True, "enable_prefix_caching": False,
            "disable_log_stats": False, **options}  # fmt: skip


def _run(tmp_path_factory, name: str, engine: dict, batches: list[dict], model=FIXTURE_CHECKPOINT, invalid=(),
         **probes) -> dict:  # fmt: skip
    scenario = {"model": str(model), "engine": engine, "batches": batches, "invalid": list(invalid),
                "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, **probes}  # fmt: skip
    return run_engine(scenario, tmp_path_factory.mktemp(name))


@pytest.mark.engine
def test_preempted_mixed_batch_resumes_with_the_same_tokens_and_logprobs(tmp_path_factory):
    batch = [{"name": "mixed", "requests": _mixed_requests()}]
    ample = _run(tmp_path_factory, "ample", _engine(), batch, block_tables=True)
    tight = _run(tmp_path_factory, "tight", _engine(num_gpu_blocks_override=9), batch)
    # The CPU runner's block tables stay one tensor each after the hybrid input batch is rebuilt (no per-group
    # copy a step), and their block counts are rows of one array (one held-groups query a step).
    (tables,) = ample["block_tables"]
    assert tables["groups"] > 1 and all(tables["one_tensor"]) and all(tables["shared_counts"]), tables
    assert ample["block_size"] == tight["block_size"] == 128, "a block size given is kept"
    assert ample["metrics"]["vllm:num_preemptions"] == 0
    assert tight["metrics"]["vllm:num_preemptions"] > 0, "the small cache was meant to force preemptions"
    for placement, free, preempted in zip(MIXED, ample["batches"]["mixed"], tight["batches"]["mixed"], strict=True):
        assert preempted["token_ids"] == free["token_ids"], placement
        torch.testing.assert_close(
            torch.tensor(preempted["logprobs"]), torch.tensor(free["logprobs"]), atol=LOGPROB_ATOL, rtol=0
        )


@pytest.mark.engine
def test_conv_states_apart_give_the_same_tokens_and_logprobs_under_preemption(tmp_path_factory):
    """With the conv states in a table beside the pool (`page_layout`, forced: the fixture's own choice keeps them
    in the page), pages are 16 tokens (6144 B: the delta-rule state exactly) and each block has a conv row; a mixed
    batch preempted by a small cache gives the tokens and logprobs of the default layout with an ample cache."""
    batch = [{"name": "mixed", "requests": _mixed_requests()}]
    overrides = {"supernet_conv_states": "apart"}
    ample = _run(tmp_path_factory, "ample_in_page", _engine(), batch)
    apart = _run(tmp_path_factory, "tight_apart", _engine(block_size=None, num_gpu_blocks_override=48, hf_overrides=overrides),
                 batch, state_pages=True)  # fmt: skip
    assert apart["block_size"] == 16
    (pages,) = apart["state_pages"]
    assert pages["page_bytes"] == 16 * 384
    assert pages["conv_tables"] == 1, "the pool's tensors overlay each other: so do their conv rows"
    for name, layer in pages["layers"].items():
        assert layer["conv_in_table"], name
        conv, recurrent = layer["shapes"]
        assert conv[0] == recurrent[0] == pages["num_blocks"] and recurrent[1:] == [6, 16, 16], (name, layer)
    assert apart["metrics"]["vllm:num_preemptions"] > 0, "the small cache was meant to force preemptions"
    for placement, free, preempted in zip(MIXED, ample["batches"]["mixed"], apart["batches"]["mixed"], strict=True):
        assert preempted["token_ids"] == free["token_ids"], placement
        torch.testing.assert_close(
            torch.tensor(preempted["logprobs"]), torch.tensor(free["logprobs"]), atol=LOGPROB_ATOL, rtol=0
        )


@pytest.mark.engine
def test_states_spread_over_pages_give_the_same_tokens_and_logprobs_under_preemption(tmp_path_factory):
    """Each linear mixer's state spread over three pages by head range (`footprint.state_parts`, forced: the
    fixture's own states fit an attention page), each part a cache group of its own: a mixed batch preempted by
    a small cache gives the tokens and logprobs of the default layout with an ample cache."""
    batch = [{"name": "mixed", "requests": _mixed_requests()}]
    ample = _run(tmp_path_factory, "ample_whole", _engine(), batch)
    spread = _run(tmp_path_factory, "tight_spread", _engine(num_gpu_blocks_override=12, hf_overrides={"supernet_state_parts": 3}),
                  batch, state_pages=True)  # fmt: skip
    (pages,) = spread["state_pages"]
    assert len(pages["layers"]) == 3 * 4, "two layers of a GDN and a KDA, three parts each"
    for name, layer in pages["layers"].items():
        conv, recurrent = layer["shapes"]
        # A third of the rank's 6 value heads, and of its conv channels (GDN: Q|K|V of 3 + 3 + 6 heads of 16;
        # KDA: q|k|v of 6 heads of 16 each).
        assert recurrent[1:] == [2, 16, 16] and conv[1] == (192 if ".mixers.gdn" in name else 288) // 3, (name, layer)
    assert spread["metrics"]["vllm:num_preemptions"] > 0, "the small cache was meant to force preemptions"
    for placement, free, preempted in zip(MIXED, ample["batches"]["mixed"], spread["batches"]["mixed"], strict=True):
        assert preempted["token_ids"] == free["token_ids"], placement
        torch.testing.assert_close(
            torch.tensor(preempted["logprobs"]), torch.tensor(free["logprobs"]), atol=LOGPROB_ATOL, rtol=0
        )


@pytest.fixture(scope="module")
def gdn_default_checkpoint(tmp_path_factory):
    """The fixture with a presets file whose default is all-GDN (the plain third layer stays attention)."""
    return copy_fixture(tmp_path_factory.mktemp("gdn_default"), presets={"default": "gdn*", "presets": {}})


@pytest.mark.engine
@pytest.mark.parametrize("layout", ["per_mixer", "per_kind"])
def test_linear_requests_hold_no_attention_pages(tmp_path_factory, gdn_default_checkpoint, layout):
    """Eight all-GDN requests hold one state page per GDN layer and the plain layer's attention pages: 4 pages
    each, 32 in a 39-page cache, so none is preempted. vLLM's own grouping (`per_kind`) gives each of them
    pages in the FA, SWA and KDA groups too, and the same cache preempts."""
    prompts = _prompts()
    requests = [{"prompt_token_ids": (prompts[i % 3] * 4)[: 40 + 7 * i], "placement": "gdn*", "max_tokens": NEW_TOKENS,
                 "ignore_eos": True} for i in range(8)]  # fmt: skip
    engine = _engine(num_gpu_blocks_override=40, hf_overrides={"supernet_cache_layout": layout})
    result = _run(tmp_path_factory, f"linear_{layout}", engine, [{"name": "gdn", "requests": requests}],
                  model=gdn_default_checkpoint)  # fmt: skip
    preemptions = result["metrics"]["vllm:num_preemptions"]
    assert (preemptions == 0) if layout == "per_mixer" else (preemptions > 0)
    assert all(len(output["token_ids"]) == NEW_TOKENS for output in result["batches"]["gdn"])


@pytest.mark.engine
def test_request_that_cannot_fit_is_a_client_error_and_the_engine_keeps_serving(tmp_path_factory, gdn_default_checkpoint):
    # 11 usable pages: all-GDN at 1024 tokens needs 1 + 1 + 8, all-FA 3 x 8.
    engine = _engine(num_gpu_blocks_override=12, max_model_len=1024)
    fits = {"prompt_token_ids": [1, 5, 6], "placement": "gdn*", "max_tokens": 1000, "ignore_eos": True}
    result = _run(tmp_path_factory, "too_long", engine, [{"name": "fits", "requests": [fits]}], model=gdn_default_checkpoint,
                  invalid=[{"placement": "fa*", "max_tokens": 1000}])  # fmt: skip
    assert len(result["batches"]["fits"][0]["token_ids"]) == 1000
    (rejected,) = result["invalid"]
    assert rejected["error"].startswith("VLLMValidationError"), rejected
    assert "placement 'fa*2,attention' needs 24 cache pages" in rejected["error"]
    assert "this deployment's cache has 11 pages" in rejected["error"]
    assert result["after_invalid"][0]["token_ids"]


@pytest.mark.engine
def test_deployment_whose_default_cannot_fit_one_request_refuses_to_start(tmp_path_factory, gdn_default_checkpoint):
    engine = _engine(num_gpu_blocks_override=10, max_model_len=1024)  # 9 usable pages; the default needs 10
    with pytest.raises(RuntimeError) as failure:
        _run(tmp_path_factory, "no_start", engine, [], model=gdn_default_checkpoint)
    message = str(failure.value)
    assert "the default placement cannot serve one request of max_model_len = 1024" in message
    assert "needs 10 cache pages" in message and "has 9 pages" in message
