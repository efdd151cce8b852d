"""Speculation inside the cache budget: the self-speculator's draft caches live in draft slots carved out of the
KV-cache memory before vLLM sizes its pool (`speculative.draft_reserve`, `footprint.CacheFootprints.draft_slot`).

Engines: float32 on test_vllm_speculative's kernel checkpoint, each given the same cache memory
(`kv_cache_memory_bytes`, so that both pools are cut from one figure): one speculating with 2 draft slots, one
serving the same deployment without speculation. Checked: the speculating pool is smaller by the reserve (to a
page); the speculator allocates exactly the reserve and never drafts for more requests than it has slots while 6
run, turning the others away; every request, drafted or not, gives the reference's greedy tokens; a request
naming a draft placement larger than a slot is a 400; a bad `supernet_draft_slots` is refused at start-up naming
what is allowed. Without an engine: a draft slot's layout, the option's validation, the ring of a draft's KV
buffer.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from tests.test_vllm_engine import _random_prompts, _reference_greedy, _request, kernel_checkpoint  # noqa: E402,F401
from tests.test_vllm_speculative import DEPLOYMENT_DRAFT, NEW_TOKENS, _engine, reference_model  # noqa: E402,F401
from tests.vllm_helpers import run_engine  # noqa: E402

SLOTS = 2
CACHE_MEMORY = 8 * 2**20
TARGETS = ["attention*", "attention,gdn,kda", "gdn*", "kda,attention,sliding_window", "sliding_window,gdn,gdn", "kda*"]


def _requests() -> list[dict]:
    prompts = _random_prompts([60, 33, 90, 47, 25, 70], seed=29)
    return [
        _request(prompt, target, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True)
        for prompt, target in zip(prompts, TARGETS, strict=True)
    ]


def _budget_engine(checkpoint, slots=SLOTS, **overrides) -> dict:
    return _engine(
        checkpoint,
        kv_cache_memory_bytes=CACHE_MEMORY,
        max_num_seqs=8,
        max_model_len=1024,  # a sliding-window draft's slot holds fewer tokens (window - 1 + 512) than this
        hf_overrides={"supernet_draft_placement": DEPLOYMENT_DRAFT, "supernet_draft_slots": slots},
        **overrides,
    )


@pytest.fixture(scope="module")
def slotted_results(kernel_checkpoint, tmp_path_factory):  # noqa: F811
    scenario = {
        "model": str(kernel_checkpoint),
        "engine": _budget_engine(kernel_checkpoint),
        "batches": [{"name": "crowd", "requests": _requests()}],
        "invalid": [{"draft_placement": "attention*"}, {"draft_placement": "gdn*"}],
        "draft_memory": True,
    }
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_draft_slots"))


@pytest.fixture(scope="module")
def plain_results(kernel_checkpoint, tmp_path_factory):  # noqa: F811
    scenario = {"model": str(kernel_checkpoint), "engine": _budget_engine(kernel_checkpoint, speculative_config=None)}
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_no_draft_slots"))


@pytest.mark.engine
def test_the_pool_of_a_speculating_deployment_is_smaller_by_the_reserve(slotted_results, plain_results):
    (memory,) = slotted_results["draft_memory"]
    reserve, page = memory["slots"] * memory["slot_bytes"], memory["block_bytes"]
    assert memory["slots"] == SLOTS and reserve > page
    fewer = plain_results["num_gpu_blocks"] - slotted_results["num_gpu_blocks"]
    assert reserve // page <= fewer <= -(-reserve // page), (fewer, reserve, page)


@pytest.mark.engine
def test_drafts_stay_in_their_slots_and_undrafted_requests_decode_the_same(slotted_results, reference_model):  # noqa: F811
    (memory,) = slotted_results["draft_memory"]
    assert memory["allocated_bytes"] == memory["slots"] * memory["slot_bytes"]  # exactly the reserve, once
    assert memory["peak_in_use"] == SLOTS  # every slot used, never more
    assert memory["no_free_slot"] > 0 and memory["too_large"] == 0  # requests were turned away for want of one
    assert slotted_results["speculation"]["crowd"]["drafted"] > 0
    # A draft placement that needs more than a slot is a 400 (full attention over 1024 tokens); a smaller one runs.
    too_large, fits = (entry["error"] for entry in slotted_results["invalid"])
    assert "invalid draft_placement: 'attention*3' needs" in too_large and "draft slots hold" in too_large, too_large
    assert fits is None
    for request, output in zip(_requests(), slotted_results["batches"]["crowd"], strict=True):
        tokens, logprobs = _reference_greedy(reference_model, request["prompt_token_ids"], request["placement"], NEW_TOKENS)
        assert output["token_ids"] == tokens, request["placement"]
        assert max(abs(a - b) for a, b in zip(output["logprobs"], logprobs, strict=True)) < 1e-4


@pytest.mark.engine
def test_a_bad_number_of_draft_slots_is_refused_at_start_up(kernel_checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(RuntimeError) as raised:
        run_engine({"model": str(kernel_checkpoint), "engine": _budget_engine(kernel_checkpoint, slots=0)}, tmp_path)
    assert "supernet_draft_slots = 0: allowed: a whole number of draft slots from 1 to max_num_seqs (8)" in str(raised.value)


def test_a_draft_slot_holds_each_layer_of_the_draft_placement():
    """Per layer: full attention max_model_len tokens, a sliding window window - 1 + 512, a linear mixer 1 + k
    (conv, recurrent) states; every tensor starts on a 64-byte boundary."""
    from shared_spec import MixerKind
    from vllm_supernet.footprint import CacheFootprints, MixerCache

    caches = {
        (0, "fa"): MixerCache(MixerKind.ATTENTION, token_bytes=2 * 2 * 16 * 4, shapes=(2, 16)),
        (0, "swa"): MixerCache(MixerKind.SLIDING_WINDOW, token_bytes=2 * 2 * 16 * 4, window=100, shapes=(2, 16)),
        (1, "gdn"): MixerCache(MixerKind.GDN, state_bytes=1, shapes=((24, 3), (2, 8, 8))),
    }
    footprints = CacheFootprints(caches, 16, 2048, speculative_tokens=3, tp_size=1, dtype=torch.bfloat16,
                                 max_model_len=4096)  # fmt: skip
    full, window = (footprints.draft_slot(SimpleNamespace(mixers=[name, "gdn"])) for name in ("fa", "swa"))
    (attention, kv), (linear, states) = full.layers
    assert attention and not linear
    assert [shape for _, shape, _ in kv] == [(4096, 2, 16)] * 2
    assert [(shape, dtype) for _, shape, dtype in states] == [((1, 24, 3), torch.bfloat16), ((1, 2, 8, 8), torch.float32)] * 4
    assert [shape for _, shape, _ in window.layers[0][1]] == [(99 + 512, 2, 16)] * 2
    state = 64 * -(-24 * 3 * 2 // 64) + 2 * 8 * 8 * 4
    assert full.bytes == 2 * 4096 * 2 * 16 * 2 + 4 * state
    assert window.bytes == 2 * 611 * 2 * 16 * 2 + 4 * state
    assert all(offset % 64 == 0 for _, tensors in full.layers for offset, _, _ in tensors)


def _config(slots=None, max_num_seqs=8):
    hf_config = SimpleNamespace() if slots is None else SimpleNamespace(supernet_draft_slots=slots)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config),
                           scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))  # fmt: skip


@pytest.mark.parametrize(("slots", "expected"), [(None, 8), (1, 1), (8, 8), (0, None), (9, None), (True, None),
                                                 ("2", None), (2.0, None)])  # fmt: skip
def test_draft_slots_option(slots, expected):
    from vllm_supernet.speculative import draft_slots

    if expected is not None:
        assert draft_slots(_config(slots)) == expected
        return
    with pytest.raises(ValueError, match=r"from 1 to max_num_seqs \(8\); without it, max_num_seqs"):
        draft_slots(_config(slots))


def test_kv_buffer_ring_keeps_the_last_positions_through_rollbacks():
    """Chunks of 1-5 tokens and rollbacks of up to 3 on a ring of 12: the last positions read back as written."""
    from vllm_supernet.attention import KVBuffer

    generator = torch.Generator().manual_seed(3)
    buffer = KVBuffer(torch.empty(12, 1, 2), torch.empty(12, 1, 2))
    written: list[float] = []  # position p's key, as last written
    for _ in range(200):
        if written and torch.rand(1, generator=generator) < 0.3:
            back = int(torch.randint(1, 4, (1,), generator=generator))
            buffer.length = max(0, buffer.length - back)
            del written[buffer.length :]
        count = int(torch.randint(1, 6, (1,), generator=generator))
        keys = torch.rand(count, 1, 2, generator=generator)
        buffer.append(keys, -keys)
        written.extend(keys[:, 0, 0].tolist())
        first = max(0, buffer.length - 7)  # a window of 7 after a forward of at most 5: 7 - 1 + 5 <= 12
        keys, values = buffer.since(first)
        assert keys[:, 0, 0].tolist() == written[first:] and torch.equal(values, -keys)
