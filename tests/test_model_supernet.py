"""SupernetForCausalLM: placements, incremental decode, generation, checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fast_llm_supernet.model import SupernetForCausalLM, SupernetOutput
from fast_llm_supernet.model.checkpoint import CheckpointError
from shared_spec import (
    Apriel2TextConfig,
    MixerKind,
    PlacementError,
    Preset,
    PresetsFile,
    uniform_placement,
)

VOCAB, HIDDEN, LAYERS = 64, 32, 4


def small_config(tied: bool = False, plain_last: bool = True) -> Apriel2TextConfig:
    """Three four-mixer supernet layers and (optionally) one plain attention layer."""
    attention = {"type": "attention", "heads": 4, "head_groups": 2, "head_size": 8, "add_linear_biases": False,
                 "rotary": {"type": "mistral_1d", "theta": 10000.0}}
    supernet = {
        "mixer": {
            "type": "stochastic",
            "main_mixer_name": "attention",
            "mixers": {
                "attention": attention,
                "sliding_window": {**attention, "window_size": 3},
                "gdn": {"type": "gdn", "value_heads": 4, "key_heads": 2, "key_head_dim": 8, "value_head_dim": 8,
                        "convolution_layer": {"kernel_size": 4}},
                "kda": {"type": "kda", "heads": 4, "head_dim": 8, "convolution_layer": {"kernel_size": 4},
                        "normalization": {"epsilon": 1e-5}},
            },
        },
        "mlp": {"type": "mlp", "intermediate_size": 48, "activation": "silu", "gated": True, "add_linear_biases": False},
        "normalization": {"type": "rms_norm", "epsilon": 1e-5},
    }
    plain = {**supernet, "mixer": attention}
    pattern = ["supernet"] * (LAYERS - 1) + (["plain"] if plain_last else ["supernet"])
    return Apriel2TextConfig.model_validate({
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
        "decoder": {"type": "pattern", "num_blocks": LAYERS, "pattern": pattern,
                    "blocks": {"supernet": supernet, "plain": plain}},
        "head": {"normalization": {"type": "rms_norm", "epsilon": 1e-5}},
    })


def randomised(model: SupernetForCausalLM, seed: int = 0) -> SupernetForCausalLM:
    """Perturb every parameter so no norm weight is all ones and no gate sits at its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> SupernetForCausalLM:
    torch.manual_seed(0)
    return randomised(SupernetForCausalLM(small_config()))


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def placements_to_check(model):
    single = [uniform_placement(model.spec, kind).canonical for kind in MixerKind]
    return single + ["gdn,kda,sliding_window,attention"]


def test_parameter_names_follow_the_checkpoint_layout(model):
    names = set(model.state_dict())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "model.norm.weight" in names
    prefix = "model.decoder.blocks.0."
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight", "mixer.mixers.attention.q_proj.weight",
                 "mixer.mixers.sliding_window.o_proj.weight", "mixer.mixers.gdn.in_proj_qkvz.weight",
                 "mixer.mixers.kda.f_a_proj.weight"):
        assert prefix + name in names, name
    assert "model.decoder.blocks.3.mixer.k_proj.weight" in names  # plain block: no `.mixers.NAME`


def test_incremental_decode_matches_full_forward(model):
    input_ids = tokens(2, 13, seed=1)
    with torch.no_grad():
        for placement in placements_to_check(model):
            full = model(input_ids, placement=placement)
            caches = model.new_caches(placement, batch_size=2)
            pieces = [model(input_ids[:, :6], caches=caches)]  # prefill, then one token per step
            pieces += [model(input_ids[:, t : t + 1], caches=caches) for t in range(6, 13)]
            stepped = torch.cat(pieces, dim=1)
            torch.testing.assert_close(stepped, full, atol=2e-5, rtol=1e-5, msg=lambda m, p=placement: f"{p}: {m}")


def test_placements_change_the_logits(model):
    input_ids = tokens(1, 8, seed=2)
    with torch.no_grad():
        outputs = [model(input_ids, placement=p) for p in placements_to_check(model)[:4]]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert (outputs[i] - outputs[j]).abs().max() > 1e-3


