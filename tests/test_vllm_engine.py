"""The vLLM plugin against the PyTorch reference model, in real (offline) vLLM engines.

One engine serves the upstream fixture in float32 (its README: upcast, compute in float32, 1e-5);
two more serve a converted checkpoint with 32-wide heads, in float32 (vLLM's CPU attention kernel)
and in bfloat16 (vLLM's CPU GDN decode kernel).
Checked: upstream's own logits for four placements in one mixed batch; greedy tokens and logprobs
of the PyTorch reference for uniform and mixed batches; a request's output alone equals its output
in a mixed batch; chunked prefill and prefix caching across placements; invalid placements rejected
with the engine still serving.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from safetensors.torch import load_file  # noqa: E402

from tests.vllm_helpers import FIXTURE, FIXTURE_CHECKPOINT, fixture_placements, run_engine  # noqa: E402

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 2e-5
NEW_TOKENS = 8
GENERATE_PLACEMENTS = [
    ["fa", "fa"],
    ["swa", "gdn"],
    ["kda", "swa"],
    ["gdn", "kda"],
    ["gdn", "gdn"],
    ["kda", "kda"],
    "swa*",
    None,  # the checkpoint's default (main_mixer_name: swa)
]
LONG_PROMPT_TOKENS = 600


def _fixture_prompts() -> list[list[int]]:
    return json.loads((FIXTURE / "reference.json").read_text())["input_ids"]


def _long_prompt() -> list[int]:
    generator = torch.Generator().manual_seed(7)
    return [1] + torch.randint(3, 320, (LONG_PROMPT_TOKENS - 1,), generator=generator).tolist()


def _request(prompt, placement, **fields) -> dict:
    request = {"prompt_token_ids": prompt, **fields}
    if placement is not None:
        request["placement"] = placement
    return request


def _generate_requests() -> list[dict]:
    prompts = _fixture_prompts()
    return [
        _request(prompts[i % len(prompts)][: 12 + i], placement, max_tokens=NEW_TOKENS, logprobs=0)
        for i, placement in enumerate(GENERATE_PLACEMENTS)
    ]


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    prompts = _fixture_prompts()
    generate = _generate_requests()
    long_prompt = _long_prompt()
    scenario = {
        "model": str(FIXTURE_CHECKPOINT),
        "engine": {
            "dtype": "float32",
            "gpu_memory_utilization": 0.3,
            "max_model_len": 1024,
            "max_num_seqs": 16,
            # Small steps: the long prompt is prefilled in chunks (states and KV carried across them).
            "max_num_batched_tokens": 256,
            "enforce_eager": True,
        },
        "batches": [
            {
                "name": "fixture_mixed",
                "requests": [
                    _request(prompt, placement, max_tokens=1, prompt_logprobs=0)
                    for placement in fixture_placements()
                    for prompt in prompts
                ],
            },
            {"name": "generate_mixed", "requests": generate},
            *({"name": f"alone_{i}", "requests": [request]} for i, request in enumerate(generate)),
            # Same long prompt: placement A, A again (prefix cache hit), then B (must not reuse A's cache).
            {"name": "long_a", "requests": [_request(long_prompt, ["gdn", "kda"], max_tokens=4, logprobs=0)]},
            {
                "name": "long_a_again",
                "requests": [_request(long_prompt, ["gdn", "kda"], max_tokens=4, logprobs=0)],
            },
            {"name": "long_b", "requests": [_request(long_prompt, ["fa", "swa"], max_tokens=4, logprobs=0)]},
        ],
        # The last: a draft placement on an engine that does not speculate.
        "invalid": [["fa", "bogus"], "not_a_preset", ["fa"] * 5, "fa**", {"draft_placement": "swa*"}],
    }
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_engine"))


@pytest.fixture(scope="module")
def reference():
    from fast_llm_supernet.model import SupernetForCausalLM

    return SupernetForCausalLM.from_pretrained(FIXTURE_CHECKPOINT, dtype=torch.float32)


def _reference_greedy(model, prompt: list[int], placement, new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of the reference model and each chosen token's logprob."""
    with torch.no_grad():
        sequence = model.generate(torch.tensor([prompt]), placement=placement, max_new_tokens=new_tokens)[0]
        logprobs = torch.log_softmax(model(sequence[None], placement=placement)[0].double(), dim=-1)
    generated = sequence[len(prompt) :].tolist()
    chosen = [logprobs[len(prompt) - 1 + i, token].item() for i, token in enumerate(generated)]
    return generated, chosen


