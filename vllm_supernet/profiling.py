"""`vllm_supernet.profiling`: time each layer's mixer inside a running vLLM worker (the placement toolkit's cost model).

Mixed into the workers with `LLM(..., worker_extension_cls="vllm_supernet.profiling.MixerProfiler")`; then
`llm.collective_rpc("start_mixer_profiling")` wraps the model's `forward` and every built mixer's `run` with a wall
clock, and `llm.collective_rpc("mixer_profile")` returns (and clears) one record per forward pass: its token count,
its seconds, and per layer the seconds its mixers took in it. On CPU every kernel is synchronous, so a call's wall
time is its cost; on CUDA the wrappers synchronise before reading the clock (which slows the run they measure).
"""

from __future__ import annotations

import time

import torch


class MixerProfiler:
    def start_mixer_profiling(self) -> int:
        """Wrap the forward pass and every mixer's `run`; returns how many mixers are timed."""
        model = self.model_runner.get_model()
        self._forwards: list[dict] = []
        num_layers = len(model.model.decoder.blocks)
        self._current = [0.0] * num_layers  # layer -> mixer seconds in the running forward
        synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        if getattr(model, "_profiled_forward", None) is None:
            forward = model.forward

            def timed_forward(input_ids, *args, _forward=forward, **kwargs):
                self._current = [0.0] * num_layers
                synchronize()
                start = time.perf_counter()
                output = _forward(input_ids, *args, **kwargs)
                synchronize()
                tokens = int(input_ids.shape[0]) if input_ids is not None else int(kwargs["positions"].shape[0])
                self._forwards.append({"tokens": tokens, "seconds": time.perf_counter() - start,
                                       "mixers": self._current})
                return output

            model._profiled_forward = forward
            model.forward = timed_forward
        count = 0
        for index, block in enumerate(model.model.decoder.blocks):
            for mixer in block.mixer.mixers.values() if block.is_stochastic else [block.mixer]:
                if getattr(mixer, "_profiled_run", None) is not None:
                    continue
                original = mixer.run

                def timed(hidden_states, *args, _run=original, _layer=index, **kwargs):
                    synchronize()
                    start = time.perf_counter()
                    output = _run(hidden_states, *args, **kwargs)
                    synchronize()
                    self._current[_layer] += time.perf_counter() - start
                    return output

                mixer._profiled_run = original
                mixer.run = timed
                count += 1
        return count

    def mixer_profile(self) -> list[dict]:
        """The forward passes since the last call: [{"tokens", "seconds", "mixers": [seconds per layer]}]."""
        forwards, self._forwards = self._forwards, []
        return forwards