def test_placement_spellings_agree(model):
    input_ids = tokens(1, 5, seed=3)
    with torch.no_grad():
        as_list = model(input_ids, placement=["gdn", "gdn", "kda", "attention"])
        as_choice_list = model(input_ids, placement=["gdn", "gdn", "kda"])
        as_string = model(input_ids, placement="gdn*2,kda")
    torch.testing.assert_close(as_list, as_choice_list, atol=0, rtol=0)
    torch.testing.assert_close(as_list, as_string, atol=0, rtol=0)


def test_bad_placement_names_the_layer(model):
    with pytest.raises(PlacementError, match=r"layer 2.*'mamba'.*valid choices"):
        model(tokens(1, 3), placement=["gdn", "kda", "mamba"])
    with pytest.raises(PlacementError):
        model.new_caches("nonsense,,", batch_size=1)


def test_caches_pin_the_placement(model):
    caches = model.new_caches("gdn*", batch_size=1)
    with pytest.raises(PlacementError, match="differs"):
        model(tokens(1, 2), placement="kda*", caches=caches)


def test_mixer_outputs_are_returned_per_layer(model):
    input_ids = tokens(2, 4)
    with torch.no_grad():
        output = model(input_ids, placement="kda*", return_mixer_outputs=True)
        logits = model(input_ids, placement="kda*")
    assert isinstance(output, SupernetOutput)
    assert len(output.mixer_outputs) == LAYERS
    assert all(out.shape == (2, 4, HIDDEN) for out in output.mixer_outputs)
    assert output.placement.mixers == ("kda", "kda", "kda", "attention")
    torch.testing.assert_close(output.logits, logits, atol=0, rtol=0)


def greedy_without_cache(model, input_ids, placement, steps):
    sequence = input_ids
    for _ in range(steps):
        next_token = model(sequence, placement=placement)[:, -1].argmax(-1)
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
    return sequence


@pytest.mark.parametrize("placement", ["attention*", "sliding_window*", "gdn,kda,sliding_window"])
def test_greedy_generate_uses_caches_correctly(model, placement):
    prompt = tokens(2, 5, seed=4)
    with torch.no_grad():
        generated = model.generate(prompt, placement=placement, max_new_tokens=6)
        expected = greedy_without_cache(model, prompt, placement, 6)
    assert generated.shape == (2, 11)
    assert torch.equal(generated, expected)
    assert torch.equal(model.generate(prompt, placement=placement, max_new_tokens=6), generated)


def test_long_greedy_generation_keeps_its_tokens(model):
    # Past the first buffers of every cache (sliding-window buffers hold 64 tokens): the same tokens as decoding
    # without any cache.
    prompt = tokens(1, 9, seed=8)
    with torch.no_grad():
        for placement in ("attention*", "sliding_window*", "sliding_window,gdn,attention"):
            generated = model.generate(prompt, placement=placement, max_new_tokens=90)
            assert torch.equal(generated, greedy_without_cache(model, prompt, placement, 90)), placement


