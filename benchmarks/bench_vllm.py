"""Decode throughput and cache memory of the vLLM supernet plugin, against vLLM's own models.

    .venv/bin/python benchmarks/bench_vllm.py            # full run (10-40 min on 2 cores)
    .venv/bin/python benchmarks/bench_vllm.py --quick    # a few minutes: short contexts, one repetition

What it measures (CPU build of vLLM, bf16 weights, eager mode, greedy, ignore_eos), in one run so
that ratios share the machine's state:

1. decode tokens/s (batch `--batch`, every request the same placement) of all-attention, all-SWA,
   all-GDN, all-KDA and two hybrids at each context length;
2. each single-mixer placement against vLLM's own model of that mixer at equal sizes: Llama
   (attention), Mistral with `sliding_window` (SWA), dense Qwen3.5 with GDN in every layer;
3. a batch of four requests with four different placements against the uniform batches' average,
   and (at the shortest context) the same for each `--mixed-batch` size (16 and 64), a quarter per
   placement: at batch 4 each mixer's weights are read for one token, at larger batches for several
   (beside each, the ratio the batch would reach if a step took the time of reading its weights);
4. KV/state cache bytes per request of thinned deployments against the unthinned one, from vLLM's
   own start-up report (KV cache size, max concurrency) at the same cache budget.

Decode tokens/s is timed on the engine's own steps: the clock starts once every request of the
batch has its first token (prefill done) and stops when the last one finishes, so prefill never
counts. Each engine runs in its own process (one `vllm.LLM` each); the supernet engine stays up
for the whole run (placements are per request) and each native engine is up only while it is
compared, and the two are timed alternately, repetition by repetition; tables give medians.
All checkpoints are written here with random weights (no downloads, no tokenizer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vllm_supernet.engine_process import EngineProcess, serve_engine, time_decode  # noqa: E402

# Model size shared by every checkpoint (supernet and native), so mixers compare at equal sizes.
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 4, 8, 4, 64
INTERMEDIATE, VOCAB, ROPE_THETA, EPS = 1536, 4096, 10000.0, 1e-5
CONV_KERNEL = 4


@dataclass(frozen=True)
class Shape:
    """A benchmark model's sizes (the supernet's and its native twins'); the defaults are the benchmark model."""

    hidden: int = HIDDEN
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    intermediate: int = INTERMEDIATE
    vocab: int = VOCAB

PLACEMENTS = {
    "all-FA": "attention*",
    "all-SWA": "sliding_window*",
    "all-GDN": "gdn*",
    "all-KDA": "kda*",
    "FA+GDN (1:1)": "attention,gdn,attention,gdn",
    "SWA+KDA+GDN+FA": "sliding_window,kda,gdn,attention",
}
MIXED = ["all-FA", "all-SWA", "all-GDN", "all-KDA"]  # the mixed batch: one request of each
NATIVE_FOR = {"all-FA": "llama", "all-SWA": "mistral_swa", "all-GDN": "qwen3_5_gdn"}
# Thinned deployments whose cache memory per request is compared with the unthinned one.
THINNED = {
    "thinned: all-GDN only": ["gdn*"],
    "thinned: FA+GDN hybrid and all-GDN": [PLACEMENTS["FA+GDN (1:1)"], "gdn*"],
}


# ----------------------------------------------------------------------------- checkpoints


