"""The Fast-LLM plugin (`fast-llm train supernet`), against a real upstream Fast-LLM.

Needs `fast_llm` importable (Python >= 3.12, Fast-LLM installed from source next to this project: see
docs/fast_llm.md); skipped with that reason everywhere else, including CI and the project's .venv.
Run here with: /path/to/fl-venv/bin/python -m pytest -m "" tests/test_fast_llm_adapter.py
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

fast_llm = pytest.importorskip(
    "fast_llm",
    reason="upstream Fast-LLM is not installed here (source-only, Python >= 3.12; see docs/fast_llm.md)",
)
torch = pytest.importorskip("torch")

from fast_llm_supernet.fast_llm_adapter import register  # noqa: E402
from fast_llm_supernet.fast_llm_adapter.kda_kernel import finite_torch_chunk_kda  # noqa: E402
from fast_llm_supernet.training import loss as training_loss  # noqa: E402

pytestmark = pytest.mark.fast_llm
register()

from fast_llm.engine.training.config import TrainerConfig  # noqa: E402
from fast_llm.functional.config import EntropyLossType, TargetFormat  # noqa: E402
from fast_llm.layers.ssm import kda as upstream_kda  # noqa: E402

from fast_llm_supernet.fast_llm_adapter.config import SupernetTrainerConfig  # noqa: E402

# Fast-LLM `@torch.compile`s its CPU kernels; compiling takes minutes on 2 cores and changes no value
# these tests check, so subprocesses run eagerly and in-process calls use the undecorated functions.
EAGER_ENV = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONHASHSEED": "0"}
VOCAB = 96


# The same for code these tests run in-process (`torch.compile`d blocks in Fast-LLM's layers).
torch._dynamo.config.disable = True


def _eager(function):
    return getattr(function, "_torchdynamo_orig_callable", function)


def _attention(window=None):
    mixer = {"type": "attention", "heads": 4, "head_groups": 2, "head_size": 8, "rotary": {"type": "default"}}
    return mixer if window is None else {**mixer, "window_size": window}


def _base_model(mixer: dict, num_blocks: int = 2) -> dict:
    return {
        "hidden_size": 32,
        "embeddings": {"vocab_size": VOCAB},
        "head": {"normalization": {"type": "rms_norm"}},
        "decoder": {
            "num_blocks": num_blocks,
            "block": {
                "normalization": {"type": "rms_norm"},
                "mlp": {"intermediate_size": 64, "gated": True, "activation": "silu"},
                "mixer": mixer,
            },
        },
    }


SUPERNET_MIXER = {
    "type": "stochastic",
    "main_mixer_name": "attention",
    "mixers": {
        "attention": _attention(),
        "sliding_window": _attention(window=4),
        "gdn": {"type": "gdn", "value_heads": 4, "key_heads": 2, "key_head_dim": 8, "value_head_dim": 8},
        "kda": {"type": "kda", "heads": 4, "head_dim": 8},
    },
}


def trainer_config(experiment_dir: Path | None = None, train_iters: int = 3, **supernet) -> dict:
    """A complete `supernet` trainer config: random-init student and teacher, Fast-LLM's random data."""
    return {
        "run": {
            "experiment_dir": None if experiment_dir is None else str(experiment_dir),
            "enable_triton_kernels": False,
        },
        "training": {
            "train_iters": train_iters,
            "num_workers": 0,
            "logs": {"interval": 1},
            "checkpoint": {"interval": None},
            "export": {"interval": 1 if experiment_dir is not None else None, "format": "apriel2_text"},
        },
        "data": {
            "gpu": False,
            "micro_batch_size": 48,
            "maximum_document_length": 48,
            "datasets": {"training": {"type": "random"}},
        },
        # No weight decay: a mixer that no step selected then keeps its weights exactly.
        "optimizer": {"learning_rate": {"base": 3e-3}, "weight_decay": 0.0},
        "model": {"distributed": {"use_cuda": False, "seed": 3}, "base_model": _base_model(SUPERNET_MIXER)},
        "reference_models": {"teacher": {"model": {"base_model": _base_model(_attention())}}},
        "supernet": supernet,
    }


def validated(config: dict) -> SupernetTrainerConfig:
    return SupernetTrainerConfig.from_dict(config).validate()


def test_supernet_trainer_is_registered():
    assert TrainerConfig.get_subclass("supernet") is SupernetTrainerConfig


