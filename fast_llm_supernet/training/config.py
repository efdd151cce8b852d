"""`fast_llm_supernet.training.config`: the single-machine trainer's YAML config: one pydantic model, validated before any work starts.

Unknown keys, wrong types, out-of-range values, missing files and placements that do not fit the
checkpoint all fail in `load_config`, with the dotted path of the field in the message
(`optimizer.lr: Input should be greater than 0`), before a model or a data file is opened.

Relative paths are resolved against the current directory. `supernet-train --config X.yaml
--set optimizer.lr=1e-3 --set steps=50` overrides fields (values are parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fast_llm_supernet.training.loss import DistillLossConfig
from fast_llm_supernet.training.placement_sampling import SamplingConfig
from shared_spec import (
    Apriel2TextConfig,
    MixerKind,
    Placement,
    PlacementError,
    PresetsFile,
    SupernetSpec,
    uniform_placement,
)


class ConfigError(ValueError):
    """A config that cannot run. Each line names a field (dotted path) and what is wrong with it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


PlacementValue = str | list[str]


class ModelConfig(_Strict):
    # The student: a supernet checkpoint in the Apriel2 text format (e.g. from `supernet-convert`).
    checkpoint: Path
    # Tokenizer directory; default: the checkpoint directory.
    tokenizer: Path | None = None
    # Which parameters train: `mixers` (the paper's stage 1: only the mixers of choice layers) or `all`.
    train: Literal["mixers", "all"] = "mixers"
    # Mixer kinds that stay frozen even when mixers train. Full attention is the teacher's own attention
    # copied in by the conversion: training it would only let it drift from the teacher.
    frozen_mixer_kinds: list[MixerKind] = Field(default_factory=lambda: [MixerKind.ATTENTION])

    @field_validator("checkpoint")
    @classmethod
    def _has_config(cls, path: Path) -> Path:
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a checkpoint directory (no config.json)")
        return path


class TeacherConfig(_Strict):
    # The frozen teacher, an Apriel2 checkpoint run with `placement`; default: the student's own initial
    # checkpoint. A converted teacher's all-attention placement reproduces the original teacher's logits.
    checkpoint: Path | None = None
    # Default: full attention in every layer.
    placement: PlacementValue | None = None

    @field_validator("checkpoint")
    @classmethod
    def _has_config(cls, path: Path | None) -> Path | None:
        if path is not None and not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a checkpoint directory (no config.json)")
        return path


