"""`fast_llm_supernet.toolkit.quality`: the per-placement quality table of a supernet, with chat answers.

    supernet-place quality --checkpoint DIR --data heldout.jsonl --output DIR [--prompts prompts.json]

The placements are the ones a reader asks about first: each uniform placement, attention in every other
layer (GDN, or KDA, in the rest), and attention kept in 8 and in 4 layers spread evenly over the depth (GDN in
the rest). For each: held-out top-1 agreement with the teacher, KL to it and perplexity
(`toolkit.evaluate`), and its greedy answers to a few chat prompts, through the checkpoint's chat template.
Writes `quality.json` and `quality.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.toolkit.evaluate import HeldOutRows, evaluate_placements
from fast_llm_supernet.training.data import CHAT_TEMPLATE, load_tokenizer
from shared_spec import MixerKind, Placement, SupernetSpec

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
    "What is a list in Python?",
)


def _name_of(spec: SupernetSpec, layer: int, kind: MixerKind) -> str:
    return next(name for name, k in spec.layers[layer].mixers.items() if k == kind)


def spread_layers(num_layers: int, count: int) -> list[int]:
    """`count` layers spread evenly over the depth, each in the middle of its share: 8 of 30 -> 1, 5, 9, 13, 16, 20, 24, 28."""
    return sorted({min(num_layers - 1, int((i + 0.5) * num_layers / count)) for i in range(count)})


def keep_attention(spec: SupernetSpec, layers: list[int], fill: MixerKind) -> Placement:
    """Attention in `layers`, `fill` in every other layer."""
    mixers = [_name_of(spec, i, MixerKind.ATTENTION if i in layers else fill) for i in range(spec.num_layers)]
    return Placement.parse(mixers, spec)


def named_placements(spec: SupernetSpec) -> dict[str, Placement]:
    """Label -> placement, in the table's order (labels say which layers keep attention)."""
    num_layers = spec.num_layers
    named = {}
    for kind, label in ((MixerKind.ATTENTION, "all-attention"), (MixerKind.SLIDING_WINDOW, "all-SWA"),
                        (MixerKind.GDN, "all-GDN"), (MixerKind.KDA, "all-KDA")):
        named[label] = keep_attention(spec, list(range(num_layers)) if kind == MixerKind.ATTENTION else [], kind)
    every_other = list(range(0, num_layers, 2))
    named["attention in even layers, GDN in odd"] = keep_attention(spec, every_other, MixerKind.GDN)
    named["attention in even layers, KDA in odd"] = keep_attention(spec, every_other, MixerKind.KDA)
    for count in (8, 4):
        if count < num_layers:
            layers = spread_layers(num_layers, count)
            named[f"attention in {count} layers ({', '.join(map(str, layers))}), GDN elsewhere"] = keep_attention(
                spec, layers, MixerKind.GDN
            )
    return named


@torch.no_grad()
def chat_answers(model: SupernetForCausalLM, tokenizer, placement: Placement, prompts, max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time, through the tokenizer's chat template (the trainer's own
    `CHAT_TEMPLATE` for tokenizers without one, as the tiny teacher's)."""
    answers = []
    template = None if tokenizer.chat_template else CHAT_TEMPLATE
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], chat_template=template, add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )["input_ids"]
        output = model.generate(ids, placement=placement, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def quality_table(
    model: SupernetForCausalLM, tokenizer, held_out: HeldOutRows, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 48,
    checkpoint_label: str = "",
) -> list[dict]:
    named = named_placements(model.spec)
    records = evaluate_placements(model, list(named.values()), held_out, checkpoint_label)
    rows = []
    for (label, placement), record in zip(named.items(), records, strict=True):
        answers = chat_answers(model, tokenizer, placement, prompts, max_new_tokens) if prompts else []
        rows.append({"label": label, **record.model_dump(), "answers": dict(zip(prompts, answers, strict=True))})
    return rows


def markdown_table(rows: list[dict], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| placement | top-1 agreement | KL to teacher (nats/token) | perplexity |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['top1']:.3f} ± {row['top1_se']:.3f} | {row['kl']:.3f} ± {row['kl_se']:.3f} "
            f"| {row['ppl']:.2f} |"
        )
    tokens = rows[0]["tokens"] if rows else 0
    lines += ["", f"Held-out text: `{rows[0]['data'] if rows else ''}` ({tokens} tokens; ± one standard error over rows).", ""]
    for row in rows:
        if row["answers"]:
            lines.append(f"**{row['label']}**")
            lines += [f"- {prompt!r} → {answer!r}" for prompt, answer in row["answers"].items()]
            lines.append("")
    return "\n".join(lines)


def write_quality(rows: list[dict], output: Path, title: str = "") -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    (output / "quality.md").write_text(markdown_table(rows, title) + "\n")


def load_model_and_tokenizer(checkpoint: Path):
    return SupernetForCausalLM.from_pretrained(checkpoint), load_tokenizer(checkpoint)

