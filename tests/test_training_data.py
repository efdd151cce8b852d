"""The tiny tokenizer's chat template renders conversations exactly as SFT tokenises them."""

import pytest

pytest.importorskip("transformers")

from fast_llm_supernet.tools.tiny_teacher import save_tokenizer, train_tokenizer  # noqa: E402
from fast_llm_supernet.training.corpus import stdlib_documents  # noqa: E402
from fast_llm_supernet.training.data import load_tokenizer, tokenize_conversation  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does `textwrap.dedent` do?"},
    {"role": "assistant", "content": "Remove any common leading whitespace from every line."},
]


def test_chat_template_matches_sft_tokenisation(tmp_path):
    save_tokenizer(train_tokenizer(stdlib_documents(max_files=2), vocab_size=300), tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    sft_ids, _ = tokenize_conversation(tokenizer, CONVERSATION)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == sft_ids
    # The generation prompt ends with the assistant header, where SFT taught the model to answer.
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### User:\nWhat does `textwrap.dedent` do?\n### Assistant:\n")
