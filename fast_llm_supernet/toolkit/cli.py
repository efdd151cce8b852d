"""`supernet-place`: measure, predict and choose placements of a supernet checkpoint.

    supernet-place quality  --checkpoint DIR --data heldout.jsonl --output DIR
    supernet-place evaluate --checkpoint DIR --data heldout.jsonl --output evals.jsonl
                            (--sample uniform|stratified --count N [--seed S] | --placements FILE)

Every subcommand checks its arguments before it loads a model; `evaluate` appends to its JSONL file and
skips the placements the file already holds for the same checkpoint and text, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fast_llm_supernet.toolkit.evaluate import Sharing, evaluate_placements, load_held_out
from fast_llm_supernet.toolkit.quality import DEFAULT_PROMPTS, load_model_and_tokenizer, quality_table, write_quality
from fast_llm_supernet.toolkit.sampling import sample_placements
from fast_llm_supernet.toolkit.store import append_evaluations, read_evaluations
from shared_spec import Placement, PlacementError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="supernet checkpoint directory")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="held-out text: .jsonl ({'text': ...}) or .txt")
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per held-out row (default 256)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens per placement (default 4096)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supernet-place", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    quality = commands.add_parser("quality", help="the quality table of the usual placements, with chat answers")
    _common(quality)
    quality.add_argument("--output", type=Path, required=True, help="directory for quality.json and quality.md")
    quality.add_argument("--prompts", type=Path, default=None, help="JSON list of chat prompts (default: four built in)")
    quality.add_argument("--max-new-tokens", type=int, default=48)
    quality.add_argument("--title", default="")

    evaluate = commands.add_parser("evaluate", help="quality of many placements, appended to a JSONL file")
    _common(evaluate)
    evaluate.add_argument("--output", type=Path, required=True, help="the evaluations JSONL file (appended to)")
    evaluate.add_argument("--sample", choices=("uniform", "stratified"), default=None)
    evaluate.add_argument("--count", type=int, default=100)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--placements", type=Path, default=None, help="a file with one placement per line")
    evaluate.add_argument("--chunk", type=int, default=16, help="placements evaluated (and appended) together")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: not a checkpoint directory (no config.json)")
    for path in args.data:
        if not path.is_file():
            parser.error(f"--data {path}: no such file")
    if args.sequence_length < 2 or args.max_tokens < args.sequence_length:
        parser.error("--sequence-length must be >= 2 and --max-tokens at least one row of it")
    if args.command == "evaluate" and (args.sample is None) == (args.placements is None):
        parser.error("evaluate: give exactly one of --sample (with --count) or --placements")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    held_out = load_held_out(args.data, args.checkpoint, args.sequence_length, args.max_tokens, args.batch_size)
    label = str(args.checkpoint)

    if args.command == "quality":
        prompts = DEFAULT_PROMPTS
        if args.prompts is not None:
            import json

            prompts = tuple(json.loads(args.prompts.read_text()))
        rows = quality_table(model, tokenizer, held_out, prompts, args.max_new_tokens, label)
        write_quality(rows, args.output, args.title)
        print((args.output / "quality.md").read_text())
        return 0

    if args.placements is not None:
        try:
            lines = [line.strip() for line in args.placements.read_text().splitlines() if line.strip()]
            placements = [Placement.parse(line, model.spec, model.presets) for line in lines]
        except PlacementError as error:
            parser.error(f"--placements {args.placements}: {error}")
    else:
        placements = sample_placements(model.spec, args.count, args.sample, args.seed)
    done = {record.placement for record in read_evaluations(args.output, held_out.label, label)}
    # Sorted, so that neighbours in a chunk share prefixes (evaluate_placements reuses their layers).
    todo = sorted((p for p in placements if p.canonical not in done), key=lambda p: p.mixers)
    print(f"{len(placements)} placements, {len(placements) - len(todo)} already in {args.output}, {len(todo)} to evaluate "
          f"on {held_out.label}", file=sys.stderr)
    sharing = Sharing()
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc="placements") as bar:
        for first in range(0, len(todo), args.chunk):
            chunk = todo[first : first + args.chunk]
            append_evaluations(args.output, evaluate_placements(model, chunk, held_out, label, sharing, progress=False))
            bar.update(len(chunk))
    if sharing.without_sharing:
        print(f"shared prefixes saved {sharing.saved_fraction:.1%} of decoder-layer computations "
              f"({sharing.computed} of {sharing.without_sharing})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
