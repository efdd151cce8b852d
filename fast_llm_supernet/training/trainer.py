"""`fast_llm_supernet.training.trainer`: the single-machine supernet trainer (the embedded default): stochastic distillation and SFT, CPU or one GPU.

    supernet-train --config run.yaml [--set optimizer.lr=1e-3 ...] [--check]

One step:
  1. the placement of the step is drawn (`placement_sampling.MixerSampler`, a pure function of the step);
  2. the frozen teacher runs the batch with its placement (full attention) -> teacher logits;
  3. the student runs the batch with the drawn placement; for every layer whose selected mixer trains,
     the normalised hidden state entering that layer is captured (a forward hook on the block's input
     norm) and the teacher's attention mixer of that layer runs on *that same tensor*, under no_grad,
     to give the activation target;
  4. `loss.distillation_loss` combines reverse KL, forward KL, activation matching and
     cross-entropy; AdamW with warmup + cosine and gradient clipping updates the trainable weights
     (`optimizer.mixer_lr_scale`: per-mixer lr multipliers, one parameter group each).

Why the activation target is "teacher attention on the student's input" rather than the teacher's own
hidden state at that layer (what upstream Fast-LLM compares against): once earlier layers run other
mixers, the teacher's hidden state is computed from a different input, so the distance would charge a
layer for its predecessors' errors. Running the teacher's attention on the student's own input asks
exactly "does this mixer stand in for attention here?", layer by layer, in any context of other mixers,
and costs one attention per layer with no extra teacher pass. The teacher is a separate frozen model
(by default the student's initial checkpoint, whose attention is the original teacher's), so the target
stays the teacher's even if `model.train: all` lets the student's own attention move.

Determinism and resume: the placement and the batch of a step depend only on (seed, step); checkpoints
(trainable weights, optimizer, scheduler, RNG states, step, data position) are written atomically
(temporary directory, then rename; a `latest` pointer replaced atomically); a restarted run finds the
newest checkpoint and continues. On CPU with deterministic settings a resumed run ends bit-identical to
an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fast_llm_supernet.model import SupernetForCausalLM, delta_rule_kernels
from fast_llm_supernet.training import cpu_allocator
from fast_llm_supernet.training.config import (
    ConfigError,
    DataSourceConfig,
    ResolvedPlacements,
    TrainConfig,
    load_config,
    resolve_placements,
)
from fast_llm_supernet.training.data import (
    PackedData,
    batch_indices,
    load_tokenizer,
    pack_conversations,
    pack_documents,
    read_conversations,
    read_documents,
    split_held_out,
)
from fast_llm_supernet.training.layer_local import cpu_bf16_is_native, layer_local_backward
from fast_llm_supernet.training.loss import (
    LayerActivation,
    distillation_loss,
    forward_kl,
    token_cross_entropy,
)
from fast_llm_supernet.training.placement_sampling import MixerSampler
from shared_spec import MixerKind, Placement, Preset, PresetsFile

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ---- pieces shared with other trainers (no trainer state) -----------------------------------------------


def select_trainable_parameters(
    model: SupernetForCausalLM, train: str, frozen_mixer_kinds: list[MixerKind]
) -> set[tuple[int, str]]:
    """Set requires_grad per the config; returns the (layer, mixer name) pairs whose mixer trains.

    `mixers`: only the sub-mixers of choice layers train (the paper's stage 1); `all`: everything does.
    Mixers of a kind in `frozen_mixer_kinds` stay frozen either way.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(train == "all")
    trainable_mixers = set()
    for index, (block, layer) in enumerate(zip(model.model.decoder.blocks, model.spec.layers, strict=True)):
        for name, kind in layer.mixers.items():
            mixer = block.get_mixer(name)
            trains = kind not in frozen_mixer_kinds and (train == "all" or not layer.fixed)
            mixer.requires_grad_(trains)
            if trains and any(True for _ in mixer.parameters()):
                trainable_mixers.add((index, name))
    return trainable_mixers


def optimizer_parameter_groups(
    model: SupernetForCausalLM,
    trainable: list[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float,
    mixer_lr_scale: dict[str, float],
) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (lr multiplier, weight decay or not) that some trainable parameter has.

    A mixer's parameters (in every layer) get `lr * mixer_lr_scale[its name]`; every other parameter, and
    mixers not named, get `lr`. Matrices decay, vectors (norms, A_log, dt_bias) do not. Each group carries
    its multiplier (`lr_scale`) and its parameters' names (`param_names`), saved with the optimizer state.
    Groups come in a fixed order, unscaled first, so group 0 holds plain-lr parameters whenever any do.
    """
    scale_of: dict[int, float] = {}
    for block, layer in zip(model.model.decoder.blocks, model.spec.layers, strict=True):
        for name in layer.mixers:
            for parameter in block.get_mixer(name).parameters():
                scale_of[id(parameter)] = mixer_lr_scale.get(name, 1.0)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, parameter in trainable:
        scale, decays = scale_of.get(id(parameter), 1.0), parameter.ndim >= 2
        group = groups.setdefault(
            (scale, decays),
            {"params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale,
             "weight_decay": weight_decay if decays else 0.0},
        )
        group["params"].append(parameter)
        group["param_names"].append(name)
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[0], not key[1]))
    return [groups[key] for key in order]


def distillation_forward(
    student: SupernetForCausalLM,
    teacher: SupernetForCausalLM | None,
    teacher_placement: Placement | None,
    placement: Placement,
    input_ids: torch.Tensor,  # [B, T]
    match_layers: list[int],
) -> tuple[torch.Tensor, torch.Tensor | None, list[LayerActivation]]:
    """Student logits, teacher logits (None without a teacher) and the activation pairs of `match_layers`.

    The target of layer i is the teacher's layer-i mixer (its placement's, normally attention) applied to
    the normalised hidden state that entered the student's layer i.
    """
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(input_ids, placement=teacher_placement)  # [B, T, V]

    blocks = student.model.decoder.blocks
    mixer_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        blocks[i].input_layernorm.register_forward_hook(
            lambda module, args, output, i=i: mixer_inputs.__setitem__(i, output)
        )
        for i in match_layers
    ]
    try:
        output = student(input_ids, placement=placement, return_mixer_outputs=bool(match_layers))
    finally:
        for hook in hooks:
            hook.remove()
    if not match_layers:
        return output, teacher_logits, []

    activations = []
    for i in match_layers:
        with torch.no_grad():
            target_mixer = teacher.model.decoder.blocks[i].get_mixer(teacher_placement.mixers[i])
            target = target_mixer(mixer_inputs[i].detach())  # [B, T, D]
        activations.append(LayerActivation(i, placement.mixers[i], output.mixer_outputs[i], target))
    return output.logits, teacher_logits, activations


@torch.no_grad()
def evaluate_placements(
    student: SupernetForCausalLM,
    teacher: SupernetForCausalLM,
    teacher_placement: Placement,
    data: PackedData,
    placements: list[Placement],
    batch_size: int,
    max_batches: int,
    device: torch.device,
    autocast=nullcontext,
) -> dict[str, float]:
    """Held-out KL(teacher || student) per token and perplexity for each placement, plus the teacher's perplexity."""
    was_training = student.training
    student.eval()
    sums: dict[str, float] = defaultdict(float)
    tokens = 0.0
    for first in range(0, min(data.num_rows, max_batches * batch_size), batch_size):
        indices = torch.arange(first, min(first + batch_size, data.num_rows))
        batch = {name: tensor.to(device) for name, tensor in data.rows(indices).items()}
        mask = batch["loss_mask"].float()
        with autocast():
            teacher_logits = teacher(batch["input_ids"], placement=teacher_placement)
        sums["teacher/ce"] += (token_cross_entropy(teacher_logits, batch["labels"]) * mask).sum().item()
        for placement in placements:
            with autocast():
                logits = student(batch["input_ids"], placement=placement)
            sums[f"{placement.canonical}/kl"] += (forward_kl(logits, teacher_logits) * mask).sum().item()
            sums[f"{placement.canonical}/ce"] += (token_cross_entropy(logits, batch["labels"]) * mask).sum().item()
        tokens += mask.sum().item()
    student.train(was_training)
    tokens = max(tokens, 1.0)
    results = {"eval/teacher/ppl": math.exp(sums["teacher/ce"] / tokens)}
    for placement in placements:
        results[f"eval/{placement.canonical}/kl"] = sums[f"{placement.canonical}/kl"] / tokens
        results[f"eval/{placement.canonical}/ppl"] = math.exp(sums[f"{placement.canonical}/ce"] / tokens)
    return results


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR factor at a step: linear warmup to 1, then cosine down to `min_ratio` at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def placement_label(placement: Placement, spec) -> str:
    """A preset-safe name: `all-gdn` for a uniform placement, else `placement-<hash>`."""
    kinds = {kind for layer, kind in zip(spec.layers, placement.kinds(spec), strict=True) if not layer.fixed}
    short = {MixerKind.SLIDING_WINDOW: "swa"}
    if len(kinds) == 1:
        kind = next(iter(kinds))
        return f"all-{short.get(kind, kind.value)}"
    return f"placement-{placement.hash}"


# ---- the trainer ----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    initial_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    export_path: Path | None = None


class MetricsWriter:
    """metrics.jsonl (one record per line) and TensorBoard where it is installed."""

    def __init__(self, output_dir: Path, tensorboard: bool, resume: tuple[int, int] | None):
        """`resume`: (step, number of records) of the checkpoint resumed from; None starts a new log."""
        self.path = output_dir / METRICS_FILE
        self.records = 0
        if resume is not None and self.path.exists():
            # Drop what the killed run logged after its last checkpoint: those steps run again.
            kept = [line for line in self.path.read_text().splitlines() if line.strip()][: resume[1]]
            self.path.write_text("".join(line + "\n" for line in kept))
            self.records = len(kept)
        elif resume is None and self.path.exists():
            self.path.unlink()
        self.handle = self.path.open("a")
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(
                    str(output_dir / "tensorboard"), purge_step=resume[0] + 1 if resume else None
                )
            except (ImportError, ModuleNotFoundError):
                pass

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self.handle.write(json.dumps({"kind": kind, "step": step, **metrics}, sort_keys=False) + "\n")
        self.handle.flush()
        self.records += 1
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float):
                    self.tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        self.config = config
        self.log = log
        # Everything in the config is checked against the checkpoints before any weight or data is read.
        self.placements: ResolvedPlacements = resolve_placements(config)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
        self.device = torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            cpu_allocator.keep_freed_memory()  # no page faults on every step's activations (cpu_allocator)
        self.use_bf16 = config.bf16 and self.device.type == "cuda"
        self.layer_local_cpu_bf16 = config.cpu_bf16 and self.device.type == "cpu"  # inside each mixer's thread
        if self.layer_local_cpu_bf16 and not cpu_bf16_is_native():
            self.log(f"warning: cpu_bf16 is set, but this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
                     "native bf16 matmuls: they are emulated, and a step runs slower than in float32 (3.1-3.6x at "
                     "SmolLM2-135M's shape on an AVX2 CPU, benchmarks/README.md); set cpu_bf16: false")
        self.output_dir = config.output_dir
        self.checkpoints_dir = self.output_dir / CHECKPOINTS_DIR

        self.student = SupernetForCausalLM.from_pretrained(config.model.checkpoint, device=self.device)
        self.student.train()
        self.spec = self.student.spec
        # The frozen teacher: distillation targets and the reference of every evaluation.
        self.teacher = SupernetForCausalLM.from_pretrained(config.teacher_checkpoint, device=self.device)
        self.teacher.requires_grad_(False).eval()
        if self.teacher.config.vocab_size != self.student.config.vocab_size:
            raise ConfigError(
                f"teacher.checkpoint: vocab size {self.teacher.config.vocab_size} differs from the student's "
                f"{self.student.config.vocab_size}"
            )
        self.trainable_mixers = select_trainable_parameters(
            self.student, config.model.train, config.model.frozen_mixer_kinds
        )
        self.trainable = [(name, p) for name, p in self.student.named_parameters() if p.requires_grad]
        trained_kinds = {self.spec.layers[index].mixers[name] for index, name in self.trainable_mixers}
        linear_kinds = tuple(kind.value for kind in (MixerKind.GDN, MixerKind.KDA) if kind in trained_kinds)
        if linear_kinds:
            # Before the first step: on a GPU where fla's backward is wrong or refuses, the torch kernels train.
            self.log(delta_rule_kernels.kernel_choice(self.device, linear_kinds).describe())
        if not self.trainable:
            raise ConfigError("model: no parameter trains (check model.train and model.frozen_mixer_kinds)")
        optimizer = config.optimizer
        self.optimizer = torch.optim.AdamW(
            optimizer_parameter_groups(
                self.student, self.trainable, optimizer.lr, optimizer.weight_decay, optimizer.mixer_lr_scale
            ),
            lr=optimizer.lr,
            betas=optimizer.betas,
            eps=optimizer.eps,
        )
        # One schedule factor for every group: each group's lr is its own initial lr times the factor.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(optimizer.warmup_steps, config.steps, optimizer.min_lr_ratio)
        )
        for name, scale in optimizer.mixer_lr_scale.items():
            layers = sum(1 for _, mixer in self.trainable_mixers if mixer == name)
            effect = f"in {layers} layers" if layers else "(no effect: this mixer does not train)"
            self.log(f"optimizer: {name} trains at lr x {scale:g} {effect}")
        self.sampler = MixerSampler(self.spec, config.sampling, self.student.presets)
        self.log_window: dict[str, list[float]] = defaultdict(list)
        self.train_data, self.eval_data = self._load_data()

    # ---- data -------------------------------------------------------------------------------------------

    def _load_data(self) -> tuple[PackedData, PackedData]:
        config = self.config.data
        tokenizer = load_tokenizer(self.config.tokenizer_path)
        if len(tokenizer) > self.student.config.vocab_size:
            raise ConfigError(
                f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens, the model only "
                f"{self.student.config.vocab_size} embeddings"
            )

        def read(source: DataSourceConfig) -> list:
            if source.format == "chat":
                return read_conversations(source.paths, source.messages_field)
            return read_documents(source.paths, source.format, source.text_field)

        def pack(items: list) -> PackedData:
            if config.train.format == "chat":
                return pack_conversations(tokenizer, items, config.sequence_length)
            return pack_documents(tokenizer, items, config.sequence_length)

        train_items = read(config.train)
        if config.eval is not None:
            eval_items = read(config.eval)
        else:
            train_items, eval_items = split_held_out(train_items, config.eval_fraction)
        train_data = pack(train_items)
        eval_data = pack(eval_items) if eval_items else None
        self.log(
            f"data: {train_data.num_rows} training rows, {eval_data.num_rows if eval_data else 0} held-out rows "
            f"of {config.sequence_length} tokens"
        )
        return train_data, eval_data

    def _batch(self, micro_step: int) -> dict[str, torch.Tensor]:
        indices = batch_indices(micro_step, self.config.data.batch_size, self.train_data.num_rows, self.config.seed)
        return {name: tensor.to(self.device) for name, tensor in self.train_data.rows(indices).items()}

    def _autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ---- one step ----------------------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[dict[str, float], Placement | None]:
        """One optimizer step; returns its metrics and its placement (None for layer-local steps: every
        trainable mixer trains at once)."""
        if self.config.objective == "layer_local":
            return self._layer_local_step(step), None
        placement = self.sampler.sample(step)
        loss_config = self.config.loss
        match_layers = []
        if loss_config.activation > 0:
            match_layers = [i for i, name in enumerate(placement.mixers) if (i, name) in self.trainable_mixers]
        teacher = self.teacher if (loss_config.needs_teacher_logits or match_layers) else None

        def micro_step(batch: dict[str, torch.Tensor], scale: float) -> dict[str, float]:
            logits, teacher_logits, activations = distillation_forward(
                self.student, teacher, self.placements.teacher, placement, batch["input_ids"], match_layers
            )
            output = distillation_loss(
                loss_config, logits, teacher_logits, batch["labels"], batch["loss_mask"], activations
            )
            if output.total.requires_grad:  # False when the placement runs only frozen mixers (all-attention)
                (output.total * scale).backward()
            return output.metrics

        return self._accumulate(step, micro_step), placement

    def _layer_local_step(self, step: int) -> dict[str, float]:
        def micro_step(batch: dict[str, torch.Tensor], scale: float) -> dict[str, float]:
            return layer_local_backward(
                self.student, self.teacher, self.placements.teacher, batch["input_ids"], batch["loss_mask"],
                self.trainable_mixers, self.config.loss, scale=scale,
                bf16=self.layer_local_cpu_bf16,
            ).metrics

        return self._accumulate(step, micro_step)

    def _accumulate(self, step: int, micro_step) -> dict[str, float]:
        """Gradients of the step's micro-batches (`micro_step(batch, scale)` runs the backward passes and returns
        its metrics), their mean metrics, then one optimizer step."""
        accumulation = self.config.data.gradient_accumulation
        sums: dict[str, float] = defaultdict(float)
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulation):
            with self._autocast():
                metrics = micro_step(self._batch(step * accumulation + micro), 1.0 / accumulation)
            for name, value in metrics.items():
                sums[name] += value / accumulation
        return self._optimizer_step(sums)

    def _optimizer_step(self, sums: dict[str, float]) -> dict[str, float]:
        """Clip, step the optimizer and the schedule; the step's metrics with grad norm and base lr."""
        parameters = [p for _, p in self.trainable]
        clip = self.config.optimizer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["lr_scale"]  # the base lr
        self.optimizer.step()
        self.scheduler.step()
        metrics = dict(sums)
        metrics.update(grad_norm=grad_norm.item(), lr=lr)
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _trainer_state(self, step: int, initial_eval: dict, metrics_records: int) -> dict:
        state = {
            "format_version": 2,  # 2: no numpy objects (loadable with weights_only=True)
            "step": step,
            # Only what trains: frozen weights are re-read from model.checkpoint, which they still equal.
            "trainable": {name: p.detach().cpu().clone() for name, p in self.trainable},
            "optimizer": self.optimizer.state_dict(),  # its param_groups carry lr_scale and param_names
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": _numpy_rng_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "data": {
                "seed": self.config.seed,
                "micro_batches_consumed": step * self.config.data.gradient_accumulation,
                "batch_size": self.config.data.batch_size,
                "train_rows": self.train_data.num_rows,
            },
            "initial_eval": initial_eval,
            "metrics_records": metrics_records,  # metrics.jsonl lines written up to this checkpoint
            "log_window": {name: list(values) for name, values in self.log_window.items()},  # not yet logged
            "config": self.config.model_dump(mode="json"),
        }
        return state

    def save_checkpoint(self, step: int, initial_eval: dict, metrics_records: int = 0) -> Path:
        """Write checkpoints/step_N atomically, point `latest` at it, prune old ones."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"step_{step:08d}"
        temporary = self.checkpoints_dir / f".step_{step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        path = temporary / STATE_FILE
        with path.open("wb") as handle:
            torch.save(self._trainer_state(step, initial_eval, metrics_records), handle)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # left by a run that was resumed from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(temporary, final)
        pointer = self.checkpoints_dir / f".{LATEST_FILE}.tmp-{os.getpid()}"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.checkpoints_dir / LATEST_FILE)
        _fsync_directory(self.checkpoints_dir)
        for old in sorted(self.checkpoints_dir.glob("step_*"))[: -self.config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints_dir / LATEST_FILE
        if pointer.exists():
            candidate = self.checkpoints_dir / pointer.read_text().strip()
            if (candidate / STATE_FILE).exists():
                return candidate
        complete = sorted(path for path in self.checkpoints_dir.glob("step_*") if (path / STATE_FILE).exists())
        return complete[-1] if complete else None

    def load_checkpoint(self, directory: Path) -> tuple[int, dict, int]:
        """Restore the run; returns (step, initial eval, metrics records written by then)."""
        state = load_trainer_state(directory / STATE_FILE)
        names = dict(self.trainable)
        if set(state["trainable"]) != set(names):
            raise ConfigError(
                f"cannot resume from {directory}: it trained other parameters than this config "
                "(model.train / model.frozen_mixer_kinds changed); use a new output_dir"
            )
        if state["data"]["train_rows"] != self.train_data.num_rows:
            raise ConfigError(
                f"cannot resume from {directory}: the training data has {self.train_data.num_rows} rows, "
                f"the run had {state['data']['train_rows']} (data or sequence_length changed)"
            )
        # Loading the optimizer state restores each group's lr: a changed mixer_lr_scale would be ignored.
        saved = [(group.get("lr_scale", 1.0), group.get("param_names")) for group in state["optimizer"]["param_groups"]]
        current = [(group["lr_scale"], group["param_names"]) for group in self.optimizer.param_groups]
        if saved != current and all(names is not None for _, names in saved):  # older checkpoints: no names
            raise ConfigError(
                f"cannot resume from {directory}: its optimizer groups have lr multipliers "
                f"{[scale for scale, _ in saved]}, this config's {[scale for scale, _ in current]} "
                "(optimizer.mixer_lr_scale changed); use a new output_dir"
            )
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                names[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])  # restores every group's lr and lr_scale
        for group in self.optimizer.param_groups:  # checkpoints written before mixer_lr_scale existed
            group.setdefault("lr_scale", 1.0)
        self.scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.log_window = defaultdict(list, state["log_window"])
        return state["step"], state["initial_eval"], state["metrics_records"]

    # ---- evaluation and export ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None or not self.placements.eval:
            return {}
        return evaluate_placements(
            self.student,
            self.teacher,
            self.placements.teacher,
            self.eval_data,
            list(self.placements.eval),
            self.config.eval.batch_size or self.config.data.batch_size,
            self.config.eval.max_batches,
            self.device,
            self._autocast,
        )

    def export(self, final_eval: dict[str, float]) -> Path:
        """The trained supernet as an Apriel2 checkpoint, with presets (and their measured metrics) and tokenizer."""
        config = self.config
        presets = self.student.presets.model_copy(deep=True) if self.student.presets else PresetsFile()
        existing = {placement: name for name, placement in presets.resolved(self.spec).items()}
        if config.export.presets is None:
            # Every evaluated placement, under the name the checkpoint already gives it if any.
            chosen = {existing.get(p) or placement_label(p, self.spec): p for p in self.placements.eval}
        else:
            chosen = {name: self.student.resolve_placement(value) for name, value in config.export.presets.items()}
        for name, placement in chosen.items():
            metrics = dict(presets.presets[name].metrics) if name in presets.presets else {}
            if f"eval/{placement.canonical}/kl" in final_eval:
                metrics["kl_to_teacher"] = final_eval[f"eval/{placement.canonical}/kl"]
                metrics["perplexity"] = final_eval[f"eval/{placement.canonical}/ppl"]
            description = presets.presets[name].description if name in presets.presets else ""
            presets.presets[name] = Preset(placement=placement.canonical, description=description, metrics=metrics)
        if self.placements.presets.default is not None:
            presets.default = self.placements.presets.default
        path = config.export_path
        self.student.save_pretrained(path, presets=presets)
        for filename in TOKENIZER_FILES:
            source = config.tokenizer_path / filename
            if source.exists():
                shutil.copyfile(source, path / filename)
        return path

    # ---- the loop -----------------------------------------------------------------------------------------

    def run(self, stop_after_steps: int | None = None) -> TrainResult:
        """Train to `config.steps` (resuming if a checkpoint exists); `stop_after_steps` stops early without
        saving, as if the process were killed then (tests)."""
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start_step, initial_eval, metrics_records = 0, {}, 0
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None:
            if config.resume == "never":
                raise ConfigError(f"resume: 'never', but {self.output_dir} already holds checkpoint {checkpoint.name}")
            start_step, initial_eval, metrics_records = self.load_checkpoint(checkpoint)
            self.log(f"resumed from {checkpoint} at step {start_step}")
        (self.output_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        resume = (start_step, metrics_records) if checkpoint else None
        metrics_writer = MetricsWriter(self.output_dir, config.tensorboard, resume)
        try:
            if checkpoint is None:
                initial_eval = self.evaluate()
                if initial_eval:
                    metrics_writer.write("eval", 0, initial_eval)
                    self.log(format_eval(initial_eval, title="held-out eval at initialisation"))
            progress = _progress(config.progress_bar, config.steps, start_step)
            window = self.log_window  # per-step metrics averaged into the next `train` record
            step = start_step
            while step < config.steps:
                metrics, placement = self.train_step(step)
                step += 1
                for name, value in metrics.items():
                    window[name].append(value)
                if step % config.log_every == 0 or step == config.steps:
                    record = {name: sum(values) / len(values) for name, values in window.items()}
                    record["placement"] = placement.canonical if placement else "layer-local"
                    metrics_writer.write("train", step, record)
                    window.clear()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{metrics['loss']:.4f}", placement=placement.canonical if placement else "layer-local"
                    )
                if stop_after_steps is not None and step >= stop_after_steps and step < config.steps:
                    return TrainResult(step=step, stopped_early=True, initial_eval=initial_eval)
                if config.eval.every and step % config.eval.every == 0 and step < config.steps:
                    metrics_writer.write("eval", step, self.evaluate())
                if step % config.checkpoint.every == 0 or step == config.steps:
                    self.save_checkpoint(step, initial_eval, metrics_writer.records)
            if progress is not None:
                progress.close()
            final_eval = self.evaluate()
            if final_eval:
                metrics_writer.write("eval", step, final_eval)
            export_path = self.export(final_eval)
            summary = {"steps": step, "initial_eval": initial_eval, "final_eval": final_eval, "export": str(export_path)}
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            self.log(format_comparison(initial_eval, final_eval))
            self.log(f"exported {export_path}")
            return TrainResult(step, False, initial_eval, final_eval, export_path)
        finally:
            metrics_writer.close()


def load_trainer_state(path: Path) -> dict:
    """Read a resume checkpoint's trainer_state.pt with `weights_only=True`: tensors, numbers, strings and
    plain containers only, so a checkpoint directory cannot run code when it is read (the numpy RNG state
    is stored as a tensor and numbers for that reason)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(
            f"cannot resume from {path.parent}: {path.name} holds objects other than tensors, numbers, strings "
            "and plain containers, which are not unpickled (a checkpoint of an older trainer, or not one of this "
            f"trainer's); use a new output_dir. ({str(error).splitlines()[0]})"
        ) from error


