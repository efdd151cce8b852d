"""The Fast-LLM plugin: `fast-llm train supernet --config X.yaml` with an unmodified Fast-LLM.

What it registers into Fast-LLM's registries (see `config.py`):

* the `supernet` trainer (`TrainerConfig` type `supernet`, runnable `train_supernet`): a GPT trainer whose
  `supernet:` section turns a supernet checkpoint plus a frozen teacher into Fast-LLM's own pieces —
  the four-mixer decoder layer is Fast-LLM's `StochasticMixer` (its sampling set from the section),
  the stochastic distillation loss is Fast-LLM's reverse-KL / forward-KL / label losses in the head plus
  its activation distillation in each stochastic block, and every weight but the mixers' is frozen
  with `lr_scale: 0`. Upstream classes are used unchanged, so upstream's Apriel2 exporter writes the
  checkpoint that `SupernetForCausalLM.from_pretrained` and the vLLM plugin load.
* a KDA kernel for the CPU path that trains with finite gradients (`kda_kernel.py`), swapped in when
  the `supernet` trainer builds its model.

How it gets registered: `import_hook.py`, installed at start-up by the `.pth` file the wheel ships,
calls `register()` right after Fast-LLM imports `fast_llm.models.auto` (as `fast-llm` always does).
Without the `.pth` (a source checkout on PYTHONPATH, say), run
`python -m fast_llm_supernet.fast_llm_adapter train supernet --config X.yaml`, or call `register()`.

Importing this package is cheap and needs neither torch nor Fast-LLM.
"""

from __future__ import annotations

import importlib.util


def fast_llm_available() -> bool:
    """Whether upstream Fast-LLM can be imported here (without importing it)."""
    return importlib.util.find_spec("fast_llm") is not None


def register() -> None:
    """Register the `supernet` trainer into Fast-LLM's registries. Idempotent; needs Fast-LLM.

    Also imports the modules through which Fast-LLM's CLI fills its own registries (datasets, models),
    so a library user can build a `SupernetTrainerConfig` from a dict right after this call.
    """
    import fast_llm.data.auto  # noqa: F401
    import fast_llm.models.auto  # noqa: F401

    # Defining the config classes registers them (`config_class(dynamic_type=...)`).
    from fast_llm_supernet.fast_llm_adapter import config  # noqa: F401