def test_pages_are_the_smallest_that_hold_a_state_page(engine_results):
    """Attention blocks step by 16 or 32 tokens (`attention.block_step`), not by the CPU platform's default of 128:
    the fixture's pages are 32 tokens of float32 keys and values (32 x 384 B), the smallest step whose page holds
    its largest state page (KDA, 9600 B, 25 tokens); 128-token pages would pad each state page to 5x its size. Its
    conv states stay in the page (`page_layout`: 16-token pages with a conv-state row would fill attention blocks
    to 0.64, worse than the GDN pages' 0.69)."""
    assert engine_results["block_size"] == 32


def test_mixed_batch_matches_upstream_fixture_logits(engine_results):
    """Four placements, three prompts each, in one batch: prompt logprobs equal upstream Fast-LLM's."""
    logits = load_file(FIXTURE / "reference.safetensors")
    prompts = _fixture_prompts()
    outputs = engine_results["batches"]["fixture_mixed"]
    worst = 0.0
    for index, output in enumerate(outputs):
        placement_index, prompt_index = divmod(index, len(prompts))
        expected = torch.log_softmax(logits[str(placement_index)][prompt_index].double(), dim=-1)
        prompt = prompts[prompt_index]
        for t in range(1, len(prompt)):
            worst = max(worst, abs(output["prompt_logprobs"][t] - expected[t - 1, prompt[t]].item()))
        assert output["token_ids"] == [int(expected[-1].argmax())]
    assert worst < LOGPROB_ATOL


def test_mixed_batch_greedy_equals_reference(engine_results, reference):
    for request, output in zip(
        _generate_requests(), engine_results["batches"]["generate_mixed"], strict=True
    ):
        tokens, logprobs = _reference_greedy(
            reference, request["prompt_token_ids"], request.get("placement"), NEW_TOKENS
        )
        assert output["token_ids"] == tokens, request.get("placement")
        assert max(abs(a - b) for a, b in zip(output["logprobs"], logprobs, strict=True)) < LOGPROB_ATOL


def test_output_does_not_depend_on_batch(engine_results):
    mixed = engine_results["batches"]["generate_mixed"]
    for i, in_batch in enumerate(mixed):
        alone = engine_results["batches"][f"alone_{i}"][0]
        assert alone["token_ids"] == in_batch["token_ids"]
        assert max(abs(a - b) for a, b in zip(alone["logprobs"], in_batch["logprobs"], strict=True)) < 1e-5


def test_chunked_prefill_and_prefix_cache_per_placement(engine_results, reference):
    prompt = _long_prompt()
    batches = engine_results["batches"]
    for name, placement in (
        ("long_a", ["gdn", "kda"]),
        ("long_a_again", ["gdn", "kda"]),
        ("long_b", ["fa", "swa"]),
    ):
        tokens, logprobs = _reference_greedy(reference, prompt, placement, 4)
        output = batches[name][0]
        assert output["token_ids"] == tokens, name
        assert max(abs(a - b) for a, b in zip(output["logprobs"], logprobs, strict=True)) < 1e-4, name
    # The placement is part of the prefix-cache key: the other placement shares no cached block.
    assert batches["long_b"][0]["num_cached_tokens"] == 0
    assert batches["long_a_again"][0]["num_cached_tokens"] > 0


def test_invalid_placements_are_rejected_and_engine_keeps_serving(engine_results):
    errors = {json.dumps(item["value"]): item["error"] for item in engine_results["invalid"]}
    assert all(error is not None for error in errors.values()), errors
    assert "bogus" in errors['["fa", "bogus"]'] and "valid choices" in errors['["fa", "bogus"]']
    assert "not_a_preset" in errors['"not_a_preset"']
    assert "5 entries" in errors['["fa", "fa", "fa", "fa", "fa"]']
    assert "does not speculate" in errors['{"draft_placement": "swa*"}']
    assert len(engine_results["after_invalid"][0]["token_ids"]) == 2


