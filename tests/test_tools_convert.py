"""Teacher-to-supernet conversion: the checkpoint contract, the initialisation, and logits equal to
the teacher's as `transformers` computes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.tools.convert import ConversionError, convert, main
from shared_spec import Apriel2TextConfig, MixerKind, Placement, PresetsFile, SupernetSpec

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, MLP = 64, 32, 4, 2, 8, 3, 48
GROUP = HEADS // KV_HEADS
SEQ = 16


def make_teacher(path, kind: str = "llama", tied: bool = False, **overrides):
    """A random tiny HF teacher saved to `path`; Qwen2 gets non-zero q/k/v biases."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        config, cls = transformers.LlamaConfig(head_dim=HEAD_DIM, **common), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif kind == "mistral":
        config, cls = (
            transformers.MistralConfig(head_dim=HEAD_DIM, sliding_window=None, **common),
            transformers.MistralForCausalLM,
        )
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(1234)
    model = cls(config).float().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            # Random norms and biases too, so a misplaced tensor cannot hide behind ones or zeros.
            if parameter.dim() == 1:
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    teacher = make_teacher(root / "teacher")
    convert(root / "teacher", root / "supernet", window_size=5)
    return teacher, root / "teacher", root / "supernet"


def teacher_logits(teacher, input_ids):
    with torch.no_grad():
        return teacher(input_ids=input_ids).logits


def input_ids(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(7))


# ---- the checkpoint contract -------------------------------------------------------------------


def test_config_is_the_apriel2_supernet_layout(llama):
    _, _, supernet = llama
    raw = json.loads((supernet / "config.json").read_text())
    attention = {
        "type": "attention",
        "heads": HEADS,
        "head_groups": KV_HEADS,
        "head_size": HEAD_DIM,
        "add_linear_biases": False,
        "rotary": {"type": "mistral_1d", "theta": 50000.0},
    }
    assert raw == {
        "model_type": "apriel2_text",
        "architectures": ["Apriel2ForCausalLM"],
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "embeddings": {"max_position_embeddings": 2048},
        "head": {"normalization": {"type": "rms_norm", "epsilon": 1e-5}},
        "decoder": {
            "type": "fixed",
            "num_blocks": LAYERS,
            "block": {
                "normalization": {"type": "rms_norm", "epsilon": 1e-5},
                "mlp": {
                    "type": "mlp",
                    "intermediate_size": MLP,
                    "activation": "silu",
                    "gated": True,
                    "add_linear_biases": False,
                },
                "mixer": {
                    "type": "stochastic",
                    "main_mixer_name": "attention",
                    "mixers": {
                        "attention": attention,
                        "sliding_window": {**attention, "window_size": 5},
                        "gdn": {
                            "type": "gdn",
                            "value_heads": HEADS,
                            "key_heads": KV_HEADS,
                            "key_head_dim": HEAD_DIM,
                            "value_head_dim": HEAD_DIM,
                            "convolution_layer": {"kernel_size": 4},
                        },
                        "kda": {
                            "type": "kda",
                            "heads": HEADS,
                            "head_dim": HEAD_DIM,
                            "convolution_layer": {"kernel_size": 4},
                            "normalization": {"epsilon": 1e-5},
                        },
                    },
                },
            },
        },
    }
    # The shared config models read it and write it back unchanged.
    assert Apriel2TextConfig.from_file(supernet).to_json_dict() == raw
    spec = SupernetSpec.from_config(Apriel2TextConfig.from_file(supernet))
    assert spec.num_layers == LAYERS and spec.choice_layers == list(range(LAYERS))
    assert all(
        layer.mixers
        == {
            "attention": MixerKind.ATTENTION,
            "sliding_window": MixerKind.SLIDING_WINDOW,
            "gdn": MixerKind.GDN,
            "kda": MixerKind.KDA,
        }
        for layer in spec.layers
    )
    # Per-mixer attention masks (not upstream's shared one) are recorded for this project's readers.
    notes = json.loads((supernet / "supernet_model.json").read_text())
    assert notes["stochastic_attention_masks"] == "per_mixer"


