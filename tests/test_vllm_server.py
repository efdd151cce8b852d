"""The OpenAI-compatible vLLM server with the plugin, on loopback, through the `openai` client.

The server (`python -m vllm.entrypoints.openai.api_server`, the plugin installed and nothing else)
serves a copy of the upstream fixture with a tiny tokenizer and a presets file, thinned to three
presets with `--hf-overrides '{"supernet_placements": [...]}'`, and decodes with self-speculation
(`--speculative-config` custom_class `SelfSpeculator`, 3 drafts, the `local` preset drafting unless a
request names a `draft_placement`). Placement by list, compact string, preset name, `vllm_xargs` and
absence, with any draft, must give the PyTorch reference's greedy text (without speculation); invalid
placements and draft placements get HTTP 400 naming the problem, and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from tests.vllm_helpers import REPO, copy_fixture  # noqa: E402

pytestmark = pytest.mark.engine

PRESETS = {
    "default": "fast",
    "presets": {
        # Recorded quality / speed-up (as `supernet-place presets` writes them) for service-level requests.
        "fast": {"placement": ["gdn", "kda"], "description": "linear mixers only",
                 "metrics": {"quality": 0.80, "speedup": 3.0}},
        "quality": {"placement": "fa*", "description": "full attention", "metrics": {"quality": 1.0, "speedup": 1.0}},
        "local": {"placement": "swa*", "description": "sliding window", "metrics": {"quality": 0.95, "speedup": 1.8}},
    },
}
ALLOWED = ["fast", "quality", "local"]
DEPLOYMENT_DRAFT = "local"  # a preset name: sliding window in both layers
SPECULATIVE_CONFIG = {
    "method": "custom_class",
    "model": "vllm_supernet.speculative.SelfSpeculator",
    "num_speculative_tokens": 3,
}
PROMPT = "def main():"
MAX_TOKENS = 6
STARTUP_SECONDS = 600


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return copy_fixture(tmp_path_factory.mktemp("served") / "checkpoint", tokenizer=True, presets=PRESETS)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    from vllm_supernet.server_process import CPU_DEFAULT_ARGS, openai_server

    log_path = tmp_path_factory.mktemp("server_log") / "server.log"
    server_args = [
        *CPU_DEFAULT_ARGS, "--dtype", "float32",
        "--chat-template", str(checkpoint / "chat_template.jinja"),
        "--hf-overrides", json.dumps({"supernet_placements": ALLOWED, "supernet_draft_placement": DEPLOYMENT_DRAFT}),
        "--speculative-config", json.dumps(SPECULATIVE_CONFIG),
        "--no-enable-prefix-caching",  # vLLM 0.32 on CPU: no prefix caching for hybrid models that speculate
    ]  # fmt: skip
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with openai_server(
        checkpoint, log_path, server_args, served_model_name="supernet", startup_timeout=STARTUP_SECONDS, env=env
    ) as running:
        yield running.base_url, log_path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference_tokens(checkpoint):
    """Greedy continuation of PROMPT (token ids) by the PyTorch reference, per placement."""
    from transformers import AutoTokenizer

    from fast_llm_supernet.model import SupernetForCausalLM

    model = SupernetForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    cache = {}

    def text(placement) -> str:
        key = json.dumps(placement)
        if key not in cache:
            with torch.no_grad():
                sequence = model.generate(prompt, placement=placement, max_new_tokens=MAX_TOKENS, eos_token_id=2)[0]
            generated = sequence[prompt.shape[1] :].tolist()
            cache[key] = generated[: generated.index(2) + 1] if 2 in generated else generated
        return cache[key]

    return text


def _complete(client, extra_body=None) -> list[int]:
    """The generated token ids (the text of partial UTF-8 tokens is held back by the detokenizer)."""
    response = client.completions.create(
        model="supernet",
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={**(extra_body or {}), "return_token_ids": True},
    )
    return response.choices[0].token_ids


def test_presets_are_discoverable(server):
    with urllib.request.urlopen(f"{server[0]}/v1/supernet/presets") as response:
        listing = json.loads(response.read())
    assert set(listing["presets"]) == set(ALLOWED)
    assert listing["presets"]["fast"]["placement"] == "gdn,kda,attention"
    assert listing["default"]["placement"] == "gdn,kda,attention"
    assert len(listing["allowed"]) == 3


def test_presets_list_their_cache_footprint(server):
    """Bytes a request of each preset holds (float32, whole model): the plain third layer's attention grows with
    the context in every preset (3 KV heads of 16: 384 bytes a token); `quality` adds two FA layers, `fast` two
    linear states, each held 1 + 3 times (this deployment speculates 3 drafts: vLLM keeps a state per draft
    position), `local` two windows of 5 tokens."""
    with urllib.request.urlopen(f"{server[0]}/v1/supernet/presets") as response:
        presets = json.loads(response.read())["presets"]
    token = 2 * 3 * 16 * 4
    assert presets["quality"]["cache"] == {"cache_bytes_per_token": 3 * token, "fixed_cache_bytes": 0}
    assert presets["local"]["cache"] == {"cache_bytes_per_token": token, "fixed_cache_bytes": 2 * 5 * token}
    gdn_state = 6 * 16 * 16 * 4 + (2 * 3 * 16 + 6 * 16) * 3 * 4  # delta-rule state + conv state over Q|K|V
    kda_state = 6 * 16 * 16 * 4 + 3 * 6 * 16 * 3 * 4
    held = 1 + SPECULATIVE_CONFIG["num_speculative_tokens"]
    assert presets["fast"]["cache"] == {"cache_bytes_per_token": token, "fixed_cache_bytes": held * (gdn_state + kda_state)}


def _metrics(server) -> dict[tuple[str, str], float]:
    """This project's series on /metrics: (name, placement label) -> value."""
    with urllib.request.urlopen(f"{server[0]}/metrics") as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("vllm_supernet_"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            found[name, labels.removeprefix('placement="').removesuffix('"}')] = float(value)
    return found


def test_metrics_are_labelled_by_placement(server, client):
    before = _metrics(server)
    for preset in ("quality", "quality", "local"):
        _complete(client, {"placement": preset})
    after = _metrics(server)

    def added(name: str, label: str) -> float:
        return after[name, label] - before.get((name, label), 0.0)

    assert added("vllm_supernet_generation_tokens_total", "quality") == 2 * MAX_TOKENS
    assert added("vllm_supernet_generation_tokens_total", "local") == MAX_TOKENS
    prompt_tokens = added("vllm_supernet_prompt_tokens_total", "quality")
    assert prompt_tokens > 0 and added("vllm_supernet_prompt_tokens_total", "local") == prompt_tokens / 2
    for name in ("requests_running", "requests_waiting", "cache_pages", "cache_bytes"):  # all served by now
        assert after[f"vllm_supernet_{name}", "quality"] == 0


@pytest.mark.parametrize(
    ("extra", "expected_placement"),
    [
        ({"placement": ["fa", "fa"]}, ["fa", "fa"]),  # list
        ({"placement": "swa*"}, ["swa", "swa"]),  # compact string
        ({"placement": "gdn,kda"}, ["gdn", "kda"]),  # compact string, choice layers
        ({"placement": "quality"}, ["fa", "fa"]),  # preset
        ({"vllm_xargs": {"placement": "local"}}, ["swa", "swa"]),  # vllm_xargs
        ({}, ["gdn", "kda"]),  # absent: the presets file's default
    ],
)
def test_completion_placements_match_reference(client, reference_tokens, extra, expected_placement):
    assert _complete(client, extra) == reference_tokens(expected_placement)


def test_chat_completion_with_placement(client, reference_tokens):
    response = client.chat.completions.create(
        model="supernet",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"placement": "quality"},
    )
    assert isinstance(response.choices[0].message.content, str)