class DataSourceConfig(_Strict):
    paths: list[Path] = Field(min_length=1)
    format: Literal["text", "jsonl", "chat"] = "jsonl"
    text_field: str = "text"
    messages_field: str = "messages"

    @field_validator("paths", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value

    @field_validator("paths")
    @classmethod
    def _exist(cls, paths: list[Path]) -> list[Path]:
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise ValueError(f"data files do not exist: {missing}")
        return paths


class DataConfig(_Strict):
    train: DataSourceConfig
    # Held-out data; default: every k-th document of `train` (k = 1 / eval_fraction) is held out.
    eval: DataSourceConfig | None = None
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    sequence_length: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    # Micro-batches per optimizer step (all with the step's placement).
    gradient_accumulation: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _eval_source(self) -> DataConfig:
        if self.eval is not None and self.eval.format != self.train.format:
            raise ValueError(f"data.eval.format {self.eval.format!r} differs from data.train.format {self.train.format!r}")
        return self


class OptimizerConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    # Global gradient-norm clip; 0 disables it.
    grad_clip: float = Field(1.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    # The cosine decays from lr to lr * min_lr_ratio at the last step.
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # Mixer name (as in the checkpoint, like `sampling.weights`) -> multiplier of lr for that mixer's weights
    # in every layer, e.g. {sliding_window: 3.0}; unnamed mixers and non-mixer weights keep lr. Each
    # multiplier is its own optimizer parameter group, so warmup and cosine scale them all alike.
    mixer_lr_scale: dict[str, float] = Field(default_factory=dict)

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"each beta must lie in [0, 1), got {betas}")
        return betas

    @field_validator("mixer_lr_scale")
    @classmethod
    def _positive_scales(cls, scales: dict[str, float]) -> dict[str, float]:
        bad = {name: scale for name, scale in scales.items() if not (scale > 0 and scale < float("inf"))}
        if bad:
            raise ValueError(f"each multiplier must be a positive number, got {bad}")
        return scales


class EvalConfig(_Strict):
    # Placements scored on held-out data (KL to the teacher, perplexity); default: every uniform placement
    # (all-attention, all-SWA, all-GDN, all-KDA) the checkpoint offers.
    placements: list[PlacementValue] | None = None
    every: int = Field(0, ge=0)  # steps between evaluations; 0: only before and after training
    max_batches: int = Field(8, ge=1)
    batch_size: int | None = Field(None, ge=1)  # default: data.batch_size


class CheckpointConfig(_Strict):
    every: int = Field(100, ge=1)  # steps between trainer checkpoints (the last step always checkpoints)
    keep: int = Field(2, ge=1)  # how many of the newest checkpoints to keep


class ExportConfig(_Strict):
    # The final Apriel2 checkpoint; default: OUTPUT_DIR/export. The tokenizer files are copied along.
    path: Path | None = None
    # Named placements written to supernet_presets.json with their final eval metrics; default: one preset
    # per evaluated placement.
    presets: dict[str, PlacementValue] | None = None
    default: PlacementValue | None = None


class TrainConfig(_Strict):
    output_dir: Path
    steps: int = Field(ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast for the forward passes; applies on CUDA only (CPU always computes in float32).
    bf16: bool = True
    # bf16 autocast on a CPU too, for objective `layer_local` only: the student mixers' matmuls run in bf16 (the
    # teacher's targets, the distance and the gradients stay float32). For CPUs with native bf16 matmuls only:
    # 1.13x faster a step at SmolLM2-135M's shape with AVX512-BF16, 3.1-3.6x slower on an AVX2-only CPU, where the
    # trainer warns (`layer_local.cpu_bf16_is_native`; benchmarks/bench_layer_local.py).
    cpu_bf16: bool = False
    # Deterministic algorithms (CPU runs are then bit-reproducible, which resume relies on).
    deterministic: bool = True
    threads: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    # `end_to_end`: stochastic distillation, a placement per step through the whole network (the losses in
    # `loss`); `layer_local`: every trainable mixer of every layer learns the teacher attention's output on
    # the teacher's own layer input, all in one step (`training/layer_local.py`; `loss.activation` only).
    objective: Literal["end_to_end", "layer_local"] = "end_to_end"
    # `auto`: continue from the newest checkpoint in output_dir if there is one; `never`: refuse to start
    # when output_dir already holds checkpoints.
    resume: Literal["auto", "never"] = "auto"
    progress_bar: bool = True
    tensorboard: bool = True

    model: ModelConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    loss: DistillLossConfig = Field(default_factory=DistillLossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.optimizer.warmup_steps > self.steps:
            raise ValueError(f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) exceeds steps ({self.steps})")
        if self.cpu_bf16 and self.objective != "layer_local":
            raise ValueError(f"cpu_bf16 applies to objective 'layer_local' only (got objective '{self.objective}')")
        if self.objective == "layer_local":
            logit_terms = {name: getattr(self.loss, name) for name in ("reverse_kl", "forward_kl", "cross_entropy")}
            if any(logit_terms.values()) or self.loss.activation == 0:
                raise ValueError(
                    "objective 'layer_local' trains on activation matching only: set loss.activation > 0 and "
                    f"loss.reverse_kl, loss.forward_kl, loss.cross_entropy to 0 (got activation "
                    f"{self.loss.activation}, {logit_terms})"
                )
        return self

    @property
    def export_path(self) -> Path:
        return self.export.path or self.output_dir / "export"

    @property
    def teacher_checkpoint(self) -> Path:
        return self.teacher.checkpoint or self.model.checkpoint

    @property
    def tokenizer_path(self) -> Path:
        return self.model.tokenizer or self.model.checkpoint


def default_eval_placements(spec: SupernetSpec) -> list[Placement]:
    """Every uniform placement (one mixer kind in all choice layers) that the checkpoint offers."""
    placements = []
    for kind in MixerKind:
        try:
            placement = uniform_placement(spec, kind)
        except PlacementError:
            continue
        if placement not in placements:
            placements.append(placement)
    return placements


class ResolvedPlacements(BaseModel):
    """The config's placements checked against the checkpoints."""

    model_config = ConfigDict(frozen=True)

    teacher: Placement
    eval: tuple[Placement, ...]
    presets: PresetsFile


def resolve_placements(config: TrainConfig) -> ResolvedPlacements:
    """Check every placement of the config against the checkpoints' config.json (cheap: no weights)."""
    errors = []
    student_config = Apriel2TextConfig.from_file(config.model.checkpoint)
    spec = SupernetSpec.from_config(student_config)
    stored_presets = PresetsFile.load(config.model.checkpoint)
    teacher_spec = SupernetSpec.from_config(Apriel2TextConfig.from_file(config.teacher_checkpoint))

    def parse(field: str, value, spec_, presets=stored_presets) -> Placement | None:
        try:
            return Placement.parse(value, spec_, presets)
        except PlacementError as error:
            errors.append(f"{field}: {error}")
            return None

    if config.teacher.placement is None:
        try:
            teacher = uniform_placement(teacher_spec, MixerKind.ATTENTION)
        except PlacementError as error:
            errors.append(f"teacher.placement: no default (full attention everywhere) for this teacher: {error}")
            teacher = None
    else:
        teacher = parse("teacher.placement", config.teacher.placement, teacher_spec, None)
    if teacher_spec.num_layers != spec.num_layers:
        errors.append(
            f"teacher.checkpoint: the teacher has {teacher_spec.num_layers} layers, the student {spec.num_layers}; "
            "activation matching needs the same depth"
        )
    if config.eval.placements is None:
        evals = default_eval_placements(spec)
    else:
        evals = [parse(f"eval.placements.{i}", value, spec) for i, value in enumerate(config.eval.placements)]
    for index, value in enumerate(config.sampling.predefined):
        parse(f"sampling.predefined.{index}", value, spec)
    try:
        from fast_llm_supernet.training.placement_sampling import MixerSampler

        MixerSampler(spec, config.sampling, stored_presets)
    except PlacementError as error:
        errors.append(f"sampling: {error}")
    presets = PresetsFile(presets={}, default=None)
    if config.export.presets is not None:
        for name, value in config.export.presets.items():
            parse(f"export.presets.{name}", value, spec)
        try:
            presets = PresetsFile.model_validate(
                {"presets": {name: {"placement": value} for name, value in config.export.presets.items()}}
            )
        except ValidationError as error:
            errors.append(f"export.presets: {error.errors()[0]['msg']}")
    mixer_names = spec.mixer_names()
    for name in config.optimizer.mixer_lr_scale:
        if name not in mixer_names:
            errors.append(
                f"optimizer.mixer_lr_scale: {name!r} is not a mixer of this checkpoint; "
                f"mixers: {', '.join(sorted(mixer_names))}"
            )
    if config.export.default is not None:
        parse("export.default", config.export.default, spec, presets)
        presets = presets.model_copy(update={"default": config.export.default})
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return ResolvedPlacements(teacher=teacher, eval=tuple(evals), presets=presets)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see fast_llm_supernet/training/config.py for the fields)"
        elif "input" in item and item["type"] not in ("missing",) and not isinstance(item["input"], dict):
            message += f" (got {item['input']!r:.60})"
        lines.append(f"{field}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_config(data: dict[str, Any], check_placements: bool = True) -> TrainConfig:
    """Validate a config dict; raise ConfigError naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config is a mapping of fields, got {type(data).__name__}")
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None
    if check_placements:
        resolve_placements(config)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `KEY.PATH=VALUE` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    for override in overrides or []:
        key, separator, value = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE")
        _set_dotted(data, key.strip(), yaml.safe_load(value))
    return parse_config(data)
