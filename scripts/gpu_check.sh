#!/usr/bin/env bash
# One command for whoever has a CUDA GPU: the GPU kernel tests, the upstream fixture on CUDA per kernel path,
# mixer timings at 4k and 16k, training steps per placement and decode speed, as one table plus JSON
# (fast_llm_supernet/tools/gpu_check.py says what each row is). Without CUDA it says so and exits 0.
#   bash scripts/gpu_check.sh [--output DIR] [--quick] [--time-limit-s 280] [--in-process] [--sections ...]
# Each section runs in a process of its own, stopped at its share of the time limit (rows kept).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" -m fast_llm_supernet.tools.gpu_check "$@"