def expected_shapes() -> dict[str, tuple[int, ...]]:
    q, kv, key_dim, value_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HEADS * HEAD_DIM
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        block = f"model.decoder.blocks.{i}."
        shapes |= {
            block + "input_layernorm.weight": (HIDDEN,),
            block + "post_attention_layernorm.weight": (HIDDEN,),
            block + "mlp.gate_proj.weight": (MLP, HIDDEN),
            block + "mlp.up_proj.weight": (MLP, HIDDEN),
            block + "mlp.down_proj.weight": (HIDDEN, MLP),
        }
        for name in ("attention", "sliding_window"):
            mixer = f"{block}mixer.mixers.{name}."
            shapes |= {
                mixer + "q_proj.weight": (q, HIDDEN),
                mixer + "k_proj.weight": (kv, HIDDEN),
                mixer + "v_proj.weight": (kv, HIDDEN),
                mixer + "o_proj.weight": (HIDDEN, q),
            }
        gdn = f"{block}mixer.mixers.gdn."
        shapes |= {
            gdn + "in_proj_qkvz.weight": (2 * key_dim + 2 * value_dim, HIDDEN),
            gdn + "in_proj_ba.weight": (2 * HEADS, HIDDEN),
            gdn + "convolution.weight": (2 * key_dim + value_dim, 1, 4),
            gdn + "out_proj.weight": (HIDDEN, value_dim),
            gdn + "A_log": (HEADS,),
            gdn + "dt_bias": (HEADS,),
            gdn + "norm.weight": (HEAD_DIM,),
        }
        kda = f"{block}mixer.mixers.kda."
        shapes |= {kda + f"{p}_proj.weight": (q, HIDDEN) for p in "qkv"}
        shapes |= {kda + f"{p}_conv.weight": (q, 1, 4) for p in "qkv"}
        shapes |= {
            kda + "o_proj.weight": (HIDDEN, q),
            kda + "f_a_proj.weight": (HEAD_DIM, HIDDEN),
            kda + "f_b_proj.weight": (q, HEAD_DIM),
            kda + "g_a_proj.weight": (HEAD_DIM, HIDDEN),
            kda + "g_b_proj.weight": (q, HEAD_DIM),
            kda + "beta_proj.weight": (HEADS, HIDDEN),
            kda + "A_log": (HEADS,),
            kda + "dt_bias": (q,),
            kda + "norm.weight": (HEAD_DIM,),
        }
    return shapes


