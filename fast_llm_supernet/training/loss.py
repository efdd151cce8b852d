"""`fast_llm_supernet.training.loss`: the stochastic distillation loss: one definition, used by the single-machine trainer and the Fast-LLM plugin.

    loss = w_rkl * RKL + w_fkl * FKL + w_act * ACT + w_ce * CE

* FKL (forward KL)  = T^2 * KL(teacher || student) on logits divided by the temperature T, per token.
  Mass-covering: the student is pushed to put probability wherever the teacher does.
* RKL (reverse KL)  = T^2 * KL(student || teacher), same temperature. Mode-seeking: penalises the
  student for probability where the teacher has little. The paper's stage 1 uses both.
  Temperature follows Hinton et al.: both distributions are softened and the T^2 factor keeps gradient
  magnitudes comparable across temperatures. (Upstream Fast-LLM divides only the teacher's logits by
  its `temperature`; with T = 1, the default, the two agree exactly.)
* ACT (activation matching), per decoder layer: the distance between the student's selected-mixer
  output and the teacher attention's output *on the same input* (the normalised hidden state that
  entered that student layer), averaged over the layers of the placement. The caller computes the
  targets (see `trainer.py`); this module only measures distances. `l2`: per-token Euclidean norm of
  the difference (upstream Fast-LLM's activation distillation); `mse`: per-token mean squared error.
* CE: next-token cross-entropy on labels (`-100` = ignored); for SFT the data sets labels only on
  assistant turns.

Every term is a masked mean over tokens: `loss_mask` [batch, seq] (True = counts) excludes padding
and, for SFT, non-assistant tokens. All math runs in float32 whatever the compute dtype.

Metrics (plain floats) name each term, each layer (`act/layer_03.gdn`) and each mixer (`act/mixer.gdn`,
the mean over the layers that ran it this step), so users see which mixers lag.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

IGNORE_INDEX = -100


class DistillLossConfig(BaseModel):
    """Weights of the loss terms. A zero weight skips that term's computation."""

    model_config = ConfigDict(extra="forbid")

    reverse_kl: float = Field(1.0, ge=0)
    forward_kl: float = Field(1.0, ge=0)
    activation: float = Field(1.0, ge=0)
    cross_entropy: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    activation_distance: Literal["l2", "mse"] = "l2"

    @model_validator(mode="after")
    def _some_term(self) -> DistillLossConfig:
        if self.reverse_kl == self.forward_kl == self.activation == self.cross_entropy == 0:
            raise ValueError("every loss weight (reverse_kl, forward_kl, activation, cross_entropy) is 0")
        return self

    @property
    def needs_teacher_logits(self) -> bool:
        return self.reverse_kl > 0 or self.forward_kl > 0


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `per_token` [*] over the positions where `mask` [*] is True (all positions when None)."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || q) = sum_v p (log p - log q) from log-probabilities [*, V] -> [*]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token T^2 * KL(teacher || student) = T^2 * sum_v p_t (log p_t - log p_s).  [*, V] -> [*]."""
    student_log_probs = _log_probs(student_logits, temperature)
    teacher_log_probs = _log_probs(teacher_logits, temperature)
    return kl_divergence(teacher_log_probs, student_log_probs) * temperature**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token T^2 * KL(student || teacher) = T^2 * sum_v p_s (log p_s - log p_t).  [*, V] -> [*]."""
    student_log_probs = _log_probs(student_logits, temperature)
    teacher_log_probs = _log_probs(teacher_logits, temperature)
    return kl_divergence(student_log_probs, teacher_log_probs) * temperature**2


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy [*]; positions labelled IGNORE_INDEX give 0."""
    per_token = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_token.view(labels.shape)


def activation_distance(student: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Per-token distance between two mixer outputs [*, D] -> [*]: `l2` norm or `mse` (mean over D)."""
    difference = student.float() - target.float()
    if kind == "l2":
        return torch.linalg.vector_norm(difference, dim=-1)
    if kind == "mse":
        return difference.pow(2).mean(-1)
    raise ValueError(f"activation_distance {kind!r} is not one of: l2, mse")


@dataclass
class LayerActivation:
    """One decoder layer's mixer output and its target, both [batch, seq, hidden]."""

    layer: int
    mixer: str
    student: torch.Tensor
    target: torch.Tensor


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar, differentiable
    metrics: dict[str, float] = field(default_factory=dict)


def distillation_loss(
    config: DistillLossConfig,
    student_logits: torch.Tensor,  # [B, T, V]
    teacher_logits: torch.Tensor | None = None,  # [B, T, V]
    labels: torch.Tensor | None = None,  # [B, T] next-token ids, IGNORE_INDEX where no loss
    loss_mask: torch.Tensor | None = None,  # [B, T] bool, True where a token counts
    activations: Sequence[LayerActivation] = (),
) -> LossOutput:
    """Combine the configured terms; returns the differentiable total and detached per-term metrics."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}

    if config.needs_teacher_logits:
        if teacher_logits is None:
            raise ValueError("forward_kl / reverse_kl weights are set but no teacher logits were given")
        for name, weight, function in (
            ("reverse_kl", config.reverse_kl, reverse_kl),
            ("forward_kl", config.forward_kl, forward_kl),
        ):
            if weight > 0:
                term = masked_mean(function(student_logits, teacher_logits, config.temperature), loss_mask)
                total = total + weight * term
                metrics[name] = term.item()

    if config.cross_entropy > 0:
        if labels is None:
            raise ValueError("cross_entropy weight is set but no labels were given")
        label_mask = labels != IGNORE_INDEX
        if loss_mask is not None:
            label_mask = label_mask & loss_mask
        term = masked_mean(token_cross_entropy(student_logits, labels), label_mask)
        total = total + config.cross_entropy * term
        metrics["cross_entropy"] = term.item()

    if config.activation > 0 and activations:
        per_layer = []
        by_mixer: dict[str, list[float]] = defaultdict(list)
        for activation in activations:
            term = masked_mean(activation_distance(activation.student, activation.target, config.activation_distance), loss_mask)
            per_layer.append(term)
            metrics[f"act/layer_{activation.layer:02d}.{activation.mixer}"] = term.item()
            by_mixer[activation.mixer].append(term.item())
        term = torch.stack(per_layer).mean()
        total = total + config.activation * term
        metrics["activation"] = term.item()
        for mixer, values in by_mixer.items():
            metrics[f"act/mixer.{mixer}"] = sum(values) / len(values)

    metrics["loss"] = total.item()
    return LossOutput(total=total, metrics=metrics)
