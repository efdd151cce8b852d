"""Decode throughput with two tensor-parallel ranks against one, for the supernet and vLLM's own Llama.

    .venv/bin/python benchmarks/bench_tensor_parallel.py              # ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_tensor_parallel.py --reps 1 --contexts 512

Same checkpoints, timing and engine machinery as `bench_vllm.py` (bf16, eager, greedy, the clock on
the engine's own decode steps). Four engines are up at once: the supernet and Llama, each at
`tensor_parallel_size` 1 (vLLM's default binding on this CPU build: one core computes) and 2 (one
core per rank, `VLLM_CPU_OMP_THREADS_BIND="0|1"`); they are timed one after another, the order
reversed every other repetition. The ratio TP=2 / TP=1 of each supernet placement is reported beside
Llama's. Results: benchmarks/results/tensor_parallel.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_vllm import PLACEMENTS, Engine, make_checkpoints  # noqa: E402

SUPERNET_PLACEMENTS = ["all-FA", "all-GDN", "all-KDA", "SWA+KDA+GDN+FA"]
TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def run(args) -> dict:
    args.workdir.mkdir(parents=True, exist_ok=True)
    logdir = args.workdir / "logs"
    logdir.mkdir(exist_ok=True)
    checkpoints = make_checkpoints(args.workdir, window=512)
    options = {"max_model_len": max(args.contexts) + args.new_tokens + 16, "max_num_seqs": args.batch,
               "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}  # fmt: skip
    engines = {}
    try:
        # One at a time: two ranks starting beside other engines' start-up took minutes more.
        for model in ("supernet", "llama"):
            for tp in (1, 2):
                engines[(model, tp)] = Engine(
                    f"tp{tp}_{model}", checkpoints[model], {**options, "tensor_parallel_size": tp},
                    logdir, TWO_RANKS if tp == 2 else None,
                )  # fmt: skip
        sides = [("llama", None)] + [("supernet", name) for name in SUPERNET_PLACEMENTS]
        for (model, _), engine in engines.items():  # warm-up: every code path once
            for side, name in sides:
                if side == model:
                    engine.decode([PLACEMENTS[name] if name else None] * args.batch, 32, 4)
        samples: dict[str, list[float]] = {}
        steps = [(context, rep) for context in args.contexts for rep in range(args.reps)]
        for context, rep in tqdm(steps, desc="TP=1 vs TP=2", file=sys.stdout):
            order = [(side, name, tp) for side, name in sides for tp in (1, 2)]
            for model, name, tp in order if rep % 2 == 0 else order[::-1]:
                placement = PLACEMENTS[name] if name else None
                rate = engines[(model, tp)].decode([placement] * args.batch, context, args.new_tokens)
                samples.setdefault(f"{name or 'Llama'}|{context}|{tp}", []).append(rate)
    finally:
        for engine in engines.values():
            engine.stop()
    rows = []
    for name in ["Llama", *SUPERNET_PLACEMENTS]:
        for context in args.contexts:
            one, two = (statistics.median(samples[f"{name}|{context}|{tp}"]) for tp in (1, 2))
            rows.append({"model": name, "context": context, "tp1": one, "tp2": two, "ratio": two / one})
    return {"args": {k: str(v) for k, v in vars(args).items()}, "samples": samples, "rows": rows}


def markdown(results: dict, command: str) -> str:
    lines = [
        f"`{command}`", "",
        "| model / placement | context | TP=1 tok/s | TP=2 tok/s | TP=2 / TP=1 |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for row in results["rows"]:
        label = row["model"] if row["model"] == "Llama" else f"supernet {row['model']}"
        lines.append(f"| {label} | {row['context']} | {row['tp1']:.1f} | {row['tp2']:.1f} | **{row['ratio']:.2f}x** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=float, default=0.25, help="cache budget per engine")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/supernet_bench_tp"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the engines on the way out
    command = "python benchmarks/bench_tensor_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tensor_parallel.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, command.strip())
    (args.out / "tensor_parallel.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