def _numpy_rng_state() -> dict:
    """numpy's global RNG state without numpy objects (loadable with `weights_only=True`)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_rng_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]))


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="supernet-train", dynamic_ncols=True, file=sys.stderr)


def _eval_rows(evaluation: dict[str, float]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for key, value in evaluation.items():
        _, placement, metric = key.split("/")
        rows.setdefault(placement, {})[metric] = value
    return rows


def format_eval(evaluation: dict[str, float], title: str) -> str:
    lines = [title, f"  {'placement':<40} {'KL to teacher':>14} {'perplexity':>11}"]
    for placement, row in _eval_rows(evaluation).items():
        kl = f"{row['kl']:.4f}" if "kl" in row else "-"
        lines.append(f"  {placement:<40} {kl:>14} {row['ppl']:>11.2f}")
    return "\n".join(lines)


def format_comparison(before: dict[str, float], after: dict[str, float]) -> str:
    """Per placement: KL to the teacher and perplexity before and after training."""
    before_rows, after_rows = _eval_rows(before), _eval_rows(after)
    lines = [
        "held-out eval, before -> after training",
        f"  {'placement':<40} {'KL before':>10} {'KL after':>10} {'ppl before':>11} {'ppl after':>10}",
    ]
    for placement, row in after_rows.items():
        old = before_rows.get(placement, {})

        def number(value, digits):
            return f"{value:.{digits}f}" if value is not None else "-"

        lines.append(
            f"  {placement:<40} {number(old.get('kl'), 4):>10} {number(row.get('kl'), 4):>10} "
            f"{number(old.get('ppl'), 2):>11} {number(row.get('ppl'), 2):>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a supernet: stochastic distillation or SFT on one machine.")
    parser.add_argument("--config", required=True, help="YAML config (see fast_llm_supernet/training/config.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        if args.check:
            resolve_placements(config)
            print(f"config OK: {args.config}")
            return 0
        started = time.perf_counter()
        result = Trainer(config).run(stop_after_steps=args.stop_after_steps)
    except ConfigError as error:
        print(f"supernet-train: {error}", file=sys.stderr)
        return 2
    print(f"done: {result.step} steps in {time.perf_counter() - started:.0f} s; output in {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
