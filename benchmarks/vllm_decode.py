"""Decode throughput of the vLLM plugin per placement, a mixed batch, and thinning's cache savings.

    .venv/bin/python benchmarks/vllm_decode.py --contexts 512 2048 --out benchmarks/vllm_decode.md

Builds a random supernet (hidden 256, 4 layers, each with attention / sliding_window / gdn / kda,
head size 32) with `fast_llm_supernet`, serves it with the CPU build of vLLM (bf16 weights,
float32 recurrent state), and measures, in one run so the ratios share the machine's state:

* decode tokens/s of all-FA, all-SWA, all-GDN, all-KDA and two hybrids at each context length
  (batch `--batch`, fresh prompts; timed from the batch's last first token to its last token);
* a batch of four requests with four different placements against the uniform batches' average;
* cache memory per request of a deployment thinned to {all-GDN, all-SWA} against an unthinned one:
  the ratio of vLLM's own "Maximum concurrency for max_model_len tokens per request" at the same
  memory budget (an unthinned deployment gives every request blocks in every mixer's cache group).

Each engine runs in its own process (vLLM's offline engine needs the `__main__` guard).
Not part of the test suite: timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLACEMENTS = {
    "all-FA": "attention*",
    "all-SWA": "sliding_window*",
    "all-GDN": "gdn*",
    "all-KDA": "kda*",
    "hybrid FA+GDN": "attention,gdn*2,attention",
    "hybrid SWA+KDA+GDN": "sliding_window,kda,gdn,sliding_window",
}
THINNED = ["gdn*", "sliding_window*"]


def make_checkpoint(directory: Path, window: int) -> Path:
    import torch

    from fast_llm_supernet.model import SupernetForCausalLM
    from shared_spec import Apriel2TextConfig

    attention = {"type": "attention", "heads": 8, "head_groups": 4, "head_size": 32, "add_linear_biases": False,
                 "rotary": {"type": "mistral_1d", "theta": 10000.0}}  # fmt: skip
    block = {
        "mixer": {
            "type": "stochastic",
            "main_mixer_name": "attention",
            "mixers": {
                "attention": attention,
                "sliding_window": {**attention, "window_size": window},
                "gdn": {"type": "gdn", "value_heads": 8, "key_heads": 4, "key_head_dim": 32, "value_head_dim": 32,
                        "convolution_layer": {"kernel_size": 4}},  # fmt: skip
                "kda": {"type": "kda", "heads": 8, "head_dim": 32, "convolution_layer": {"kernel_size": 4}},
            },
        },
        "mlp": {"type": "mlp", "intermediate_size": 512, "activation": "silu", "gated": True, "add_linear_biases": False},
        "normalization": {"type": "rms_norm", "epsilon": 1e-5},
    }
    config = Apriel2TextConfig.model_validate(
        {"hidden_size": 256, "vocab_size": 1024, "embeddings": {"max_position_embeddings": 32768},
         "decoder": {"type": "fixed", "num_blocks": 4, "block": block}, "bos_token_id": 1, "eos_token_id": 2}
    )  # fmt: skip
    torch.manual_seed(0)
    model = SupernetForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def _engine(model: str, max_model_len: int, allowed: list[str] | None):
    from vllm import LLM

    overrides = {"supernet_placements": allowed} if allowed else None
    # disable_log_stats=False: outputs carry per-request first/last token timestamps.
    return LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", gpu_memory_utilization=0.3,
               max_model_len=max_model_len, enforce_eager=True, max_num_seqs=16, hf_overrides=overrides,
               disable_log_stats=False)  # fmt: skip


def _decode_rate(llm, prompts, placements, max_tokens: int) -> float:
    """Tokens/s while every request of the batch is decoding: from the last request's first token to
    the last token (vLLM's per-request timestamps), so prefill and scheduling are left out."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, detokenize=False,
                             ignore_eos=True, extra_args={"placement": p}) for p in placements]  # fmt: skip
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    start = max(o.metrics.first_token_ts for o in outputs)
    end = max(o.metrics.last_token_ts for o in outputs)
    return len(outputs) * (max_tokens - 1) / max(end - start, 1e-9)


