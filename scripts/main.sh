#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job end to end on the tiny embedded default:
# tiny teacher -> supernet checkpoint -> short distillation -> placements compared -> served by vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/end_to_end.py "$@"
