"""Training side of the supernet: the PyTorch reference model (`model`), the single-machine trainer
(`training`), command-line tools (`tools`), the placement toolkit (`toolkit`: evaluate, surrogate, cost model,
Pareto search, presets) and the Fast-LLM plugin (`fast_llm_adapter`).

Importing the package is cheap (no torch import); the heavy names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fast_llm_supernet.model.checkpoint import CheckpointError
    from fast_llm_supernet.model.supernet import SupernetCaches, SupernetForCausalLM, SupernetOutput

_LAZY = {
    "SupernetForCausalLM": "fast_llm_supernet.model.supernet",
    "SupernetCaches": "fast_llm_supernet.model.supernet",
    "SupernetOutput": "fast_llm_supernet.model.supernet",
    "CheckpointError": "fast_llm_supernet.model.checkpoint",
}

__all__ = ["CheckpointError", "SupernetCaches", "SupernetForCausalLM", "SupernetOutput"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fast_llm_supernet' has no attribute {name!r}")
