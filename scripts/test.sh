#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite, engine-starting tests included.
# Day to day, `.venv/bin/python -m pytest` runs the fast suite only (markers in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint for real errors (syntax, undefined names); style is ruff's business locally.
.venv/bin/python -m ruff check --select E9,F63,F7,F82 shared_spec fast_llm_supernet vllm_supernet tests examples benchmarks
.venv/bin/python -m pytest -m "" -q -rs --durations=15 "$@"