@pytest.mark.parametrize(
    ("placement", "message_parts"),
    [
        (["fa", "bogus"], ["layer 1", "'bogus'", "valid choices"]),  # unknown mixer
        ("fa**", ["bad run"]),  # malformed compact string
        (["fa", "fa", "fa", "fa", "fa"], ["5 entries", "3 layers"]),  # wrong length
        (["kda", "kda"], ["not served by this deployment", "allowed"]),  # thinned away
        (7, ["placement"]),  # wrong type
    ],
)
def test_invalid_placement_is_400_and_server_keeps_serving(client, reference_tokens, placement, message_parts):
    with pytest.raises(openai.BadRequestError) as raised:
        _complete(client, {"placement": placement})
    assert raised.value.status_code == 400
    message = str(raised.value)
    for part in message_parts:
        assert part in message, message
    assert _complete(client, {"placement": "fast"}) == reference_tokens(["gdn", "kda"])


def test_placement_is_logged(server, client):
    _complete(client, {"placement": "quality"})
    time.sleep(0.5)
    assert "placement fa*2,attention" in server[1].read_text()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_invalid_placement_in_a_stream_is_400_before_the_stream_starts(client, reference_tokens, endpoint):
    """Validated where the request is parsed: no HTTP 200 followed by an error event."""
    with pytest.raises(openai.BadRequestError) as raised:
        if endpoint == "completions":
            stream = client.completions.create(
                model="supernet", prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                extra_body={"placement": ["fa", "bogus"]},
            )  # fmt: skip
        else:
            stream = client.chat.completions.create(
                model="supernet", messages=[{"role": "user", "content": "hello"}], max_tokens=MAX_TOKENS,
                stream=True, extra_body={"vllm_xargs": {"placement": "not_a_preset"}},
            )  # fmt: skip
        list(stream)
    assert raised.value.status_code == 400
    assert "invalid placement" in str(raised.value)
    streamed = client.completions.create(
        model="supernet", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
        extra_body={"placement": "fast"},
    )  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)


