"""`vllm_supernet.load_policy`: placement by load. The policy's choice under stated loads (a fake clock, no
engine), the load the frontend sees (`metrics.PlacementMetrics.load`), and the whole thing through the OpenAI
server with the `openai` client: idle gives the best preset a floor allows, a queue gives cheaper ones, never
below the floor, `/metrics` counts the choices, an unmet floor is still a 400."""

from __future__ import annotations

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared_spec import Apriel2TextConfig, PresetsFile, SupernetSpec
from tests.vllm_helpers import FIXTURE_CHECKPOINT
from vllm_supernet.load_policy import IDLE, LoadPolicy, LoadPolicyConfig, LoadSnapshot, load_policy_of
from vllm_supernet.placements import ServingPlacements

PRESETS = {
    "presets": {
        "quality": {"placement": "fa*", "metrics": {"quality": 1.0, "speedup": 1.0}},
        "local": {"placement": "swa*", "metrics": {"quality": 0.95, "speedup": 1.8}},
        "fast": {"placement": "gdn,kda", "metrics": {"quality": 0.80, "speedup": 3.0}},
        "worse": {"placement": "kda*", "metrics": {"quality": 0.85, "speedup": 1.5}},  # beaten by "local" on both
    },
}
BUSY = LoadSnapshot(waiting=4)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_policy(clock, **config) -> LoadPolicy:
    presets = PresetsFile.model_validate(PRESETS)
    return LoadPolicy(LoadPolicyConfig(**config), presets, list(presets.presets), clock=clock)


def qualifying(min_quality: float) -> list[str]:
    return PresetsFile.model_validate(PRESETS).qualifying(list(PRESETS["presets"]), min_quality, None)


def test_the_steps_are_the_presets_frontier_best_quality_first(clock):
    assert make_policy(clock).frontier == ["quality", "local", "fast"]


def test_idle_serves_the_best_preset_each_floor_allows(clock):
    policy = make_policy(clock)
    for _ in range(5):
        assert policy.choose(qualifying(0.5), IDLE) == "quality"
        assert policy.choose(qualifying(0.9), IDLE) == "quality"
    assert policy.level == 0


def test_a_queue_steps_down_once_per_hold_and_never_below_a_floor(clock):
    policy = make_policy(clock, hold_s=2.0)
    assert policy.choose(qualifying(0.5), BUSY) == "local"  # the first busy admission steps down
    clock.now += 1.0  # within hold_s: no second step, whatever the queue
    assert [policy.choose(qualifying(0.5), BUSY) for _ in range(10)] == ["local"] * 10
    clock.now += 1.5
    assert policy.choose(qualifying(0.5), BUSY) == "fast"
    assert policy.choose(qualifying(0.9), BUSY) == "local"  # its floor: the cheapest preset that meets it
    assert policy.choose(qualifying(0.99), BUSY) == "quality"
    clock.now += 10
    policy.choose(qualifying(0.5), BUSY)
    assert policy.level == 2  # the bottom of the frontier: stays there
    assert policy.choices == {"quality": 1, "local": 12, "fast": 2}


def test_each_signal_makes_the_deployment_busy(clock):
    signals = [LoadSnapshot(waiting=3), LoadSnapshot(oldest_waiting_s=1.5), LoadSnapshot(cache_use=0.8)]
    for snapshot in signals:
        policy = make_policy(clock, max_waiting=3, ttft_target_s=1.5, max_cache_use=0.8)
        assert policy.choose(qualifying(0.5), snapshot) == "local", snapshot
    quiet = LoadSnapshot(waiting=2, oldest_waiting_s=1.4, cache_use=0.79)
    policy = make_policy(clock, max_waiting=3, ttft_target_s=1.5, max_cache_use=0.8)
    assert policy.choose(qualifying(0.5), quiet) == "quality"
    assert make_policy(clock).choose(qualifying(0.5), LoadSnapshot(oldest_waiting_s=9)) == "quality"  # no target set