def test_tensor_names_and_shapes(llama):
    _, _, supernet = llama
    with safe_open(supernet / "model.safetensors", framework="pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert shapes == expected_shapes()
    assert dtypes == {"F32"}


def test_shared_and_attention_weights_are_the_teachers(llama):
    teacher, _, supernet = llama
    state = load_file(supernet / "model.safetensors")
    source = teacher.state_dict()
    assert torch.equal(state["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert torch.equal(state["lm_head.weight"], source["lm_head.weight"])
    assert torch.equal(state["model.norm.weight"], source["model.norm.weight"])
    for i in range(LAYERS):
        block, layer = f"model.decoder.blocks.{i}.", f"model.layers.{i}."
        for name in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ):
            assert torch.equal(state[block + name], source[layer + name]), name
        for mixer in ("attention", "sliding_window"):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert torch.equal(
                    state[f"{block}mixer.mixers.{mixer}.{proj}.weight"],
                    source[f"{layer}self_attn.{proj}.weight"],
                )


def test_gdn_initialisation_follows_the_teacher_heads(llama):
    teacher, _, supernet = llama
    state = load_file(supernet / "model.safetensors")
    attn = teacher.model.layers[1].self_attn
    q = attn.q_proj.weight.detach().view(HEADS, HEAD_DIM, HIDDEN)
    k = attn.k_proj.weight.detach().view(KV_HEADS, HEAD_DIM, HIDDEN)
    v = attn.v_proj.weight.detach().view(KV_HEADS, HEAD_DIM, HIDDEN)
    gdn = "model.decoder.blocks.1.mixer.mixers.gdn."
    key_dim, value_dim = KV_HEADS * HEAD_DIM, HEADS * HEAD_DIM
    # Flat rows Q | K | V | Z (Fast-LLM's gdn.py split order).
    gdn_q, gdn_k, gdn_v, gdn_z = state[gdn + "in_proj_qkvz.weight"].split(
        [key_dim, key_dim, value_dim, value_dim]
    )
    for g in range(KV_HEADS):
        # Key head g pairs the teacher's K head g with the first query head of its KV group.
        assert torch.equal(gdn_k.view(KV_HEADS, HEAD_DIM, HIDDEN)[g], k[g])
        assert torch.equal(gdn_q.view(KV_HEADS, HEAD_DIM, HIDDEN)[g], q[g * GROUP])
    for h in range(HEADS):
        # Value head h carries the value teacher head h reads (its o_proj block sees the same thing).
        assert torch.equal(gdn_v.view(HEADS, HEAD_DIM, HIDDEN)[h], v[h // GROUP])
    assert not gdn_z.any()
    assert torch.equal(state[gdn + "out_proj.weight"], attn.o_proj.weight.detach())
    assert not state[gdn + "in_proj_ba.weight"].any()  # beta = sigmoid(0) = 0.5, alpha = 0
    conv = state[gdn + "convolution.weight"]
    assert not conv[:, :, :-1].any() and torch.all(conv[:, 0, -1] == 0.5)  # identity-like, last tap
    # Slow decay: exp(-exp(A_log) * softplus(0 + dt_bias)) close to 1.
    decay = torch.exp(-state[gdn + "A_log"].exp() * torch.nn.functional.softplus(state[gdn + "dt_bias"]))
    assert torch.all((decay > 0.9) & (decay < 1.0))
    assert torch.all(state[gdn + "norm.weight"] == 1)


def test_kda_initialisation_follows_the_teacher_heads(llama):
    teacher, _, supernet = llama
    state = load_file(supernet / "model.safetensors")
    attn = teacher.model.layers[2].self_attn
    kda = "model.decoder.blocks.2.mixer.mixers.kda."
    assert torch.equal(state[kda + "q_proj.weight"], attn.q_proj.weight.detach())
    assert torch.equal(state[kda + "o_proj.weight"], attn.o_proj.weight.detach())
    for proj in ("k_proj", "v_proj"):
        teacher_heads = getattr(attn, proj).weight.detach().view(KV_HEADS, HEAD_DIM, HIDDEN)
        kda_heads = state[kda + f"{proj}.weight"].view(HEADS, HEAD_DIM, HIDDEN)
        for h in range(HEADS):
            assert torch.equal(kda_heads[h], teacher_heads[h // GROUP])
    for gate in ("f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj"):
        weight = state[kda + f"{gate}.weight"]
        assert weight.any() and weight.abs().max() < 0.2  # small, not zero: the gates can learn
    assert not state[kda + "beta_proj.weight"].any()
    for conv in ("q_conv", "k_conv", "v_conv"):
        weight = state[kda + f"{conv}.weight"]
        assert not weight[:, :, :-1].any() and torch.all(weight[:, 0, -1] == 0.5)
    assert torch.all(state[kda + "A_log"].exp() < 0.2) and not state[kda + "dt_bias"].any()


def test_presets_validate_and_name_uniform_and_hybrid_placements(llama):
    _, _, supernet = llama
    presets = PresetsFile.load(supernet)
    spec = SupernetSpec.from_config(Apriel2TextConfig.from_file(supernet))
    resolved = {name: placement.mixers for name, placement in presets.resolved(spec).items()}
    assert resolved["all-attention"] == ("attention",) * LAYERS
    assert resolved["all-swa"] == ("sliding_window",) * LAYERS
    assert resolved["all-gdn"] == ("gdn",) * LAYERS
    assert resolved["all-kda"] == ("kda",) * LAYERS
    assert resolved["attention-ends-gdn"] == ("attention", "gdn", "attention")
    assert len(set(resolved.values())) == len(resolved)  # no two presets alike
    assert Placement.parse("all-gdn", spec, presets).canonical == "gdn*3"


def test_conversion_is_deterministic(llama, tmp_path):
    _, teacher_dir, supernet = llama
    convert(teacher_dir, tmp_path / "again", window_size=5)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        supernet / "model.safetensors"
    ).read_bytes()


# ---- the converted teacher computes what the teacher computes -------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_all_attention_reproduces_transformers_logits(kind, tmp_path):
    teacher = make_teacher(tmp_path / "teacher", kind)
    convert(tmp_path / "teacher", tmp_path / "supernet", window_size=SEQ)
    model = SupernetForCausalLM.from_pretrained(tmp_path / "supernet")
    ids = input_ids()
    expected = teacher_logits(teacher, ids)
    with torch.no_grad():
        for placement in (None, "all-attention", "attention*"):
            torch.testing.assert_close(model(ids, placement=placement), expected, atol=1e-4, rtol=1e-4)
        # A window covering the whole sequence is full attention.
        torch.testing.assert_close(model(ids, placement="all-swa"), expected, atol=1e-4, rtol=1e-4)


def test_qwen2_biases_are_carried(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", "qwen2")
    convert(tmp_path / "teacher", tmp_path / "supernet")
    config = json.loads((tmp_path / "supernet" / "config.json").read_text())
    assert config["decoder"]["block"]["mixer"]["mixers"]["attention"]["add_linear_biases"] is True
    state = load_file(tmp_path / "supernet" / "model.safetensors")
    mixer = "model.decoder.blocks.0.mixer.mixers.sliding_window."
    source = teacher.model.layers[0].self_attn
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(state[mixer + f"{proj}.bias"], getattr(source, proj).bias.detach())
    assert not state[mixer + "o_proj.bias"].any()  # Qwen2 has none: zero keeps its function
    assert not any(name.endswith(".bias") and (".gdn." in name or ".kda." in name) for name in state)


def test_small_window_differs_and_linear_mixers_are_finite(llama):
    teacher, _, supernet = llama
    model = SupernetForCausalLM.from_pretrained(supernet)
    ids = input_ids()
    full = teacher_logits(teacher, ids)
    with torch.no_grad():
        windowed = model(ids, placement="all-swa")
        # Window 5: the first 5 positions see everything they would see anyway, later ones do not.
        torch.testing.assert_close(windowed[:, :5], full[:, :5], atol=1e-4, rtol=1e-4)
        assert (windowed[:, 5:] - full[:, 5:]).abs().max() > 1e-3
        for placement in ("all-gdn", "all-kda", "attention-ends-gdn", "alternating-swa-gdn"):
            assert torch.isfinite(model(ids, placement=placement)).all(), placement
        # Z = 0 starts GDN as a skip (upstream's choice): its output is exactly zero.
        out = model(ids, placement="all-gdn", return_mixer_outputs=True)
        assert all(not output.any() for output in out.mixer_outputs)


def test_tied_embeddings_teacher(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", "llama", tied=True)
    convert(tmp_path / "teacher", tmp_path / "supernet", mixers="attention,gdn")
    config = json.loads((tmp_path / "supernet" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(tmp_path / "supernet" / "model.safetensors")
    model = SupernetForCausalLM.from_pretrained(tmp_path / "supernet")
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), teacher_logits(teacher, ids), atol=1e-4, rtol=1e-4)


def test_sharded_teacher_converts_like_a_single_file(llama, tmp_path):
    teacher, _, supernet = llama
    teacher.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "sharded", tmp_path / "supernet", window_size=5)
    assert (tmp_path / "supernet" / "model.safetensors").read_bytes() == (
        supernet / "model.safetensors"
    ).read_bytes()


def test_tokenizer_files_travel_with_the_checkpoint(tmp_path):
    from transformers import AutoTokenizer

    from fast_llm_supernet.tools.tiny_teacher import TinyTeacherConfig, make_tiny_teacher

    make_tiny_teacher(
        tmp_path / "teacher",
        TinyTeacherConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            steps=0,
            corpus_files=3,
        ),
        log=None,
    )
    convert(tmp_path / "teacher", tmp_path / "supernet")
    original = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    copied = AutoTokenizer.from_pretrained(tmp_path / "supernet")
    text = "Now is better than never."
    assert copied(text)["input_ids"] == original(text)["input_ids"]
    assert SupernetForCausalLM.from_pretrained(tmp_path / "supernet").config.vocab_size == len(copied)


# ---- options and errors ---------------------------------------------------------------------------


def test_cli_mixer_subset_main_mixer_and_dtype(llama, tmp_path, capsys):
    _, teacher_dir, _ = llama
    main(
        [
            "--teacher",
            str(teacher_dir),
            "--output",
            str(tmp_path / "out"),
            "--mixers",
            "attention,gdn",
            "--main-mixer",
            "gdn",
            "--dtype",
            "bfloat16",
        ]
    )
    assert "wrote" in capsys.readouterr().out
    config = Apriel2TextConfig.from_file(tmp_path / "out")
    mixer = config.decoder.block.mixer
    assert list(mixer.mixers) == ["attention", "gdn"] and mixer.main_mixer_name == "gdn"
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    assert set(PresetsFile.load(tmp_path / "out").presets) == {
        "all-attention",
        "all-gdn",
        "attention-ends-gdn",
    }
    model = SupernetForCausalLM.from_pretrained(tmp_path / "out")
    assert model.resolve_placement(None).canonical == "gdn*3"


def test_unsupported_architecture_names_the_field_and_the_choices(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ConversionError, match=r"model_type 'gpt2'.*llama, mistral, qwen2"):
        convert(tmp_path, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["--teacher", str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'.*'silu'"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
            r"rope type 'llama3'.*'default'",
        ),
        ({"model_type": "mistral", "sliding_window": 4096}, r"sliding_window=4096"),
    ],
)
def test_unsupported_teacher_settings(tmp_path, overrides, message):
    config = {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": MLP,
    }
    (tmp_path / "config.json").write_text(json.dumps(config | overrides))
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"mixers": "attention,mamba"},
            r"unknown mixer 'mamba'; valid choices: attention, sliding_window, gdn, kda",
        ),
        ({"mixers": "gdn,kda"}, r"--main-mixer 'attention' is not one of the converted mixers: gdn, kda"),
        ({"dtype": "int8"}, r"--dtype 'int8'.*float32"),
        ({"window_size": 0}, r"--window-size"),
    ],
)
def test_bad_options(llama, tmp_path, options, message):
    _, teacher_dir, _ = llama
    with pytest.raises(ConversionError, match=message):
        convert(teacher_dir, tmp_path / "out", **options)


