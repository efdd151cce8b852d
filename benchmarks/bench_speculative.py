"""Self-speculative decoding on the real-teacher supernet: acceptance per draft placement, and decode speed with and
without speculation (vLLM CPU build, bf16).

    .venv/bin/python benchmarks/bench_speculative.py --checkpoint runs/smollm2/distilled      # ~40 min on 2 cores

1. Acceptance: the checkpoint's chat prompts (`toolkit.quality.DEFAULT_PROMPTS`, through its chat template), greedy,
   for the all-attention target and one hybrid target (attention in even layers, KDA in odd), each with every named
   placement (`toolkit.quality.named_placements`) as its draft: drafted and accepted tokens from vLLM's own
   speculative-decoding counters; the mean accepted length is tokens emitted per target forward.
2. Speed: batch 1, a prompt of real text (the held-out documents, tokenised and cut to the context), 128 new tokens
   (`ignore_eos`), decode tokens/s with speculation (one engine) and without (a second engine, up at the same time;
   the two alternate, order flipped every repetition). Beside each: the tokens per target forward, the share of a
   round spent drafting, and the break-even acceptance: the per-token acceptance a at which a round's expected
   output (1 - a^(k+1)) / (1 - a) pays for its time (a round over a plain decode step, both measured).

Outputs (`--out`, default benchmarks/results/speculative/): `speculative.json` (settings, every run) and
`speculative.md` (the tables).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fast_llm_supernet.toolkit.quality import DEFAULT_PROMPTS, named_placements  # noqa: E402
from shared_spec import Apriel2TextConfig, SupernetSpec  # noqa: E402
from vllm_supernet.engine_process import EngineProcess, serve_engine, time_decode  # noqa: E402
from vllm_supernet.speculative import SELF_SPECULATOR, speculation_counts  # noqa: E402

HYBRID_TARGET = "attention in even layers, KDA in odd"


def _engine(connection, checkpoint: str, options: dict, log_path: str) -> None:
    """Child process: one vllm.LLM answering `run` commands with tokens, decode time and drafting counts."""
    from vllm import LLM, SamplingParams

    speculative = "speculative_config" in options
    counter = 0

    def build():
        extra = {"worker_extension_cls": "vllm_supernet.speculative.SpeculatorTiming"} if speculative else {}
        return LLM(model=checkpoint, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
                   enable_prefix_caching=False, seed=0, disable_log_stats=not speculative, **options, **extra)  # fmt: skip

    def answer(llm, command: dict) -> dict:
        nonlocal counter
        before = speculation_counts(llm) if speculative else None
        if speculative:
            llm.collective_rpc("draft_timing")  # drop earlier work's
        request_ids = []
        for prompt in command["prompts"]:
            counter += 1
            extra = {"placement": command["placement"]}
            if command.get("draft"):
                extra["draft_placement"] = command["draft"]
            params = SamplingParams(max_tokens=command["max_tokens"], temperature=0.0, detokenize=False,
                                    ignore_eos=command["ignore_eos"], extra_args=extra)  # fmt: skip
            request_ids.append(f"run-{counter}")
            llm.llm_engine.add_request(request_ids[-1], {"prompt_token_ids": prompt}, params)
        tokens: dict[str, list[int]] = {}
        decoded, seconds = time_decode(llm.llm_engine, len(request_ids), outputs=tokens)
        result = {"tokens": [tokens[r] for r in request_ids], "decoded": decoded, "seconds": seconds}
        if speculative:
            after = speculation_counts(llm)
            result["speculation"] = {key: after[key] - before[key] for key in after}
            result["draft_timing"] = llm.collective_rpc("draft_timing")[0]
        return result

    serve_engine(connection, log_path, build, answer)


def break_even_acceptance(round_over_step: float, k: int) -> float | None:
    """The per-token acceptance a with (1 - a^(k+1)) / (1 - a) = round_over_step (None: not reachable with k drafts)."""
    expected = lambda a: sum(a**i for i in range(k + 1))  # noqa: E731
    if round_over_step <= 1:
        return 0.0
    if expected(1.0) < round_over_step:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if expected(middle) < round_over_step else (low, middle)
    return (low + high) / 2


def chat_prompts(checkpoint: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]  # fmt: skip
        for p in DEFAULT_PROMPTS
    ]


def text_prompt(checkpoint: Path, data: Path, length: int) -> list[int]:
    """`length` tokens of real text: the held-out documents one after another."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids: list[int] = []
    for line in data.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"]
        if len(ids) >= length:
            return ids[:length]
    raise ValueError(f"{data} holds {len(ids)} tokens, fewer than the {length} asked for")


