"""The `supernet` trainer config for Fast-LLM: `fast-llm train supernet --config X.yaml`.

A `SupernetTrainerConfig` is Fast-LLM's GPT trainer config plus a `supernet:` section. Once the student's
model config is known (after `pretrained` is loaded, before validation), the section is written into
Fast-LLM's own config objects:

| `supernet:` field | becomes (upstream Fast-LLM) |
| --- | --- |
| `reverse_kl`, `forward_kl`, `temperature` | head losses `type: distillation` (`loss_type: reverse_kl` / `forward_kl`) against the teacher |
| `cross_entropy` | head loss `type: label` (loss masks from the data: SFT) |
| `activation` | `distillation_model` + `distillation_loss_weight` of every stochastic decoder block |
| `sampling_strategy`, `sampling_weights`, `placements` | the `StochasticMixer`'s `sampling_strategy`, `sampling_weights`, `predefined_layouts` (+ probabilities) |
| `train_only_mixers`, `frozen_mixer_kinds` | `lr_scale: 0` on embeddings, head, MLPs, norms, non-stochastic blocks and the sub-mixers of the frozen kinds (default: full attention, the teacher's copy) |

The loss has the definition of `fast_llm_supernet.training.loss` (the single-machine trainer's), term for
term, with Fast-LLM's fused kernels computing it:

* KL terms: `training.loss` softens both distributions by T and multiplies by T^2; Fast-LLM's distillation
  loss divides only the teacher's logits by its `temperature`. We set the loss's `logits_scale_factor` to
  1/T (which scales the student's logits and the teacher's), its `temperature` to 1 and its weight to
  w * T^2: the same loss and gradient.
* Activation matching: Fast-LLM adds, per stochastic block, the token mean of the L2 distance between the
  block's mixer output and a target (`l2` in `training.loss`). Upstream's target is the teacher's attention
  output in the teacher's own forward pass; `training.loss` (the single-machine trainer) defines it as the teacher's
  attention applied to the *student's* layer input. With `activation_target: student_input` (default) the
  trainer computes that target with the block's frozen full-attention sub-mixer, the teacher's copy, and
  hands it to Fast-LLM's activation loss in place of the teacher's (see `trainer.py`). `training.loss`
  averages over layers, so each block gets weight `activation / number of stochastic layers`. Only `l2`
  exists upstream; Fast-LLM logs the distance per block and per selected mixer
  (`<block>/activation_distillation_loss/<mixer>`), so lagging mixers show.
* Mixer sampling: Fast-LLM's `StochasticMixer` draws inside the model, seeded by the iteration (all ranks
  agree), with the strategies of `fast_llm_supernet.training.placement_sampling` (uniform, weighted, full layout, predefined
  placements with probabilities, the remainder falling through to the strategy).

No mixer class is subclassed: upstream's Apriel2 exporter looks converters up by exact class, so with
upstream classes the export is the standard Apriel2 checkpoint.
"""

# No `from __future__ import annotations`: Fast-LLM reads the field types at class creation.
import typing

import pydantic
from fast_llm.config import Config, Field, FieldHint, check_field, config_class
from fast_llm.engine.config_utils.runnable import RunnableConfig
from fast_llm.engine.training.config import TrainerConfig
from fast_llm.functional.config import EntropyLossType
from fast_llm.layers.attention.config import AttentionConfig
from fast_llm.layers.block.config import FixedBlockSequenceConfig, PatternBlockSequenceConfig
from fast_llm.layers.decoder.config import (
    DecoderBlockConfig,
    StochasticMixerConfig,
    StochasticMixerSamplingStrategy,
)
from fast_llm.layers.language_model.loss.config import (
    LanguageModelDistillationLossConfig,
    LanguageModelLabelEntropyLossConfig,
)
from fast_llm.layers.ssm.config import GatedDeltaNetConfig, KimiDeltaAttentionConfig
from fast_llm.models.gpt.config import GPTBaseModelConfig, GPTTrainerConfig
from fast_llm.utils import Assert

from fast_llm_supernet.training.loss import DistillLossConfig
from shared_spec import LayerChoices, MixerKind, Placement, PlacementError, SupernetSpec

if typing.TYPE_CHECKING:
    from fast_llm_supernet.fast_llm_adapter.trainer import SupernetTrainer


ACTIVATION_TARGETS = ("student_input", "teacher_forward")