def test_missing_safetensors_is_an_error(llama, tmp_path):
    _, teacher_dir, _ = llama
    (tmp_path / "config.json").write_text((teacher_dir / "config.json").read_text())
    with pytest.raises(ConversionError, match="only safetensors"):
        convert(tmp_path, tmp_path / "out")


# ---- upstream Fast-LLM reads the converted checkpoint ---------------------------------------------

UPSTREAM_FORWARD = """
import sys, torch
from safetensors.torch import load_file, save_file
from fast_llm.engine.checkpoint.config import CheckpointLoadConfig
from fast_llm.engine.multi_stage.config import StageMode
from fast_llm.models.gpt.conversion.config import Apriel2TextCheckpointFormat
from fast_llm.models.gpt.huggingface import HuggingfaceGPTModelForCausalLM

checkpoint, inputs, output = sys.argv[1:4]
placements = [name.split("+") for name in sys.argv[4:]]
model = HuggingfaceGPTModelForCausalLM.from_pretrained(
    CheckpointLoadConfig(path=checkpoint, format=Apriel2TextCheckpointFormat, load_config="model"),
    {"distributed": {"backend": "gloo", "use_cuda": False, "compute_dtype": "float32"}},
    mode=StageMode.inference,
)
blocks = list(model.fast_llm_base_model.decoder)
ids = load_file(inputs)["ids"]
logits = {}
for placement in placements:
    # In eval, Fast-LLM's stochastic mixer runs its config's main mixer.
    for block, name in zip(blocks, placement, strict=True):
        block.mixer._config = block.mixer._config.to_copy({"main_mixer_name": name})
    with torch.no_grad():
        logits["+".join(placement)] = model(input_ids=ids).logits.float().contiguous()
save_file(logits, output)
"""


