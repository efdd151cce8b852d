"""`fast_llm_supernet.training.layer_local`: the layer-local first stage of linearising an attention teacher.

One frozen-teacher forward gives, for every layer, the normalised hidden state entering that layer's mixer and
the teacher attention's output on it. Every trainable mixer of every layer (SWA, GDN, KDA) then runs on the
teacher's own input of its layer and learns to reproduce that output; all layers in one step, with no backward
pass through the network (each layer's graph is only its mixers, freed after its own backward). This is the
"attention transfer" stage of LoLCATs-style linearisation, and the activation-matching term of the Super Apriel
paper's stage 1 without its end-to-end forward: on a 2-core CPU it trains all 90 mixers of a 30-layer model
for about the cost of one teacher forward plus one mixer forward/backward per mixer.

Stochastic end-to-end distillation (`trainer.distillation_forward`) comes after it: layer-local training
cannot see how errors compound across layers, end-to-end training can.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.training.loss import DistillLossConfig, LossOutput, activation_distance, masked_mean
from shared_spec import Placement


@torch.no_grad()
def teacher_mixer_io(
    teacher: SupernetForCausalLM, teacher_placement: Placement, input_ids: torch.Tensor  # [B, T]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (normalised hidden state entering the mixer, the teacher mixer's output), both [B, T, D].

    The teacher's decoder only: the head (a quarter of a 135M model's forward) is not needed.
    """
    hidden_states = teacher.model.embed_tokens(input_ids)  # [B, T, D]
    pairs = []
    for block, name in zip(teacher.model.decoder.blocks, teacher_placement.mixers, strict=True):
        mixer_input = block.input_layernorm(hidden_states)
        mixer_output = block.get_mixer(name)(mixer_input)
        pairs.append((mixer_input, mixer_output))
        hidden_states = hidden_states + mixer_output
        hidden_states = hidden_states + block.mlp(block.post_attention_layernorm(hidden_states))
    return pairs


def layer_local_backward(
    student: SupernetForCausalLM,
    teacher: SupernetForCausalLM,
    teacher_placement: Placement,
    input_ids: torch.Tensor,  # [B, T]
    loss_mask: torch.Tensor | None,  # [B, T] bool
    trainable_mixers: set[tuple[int, str]],
    config: DistillLossConfig,
    scale: float = 1.0,
) -> LossOutput:
    """Accumulate into the student's gradients `scale` x the mean over trainable (layer, mixer) pairs of the
    per-token distance between the mixer's output and the teacher's, each on the teacher's own layer input.

    Returns the loss (detached: the backward passes are done) and metrics per mixer name and per layer.
    """
    pairs = sorted(trainable_mixers)
    if not pairs:
        raise ValueError("layer-local training needs at least one trainable mixer")
    io = teacher_mixer_io(teacher, teacher_placement, input_ids)
    blocks = student.model.decoder.blocks
    total = 0.0
    by_mixer: dict[str, list[float]] = defaultdict(list)
    metrics: dict[str, float] = {}
    for layer, name in pairs:
        mixer_input, target = io[layer]
        output = blocks[layer].get_mixer(name)(mixer_input)  # [B, T, D]
        term = masked_mean(activation_distance(output, target, config.activation_distance), loss_mask)
        (term * (scale / len(pairs))).backward()
        value = term.item()
        total += value / len(pairs)
        by_mixer[name].append(value)
        metrics[f"act/layer_{layer:02d}.{name}"] = value
    for name, values in by_mixer.items():
        metrics[f"act/mixer.{name}"] = sum(values) / len(values)
    metrics["activation"] = metrics["loss"] = total
    return LossOutput(total=torch.tensor(total), metrics=metrics)
