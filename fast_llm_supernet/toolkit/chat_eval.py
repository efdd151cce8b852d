"""`fast_llm_supernet.toolkit.chat_eval`: how close a placement's chat answers are to the teacher's, on held-out prompts.

The reference is the teacher's greedy answer to each prompt, through the chat template: the teacher is the
checkpoint's own all-attention placement (a converted teacher's computation, which training with attention
frozen keeps), or the all-attention placement of a given teacher checkpoint. Per placement:

* `exact`: the share of prompts whose greedy answer equals the teacher's (whitespace runs collapsed);
* `first_sentence`: the share whose first sentence equals the teacher's: the text up to the first `.`, `!` or
  `?` followed by a space or the end, or up to the first line break; case and the closing punctuation ignored.
  Long answers drift apart late; the first sentence is where a chat answer says what it answers;
* `logprob`: the teacher-forced mean log-probability per token of the teacher's answers (their end-of-turn
  token included where the teacher stopped) under the placement, pooled over every answer token; beside it
  `teacher_logprob`, the teacher's own on the same tokens (the placement's gap to it is what SFT narrows);
* `factual`: on prompts with keywords (`chat_prompts.FACTUAL_PROMPTS`), of those the teacher answers right (its
  answer holds a keyword), the share the placement answers right too; `factual_teacher_right` counts them.

Teacher and placements answer with the same `max_new_tokens` (answers cut there compare as cut).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from fast_llm_supernet.training.chat_prompts import ChatPrompt, evaluation_prompts
from fast_llm_supernet.training.data import chat_prompt_ids
from fast_llm_supernet.training.teacher_text import Answer, AnswerSettings, generate_answers, length_batches
from shared_spec import MixerKind, Placement, uniform_placement

_SENTENCE_END = re.compile(r"(?<=[.!?])(\s|$)|\n")


def normalized(text: str) -> str:
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """The first sentence, case-folded, without its closing punctuation (see the module docstring)."""
    text = text.strip()
    end = _SENTENCE_END.search(text)
    return normalized(text[: end.start()] if end else text).rstrip(".!?").casefold()


def holds_keyword(answer: str, keywords: Sequence[str]) -> bool:
    """Whether the answer holds one of the keywords as a word (case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", answer, re.IGNORECASE) for keyword in keywords)


def load_prompts(path: Path | None) -> list[ChatPrompt]:
    """Prompts from a JSON list of strings or of `ChatPrompt` objects; None: `chat_prompts.evaluation_prompts()`."""
    if path is None:
        return evaluation_prompts()
    return [ChatPrompt(text=item) if isinstance(item, str) else ChatPrompt.model_validate(item)
            for item in json.loads(Path(path).read_text())]


class ChatAgreement(BaseModel):
    prompts: int
    exact: float
    first_sentence: float
    logprob: float
    teacher_logprob: float
    factual: float | None  # factual_right / factual_teacher_right; None: no factual prompt the teacher answers right
    factual_right: int
    factual_teacher_right: int


@dataclass
class Reference:
    """The teacher's greedy answers to the prompts, and what scoring against them needs."""

    model: object
    placement: Placement
    prompts: list[ChatPrompt]
    prompt_ids: list[list[int]]
    answers: list[Answer]
    texts: list[str]
    eos_token_id: int
    max_new_tokens: int
    logprob: float


def greedy_answers(model, tokenizer, prompts: Sequence[ChatPrompt], placement: Placement, max_new_tokens: int,
                   batch_size: int = 8) -> list[Answer]:
    answers: list[Answer | None] = [None] * len(prompts)
    settings = AnswerSettings(temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for batch, batch_answers in generate_answers(model, tokenizer, [p.text for p in prompts], placement, settings):
        for index, answer in zip(batch, batch_answers, strict=True):
            answers[index] = answer
    return answers


@torch.no_grad()
def answer_logprob(model, placement: Placement, prompt_ids: Sequence[list[int]], answers: Sequence[Answer],
                   eos_token_id: int, batch_size: int = 8) -> float:
    """Teacher-forced mean log-probability per token of `answers` (after their prompts), pooled over tokens."""
    sequences = [ids + answer.ids + ([eos_token_id] if answer.finished else []) for ids, answer in zip(prompt_ids, answers, strict=True)]
    total, count = 0.0, 0
    for batch in length_batches([len(s) for s in sequences], batch_size):
        tokens = torch.tensor([sequences[i] for i in batch], dtype=torch.long)
        log_probs = model(tokens[:, :-1], placement=placement).float().log_softmax(-1)
        token_log_probs = log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # [B, T-1]: log p(token t+1)
        for row, index in enumerate(batch):  # equal total lengths; the answers start where their prompts end
            start = len(prompt_ids[index])
            total += token_log_probs[row, start - 1 :].sum().item()
            count += tokens.shape[1] - start
    return total / max(count, 1)


def reference_answers(teacher, tokenizer, prompts: Sequence[ChatPrompt], max_new_tokens: int = 48,
                      placement: Placement | None = None, batch_size: int = 8) -> Reference:
    """The teacher's greedy answers (`placement`, default all-attention) and its own likelihood of them."""
    placement = placement or uniform_placement(teacher.spec, MixerKind.ATTENTION)
    prompts = list(prompts)
    answers = greedy_answers(teacher, tokenizer, prompts, placement, max_new_tokens, batch_size)
    prompt_ids = [chat_prompt_ids(tokenizer, p.text) for p in prompts]
    eos = tokenizer.eos_token_id
    return Reference(
        model=teacher, placement=placement, prompts=prompts, prompt_ids=prompt_ids, answers=answers,
        texts=[a.text(tokenizer) for a in answers], eos_token_id=eos, max_new_tokens=max_new_tokens,
        logprob=answer_logprob(teacher, placement, prompt_ids, answers, eos, batch_size),
    )


def chat_agreement(model, tokenizer, placement: Placement, reference: Reference, batch_size: int = 8
                   ) -> tuple[ChatAgreement, list[str]]:
    """The placement's agreement with the reference, and its answers (texts, in the prompts' order)."""
    if model is reference.model and placement == reference.placement:  # the teacher itself: nothing to redo
        texts, logprob = list(reference.texts), reference.logprob
    else:
        answers = greedy_answers(model, tokenizer, reference.prompts, placement, reference.max_new_tokens, batch_size)
        texts = [a.text(tokenizer) for a in answers]
        logprob = answer_logprob(model, placement, reference.prompt_ids, reference.answers, reference.eos_token_id, batch_size)
    pairs = list(zip(texts, reference.texts, strict=True))
    factual = [holds_keyword(answer, prompt.keywords) for prompt, (answer, teacher) in zip(reference.prompts, pairs, strict=True)
               if prompt.keywords and holds_keyword(teacher, prompt.keywords)]
    agreement = ChatAgreement(
        prompts=len(pairs),
        exact=sum(normalized(a) == normalized(t) for a, t in pairs) / max(len(pairs), 1),
        first_sentence=sum(first_sentence(a) == first_sentence(t) for a, t in pairs) / max(len(pairs), 1),
        logprob=logprob,
        teacher_logprob=reference.logprob,
        factual=sum(factual) / len(factual) if factual else None,
        factual_right=sum(factual),
        factual_teacher_right=len(factual),
    )
    return agreement, texts