@config_class()
class SupernetDistillationConfig(Config):
    """The `supernet:` section: stochastic distillation of a supernet from a frozen teacher."""

    _abstract = False

    teacher: str = Field(
        default="teacher",
        desc="Name of the entry of `reference_models` that holds the frozen teacher.",
        hint=FieldHint.core,
    )
    reverse_kl: float = Field(
        default=1.0,
        desc="Weight of T^2 * KL(student || teacher) on the logits.",
        hint=FieldHint.core,
        valid=check_field(Assert.geq, 0),
    )
    forward_kl: float = Field(
        default=1.0,
        desc="Weight of T^2 * KL(teacher || student) on the logits.",
        hint=FieldHint.core,
        valid=check_field(Assert.geq, 0),
    )
    activation: float = Field(
        default=1.0,
        desc="Weight of activation matching: the L2 distance between each stochastic layer's selected-mixer"
        " output and the teacher's attention output, averaged over tokens and layers.",
        hint=FieldHint.core,
        valid=check_field(Assert.geq, 0),
    )
    activation_target: str = Field(
        default="student_input",
        desc="What the activation term compares each stochastic layer's mixer output with. `student_input`: the"
        " teacher's attention applied to the input of the student's layer (the frozen full-attention sub-mixer,"
        " which is the teacher's copy), as `fast_llm_supernet.training.loss` defines it. `teacher_forward`:"
        " the teacher's attention output in the teacher's own forward pass (upstream Fast-LLM's definition).",
        hint=FieldHint.feature,
    )
    cross_entropy: float = Field(
        default=0.0,
        desc="Weight of next-token cross-entropy on the labels (loss-masked spans excluded: SFT).",
        hint=FieldHint.core,
        valid=check_field(Assert.geq, 0),
    )
    temperature: float = Field(
        default=1.0,
        desc="Softens both the student's and the teacher's distributions in the KL terms.",
        hint=FieldHint.feature,
        valid=check_field(Assert.gt, 0),
    )
    train_only_mixers: bool = Field(
        default=True,
        desc="Freeze (lr_scale 0) everything but the mixers of the stochastic blocks.",
        hint=FieldHint.feature,
    )
    frozen_mixer_kinds: list[MixerKind] = Field(
        default_factory=lambda: [MixerKind.ATTENTION],
        desc="Mixer kinds that stay frozen even when the mixers train (with train_only_mixers). Full attention is"
        " the teacher's own attention copied in by the conversion: training it would only let it drift.",
        hint=FieldHint.feature,
    )
    sampling_strategy: StochasticMixerSamplingStrategy | None = Field(
        default=None,
        desc="How each step draws its placement: uniform (per layer), weighted (per layer, by"
        " `sampling_weights`) or full_layout (how many layers per mixer, then an arrangement)."
        " Default: keep the model's.",
        hint=FieldHint.feature,
    )
    sampling_weights: dict[str, float] | None = Field(
        default=None,
        desc="Per mixer name, its weight for `sampling_strategy: weighted`.",
        hint=FieldHint.feature,
    )
    placements: dict[str, float] = Field(
        default_factory=dict,
        desc="Placements drawn with a given probability (e.g. `{'gdn*': 0.1, 'attention*2,kda*2': 0.1}`);"
        " the remaining probability falls through to `sampling_strategy`. Any spelling `Placement.parse`"
        " accepts: a compact string with run lengths, or one name per layer separated by commas.",
        hint=FieldHint.feature,
    )

    def _validate(self) -> None:
        super()._validate()
        # The single-machine trainer's checks on the same weights (e.g. not all zero).
        try:
            DistillLossConfig(
                reverse_kl=self.reverse_kl,
                forward_kl=self.forward_kl,
                activation=self.activation,
                cross_entropy=self.cross_entropy,
                temperature=self.temperature,
            )
        except pydantic.ValidationError as error:
            raise ValueError(f"supernet: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        if self.activation_target not in ACTIVATION_TARGETS:
            raise ValueError(
                f"supernet.activation_target: {self.activation_target!r} is not one of: {', '.join(ACTIVATION_TARGETS)}"
            )
        for placement, probability in self.placements.items():
            if not 0 <= probability <= 1:
                raise ValueError(
                    f"supernet.placements[{placement!r}]: probability {probability} is not in [0, 1]"
                )
        if (total := sum(self.placements.values())) > 1:
            raise ValueError(f"supernet.placements: probabilities sum to {total} > 1")

    @property
    def uses_teacher(self) -> bool:
        return self.reverse_kl > 0 or self.forward_kl > 0 or self.activation > 0


def mixer_kind(mixer: Config, where: str) -> MixerKind:
    """The project's mixer kind of a Fast-LLM mixer config; the four kinds only (what the checkpoint loads into)."""
    if type(mixer) is AttentionConfig:
        return MixerKind.ATTENTION if mixer.window_size is None else MixerKind.SLIDING_WINDOW
    if type(mixer) is GatedDeltaNetConfig:
        if (mixer.key_heads == 1) != (mixer.value_heads == 1):
            # Upstream GatedDeltaNet gives a single-head dim no tensor-parallel dim and then cannot
            # concatenate it with the multi-head ones (an assertion deep in model construction).
            raise ValueError(
                f"{where}: Fast-LLM cannot build GDN with key_heads {mixer.key_heads} and value_heads"
                f" {mixer.value_heads} (one of them 1, not both); convert a teacher with at least 2 KV heads"
            )
        return MixerKind.GDN
    if type(mixer) is KimiDeltaAttentionConfig:
        return MixerKind.KDA
    raise ValueError(
        f"{where}: mixer type {mixer.dynamic_type_name or type(mixer).__name__!r} is not one of the supernet's"
        f" kinds: attention (window_size unset), sliding_window (attention with window_size), gdn, kda"
    )


def attention_target_name(mixer: StochasticMixerConfig) -> str | None:
    """The name of a stochastic mixer's full-attention sub-mixer: the teacher's attention, copied by the conversion."""
    return next(
        (
            name
            for name, sub in mixer.mixers.items()
            if type(sub) is AttentionConfig and sub.window_size is None
        ),
        None,
    )


def decoder_layers(base_model: GPTBaseModelConfig) -> list[tuple[str, DecoderBlockConfig]]:
    """One (config path, block config) per decoder layer; layers of one pattern entry share a config object."""
    decoder = base_model.decoder
    if isinstance(decoder, FixedBlockSequenceConfig):
        return [("model.base_model.decoder.block", decoder.block)] * decoder.num_blocks
    if isinstance(decoder, PatternBlockSequenceConfig):
        pattern = list(decoder.pattern or [])
        if not pattern:
            raise ValueError("model.base_model.decoder.pattern: empty")
        expanded = (pattern * (decoder.num_blocks // len(pattern) + 1))[: decoder.num_blocks]
        return [(f"model.base_model.decoder.blocks.{name}", decoder.blocks[name]) for name in expanded]
    raise ValueError(
        f"model.base_model.decoder: type {decoder.dynamic_type_name!r} is not one of: fixed, pattern"
    )


def supernet_spec(layers: list[tuple[str, DecoderBlockConfig]]) -> SupernetSpec:
    """The shared layout description (the one placements are validated against everywhere)."""
    choices = []
    for path, block in layers:
        if isinstance(block.mixer, StochasticMixerConfig):
            mixers = {
                name: mixer_kind(mixer, f"{path}.mixer.mixers.{name}")
                for name, mixer in block.mixer.mixers.items()
            }
            default = block.mixer.main_mixer_name or next(iter(mixers))
            choices.append(LayerChoices(mixers=mixers, default=default))
        else:
            kind = mixer_kind(block.mixer, f"{path}.mixer")
            choices.append(LayerChoices(mixers={kind.value: kind}, default=kind.value, fixed=True))
    return SupernetSpec(layers=tuple(choices))


def apply_supernet_section(config: "SupernetTrainerConfig") -> None:
    """Write the `supernet:` section into the (not yet validated) student model config."""
    section = config.supernet
    base_model = config.model.base_model
    layers = decoder_layers(base_model)
    stochastic = [(path, block) for path, block in layers if isinstance(block.mixer, StochasticMixerConfig)]
    if not stochastic:
        raise ValueError(
            "model.base_model.decoder: no block has a stochastic mixer (`mixer: {type: stochastic, mixers: ...}`);"
            " load a supernet checkpoint (e.g. made by `supernet-convert`) in `pretrained` or describe one"
        )
    spec = supernet_spec(layers)  # also checks every mixer is one of the four kinds

    if section.uses_teacher and section.teacher not in config.reference_models:
        raise ValueError(
            f"supernet.teacher: {section.teacher!r} is not an entry of reference_models"
            f" (entries: {', '.join(config.reference_models) or 'none'})"
        )
    if not section.uses_teacher and section.teacher in config.reference_models:
        raise ValueError(
            f"supernet: reverse_kl, forward_kl and activation are all 0, so the teacher is unused:"
            f" remove reference_models.{section.teacher}"
        )

    # Head losses: the logit terms of the stochastic distillation loss.
    if base_model.head.losses:
        raise ValueError(
            "model.base_model.head.losses: the supernet trainer sets the head losses from"
            " supernet.reverse_kl / forward_kl / cross_entropy / temperature; remove head.losses"
        )
    temperature = section.temperature
    losses = {}
    for name, weight, loss_type in (
        ("reverse_kl", section.reverse_kl, EntropyLossType.reverse_kl),
        ("forward_kl", section.forward_kl, EntropyLossType.forward_kl),
    ):
        if weight > 0:
            losses[name] = LanguageModelDistillationLossConfig(
                loss_type=loss_type,
                reference_model=section.teacher,
                weight=weight * temperature**2,
                logits_scale_factor=1.0 / temperature,
                temperature=1.0,
            )
    if section.cross_entropy > 0:
        losses["cross_entropy"] = LanguageModelLabelEntropyLossConfig(weight=section.cross_entropy)
    base_model.head.losses = losses

    # Stochastic blocks: activation matching, sampling, frozen MLP and norms.
    layout_layers = spec.choice_layers
    predefined_layouts = []
    for text in section.placements:
        try:
            placement = Placement.parse(text, spec)
        except PlacementError as error:
            raise ValueError(f"supernet.placements[{text!r}]: {error}") from None
        predefined_layouts.append([placement.mixers[index] for index in layout_layers])
    distinct_blocks = {id(block): (path, block) for path, block in stochastic}
    if predefined_layouts and len(distinct_blocks) > 1:
        raise ValueError(
            "supernet.placements: Fast-LLM draws predefined layouts per block configuration; this decoder has"
            f" {len(distinct_blocks)} different stochastic blocks ({', '.join(p for p, _ in distinct_blocks.values())})"
        )
    for path, block in distinct_blocks.values():
        mixer = block.mixer
        if section.activation > 0 and section.activation_target == "student_input":
            if attention_target_name(mixer) is None:
                raise ValueError(
                    f"supernet.activation_target: student_input needs a full-attention sub-mixer (the teacher's"
                    f" copy) in every stochastic block; {path}.mixer has none (or use teacher_forward)"
                )
            if not section.train_only_mixers or MixerKind.ATTENTION not in section.frozen_mixer_kinds:
                raise ValueError(
                    "supernet.activation_target: student_input takes the targets from the frozen full-attention"
                    " sub-mixer: keep train_only_mixers true and attention in frozen_mixer_kinds (or use teacher_forward)"
                )
        if section.activation > 0:
            block.distillation_model = section.teacher
            block.distillation_loss_weight = section.activation / len(stochastic)
        if section.sampling_strategy is not None:
            mixer.sampling_strategy = section.sampling_strategy
        if section.sampling_weights is not None:
            unknown = set(section.sampling_weights) - set(mixer.mixers)
            if unknown:
                raise ValueError(
                    f"supernet.sampling_weights: {sorted(unknown)} not mixers of {path}"
                    f" (mixers: {', '.join(mixer.mixers)})"
                )
            mixer.sampling_weights = dict(section.sampling_weights)
        if predefined_layouts:
            mixer.predefined_layouts = predefined_layouts
            mixer.predefined_layout_probabilities = list(section.placements.values())
        if section.train_only_mixers:
            for name, sub_mixer in mixer.mixers.items():
                if mixer_kind(sub_mixer, f"{path}.mixer.mixers.{name}") in section.frozen_mixer_kinds:
                    sub_mixer.lr_scale = 0.0
            block.mlp.lr_scale = 0.0
            for norm in (
                block.normalization,
                block.pre_mixer_normalization,
                block.pre_mlp_normalization,
                block.post_mixer_normalization,
                block.post_mlp_normalization,
            ):
                if norm is not None:
                    norm.lr_scale = 0.0

    if section.train_only_mixers:
        base_model.embeddings.lr_scale = 0.0
        base_model.head.lr_scale = 0.0
        for _, block in layers:
            if not isinstance(block.mixer, StochasticMixerConfig):
                block.lr_scale = 0.0


@config_class(dynamic_type={RunnableConfig: "train_supernet", TrainerConfig: "supernet"})
class SupernetTrainerConfig(GPTTrainerConfig):
    """`fast-llm train supernet`: stochastic distillation of a four-mixer supernet from a frozen teacher."""

    _abstract = False

    supernet: SupernetDistillationConfig = Field(
        desc="Stochastic distillation: teacher, loss weights, mixer sampling, what trains.",
        hint=FieldHint.core,
    )

    def _setup(self) -> None:
        # Called once the student's model config is known (pretrained config loaded), before validation.
        super()._setup()
        self.supernet.validate()
        apply_supernet_section(self)

    @classmethod
    def get_trainer_class(cls) -> type["SupernetTrainer"]:
        from fast_llm_supernet.fast_llm_adapter.trainer import SupernetTrainer

        return SupernetTrainer
