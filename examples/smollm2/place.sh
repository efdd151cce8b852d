#!/usr/bin/env bash
# The placement toolkit on the real-teacher supernet (after `bash scripts/main.sh --teacher smollm2`):
# evaluate >= 300 placements, fit the surrogate, measure the cost model through vLLM at 4096 tokens, search the
# exact Pareto frontier, measure presets along it, and install them into the distilled checkpoint.
# Every step's output lands in runs/smollm2/place/ and is reused (evaluate resumes from its JSONL).
# About an hour on 2 idle cores (evaluate ~35 min, cost ~10 min, presets ~10 min).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-runs/smollm2}
CKPT=$RUN/sft_final  # the served checkpoint: distilled, then SFT
OUT=$RUN/place
DATA=$RUN/data/heldout.jsonl
CONTEXT=${CONTEXT:-4096}
RESULTS=examples/smollm2/results/place
PLACE=".venv/bin/supernet-place"
mkdir -p "$OUT" "$RESULTS"
# 100 uniform + 200 stratified by the number of attention layers (195 distinct: the strata near all-attention
# hold few placements) + 20 more uniform, 2048 held-out tokens each: >= 300 placements.
$PLACE evaluate --checkpoint "$CKPT" --data "$DATA" --max-tokens 2048 --threads 2 \
  --sample uniform --count 100 --seed 0 --output "$OUT/evaluations.jsonl"
$PLACE evaluate --checkpoint "$CKPT" --data "$DATA" --max-tokens 2048 --threads 2 \
  --sample stratified --count 200 --seed 1 --output "$OUT/evaluations.jsonl"
$PLACE evaluate --checkpoint "$CKPT" --data "$DATA" --max-tokens 2048 --threads 2 \
  --sample uniform --count 20 --seed 2 --output "$OUT/evaluations.jsonl"
$PLACE fit --checkpoint "$CKPT" --evaluations "$OUT/evaluations.jsonl" --output "$OUT/surrogate.json"
[ -f "$OUT/cost.json" ] || $PLACE cost --checkpoint "$CKPT" --context "$CONTEXT" --validate 8 --output "$OUT/cost.json"
$PLACE pareto --checkpoint "$CKPT" --surrogate "$OUT/surrogate.json" --cost "$OUT/cost.json" \
  --evaluations "$OUT/evaluations.jsonl" --output "$OUT/front.json" --plot "$OUT/pareto.png"
# Each preset also records its chat agreement with the teacher on the held-out chat prompts (chat_first_sentence,
# chat_exact, chat_logprob), which service levels can match on (`quality_metric` in the presets file).
[ -f "$OUT/presets.json" ] || $PLACE presets --checkpoint "$CKPT" --front "$OUT/front.json" --data "$DATA" \
  --max-tokens 2048 --threads 2 --repeats 1 --chat-prompts "$RUN/data/chat_eval.json" --output "$OUT/presets.json" --install
# The plot again, with the presets as measured.
$PLACE pareto --checkpoint "$CKPT" --surrogate "$OUT/surrogate.json" --cost "$OUT/cost.json" \
  --evaluations "$OUT/evaluations.jsonl" --presets "$OUT/presets.json" --output "$OUT/front.json" --plot "$OUT/pareto.png"
cp "$OUT"/{evaluations.jsonl,surrogate.json,surrogate_report.json,cost.json,front.json,pareto.png,presets.json} "$RESULTS/"
echo "results in $RESULTS"
