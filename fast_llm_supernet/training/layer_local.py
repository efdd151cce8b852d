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

On a CPU the mixers train side by side, one per core (`workers`), each on one intra-op thread: their graphs are
independent, and most of their ops (the delta rule's per-chunk steps, small elementwise ops) are too small for
two intra-op threads to share well. Measured at SmolLM2-135M's shape: benchmarks/bench_layer_local.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.training.loss import DistillLossConfig, LossOutput, activation_distance, masked_mean
from shared_spec import Placement


def cpu_bf16_is_native() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's bf16 path: AVX-512 on x86, BF16 on Arm).

    Where it does not (an AVX2-only x86 CPU), bf16 autocast makes a layer-local step slower, not faster: 3.1-3.6x
    slower than float32 at SmolLM2-135M's shape on an AVX2 EPYC (benchmarks/README.md), against 1.13x faster on
    an AVX512-BF16 CPU.
    """
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
    workers: int | None = None,
    bf16: bool = False,
) -> LossOutput:
    """Accumulate into the student's gradients `scale` x the mean over trainable (layer, mixer) pairs of the
    per-token distance between the mixer's output and the teacher's, each on the teacher's own layer input.

    `workers`: how many mixers train at once on a CPU, each on one intra-op thread (None: as many as torch's
    intra-op threads; 1: one after another on all of them). Elsewhere they run one after another.
    `bf16`: the student mixers' forwards under bf16 autocast (their matmuls in bf16; the teacher's targets, the
    distance and the gradients stay float32).
    Returns the loss (detached: the backward passes are done) and metrics per mixer name and per layer.
    """
    pairs = sorted(trainable_mixers)
    if not pairs:
        raise ValueError("layer-local training needs at least one trainable mixer")
    io = teacher_mixer_io(teacher, teacher_placement, input_ids)
    blocks = student.model.decoder.blocks

    def train_mixer(pair: tuple[int, str]) -> float:
        layer, name = pair
        mixer_input, target = io[layer]
        with torch.autocast(mixer_input.device.type, dtype=torch.bfloat16, enabled=bf16):  # autocast is per thread
            output = blocks[layer].get_mixer(name)(mixer_input).float()  # [B, T, D]
        term = masked_mean(activation_distance(output, target, config.activation_distance), loss_mask)
        (term * (scale / len(pairs))).backward()  # frees this mixer's graph
        return term.item()

    if workers is None:
        workers = torch.get_num_threads()
    if input_ids.device.type != "cpu":
        workers = 1
    order = pairs
    if workers > 1:  # largest mixers first (parameter count stands in for cost): no long one left for the end
        order = sorted(pairs, key=lambda pair: -sum(p.numel() for p in blocks[pair[0]].get_mixer(pair[1]).parameters()))
    distances = dict(_run_on_cpu_workers(train_mixer, order, workers))

    total = 0.0
    by_mixer: dict[str, list[float]] = defaultdict(list)
    metrics: dict[str, float] = {}
    for layer, name in pairs:  # summed in one fixed order, whatever order the mixers ran in
        value = distances[layer, name]
        total += value / len(pairs)
        by_mixer[name].append(value)
        metrics[f"act/layer_{layer:02d}.{name}"] = value
    for name, values in by_mixer.items():
        metrics[f"act/mixer.{name}"] = sum(values) / len(values)
    metrics["activation"] = metrics["loss"] = total
    return LossOutput(total=torch.tensor(total), metrics=metrics)


def _run_on_cpu_workers(function: Callable, items: list, workers: int) -> list:
    """[(item, function(item))] for every item: in order when `workers` is 1, else on `workers` threads that each
    keep to one intra-op thread (torch's thread count is per thread; the caller's is restored after)."""
    if workers <= 1:
        return [(item, function(item)) for item in items]
    threads = torch.get_num_threads()

    def on_one_thread(item):
        torch.set_num_threads(1)
        return item, function(item)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="layer-local") as pool:
            return list(pool.map(on_one_thread, items))
    finally:
        torch.set_num_threads(threads)