def worker(args) -> None:
    import random

    llm = _engine(args.model, max(args.contexts) + args.new_tokens + 8, args.allowed)
    rng = random.Random(0)

    def prompts(n: int, length: int):
        return [[1] + [rng.randrange(3, 1024) for _ in range(length - 1)] for _ in range(n)]

    def decode_rate(placements: list[str], context: int) -> float:
        _decode_rate(llm, prompts(len(placements), 16), placements, 3)  # warm-up
        return _decode_rate(llm, prompts(len(placements), context), placements, 1 + args.new_tokens)

    results = {"decode": {}, "mixed": {}}
    if not args.allowed and not args.memory_only:
        for context in args.contexts:
            results["decode"][context] = {
                name: decode_rate([placement] * args.batch, context) for name, placement in PLACEMENTS.items()
            }
        four = [PLACEMENTS[name] for name in ("all-FA", "all-SWA", "all-GDN", "all-KDA")]
        context = args.contexts[0]
        uniform = [decode_rate([p] * 4, context) for p in four]
        results["mixed"] = {"context": context, "mixed": decode_rate(four, context), "uniform": uniform}
    print("RESULT " + json.dumps(results), flush=True)


def run_worker(
    model: str, contexts, batch: int, new_tokens: int, allowed: list[str] | None, memory_only: bool = False
) -> tuple[dict, float | None]:
    command = [sys.executable, __file__, "--worker", "--model", model, "--batch", str(batch),
               "--new-tokens", str(new_tokens), "--contexts", *map(str, contexts)]  # fmt: skip
    if memory_only:
        command.append("--memory-only")
    if allowed:
        command += ["--allowed", *allowed]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    output = process.stdout + process.stderr
    result = next((json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise RuntimeError(output[-6000:])
    concurrency = re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", output)
    return result, float(concurrency.group(1)) if concurrency else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-only", action="store_true", help="only the thinning comparison")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--allowed", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as scratch:
        model = str(make_checkpoint(Path(scratch) / "supernet", args.window))
        full, full_capacity = run_worker(model, args.contexts, args.batch, args.new_tokens, None, args.memory_only)
        _, thin_capacity = run_worker(model, args.contexts, args.batch, args.new_tokens, THINNED)

    lines = []
    if not args.memory_only:
        lines += _decode_table(args, full)
    if full_capacity and thin_capacity:
        lines += ["", f"Requests of max_model_len tokens that fit the same cache memory: unthinned {full_capacity:.1f}, "
                  f"thinned to {THINNED} {thin_capacity:.1f}: {thin_capacity / full_capacity:.1f}x less "
                  "cache memory per request."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def _decode_table(args, full: dict) -> list[str]:
    lines = [f"# vLLM plugin decode benchmark (CPU build, batch {args.batch}, {args.new_tokens} new tokens, bf16)", ""]
    lines += ["| placement | " + " | ".join(f"ctx {c} tok/s" for c in args.contexts) + " | vs all-FA at longest |"]
    lines += ["|---" * (len(args.contexts) + 2) + "|"]
    longest = str(max(args.contexts))
    for name in PLACEMENTS:
        rates = [full["decode"][str(c)][name] for c in args.contexts]
        ratio = full["decode"][longest][name] / full["decode"][longest]["all-FA"]
        lines.append(f"| {name} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {ratio:.2f}x |")
    mixed = full["mixed"]
    average = sum(mixed["uniform"]) / len(mixed["uniform"])
    lines += ["", f"Mixed batch of four placements at ctx {mixed['context']}: {mixed['mixed']:.1f} tok/s; "
              f"uniform average {average:.1f} tok/s; ratio {mixed['mixed'] / average:.2f}x."]  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