def test_steps_back_up_after_calm_and_holds_in_between(clock):
    policy = make_policy(clock, hold_s=1.0, recover_s=5.0, max_waiting=4)
    policy.choose(qualifying(0.5), BUSY)
    clock.now += 1
    policy.choose(qualifying(0.5), BUSY)
    assert policy.level == 2
    between = LoadSnapshot(waiting=3)  # neither busy nor calm: the level stays, however long
    for _ in range(20):
        clock.now += 1
        assert policy.choose(qualifying(0.5), between) == "fast"
    calm = LoadSnapshot(waiting=1)
    assert policy.choose(qualifying(0.5), calm) == "fast"  # calm has only begun
    clock.now += 5
    assert policy.choose(qualifying(0.5), calm) == "local"  # one step per calm period
    clock.now += 4
    assert policy.choose(qualifying(0.5), calm) == "local"
    clock.now += 1
    assert policy.choose(qualifying(0.5), IDLE) == "quality"


def test_prefill_busy_share_steps_down_once_the_level_has_held_a_window(clock):
    policy = make_policy(clock, max_prefill_busy=0.6, busy_window_s=10.0, hold_s=1.0)
    assert policy.choose(qualifying(0.5), LoadSnapshot(prefill_busy=0.59)) == "quality"
    assert policy.choose(qualifying(0.5), LoadSnapshot(prefill_busy=0.6)) == "local"
    clock.now += 5  # the share still holds the time at the level above: not judged yet
    assert policy.choose(qualifying(0.5), LoadSnapshot(prefill_busy=0.9)) == "local"
    clock.now += 5
    assert policy.choose(qualifying(0.5), LoadSnapshot(prefill_busy=0.9)) == "fast"
    assert make_policy(clock, max_prefill_busy=None).choose(qualifying(0.5), LoadSnapshot(prefill_busy=1.0)) == "quality"


def test_steps_up_only_when_the_better_level_would_keep_up(clock):
    policy = make_policy(clock, max_prefill_busy=0.6, hold_s=1.0, recover_s=5.0)
    policy.choose(qualifying(0.5), BUSY)
    assert policy.level == 1  # "local", recorded 1.8x the speed-up of "quality"
    # 0.3 busy at "local" is 0.54 at "quality": above 0.8 x 0.6, so a lull in the queue is no reason to go back.
    for _ in range(20):
        clock.now += 1
        assert policy.choose(qualifying(0.5), LoadSnapshot(prefill_busy=0.3)) == "local"
    lighter = LoadSnapshot(prefill_busy=0.25)  # 0.45 at "quality"
    assert policy.choose(qualifying(0.5), lighter) == "local"
    clock.now += 5
    assert policy.choose(qualifying(0.5), lighter) == "quality"


def test_bad_configs_fail_naming_the_field_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"supernet_load_policy .*max_waiting: Input should be greater than or equal to 1"
                                         r".*fields: max_prefill_busy, busy_window_s, max_waiting"):
        LoadPolicyConfig.from_hf_config(type("Config", (), {"supernet_load_policy": {"max_waiting": 0}}))
    with pytest.raises(ValueError, match=r"hold: Extra inputs are not permitted"):
        LoadPolicyConfig.from_hf_config(type("Config", (), {"supernet_load_policy": {"hold": 3}}))
    assert LoadPolicyConfig.from_hf_config(type("Config", (), {})) is None
    assert LoadPolicyConfig.from_hf_config(type("Config", (), {"supernet_load_policy": {}})) == LoadPolicyConfig()

    spec = SupernetSpec.from_config(Apriel2TextConfig.from_file(FIXTURE_CHECKPOINT))
    presets = PresetsFile.model_validate(PRESETS)
    on = type("Config", (), {"supernet_load_policy": {}})
    with pytest.raises(ValueError, match="at least two served presets .* frontier: \\['local'\\]"):
        load_policy_of(ServingPlacements(spec, presets, allowed=["local", "worse"]), on)
    with pytest.raises(ValueError, match="serves no presets"):
        load_policy_of(ServingPlacements(spec), on)
    assert load_policy_of(ServingPlacements(spec, presets), on).frontier == ["quality", "local", "fast"]


def test_resolve_request_takes_the_policys_choice_among_qualifying_presets(clock):
    spec = SupernetSpec.from_config(Apriel2TextConfig.from_file(FIXTURE_CHECKPOINT))
    serving = ServingPlacements(spec, PresetsFile.model_validate(PRESETS))
    policy = make_policy(clock)
    placement, preset = serving.resolve_request({"min_quality": 0.5}, lambda names: policy.choose(names, BUSY))
    assert (preset, placement) == ("local", serving.resolve("local"))
    assert serving.resolve_request({"min_quality": 0.5}) == (serving.resolve("fast"), "fast")  # no policy: today's


