"""How many requests run at once under one cache budget, per placement: the supernet serving every mixer
against the supernet thinned to the placement and against vLLM's own model of the same shape.

    .venv/bin/python benchmarks/bench_capacity.py                       # the documented run (about 25 minutes)
    .venv/bin/python benchmarks/bench_capacity.py --requests 64 --prompt 8192 --budget-mib 1024   # full size

Every engine gets the same KV-cache budget (`kv_cache_memory_bytes`) and the same load: `--requests` requests
of `--prompt` random prompt tokens and `--new-tokens` generated tokens, all submitted at once. Per engine:
peak requests running at once (read from the scheduler after every step), preemptions, and throughput (prompt
plus generated tokens over the wall time, and generated tokens alone). Engines:

- `unthinned`: the supernet serving every mixer, the placement chosen per request (this project's default,
  cache allocated by placement: `vllm_supernet/cache_allocation.py`);
- `conv in page`: the same deployment with the convolution states kept in their state page
  (`supernet_conv_states: in_page`), where the default keeps them in a table beside the pool when that wastes
  less (`vllm_supernet/page_layout.py`);
- `per kind`: the same deployment with vLLM's own cache grouping (`supernet_cache_layout: per_kind`): every
  request holds every mixer kind's cache, what this plugin did before allocation by placement;
- `thinned`: the supernet serving that placement only (`supernet_placements`);
- `vLLM <model>`: Llama (all-FA), Mistral with a sliding window (all-SWA), dense Qwen3.5 (all-GDN), same sizes.

The mixed workload puts a quarter of the requests in each uniform placement, on the unthinned deployment and
on the per-kind one. Each engine runs in a child process of its own with its engine core in process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), one after another: nothing else runs beside it. Results:
`--out/capacity.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm import NATIVE_FOR, Shape, make_native, make_supernet, write_torchvision_stub  # noqa: E402

UNIFORM = {"all-FA": "attention*", "all-SWA": "sliding_window*", "all-GDN": "gdn*", "all-KDA": "kda*"}
# Hybrids: a cycle of mixers repeated over the layers (4 layers: "attention,gdn,attention,gdn").
HYBRIDS = {"FA+GDN (1:1)": ("attention", "gdn"), "SWA+KDA+GDN+FA": ("sliding_window", "kda", "gdn", "attention")}

NATIVE_NAMES = {"llama": "vLLM Llama", "mistral_swa": "vLLM Mistral (SWA)", "qwen3_5_gdn": "vLLM Qwen3.5 (GDN)"}


def hybrid_placement(cycle: tuple[str, ...], layers: int) -> str:
    return ",".join(cycle[layer % len(cycle)] for layer in range(layers))


# ----------------------------------------------------------------------------- one engine (child process)


def run_one(job: dict) -> dict:
    """Build one `vllm.LLM`, submit the load, step until it is served; the figures of `measure`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
              enable_prefix_caching=False, seed=0, kv_cache_memory_bytes=job["budget"],
              max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
              hf_overrides=job.get("hf_overrides"))  # fmt: skip
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    preemptions = 0
    preempt = scheduler._preempt_request

    def counting_preempt(*args, **kwargs):
        nonlocal preemptions
        preemptions += 1
        return preempt(*args, **kwargs)

    scheduler._preempt_request = counting_preempt
    rng = random.Random(0)
    placements = job["placements"]
    for index in range(job["requests"]):
        prompt = [1] + [rng.randrange(3, job["vocab"]) for _ in range(job["prompt"] - 1)]
        placement = placements[index % len(placements)]
        params = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True, detokenize=False,
                                extra_args={"placement": placement} if placement else None)  # fmt: skip
        engine.add_request(f"capacity-{index}", {"prompt_token_ids": prompt}, params)
    peak, generated, start = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                generated += len(output.outputs[0].token_ids)
        peak = max(peak, len(scheduler.running))
    seconds = time.perf_counter() - start
    tokens = job["requests"] * job["prompt"] + generated
    return {"peak_running": peak, "preemptions": preemptions, "seconds": seconds, "generated": generated,
            "tokens_per_s": tokens / seconds, "generated_per_s": generated / seconds,
            "num_blocks": scheduler.kv_cache_config.num_blocks,
            "cache_groups": len(scheduler.kv_cache_config.kv_cache_groups)}  # fmt: skip


def measure(job: dict, log_path: Path, env: dict) -> dict:
    """`run_one(job)` in a child process (vLLM's offline engine needs its own `__main__`)."""
    with open(log_path, "w") as log:
        process = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                                 stderr=log, text=True, env={**os.environ, **env}, timeout=3600)  # fmt: skip
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"engine run failed (rc {process.returncode}); see {log_path}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the benchmark


# The unthinned supernet's engines: (name, hf_overrides) of its default layout and the layouts it is measured against.
SUPERNET_LAYOUTS = {"unthinned": None, "conv in page": {"supernet_conv_states": "in_page"},
                    "per kind": {"supernet_cache_layout": "per_kind"}}  # fmt: skip


def engines(args, checkpoints: dict[str, Path]) -> list[dict]:
    """(row, engine, job) of every run, in table order."""
    supernet = str(checkpoints["supernet"])

    def supernet_runs(workload: str, placements: list[str]) -> list[dict]:
        return [{"workload": workload, "engine": engine, "model": supernet, "placements": placements,
                 **({"hf_overrides": overrides} if overrides else {})} for engine, overrides in SUPERNET_LAYOUTS.items()]  # fmt: skip

    runs = []
    hybrids = {name: hybrid_placement(cycle, args.layers) for name, cycle in HYBRIDS.items()}
    for name, placement in {**UNIFORM, **hybrids}.items():
        runs += supernet_runs(name, [placement])
        runs.append({"workload": name, "engine": "thinned", "model": supernet, "placements": [placement],
                     "hf_overrides": {"supernet_placements": [placement]}})  # fmt: skip
        if name in NATIVE_FOR and NATIVE_FOR[name] in args.natives:
            native = NATIVE_FOR[name]
            runs.append({"workload": name, "engine": NATIVE_NAMES[native], "model": str(checkpoints[native]),
                         "placements": [None], "native": native})  # fmt: skip
    if args.workloads:
        runs = [run for run in runs if run["workload"] in args.workloads]
    runs += supernet_runs("mixed (1/4 each uniform)", list(UNIFORM.values()))
    if args.engines:
        runs = [run for run in runs if run["engine"] in args.engines or run.get("native") in args.engines]
    return runs