@pytest.mark.parametrize(
    ("service_level", "preset", "placement"),
    [
        ({"min_quality": 0.9}, "local", "swa*"),  # the fastest preset at quality >= 0.9
        ({"min_quality": 0.99}, "quality", "fa*"),
        ({"min_speedup": 2.0}, "fast", ["gdn", "kda"]),  # the best quality at >= 2x
        ({"min_quality": 0.9, "min_speedup": 1.5}, "local", "swa*"),
    ],
)
def test_service_level_picks_a_preset_and_reports_it(client, reference_tokens, service_level, preset, placement):
    raw = client.completions.with_raw_response.create(
        model="supernet", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={**service_level, "return_token_ids": True},
    )  # fmt: skip
    assert raw.headers["x-supernet-preset"] == preset
    assert raw.headers["x-supernet-placement"] == _canonical(preset)
    assert raw.parse().choices[0].token_ids == reference_tokens(placement)


def _canonical(preset: str) -> str:
    return {"local": "swa*2,attention", "quality": "fa*2,attention", "fast": "gdn,kda,attention"}[preset]


def test_a_named_placement_is_reported_in_the_headers(client):
    raw = client.completions.with_raw_response.create(
        model="supernet", prompt=PROMPT, max_tokens=1, extra_body={"placement": "fast"}
    )
    assert raw.headers["x-supernet-placement"] == "gdn,kda,attention"
    assert "x-supernet-preset" not in raw.headers


@pytest.mark.parametrize(
    ("fields", "message_parts"),
    [
        ({"min_quality": 0.999, "min_speedup": 2.0}, ["no served preset meets", "best quality available: 'quality'",
                                                      "fastest: 'fast'"]),
        ({"min_quality": 1.5}, ["min_quality", "less than or equal to 1"]),
        ({"min_quality": 0.9, "placement": "fast"}, ["either `placement` or a service level"]),
    ],
)
def test_unmet_or_malformed_service_level_is_400(client, reference_tokens, fields, message_parts):
    with pytest.raises(openai.BadRequestError) as raised:
        _complete(client, fields)
    message = str(raised.value)
    for part in message_parts:
        assert part in message, message
    assert _complete(client, {"min_quality": 0.9}) == reference_tokens("swa*")


# ---- self-speculative decoding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "draft"),
    [("quality", "fast"), ("quality", None), ("fast", "quality"), ("fast", ["swa", "swa"]), ("local", "local")],
)
def test_draft_placement_per_request_keeps_the_targets_output(client, reference_tokens, target, draft):
    extra = {"placement": target} if draft is None else {"placement": target, "draft_placement": draft}
    assert _complete(client, extra) == reference_tokens(_canonical_list(target))


def test_chat_and_stream_with_a_draft_placement(client, reference_tokens):
    chat = client.chat.completions.create(
        model="supernet",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"placement": "quality", "draft_placement": "fast"},
    )
    plain = client.chat.completions.create(
        model="supernet",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"placement": "quality", "draft_placement": "quality"},  # accepted whole: the target's own
    )
    assert chat.choices[0].message.content == plain.choices[0].message.content
    stream = client.completions.create(
        model="supernet", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
        extra_body={"placement": "fast", "draft_placement": "local", "return_token_ids": True},
    )  # fmt: skip
    streamed = [token for chunk in stream for token in (chunk.choices[0].token_ids or [])]
    assert streamed == reference_tokens(["gdn", "kda"])


@pytest.mark.parametrize(
    ("draft", "message_parts"),
    [
        (["fa", "bogus"], ["draft_placement", "'bogus'", "valid choices"]),
        (["kda", "kda"], ["draft_placement", "not served by this deployment"]),
        ("nonexistent_preset", ["draft_placement"]),
    ],
)
def test_invalid_draft_placement_is_400_and_server_keeps_serving(client, reference_tokens, draft, message_parts):
    with pytest.raises(openai.BadRequestError) as raised:
        _complete(client, {"placement": "quality", "draft_placement": draft})
    assert raised.value.status_code == 400
    message = str(raised.value)
    for part in message_parts:
        assert part in message, message
    assert _complete(client, {"placement": "quality", "draft_placement": "fast"}) == reference_tokens("fa*")


def _canonical_list(preset: str):
    return {"quality": "fa*", "fast": ["gdn", "kda"], "local": "swa*"}[preset]
