"""Write the real-teacher run's chat data: what the teacher itself says, to prompts made from what ships with Python.

    python examples/smollm2/make_chat_data.py --teacher runs/smollm2/supernet --output runs/smollm2/data

The teacher is the checkpoint's all-attention placement (the converted SmolLM2 reproduces the original's logits).
Prompts: `fast_llm_supernet/training/chat_prompts.py` (things named in `unicodedata`, cities of the time-zone
database, the language reference's topics, stdlib functions and classes, the Zen of Python; a task template drawn
per subject), split by subject; the training prompts, in an order that interleaves the sources, are cut into two
disjoint parts:

* `teacher_text.jsonl`: the first `--distill-prompts` prompts and the teacher's **sampled** answers (temperature
  0.7, top-p 0.95, seed 0, at most 160 new tokens), each conversation rendered through the chat template as one
  `{"text": ...}` document: distillation text beyond the documentation, in the format chats are served in. The
  distillation stages train on it and on `train.jsonl` (make_data.py) together; `mix.json` gives each file's
  tokens, i.e. the mix;
* `sft_train.jsonl`: the next `--sft-prompts` prompts and the teacher's **greedy** answers (at most 128 new
  tokens), `{"messages": ..., "finished": ...}`; an answer the budget cut (`finished: false`, most of SmolLM2's)
  is kept as an open turn: its text carries loss, no end-of-turn follows it (so the model learns the teacher's
  words, not to stop at the cut);
* `chat_eval.json`: the chat evaluation's prompts: the 18 hand-written factual questions and the first
  `--eval-prompts` held-out prompts (subjects no training prompt names); `sft_heldout.jsonl`: the teacher's greedy
  answers to them, the SFT stage's held-out loss.

The raw answers are appended batch by batch to `answers_*.jsonl`: an interrupted run resumes there and writes what
an uninterrupted one writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.training.chat_prompts import build_prompts, evaluation_prompts
from fast_llm_supernet.training.data import load_tokenizer, read_documents, render_conversation
from fast_llm_supernet.training.teacher_text import AnswerSettings, conversation, read_records, write_answers
from shared_spec import MixerKind, uniform_placement

SAMPLED = AnswerSettings(temperature=0.7, top_p=0.95, max_new_tokens=160, seed=0, batch_size=16)
GREEDY = AnswerSettings(temperature=0.0, max_new_tokens=128, batch_size=16)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def token_count(tokenizer, path: Path) -> int:
    return sum(len(ids) + 1 for ids in tokenizer(read_documents([path], "jsonl"), add_special_tokens=True)["input_ids"])


def make_chat_data(teacher: Path, output: Path, distill_prompts: int, sft_prompts: int, eval_prompts: int,
                   seed: int = 0, sampled_settings: AnswerSettings = SAMPLED, greedy_settings: AnswerSettings = GREEDY,
                   log=print) -> dict:
    """Writes the files of the module docstring; returns the mix (also `mix.json`)."""
    output.mkdir(parents=True, exist_ok=True)
    model = SupernetForCausalLM.from_pretrained(teacher).eval()
    tokenizer = load_tokenizer(teacher)
    placement = uniform_placement(model.spec, MixerKind.ATTENTION)
    train_prompts, _ = build_prompts(seed)
    if len(train_prompts) < distill_prompts + sft_prompts:
        raise ValueError(f"{len(train_prompts)} training prompts, fewer than {distill_prompts} + {sft_prompts} asked for")
    evaluation = evaluation_prompts(eval_prompts, seed)

    def answers(name: str, prompts, settings: AnswerSettings) -> list[dict]:
        start, path = time.perf_counter(), output / f"answers_{name}.jsonl"
        wanted = {prompt.text for prompt in prompts}
        done = sum(record["prompt"] in wanted for record in read_records(path))
        with tqdm(total=len(prompts), initial=done, desc=f"teacher answers ({name})", unit="answer") as bar:
            records = write_answers(path, model, tokenizer, prompts, placement, settings, progress=bar.update)
        log(f"{name}: {len(records)} answers in {time.perf_counter() - start:.0f} s")
        return records

    sampling = sampled_settings.model_copy(update={"seed": seed})
    sampled = answers("sampled", train_prompts[:distill_prompts], sampling)
    write_jsonl(output / "teacher_text.jsonl",
                [{"text": render_conversation(tokenizer, conversation(record))[0]} for record in sampled])
    greedy = answers("greedy", train_prompts[distill_prompts : distill_prompts + sft_prompts], greedy_settings)
    write_jsonl(output / "sft_train.jsonl", [{"messages": conversation(r), "finished": r["finished"]} for r in greedy])
    held_out = answers("eval", evaluation, greedy_settings)
    write_jsonl(output / "sft_heldout.jsonl", [{"messages": conversation(r), "finished": r["finished"]} for r in held_out])
    (output / "chat_eval.json").write_text(json.dumps([p.model_dump(mode="json") for p in evaluation], indent=1) + "\n")

    mix = {"documentation_tokens": token_count(tokenizer, output / "train.jsonl") if (output / "train.jsonl").exists() else None,
           "teacher_text_tokens": token_count(tokenizer, output / "teacher_text.jsonl"),
           "teacher_text_conversations": len(sampled), "sampling": sampling.model_dump(),
           "sft_conversations": len(greedy), "sft_cut_by_budget": sum(not r["finished"] for r in greedy),
           "eval_prompts": len(evaluation)}
    if mix["documentation_tokens"]:
        mix["teacher_text_share"] = mix["teacher_text_tokens"] / (mix["teacher_text_tokens"] + mix["documentation_tokens"])
    (output / "mix.json").write_text(json.dumps(mix, indent=2) + "\n")
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="supernet checkpoint (its all-attention placement answers)")
    parser.add_argument("--output", type=Path, required=True, help="the data directory (make_data.py's)")
    parser.add_argument("--distill-prompts", type=int, default=400)
    parser.add_argument("--sft-prompts", type=int, default=280)
    parser.add_argument("--eval-prompts", type=int, default=12, help="held-out prompts besides the factual questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mix = make_chat_data(args.teacher, args.output, args.distill_prompts, args.sft_prompts, args.eval_prompts, args.seed)
    print(json.dumps(mix, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