def acceptance_table(engine: EngineProcess, targets: dict[str, str], drafts: dict[str, str], prompts, max_tokens: int):
    rows = []
    for target_label, target in targets.items():
        for draft_label, draft in tqdm(drafts.items(), desc=f"acceptance, target {target_label}", file=sys.stdout):
            answer = engine.request({"op": "run", "prompts": prompts, "placement": target, "draft": draft,
                                     "max_tokens": max_tokens, "ignore_eos": False})  # fmt: skip
            counts = answer["speculation"]
            rows.append({
                "target": target_label, "draft": draft_label, **counts,
                "acceptance": counts["accepted"] / max(counts["drafted"], 1),
                "mean_accepted_length": 1 + counts["accepted"] / max(counts["rounds"], 1),
                "tokens": answer["tokens"],
            })  # fmt: skip
    return rows


def speed_table(speculative: EngineProcess, plain: EngineProcess, targets, drafts, prompts: dict[int, list[int]],
                new_tokens: int, reps: int, k: int) -> list[dict]:  # fmt: skip
    runs = []
    order = [None, *drafts]  # None: the plain engine; reversed every other repetition
    plan = [(c, t, d, r) for r in range(reps) for c in prompts for t in targets for d in order[:: 1 - 2 * (r % 2)]]
    for context, target_label, draft_label, rep in tqdm(plan, desc="speed", file=sys.stdout):
        command = {"op": "run", "prompts": [prompts[context]], "placement": targets[target_label],
                   "max_tokens": new_tokens + 1, "ignore_eos": True}  # fmt: skip
        if draft_label is None:
            answer = plain.request(command)
        else:
            answer = speculative.request({**command, "draft": drafts[draft_label]})
        runs.append({"context": context, "target": target_label, "draft": draft_label, "rep": rep,
                     "tokens_per_second": answer["decoded"] / answer["seconds"], "seconds": answer["seconds"],
                     "decoded": answer["decoded"], **{key: answer[key] for key in ("speculation", "draft_timing")
                                                       if key in answer}})  # fmt: skip
    return summarise_speed(runs, k)


