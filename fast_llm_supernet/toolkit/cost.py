"""`fast_llm_supernet.toolkit.cost`: a decode cost model per placement at one context length, measured through vLLM.

    seconds per decode step (placement) = shared + sum over layers l of per_layer[l, mixer at l]

`per_layer[l, m]` is the measured wall time of layer l's mixer m in a decode step (vLLM's CPU build, bf16, eager,
`batch` requests of `context` tokens, timed inside the worker by `vllm_supernet.profiling`), from one run of each
uniform placement; `shared` is what every step costs besides the mixers (embeddings, norms, MLPs, head, sampling,
scheduling), the step time minus the mixers' sum, averaged over those runs. The model is then checked against
whole placements that were not used to build it (hybrids, where additivity may fail): `validation` holds each
one's measured and predicted step time.

KV / state bytes per request are computed exactly from the config (`cache_bytes_per_request`).
"""

from __future__ import annotations

import json
import os
import random
import statistics
from pathlib import Path

from pydantic import BaseModel

from shared_spec import (
    Apriel2TextConfig,
    AttentionMixerConfig,
    GDNMixerConfig,
    KDAMixerConfig,
    Placement,
)
from shared_spec.apriel2_config import StochasticMixerConfig
from vllm_supernet.engine_process import EngineProcess, serve_engine, time_decode


class CostModel(BaseModel):
    mixers: list[str]
    context: int
    batch: int
    per_layer: list[list[float]]  # [L, M] seconds per decode step
    shared: float  # seconds per decode step outside the mixers
    validation: list[dict] = []  # {"placement", "measured", "predicted", "relative_error"}

    def predict(self, indices: list[int]) -> float:
        return self.shared + sum(self.per_layer[layer][m] for layer, m in enumerate(indices))

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> CostModel:
        return cls.model_validate(json.loads(path.read_text()))


def mixer_cache_bytes(mixer, context: int, dtype_bytes: int, state_bytes: int = 4) -> int:
    """One layer's cache for one request after `context` tokens: K and V of the tokens attention keeps (all of
    them, or the window), or the recurrent state (float32 in vLLM's GDN/KDA pages) plus the convolution states."""
    if isinstance(mixer, AttentionMixerConfig):
        tokens = context if mixer.window_size is None else min(context, mixer.window_size)
        return 2 * mixer.head_groups * mixer.head_size * tokens * dtype_bytes
    kernel = mixer.convolution_layer.kernel_size
    if isinstance(mixer, GDNMixerConfig):
        key, value = mixer.key_heads * mixer.key_head_dim, mixer.value_heads * mixer.value_head_dim
        state = mixer.value_heads * mixer.key_head_dim * mixer.value_head_dim * state_bytes
        return state + (2 * key + value) * (kernel - 1) * dtype_bytes
    if isinstance(mixer, KDAMixerConfig):
        width = mixer.heads * mixer.head_dim
        return mixer.heads * mixer.head_dim * mixer.head_dim * state_bytes + 3 * width * (kernel - 1) * dtype_bytes
    raise TypeError(f"no cache model for {type(mixer).__name__}")


def cache_bytes_per_request(config: Apriel2TextConfig, placement: Placement, context: int, dtype_bytes: int = 2) -> int:
    total = 0
    for block, name in zip(config.blocks_in_order(), placement.mixers, strict=True):
        mixer = block.mixer.mixers[name] if isinstance(block.mixer, StochasticMixerConfig) else block.mixer
        total += mixer_cache_bytes(mixer, context, dtype_bytes)
    return total


# ---- measuring through vLLM ----------------------------------------------------------------------------------


