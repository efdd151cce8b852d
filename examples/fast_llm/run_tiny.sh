#!/usr/bin/env bash
# The tiny CPU Fast-LLM example end to end, from the project root, in the environment where Fast-LLM and this
# project are installed (docs/fast_llm.md):
#   bash examples/fast_llm/run_tiny.sh            # one process
#   NPROC=2 bash examples/fast_llm/run_tiny.sh    # two processes (torchrun; the micro-batch is per process)
# A rerun starts the training over: Fast-LLM refuses to export into an existing export directory
# (FileExistsError), so the previous run directory is removed first; inputs and the prepared data are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=/tmp/supernet_fast_llm_tiny
NPROC=${NPROC:-1}
export TORCH_COMPILE_DISABLE=1 HF_HUB_OFFLINE=1
# Fast-LLM checks that every rank hashes strings alike (its barriers compare hash() values): fix the seed.
export PYTHONHASHSEED=0
# One OpenMP thread per process: with torch's default (all cores) the run's processes spin against each other
# (the single-process run took ~10 minutes instead of ~40 s on 2 cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$ROOT/student/config.json" ] || python examples/fast_llm/make_tiny_inputs.py --root "$ROOT"
[ -f "$ROOT/dataset/fast_llm_config_training.yaml" ] || fast-llm prepare gpt_memmap --config examples/fast_llm/prepare_tiny.yaml
rm -rf "$ROOT/run"
if [ "$NPROC" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$NPROC" "$(command -v fast-llm)" train supernet --config examples/fast_llm/tiny_cpu.yaml
else
  fast-llm train supernet --config examples/fast_llm/tiny_cpu.yaml
fi
python examples/fast_llm/compare_placements.py --root "$ROOT"
