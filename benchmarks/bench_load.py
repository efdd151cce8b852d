"""Placement by load under a load ramp: the OpenAI server with `supernet_load_policy` against each fixed preset.

    .venv/bin/python benchmarks/bench_load.py                # ~20 min on 2 idle cores
    .venv/bin/python benchmarks/bench_load.py --quick        # a few minutes: short steps, short requests

One supernet checkpoint (the benchmark model of bench_vllm.py, random weights, bf16) with three presets. Their
quality figures are not measurable on random weights: the benchmark gives them the held-out top-1 agreement the
distilled SmolLM2-135M supernet records for the same placements (README, "A real teacher": all-attention 1.000,
all-SWA 0.758, all-GDN 0.556); their speed-ups are measured here, first, on the idle server: all-attention's
latency of one request of the workload (prompt and new tokens) over the preset's (not the decode-only speed-up
`supernet-place presets` records: this workload is mostly prompt). The policy reads only those recorded figures.

Then a Poisson arrival rate is stepped up and down (`--rates`, requests/s, each step `--step-seconds` long, one
seed for every policy) against the server, each request streamed through the `openai` client: a fixed preset
by name (`placement`), or for the adaptive policy a service level (`min_quality`: half the requests 0.5, half
0.75). Per step of the ramp and policy: p50/p99 time to first token (TTFT) and time per output token after it
(TPOT), tokens/s (prompt tokens counted when the first token comes, new ones spread over the stream; all
requests, whenever sent), mean requests waiting for their first token, the mean recorded quality served, and
requests served below their floor. The idle TTFT of each preset is the median over `--idle-requests` sequential requests.
Fixed presets run on a server without the policy; the adaptive ramp on one started with it (same checkpoint).
Writes benchmarks/results/load/{load.json, load.md, load.png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_vllm import VOCAB, make_supernet  # noqa: E402

from vllm_supernet.server_process import openai_server  # noqa: E402

# Preset -> (placement, recorded quality: the SmolLM2 supernet's held-out top-1 for that placement).
PRESETS = {
    "attention": ("attention*", 1.000),
    "window": ("sliding_window*", 0.758),
    "gdn": ("gdn*", 0.556),
}
FLOORS = (0.5, 0.75)  # adaptive requests' min_quality, alternating
ADAPTIVE = "adaptive"


@dataclass
class Sample:
    """One request as the client saw it."""

    sent: float  # seconds since the ramp began
    step: int
    floor: float | None
    ttft: float | None = None
    tpot: float | None = None
    done: float | None = None
    tokens: int = 0
    preset: str = ""
    error: str = ""


@dataclass
class StepResult:
    rate: float
    requests: int
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    tokens_per_s: float
    waiting_mean: float
    quality_mean: float
    below_floor: int
    errors: int
    presets: dict[str, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client, sample: Sample, prompt: list[int], max_tokens: int, fields: dict, t0: float) -> None:
    start = time.monotonic()
    try:
        async with client.completions.with_streaming_response.create(
            model="supernet", prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            extra_body={**fields, "ignore_eos": True},
        ) as response:  # fmt: skip
            sample.preset = response.headers.get("x-supernet-preset", fields.get("placement", ""))
            first = None
            async for chunk in await response.parse():
                if not chunk.choices:
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                    sample.ttft = first - start  # now: the ramp counts requests still waiting for this
                sample.tokens += 1
        end = time.monotonic()
        sample.tpot = (end - first) / max(sample.tokens - 1, 1)
        sample.done = end - t0
    except Exception as error:  # noqa: BLE001 - a failed request is counted, the ramp goes on
        sample.error = f"{type(error).__name__}: {error}"


async def run_ramp(base_url: str, policy: str, rates: list[float], step_seconds: float, prompt_tokens: int,
                   max_tokens: int, seed: int) -> tuple[list[Sample], list[list[int]]]:  # fmt: skip
    """Requests at Poisson times through the ramp; also, per step, how many were waiting for a first token."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=3600)
    rng = random.Random(seed)
    samples: list[Sample] = []
    waiting: list[list[int]] = [[] for _ in rates]
    tasks = []
    t0 = time.monotonic()
    arrival = 0.0
    progress = tqdm(total=len(rates), desc=f"ramp {policy}", unit="step", leave=False)
    for step, rate in enumerate(rates):
        step_end = (step + 1) * step_seconds
        while True:
            arrival += rng.expovariate(rate)
            if arrival >= step_end:
                arrival = step_end
                break
            while (now := time.monotonic() - t0) < arrival:
                waiting[step].append(sum(1 for s in samples if s.ttft is None and not s.error))
                await asyncio.sleep(min(0.25, arrival - now))
            floor = FLOORS[len(samples) % len(FLOORS)] if policy == ADAPTIVE else None
            fields = {"min_quality": floor} if policy == ADAPTIVE else {"placement": policy}
            prompt = [rng.randrange(3, VOCAB) for _ in range(prompt_tokens)]
            sample = Sample(sent=arrival, step=step, floor=floor)
            samples.append(sample)
            tasks.append(asyncio.create_task(one_request(client, sample, prompt, max_tokens, fields, t0)))
        while time.monotonic() - t0 < step_end:
            waiting[step].append(sum(1 for s in samples if s.ttft is None and not s.error))
            await asyncio.sleep(0.25)
        progress.update()
    progress.close()
    await asyncio.gather(*tasks)
    await client.close()
    return samples, waiting


