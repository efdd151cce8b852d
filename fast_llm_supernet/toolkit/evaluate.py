"""`fast_llm_supernet.toolkit.evaluate`: quality of many placements on held-out text, with the PyTorch model.

A placement's quality is measured against the supernet's own all-attention placement (the teacher's
attention, copied in at conversion and frozen in training), so all-attention scores exactly 1.0:

* `top1`: how often the placement's most likely next token is the teacher's (what a draft placement's
  acceptance rate follows);
* `kl`: KL(teacher || placement) per token, in nats;
* `ppl`: perplexity of the held-out text itself.

Each figure comes with a standard error over the held-out rows (rows are the sampling unit: tokens of one
row are not independent). The teacher runs once per row batch for all placements. Placements are visited in
sorted order and the hidden states after each layer are kept on a stack, so a placement recomputes only the
layers after the prefix it shares with the previous one (`Sharing` counts what that saves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from tqdm.auto import tqdm

from fast_llm_supernet.model import SupernetForCausalLM
from fast_llm_supernet.training.data import PackedData, load_tokenizer, pack_documents, read_documents
from fast_llm_supernet.training.loss import kl_divergence
from shared_spec import MixerKind, Placement
from shared_spec.placement import uniform_placement


class PlacementQuality(BaseModel):
    """One evaluated placement: a line of the evaluations JSONL file."""

    placement: str  # canonical compact string
    hash: str
    top1: float
    top1_se: float
    kl: float
    kl_se: float
    ppl: float
    tokens: int
    attention_layers: int  # layers running full attention (the stratum of stratified sampling)
    checkpoint: str = ""
    data: str = ""  # which held-out text (file names and row count): results on other text do not mix


@dataclass
class Sharing:
    """Decoder layers computed, against what evaluating each placement from scratch would compute."""

    computed: int = 0
    without_sharing: int = 0

    @property
    def saved_fraction(self) -> float:
        return 1 - self.computed / self.without_sharing if self.without_sharing else 0.0


@dataclass
class HeldOutRows:
    """Held-out text cut into rows, and a label saying which text it is."""

    data: PackedData
    label: str
    batch_size: int = 4

    def batches(self):
        for first in range(0, self.data.num_rows, self.batch_size):
            yield self.data.rows(torch.arange(first, min(first + self.batch_size, self.data.num_rows)))

    @property
    def num_batches(self) -> int:
        return math.ceil(self.data.num_rows / self.batch_size)


def load_held_out(
    paths: list[Path], tokenizer_dir: Path, sequence_length: int, max_tokens: int | None, batch_size: int = 4
) -> HeldOutRows:
    """Documents (jsonl with a `text` field, or plain text) packed into rows of `sequence_length` targets."""
    documents = read_documents(paths, "jsonl" if all(p.suffix == ".jsonl" for p in paths) else "text")
    data = pack_documents(load_tokenizer(tokenizer_dir), documents, sequence_length)
    if max_tokens is not None:
        rows = max(1, min(data.num_rows, max_tokens // sequence_length))
        data = PackedData(data.tokens[:rows], data.target_mask[:rows])
    label = f"{'+'.join(p.name for p in paths)}:{data.num_rows}x{sequence_length}"
    return HeldOutRows(data, label, batch_size)


@dataclass
class _Accumulator:
    """Per-row sums for one placement."""

    kl: list[torch.Tensor] = field(default_factory=list)  # [rows] each
    agree: list[torch.Tensor] = field(default_factory=list)
    nll: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)

    def result(self, placement: Placement, spec, checkpoint: str, data: str) -> PlacementQuality:
        kl, agree, nll, tokens = (torch.cat(x).double() for x in (self.kl, self.agree, self.nll, self.tokens))

        def mean_and_se(per_row_sum: torch.Tensor) -> tuple[float, float]:
            per_row = per_row_sum / tokens
            se = per_row.std(unbiased=True).item() / math.sqrt(len(per_row)) if len(per_row) > 1 else float("nan")
            return (per_row_sum.sum() / tokens.sum()).item(), se

        top1, top1_se = mean_and_se(agree)
        kl_mean, kl_se = mean_and_se(kl)
        attention = sum(1 for kind in placement.kinds(spec) if kind == MixerKind.ATTENTION)
        return PlacementQuality(
            placement=placement.canonical, hash=placement.hash, top1=top1, top1_se=top1_se, kl=kl_mean, kl_se=kl_se,
            ppl=math.exp((nll.sum() / tokens.sum()).item()), tokens=int(tokens.sum().item()),
            attention_layers=attention, checkpoint=checkpoint, data=data,
        )


@torch.no_grad()
def evaluate_placements(
    model: SupernetForCausalLM,
    placements: list[Placement],
    held_out: HeldOutRows,
    checkpoint_label: str = "",
    sharing: Sharing | None = None,
    progress: bool = True,
) -> list[PlacementQuality]:
    """Quality of each placement on the held-out rows (same order as `placements`)."""
    reference = uniform_placement(model.spec, MixerKind.ATTENTION)  # the teacher
    order = sorted(range(len(placements)), key=lambda i: placements[i].mixers)
    accumulators = [_Accumulator() for _ in placements]
    sharing = sharing if sharing is not None else Sharing()
    blocks = model.model.decoder.blocks
    bar = tqdm(total=held_out.num_batches * len(placements), desc="evaluate", disable=not progress, leave=False)
    for batch in held_out.batches():
        input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
        teacher_logprobs = F.log_softmax(model(input_ids, placement=reference).float(), dim=-1)  # [B, T, V]
        teacher_top1 = teacher_logprobs.argmax(-1)
        # stack[l]: hidden state after layer l - 1 for the current prefix (stack[0]: the embeddings).
        stack = [model.model.embed_tokens(input_ids)]
        previous: list[str] = []
        for index in order:
            mixers = placements[index].mixers
            shared = 0
            while shared < min(len(previous), len(mixers)) and previous[shared] == mixers[shared]:
                shared += 1
            del stack[shared + 1 :]
            for layer in range(shared, len(mixers)):
                stack.append(blocks[layer](stack[-1], mixers[layer])[0])
            sharing.computed += len(mixers) - shared
            sharing.without_sharing += len(mixers)
            previous = mixers
            logprobs = F.log_softmax(model.lm_head(model.model.norm(stack[-1])).float(), dim=-1)
            weight = mask.to(logprobs.dtype)
            kl = kl_divergence(teacher_logprobs, logprobs)  # [B, T]
            nll = -logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            accumulator = accumulators[index]
            accumulator.kl.append((kl * weight).sum(-1))
            accumulator.agree.append(((logprobs.argmax(-1) == teacher_top1).to(weight.dtype) * weight).sum(-1))
            accumulator.nll.append((nll * weight).sum(-1))
            accumulator.tokens.append(weight.sum(-1))
            bar.update(1)
    bar.close()
    return [acc.result(p, model.spec, checkpoint_label, held_out.label) for acc, p in zip(accumulators, placements, strict=True)]