def test_section_becomes_fast_llm_losses_sampling_and_frozen_weights():
    config = validated(
        trainer_config(
            temperature=2.0,
            reverse_kl=1.0,
            forward_kl=0.5,
            activation=3.0,
            cross_entropy=0.25,
            sampling_strategy="full_layout",
            placements={"kda*": 0.25, "attention,gdn": 0.5},
        )
    )
    base_model = config.model.base_model
    losses = base_model.head.losses
    assert set(losses) == {"reverse_kl", "forward_kl", "cross_entropy"}
    # training.loss's T^2 * KL of both softened distributions: student and teacher logits scaled by 1/T.
    assert losses["reverse_kl"].loss_type == EntropyLossType.reverse_kl
    assert losses["reverse_kl"].weight == pytest.approx(4.0)
    assert losses["forward_kl"].weight == pytest.approx(2.0)
    for name in ("reverse_kl", "forward_kl"):
        assert losses[name].logits_scale_factor == pytest.approx(0.5)
        assert losses[name].temperature == 1.0
        assert losses[name].reference_model == "teacher"
    assert losses["cross_entropy"].weight == pytest.approx(0.25)

    block = base_model.decoder.block
    assert block.distillation_model == "teacher"
    assert block.distillation_loss_weight == pytest.approx(3.0 / 2)  # mean over the 2 stochastic layers
    mixer = block.mixer
    assert mixer.sampling_strategy == "full_layout"
    layouts = dict(
        zip(map(tuple, mixer.predefined_layouts), mixer.predefined_layout_probabilities, strict=True)
    )
    assert layouts == {("kda", "kda"): 0.25, ("attention", "gdn"): 0.5}
    # Only mixer weights train.
    assert block.mlp.lr_scale == 0 and block.normalization.lr_scale == 0
    assert base_model.embeddings.lr_scale == 0 and base_model.head.lr_scale == 0
    assert mixer.lr_scale is None and block.lr_scale is None
    # Full attention (the teacher's copy) stays frozen by default, the other mixers train.
    assert {name: sub.lr_scale for name, sub in mixer.mixers.items()} == {
        "attention": 0.0,
        "sliding_window": None,
        "gdn": None,
        "kda": None,
    }


@pytest.mark.parametrize(
    ("supernet", "reference_models", "expected"),
    [
        ({"teacher": "oracle"}, None, "supernet.teacher: 'oracle' is not an entry of reference_models"),
        ({"placements": {"mamba*": 0.5}}, None, "supernet.placements['mamba*']"),
        ({"placements": {"kda*": 0.7, "gdn*": 0.6}}, None, "supernet.placements: probabilities sum to"),
        ({"sampling_weights": {"attention": 1.0, "rwkv": 1.0}}, None, "supernet.sampling_weights"),
        (
            {"reverse_kl": 0, "forward_kl": 0, "activation": 0, "cross_entropy": 1},
            None,
            "the teacher is unused",
        ),
        ({"reverse_kl": 0, "forward_kl": 0, "activation": 0, "cross_entropy": 0}, {}, "every loss weight"),
        ({"temperature": 0}, None, "temperature"),
        ({"activation_target": "nearest"}, None, "supernet.activation_target: 'nearest' is not one of"),
        ({"frozen_mixer_kinds": []}, None, "supernet.activation_target: student_input takes the targets"),
    ],
)
def test_bad_config_fails_naming_the_field(supernet, reference_models, expected):
    config = trainer_config(**supernet)
    if reference_models is not None:
        config["reference_models"] = reference_models
    with pytest.raises(Exception) as error:
        validated(config)
    assert expected in str(error.value) or expected in repr(error.value.args)


def test_non_supernet_decoder_is_rejected():
    config = trainer_config()
    config["model"]["base_model"] = _base_model(_attention())
    with pytest.raises(Exception, match="no block has a stochastic mixer"):
        validated(config)
    gdn = {"type": "gdn", "value_heads": 4, "key_heads": 1, "key_head_dim": 8, "value_head_dim": 8}
    config["model"]["base_model"] = _base_model({**SUPERNET_MIXER, "mixers": {"gdn": gdn}})
    with pytest.raises(
        Exception, match="mixers.gdn: Fast-LLM cannot build GDN with key_heads 1 and value_heads 4"
    ):
        validated(config)
    config["model"]["base_model"] = _base_model({**SUPERNET_MIXER, "mixers": {"m": {"type": "mamba"}}})
    with pytest.raises(Exception, match="model.base_model.decoder.block.mixer.mixers.m: mixer type 'mamba'"):
        validated(config)


@pytest.mark.parametrize("loss_type", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_temperature_mapping_equals_distill_loss(loss_type, temperature):
    """Fast-LLM's distillation loss with our mapping (scale 1/T, temperature 1, weight T^2) = training.loss."""
    from fast_llm.functional.entropy_loss import torch_entropy_loss_forward_backward

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, VOCAB, generator=generator) * 3
    teacher = torch.randn(5, 7, VOCAB, generator=generator) * 3
    upstream, _ = _eager(torch_entropy_loss_forward_backward)(
        student, teacher, None, None, 1.0 / temperature, TargetFormat.logits, EntropyLossType(loss_type)
    )
    ours = getattr(training_loss, loss_type)(student, teacher, temperature).mean()
    torch.testing.assert_close(upstream * temperature**2, ours, rtol=1e-5, atol=1e-6)


