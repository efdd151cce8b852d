"""Placement by load: under pressure the server gives the requests that allow it a cheaper preset.

A request that names a service level (`min_quality`, `min_speedup`) may run with any served preset that meets
it. Without a load policy the server picks from the presets' recorded figures alone (`PresetsFile.choose`: the
fastest meeting `min_quality`, the best meeting `min_speedup`), whatever the traffic. With one,

    --hf-overrides '{"supernet_load_policy": {"ttft_target_s": 2.0}}'

the API server keeps one *level* for the deployment: a step down the frontier of the served presets (those no
other beats on both recorded quality and speed-up, best quality first). At level 0 a request gets the
best-quality preset that meets its service level; at level L the best one no better than the frontier's L-th;
when its floor is above that, the cheapest one that meets the floor (a floor outranks the load). So at idle
every request gets the best its service level allows, and under load the ones whose floor allows it get faster
placements, from one deployment with no reload.

The level moves one step at a time, and at most once per `hold_s`, so that consecutive requests under a steady
load get the same preset (hysteresis, not flapping):

- **down** (cheaper) when the deployment is *busy*: some request has been waiting for its first token (queued or
  in prefill) for `max_prefill_busy` of the last `busy_window_s` or more (judged once the level has held that
  long), or `max_waiting` or more requests wait for their first token, or the oldest of them has waited
  `ttft_target_s` (when set), or the running requests hold `max_cache_use` of the cache pages or more;
- **up** (better) when it has been *calm* for `recover_s`: the better level would stay under 0.8 x
  `max_prefill_busy` (the busy share scaled by the two presets' recorded speed-up ratio), at most
  `max_waiting // 2` waiting, the oldest under half the target, and the cache under `max_cache_use` - 0.2 (the
  bands between busy and calm keep it still).

The busy share is the utilisation of the deployment's prefill: it rises with the arrival rate before a queue
forms (waits grow as share / (1 - share) prefills: 1.5 at 0.6), so the level moves before requests wait, and it
says whether the better level would keep up, so a lull between arrivals is no reason to step back up. The queue,
the wait and the cache are backstops for bursts faster than the window.

Those are what the frontend process sees now without asking the engine (`metrics.PlacementMetrics.load`):
the requests in flight and their first tokens (so the time to first token the queue already has, and when some
request was waiting), and each running request's pages from its placement's footprint
(`footprint.CacheFootprints`); the presets' recorded speed-ups order the steps. The choice is made where the request's placement is (`to_sampling_params`), comes
back in the response headers as any service-level choice does, and `/metrics` counts the choices per preset
(`vllm_supernet_load_choices_total{preset}`) and shows the level (`vllm_supernet_load_level`).

Offline `LLM.generate` is not served with it: a batch submitted at once has no arrival pattern to follow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared_spec import PlacementError, PresetsFile

HF_OVERRIDE_KEY = "supernet_load_policy"


class LoadPolicyConfig(BaseModel):
    """`supernet_load_policy` in `hf_overrides`: when the server steps to cheaper presets and back."""

    model_config = ConfigDict(extra="forbid")

    max_prefill_busy: float | None = Field(
        0.6, gt=0, le=1, description="Share of the last busy_window_s with a request waiting for its first token at which "
        "the server steps down (None: not a signal).",
    )
    busy_window_s: float = Field(10.0, gt=0, description="Seconds over which the prefill busy share is measured.")
    max_waiting: int = Field(4, ge=1, description="Requests waiting for their first token at which the server steps down.")
    ttft_target_s: float | None = Field(
        None, gt=0, description="Seconds the oldest waiting request may wait before the server steps down (None: not a signal)."
    )
    max_cache_use: float = Field(0.9, gt=0.2, le=1, description="Share of the cache pages held at which the server steps down.")
    hold_s: float = Field(2.0, ge=0, description="Least seconds between two level changes.")
    recover_s: float = Field(5.0, ge=0, description="Seconds of calm before the server steps back up.")

    @classmethod
    def from_hf_config(cls, hf_config) -> LoadPolicyConfig | None:
        """The deployment's policy, validated at start-up; None when it has none (today's behaviour)."""
        value = getattr(hf_config, HF_OVERRIDE_KEY, None)
        if value is None or value is False:
            return None
        try:
            return cls.model_validate({} if value is True else value)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())
            allowed = ", ".join(cls.model_fields)
            raise ValueError(f"{HF_OVERRIDE_KEY} {value!r}: {problems} (fields: {allowed})") from None


@dataclass(frozen=True)
class LoadSnapshot:
    """What the frontend sees of the deployment's load at one moment."""

    waiting: int = 0  # requests in flight that have no token yet
    oldest_waiting_s: float = 0.0  # how long the oldest of them has waited
    cache_use: float = 0.0  # share of the cache pages the running requests hold
    prefill_busy: float = 0.0  # share of the recent window during which some request waited for its first token