def make_supernet(directory: Path, window: int, layers: int = LAYERS, shape: Shape | None = None) -> None:
    import torch

    from fast_llm_supernet.model import SupernetForCausalLM
    from shared_spec import Apriel2TextConfig

    shape = shape or Shape(layers=layers)
    attention = {"type": "attention", "heads": shape.heads, "head_groups": shape.kv_heads, "head_size": shape.head_dim,
                 "add_linear_biases": False, "rotary": {"type": "mistral_1d", "theta": ROPE_THETA}}  # fmt: skip
    mixers = {
        "attention": attention,
        "sliding_window": {**attention, "window_size": window},
        "gdn": {
            "type": "gdn",
            "value_heads": shape.heads,
            "key_heads": shape.kv_heads,
            "key_head_dim": shape.head_dim,
            "value_head_dim": shape.head_dim,
            "convolution_layer": {"kernel_size": CONV_KERNEL},
        },  # fmt: skip
        "kda": {
            "type": "kda",
            "heads": shape.heads,
            "head_dim": shape.head_dim,
            "convolution_layer": {"kernel_size": CONV_KERNEL},
            "normalization": {"epsilon": EPS},
        },  # fmt: skip
    }
    block = {
        "mixer": {"type": "stochastic", "main_mixer_name": "attention", "mixers": mixers},
        "mlp": {
            "type": "mlp",
            "intermediate_size": shape.intermediate,
            "activation": "silu",
            "gated": True,
            "add_linear_biases": False,
        },  # fmt: skip
        "normalization": {"type": "rms_norm", "epsilon": EPS},
    }
    config = Apriel2TextConfig.model_validate(
        {"hidden_size": shape.hidden, "vocab_size": shape.vocab, "tie_word_embeddings": False,
         "embeddings": {"max_position_embeddings": 65536},
         "decoder": {"type": "fixed", "num_blocks": shape.layers, "block": block}, "bos_token_id": 1, "eos_token_id": 2}
    )  # fmt: skip
    torch.manual_seed(0)
    SupernetForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)


def make_native(kind: str, directory: Path, window: int, layers: int = LAYERS, shape: Shape | None = None) -> None:
    """A transformers checkpoint with random weights, at the supernet's sizes."""
    import torch
    import transformers

    shape = shape or Shape(layers=layers)
    layers = shape.layers
    common = dict(hidden_size=shape.hidden, num_hidden_layers=layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate_size=shape.intermediate,
                  vocab_size=shape.vocab, rms_norm_eps=EPS, max_position_embeddings=65536,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=ROPE_THETA)
        model_class = transformers.LlamaForCausalLM
    elif kind == "mistral_swa":  # top-level sliding_window: every layer is SWA in vLLM
        config = transformers.MistralConfig(**common, rope_theta=ROPE_THETA, sliding_window=window)
        model_class = transformers.MistralForCausalLM
    elif kind == "qwen3_5_gdn":  # dense Qwen3.5 with Gated DeltaNet in every layer
        config = transformers.Qwen3_5TextConfig(
            **common, layer_types=["linear_attention"] * layers, linear_conv_kernel_dim=CONV_KERNEL,
            linear_key_head_dim=shape.head_dim, linear_value_head_dim=shape.head_dim,
            linear_num_key_heads=shape.kv_heads, linear_num_value_heads=shape.heads,
        )  # fmt: skip
        config.architectures = ["Qwen3_5ForCausalLM"]
        model_class = transformers.Qwen3_5ForCausalLM
    else:
        raise ValueError(f"native model {kind!r}; valid choices: llama, mistral_swa, qwen3_5_gdn")
    torch.manual_seed(0)
    model = model_class(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)


# vLLM's qwen3_5 model file imports transformers' Qwen2-VL image processor, which imports torchvision;
# the registry torchvision does not load beside the CPU torch, so setup removes it. Text-only decode
# never touches it: a stub package on PYTHONPATH (for the Qwen3.5 engine only) lets the module import.
_TORCHVISION_STUB = '''__version__ = "0.0.0+benchmark-stub"


class _Missing:
    """Any torchvision object: image processing is not available in the text-only benchmark."""

    def __getattr__(self, name):
        return _Missing()

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision is a stub here (benchmarks/bench_vllm.py)")

    def __hash__(self):
        return id(self)


def __getattr__(name):
    return _Missing()
'''


def write_torchvision_stub(root: Path) -> Path:
    for module in [
        "",
        "io",
        "transforms",
        "transforms/functional",
        "transforms/v2",
        "transforms/v2/functional",
    ]:
        path = root / "torchvision" / module
        if module.endswith("functional"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".py").write_text(_TORCHVISION_STUB)
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "__init__.py").write_text(_TORCHVISION_STUB)
    return root


