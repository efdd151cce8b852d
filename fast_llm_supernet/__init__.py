"""Training side of the supernet: PyTorch mixers, the supernet model, checkpoints, the trainer.

Importing the package is cheap (no torch import); the heavy names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fast_llm_supernet.checkpoint import CheckpointError
    from fast_llm_supernet.model import SupernetCaches, SupernetForCausalLM, SupernetOutput

_LAZY = {
    "SupernetForCausalLM": "fast_llm_supernet.model",
    "SupernetCaches": "fast_llm_supernet.model",
    "SupernetOutput": "fast_llm_supernet.model",
    "CheckpointError": "fast_llm_supernet.checkpoint",
}

__all__ = ["CheckpointError", "SupernetCaches", "SupernetForCausalLM", "SupernetOutput"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fast_llm_supernet' has no attribute {name!r}")