def summarise(samples: list[Sample], waiting: list[list[int]], rates: list[float], step_seconds: float,
              quality: dict[str, float], prompt_tokens: int) -> list[StepResult]:  # fmt: skip
    steps = []
    for step, rate in enumerate(rates):
        mine = [s for s in samples if s.step == step]
        served = [s for s in mine if not s.error]
        presets: dict[str, int] = {}
        for s in served:
            presets[s.preset] = presets.get(s.preset, 0) + 1
        start, end = step * step_seconds, (step + 1) * step_seconds
        tokens = 0.0
        for s in (s for s in samples if not s.error):
            first = s.sent + s.ttft
            tokens += prompt_tokens if start <= first < end else 0
            if s.tokens > 1:  # new tokens, spread evenly over the stream
                overlap = max(0.0, min(end, s.done) - max(start, first))
                tokens += s.tokens * overlap / max(s.done - first, 1e-9)
        steps.append(StepResult(
            rate=rate, requests=len(mine),
            ttft_p50=percentile([s.ttft for s in served], 0.5), ttft_p99=percentile([s.ttft for s in served], 0.99),
            tpot_p50=percentile([s.tpot for s in served], 0.5), tpot_p99=percentile([s.tpot for s in served], 0.99),
            tokens_per_s=tokens / step_seconds,
            waiting_mean=statistics.fmean(waiting[step]) if waiting[step] else 0.0,
            quality_mean=statistics.fmean(quality[s.preset] for s in served) if served else float("nan"),
            below_floor=sum(1 for s in served if s.floor is not None and quality[s.preset] < s.floor),
            errors=len(mine) - len(served), presets=presets,
        ))  # fmt: skip
    return steps


