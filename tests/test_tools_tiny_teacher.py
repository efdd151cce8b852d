"""The tiny teacher maker: stdlib corpus, byte-level BPE tokenizer, seeded Llama checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from fast_llm_supernet.tools.tiny_teacher import TinyTeacherConfig, main, make_tiny_teacher, train_tokenizer
from fast_llm_supernet.training.corpus import stdlib_documents

CORPUS_FILES = 6  # the Zen of Python and five stdlib modules: enough text, quick to read


def tiny_config(**overrides) -> TinyTeacherConfig:
    values = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        steps=12,
        batch_size=4,
        sequence_length=32,
        learning_rate=1e-2,
        corpus_files=CORPUS_FILES,
    )
    values.update(overrides)
    return TinyTeacherConfig(**values)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("tiny_teacher")
    summary = make_tiny_teacher(output, tiny_config(), log=None)
    return output, summary


def test_corpus_is_stdlib_prose_and_deterministic():
    documents = stdlib_documents(CORPUS_FILES)
    assert documents == stdlib_documents(CORPUS_FILES)
    assert documents[0].startswith("The Zen of Python")
    assert len(documents) > 20 and all(isinstance(d, str) and d for d in documents)


def test_tokenizer_is_byte_level_bpe_with_special_tokens():
    tokenizer = train_tokenizer(stdlib_documents(CORPUS_FILES), vocab_size=320)
    assert len(tokenizer) == 320
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # Byte-level: any text, unseen characters included, encodes and decodes exactly.
    text = "Beautiful is better than ugly. Ünïcødé ✓ 日本語\n\tdef f(x): return x ** 2"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # BPE merges learned: common words are shorter than their bytes.
    assert len(tokenizer(" the", add_special_tokens=False)["input_ids"]) == 1


def test_checkpoint_loads_with_transformers(teacher_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    output, summary = teacher_dir
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "tiny_teacher.json",
    ):
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)

    # The portable class name (transformers 4 and 5 both know it).
    assert (
        json.loads((output / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = LlamaForCausalLM.from_pretrained(output, use_safetensors=True).eval()
    assert model.config.vocab_size == len(tokenizer) == 320
    assert model.config.bos_token_id == tokenizer.bos_token_id
    ids = tokenizer("Simple is better than complex.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()


def test_pretraining_lowers_the_loss(teacher_dir):
    _, summary = teacher_dir
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert summary["held_out_loss"] < summary["first_loss"]


def test_same_seed_same_files(teacher_dir, tmp_path):
    output, _ = teacher_dir
    make_tiny_teacher(tmp_path, tiny_config(), log=None)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (tmp_path / name).read_bytes() == (output / name).read_bytes(), name


def test_cli_random_weights(tmp_path, capsys):
    main(
        [
            "--output",
            str(tmp_path),
            "--steps",
            "0",
            "--vocab-size",
            "300",
            "--hidden-size",
            "32",
            "--intermediate-size",
            "64",
            "--num-layers",
            "1",
            "--num-heads",
            "2",
            "--num-kv-heads",
            "1",
            "--head-dim",
            "16",
            "--corpus-files",
            str(CORPUS_FILES),
        ]
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["head_dim"]) == (300, 1, 16)
    assert "done in" in capsys.readouterr().out


def test_too_large_vocab_for_the_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_teacher(tmp_path, tiny_config(vocab_size=200_000, corpus_files=1, steps=0), log=None)