def _kda_inputs(sequence_length=70, heads=2, head_dim=8, decay=20.0):
    generator = torch.Generator().manual_seed(1)
    shape = (1, sequence_length, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=generator).requires_grad_() for _ in range(3))
    g = (-torch.rand(shape, generator=generator) * decay).requires_grad_()  # strong decays overflow exp(+)
    beta = torch.rand(shape[:3], generator=generator).requires_grad_()
    return q, k, v, g, beta


@pytest.mark.parametrize("packed", [False, True])
def test_kda_kernel_matches_upstream_forward_with_finite_gradients(packed):
    cu_seqlens = torch.tensor([0, 23, 70]) if packed else None
    inputs = _kda_inputs()
    ours, _ = finite_torch_chunk_kda(*inputs, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
    ours.square().sum().backward()
    assert all(torch.isfinite(tensor.grad).all() for tensor in inputs)

    upstream_inputs = _kda_inputs()
    upstream_single = upstream_kda._torch_chunk_kda_single
    try:
        upstream_kda._torch_chunk_kda_single = _eager(upstream_single)
        upstream, _ = upstream_kda.torch_chunk_kda(
            *upstream_inputs, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens
        )
    finally:
        upstream_kda._torch_chunk_kda_single = upstream_single
    torch.testing.assert_close(ours, upstream, rtol=1e-4, atol=1e-5)


def test_pth_hook_registers_on_plain_fast_llm_import():
    """In a fresh interpreter, importing Fast-LLM the way its CLI does makes `supernet` known."""
    import site

    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    if not any((Path(directory) / "super_apriel_fast_llm.pth").exists() for directory in site_dirs):
        pytest.skip("super_apriel_fast_llm.pth is not installed (project not pip-installed here)")
    code = textwrap.dedent(
        """
        import fast_llm.cli
        from fast_llm.engine.training.config import TrainerConfig
        print(TrainerConfig.get_subclass("supernet").__module__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=EAGER_ENV, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("fast_llm_supernet.fast_llm_adapter.config")


def _fast_llm_command() -> list[str]:
    script = Path(sys.executable).parent / "fast-llm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fast_llm_supernet.fast_llm_adapter"]


@pytest.mark.slow
def test_train_supernet_cli_trains_only_mixers_and_exports_a_loadable_checkpoint(tmp_path):
    """`fast-llm train supernet` on CPU: KDA-only steps train with finite gradients, only mixer weights
    change, and each export loads in SupernetForCausalLM."""
    import yaml
    from safetensors.torch import load_file

    from fast_llm_supernet import SupernetForCausalLM
    from fast_llm_supernet.model.checkpoint import read_upstream_mask_sharing

    config_path = tmp_path / "config.yaml"
    # Every step on the all-KDA placement: a NaN gradient would stop KDA's weights from moving.
    config_path.write_text(yaml.safe_dump(trainer_config(tmp_path / "run", placements={"kda*": 1.0})))
    result = subprocess.run(
        [*_fast_llm_command(), "train", "supernet", "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=EAGER_ENV,
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "nan iterations:   0" in log

    exports = tmp_path / "run" / "export" / "apriel2_text"
    first, last = (exports / "1", exports / "3")
    weights = [load_file(path / "model_0.safetensors") for path in (first, last)]
    changed = {name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])}
    assert changed, "no weight changed"
    assert all(".mixer.mixers.kda." in name for name in changed), sorted(changed)
    assert all(torch.isfinite(weights[1][name]).all() for name in changed)

    config = json.loads((last / "config.json").read_text())
    assert config["model_type"] == "apriel2_text"
    assert not read_upstream_mask_sharing(last)
    model = SupernetForCausalLM.from_pretrained(last)
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for placement in ("attention*", "sliding_window*", "gdn*", "kda*"):
        output = model(input_ids, placement=placement)
        logits = getattr(output, "logits", output)
        assert logits.shape == (2, 16, VOCAB) and torch.isfinite(logits).all()


def test_paper_15b_example_is_a_48_layer_four_mixer_supernet():
    """examples/fast_llm/paper_15b.yaml validates (checkpoints replaced by its own architecture) and has
    the paper's shape: 48 layers of attention / sliding_window (4096) / gdn / kda."""
    import copy

    import yaml

    from fast_llm_supernet.fast_llm_adapter.config import decoder_layers, supernet_spec

    example = yaml.safe_load((Path(__file__).parents[1] / "examples/fast_llm/paper_15b.yaml").read_text())
    del example["pretrained"]  # no 15B checkpoint here: the architecture is spelled out in the file
    teacher = copy.deepcopy(example["model"]["base_model"])
    teacher["decoder"]["block"]["mixer"] = teacher["decoder"]["block"]["mixer"]["mixers"]["attention"]
    example["reference_models"]["teacher"] = {"model": {"base_model": teacher}}
    example["model"]["distributed"]["use_cuda"] = False
    config = validated(example)

    spec = supernet_spec(decoder_layers(config.model.base_model))
    assert spec.num_layers == 48
    assert all(
        layer.mixers
        == {"attention": "attention", "sliding_window": "sliding_window", "gdn": "gdn", "kda": "kda"}
        for layer in spec.layers
    )
    assert config.model.base_model.decoder.block.mixer.mixers["sliding_window"].window_size == 4096
    assert config.model.base_model.decoder.block.distillation_model == "teacher"


FIXTURE = Path(__file__).parent / "data" / "apriel2_upstream_small"


@pytest.mark.slow
def test_own_attention_masks_make_fast_llm_compute_the_per_mixer_checkpoint():
    """On the upstream fixture (sub-mixers fa, gdn, kda, swa: swa's window is the block's shared mask),
    Fast-LLM as is computes `SupernetForCausalLM` with upstream mask sharing, and with the supernet
    trainer's per-sub-mixer masks it computes the per-mixer semantics that its exports declare."""
    from fast_llm.engine.checkpoint.config import CheckpointLoadConfig
    from fast_llm.engine.multi_stage.config import StageMode
    from fast_llm.functional.config import TritonConfig
    from fast_llm.models.gpt.conversion.config import Apriel2TextCheckpointFormat
    from fast_llm.models.gpt.huggingface import HuggingfaceGPTModelForCausalLM

    from fast_llm_supernet import SupernetForCausalLM
    from fast_llm_supernet.fast_llm_adapter.trainer import give_attention_sub_mixers_their_own_masks

    TritonConfig.TRITON_ENABLED = False
    reference = json.loads((FIXTURE / "reference.json").read_text())
    input_ids = torch.tensor(reference["input_ids"], dtype=torch.int64)
    fast_llm_model = HuggingfaceGPTModelForCausalLM.from_pretrained(
        CheckpointLoadConfig(
            path=FIXTURE / "checkpoint", format=Apriel2TextCheckpointFormat, load_config="model"
        ),
        {"distributed": {"backend": "gloo", "use_cuda": False, "compute_dtype": "float32"}},
        mode=StageMode.inference,
    )
    decoder = list(fast_llm_model.fast_llm_base_model.decoder)
    for block in decoder[:2]:  # placement [fa, fa]: eval mode runs each block's main mixer
        block.mixer._config = block.mixer._config.to_copy({"main_mixer_name": "fa"})

    def fast_llm_logits():
        with torch.no_grad():
            return fast_llm_model(input_ids=input_ids).logits

    def ours(upstream_mask_sharing: bool):
        model = SupernetForCausalLM.from_pretrained(
            FIXTURE / "checkpoint", upstream_mask_sharing=upstream_mask_sharing
        )
        with torch.no_grad():
            output = model(input_ids, placement=["fa", "fa", "attention"])
        return getattr(output, "logits", output)

    shared, per_mixer = ours(True), ours(False)
    assert (shared - per_mixer).abs().max() > 1e-2  # the two semantics differ on this input
    torch.testing.assert_close(fast_llm_logits(), shared, rtol=1e-5, atol=1e-5)
    assert give_attention_sub_mixers_their_own_masks(fast_llm_model.fast_llm_base_model) == 4
    torch.testing.assert_close(fast_llm_logits(), per_mixer, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("activation_target", ["student_input", "teacher_forward"])
def test_activation_target(tmp_path, activation_target):
    """On the all-attention placement the selected mixer is the frozen attention itself: with targets on the
    student's input the activation distance is exactly 0; against the (here unrelated) teacher's own forward
    pass it is not."""
    import re

    import yaml

    config = trainer_config(
        None, train_iters=1, placements={"attention*": 1.0}, activation_target=activation_target
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [*_fast_llm_command(), "train", "supernet", "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=EAGER_ENV,
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    distances = [
        float(value) for value in re.findall(r"decoder\.\d+/activation_distillation_loss: ([0-9.e+-]+)", log)
    ]
    assert len(distances) == 2
    if activation_target == "student_input":
        assert distances == [0.0, 0.0]
    else:
        assert min(distances) > 0
