"""`supernet-place`: measure, predict and choose placements of a supernet checkpoint.

    supernet-place quality  --checkpoint DIR --data heldout.jsonl --output DIR [--prompts P.json] [--teacher DIR]
    supernet-place evaluate --checkpoint DIR --data heldout.jsonl --output evals.jsonl
                            (--sample uniform|stratified --count N [--seed S] | --placements FILE)
    supernet-place fit      --checkpoint DIR --evaluations evals.jsonl --output surrogate.json
    supernet-place pareto   --checkpoint DIR --surrogate surrogate.json --cost cost.json --output front.json
                            [--evaluations evals.jsonl --plot front.png]
    supernet-place stability --evaluations A.jsonl B.jsonl
    supernet-place cost     --checkpoint DIR --context 4096 --output cost.json [--validate N]
    supernet-place presets  --checkpoint DIR --front front.json --data heldout.jsonl --output presets.json [--install]
                            [--chat-prompts P.json]

Every subcommand checks its arguments before it loads a model; `evaluate` appends to its JSONL file and
skips the placements the file already holds for the same checkpoint and text, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fast_llm_supernet.toolkit.evaluate import Sharing, evaluate_placements, load_held_out
from fast_llm_supernet.toolkit.presets import QUALITY_TARGETS, SPEED_TARGETS
from fast_llm_supernet.toolkit.quality import load_model_and_tokenizer, quality_table, write_quality
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

    quality = commands.add_parser("quality", help="the quality table of the usual placements, with chat agreement")
    _common(quality)
    quality.add_argument("--output", type=Path, required=True, help="directory for quality.json and quality.md")
    quality.add_argument("--prompts", type=Path, default=None,
                         help="held-out chat prompts: a JSON list of strings or of {text, keywords} objects "
                              "(default: chat_prompts.evaluation_prompts(), factual questions and prompts built from Python)")
    quality.add_argument("--no-chat", action="store_true", help="held-out text figures only, no chat answers")
    quality.add_argument("--teacher", type=Path, default=None,
                         help="checkpoint whose all-attention placement gives the reference answers (default: --checkpoint's)")
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

    fit = commands.add_parser("fit", help="fit the surrogate (per-layer + pair terms, ridge, cross-validated)")
    fit.add_argument("--checkpoint", type=Path, required=True)
    fit.add_argument("--evaluations", type=Path, nargs="+", required=True)
    fit.add_argument("--output", type=Path, required=True, help="surrogate JSON (a report JSON is written beside it)")
    fit.add_argument("--held-out-fraction", type=float, default=0.2)
    fit.add_argument("--max-distance", type=int, default=3, choices=(0, 1, 2, 3))
    fit.add_argument("--seed", type=int, default=0)

    pareto = commands.add_parser("pareto", help="the exact Pareto frontier of predicted quality against cost")
    pareto.add_argument("--checkpoint", type=Path, required=True)
    pareto.add_argument("--surrogate", type=Path, required=True)
    pareto.add_argument("--cost", type=Path, required=True, help="cost model JSON (supernet-place cost)")
    pareto.add_argument("--output", type=Path, required=True, help="frontier JSON")
    pareto.add_argument("--evaluations", type=Path, nargs="*", default=[], help="measured placements to plot")
    pareto.add_argument("--plot", type=Path, default=None, help="PNG of the frontier and the measured placements")
    pareto.add_argument("--presets", type=Path, default=None, help="presets JSON (supernet-place presets) to mark")

    cost = commands.add_parser("cost", help="decode cost model per layer and mixer, measured through vLLM (CPU build)")
    cost.add_argument("--checkpoint", type=Path, required=True)
    cost.add_argument("--context", type=int, default=4096, help="tokens of context per request (default 4096)")
    cost.add_argument("--batch", type=int, default=1, help="requests decoded together (default 1)")
    cost.add_argument("--steps", type=int, default=16, help="decode steps timed per placement")
    cost.add_argument("--validate", type=int, default=6, help="random hybrid placements measured whole to check the model")
    cost.add_argument("--output", type=Path, required=True)

    presets = commands.add_parser("presets", help="presets along the frontier, measured (quality and vLLM speed)")
    _common(presets)
    presets.add_argument("--front", type=Path, required=True, help="frontier JSON (supernet-place pareto)")
    presets.add_argument("--output", type=Path, required=True, help="the presets JSON written")
    presets.add_argument("--install", action="store_true", help="also write it into the checkpoint (served presets)")
    presets.add_argument("--chat-prompts", type=Path, default=None,
                         help="also record chat agreement with the teacher on these held-out prompts (JSON, as quality's --prompts)")
    presets.add_argument("--max-new-tokens", type=int, default=48, help="answer budget of the chat agreement")
    presets.add_argument("--repeats", type=int, default=2, help="alternated speed measurements per preset")
    presets.add_argument("--quality-targets", type=float, nargs="*", default=list(QUALITY_TARGETS),
                         help=f"predicted top-1 agreements to reach (default {' '.join(map(str, QUALITY_TARGETS))})")
    presets.add_argument("--speed-targets", type=float, nargs="*", default=list(SPEED_TARGETS),
                         help=f"predicted speed-ups to reach (default {' '.join(map(str, SPEED_TARGETS))})")

    stability = commands.add_parser("stability", help="rank correlation of placement quality between two checkpoints")
    stability.add_argument("--evaluations", type=Path, nargs=2, required=True, help="two JSONL files (e.g. mid-training, final)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("evaluations", "surrogate", "cost", "presets", "front", "prompts", "chat_prompts"):
        for path in _as_list(getattr(args, name, None)):
            if not path.is_file():
                parser.error(f"--{name.replace('_', '-')} {path}: no such file")
    for name in ("checkpoint", "teacher"):
        path = getattr(args, name, None)
        if path is not None and not (path / "config.json").is_file():
            parser.error(f"--{name} {path}: not a checkpoint directory (no config.json)")
    if args.command in ANALYSES:
        return
    for path in args.data:
        if not path.is_file():
            parser.error(f"--data {path}: no such file")
    if args.sequence_length < 2 or args.max_tokens < args.sequence_length:
        parser.error("--sequence-length must be >= 2 and --max-tokens at least one row of it")
    if args.command == "evaluate" and (args.sample is None) == (args.placements is None):
        parser.error("evaluate: give exactly one of --sample (with --count) or --placements")


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.command in ANALYSES:
        return ANALYSES[args.command](parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    held_out = load_held_out(args.data, args.checkpoint, args.sequence_length, args.max_tokens, args.batch_size)
    label = str(args.checkpoint)

    if args.command == "presets":
        return run_presets(parser, args, model, tokenizer, held_out)

    if args.command == "quality":
        from fast_llm_supernet.model import SupernetForCausalLM
        from fast_llm_supernet.toolkit.chat_eval import load_prompts

        prompts = None if args.no_chat else load_prompts(args.prompts)
        teacher = SupernetForCausalLM.from_pretrained(args.teacher) if args.teacher else None
        rows = quality_table(model, tokenizer, held_out, prompts, args.max_new_tokens, label, teacher)
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


def _spec(checkpoint: Path):
    from shared_spec import Apriel2TextConfig, SupernetSpec

    return SupernetSpec.from_config(Apriel2TextConfig.from_file(checkpoint / "config.json"))


def _records(paths: list[Path]):
    records = {}
    for path in paths:
        for record in read_evaluations(path):
            records[record.placement] = record  # the latest measurement of a placement wins
    return list(records.values())


def run_fit(parser, args) -> int:
    import json

    from fast_llm_supernet.toolkit.surrogate import fit_surrogate

    records = _records(args.evaluations)
    try:
        surrogate, report = fit_surrogate(records, _spec(args.checkpoint), args.held_out_fraction, args.seed, args.max_distance)
    except ValueError as error:
        parser.error(f"fit: {error}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    surrogate.save(args.output)
    report_path = args.output.with_name(args.output.stem + "_report.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    metrics, baseline = report["held_out_metrics"], report["per_layer_only_held_out_metrics"]
    print(f"fitted on {report['train']} placements, pair distance {report['distance']}, alpha {report['alpha']:g}; "
          f"on {report['held_out']} held-out placements: Spearman {metrics['spearman']:.3f}, Kendall "
          f"{metrics['kendall']:.3f}, R2 {metrics['r2']:.3f} (per-layer terms only: Spearman {baseline['spearman']:.3f}, "
          f"R2 {baseline['r2']:.3f}); wrote {args.output} and {report_path}")
    return 0


def run_pareto(parser, args) -> int:
    import json

    import numpy as np

    from fast_llm_supernet.toolkit.cost import CostModel
    from fast_llm_supernet.toolkit.pareto import pareto_front
    from fast_llm_supernet.toolkit.surrogate import Surrogate

    spec = _spec(args.checkpoint)
    surrogate = Surrogate.load(args.surrogate)
    cost_model = CostModel.load(args.cost)
    if cost_model.mixers != surrogate.mixers or surrogate.num_layers != spec.num_layers:
        parser.error("pareto: the surrogate and the cost model must describe the checkpoint's layers and mixers")
    single, pairs = surrogate.arrays()
    front = pareto_front(single, pairs, np.array(cost_model.per_layer))
    all_attention = cost_model.predict([surrogate.mixers.index("attention")] * spec.num_layers)
    points = [
        {"predicted_quality": 1 - loss, "predicted_seconds_per_step": cost_model.shared + cost,
         "predicted_speedup": all_attention / (cost_model.shared + cost),
         "placement": Placement.parse([surrogate.mixers[m] for m in placement], spec).canonical}
        for cost, loss, placement in front
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"context": cost_model.context, "points": points}, indent=2) + "\n")
    print(f"{len(points)} frontier points at context {cost_model.context}; wrote {args.output}")
    if args.plot is not None:
        from fast_llm_supernet.toolkit.plot import plot_front

        measured = []
        if args.presets is not None:
            from shared_spec import PresetsFile
            from shared_spec.presets import QUALITY_METRIC, SPEEDUP_METRIC

            for name, preset in PresetsFile.model_validate_json(args.presets.read_text()).presets.items():
                if QUALITY_METRIC in preset.metrics and SPEEDUP_METRIC in preset.metrics:
                    measured.append({"name": name, "measured_quality": preset.metrics[QUALITY_METRIC],
                                     "measured_speedup": preset.metrics[SPEEDUP_METRIC]})
        plot_front(points, _records(args.evaluations), cost_model, spec, args.plot, measured)
        print(f"wrote {args.plot}")
    return 0


def run_stability(parser, args) -> int:
    import numpy as np

    from fast_llm_supernet.toolkit.surrogate import rank_metrics

    first, second = ({r.placement: r.top1 for r in read_evaluations(path)} for path in args.evaluations)
    common = sorted(set(first) & set(second))
    if len(common) < 3:
        parser.error(f"stability: the two files share {len(common)} placements; at least 3 are needed")
    metrics = rank_metrics(np.array([first[p] for p in common]), np.array([second[p] for p in common]))
    print(f"{len(common)} placements in both: Spearman {metrics['spearman']:.3f}, Kendall {metrics['kendall']:.3f}")
    return 0


def run_cost(parser, args) -> int:
    from fast_llm_supernet.toolkit.cost import measure_cost_model
    from fast_llm_supernet.toolkit.surrogate import mixer_names

    spec = _spec(args.checkpoint)
    try:
        mixers = mixer_names(spec)
    except ValueError as error:
        parser.error(f"cost: {error}")
    hybrids = [p for p in sample_placements(spec, args.validate, "stratified", seed=12345) if len(set(p.mixers)) > 1]
    model = measure_cost_model(args.checkpoint, mixers, spec.num_layers, args.context, hybrids, args.batch, args.steps,
                               log_path=args.output.with_suffix(".log"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.output)
    errors = [abs(v["relative_error"]) for v in model.validation]
    print(f"shared {model.shared * 1e3:.2f} ms/step; per-layer mixer ms: "
          + ", ".join(f"{name} {1e3 * sum(row[m] for row in model.per_layer) / spec.num_layers:.3f}" for m, name in enumerate(mixers))
          + (f"; on {len(errors)} hybrids not used to build it: mean |error| {sum(errors) / len(errors):.1%}, max {max(errors):.1%}"
             if errors else ""))
    return 0


def run_presets(parser, args, model, tokenizer, held_out) -> int:
    import json
    import shutil

    from fast_llm_supernet.toolkit.presets import measure_presets, pick_from_front

    front = json.loads(args.front.read_text())
    picks = pick_from_front(front["points"], args.quality_targets, args.speed_targets)
    if not picks:
        parser.error(f"presets: no frontier point of {args.front} reaches any quality or speed target")
    chat = None
    if args.chat_prompts is not None:
        from fast_llm_supernet.toolkit.chat_eval import load_prompts, reference_answers

        # The reference: the checkpoint's own all-attention placement (the teacher's computation).
        chat = (tokenizer, reference_answers(model, tokenizer, load_prompts(args.chat_prompts), args.max_new_tokens))
    presets = measure_presets(model, args.checkpoint, picks, held_out, front["context"], repeats=args.repeats,
                              log_path=args.output.with_suffix(".log"), chat=chat)
    presets.validate_against(model.spec)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(presets.model_dump_json(indent=2) + "\n")
    for name in picks:
        metrics = presets.presets[name].metrics
        print(f"{name:<6} quality {metrics['quality']:.3f} (predicted {metrics['predicted_quality']:.3f}), speed-up "
              f"{metrics['speedup']:.2f}x (predicted {metrics['predicted_speedup']:.2f}x) at {front['context']} tokens: "
              f"{presets.presets[name].placement}")
    if args.install:
        from shared_spec import PRESETS_FILENAME

        shutil.copyfile(args.output, args.checkpoint / PRESETS_FILENAME)
        print(f"installed as {args.checkpoint / PRESETS_FILENAME}")
    return 0


ANALYSES = {"fit": run_fit, "pareto": run_pareto, "stability": run_stability, "cost": run_cost}


if __name__ == "__main__":
    raise SystemExit(main())