# ---- vLLM's CPU attention kernel (head size 32) ----------------------------------------------------
# The fixture's head size (16) runs the PyTorch paged-attention path; a checkpoint converted from a
# teacher with 32-wide heads runs vLLM's CPU kernel. Prompts cross cache blocks and the SWA window,
# prefill runs in chunks, and each request must equal the reference model alone and in a mixed batch.

KERNEL_WINDOW = 24
KERNEL_PLACEMENTS = [
    "attention*",
    "sliding_window*",
    "attention,sliding_window,gdn",
    "kda,attention,sliding_window",
]


def _random_prompts(lengths: list[int], seed: int, vocab: int = 64) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=generator).tolist() for n in lengths]


def _kernel_requests() -> list[dict]:
    prompts = _random_prompts([150, 97, 41, 130], seed=11)
    return [
        _request(prompt, placement, max_tokens=NEW_TOKENS, logprobs=0)
        for prompt, placement in zip(prompts, KERNEL_PLACEMENTS, strict=True)
    ]


@pytest.fixture(scope="module")
def kernel_checkpoint(tmp_path_factory):
    from fast_llm_supernet.model import SupernetForCausalLM
    from fast_llm_supernet.tools.convert import convert
    from tests.test_model_supernet import randomised
    from tests.test_tools_convert import make_teacher

    root = tmp_path_factory.mktemp("kernel_supernet")
    make_teacher(root / "teacher", hidden_size=64, head_dim=32)
    convert(root / "teacher", root / "supernet", window_size=KERNEL_WINDOW)
    # Perturb every weight: a mixer left at its teacher-derived init could hide a misplaced gate.
    randomised(SupernetForCausalLM.from_pretrained(root / "supernet")).save_pretrained(root / "supernet")
    return root / "supernet"


def _kernel_scenario(checkpoint, **engine) -> dict:
    """The kernel checkpoint's requests, mixed and each alone, on a float32 engine (`engine`: more options)."""
    requests = _kernel_requests()
    return {
        "model": str(checkpoint),
        "engine": {
            "dtype": "float32",
            "gpu_memory_utilization": 0.3,
            "max_model_len": 512,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,  # chunked prefill
            "enforce_eager": True,
            "enable_prefix_caching": False,
            **engine,
        },
        "batches": [
            {"name": "mixed", "requests": requests},
            *({"name": f"alone_{i}", "requests": [request]} for i, request in enumerate(requests)),
        ],
    }


@pytest.fixture(scope="module")
def kernel_engine_results(kernel_checkpoint, tmp_path_factory):
    return run_engine(_kernel_scenario(kernel_checkpoint), tmp_path_factory.mktemp("vllm_kernel_engine"))


def test_cpu_attention_kernel_equals_reference(kernel_checkpoint, kernel_engine_results):
    from fast_llm_supernet.model import SupernetForCausalLM

    reference_model = SupernetForCausalLM.from_pretrained(kernel_checkpoint, dtype=torch.float32)
    batches = kernel_engine_results["batches"]
    for i, request in enumerate(_kernel_requests()):
        tokens, logprobs = _reference_greedy(
            reference_model, request["prompt_token_ids"], request["placement"], NEW_TOKENS
        )
        for output in (batches["mixed"][i], batches[f"alone_{i}"][0]):
            assert output["token_ids"] == tokens, request["placement"]
            assert max(abs(a - b) for a, b in zip(output["logprobs"], logprobs, strict=True)) < 1e-4



