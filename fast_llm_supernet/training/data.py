"""`fast_llm_supernet.training.data`: training data for the single-machine trainer: local text / JSONL, tokenised and packed, and chat JSONL for SFT.

Formats (`DataSourceConfig.format`):

* `text`: plain-text files; each file is one document.
* `jsonl`: one JSON object per line; the document is `obj[text_field]` (default `"text"`).
* `chat`: one JSON object per line with `obj[messages_field]` (default `"messages"`) a list of
  `{"role": "system" | "user" | "assistant", "content": str}`. Only assistant turns carry loss (SFT).
  `"finished": false` marks a conversation whose last (assistant) reply was cut, by a generation budget say:
  its tokens carry loss but no end-of-turn follows it, so the model does not learn to stop where the cut fell.

Documents are tokenised with the checkpoint's tokenizer (BOS added by the tokenizer, EOS appended),
concatenated and cut into rows of `sequence_length + 1` tokens (inputs are a row without its last
token, labels the row shifted by one). Chat conversations are packed whole, back to back, into rows
(a conversation longer than a row is truncated); the tail of a row is padding with no loss.

Chats are rendered with the tokenizer's own chat template, the one a served model's
/v1/chat/completions and `supernet-place quality` apply (SmolLM2's `<|im_start|>user ...<|im_end|>`), or,
for a tokenizer without one (the tiny tokenizer as `train_tokenizer` returns it), with `CHAT_TEMPLATE`,
a plain role-tagged template:

    <bos>### System:\n{content}\n### User:\n{content}\n### Assistant:\n{content}<eos>\n...

An assistant reply's loss span runs from the end of the generation prompt the template renders before it
to the end of its turn (trailing whitespace excluded): the reply and its end-of-turn token, so the model
learns to stop; a cut reply (`finished: false`) is rendered open, as `continue_final_message` renders it,
and its span ends with its text. A token carries loss when its first character lies in such a span (character offsets).

The batch of a step is a pure function of (seed, step): rows are visited in a fresh permutation
each epoch, seeded by (seed, epoch). Resuming at step N therefore needs only N.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fast_llm_supernet.training.loss import IGNORE_INDEX

ROLES = ("assistant", "system", "user")
# The chat template of tokenizers without one of their own (`render_conversation`); tokenizers this project
# writes carry it (`tiny_teacher.save_tokenizer`), so a served model sees conversations exactly as SFT showed them.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Conversation:
    """One chat record: its messages and whether its last reply ended where the speaker ended it."""

    messages: list[dict]
    finished: bool = True


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer stored in a checkpoint directory."""
    path = Path(path)
    if (path / "tokenizer.json").exists():
        # A fast tokenizer file needs no model config (AutoTokenizer would try to read config.json as a
        # transformers model config, which an Apriel2 checkpoint is not).
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    elif (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        raise DataError(f"no tokenizer (tokenizer.json / tokenizer_config.json) in {path}")
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer in {path} has no EOS token; documents need a separator")
    return tokenizer


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_documents(paths: Sequence[Path], format: str, text_field: str = "text") -> list[str]:
    """Plain-text documents from `text` files or the `text_field` of `jsonl` records."""
    documents = []
    for path in paths:
        if format == "text":
            documents.append(path.read_text(encoding="utf-8"))
            continue
        for number, record in _read_jsonl(path):
            text = record.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {text_field!r} is missing or not a string (keys: {sorted(record)})")
            documents.append(text)
    return [document for document in documents if document.strip()]


def read_conversations(paths: Sequence[Path], messages_field: str = "messages") -> list[Conversation]:
    """Chat conversations: lists of {role, content}, each with at least one assistant turn."""
    conversations = []
    for path in paths:
        for number, record in _read_jsonl(path):
            messages = record.get(messages_field)
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{path}:{number}: field {messages_field!r} must be a non-empty list of messages")
            for index, message in enumerate(messages):
                if not isinstance(message, dict) or message.get("role") not in ROLES:
                    raise DataError(
                        f"{path}:{number}: message {index} needs a role in {list(ROLES)}, got {message!r:.80}"
                    )
                if not isinstance(message.get("content"), str):
                    raise DataError(f"{path}:{number}: message {index} needs a string `content`")
            if not any(message["role"] == "assistant" for message in messages):
                raise DataError(f"{path}:{number}: conversation has no assistant turn, so no token would carry loss")
            if messages[0]["role"] == "assistant":
                raise DataError(f"{path}:{number}: conversation starts with an assistant turn; a reply needs a prompt before it")
            finished = record.get("finished", True)
            if not isinstance(finished, bool):
                raise DataError(f"{path}:{number}: `finished` must be true or false, got {finished!r:.40}")
            if not finished and messages[-1]["role"] != "assistant":
                raise DataError(f"{path}:{number}: `finished: false` marks a cut last reply, but the last message "
                                f"is a {messages[-1]['role']} turn")
            conversations.append(Conversation(messages, finished))
    return conversations


def render_conversation(
    tokenizer, messages: Sequence[dict], finished: bool = True
) -> tuple[str, list[tuple[int, int]]]:
    """One conversation through the chat template (`tokenizer.chat_template`, else `CHAT_TEMPLATE`) and the
    character ranges [start, end) of its assistant replies with their end-of-turn tokens (a cut last reply,
    `finished=False`: rendered open, its range ends with its text)."""
    template = tokenizer.chat_template or CHAT_TEMPLATE

    def render(turns: Sequence[dict], add_generation_prompt: bool = False, open_reply: bool = False) -> str:
        return tokenizer.apply_chat_template(
            list(turns), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=open_reply,
        )

    last = len(messages) - 1
    text = render(messages, open_reply=not finished)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            raise DataError("a conversation starts with an assistant turn; a reply needs a prompt before it")
        open_reply = index == last and not finished
        before = render(messages[:index], add_generation_prompt=True)
        through = render(messages[: index + 1], open_reply=open_reply)
        # A template that rewrites earlier turns (or drops the generation prompt) would shift the spans.
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError("the chat template does not render a conversation turn by turn; SFT cannot find its replies")
        spans.append((len(before), len(through) if open_reply else len(through.rstrip())))
    return text, spans


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A one-turn user prompt through the chat template, ending with the generation prompt (where the answer starts)."""
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], chat_template=tokenizer.chat_template or CHAT_TEMPLATE,
        tokenize=True, add_generation_prompt=True, return_dict=True,
    )["input_ids"])


def tokenize_conversation(tokenizer, conversation: Conversation) -> tuple[list[int], list[bool]]:
    """Token ids of one rendered conversation and, per token, whether it is an assistant (loss) token."""
    text, spans = render_conversation(tokenizer, conversation.messages, conversation.finished)
    # The template writes its own special tokens (BOS included), as `apply_chat_template(tokenize=True)` does.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    is_assistant = [
        any(start <= char_start < end for start, end in spans) for char_start, _ in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), is_assistant


@dataclass
class PackedData:
    """Rows of `sequence_length + 1` tokens and which of them are loss targets."""

    tokens: torch.Tensor  # [num_rows, sequence_length + 1] int64
    target_mask: torch.Tensor  # [num_rows, sequence_length + 1] bool: True where the token is a loss target

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch: input_ids [B, T], labels [B, T] (IGNORE_INDEX where no loss), loss_mask [B, T] bool."""
        tokens, mask = self.tokens[indices], self.target_mask[indices]
        loss_mask = mask[:, 1:]
        labels = tokens[:, 1:].masked_fill(~loss_mask, IGNORE_INDEX)
        return {"input_ids": tokens[:, :-1], "labels": labels, "loss_mask": loss_mask}


def pack_documents(tokenizer, documents: Sequence[str], sequence_length: int) -> PackedData:
    """BOS doc EOS BOS doc EOS ... cut into full rows of sequence_length + 1 tokens (the tail is dropped)."""
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    row = sequence_length + 1
    num_rows = len(stream) // row
    if num_rows == 0:
        raise DataError(f"the data has {len(stream)} tokens, fewer than one row of sequence_length + 1 = {row}")
    tokens = torch.tensor(stream[: num_rows * row], dtype=torch.long).view(num_rows, row)
    return PackedData(tokens=tokens, target_mask=torch.ones_like(tokens, dtype=torch.bool))


def pack_conversations(tokenizer, conversations: Sequence[Conversation], sequence_length: int) -> PackedData:
    """Whole conversations back to back in rows; padding and non-assistant tokens are not targets."""
    row = sequence_length + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    current: list[int] = []
    current_mask: list[bool] = []
    for conversation in conversations:
        ids, is_assistant = tokenize_conversation(tokenizer, conversation)
        ids, is_assistant = ids[:row], is_assistant[:row]
        if len(current) + len(ids) > row:
            rows.append(current)
            masks.append(current_mask)
            current, current_mask = [], []
        current += ids
        current_mask += is_assistant
    if current:
        rows.append(current)
        masks.append(current_mask)
    tokens = torch.full((len(rows), row), pad, dtype=torch.long)
    target_mask = torch.zeros((len(rows), row), dtype=torch.bool)
    for index, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        tokens[index, : len(ids)] = torch.tensor(ids)
        target_mask[index, : len(mask)] = torch.tensor(mask)
    if not target_mask[:, 1:].any():
        raise DataError("no assistant token survived packing; raise sequence_length")
    return PackedData(tokens=tokens, target_mask=target_mask)


def split_held_out(items: Sequence, eval_fraction: float) -> tuple[list, list]:
    """Every k-th item (k = round(1 / eval_fraction)) goes to the held-out set, the rest to training."""
    if eval_fraction <= 0:
        return list(items), []
    every = max(2, round(1 / eval_fraction))
    train = [item for index, item in enumerate(items) if index % every != every - 1]
    held_out = [item for index, item in enumerate(items) if index % every == every - 1]
    return train, held_out


def batch_indices(step: int, batch_size: int, num_rows: int, seed: int) -> torch.Tensor:
    """Row indices of training step `step`: consecutive slices of one seeded permutation per epoch."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_rows, positions % num_rows
    indices = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(num_rows, generator=generator)
        selected = epochs == epoch
        indices[selected] = permutation[offsets[selected]]
    return indices