def test_the_frontend_sees_waiting_requests_and_cache_use(clock):
    from vllm_supernet.metrics import PlacementMetrics

    spec = SupernetSpec.from_config(Apriel2TextConfig.from_file(FIXTURE_CHECKPOINT))
    serving = ServingPlacements(spec, PresetsFile.model_validate(PRESETS))

    class Footprints:
        block_bytes = 1

        def pages(self, placement, num_tokens):
            return num_tokens // 10

    class Output:
        def __init__(self, request_id, new_token_ids):
            self.request_id, self.new_token_ids, self.finish_reason, self.events = request_id, new_token_ids, None, None

    metrics = PlacementMetrics(serving, Footprints(), num_pages=100, clock=clock)
    assert metrics.load() == IDLE
    metrics.add("a", serving.resolve("fast"), 300)
    clock.now += 2
    metrics.add("b", serving.resolve("quality"), 100)
    clock.now += 1
    assert metrics.load() == LoadSnapshot(waiting=2, oldest_waiting_s=3.0, cache_use=0.0, prefill_busy=0.3)
    metrics.update(Output("a", [5]))  # its first token: running, 301 tokens held
    assert metrics.load() == LoadSnapshot(waiting=1, oldest_waiting_s=1.0, cache_use=0.30, prefill_busy=0.3)
    clock.now += 1
    metrics.update(Output("b", [7]))  # nobody waits from t = 104: busy for 4 s
    clock.now += 5
    assert metrics.load().prefill_busy == pytest.approx(0.4)  # [99, 109]: 4 s busy
    assert metrics.load(busy_window_s=5).prefill_busy == 0.0
    clock.now += 1
    metrics.add("c", serving.resolve("fast"), 100)
    clock.now += 2
    metrics.finish(["c"])  # aborted before its first token
    assert metrics.load().prefill_busy == pytest.approx(0.4)  # [102, 112]: 2 s of the first interval, 2 s of c's


# ---- through the OpenAI server -----------------------------------------------------------------------


@pytest.mark.engine
def test_server_steps_down_under_a_queue_and_back_at_idle(tmp_path):
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    from tests.vllm_helpers import REPO, copy_fixture
    from vllm_supernet.server_process import CPU_DEFAULT_ARGS, openai_server

    presets = {name: PRESETS["presets"][name] for name in ("quality", "local", "fast")}
    checkpoint = copy_fixture(tmp_path / "checkpoint", tokenizer=True, presets={"presets": presets})
    # The queue signals only: the burst's prefill busy share would (rightly) hold the level down for a window.
    policy = {"max_waiting": 2, "hold_s": 0, "recover_s": 0, "max_prefill_busy": None}
    server_args = [*CPU_DEFAULT_ARGS, "--hf-overrides", json.dumps({"supernet_load_policy": policy})]
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with openai_server(checkpoint, tmp_path / "server.log", server_args, served_model_name="supernet", env=env) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0)

        def complete(min_quality: float, max_tokens: int = 4, **service_level) -> str:
            raw = client.completions.with_raw_response.create(
                model="supernet", prompt="def main():" * 20, max_tokens=max_tokens, temperature=0.0,
                extra_body={"min_quality": min_quality, **service_level},
            )  # fmt: skip
            return raw.headers["x-supernet-preset"]

        assert complete(0.5) == "quality"  # idle: the best preset
        with ThreadPoolExecutor(12) as pool:  # a burst: later admissions see earlier ones waiting
            burst = list(pool.map(complete, [0.5] * 8 + [0.9] * 4, [64] * 12))
        assert set(burst[:8]) - {"quality"}, burst  # some got a cheaper preset
        assert set(burst[8:]) <= {"quality", "local"}, burst  # never below a floor of 0.9
        assert complete(0.5) in {"quality", "local"}  # idle again: back up one step per admission
        assert complete(0.5) == "quality"

        with urllib.request.urlopen(f"{server.base_url}/metrics") as response:
            text = response.read().decode()
        chosen = {
            line.split('preset="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("vllm_supernet_load_choices_total")
        }
        assert sum(chosen.values()) == 15 and chosen["quality"] >= 2, chosen
        assert "vllm_supernet_load_level 0.0" in text

        with pytest.raises(openai.BadRequestError, match="no served preset meets min_quality 0.9 and min_speedup 2.0"):
            complete(0.9, min_speedup=2.0)
        assert complete(0.5) == "quality"  # and the server keeps serving
