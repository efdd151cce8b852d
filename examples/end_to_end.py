"""The main job on the embedded default: one tiny checkpoint, many speeds, on a CPU, end to end.

    python examples/end_to_end.py [--workdir runs/end_to_end]

1. Make a tiny Llama-style teacher and a real BPE tokenizer from text that ships with Python.
2. Convert it into a supernet checkpoint: attention, sliding-window, GDN and KDA in every layer.
3. Distil the supernet for a short run (stochastic placements, frozen teacher) and report each
   uniform placement's held-out KL to the teacher before and after.
4. Generate with several placements in PyTorch: each placement's text and how far its next-token
   distribution is from the teacher's (per-token KL on held-out text, as computed by `transformers`).
5. Serve the distilled checkpoint with vLLM (the OpenAI server on loopback, this project's plugin)
   and answer requests with several placements through the `openai` client.

Every stage writes into --workdir and is skipped when its output is already there (--fresh redoes all).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The Zen of Python says", "def dedent(text):\n    \"\"\"", "Return a new list"]
PLACEMENTS = ["all-attention", "all-swa", "all-gdn", "all-kda", "attention*2,gdn*2", "kda,gdn,sliding_window,attention"]


def stage(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 88 - len(title)), flush=True)


def make_teacher(workdir: Path, steps: int) -> Path:
    from fast_llm_supernet.tools.tiny_teacher import TinyTeacherConfig, make_tiny_teacher

    teacher = workdir / "teacher"
    if not (teacher / "model.safetensors").exists():
        make_tiny_teacher(teacher, TinyTeacherConfig(steps=steps))
    return teacher


def convert_teacher(teacher: Path, workdir: Path, window_size: int) -> Path:
    from fast_llm_supernet.tools.convert import convert

    supernet = workdir / "supernet"
    if not (supernet / "model.safetensors").exists():
        config = convert(teacher, supernet, window_size=window_size)
        print(f"converted {teacher} -> {supernet}: {config.num_layers} layers x 4 mixers, window {window_size}")
    return supernet


def distil(supernet: Path, workdir: Path, steps: int) -> Path:
    """Short stochastic distillation with the tiny example's config; prints KL before -> after."""
    from fast_llm_supernet.training.config import load_config
    from fast_llm_supernet.training.data import load_tokenizer  # noqa: F401  (fails early if transformers is broken)
    from fast_llm_supernet.training.trainer import Trainer, format_comparison

    data = workdir / "data"
    if not (data / "text.jsonl").exists():
        import subprocess

        subprocess.run([sys.executable, str(REPO / "examples" / "make_tiny_data.py"), "--output", str(data)], check=True)
    distilled = workdir / "distilled"
    if (distilled / "model.safetensors").exists():
        print(f"{distilled} exists; skipping distillation (--fresh redoes it)")
        return distilled
    config = load_config(
        REPO / "examples" / "tiny_distill.yaml",
        [
            f"output_dir={workdir / 'distill-run'}",
            f"steps={steps}",
            f"optimizer.warmup_steps={max(1, steps // 10)}",
            f"model.checkpoint={supernet}",
            f"data.train.paths=[{data / 'text.jsonl'}]",
            f"export.path={distilled}",
            f"checkpoint.every={max(1, steps // 2)}",
        ],
    )
    result = Trainer(config).run()
    print(format_comparison(result.initial_eval, result.final_eval))
    return distilled