@pytest.fixture(scope="module")
def prefix_apart_results(kernel_checkpoint, tmp_path_factory):
    """The kernel checkpoint keeps its conv states beside the pool (`page_layout`: float32, 32 tokens of keys and
    values hold its 16 KiB delta-rule state), with prefix caching on ("align" mode copies each state page and its
    conv row): one long prompt with a placement, the same again, then with another placement."""
    (prompt,) = _random_prompts([300], seed=17)
    linear, other = "kda,gdn,gdn", "gdn,attention,gdn"
    scenario = _kernel_scenario(kernel_checkpoint, enable_prefix_caching=True)
    scenario["batches"] = [
        {"name": name, "requests": [_request(prompt, placement, max_tokens=NEW_TOKENS, logprobs=0)]}
        for name, placement in (("a", linear), ("a_again", linear), ("b", other))
    ]
    scenario["state_pages"] = True  # an RPC of a function: the engine core in process
    scenario["env"] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_prefix_apart")), prompt, {"a": linear, "b": other}


def test_prefix_cache_hits_with_conv_states_beside_the_pool(kernel_checkpoint, prefix_apart_results):
    from fast_llm_supernet.model import SupernetForCausalLM

    results, prompt, placements = prefix_apart_results
    (pages,) = results["state_pages"]
    assert pages["conv_tables"] == 1 and all(layer["conv_in_table"] for layer in pages["layers"].values())
    reference_model = SupernetForCausalLM.from_pretrained(kernel_checkpoint, dtype=torch.float32)
    batches = results["batches"]
    for name in ("a", "a_again", "b"):
        tokens, logprobs = _reference_greedy(reference_model, prompt, placements[name[0]], NEW_TOKENS)
        output = batches[name][0]
        assert output["token_ids"] == tokens, name
        assert max(abs(a - b) for a, b in zip(output["logprobs"], logprobs, strict=True)) < 1e-4, name
    assert batches["a_again"][0]["num_cached_tokens"] > 0 and batches["b"][0]["num_cached_tokens"] == 0

# ---- vLLM's CPU GDN decode kernel (bfloat16 only) --------------------------------------------------
# The same checkpoint served in bfloat16: GDN decode steps run vLLM's fused kernel on the state pages.
# bfloat16 engines and the bfloat16 reference round differently, so greedy paths may part at near
# ties: each generated token is checked under the reference fed vLLM's own sequence (teacher
# forcing): its logprob matches, and it is (within tolerance) the reference's greedy choice.

BF16_TOLERANCE = 0.06  # measured: <= 0.03
BF16_PLACEMENTS = ["gdn*", "gdn,attention,kda", "sliding_window,gdn,gdn", "kda*"]


def _bf16_requests() -> list[dict]:
    prompts = _random_prompts([60, 33, 90, 47], seed=13)
    return [
        _request(prompt, placement, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True)
        for prompt, placement in zip(prompts, BF16_PLACEMENTS, strict=True)
    ]


@pytest.fixture(scope="module")
def bf16_engine_results(kernel_checkpoint, tmp_path_factory):
    scenario = {
        "model": str(kernel_checkpoint),
        "engine": {
            "dtype": "bfloat16",
            "gpu_memory_utilization": 0.3,
            "max_model_len": 512,
            "max_num_seqs": 8,
            "enforce_eager": True,
            "enable_prefix_caching": False,
        },
        "batches": [{"name": "mixed", "requests": _bf16_requests()}],
    }
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_bf16_engine"))


def test_gdn_decode_kernel_in_bf16_engine_follows_reference(kernel_checkpoint, bf16_engine_results):
    from fast_llm_supernet.model import SupernetForCausalLM

    reference_model = SupernetForCausalLM.from_pretrained(kernel_checkpoint, dtype=torch.bfloat16)
    for request, output in zip(_bf16_requests(), bf16_engine_results["batches"]["mixed"], strict=True):
        prompt, generated = request["prompt_token_ids"], output["token_ids"]
        assert len(generated) == NEW_TOKENS
        with torch.no_grad():
            logits = reference_model(torch.tensor([prompt + generated]), placement=request["placement"])[0]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        for i, token in enumerate(generated):
            step = logprobs[len(prompt) - 1 + i]
            assert abs(output["logprobs"][i] - step[token].item()) < BF16_TOLERANCE, request["placement"]
            assert step.max().item() - step[token].item() < BF16_TOLERANCE, request["placement"]