async def idle_figures(base_url: str, prompt_tokens: int, max_tokens: int, count: int, seed: int) -> dict[str, dict]:
    """Per preset on the idle server: median TTFT and decode tokens/s of sequential requests (after a warm-up)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=3600)
    rng = random.Random(seed)
    figures = {}
    for name in tqdm(PRESETS, desc="idle requests", unit="preset", leave=False):
        samples = []
        for index in range(count + 1):
            sample = Sample(sent=0.0, step=0, floor=None)
            prompt = [rng.randrange(3, VOCAB) for _ in range(prompt_tokens)]
            await one_request(client, sample, prompt, max_tokens, {"placement": name}, time.monotonic())
            if sample.error:
                raise RuntimeError(f"idle request with preset {name}: {sample.error}")
            if index:  # the first one warms the placement up
                samples.append(sample)
        figures[name] = {
            "ttft": statistics.median(s.ttft for s in samples),
            "latency": statistics.median(s.ttft + s.tpot * (s.tokens - 1) for s in samples),
            "decode_tokens_per_s": 1 / statistics.median(s.tpot for s in samples),
        }
    await client.close()
    return figures


def write_checkpoint(directory: Path, window: int, speedups: dict[str, float] | None) -> Path:
    if not (directory / "config.json").exists():
        make_supernet(directory, window)
    presets = {
        name: {"placement": placement, "description": f"{placement} (quality: SmolLM2 supernet's top-1 for it)",
               "metrics": {"quality": quality, **({"speedup": speedups[name]} if speedups else {})}}
        for name, (placement, quality) in PRESETS.items()
    }  # fmt: skip
    (directory / "supernet_presets.json").write_text(json.dumps({"presets": presets}, indent=2) + "\n")
    return directory


def server_args(args, policy: dict | None) -> list[str]:
    overrides = {"supernet_load_policy": policy} if policy is not None else {}
    return [
        "--dtype", "bfloat16", "--enforce-eager", "--skip-tokenizer-init",
        "--max-model-len", str(args.prompt + args.new_tokens),
        "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory-bytes", str(args.budget_mib << 20),
        "--hf-overrides", json.dumps(overrides),
    ]  # fmt: skip


def markdown(results: dict) -> str:
    lines = [
        f"Benchmark model (bench_vllm.py sizes, window {results['window']}, bf16), {results['prompt']} prompt tokens + "
        f"{results['new_tokens']} new per request, Poisson arrivals stepped through {results['rates']} requests/s, "
        f"{results['step_seconds']:.0f} s a step; max {results['max_num_seqs']} running, {results['budget_mib']} MiB "
        f"of KV cache. Adaptive: `supernet_load_policy` {json.dumps(results['policy'])}, floors {list(FLOORS)} "
        "alternating.",
        "",
        "Idle (sequential requests): "
        + "; ".join(f"{name} TTFT {f['ttft'] * 1000:.0f} ms, request {f['latency']:.2f} s (decode "
                    f"{f['decode_tokens_per_s']:.0f} tok/s), speed-up {results['speedups'][name]:.2f}x"
                    for name, f in results["idle"].items()),  # fmt: skip
        "",
        "| policy | rate (req/s) | requests | TTFT p50 / p99 (s) | TTFT p99 / best preset's idle | TPOT p50 / p99 (ms) "
        "| tokens/s | waiting | quality served | below floor | presets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    best_idle = results["idle"][next(iter(PRESETS))]["ttft"]
    for policy, steps in results["ramps"].items():
        for step in steps:
            lines.append(
                f"| {policy} | {step['rate']:.2f} | {step['requests']} | {step['ttft_p50']:.2f} / {step['ttft_p99']:.2f} "
                f"| {step['ttft_p99'] / best_idle:.1f}x | {step['tpot_p50'] * 1000:.0f} / {step['tpot_p99'] * 1000:.0f} "
                f"| {step['tokens_per_s']:.0f} | {step['waiting_mean']:.1f} | {step['quality_mean']:.3f} "
                f"| {step['below_floor']} | {', '.join(f'{k} {v}' for k, v in sorted(step['presets'].items()))} |"
            )
    verdict = results.get("verdict")
    if verdict:
        lines += ["", verdict]
    lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def verdict(results: dict) -> str:
    """The issue's test: at the first step where the best fixed preset's p99 TTFT is >= 5x its idle value, the
    adaptive policy's p99 over the same idle value; then the same at every later step where it is >= 5x."""
    best = next(iter(PRESETS))
    idle = results["idle"][best]["ttft"]
    fixed, adaptive = results["ramps"].get(best, []), results["ramps"].get(ADAPTIVE, [])
    overloaded = [index for index, step in enumerate(fixed) if step["ttft_p99"] >= 5 * idle and index < len(adaptive)]
    if not overloaded:
        return f"`{best}`'s p99 TTFT never reached 5x its idle value on this ramp."
    first = overloaded[0]
    later = ", ".join(f"{fixed[i]['rate']:.2f} req/s {fixed[i]['ttft_p99'] / idle:.1f}x vs {adaptive[i]['ttft_p99'] / idle:.1f}x"
                      for i in overloaded[1:])  # fmt: skip
    return (f"At the first step where `{best}`'s p99 TTFT is {fixed[first]['ttft_p99'] / idle:.1f}x its idle value "
            f"({fixed[first]['rate']:.2f} req/s), the adaptive policy's is {adaptive[first]['ttft_p99'] / idle:.1f}x"
            + (f" (later steps where it is >= 5x, `{best}` vs adaptive: {later})" if later else "")
            + f"; adaptive at idle (first step) served {adaptive[0]['presets']}; requests below their floor, whole "
            f"ramp: {sum(s['below_floor'] for s in adaptive)}.")  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_quality) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    steps = range(len(results["rates"]))
    for policy, ramp in results["ramps"].items():
        style = {"linewidth": 2.5, "color": "black"} if policy == ADAPTIVE else {"linestyle": "--"}
        ax_ttft.plot(steps, [s["ttft_p99"] for s in ramp], marker="o", label=f"{policy} p99", **style)
        ax_quality.plot(steps, [s["quality_mean"] for s in ramp], marker="o", label=policy, **style)
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("time to first token, p99 (s)")
    ax_ttft.legend(fontsize=8)
    ax_quality.set_ylabel("mean recorded quality served")
    ax_quality.set_xticks(list(steps), [f"{r:g}" for r in results["rates"]])
    ax_quality.set_xlabel("arrival rate of the ramp step (requests/s)")
    ax_quality.legend(fontsize=8)
    fig.suptitle("Load ramp: fixed presets against the load policy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short steps and requests (a smoke run)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--step-seconds", type=float, default=30.0)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--idle-requests", type=int, default=3)
    parser.add_argument("--policy", type=json.loads, default=None,
                        help="supernet_load_policy JSON (default: the policy's defaults, ttft_target_s 1.5x the best "
                             "preset's idle TTFT)")
    parser.add_argument("--speedups", type=json.loads, default=None,
                        help='recorded speed-ups to give the presets instead of the idle measurement, JSON '
                             '{"attention": 1, "window": 1.6, "gdn": 1.3} (for requests too short to tell them apart)')
    parser.add_argument("--policies", nargs="+", default=[*PRESETS, ADAPTIVE], help="ramps to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_load")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.step_seconds, args.prompt, args.new_tokens, args.idle_requests = [0.5, 2.0, 0.5], 8.0, 256, 8, 1
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    checkpoint = args.work / "checkpoint"
    quality = {name: q for name, (_, q) in PRESETS.items()}
    results: dict = {
        "command": " ".join([".venv/bin/python benchmarks/bench_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "window": args.window, "prompt": args.prompt, "new_tokens": args.new_tokens, "rates": args.rates,
        "step_seconds": args.step_seconds, "max_num_seqs": args.max_num_seqs, "budget_mib": args.budget_mib,
        "ramps": {},
    }  # fmt: skip

    def ramp(base_url: str, policy: str) -> None:
        samples, waiting = asyncio.run(
            run_ramp(base_url, policy, args.rates, args.step_seconds, args.prompt, args.new_tokens, args.seed)
        )
        steps = summarise(samples, waiting, args.rates, args.step_seconds, quality, args.prompt)
        results["ramps"][policy] = [asdict(step) for step in steps]

    write_checkpoint(checkpoint, args.window, speedups=None)
    with openai_server(checkpoint, args.work / "server_fixed.log", server_args(args, None), served_model_name="supernet",
                       env=env) as server:  # fmt: skip
        results["idle"] = asyncio.run(idle_figures(server.base_url, args.prompt, args.new_tokens, args.idle_requests,
                                                   args.seed))  # fmt: skip
        base = results["idle"][next(iter(PRESETS))]["latency"]
        results["speedups"] = args.speedups or {name: base / f["latency"] for name, f in results["idle"].items()}
        for policy in [p for p in args.policies if p in PRESETS]:
            ramp(server.base_url, policy)
    if ADAPTIVE in args.policies:
        best_idle = results["idle"][next(iter(PRESETS))]["ttft"]
        results["policy"] = args.policy or {"ttft_target_s": round(1.5 * best_idle, 3)}
        write_checkpoint(checkpoint, args.window, speedups=results["speedups"])
        with openai_server(checkpoint, args.work / "server_adaptive.log", server_args(args, results["policy"]),
                           served_model_name="supernet", env=env) as server:  # fmt: skip
            ramp(server.base_url, ADAPTIVE)
    results.setdefault("policy", args.policy)
    results["verdict"] = verdict(results)
    (args.out / "load.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "load.md").write_text(markdown(results))
    plot(results, args.out / "load.png")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
