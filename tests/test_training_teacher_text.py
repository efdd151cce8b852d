"""The teacher's own answers: batched by prompt length, seeded, reproducible and resumable (tiny teacher, real model)."""

import json
from pathlib import Path

import pytest
import torch

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.tools.convert import convert
from fast_llm_supernet.tools.tiny_teacher import make_tiny_teacher
from fast_llm_supernet.training.chat_prompts import build_prompts
from fast_llm_supernet.training.data import chat_prompt_ids, load_tokenizer
from fast_llm_supernet.training.teacher_text import (
    AnswerSettings,
    generate_answers,
    length_batches,
    write_answers,
)
from tests.test_tools_tiny_teacher import tiny_config

SAMPLED = AnswerSettings(temperature=0.7, top_p=0.95, max_new_tokens=12, seed=0, batch_size=4)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """The tiny teacher (a few pre-training steps) converted to a supernet, with its chat template."""
    root = tmp_path_factory.mktemp("tiny_chat")
    make_tiny_teacher(root / "teacher", tiny_config(), log=None)
    convert(root / "teacher", root / "supernet", window_size=8)
    return root / "supernet"


def load(checkpoint: Path):
    model = SupernetForCausalLM.from_pretrained(checkpoint).eval()
    return model, load_tokenizer(checkpoint), model.resolve_placement("attention*")


def prompts(count: int = 10):
    return build_prompts()[0][:count]


def test_length_batches_group_equal_lengths_in_a_fixed_order():
    assert length_batches([3, 5, 3, 3, 5, 4], batch_size=2) == [[0, 2], [3], [5], [1, 4]]


def test_sampled_answers_are_seeded_and_reproducible(tiny_teacher):
    model, tokenizer, placement = load(tiny_teacher)
    texts = [p.text for p in prompts()]

    def answers(settings):
        return {i: a.ids for batch, batch_answers in generate_answers(model, tokenizer, texts, placement, settings)
                for i, a in zip(batch, batch_answers, strict=True)}

    first = answers(SAMPLED)
    assert sorted(first) == list(range(len(texts))) and answers(SAMPLED) == first
    assert answers(SAMPLED.model_copy(update={"seed": 1})) != first
    # Greedy answers in a batch are the one-prompt greedy decode.
    greedy = answers(SAMPLED.model_copy(update={"temperature": 0.0}))
    ids = torch.tensor([chat_prompt_ids(tokenizer, texts[0])])
    alone = model.generate(ids, placement=placement, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert greedy[0] == alone.tolist()[: len(greedy[0])]


def test_an_interrupted_run_resumes_to_the_uninterrupted_text(tiny_teacher, tmp_path):
    model, tokenizer, placement = load(tiny_teacher)
    chosen = prompts(12)
    whole = write_answers(tmp_path / "whole.jsonl", model, tokenizer, chosen, placement, SAMPLED)
    assert [r["prompt"] for r in whole] == [p.text for p in chosen] and all(r["source"] for r in whole)
    # A run killed after three records, in the middle of the fourth line.
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    resumed = write_answers(tmp_path / "cut.jsonl", model, tokenizer, chosen, placement, SAMPLED)
    assert resumed == whole
    assert len((tmp_path / "cut.jsonl").read_text().splitlines()) >= len(chosen)
    assert all(json.loads(line) for line in (tmp_path / "cut.jsonl").read_text().splitlines())