def make_checkpoints(workdir: Path, window: int, layers: int = LAYERS, shape: Shape | None = None) -> dict[str, Path]:
    """The supernet and its native twins (written to `workdir` if missing); `shape`: other sizes than the
    benchmark model's (the same paths as `bench_capacity.py` gives them)."""
    shape = shape or Shape(layers=layers)
    suffix = f"_w{window}" if layers == LAYERS else f"_w{window}_l{layers}"
    if shape != Shape(layers=layers):
        suffix = f"_w{window}_l{layers}_h{shape.heads}_kv{shape.kv_heads}_d{shape.head_dim}"
    paths = {kind: workdir / f"{kind}{suffix}" for kind in ("supernet", "llama", "mistral_swa", "qwen3_5_gdn")}
    for kind, path in paths.items():
        if (path / "config.json").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        make_supernet(path, window, shape=shape) if kind == "supernet" else make_native(kind, path, window, shape=shape)
    return paths


def weight_read_ratio(checkpoint: Path) -> float:
    """The mixed / uniform-average ratio of the `MIXED` batch if a decode step took the time it takes
    to read the weights it multiplies by (about so for small batches on a CPU, see benchmarks/README):
    a uniform step reads one mixer per layer, the mixed step every mixer some request uses, and
    both read the MLPs and the head. tok/s is then proportional to 1 / bytes read, so the uniform
    average is mean(1 / bytes_p) and the ratio 1 / (bytes_mixed * mean(1 / bytes_p)). What every
    step pays alike (scheduling, sampling) moves the measured ratio up from it, per-call costs down;
    KV/state reads are left out (they slow long-context all-FA, which moves it up)."""
    from safetensors import safe_open

    mixer_sizes: dict[tuple[int, str], int] = {}  # parameters; one dtype, so proportional to bytes
    shared_size = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(path, "pt") as tensors:
            for name in tensors.keys():
                if "embed_tokens" in name:
                    continue  # a step reads one embedding row per token
                size = math.prod(tensors.get_slice(name).get_shape())
                match = re.match(r"model\.decoder\.blocks\.(\d+)\.mixer\.mixers\.([^.]+)\.", name)
                if match:
                    key = (int(match.group(1)), match.group(2))
                    mixer_sizes[key] = mixer_sizes.get(key, 0) + size
                else:
                    shared_size += size
    layers = sorted({layer for layer, _ in mixer_sizes})
    names = [PLACEMENTS[m].rstrip("*") for m in MIXED]  # the single-mixer placements: "gdn*" -> gdn

    def step_reads(used: list[str]) -> int:
        return shared_size + sum(mixer_sizes[(layer, name)] for layer in layers for name in used)

    uniform_mean_inverse = statistics.mean(1 / step_reads([name]) for name in names)
    return 1 / (step_reads(names) * uniform_mean_inverse)


# ----------------------------------------------------------------------------- engine worker


def build_engine(model: str, options: dict, extra_env: dict):
    """The benchmarks' `vllm.LLM` (in an engine child process): bf16, eager, no prefix caching, no tokenizer."""
    if extra_env.get("PYTHONPATH"):
        sys.path.insert(0, extra_env["PYTHONPATH"].split(os.pathsep)[0])
    from vllm import LLM

    return LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
               enable_prefix_caching=False, seed=0, **options)  # fmt: skip


def add_random_requests(engine, placements: list[str | None], context: int, new_tokens: int, rng: random.Random,
                        request_ids) -> None:  # fmt: skip
    """One request per entry of `placements` (None: a native model): a random prompt of `context` token ids, greedy,
    exactly `new_tokens` new tokens. `request_ids` yields unique ids (an `itertools.count`)."""
    from vllm import SamplingParams

    for placement in placements:
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(context - 1)]
        params = SamplingParams(
            max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
            extra_args={"placement": placement} if placement is not None else None,
        )  # fmt: skip
        engine.add_request(f"bench-{next(request_ids)}", {"prompt_token_ids": prompt}, params)