def summarise_speed(runs: list[dict], k: int) -> list[dict]:
    rows = []
    keys = sorted({(r["context"], r["target"]) for r in runs})
    for context, target in keys:
        plain = [r for r in runs if (r["context"], r["target"], r["draft"]) == (context, target, None)]
        plain_speed = statistics.median(r["tokens_per_second"] for r in plain)
        step = 1 / plain_speed  # seconds per plain decode step
        for draft in sorted({r["draft"] for r in runs if r["draft"]}, key=str):
            mine = [r for r in runs if (r["context"], r["target"], r["draft"]) == (context, target, draft)]
            if not mine:
                continue
            rounds = sum(r["speculation"]["rounds"] for r in mine)
            accepted = sum(r["speculation"]["accepted"] for r in mine)
            drafted = sum(r["speculation"]["drafted"] for r in mine)
            seconds = sum(r["seconds"] for r in mine)
            draft_seconds = sum(r["draft_timing"]["seconds"] for r in mine)
            round_seconds = seconds / max(rounds, 1)
            speed = statistics.median(r["tokens_per_second"] for r in mine)
            rows.append({
                "context": context, "target": target, "draft": draft, "plain_tokens_per_second": plain_speed,
                "speculative_tokens_per_second": speed, "speedup": speed / plain_speed,
                "acceptance": accepted / max(drafted, 1), "tokens_per_round": 1 + accepted / max(rounds, 1),
                "round_over_step": round_seconds / step, "draft_share": draft_seconds / seconds,
                "draft_token_over_step": draft_seconds / max(drafted, 1) / step,
                "break_even_acceptance": break_even_acceptance(round_seconds / step, k),
            })  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Command: `{s['command']}` ({s['minutes']:.1f} min). vLLM CPU build, bf16, eager, k = {s['k']} drafts "
             f"per round, greedy; checkpoint `{s['checkpoint']}`.", "",
             "#### Acceptance on the chat prompts (greedy, up to "
             f"{s['max_tokens']} tokens each)", "",
             "| target | draft | drafted | accepted | acceptance | tokens per target forward |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in results["acceptance"]:
        lines.append(f"| {row['target']} | {row['draft']} | {row['drafted']} | {row['accepted']} | "
                     f"{row['acceptance']:.3f} | {row['mean_accepted_length']:.2f} |")  # fmt: skip
    lines += ["", f"#### Decode speed, batch 1, {s['new_tokens']} new tokens after real text (medians of {s['reps']})", "",
              "| context | target | draft | tok/s without | tok/s with | speed-up | acceptance | tokens per round | "
              "round / plain step | drafting share | break-even acceptance |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in results["speed"]:
        even = row["break_even_acceptance"]
        lines.append(
            f"| {row['context']} | {row['target']} | {row['draft']} | {row['plain_tokens_per_second']:.1f} | "
            f"{row['speculative_tokens_per_second']:.1f} | **{row['speedup']:.2f}x** | {row['acceptance']:.3f} | "
            f"{row['tokens_per_round']:.2f} | {row['round_over_step']:.2f} | {row['draft_share']:.2f} | "
            f"{'unreachable' if even is None else f'{even:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "runs/smollm2/distilled")
    parser.add_argument("--data", type=Path, default=REPO / "runs/smollm2/data/heldout.jsonl")
    parser.add_argument("--k", type=int, default=4, help="drafts per round")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8000])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=96, help="per chat answer (acceptance)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--speed-drafts", nargs="+", default=["all-SWA", "all-GDN", "all-KDA"])
    parser.add_argument("--speed-targets", nargs="+", default=["all-attention", HYBRID_TARGET])
    parser.add_argument("--acceptance-drafts", nargs="+", help="labels of the drafts tried (default: every named placement)")
    parser.add_argument("--skip-acceptance", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/speculative")
    args = parser.parse_args(argv)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = SupernetSpec.from_config(Apriel2TextConfig.from_file(args.checkpoint / "config.json"))
    named = {label: p.canonical for label, p in named_placements(spec).items()}
    targets = {"all-attention": named["all-attention"], HYBRID_TARGET: named[HYBRID_TARGET]}
    speed_targets = {label: targets[label] for label in args.speed_targets}
    max_len = max(args.contexts) + args.new_tokens + args.k + 8
    options = {"max_model_len": max_len, "max_num_seqs": 4, "kv_cache_memory_bytes": 2**30,
               "max_num_batched_tokens": max_len}  # fmt: skip
    speculative_options = {**options, "hf_overrides": {"supernet_draft_placement": named["all-SWA"]},
                           "speculative_config": {"method": "custom_class", "model": SELF_SPECULATOR,
                                                  "num_speculative_tokens": args.k}}  # fmt: skip
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    speculative = EngineProcess("speculative", _engine, (str(args.checkpoint), speculative_options,
                                                         str(logs / "speculative.log")), logs / "speculative.log")  # fmt: skip
    plain = EngineProcess("plain", _engine, (str(args.checkpoint), options, str(logs / "plain.log")), logs / "plain.log")
    try:
        acceptance = [] if args.skip_acceptance else acceptance_table(
            speculative, targets, {d: named[d] for d in args.acceptance_drafts or named},
            chat_prompts(args.checkpoint), args.max_tokens)
        prompts = {c: text_prompt(args.checkpoint, args.data, c) for c in args.contexts}
        speed = speed_table(speculative, plain, speed_targets, {d: named[d] for d in args.speed_drafts}, prompts,
                            args.new_tokens, args.reps, args.k)  # fmt: skip
    finally:
        speculative.stop()
        plain.stop()
    command = "python benchmarks/bench_speculative.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {
        "settings": {"command": command.strip(), "minutes": (time.time() - started) / 60, "k": args.k,
                     "checkpoint": str(args.checkpoint.relative_to(REPO) if args.checkpoint.is_relative_to(REPO)
                                       else args.checkpoint), "contexts": args.contexts,
                     "new_tokens": args.new_tokens, "max_tokens": args.max_tokens, "reps": args.reps,
                     "placements": named},
        "acceptance": acceptance,
        "speed": speed,
    }  # fmt: skip
    (args.out / "speculative.json").write_text(json.dumps(results, indent=1))
    (args.out / "speculative.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