IDLE = LoadSnapshot()


class LoadPolicy:
    """The deployment's level on its presets' frontier, moved by what the load looks like at each admission."""

    def __init__(self, config: LoadPolicyConfig, presets: PresetsFile, served: list[str], clock=time.monotonic) -> None:
        self.config = config
        self.presets = presets
        self.frontier = presets.frontier(served)
        if len(self.frontier) < 2:
            raise ValueError(
                f"{HF_OVERRIDE_KEY} needs at least two served presets recording quality and speed-up, one faster "
                f"than the other, to step between; this deployment's frontier: {self.frontier or 'none'}"
            )
        self.clock = clock
        self.level = 0
        self.changed_at = -float("inf")
        self.calm_since: float | None = None
        self.choices: dict[str, int] = dict.fromkeys(self.frontier, 0)

    def choose(self, qualifying: list[str], load: LoadSnapshot) -> str:
        """The preset for a request that any of `qualifying` would serve (its service level met), under `load`."""
        self.observe(load)
        # Never empty: a qualifying preset off the frontier is beaten by one on it, which qualifies too.
        steps = [name for name in self.frontier if name in qualifying]
        ceiling = self.presets.quality(self.frontier[self.level])
        chosen = next((name for name in steps if self.presets.quality(name) <= ceiling), steps[-1])
        self.choices[chosen] = self.choices.get(chosen, 0) + 1
        return chosen

    def observe(self, load: LoadSnapshot) -> None:
        now = self.clock()
        config = self.config
        target = config.ttft_target_s
        held = now - self.changed_at
        max_busy = config.max_prefill_busy
        busy = (
            (max_busy is not None and held >= config.busy_window_s and load.prefill_busy >= max_busy)
            or load.waiting >= config.max_waiting
            or (target is not None and load.oldest_waiting_s >= target)
            or load.cache_use >= config.max_cache_use
        )
        calm = (
            (max_busy is None or self.level == 0 or load.prefill_busy * self.step_up_ratio() < 0.8 * max_busy)
            and load.waiting <= config.max_waiting // 2
            and (target is None or load.oldest_waiting_s < target / 2)
            and load.cache_use < config.max_cache_use - 0.2
        )
        self.calm_since = (self.calm_since if self.calm_since is not None else now) if calm else None
        if held < config.hold_s:
            return
        if busy and self.level < len(self.frontier) - 1:
            self.level += 1
        elif self.calm_since is not None and now - self.calm_since >= config.recover_s and self.level > 0:
            self.level -= 1
            self.calm_since = now  # each further step up waits for its own calm period
        else:
            return
        self.changed_at = now

    def step_up_ratio(self) -> float:
        """How much more prefill time the level above takes than this one: the ratio of their recorded speed-ups."""
        return self.presets.speedup(self.frontier[self.level]) / self.presets.speedup(self.frontier[self.level - 1])

    def collect(self):
        """prometheus_client collector: the level and the choices per preset."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        level = GaugeMetricFamily("vllm_supernet_load_level", "Steps down the presets' frontier the load policy is at "
                                  "(0: best quality)", value=self.level)  # fmt: skip
        choices = CounterMetricFamily("vllm_supernet_load_choices", "Presets the load policy chose, by preset",
                                      labels=["preset"])  # fmt: skip
        for name, count in self.choices.items():
            choices.add_metric([name], count)
        return [level, choices]


def load_policy_of(serving, hf_config) -> LoadPolicy | None:
    """The policy of a deployment (`placements.ServingPlacements`) and its HF config, or None; ValueError naming
    what is wrong when the config is bad or the deployment has no two presets to step between."""
    config = LoadPolicyConfig.from_hf_config(hf_config)
    if config is None:
        return None
    if not serving.served_presets:
        raise ValueError(f"{HF_OVERRIDE_KEY}: this deployment serves no presets (a policy steps between presets)")
    try:
        return LoadPolicy(config, serving.presets, list(serving.served_presets))
    except PlacementError as error:
        raise ValueError(f"{HF_OVERRIDE_KEY}: {error}") from None
