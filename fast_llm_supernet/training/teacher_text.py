"""`fast_llm_supernet.training.teacher_text`: the teacher's own answers to chat prompts, generated in batches, seeded
and resumable: distillation text beyond the documentation (sampled), SFT targets and the chat evaluation's
reference answers (greedy).

The teacher is a supernet checkpoint run with a placement, normally all-attention (a converted teacher's own
computation). A prompt goes through the tokenizer's chat template (`data.chat_prompt_ids`), so the answers are the
teacher's chat answers as a served model gives them.

Batches hold prompts of one token length only (`SupernetForCausalLM.generate` takes no padding), at most
`batch_size` of them, in a fixed order (by length, then by position in the list). A sampled batch draws from a
generator seeded by (seed, its prompts' texts), so a prompt's text does not depend on the batches that ran
before it: a resumed `write_answers` writes what an uninterrupted one writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from fast_llm_supernet.training.chat_prompts import ChatPrompt
from fast_llm_supernet.training.data import chat_prompt_ids


class AnswerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 0: greedy (argmax); above 0: sampled at that temperature, within `top_p` of the probability mass.
    temperature: float = Field(0.0, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)


@dataclass
class Answer:
    ids: list[int]  # the answer's tokens, without the end-of-turn token
    finished: bool  # the teacher ended it (EOS) within max_new_tokens

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.ids, skip_special_tokens=True).strip()


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal length, each group cut into batches of at most `batch_size`, shortest first."""
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(length, []).append(index)
    return [group[i : i + batch_size] for _, group in sorted(groups.items()) for i in range(0, len(group), batch_size)]


def _batch_seed(seed: int, texts: Sequence[str]) -> int:
    digest = hashlib.sha256("\x00".join([str(seed), *texts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[str], placement, settings: AnswerSettings, skip: Container[str] = ()
) -> Iterator[tuple[list[int], list[Answer]]]:
    """(indices into `prompts`, their answers) per batch, in the fixed batch order; a batch whose prompts are all
    in `skip` is not generated."""
    ids = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    eos = tokenizer.eos_token_id
    for batch in length_batches([len(i) for i in ids], settings.batch_size):
        if all(prompts[i] in skip for i in batch):
            continue
        sampled = settings.temperature > 0
        generator = torch.Generator().manual_seed(_batch_seed(settings.seed, [prompts[i] for i in batch])) if sampled else None
        input_ids = torch.tensor([ids[i] for i in batch], dtype=torch.long)
        output = model.generate(
            input_ids, placement=placement, max_new_tokens=settings.max_new_tokens, do_sample=sampled,
            temperature=settings.temperature if sampled else 1.0, top_p=settings.top_p, generator=generator,
            eos_token_id=eos,
        )[:, input_ids.shape[1] :].tolist()
        answers = []
        for row in output:
            end = row.index(eos) if eos in row else len(row)
            answers.append(Answer(ids=row[:end], finished=end < len(row)))
        yield batch, answers


def read_records(path: Path) -> list[dict]:
    """The complete records of an answers JSONL file (a line cut short by a killed run is dropped)."""
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def write_answers(
    path: Path, model, tokenizer, prompts: Sequence[ChatPrompt], placement, settings: AnswerSettings, progress=None
) -> list[dict]:
    """The teacher's answers as JSONL records `{prompt, source, subject, answer, finished}`, appended batch by batch
    to `path`; batches already there are not generated again (resume). Returns the records in `prompts`' order."""
    done = {record["prompt"]: record for record in read_records(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in done.values()))  # drop a partial last line
    texts = [prompt.text for prompt in prompts]
    with path.open("a", encoding="utf-8") as handle:
        # Batches are formed over all the prompts and a batch cut short is generated again whole: its seed, so
        # its text, is the uninterrupted run's.
        for batch, answers in generate_answers(model, tokenizer, texts, placement, settings, skip=done):
            lines = []
            for index, answer in zip(batch, answers, strict=True):
                prompt = prompts[index]
                done[prompt.text] = {"prompt": prompt.text, "source": prompt.source, "subject": prompt.subject,
                                     "answer": answer.text(tokenizer), "finished": answer.finished}
                lines.append(json.dumps(done[prompt.text]) + "\n")
            handle.write("".join(lines))
            handle.flush()
            if progress is not None:
                progress(len(batch))
    return [done[text] for text in texts]


def conversation(record: dict) -> list[dict]:
    """A record as a chat conversation (the `chat` data format)."""
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["answer"]}]