@torch.no_grad()
def compare_placements(checkpoint: Path, teacher_dir: Path, held_out: str) -> None:
    """Per placement: greedy text for each prompt, and per-token KL(teacher || placement) on held-out text."""
    from transformers import AutoModelForCausalLM

    from fast_llm_supernet.model import SupernetForCausalLM
    from fast_llm_supernet.training.data import load_tokenizer
    from fast_llm_supernet.training.loss import forward_kl

    tokenizer = load_tokenizer(checkpoint)
    model = SupernetForCausalLM.from_pretrained(checkpoint).eval()
    # use_safetensors: never fall back to unpickling a pytorch_model.bin.
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True).eval()
    held_out_ids = torch.tensor([tokenizer(held_out)["input_ids"][:256]])
    teacher_logits = teacher(held_out_ids).logits
    print(f"{'placement':<44} {'hash':<12} {'KL to teacher':>13}")
    for name in PLACEMENTS:
        placement = model.resolve_placement(name)
        kl = max(0.0, forward_kl(model(held_out_ids, placement=placement), teacher_logits).mean().item())
        print(f"{name + ' = ' + placement.canonical:<44} {placement.hash:<12} {kl:13.4f}")
        for prompt in PROMPTS[:2]:
            prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            output = model.generate(prompt_ids, placement=placement, max_new_tokens=24)
            text = tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True)
            print(f"    {prompt!r} -> {text!r}")


def serve_and_query(checkpoint: Path, workdir: Path) -> None:
    """One vLLM server for the checkpoint; each request picks its own placement (OpenAI client)."""
    import json
    import urllib.request

    from openai import BadRequestError, OpenAI

    from vllm_supernet.server_process import openai_server

    with openai_server(checkpoint, workdir / "server.log", served_model_name="supernet") as server:
        with urllib.request.urlopen(f"{server.openai_base_url}/supernet/presets") as response:
            presets = json.load(response)
        print(f"server up at {server.base_url}; presets: {', '.join(presets['presets'])}")
        client = OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0)
        for placement in [None, *PLACEMENTS]:
            started = time.perf_counter()
            extra = {} if placement is None else {"placement": placement}
            reply = client.completions.create(
                model="supernet", prompt=PROMPTS[0], max_tokens=24, temperature=0.0, extra_body=extra
            )
            seconds = time.perf_counter() - started
            print(f"  {str(placement or '(default)'):<36} {seconds:5.2f} s  {reply.choices[0].text!r}")
        chat = client.chat.completions.create(
            model="supernet",
            messages=[{"role": "user", "content": "What does `textwrap.dedent` do?"}],
            max_tokens=24,
            temperature=0.0,
            extra_body={"placement": "all-gdn"},
        )
        print(f"  chat, all-gdn: {chat.choices[0].message.content!r}")
        try:
            client.completions.create(model="supernet", prompt="x", max_tokens=1, extra_body={"placement": "gdn,mamba*"})
        except BadRequestError as error:
            print(f"  an invalid placement gets HTTP {error.status_code}: {error.message}")


def held_out_text() -> str:
    import codecs
    import this  # noqa: F401  (the Zen of Python, encoded in the module; decoded below)

    return codecs.decode(sys.modules["this"].s, "rot13")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "end_to_end")
    parser.add_argument("--teacher-steps", type=int, default=200, help="pre-training steps of the tiny teacher")
    parser.add_argument("--distill-steps", type=int, default=150, help="stochastic distillation steps")
    parser.add_argument("--window-size", type=int, default=16, help="sliding-window mixer's window (16: short enough to matter on 128-token rows)")
    parser.add_argument("--skip-serve", action="store_true", help="stop after the PyTorch stages")
    parser.add_argument("--fresh", action="store_true", help="delete --workdir first")
    args = parser.parse_args()
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    stage("1. tiny teacher and tokenizer (text shipped with Python)")
    teacher = make_teacher(args.workdir, args.teacher_steps)
    stage("2. teacher -> four-mixer supernet checkpoint")
    supernet = convert_teacher(teacher, args.workdir, args.window_size)
    stage("3a. placements at initialisation")
    compare_placements(supernet, teacher, held_out_text())
    stage("3b. stochastic distillation")
    distilled = distil(supernet, args.workdir, args.distill_steps)
    stage("4. placements after distillation")
    compare_placements(distilled, teacher, held_out_text())
    if not args.skip_serve:
        stage("5. serving with vLLM: one server, a placement per request")
        serve_and_query(distilled, args.workdir)
    print(f"\nend to end in {time.perf_counter() - started:.0f} s; outputs in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