def _engine_worker(connection, model: str, options: dict, log_path: str, extra_env: dict) -> None:
    """Runs in its own process: one vllm.LLM, answering measurement requests from the pipe."""
    rng, request_ids = random.Random(0), itertools.count()

    def answer(llm, command: dict) -> dict:
        # op "decode": one batch, request i with placements[i] (None: a native model).
        placements = command["placements"]
        add_random_requests(llm.llm_engine, placements, command["context"], command["new_tokens"], rng, request_ids)
        decoded, seconds = time_decode(llm.llm_engine, len(placements))
        return {"tokens": decoded, "seconds": seconds, "rate": decoded / seconds}

    serve_engine(connection, log_path, lambda: build_engine(model, options, extra_env), answer, extra_env)


def _cache_report(text: str) -> dict:
    """vLLM's start-up report in an engine's log: KV cache size (tokens), max concurrency."""
    size = re.findall(r"KV cache size: ([\d,]+) tokens", text)
    concurrency = re.findall(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
    report = {}
    if size:
        report["kv_cache_tokens"] = int(size[-1].replace(",", ""))
    if concurrency:
        report["max_model_len"] = int(concurrency[-1][0].replace(",", ""))
        report["max_concurrency"] = float(concurrency[-1][1])
    return report


class Engine(EngineProcess):
    """A vllm.LLM in a child process (`_engine_worker`), timing decode batches."""

    def __init__(self, name: str, model: Path, options: dict, logdir: Path, extra_env: dict | None = None,
                 wait: bool = True):  # fmt: skip
        log_path = logdir / f"{name}.log"
        super().__init__(name, _engine_worker, (str(model), options, str(log_path), extra_env or {}), log_path, wait)

    def decode(self, placements: list[str | None], context: int, new_tokens: int) -> float:
        return self.request({"op": "decode", "placements": placements, "context": context,
                             "new_tokens": new_tokens})["rate"]  # fmt: skip

    def cache_report(self) -> dict:
        """vLLM's start-up report: KV cache size (tokens) and max concurrency at max_model_len."""
        return _cache_report(self.log_path.read_text(errors="replace"))


# ----------------------------------------------------------------------------- the run


def _empty_results(args) -> dict:
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "intermediate": INTERMEDIATE, "vocab": VOCAB, "window": args.window, "dtype": "bfloat16"},
        "decode": {}, "native": {}, "mixed": {}, "uniform_beside_mixed": {},
        "larger_mixed": {},  # batch size -> {"mixed", "uniform" (per placement), "uniform_average"}
        "memory": {}, "blocked": [],
    }  # fmt: skip


