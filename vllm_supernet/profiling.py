"""`vllm_supernet.profiling`: time each layer's mixer inside a running vLLM worker (the placement toolkit's cost model).

Mixed into the workers with `LLM(..., worker_extension_cls="vllm_supernet.profiling.MixerProfiler")`; then
`llm.collective_rpc("start_mixer_profiling")` wraps every built mixer's `run` with a wall clock and
`llm.collective_rpc("mixer_profile")` returns (and clears) what was recorded: per (layer, mixer) the number of
token rows and the seconds of each call. On CPU every kernel is synchronous, so a call's wall time is its cost;
on CUDA the wrapper synchronises before reading the clock (which slows the run it measures).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class MixerProfiler:
    def start_mixer_profiling(self) -> int:
        """Wrap every mixer's `run`; returns how many mixers are timed."""
        model = self.model_runner.get_model()
        self._mixer_calls: dict[str, list[tuple[int, float]]] = defaultdict(list)
        synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        count = 0
        for index, block in enumerate(model.model.decoder.blocks):
            mixers = block.mixer.mixers.items() if block.is_stochastic else [("", block.mixer)]
            for name, mixer in mixers:
                if getattr(mixer, "_profiled_run", None) is not None:
                    continue
                original = mixer.run
                key = f"{index}:{name}"

                def timed(hidden_states, *args, _run=original, _key=key, **kwargs):
                    synchronize()
                    start = time.perf_counter()
                    output = _run(hidden_states, *args, **kwargs)
                    synchronize()
                    self._mixer_calls[_key].append((int(hidden_states.shape[0]), time.perf_counter() - start))
                    return output

                mixer._profiled_run = original
                mixer.run = timed
                count += 1
        return count

    def mixer_profile(self) -> dict[str, list[tuple[int, float]]]:
        calls, self._mixer_calls = dict(self._mixer_calls), defaultdict(list)
        return calls
