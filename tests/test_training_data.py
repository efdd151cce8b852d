"""SFT renders conversations with the tokenizer's chat template, and only replies carry loss."""

import json

import pytest

pytest.importorskip("transformers")

from fast_llm_supernet.tools.tiny_teacher import save_tokenizer, train_tokenizer  # noqa: E402
from fast_llm_supernet.training.corpus import stdlib_documents  # noqa: E402
from fast_llm_supernet.training.data import (  # noqa: E402
    Conversation,
    DataError,
    chat_prompt_ids,
    load_tokenizer,
    read_conversations,
    tokenize_conversation,
)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does `textwrap.dedent` do?"},
    {"role": "assistant", "content": "Remove any common leading whitespace from every line."},
]


def test_chat_template_matches_sft_tokenisation(tmp_path):
    save_tokenizer(train_tokenizer(stdlib_documents(max_files=2), vocab_size=300), tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    sft_ids, _ = tokenize_conversation(tokenizer, Conversation(CONVERSATION))
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == sft_ids
    # The generation prompt ends with the assistant header, where SFT taught the model to answer.
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### User:\nWhat does `textwrap.dedent` do?\n### Assistant:\n")


# SmolLM2's template (ChatML with a default system turn), as its GGUF file carries it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_tokenizers_own_template_renders_sft_with_loss_on_replies_and_their_end(tmp_path):
    tokenizer = train_tokenizer(stdlib_documents(max_files=2), vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tokenizer.chat_template = CHATML
    messages = [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Six."}]
    ids, is_assistant = tokenize_conversation(tokenizer, Conversation(messages))
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode([i for i, keep in zip(ids, is_assistant, strict=True) if keep]) == "Four.<|im_end|>Six.<|im_end|>"
    # Generation starts where SFT's first reply starts.
    prompt = chat_prompt_ids(tokenizer, "Two plus two?")
    assert ids[: len(prompt)] == prompt and is_assistant[len(prompt)] and not any(is_assistant[: len(prompt)])


def chatml_tokenizer():
    tokenizer = train_tokenizer(stdlib_documents(max_files=2), vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_a_cut_reply_carries_loss_on_its_text_and_no_end_of_turn():
    """`finished: false`: the reply a generation budget cut is rendered open (as `continue_final_message` renders
    it), so the model learns its text and not to stop where the cut fell."""
    tokenizer = chatml_tokenizer()
    messages = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two, three"}]
    ids, is_assistant = tokenize_conversation(tokenizer, Conversation(messages, finished=False))
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                continue_final_message=True)["input_ids"]
    assert tokenizer.decode([i for i, keep in zip(ids, is_assistant, strict=True) if keep]) == "One, two, three"
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\nOne, two, three")
    finished_ids, _ = tokenize_conversation(tokenizer, Conversation(messages))
    assert tokenizer.decode(finished_ids[len(ids):]).strip() == "<|im_end|>"


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "finished": "no"},
     "`finished` must be true or false"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "And?"}], "finished": False},
     "the last message is a user turn"),
])
def test_a_bad_finished_flag_names_the_line_and_what_is_allowed(tmp_path, record, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message) as error:
        read_conversations([path])
    assert f"{path}:1" in str(error.value)


def test_finished_is_read_per_record(tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": turns, "finished": False}) + "\n")
    assert read_conversations([path]) == [Conversation(turns), Conversation(turns, finished=False)]