@pytest.mark.fast_llm
def test_upstream_fast_llm_imports_the_conversion_and_agrees(llama, tmp_path):
    """Upstream Fast-LLM (where installed: Python >= 3.12, source) imports the converted checkpoint with
    its own config and computes the same logits as SupernetForCausalLM for every mixer."""
    pytest.importorskip("fast_llm", reason="upstream Fast-LLM is not installed here (see docs/fast_llm.md)")
    from safetensors.torch import save_file

    teacher, teacher_dir, _ = llama
    # A window covering the sequence: upstream's dense path gives all attention sub-mixers of a block
    # the last one's window, which would window `attention` too (see SupernetForCausalLM).
    convert(teacher_dir, tmp_path / "supernet", window_size=SEQ)
    ids = input_ids()
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    placements = [[name] * LAYERS for name in ("attention", "sliding_window", "gdn", "kda")]
    placements.append(["gdn", "kda", "sliding_window"])
    subprocess.run(
        [
            sys.executable,
            "-c",
            UPSTREAM_FORWARD,
            str(tmp_path / "supernet"),
            str(tmp_path / "ids.safetensors"),
            str(tmp_path / "upstream.safetensors"),
            *("+".join(p) for p in placements),
        ],
        check=True,
        env={**os.environ, "TORCH_COMPILE_DISABLE": "1"},  # eager: compiling takes minutes
        timeout=600,
    )
    upstream = load_file(tmp_path / "upstream.safetensors")
    model = SupernetForCausalLM.from_pretrained(tmp_path / "supernet")
    with torch.no_grad():
        for placement in placements:
            torch.testing.assert_close(
                upstream["+".join(placement)], model(ids, placement=placement), atol=1e-5, rtol=1e-5
            )
        torch.testing.assert_close(
            upstream["+".join(placements[0])], teacher_logits(teacher, ids), atol=1e-4, rtol=1e-4
        )