def run(args) -> dict:
    shape = Shape(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tag = f"w{args.window}_l{args.layers}" + ("" if shape == Shape(layers=args.layers) else f"_h{args.heads}_kv{args.kv_heads}_d{args.head_dim}")
    checkpoints = {"supernet": args.workdir / f"supernet_{tag}"}
    checkpoints.update({native: args.workdir / f"{native}_{tag}" for native in args.natives})
    for kind, path in checkpoints.items():
        if not (path / "config.json").exists():
            path.mkdir(parents=True, exist_ok=True)
            make_supernet(path, args.window, shape=shape) if kind == "supernet" else make_native(kind, path, args.window, shape=shape)
    stub = write_torchvision_stub(args.workdir / "torchvision_stub")
    logdir = args.out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    load = {"requests": args.requests, "prompt": args.prompt, "new_tokens": args.new_tokens, "vocab": shape.vocab,
            "budget": int(args.budget_mib * 2**20), "max_model_len": args.prompt + args.new_tokens,
            "max_num_seqs": args.requests}  # fmt: skip
    results = {"command": " ".join(sys.argv), "load": load, "window": args.window,
               "model": {**shape.__dict__, "dtype": "bfloat16"}, "rows": []}  # fmt: skip
    for spec in tqdm(engines(args, checkpoints), desc="engines"):
        env = {"PYTHONPATH": os.pathsep.join([str(stub), str(REPO)])} if spec.get("native") == "qwen3_5_gdn" else {}
        name = f"{spec['workload']}_{spec['engine']}".replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
        figures = measure({**load, **spec}, logdir / f"{name}.log", env)
        results["rows"].append({"workload": spec["workload"], "engine": spec["engine"], **figures})
        tqdm.write(f"{spec['workload']:>26} {spec['engine']:>20}: peak {figures['peak_running']:3d}, "
                   f"preempted {figures['preemptions']:3d}, {figures['tokens_per_s']:8.0f} tok/s")  # fmt: skip
    return results


def markdown(results: dict) -> str:
    load = results["load"]
    lines = [
        f"Budget {load['budget'] / 2**20:.0f} MiB of KV cache per engine; {load['requests']} requests of "
        f"{load['prompt']} prompt tokens and {load['new_tokens']} new tokens, submitted at once; model: "
        f"{results['model']['layers']} layers, hidden {results['model']['hidden']}, {results['model']['heads']} heads / "
        f"{results['model']['kv_heads']} KV heads of {results['model']['head_dim']}, window {results['window']}, bf16.",
        "",
        "| workload | engine | peak running | vs thinned | preemptions | tokens/s (prompt + new) | new tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    thinned = {r["workload"]: r["peak_running"] for r in results["rows"] if r["engine"] == "thinned"}
    for row in results["rows"]:
        ratio = f"{row['peak_running'] / thinned[row['workload']]:.2f}x" if row["workload"] in thinned else ""
        lines.append(f"| {row['workload']} | {row['engine']} | {row['peak_running']} | {ratio} | {row['preemptions']} | "
                     f"{row['tokens_per_s']:.0f} | {row['generated_per_s']:.1f} |")  # fmt: skip
    lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results["rows"]))
    engines_seen = list(dict.fromkeys(r["engine"] for r in results["rows"]))
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(engines_seen)
    for offset, engine in enumerate(engines_seen):
        peaks = {r["workload"]: r["peak_running"] for r in results["rows"] if r["engine"] == engine}
        xs = [i + offset * width for i, w in enumerate(workloads) if w in peaks]
        axis.bar(xs, [peaks[w] for w in workloads if w in peaks], width, label=engine)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, rotation=20, ha="right")
    axis.set_ylabel("peak requests running at once")
    axis.set_title(f"One KV budget ({results['load']['budget'] / 2**20:.0f} MiB), {results['load']['requests']} requests "
                   f"of {results['load']['prompt']} tokens")  # fmt: skip
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens per request")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget-mib", type=float, default=128, help="KV-cache budget of every engine")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=Shape.heads,
                        help="attention heads, GDN value heads and KDA heads (the benchmark model's by default)")
    parser.add_argument("--kv-heads", type=int, default=Shape.kv_heads, help="attention KV heads and GDN key heads")
    parser.add_argument("--head-dim", type=int, default=Shape.head_dim, help="every mixer's head size")
    parser.add_argument("--natives", nargs="*", default=["llama", "mistral_swa", "qwen3_5_gdn"])
    parser.add_argument("--workloads", nargs="*", default=None,
                        help=f"placements to run besides the mixed workload (default: all of {[*UNIFORM, *HYBRIDS]})")
    parser.add_argument("--engines", nargs="*", default=None,
                        help="engines to run (default: all): unthinned, 'conv in page', 'per kind', thinned, and the "
                             "--natives by name")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/supernet_bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "capacity")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))), flush=True)
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (args.out / "capacity.json").write_text(json.dumps(results, indent=1))
    (args.out / "capacity.md").write_text(markdown(results))
    plot(results, args.out / "capacity.png")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
