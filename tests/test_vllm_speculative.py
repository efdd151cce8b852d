"""Self-speculative decoding in real vLLM engines (`vllm_supernet.speculative.SelfSpeculator`).

Float32 engines serve the converted checkpoint with 32-wide heads (test_vllm_engine's `kernel_checkpoint`:
three layers holding attention, sliding_window (window 24), gdn and kda; vocabulary 64) with
speculative_config custom_class, k = 3, and the deployment's draft placement `sliding_window*`.
Checked: greedy output with speculation equals the PyTorch reference's greedy output without it, for
(target, draft) pairs with linear mixers on either side, in one mixed batch with per-request drafts and
alone; a draft equal to its target is accepted at least 99 % of the time; sampled tokens follow the
target's distribution (chi-square, 10,000 samples); invalid draft placements are rejected and the engine
keeps serving; two tensor-parallel ranks on a thinned deployment give the reference's tokens.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from tests.test_vllm_engine import _random_prompts, _reference_greedy, _request, kernel_checkpoint  # noqa: E402,F401
from tests.vllm_helpers import run_engine  # noqa: E402

pytestmark = pytest.mark.engine

K = 3
NEW_TOKENS = 20
DEPLOYMENT_DRAFT = "sliding_window*"
SPECULATIVE_CONFIG = {
    "method": "custom_class",
    "model": "vllm_supernet.speculative.SelfSpeculator",
    "num_speculative_tokens": K,
}
# (target, draft; None: the deployment's)
PAIRS = [
    ("attention*", None),
    ("attention*", "gdn*"),
    ("attention,gdn,kda", "attention,gdn,gdn"),
    ("gdn*", "kda*"),
    ("kda,attention,sliding_window", "attention*"),
    ("sliding_window,gdn,gdn", "gdn,gdn,kda"),
]
ALONE = [2, 3]  # pairs also run alone: a linear target with a linear draft
SAME = ["attention*", "attention,gdn,kda", "kda*", "sliding_window,gdn,gdn"]
SAMPLED_PLACEMENT, SAMPLED_PROMPT, SAMPLES = "attention,gdn,kda", [1, 17, 40, 9, 23], 10_000


def _pair_requests() -> list[dict]:
    prompts = _random_prompts([60, 33, 90, 47, 25, 70], seed=17)
    requests = []
    for prompt, (target, draft) in zip(prompts, PAIRS, strict=True):
        extra = {} if draft is None else {"draft_placement": draft}
        requests.append(_request(prompt, target, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True, **extra))
    return requests


def _same_requests() -> list[dict]:
    prompts = _random_prompts([40, 55, 31, 66], seed=19)
    return [
        _request(prompt, placement, draft_placement=placement, max_tokens=NEW_TOKENS, ignore_eos=True)
        for prompt, placement in zip(prompts, SAME, strict=True)
    ]


def _engine(checkpoint, **overrides) -> dict:
    return {
        "dtype": "float32",
        "gpu_memory_utilization": 0.3,
        "max_model_len": 512,
        "max_num_seqs": 256,
        "max_num_batched_tokens": 2048,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "disable_log_stats": False,  # the speculation counters
        "speculative_config": SPECULATIVE_CONFIG,
        "hf_overrides": {"supernet_draft_placement": DEPLOYMENT_DRAFT},
        **overrides,
    }


@pytest.fixture(scope="module")
def speculative_results(kernel_checkpoint, tmp_path_factory):  # noqa: F811
    pairs = _pair_requests()
    scenario = {
        "model": str(kernel_checkpoint),
        "engine": _engine(kernel_checkpoint),
        "batches": [
            {"name": "mixed", "requests": pairs},
            *({"name": f"alone_{i}", "requests": [pairs[i]]} for i in ALONE),
            {"name": "same", "requests": _same_requests()},
            {
                "name": "sampled",
                "requests": [
                    _request(SAMPLED_PROMPT, SAMPLED_PLACEMENT, draft_placement=SAMPLED_PLACEMENT, max_tokens=2,
                             ignore_eos=True, temperature=1.0, n=SAMPLES)
                ],
            },
        ],
        "invalid": [{"draft_placement": "mamba*"}, {"draft_placement": "attention*2"}],
    }
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_speculative_engine"))


@pytest.fixture(scope="module")
def reference_model(kernel_checkpoint):  # noqa: F811
    from fast_llm_supernet.model import SupernetForCausalLM

    return SupernetForCausalLM.from_pretrained(kernel_checkpoint, dtype=torch.float32)


def test_speculative_greedy_equals_reference_greedy(speculative_results, reference_model):
    batches = speculative_results["batches"]
    for i, request in enumerate(_pair_requests()):
        tokens, logprobs = _reference_greedy(reference_model, request["prompt_token_ids"], request["placement"], NEW_TOKENS)
        outputs = [batches["mixed"][i]] + ([batches[f"alone_{i}"][0]] if i in ALONE else [])
        for output in outputs:
            assert output["token_ids"] == tokens, PAIRS[i]
            assert max(abs(a - b) for a, b in zip(output["logprobs"], logprobs, strict=True)) < 1e-4, PAIRS[i]
    drafted = speculative_results["speculation"]["mixed"]
    assert drafted["rounds"] > 0 and drafted["drafted"] > 0  # the drafts were really verified


def test_draft_equal_to_target_is_accepted(speculative_results, reference_model):
    counts = speculative_results["speculation"]["same"]
    assert counts["drafted"] >= len(SAME) * (NEW_TOKENS // (K + 1)) * K
    assert counts["accepted"] / counts["drafted"] >= 0.99, counts
    for request, output in zip(_same_requests(), speculative_results["batches"]["same"], strict=True):
        tokens, _ = _reference_greedy(reference_model, request["prompt_token_ids"], request["placement"], NEW_TOKENS)
        assert output["token_ids"] == tokens


def test_sampled_tokens_follow_the_target_distribution(speculative_results, reference_model):
    """The second token is the first one verified against drafts: its marginal over 10,000 samples matches
    sum over t1 of p(t1) p(t2 | t1) of the reference (chi-square, cells with expected count < 5 pooled)."""
    from scipy.stats import chisquare

    samples = speculative_results["batches"]["sampled"][0]["samples"]
    assert len(samples) == SAMPLES and all(len(sample) == 2 for sample in samples)
    with torch.no_grad():
        prompt = torch.tensor([SAMPLED_PROMPT])
        first = torch.softmax(reference_model(prompt, placement=SAMPLED_PLACEMENT)[0, -1].double(), dim=-1)  # [V]
        vocab = first.shape[0]
        continued = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)  # [V, L + 1]
        second = torch.softmax(reference_model(continued, placement=SAMPLED_PLACEMENT)[:, -1].double(), dim=-1)
    expected = (first @ second * SAMPLES).numpy()  # [V]
    observed = torch.bincount(torch.tensor([sample[1] for sample in samples]), minlength=vocab).double().numpy()
    large = expected >= 5
    cells_observed, cells_expected = [*observed[large], observed[~large].sum()], [*expected[large], expected[~large].sum()]
    if cells_expected[-1] == 0:  # no small cells to pool
        cells_observed, cells_expected = cells_observed[:-1], cells_expected[:-1]
    assert len(cells_observed) > 10
    assert chisquare(cells_observed, cells_expected).pvalue > 1e-3
    assert speculative_results["speculation"]["sampled"]["drafted"] >= SAMPLES


def test_invalid_draft_placement_is_rejected_and_engine_keeps_serving(speculative_results):
    errors = [entry["error"] for entry in speculative_results["invalid"]]
    assert all(error is not None and "draft_placement" in error for error in errors), errors
    assert "mamba" in errors[0]
    assert len(speculative_results["after_invalid"][0]["token_ids"]) == 2


# ---- two tensor-parallel ranks, thinned to two placements plus the deployment's draft ----------------

TP_ALLOWED = ["attention*", "attention,gdn,kda"]
TP_DRAFT = "sliding_window,gdn,gdn"


def _tp_requests() -> list[dict]:
    prompts = _random_prompts([50, 81], seed=23)
    return [
        _request(prompt, target, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True)
        for prompt, target in zip(prompts, TP_ALLOWED, strict=True)
    ]


@pytest.fixture(scope="module")
def tp_speculative_results(kernel_checkpoint, tmp_path_factory):  # noqa: F811
    engine = _engine(
        kernel_checkpoint,
        tensor_parallel_size=2,
        hf_overrides={"supernet_placements": TP_ALLOWED, "supernet_draft_placement": TP_DRAFT},
    )
    scenario = {
        "model": str(kernel_checkpoint),
        "engine": engine,
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per rank
        "batches": [{"name": "mixed", "requests": _tp_requests()}],
    }
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_tp_speculative_engine"))


def test_two_ranks_speculate_on_a_thinned_deployment(tp_speculative_results, reference_model):
    for request, output in zip(_tp_requests(), tp_speculative_results["batches"]["mixed"], strict=True):
        tokens, logprobs = _reference_greedy(reference_model, request["prompt_token_ids"], request["placement"], NEW_TOKENS)
        assert output["token_ids"] == tokens, request["placement"]
        assert max(abs(a - b) for a, b in zip(output["logprobs"], logprobs, strict=True)) < 1e-4
    assert tp_speculative_results["speculation"]["mixed"]["drafted"] > 0


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"enable_prefix_caching": True}, "--no-enable-prefix-caching"),
        ({"hf_overrides": {}}, "supernet_draft_placement"),
        (
            {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
            "speculates with its own placements only",
        ),
    ],
)
def test_unsupported_speculation_is_refused_at_start_up(kernel_checkpoint, tmp_path, engine, message):  # noqa: F811
    with pytest.raises(RuntimeError) as raised:
        run_engine({"model": str(kernel_checkpoint), "engine": _engine(kernel_checkpoint, **engine)}, tmp_path)
    assert message in str(raised.value)
