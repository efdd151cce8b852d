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
import multiprocessing
import os
import random
import statistics
import time
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
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=checkpoint, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
                  enable_prefix_caching=False, seed=0, worker_extension_cls="vllm_supernet.profiling.MixerProfiler",
                  **options)
        engine = llm.llm_engine
        llm.collective_rpc("start_mixer_profiling")
        vocab = llm.llm_engine.model_config.get_vocab_size()
        rng = random.Random(0)
        connection.send({"ready": True})
        counter = 0
        while True:
            command = connection.recv()
            if command["op"] == "stop":
                break
            placement, context, batch, steps = command["placement"], command["context"], command["batch"], command["steps"]
            for _ in range(batch):
                counter += 1
                params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True, detokenize=False,
                                        extra_args={"placement": placement})
                prompt = [rng.randrange(3, vocab) for _ in range(context)]
                engine.add_request(f"cost-{counter}", {"prompt_token_ids": prompt}, params)
            step_times, decoding, started = [], False, 0
            while engine.has_unfinished_requests():
                if decoding:
                    llm.collective_rpc("mixer_profile")  # drop what prefill recorded
                    started = time.perf_counter()
                outputs = engine.step()
                if decoding:
                    step_times.append((time.perf_counter() - started, llm.collective_rpc("mixer_profile")[0]))
                decoding = decoding or (len(outputs) == batch and all(len(o.outputs[0].token_ids) >= 1 for o in outputs))
            connection.send({"steps": step_times})
    except BaseException:  # noqa: B036 -- report any failure to the parent
        import traceback

        connection.send({"error": traceback.format_exc()})
    finally:
        connection.close()


class ProfilingEngine:
    def __init__(self, checkpoint: Path, options: dict, log_path: Path):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.log_path = log_path
        self.process = context.Process(target=_engine, args=(child, str(checkpoint), options, str(log_path)))
        self.process.start()
        self._answer()

    def _answer(self) -> dict:
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the profiling engine died; log {self.log_path}:\n{self.log_path.read_text()[-3000:]}")
        answer = self.connection.recv()
        if "error" in answer:
            raise RuntimeError(f"profiling engine: {answer['error']}")
        return answer

    def measure(self, placement: str, context: int, batch: int, steps: int) -> list[tuple[float, dict]]:
        self.connection.send({"op": "measure", "placement": placement, "context": context, "batch": batch, "steps": steps})
        return self._answer()["steps"]

    def stop(self) -> None:
        if self.process.is_alive():
            self.connection.send({"op": "stop"})
            self.process.join(timeout=60)
            if self.process.is_alive():
                self.process.terminate()


def _mixer_seconds(profile: dict, num_layers: int, batch: int) -> dict[int, float]:
    """Per layer: seconds its mixer took in one decode step (calls with `batch` token rows)."""
    seconds: dict[int, float] = {}
    for key, calls in profile.items():
        layer = int(key.split(":")[0])
        seconds[layer] = seconds.get(layer, 0.0) + sum(t for rows, t in calls if rows == batch)
    return seconds


def measure_cost_model(
    checkpoint: Path, mixers: list[str], num_layers: int, context: int, validate: list[str], batch: int = 1,
    steps: int = 16, log_path: Path | None = None, progress: bool = True,
) -> CostModel:
    """Build the cost model from the uniform placements, then check it on `validate` (compact placement strings)."""
    from tqdm.auto import tqdm

    options = {"max_model_len": context + steps + 8, "max_num_seqs": max(batch, 1), "gpu_memory_utilization": 0.3,
               "max_num_batched_tokens": max(2048, context + 8)}
    engine = ProfilingEngine(checkpoint, options, log_path or Path(f"/tmp/supernet_cost_{os.getpid()}.log"))
    per_layer = [[0.0] * len(mixers) for _ in range(num_layers)]
    shared_samples = []
    bar = tqdm(total=len(mixers) + len(validate), desc=f"cost at {context} tokens", disable=not progress)
    try:
        for m, name in enumerate(mixers):
            steps_measured = engine.measure(f"{name}*", context, batch, steps)[1:]  # the first decode step warms up
            layer_samples = [_mixer_seconds(profile, num_layers, batch) for _, profile in steps_measured]
            for layer in range(num_layers):
                per_layer[layer][m] = statistics.median(sample.get(layer, 0.0) for sample in layer_samples)
            shared_samples += [total - sum(sample.values()) for (total, _), sample in zip(steps_measured, layer_samples, strict=True)]
            bar.update(1)
        model = CostModel(mixers=mixers, context=context, batch=batch, per_layer=per_layer,
                          shared=statistics.median(shared_samples))
        for placement in validate:
            measured = statistics.median(total for total, _ in engine.measure(placement, context, batch, steps)[1:])
            indices = [mixers.index(name) for name in _expand(placement, num_layers)]
            predicted = model.predict(indices)
            model.validation.append({"placement": placement, "measured": measured, "predicted": predicted,
                                     "relative_error": (predicted - measured) / measured})
            bar.update(1)
    finally:
        bar.close()
        engine.stop()
    return model


def _expand(placement: str, num_layers: int) -> list[str]:
    from shared_spec.placement import parse_compact

    return parse_compact(placement, num_layers)
