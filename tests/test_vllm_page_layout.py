"""Page layout: tokens per attention page, and conv states in the state page or in a table beside the pool."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from shared_spec import MixerKind  # noqa: E402
from vllm_supernet.footprint import CacheFootprints, MixerCache  # noqa: E402
from vllm_supernet.page_layout import PageLayout, choose_block_size, without_conv_table, worst_use  # noqa: E402

KIB = 1024


def _caches(token_bytes: int, states: dict[MixerKind, tuple[int, int]]) -> dict:
    """An attention layer and a layer of linear mixers whose (conv, delta-rule) state bytes are `states`."""
    caches = {(0, "attention"): MixerCache(MixerKind.ATTENTION, token_bytes=token_bytes),
              (0, "sliding_window"): MixerCache(MixerKind.SLIDING_WINDOW, token_bytes=token_bytes, window=512)}  # fmt: skip
    for kind, (conv, delta_rule) in states.items():
        caches[1, kind.value] = MixerCache(kind, state_bytes=conv + delta_rule, conv_bytes=conv)
    return caches


# The benchmark model: 4 KV heads of 64 in bf16 (1 KiB a token), GDN 6 KiB + 128 KiB, KDA 9 KiB + 128 KiB.
BENCHMARK = _caches(KIB, {MixerKind.GDN: (6 * KIB, 128 * KIB), MixerKind.KDA: (9 * KIB, 128 * KIB)})
# The upstream fixture: 3 KV heads of 16 in float32 (384 B a token), GDN 2304 + 6144 B, KDA 3456 + 6144 B.
FIXTURE = _caches(384, {MixerKind.GDN: (2304, 6144), MixerKind.KDA: (3456, 6144)})


def test_the_benchmark_model_keeps_its_conv_states_apart_and_wastes_no_state_bytes():
    assert worst_use(BENCHMARK, 160) == pytest.approx(134 / 160)  # in the page: GDN's 134 KiB in a 160 KiB page
    assert worst_use(BENCHMARK, 128) == pytest.approx(128 / 137)  # apart: attention fills 128 of 137 KiB
    assert choose_block_size(BENCHMARK, 32) == 128
    layout = PageLayout.of_caches(BENCHMARK, 128)
    assert (layout.page_bytes, layout.conv_row_bytes, layout.block_bytes) == (128 * KIB, 9 * KIB, 137 * KIB)
    assert choose_block_size(BENCHMARK, 32, "in_page") == 160
    assert not PageLayout.of_caches(BENCHMARK, 160).conv_apart
    assert not PageLayout.of_caches(BENCHMARK, 128, "in_page").conv_apart, "in_page is kept whatever the block size"


def test_the_fixture_keeps_its_conv_states_in_the_page_unless_told():
    assert choose_block_size(FIXTURE, 16) == 32  # 0.69 of a page used (GDN) against 0.64 of a block apart
    assert not PageLayout.of_caches(FIXTURE, 32).conv_apart
    assert choose_block_size(FIXTURE, 16, "apart") == 16
    layout = PageLayout.of_caches(FIXTURE, 16)
    assert (layout.page_bytes, layout.conv_row_bytes) == (6144, 3456)  # the delta-rule state is exactly 16 tokens


def test_apart_is_not_chosen_where_it_saves_no_page_step():
    """A state whose conv part fits the page's slack gains nothing from a table: 100 + 10 KiB in 128-token pages."""
    caches = _caches(KIB, {MixerKind.GDN: (10 * KIB, 100 * KIB)})
    assert choose_block_size(caches, 32, "apart") == choose_block_size(caches, 32) == 128
    assert not PageLayout.of_caches(caches, 128).conv_apart


def test_pool_and_table_share_the_memory():
    layout = PageLayout.of_caches(BENCHMARK, 128)
    memory = 24 * 2**20
    (pool,) = without_conv_table(layout, [memory])
    blocks = pool // layout.page_bytes
    assert blocks * layout.block_bytes <= memory < (blocks + 1) * layout.block_bytes
    in_page = PageLayout.of_caches(BENCHMARK, 160)
    assert without_conv_table(in_page, [memory]) == [memory]


def test_footprints_count_a_block_with_its_row():
    footprints = CacheFootprints(BENCHMARK, 128, chunk_tokens=256, speculative_tokens=0, tp_size=1)
    assert (footprints.page_bytes, footprints.block_bytes) == (128 * KIB, 137 * KIB)

    class Placement:
        mixers, canonical = ["attention", "gdn"], "attention,gdn"

    reason = footprints.too_long(Placement(), 1000, 4)
    assert "needs 9 cache pages (1.2 MiB per rank)" in reason and "has 4 pages (0.5 MiB per rank)" in reason


def _engine_config(**overrides):
    from vllm.engine.arg_utils import EngineArgs

    from tests.vllm_helpers import FIXTURE_CHECKPOINT

    args = EngineArgs(model=str(FIXTURE_CHECKPOINT), dtype="float32", skip_tokenizer_init=True, enforce_eager=True,
                      **({"hf_overrides": overrides} if overrides else {}))  # fmt: skip
    return args.create_engine_config()


def test_the_config_settles_the_block_size_and_refuses_a_bad_choice():
    """The block size is chosen where the config is built (no engine starts here): the fixture's 32-token pages,
    16 with the conv states forced apart; an unknown choice fails there, naming the allowed ones."""
    assert _engine_config().cache_config.block_size == 32
    assert _engine_config(supernet_conv_states="apart").cache_config.block_size == 16
    with pytest.raises(Exception, match="supernet_conv_states = 'beside'; allowed: auto, in_page, apart"):
        _engine_config(supernet_conv_states="beside")
