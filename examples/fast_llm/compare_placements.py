"""Per-placement distance to the teacher, before and after `fast-llm train supernet` (tiny CPU example).

    python examples/fast_llm/compare_placements.py [--root /tmp/supernet_fast_llm_tiny] [--export DIR]

Loads the converted student (before) and the Fast-LLM export (after; default: the latest under
ROOT/run/export/apriel2_text/) with `SupernetForCausalLM.from_pretrained`, and the teacher as the converted
student's all-attention placement (which reproduces the original teacher). On held-out stdlib text (the
last documents of ROOT/text.jsonl, which the 95/5 split of prepare_tiny.yaml keeps out of training as far
as ordering allows), prints the mean per-token KL(teacher || student) of each uniform placement.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fast_llm_supernet import SupernetForCausalLM
from fast_llm_supernet.training.loss import forward_kl
from shared_spec import MixerKind, uniform_placement


def held_out_batches(root: Path, tokenizer, sequence_length: int, num_sequences: int) -> torch.Tensor:
    """[num_sequences, sequence_length] token windows packed from the last documents of text.jsonl."""
    documents = [json.loads(line)["text"] for line in (root / "text.jsonl").read_text().splitlines()]
    stream: list[int] = []
    for document in reversed(documents):
        stream.extend(tokenizer(document)["input_ids"])
        if len(stream) >= sequence_length * num_sequences:
            break
    return torch.tensor(stream[: sequence_length * num_sequences]).view(num_sequences, sequence_length)


@torch.no_grad()
def mean_kl(
    student: SupernetForCausalLM, teacher_logits: torch.Tensor, input_ids: torch.Tensor, placement
) -> float:
    logits = student(input_ids, placement=placement)
    logits = getattr(logits, "logits", logits)  # [B, T, V]
    return forward_kl(logits, teacher_logits).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/supernet_fast_llm_tiny"))
    parser.add_argument("--export", type=Path, default=None, help="default: the latest Fast-LLM export")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=8)
    args = parser.parse_args()
    exports = args.root / "run" / "export" / "apriel2_text"
    export = args.export or max(exports.iterdir(), key=lambda path: int(path.name))

    before = SupernetForCausalLM.from_pretrained(args.root / "student").eval()
    after = SupernetForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.root / "student")
    input_ids = held_out_batches(args.root, tokenizer, args.sequence_length, args.sequences)

    placements = {kind: uniform_placement(before.spec, kind) for kind in MixerKind}
    with torch.no_grad():
        teacher_logits = before(input_ids, placement=placements[MixerKind.ATTENTION])
        teacher_logits = getattr(teacher_logits, "logits", teacher_logits)
    print(f"export: {export}")
    print(f"{'placement':<22} {'KL before':>10} {'KL after':>10}")
    for placement in placements.values():
        print(
            f"{placement.canonical:<22} {mean_kl(before, teacher_logits, input_ids, placement):>10.4f}"
            f" {mean_kl(after, teacher_logits, input_ids, placement):>10.4f}"
        )


if __name__ == "__main__":
    main()