def test_sampling_is_reproducible_with_a_generator(model):
    prompt = tokens(2, 3, seed=5)
    runs = [
        model.generate(prompt, placement="gdn*", max_new_tokens=5, do_sample=True, temperature=0.8, top_k=10,
                       top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, 8) and torch.equal(runs[0][:, :3], prompt)


def test_generation_stops_at_eos(model):
    prompt = tokens(1, 4, seed=6)
    first = model.generate(prompt, placement="kda*", max_new_tokens=1)[0, -1].item()
    stopped = model.generate(prompt, placement="kda*", max_new_tokens=8, eos_token_id=first)
    assert stopped.shape == (1, 5) and stopped[0, -1].item() == first


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    torch.manual_seed(1)
    model = randomised(SupernetForCausalLM(small_config(tied=tied)), seed=3)
    presets = PresetsFile(default="fast", presets={"fast": Preset(placement="gdn*2,kda", description="test")})
    path = model.save_pretrained(tmp_path / "ckpt", presets=presets)
    stored = load_file(str(path / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not tied)
    loaded = SupernetForCausalLM.from_pretrained(path)
    assert loaded.config.to_json_dict() == model.config.to_json_dict()
    assert loaded.presets == presets
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    input_ids = tokens(2, 6)
    with torch.no_grad():
        for placement in ("fast", "attention*", None):
            resolved = loaded.resolve_placement(placement)  # the saved presets are the loaded model's
            assert torch.equal(loaded(input_ids, placement=placement), model(input_ids, placement=resolved))
    assert loaded.resolve_placement(None).canonical == "gdn*2,kda,attention"  # presets' default


def test_save_replaces_atomically_and_loads_bf16(tmp_path):
    model = randomised(SupernetForCausalLM(small_config()))
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    model.to(torch.bfloat16).save_pretrained(target)  # overwrite in place
    model.float()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or backup left behind
    assert load_file(str(target / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    upcast = SupernetForCausalLM.from_pretrained(target, dtype=torch.float32)
    assert upcast.lm_head.weight.dtype == torch.float32
    assert torch.equal(upcast.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())


def test_sharded_checkpoint_loads(tmp_path):
    model = randomised(SupernetForCausalLM(small_config()))
    source = model.save_pretrained(tmp_path / "single")
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((source / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = SupernetForCausalLM.from_pretrained(sharded)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_loading_is_strict_about_keys(tmp_path):
    model = SupernetForCausalLM(small_config())
    path = model.save_pretrained(tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.decoder.blocks.1.mixer.mixers.kda.A_log"]
    tensors["model.decoder.blocks.1.mixer.mixers.mamba.A_log"] = torch.zeros(4)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): .*kda\.A_log.*unexpected tensors \(1\): .*mamba"):
        SupernetForCausalLM.from_pretrained(path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        SupernetForCausalLM.from_pretrained(path)


def test_mlp_biases_and_activation_names_follow_the_export():
    config = small_config()
    block = config.decoder.blocks["plain"]
    block.mlp = block.mlp.model_copy(update={"activation": "gelu_pytorch_tanh", "add_linear_biases": True,
                                             "layer_2": {"bias": {"enabled": False}}})
    model = SupernetForCausalLM(config)
    mlp = model.model.decoder.blocks[3].mlp
    assert mlp.gate_proj.bias is not None and mlp.up_proj.bias is not None and mlp.down_proj.bias is None
    block.mlp = block.mlp.model_copy(update={"activation": "swish_squared"})
    with pytest.raises(ValueError, match="activation 'swish_squared'.*silu"):
        SupernetForCausalLM(config)


@pytest.mark.parametrize("placement", ["gdn,kda,sliding_window", "kda,gdn,attention"])
def test_chunked_prefill_across_kernel_chunks_matches_full_forward(model, placement):
    """Prefill in pieces longer than the linear mixers' 64-token chunks, then decode."""
    input_ids = tokens(1, 80, seed=8)
    with torch.no_grad():
        full = model(input_ids, placement=placement)
        caches = model.new_caches(placement, batch_size=1)
        pieces = [model(input_ids[:, :70], caches=caches), model(input_ids[:, 70:77], caches=caches)]
        pieces += [model(input_ids[:, t : t + 1], caches=caches) for t in range(77, 80)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-5)
    assert caches.seen_tokens == 80


@pytest.mark.parametrize("sharing", [False, True])
def test_mask_semantics_survive_save_and_load(tmp_path, sharing):
    model = randomised(SupernetForCausalLM(small_config(), upstream_mask_sharing=sharing))
    loaded = SupernetForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.upstream_mask_sharing == sharing
    # Shared masks: the `attention` sub-mixer runs with its last attention sibling's window (3).
    assert loaded.model.decoder.blocks[0].mixer.mixers["attention"].window_size == (3 if sharing else None)
    assert loaded.model.decoder.blocks[3].mixer.window_size is None  # a plain block has no siblings
    input_ids = tokens(1, 9)  # longer than the window
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, placement="attention*"), model(input_ids, placement="attention*"))


def test_incremental_decode_is_exact_in_float64(model):
    """In float64 cached decode equals the full forward to rounding: the caches lose nothing."""
    import copy

    double = copy.deepcopy(model).double()
    input_ids = tokens(2, 11, seed=9)
    with torch.no_grad():
        for placement in ["gdn,kda,sliding_window", "kda,attention,gdn"]:
            full = double(input_ids, placement=placement)
            caches = double.new_caches(placement, batch_size=2)
            pieces = [double(input_ids[:, :4], caches=caches)]
            pieces += [double(input_ids[:, t : t + 1], caches=caches) for t in range(4, 11)]
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-11, rtol=1e-11)