def run(args) -> dict:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)
    checkpoints = make_checkpoints(workdir, args.window)
    stub = write_torchvision_stub(workdir / "torchvision_stub")
    max_len = max(args.contexts) + args.new_tokens + 16
    options = {"max_model_len": max_len, "max_num_seqs": max(args.batch, *args.mixed_batch, 4),
               "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}  # fmt: skip
    results = _empty_results(args)
    results["mixed_weight_read_ratio"] = weight_read_ratio(checkpoints["supernet"])
    samples: dict[tuple, list[float]] = {}

    def record(key: tuple, rate: float) -> None:
        samples.setdefault(key, []).append(rate)
        # Raw samples so far, so that a run that dies late still leaves its numbers.
        partial = {"|".join(map(str, k)): v for k, v in samples.items()}
        (workdir / "samples_partial.json").write_text(json.dumps(partial, indent=1))

    started = time.time()
    # The engines start at once (start-up is mostly imports; it would otherwise take minutes per
    # engine on 2 cores); timing starts only when all are up.
    if args.memory_only:
        return memory_only(args, checkpoints, options, logdir, results, started)
    supernet = Engine("supernet", checkpoints["supernet"], options, logdir, wait=False)
    env = {"PYTHONPATH": os.pathsep.join([str(stub), str(REPO), os.environ.get("PYTHONPATH", "")])}
    natives = {
        name: Engine(
            kind, checkpoints[kind], options, logdir, env if kind == "qwen3_5_gdn" else None, wait=False
        )
        for name, kind in NATIVE_FOR.items()
        if kind in args.natives
    }
    engines = [supernet, *natives.values()]
    try:
        supernet.wait_ready()
        results["memory"]["unthinned"] = supernet.cache_report()
        for name, engine in list(natives.items()):
            try:
                engine.wait_ready()
                engine.decode([None] * args.batch, 32, 4)  # warm-up
            except RuntimeError as error:
                results["blocked"].append(f"native {NATIVE_FOR[name]}: {str(error)[-1500:]}")
                engine.stop()
                del natives[name]
        for name in PLACEMENTS:  # warm-up: every code path once
            supernet.decode([PLACEMENTS[name]] * args.batch, 32, 4)

        # 1+2: each native engine beside the supernet, alternating repetition by repetition.
        steps = [(c, r) for c in args.contexts for r in range(args.reps)]
        for name, native in natives.items():
            for context, rep in tqdm(steps, desc=f"{name} vs {NATIVE_FOR[name]}", file=sys.stdout):
                pair = [("supernet", supernet, [PLACEMENTS[name]]), ("native", native, [None])]
                for side, engine, placement in pair if rep % 2 == 0 else pair[::-1]:
                    record(
                        (side, name, context), engine.decode(placement * args.batch, context, args.new_tokens)
                    )
            native.stop()

        # 1+3: the remaining placements and the mixed batch, alternating with the uniform batches.
        rest = [n for n in PLACEMENTS if n not in natives]

        def time_alternated(order: list[tuple[str, str]], context: int, rep: int, batch: int) -> None:
            """Time (side, name) batches of `batch` requests in `order`, reversed every other repetition;
            a side starting with "mixed" is the mixed batch, an equal share of it per placement."""
            for side, name in order if rep % 2 == 0 else order[::-1]:
                if side.startswith("mixed"):
                    placements = [PLACEMENTS[m] for m in MIXED] * max(1, batch // len(MIXED))
                else:
                    placements = [PLACEMENTS[name]] * batch
                record((side, name, context), supernet.decode(placements, context, args.new_tokens))

        for context, rep in tqdm([] if args.skip_mixed else steps, desc="placements + mixed batch", file=sys.stdout):
            # The uniform batches the mixed one is compared with are timed here again, next to it.
            order = [("supernet", n) for n in rest] + [("mixed", "mixed")] + [("uniform", m) for m in MIXED]
            time_alternated(order, context, rep, args.batch)
            for size in args.mixed_batch if context == args.contexts[0] else []:
                # A larger mixed batch, a quarter of it per placement, beside uniform batches of that size.
                order = [(f"mixed_{size}", "mixed")] + [(f"uniform_{size}", m) for m in MIXED]
                time_alternated(order, context, rep, size)
    finally:
        for engine in engines:
            engine.stop()

    # 4: thinned deployments, same cache budget: vLLM's start-up report is all that is needed.
    thinned = {
        label: Engine(f"thinned_{index}", checkpoints["supernet"],
                      {**options, "hf_overrides": {"supernet_placements": allowed}}, logdir, wait=False)
        for index, (label, allowed) in enumerate(THINNED.items() if not args.skip_memory else [])
    }  # fmt: skip
    try:
        for label, engine in thinned.items():
            try:
                engine.wait_ready()
                results["memory"][label] = {"allowed": THINNED[label], **engine.cache_report()}
            except RuntimeError as error:
                results["blocked"].append(f"thinned {THINNED[label]}: {str(error)[-1500:]}")
            engine.stop()
    finally:
        for engine in thinned.values():
            engine.stop()

    budget = options["kv_cache_memory_bytes"]
    for report in results["memory"].values():
        if report.get("max_concurrency"):
            report["bytes_per_request_at_max_len"] = budget / report["max_concurrency"]
        if report.get("kv_cache_tokens"):
            report["bytes_per_token"] = budget / report["kv_cache_tokens"]

    summarise(results, samples)
    results["wall_seconds"] = time.time() - started
    return results


def memory_only(args, checkpoints, options, logdir, results, started) -> dict:
    """`--memory-only`: the unthinned and thinned engines start side by side; no timing."""
    deployments = {"unthinned": None} | THINNED
    engines = {}
    for index, (label, allowed) in enumerate(deployments.items()):
        name = "supernet" if allowed is None else f"thinned_{index - 1}"
        engine_options = (
            options if allowed is None else {**options, "hf_overrides": {"supernet_placements": allowed}}
        )
        engines[label] = Engine(name, checkpoints["supernet"], engine_options, logdir, wait=False)
    try:
        for label, engine in tqdm(engines.items(), desc="engines", file=sys.stdout):
            engine.wait_ready()
            results["memory"][label] = {"allowed": deployments[label], **engine.cache_report()}
            engine.stop()
    finally:
        for engine in engines.values():
            engine.stop()
    budget = options["kv_cache_memory_bytes"]
    for report in results["memory"].values():
        if report.get("max_concurrency"):
            report["bytes_per_request_at_max_len"] = budget / report["max_concurrency"]
    results["wall_seconds"] = time.time() - started
    return results


def summarise(results: dict, samples: dict[tuple, list[float]]) -> None:
    """Medians of the raw samples into the results' tables."""
    median = {key: statistics.median(values) for key, values in samples.items()}
    tables = {"supernet": results["decode"], "native": results["native"], "mixed": results["mixed"],
              "uniform": results["uniform_beside_mixed"]}  # fmt: skip
    mixed_sections = [(results["mixed"], results["uniform_beside_mixed"])]
    for size in results["settings"]["mixed_batch"]:  # sides "mixed_16", "uniform_16", ...
        section = results["larger_mixed"].setdefault(str(size), {"mixed": {}, "uniform": {}})
        tables[f"mixed_{size}"], tables[f"uniform_{size}"] = section, section["uniform"]
        mixed_sections.append((section, section["uniform"]))
    for (side, name, context), value in median.items():
        tables[side].setdefault(name, {})[str(context)] = value
    for mixed, uniform_batches in mixed_sections:
        for context in results["settings"]["contexts"]:
            uniform = [uniform_batches.get(m, {}).get(str(context)) for m in MIXED]
            if mixed.get("mixed", {}).get(str(context)) and all(uniform):
                mixed.setdefault("uniform_average", {})[str(context)] = statistics.mean(uniform)
    results["samples"] = {"|".join(map(str, key)): values for key, values in samples.items()}


def from_partial_samples(args) -> dict:
    """Tables from the raw samples a run has written so far (`--from-samples`), e.g. of a run cut short."""
    results = _empty_results(args)
    supernet = make_checkpoints(args.workdir, args.window)["supernet"]
    results["mixed_weight_read_ratio"] = weight_read_ratio(supernet)
    raw = json.loads((args.workdir / "samples_partial.json").read_text())
    samples = {(side, name, int(context)): values
               for key, values in raw.items() for side, name, context in [key.split("|")]}  # fmt: skip
    args.contexts = sorted({key[2] for key in samples})
    larger = {side for side, _, _ in samples if side.startswith("mixed_")}  # "mixed_16", ...
    args.mixed_batch = sorted(int(side.split("_")[1]) for side in larger)
    results["settings"]["contexts"], results["settings"]["mixed_batch"] = args.contexts, args.mixed_batch
    summarise(results, samples)
    budget = args.kv_cache_gib * 2**30
    logs = {"unthinned": "supernet"} | {label: f"thinned_{i}" for i, label in enumerate(THINNED)}
    for label, log in logs.items():
        path = args.workdir / "logs" / f"{log}.log"
        if path.exists():
            report = _cache_report(path.read_text(errors="replace"))
            if report.get("max_concurrency"):
                report["bytes_per_request_at_max_len"] = budget / report["max_concurrency"]
            results["memory"][label] = report
    results["wall_seconds"] = (args.workdir / "samples_partial.json").stat().st_mtime - min(
        log.stat().st_mtime for log in (args.workdir / "logs").glob("*.log")
    )
    results["blocked"].append("tables made from a run's partial samples (--from-samples)")
    return results


# ----------------------------------------------------------------------------- reporting


def markdown(results: dict, command: str) -> str:
    settings, model = results["settings"], results["model"]
    contexts = [str(c) for c in settings["contexts"]]
    decode, native, mixed = results["decode"], results["native"], results["mixed"]
    longest = contexts[-1]
    fa_longest = decode.get("all-FA", {}).get(longest)
    lines = [
        f"Command: `{command}` ({results['wall_seconds'] / 60:.1f} min). vLLM CPU build, bf16, eager, batch "
        f"{settings['batch']}, {settings['new_tokens']} new tokens, greedy; model hidden {model['hidden']}, "
        f"{model['layers']} layers, {model['heads']} heads / {model['kv_heads']} KV heads of {model['head_dim']}, "
        f"SWA window {model['window']}; medians of {settings['reps']} alternated repetitions.",
        "",
        "### Decode throughput (output tokens/s)",
        "",
        "| placement | " + " | ".join(f"ctx {c}" for c in contexts) + f" | vs all-FA at {longest} |",
        "|---" * (len(contexts) + 2) + "|",
    ]
    for name in PLACEMENTS:
        rates = [decode.get(name, {}).get(c) for c in contexts]
        ratio = decode.get(name, {}).get(longest)
        ratio_text = f"{ratio / fa_longest:.2f}x" if ratio and fa_longest else "n/a"
        lines.append(
            f"| {name} | " + " | ".join(f"{r:.1f}" if r else "n/a" for r in rates) + f" | {ratio_text} |"
        )
    lines += ["", "### Against vLLM's own model of the same mixer (same sizes, same run, alternated)", "",
              "| placement | native model | " + " | ".join(f"ctx {c}: plugin / native = ratio" for c in contexts)
              + " |", "|---" * (len(contexts) + 2) + "|"]  # fmt: skip
    native_names = {
        "llama": "Llama",
        "mistral_swa": "Mistral (sliding_window)",
        "qwen3_5_gdn": "Qwen3.5 dense GDN",
    }
    for name, kind in NATIVE_FOR.items():
        cells = []
        for c in contexts:
            ours, theirs = decode.get(name, {}).get(c), native.get(name, {}).get(c)
            cells.append(
                f"{ours:.1f} / {theirs:.1f} = **{ours / theirs:.2f}x**" if ours and theirs else "n/a"
            )
        lines.append(f"| {name} | {native_names[kind]} | " + " | ".join(cells) + " |")
    by_reads = results.get("mixed_weight_read_ratio")
    by_reads_text = f"{by_reads:.2f}x" if by_reads else "n/a"

    def mixed_table(title: str, section: dict) -> list[str]:
        header = "| context | mixed tok/s | uniform average tok/s | ratio | ratio if time ∝ weights read |"
        rows = ["", title, "", header, "|---|---|---|---|---|"]
        for c in contexts:
            ours, average = section.get("mixed", {}).get(c), section.get("uniform_average", {}).get(c)
            if ours and average:
                ratio = f"**{ours / average:.2f}x**"
                rows.append(f"| {c} | {ours:.1f} | {average:.1f} | {ratio} | {by_reads_text} |")
        return rows

    lines += mixed_table("### Mixed batch (one request each of " + ", ".join(MIXED) + ") vs uniform batches", mixed)
    for size, section in results["larger_mixed"].items():
        if section.get("mixed"):
            share = int(size) // len(MIXED)
            lines += mixed_table(f"### Mixed batch of {size} ({share} requests each of "
                                 + ", ".join(MIXED) + f") vs uniform batches of {size}", section)  # fmt: skip
    memory = results["memory"]
    base = memory.get("unthinned", {}).get("bytes_per_request_at_max_len")
    lines += ["", f"### Cache memory per request (same budget {settings['kv_cache_gib']} GiB, "
              f"max_model_len {memory.get('unthinned', {}).get('max_model_len', 'n/a')})", "",
              "| deployment | KV cache size (tokens) | max concurrency | MiB per request at max len | vs unthinned |",
              "|---|---|---|---|---|"]  # fmt: skip
    for label, report in memory.items():
        per_request = report.get("bytes_per_request_at_max_len")
        lines.append(
            f"| {label} | {report.get('kv_cache_tokens', 'n/a')} | {report.get('max_concurrency', 'n/a')} | "
            + (
                f"{per_request / 2**20:.1f} | {per_request / base:.2f}x |"
                if per_request and base
                else "n/a | n/a |"
            )
        )
    if results["blocked"]:
        lines += ["", "### Blocked", ""] + [f"- {b.splitlines()[-1] if b else b}" for b in results["blocked"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = results["settings"]["contexts"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in PLACEMENTS:
        rates = [results["decode"].get(name, {}).get(str(c), math.nan) for c in contexts]
        axis.plot(contexts, rates, marker="o", label=f"plugin {name}")
    styles = {"all-FA": "Llama", "all-SWA": "Mistral SWA", "all-GDN": "Qwen3.5 GDN"}
    for name, label in styles.items():
        rates = [results["native"].get(name, {}).get(str(c), math.nan) for c in contexts]
        if any(not math.isnan(r) for r in rates):
            axis.plot(contexts, rates, linestyle="--", marker="x", color="gray", alpha=0.7)
            axis.annotate(f"vLLM {label}", (contexts[-1], rates[-1]), fontsize=7, color="gray")
    axis.set_xscale("log", base=2)
    axis.set_xticks(contexts, [str(c) for c in contexts])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel(f"decode tokens/s (batch {results['settings']['batch']})")
    axis.set_title("vLLM CPU decode throughput per placement (dashed: vLLM's own models)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="contexts 128 256 512, 16 new tokens, 1 repetition"
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mixed-batch", type=int, nargs="*", default=[16, 64],
                        help="sizes of larger mixed batches, timed at the shortest context (none: skip)")
    # 128: at ~500 tok/s a batch of 4 decodes for ~1 s; 32 tokens gave quarter-second samples that moved 30 %.
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--window", type=int, default=512)
    # 0.5 GiB: the mixed batch of 64 at 512 tokens fits (unthinned, ~5 MiB per request).
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="cache budget per engine")
    parser.add_argument("--natives", nargs="*", default=["llama", "mistral_swa", "qwen3_5_gdn"])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true",
                        help="only the single-mixer placements against vLLM's own models (1+2)")  # fmt: skip
    parser.add_argument("--memory-only", action="store_true", help="only the cache-memory comparison")
    parser.add_argument("--from-samples", action="store_true",
                        help="no engines: tables from WORKDIR/samples_partial.json of an earlier run")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/supernet_bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    for size in args.mixed_batch:
        if size <= 0 or size % len(MIXED):
            parser.error(f"--mixed-batch {size}: must be a positive multiple of {len(MIXED)} (a share each)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the engines on the way out
    if args.quick:
        args.contexts, args.new_tokens, args.reps = [128, 256, 512], 16, 1
    args.contexts = sorted(args.contexts)
    command = "python benchmarks/bench_vllm.py " + " ".join(argv if argv is not None else sys.argv[1:])

    results = from_partial_samples(args) if args.from_samples else run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_decode.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, command.strip())
    (args.out / "vllm_decode.md").write_text(table)
    plot(results, args.out / "vllm_decode.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