def _engine(connection, checkpoint: str, options: dict, log_path: str) -> None:
    """Child process: one vllm.LLM with the mixer profiler, answering `measure` requests."""
    from vllm import LLM, SamplingParams

    rng = random.Random(0)
    counter = 0

    def build():
        llm = LLM(model=checkpoint, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
                  enable_prefix_caching=False, seed=0, worker_extension_cls="vllm_supernet.profiling.MixerProfiler",
                  **options)  # fmt: skip
        llm.collective_rpc("start_mixer_profiling")
        return llm

    def answer(llm, command: dict) -> dict:
        nonlocal counter
        engine, vocab = llm.llm_engine, llm.llm_engine.model_config.get_vocab_size()
        placement, context, batch, steps = command["placement"], command["context"], command["batch"], command["steps"]
        for _ in range(batch):
            counter += 1
            params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True, detokenize=False,
                                    extra_args={"placement": placement})  # fmt: skip
            prompt = [rng.randrange(3, vocab) for _ in range(context)]
            engine.add_request(f"cost-{counter}", {"prompt_token_ids": prompt}, params)
        llm.collective_rpc("mixer_profile")  # drop what earlier work recorded
        decoded, seconds = time_decode(engine, batch)
        # Decode forwards only (one token per request); the first one warms up.
        forwards = [f for f in llm.collective_rpc("mixer_profile")[0] if f["tokens"] == batch][1:]
        return {"step_seconds": seconds * batch / decoded, "forwards": forwards}

    serve_engine(connection, log_path, build, answer)


def engine_options(max_model_len: int, batch: int) -> dict:
    """A small engine: a fixed 1 GiB cache (not a share of RAM, which another process may hold), whole-prompt prefill."""
    return {"max_model_len": max_model_len, "max_num_seqs": max(batch, 1), "kv_cache_memory_bytes": 2**30,
            "max_num_batched_tokens": max(2048, max_model_len)}


class ProfilingEngine(EngineProcess):
    """A vllm.LLM with the mixer profiler in a child process (`_engine`)."""

    def __init__(self, checkpoint: Path, options: dict, log_path: Path):
        super().__init__("profiling", _engine, (str(checkpoint), options, str(log_path)), log_path)

    def measure(self, placement: str, context: int, batch: int, steps: int) -> dict:
        """Decode `steps` tokens for `batch` requests of `context` tokens: {"step_seconds": wall time per decode step
        (prefill excluded), "forwards": per decode forward {"seconds", "mixers": [seconds per layer]}}."""
        return self.request({"op": "measure", "placement": placement, "context": context, "batch": batch,
                             "steps": steps})


def measure_cost_model(
    checkpoint: Path, mixers: list[str], num_layers: int, context: int, validate: list[Placement], batch: int = 1,
    steps: int = 16, log_path: Path | None = None, progress: bool = True,
) -> CostModel:
    """Build the cost model from the uniform placements, then check it on the `validate` placements."""
    from tqdm.auto import tqdm

    options = engine_options(context + steps + 8, batch)
    engine = ProfilingEngine(checkpoint, options, log_path or Path(f"/tmp/supernet_cost_{os.getpid()}.log"))
    per_layer = [[0.0] * len(mixers) for _ in range(num_layers)]
    shared_samples = []  # a decode step's wall time minus its mixers' time, per uniform run
    bar = tqdm(total=len(mixers) + len(validate), desc=f"cost at {context} tokens", disable=not progress)
    try:
        for m, name in enumerate(mixers):
            measured = engine.measure(f"{name}*", context, batch, steps)
            for layer in range(num_layers):
                per_layer[layer][m] = statistics.median(f["mixers"][layer] for f in measured["forwards"])
            shared_samples.append(measured["step_seconds"] - sum(row[m] for row in per_layer))
            bar.update(1)
        model = CostModel(mixers=mixers, context=context, batch=batch, per_layer=per_layer,
                          shared=statistics.median(shared_samples))
        for placement in validate:
            measured = engine.measure(placement.canonical, context, batch, steps)["step_seconds"]
            predicted = model.predict([mixers.index(name) for name in placement.mixers])
            model.validation.append({"placement": placement.canonical, "measured": measured, "predicted": predicted,
                                     "relative_error": (predicted - measured) / measured})
            bar.update(1)
    finally:
        bar.close()
        engine.stop()
    return model