# ---- tensor parallelism: two ranks on the CPU build -----------------------------------------------
# The kernel checkpoint's head counts divide by 2 (attention 4 heads / 2 KV groups, GDN 2 key / 4
# value heads, KDA 4 heads, MLP 48). The same requests as the float32 kernel engine, served by two
# ranks (one core each) of a thinned deployment (KDA built in layer 0 only): the same greedy tokens,
# logprobs within float32 noise (the ranks' partial sums are added in another order), and each rank
# holds half of every mixer and of the MLP.

TP_ALLOWED = [*KERNEL_PLACEMENTS, "gdn*"]  # every mixer in layer 0; no KDA in layers 1 and 2

TP_LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def tp_engine_results(kernel_checkpoint, tmp_path_factory):
    scenario = {
        **_kernel_scenario(
            kernel_checkpoint, tensor_parallel_size=2, hf_overrides={"supernet_placements": TP_ALLOWED}
        ),
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per rank
        "rank_shapes": True,
    }
    return run_engine(scenario, tmp_path_factory.mktemp("vllm_tp_engine"))


def test_two_ranks_give_one_ranks_tokens(kernel_engine_results, tp_engine_results):
    one, two = kernel_engine_results["batches"], tp_engine_results["batches"]
    for name in one:
        for single, parallel in zip(one[name], two[name], strict=True):
            assert parallel["token_ids"] == single["token_ids"], name
            difference = max(abs(a - b) for a, b in zip(parallel["logprobs"], single["logprobs"], strict=True))
            assert difference < TP_LOGPROB_ATOL, name


def test_each_rank_holds_half_of_every_mixer(tp_engine_results):
    ranks = tp_engine_results["rank_shapes"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    rank = ranks[0]
    block = "model.decoder.blocks.0"
    mixers = f"{block}.mixer.mixers"
    linears, parameters, states = rank["linears"], rank["parameters"], rank["states"]
    # Attention: 4 query heads and 2 KV groups of 32 -> 2 and 1 per rank.
    assert linears[f"{mixers}.attention.qkv_proj"] == [64, (2 + 2 * 1) * 32]
    assert linears[f"{mixers}.attention.o_proj"] == [2 * 32, 64]
    assert states[f"{mixers}.attention"] == {"heads": 2, "kv_heads": 1}
    # GDN: Q|K|V|Z|beta|alpha of 2 key / 4 value heads -> 1 key / 2 value heads per rank.
    assert linears[f"{mixers}.gdn.in_proj"] == [64, 32 + 32 + 64 + 64 + 2 + 2]
    assert linears[f"{mixers}.gdn.out_proj"] == [64, 64]
    assert parameters[f"{mixers}.gdn.A_log"] == [2] and parameters[f"{mixers}.gdn.dt_bias"] == [2]
    assert parameters[f"{mixers}.gdn.convolution.weight"][0] == 32 + 32 + 64
    assert states[f"{mixers}.gdn"][0][0] == 128 and states[f"{mixers}.gdn"][1] == [2, 32, 32]
    # KDA: 4 heads of 32 -> 2 per rank; the rank-32 gate inputs are replicated.
    assert linears[f"{mixers}.kda.in_proj"] == [64, 3 * 64 + 2]
    assert linears[f"{mixers}.kda.low_rank_proj"] == [64, 2 * 32]
    assert linears[f"{mixers}.kda.f_b_proj"] == [32, 64]
    assert parameters[f"{mixers}.kda.dt_bias"] == [64] and parameters[f"{mixers}.kda.A_log"] == [2]
    assert states[f"{mixers}.kda"][0][0] == 3 * 64 and states[f"{mixers}.kda"][1] == [2, 32, 32]
    # Thinned: KDA is built where an allowed placement uses it only.
    assert "model.decoder.blocks.1.mixer.mixers.kda" not in states
    assert "model.decoder.blocks.1.mixer.mixers.gdn" in states
    # MLP: 48 intermediate channels -> 24 per rank.
    assert linears[f"{block}.mlp.gate_up_proj"] == [64, 2 * 24]
    assert linears[f"{block}.mlp.down_proj"] == [24, 64]
