"""Decode step time of one placement against vLLM's own model of its mixer, split by engine stage.

    .venv/bin/python benchmarks/bench_step_time.py --placement all-SWA --context 8192 --rounds 4

`bench_vllm.py` times whole batches through the engine's multiprocess client, where one sample moves by
10-30 % on a shared 2-core box. This one looks inside a step: every engine runs its engine core in its
own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one `vllm.LLM` per child process), and each decode step
(batch `--batch`, every request past its prefill) is timed whole and by stage, with wall clocks around
the scheduler's `schedule` / `update_from_output` and the model runner's `_update_states`,
`_prepare_inputs`, `_build_attention_metadata`, `_model_forward` and `sample_tokens` (vLLM 0.32's
names; a stage missing from another vLLM is reported as absent, never guessed). The stages say where
a difference comes from: the model's forward (the mixers, the linear layers) or the engine's per-step
bookkeeping, which grows with the number of KV-cache groups (an unthinned supernet has one per mixer
kind, a native model one).

Engines, all up at once: the supernet serving every mixer with the placement per request, the supernet
thinned to that placement (`hf_overrides={"supernet_placements": [...]}`), the native model
(`bench_vllm.NATIVE_FOR`) and, with `--supernet-block-sizes`, the unthinned supernet on other page sizes.
Each round, every engine prefills its batch; then they decode in turns of `--slice` steps (order reversed
every other turn), so that a swing of the shared box hits them alike. Same checkpoints as `bench_vllm.py`
(written to `--workdir` if missing). Results, in `--out` (`step_time_<placement>_<context>.{json,md}`):
medians over every timed decode step, and the paired ratio, the median over turns of the native model's
step over the engine's in the same turn (the figure to quote: pooled medians move by 10-50 % between runs
here, the paired ratio much less).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm import (  # noqa: E402
    LAYERS,
    NATIVE_FOR,
    PLACEMENTS,
    Shape,
    add_random_requests,
    build_engine,
    make_checkpoints,
    write_torchvision_stub,
)

from vllm_supernet.engine_process import EngineProcess, serve_engine  # noqa: E402

SCHEDULER_STAGES = ("schedule", "update_from_output")
# Untimed decode steps at the start of each turn: they pay for the CPU caches the other engines' turns evicted.
TURN_WARM_UP_STEPS = 2
RUNNER_STAGES = ("_update_states", "_prepare_inputs", "_build_attention_metadata", "_model_forward", "sample_tokens")


def _instrument(llm) -> dict[str, list[float]]:
    """Wall clocks around the engine's stages; returns stage -> seconds of each call since the last clear."""
    core = llm.llm_engine.engine_core.engine_core  # in-process client -> EngineCore
    runner = core.model_executor.driver_worker.worker.model_runner
    seconds: dict[str, list[float]] = {}
    for owner, names in ((core.scheduler, SCHEDULER_STAGES), (runner, RUNNER_STAGES)):
        for name in names:
            original = getattr(owner, name, None)
            if original is None:
                continue

            calls = seconds[name] = []

            def timed(*args, _original=original, _calls=calls, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    _calls.append(time.perf_counter() - start)

            setattr(owner, name, timed)
    return seconds


def _engine_worker(connection, model: str, options: dict, log_path: str, extra_env: dict) -> None:
    """Runs in its own process: one in-process `vllm.LLM`, answering three commands. "prefill": add `batch`
    random requests and step until every one is past its prefill; "decode": `TURN_WARM_UP_STEPS` untimed engine
    steps, then `steps` more, each timed whole and by stage; "drain": step until no request is left (untimed)."""
    rng, request_ids = random.Random(0), itertools.count()
    stages: dict[str, list[float]] = {}

    def build():
        nonlocal stages
        llm = build_engine(model, options, extra_env)
        stages = _instrument(llm)
        return llm

    def answer(llm, command: dict) -> dict:
        engine = llm.llm_engine
        if command["op"] == "prefill":
            add_random_requests(engine, [command["placement"]] * command["batch"], command["context"],
                                command["new_tokens"], rng, request_ids)  # fmt: skip
            generated: dict[str, int] = {}
            while len(generated) < command["batch"] or min(generated.values()) < 1:
                for output in engine.step():
                    generated[output.request_id] = len(output.outputs[0].token_ids)
            return {}
        if command["op"] == "drain":
            while engine.has_unfinished_requests():
                engine.step()
            return {}
        for _ in range(TURN_WARM_UP_STEPS):
            engine.step()
        steps: list[float] = []
        by_stage: dict[str, list[float]] = {name: [] for name in stages}
        for _ in range(command["steps"]):
            for calls in stages.values():
                calls.clear()
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
            for name, calls in stages.items():
                by_stage[name].append(sum(calls))
        return {"steps": steps, "stages": by_stage}

    serve_engine(connection, log_path, build, answer, extra_env)


class StepEngine(EngineProcess):
    def __init__(self, name: str, model: Path, options: dict, logdir: Path, extra_env: dict):
        log_path = logdir / f"step_time_{name}.log"
        super().__init__(name, _engine_worker, (str(model), options, str(log_path), extra_env), log_path, wait=False)


def run(args) -> dict:
    workdir = args.workdir
    logdir = workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    shape = Shape(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    checkpoints = make_checkpoints(workdir, args.window, args.layers, shape)
    placement = PLACEMENTS[args.placement]
    options = {"max_model_len": args.context + args.new_tokens + 16, "max_num_seqs": args.batch,
               "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}  # fmt: skip
    in_process = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    native_kind = NATIVE_FOR[args.placement]
    native_env = dict(in_process)
    if native_kind == "qwen3_5_gdn":  # its model file imports torchvision (see bench_vllm.py)
        stub = write_torchvision_stub(workdir / "torchvision_stub")
        native_env["PYTHONPATH"] = os.pathsep.join([str(stub), str(REPO), os.environ.get("PYTHONPATH", "")])
    engines = {
        "supernet": (StepEngine("supernet", checkpoints["supernet"], options, logdir, in_process), placement),
        "supernet thinned": (
            StepEngine("supernet_thinned", checkpoints["supernet"],
                       {**options, "hf_overrides": {"supernet_placements": [placement]}}, logdir, in_process),
            placement,
        ),  # fmt: skip
        native_kind: (StepEngine(native_kind, checkpoints[native_kind], options, logdir, native_env), None),
    }
    for block_size in args.supernet_block_sizes:  # the unthinned supernet again, on pages of a given size
        engines[f"supernet block {block_size}"] = (
            StepEngine(f"supernet_block_{block_size}", checkpoints["supernet"], {**options, "block_size": block_size},
                       logdir, in_process),
            placement,
        )  # fmt: skip
    for parts in args.supernet_state_parts:  # the unthinned supernet again, its states over a given number of pages
        engines[f"supernet {parts} pages per state"] = (
            StepEngine(f"supernet_parts_{parts}", checkpoints["supernet"],
                       {**options, "hf_overrides": {"supernet_state_parts": parts}}, logdir, in_process),
            placement,
        )  # fmt: skip
    samples: dict[str, dict] = {name: {"steps": [], "stages": {}, "paired": []} for name in engines}
    started = time.time()
    try:
        for engine, _ in engines.values():
            engine.wait_ready()
        names = list(engines)
        # Decode steps are timed in slices of `--slice` steps, engine after engine (order reversed every other
        # slice), so that the engines share the box's swings (20 % within seconds on a shared 2-core host);
        # each slice gives each engine a paired ratio against the native one.
        # The first token comes with the prefill; keep one spare.
        slices = (args.new_tokens - 2) // (args.slice + TURN_WARM_UP_STEPS)
        for round_index in tqdm(range(args.rounds + 1), desc=f"{args.placement} at {args.context}", file=sys.stdout):
            warm_up = round_index == 0
            for engine, engine_placement in engines.values():
                engine.request({"op": "prefill", "placement": engine_placement, "batch": args.batch,
                                "context": 32 if warm_up else args.context, "new_tokens": args.new_tokens})  # fmt: skip
            for slice_index in range(1 if warm_up else slices):
                slice_steps = {}
                for name in names if slice_index % 2 == 0 else names[::-1]:
                    result = engines[name][0].request({"op": "decode", "steps": args.slice})
                    slice_steps[name] = statistics.median(result["steps"])
                    if warm_up:
                        continue
                    samples[name]["steps"] += result["steps"]
                    for stage, values in result["stages"].items():
                        samples[name]["stages"].setdefault(stage, []).extend(values)
                if not warm_up:
                    for name in names:
                        samples[name]["paired"].append(slice_steps[native_kind] / slice_steps[name])
            for engine, _ in engines.values():
                engine.request({"op": "drain"})
    finally:
        for engine, _ in engines.values():
            engine.stop()
    return {
        "settings": {"placement": args.placement, "context": args.context, "batch": args.batch,
                     "new_tokens": args.new_tokens, "rounds": args.rounds, "slice": args.slice, "window": args.window,
                     "layers": args.layers},  # fmt: skip
        "native": native_kind,
        "median_ms": {
            name: {
                "step": 1000 * statistics.median(sample["steps"]),
                "steps_timed": len(sample["steps"]),
                "paired_ratio": statistics.median(sample["paired"]),
                **{stage: 1000 * statistics.median(values) for stage, values in sample["stages"].items()},
            }
            for name, sample in samples.items()
        },
        "wall_seconds": time.time() - started,
    }


def markdown(results: dict, command: str) -> str:
    medians = results["median_ms"]
    native = medians[results["native"]]
    stages = [stage for stage in (*SCHEDULER_STAGES, *RUNNER_STAGES) if stage in native]
    settings = results["settings"]
    lines = [
        f"Command: `{command}` ({results['wall_seconds'] / 60:.1f} min). vLLM CPU build, bf16, eager, engine core in "
        f"process; {settings['layers']} layers, batch {settings['batch']} at {settings['context']} tokens, {settings['new_tokens']} new tokens, "
        f"{settings['rounds']} rounds, engines taking turns every {settings['slice']} decode steps; medians over every "
        "decode step (ms); paired: the median over turns of the native step / the engine's step in the same turn.",
        "",
        "| engine | step | native step / step | paired | " + " | ".join(f"`{stage}`" for stage in stages) + " |",
        "|---|---|---|---|" + "---|" * len(stages),
    ]
    for name, median in medians.items():
        cells = " | ".join(f"{median.get(stage, float('nan')):.3f}" for stage in stages)
        lines.append(f"| {name} | {median['step']:.3f} | {native['step'] / median['step']:.2f}x | "
                     f"**{median['paired_ratio']:.2f}x** | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--placement", choices=sorted(NATIVE_FOR), default="all-SWA")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=272)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--slice", type=int, default=32, help="timed decode steps of an engine's turn")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--layers", type=int, default=LAYERS,
                        help="decoder layers of every checkpoint (the rest of bench_vllm's sizes stay)")  # fmt: skip
    parser.add_argument("--supernet-block-sizes", type=int, nargs="*", default=[],
                        help="also time the unthinned supernet with these attention page sizes (tokens); its "
                        "default page is the smallest step (attention.block_step) that holds a state page")  # fmt: skip
    parser.add_argument("--heads", type=int, default=Shape.heads,
                        help="attention heads, GDN value heads and KDA heads (the benchmark model's by default)")
    parser.add_argument("--kv-heads", type=int, default=Shape.kv_heads, help="attention KV heads and GDN key heads")
    parser.add_argument("--head-dim", type=int, default=Shape.head_dim, help="every mixer's head size")
    parser.add_argument("--supernet-state-parts", type=int, nargs="*", default=[],
                        help="also the unthinned supernet with each linear mixer's state over this many pages "
                             "(`supernet_state_parts`; the default picks them: vllm_supernet/footprint.py)")  # fmt: skip
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="cache budget per engine")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/supernet_bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "step_time")
    args = parser.parse_args(argv)
    if (args.new_tokens - 2) // (args.slice + TURN_WARM_UP_STEPS) < 1:
        parser.error(
            f"--new-tokens {args.new_tokens} leaves no turn of --slice {args.slice} timed decode steps (each turn "
            f"runs {TURN_WARM_UP_STEPS} untimed steps first); give at least {args.slice + TURN_WARM_UP_STEPS + 2}"
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the engines on the way out
    command = "python benchmarks/bench_step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_time_{args.placement}_{args.context}" + ("" if args.layers == LAYERS else f"_l{args.layers}")
    if (args.heads, args.kv_heads, args.head_dim) != (Shape.heads, Shape.kv_heads, Shape.head_dim):
        stem += f"_h{args.heads}_kv{args.kv_heads}_d{args.head_dim}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, command.strip())
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
