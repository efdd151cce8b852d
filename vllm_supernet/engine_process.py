"""`vllm_supernet.engine_process`: an offline vLLM engine in a child process, driven over a pipe.

vLLM's offline `LLM` needs an `if __name__ == "__main__":` guard and its engine-core child must be shut down
with it, so measurements that start engines from library code (`benchmarks/`, the placement toolkit's cost
model) run one in a spawned process: `target(connection, *args)` builds it, sends `{"ready": True}`, then answers
each command dict with a dict (`{"error": traceback}` on failure) until `{"op": "stop"}`; `serve_engine` is that
child's loop.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class EngineProcess:
    def __init__(self, name: str, target, args: tuple, log_path: Path, wait: bool = True):
        self.name = name
        self.log_path = Path(log_path)
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, *args))
        self.process.start()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        self._answer()

    def request(self, command: dict) -> dict:
        self.connection.send(command)
        return self._answer()

    def _answer(self) -> dict:
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"engine {self.name} died; log {self.log_path}:\n{self.log_tail()}")
        answer = self.connection.recv()
        if "error" in answer:
            raise RuntimeError(f"engine {self.name}: {answer['error']}\nlog {self.log_path}:\n{self.log_tail()}")
        return answer

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if not self.process.is_alive():
            return
        try:
            self.connection.send({"op": "stop"})
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)


def serve_engine(
    connection,
    log_path: str,
    build: Callable[[], Any],
    answer: Callable[[Any, dict], dict],
    extra_env: dict[str, str] | None = None,
) -> None:
    """The child side of `EngineProcess`: vLLM's output (and its engine-core child's) goes to `log_path`;
    `llm = build()`; `{"ready": True}`; then `answer(llm, command)` for each command until `{"op": "stop"}`. Any
    failure reaches the parent as `{"error": traceback}`; leaving (SIGTERM included) shuts the engine core down,
    which would otherwise outlive this process."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(extra_env or {})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the `finally` below
    llm = None
    try:
        llm = build()
        connection.send({"ready": True})
        while True:
            command = connection.recv()
            if command["op"] == "stop":
                break
            connection.send(answer(llm, command))
    except BaseException:  # noqa: B036 -- report any failure (also KeyboardInterrupt) to the parent
        try:
            connection.send({"error": traceback.format_exc()})
        except OSError:
            pass
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        connection.close()


def time_decode(engine, num_requests: int, outputs: dict[str, list[int]] | None = None) -> tuple[int, float]:
    """Step a `LLMEngine` until its requests finish: (tokens decoded, seconds). The clock starts once each of the
    `num_requests` requests has its first token, so prefill never counts. `outputs`, if given, receives each
    request's generated token ids."""
    import time

    generated: dict[str, int] = {}
    start = counted_at_start = None
    now = time.perf_counter()
    while engine.has_unfinished_requests():
        step_outputs = engine.step()
        now = time.perf_counter()
        for output in step_outputs:
            generated[output.request_id] = len(output.outputs[0].token_ids)
            if outputs is not None and output.finished:  # copied once, not on every step of the clock
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        if start is None and len(generated) == num_requests and min(generated.values()) >= 1:
            start, counted_at_start = now, sum(generated.values())
    if start is None:
        raise RuntimeError("the requests finished before every one had its first token")
    return sum(generated.values()) - counted_at_start, now - start
