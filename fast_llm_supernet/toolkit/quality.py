"""`fast_llm_supernet.toolkit.quality`: the per-placement quality table of a supernet, with chat agreement.

    supernet-place quality --checkpoint DIR --data heldout.jsonl --output DIR [--prompts prompts.json] [--teacher DIR]

The placements are the ones a reader asks about first: each uniform placement, attention in every other
layer (GDN, or KDA, in the rest), and attention kept in 8 and in 4 layers spread evenly over the depth (GDN in
the rest). For each: held-out top-1 agreement with the teacher, KL to it and perplexity
(`toolkit.evaluate`), and its greedy chat answers to held-out prompts scored against the teacher's
(`toolkit.chat_eval`: exact and first-sentence agreement, the teacher-forced likelihood of the teacher's
answers, factual questions the teacher gets right). The prompts default to `chat_prompts.evaluation_prompts()`:
the hand-written factual questions and held-out prompts built from what ships with Python.
Writes `quality.json` and `quality.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.toolkit.chat_eval import chat_agreement, reference_answers
from fast_llm_supernet.toolkit.evaluate import HeldOutRows, evaluate_placements
from fast_llm_supernet.training.chat_prompts import ChatPrompt
from fast_llm_supernet.training.data import load_tokenizer
from shared_spec import MixerKind, Placement, SupernetSpec

MARKDOWN_ANSWERS = 8  # answers per placement shown in quality.md (quality.json holds every one)
# Four chat prompts the table answered before the chat evaluation; benchmarks/bench_speculative.py measures
# draft acceptance on them, so its figures stay comparable across runs.
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


def quality_table(
    model: SupernetForCausalLM, tokenizer, held_out: HeldOutRows, prompts: list[ChatPrompt] | None = None,
    max_new_tokens: int = 48, checkpoint_label: str = "", teacher: SupernetForCausalLM | None = None,
) -> list[dict]:
    """One row per named placement: its held-out text figures, and with `prompts` its chat agreement with the
    teacher (`teacher`'s all-attention placement, default the model's own) and its answers."""
    named = named_placements(model.spec)
    records = evaluate_placements(model, list(named.values()), held_out, checkpoint_label)
    reference = reference_answers(teacher or model, tokenizer, prompts, max_new_tokens) if prompts else None
    rows = []
    for (label, placement), record in zip(named.items(), records, strict=True):
        row = {"label": label, **record.model_dump(), "answers": {}}
        if reference is not None:
            agreement, answers = chat_agreement(model, tokenizer, placement, reference)
            row["chat"] = agreement.model_dump()
            row["answers"] = dict(zip((p.text for p in reference.prompts), answers, strict=True))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    chat = bool(rows) and "chat" in rows[0]
    header = "| placement | top-1 agreement | KL to teacher (nats/token) | perplexity |"
    if chat:
        header += " chat: exact | first sentence | log-prob of the teacher's answer / token | factual right |"
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for row in rows:
        line = (f"| {row['label']} | {row['top1']:.3f} ± {row['top1_se']:.3f} | {row['kl']:.3f} ± {row['kl_se']:.3f} "
                f"| {row['ppl']:.2f} |")
        if chat:
            c = row["chat"]
            line += (f" {c['exact']:.2f} | {c['first_sentence']:.2f} | {c['logprob']:.3f} "
                     f"| {c['factual_right']}/{c['factual_teacher_right']} |")
        lines.append(line)
    tokens = rows[0]["tokens"] if rows else 0
    lines += ["", f"Held-out text: `{rows[0]['data'] if rows else ''}` ({tokens} tokens; ± one standard error over rows)."]
    if chat:
        c = rows[0]["chat"]
        lines += [f"Chat: {c['prompts']} held-out prompts, greedy answers against the teacher's (whose own log-prob of "
                  f"its answers is {c['teacher_logprob']:.3f} / token); factual: of the hand-written factual questions "
                  "the teacher answers right, those the placement answers right too."]
    lines.append("")
    for row in rows:
        if row["answers"]:
            lines.append(f"**{row['label']}**")
            lines += [f"- {prompt!r} → {answer!r}" for prompt, answer in list(row["answers"].items())[:MARKDOWN_ANSWERS]]
            lines.append("")
    return "\n".join(lines)


def write_quality(rows: list[dict], output: Path, title: str = "") -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    (output / "quality.md").write_text(markdown_table(rows, title) + "\n")


def load_model_and_tokenizer(checkpoint: Path):
    return SupernetForCausalLM.from_pretrained(checkpoint), load_tokenizer(checkpoint)

