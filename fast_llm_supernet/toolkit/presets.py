"""`fast_llm_supernet.toolkit.presets`: named placements picked along the predicted frontier, then measured for real.

Picks: for each quality target, the fastest frontier placement predicted to reach it (`q99`, `q97`, ...); for each
speed target, the best frontier placement predicted to reach it (`x2`, `x3`, ...). Each pick is then measured:
quality with the PyTorch model on held-out text (`toolkit.evaluate`), decode speed through vLLM at the named
context (`toolkit.cost.ProfilingEngine`, all-attention timed in the same engine between the picks), and written
as a preset whose metrics hold the measured figures under the names service-level requests read
(`quality`, `speedup`, `speedup_context`) and the predicted ones beside them (`predicted_quality`,
`predicted_speedup`). Given held-out chat prompts and the teacher's answers to them, each pick's chat agreement
(`toolkit.chat_eval`) is recorded too: `chat_first_sentence`, `chat_exact`, `chat_logprob`; a presets file whose
`quality_metric` names one of the first two matches service levels on it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from fast_llm_supernet.toolkit.chat_eval import Reference, chat_agreement
from fast_llm_supernet.toolkit.cost import ProfilingEngine, engine_options
from fast_llm_supernet.toolkit.evaluate import HeldOutRows, evaluate_placements
from shared_spec import Placement, Preset, PresetsFile
from shared_spec.presets import (
    CHAT_EXACT_METRIC,
    CHAT_FIRST_SENTENCE_METRIC,
    CHAT_LOGPROB_METRIC,
    QUALITY_METRIC,
    SPEEDUP_CONTEXT_METRIC,
    SPEEDUP_METRIC,
)

QUALITY_TARGETS = (0.99, 0.97, 0.95, 0.90, 0.80)
SPEED_TARGETS = (1.5, 2.0, 3.0)


def pick_from_front(points: list[dict], quality_targets=QUALITY_TARGETS, speed_targets=SPEED_TARGETS) -> dict[str, dict]:
    """Preset name -> frontier point; targets the frontier cannot reach are skipped, repeated placements kept once."""
    candidates = [
        (f"q{round(target * 100)}", [p for p in points if p["predicted_quality"] >= target], "predicted_speedup")
        for target in quality_targets
    ] + [
        (f"x{target:g}", [p for p in points if p["predicted_speedup"] >= target], "predicted_quality")
        for target in speed_targets
    ]
    picks: dict[str, dict] = {}
    for name, reaching, better in candidates:
        if not reaching:
            continue
        best = max(reaching, key=lambda p, key=better: p[key])
        if all(best["placement"] != chosen["placement"] for chosen in picks.values()):
            picks[name] = best
    return picks


def measure_speedups(
    checkpoint: Path, placements: list[str], context: int, steps: int, repeats: int, log_path: Path
) -> dict[str, float]:
    """Decode speed-up of each placement over all-attention, timed alternately in one vLLM engine (bf16, batch 1)."""
    engine = ProfilingEngine(checkpoint, engine_options(context + steps + 8, 1), log_path)
    samples: dict[str, list[float]] = {placement: [] for placement in placements}
    try:
        for _ in range(repeats):
            for placement in placements:
                reference = engine.measure("attention*", context, 1, steps)["step_seconds"]
                samples[placement].append(reference / engine.measure(placement, context, 1, steps)["step_seconds"])
    finally:
        engine.stop()
    return {placement: statistics.median(values) for placement, values in samples.items()}


def measure_presets(
    model, checkpoint: Path, picks: dict[str, dict], held_out: HeldOutRows, context: int, steps: int = 16,
    repeats: int = 2, log_path: Path | None = None, chat: tuple[object, Reference] | None = None,
) -> PresetsFile:
    """The picks measured (quality and speed; with `chat` = (tokenizer, the teacher's reference answers), chat
    agreement too) as a presets file, merged over the checkpoint's own presets."""
    placements = [Placement.parse(p["placement"], model.spec) for p in picks.values()]
    quality = evaluate_placements(model, placements, held_out, str(checkpoint))
    speedups = measure_speedups(checkpoint, [p.canonical for p in placements], context, steps, repeats,
                                log_path or checkpoint.parent / "presets_speed.log")
    presets = model.presets.model_copy(deep=True) if model.presets is not None else PresetsFile()
    for (name, point), placement, record in zip(picks.items(), placements, quality, strict=True):
        chat_metrics = {}
        if chat is not None:
            agreement, _ = chat_agreement(model, chat[0], placement, chat[1])
            chat_metrics = {CHAT_FIRST_SENTENCE_METRIC: agreement.first_sentence, CHAT_EXACT_METRIC: agreement.exact,
                            CHAT_LOGPROB_METRIC: agreement.logprob}
        presets.presets[name] = Preset(
            placement=placement.canonical,
            description=f"picked on the predicted frontier ({name}); measured on {record.data}, speed at {context} tokens",
            metrics={
                QUALITY_METRIC: record.top1, "quality_se": record.top1_se, "kl_to_teacher": record.kl,
                "perplexity": record.ppl, SPEEDUP_METRIC: speedups[placement.canonical],
                SPEEDUP_CONTEXT_METRIC: float(context), "predicted_quality": point["predicted_quality"],
                "predicted_speedup": point["predicted_speedup"], **chat_metrics,
            },
        )
    return presets
