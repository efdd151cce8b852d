"""Register the supernet plugin into Fast-LLM when (and only when) Fast-LLM is imported.

Fast-LLM has no plugin hook: its CLI fills its class registries by importing its own modules
(`fast_llm.cli` imports `fast_llm.models.auto`). This module installs a `sys.meta_path` finder that
waits for `fast_llm.models.auto` to be imported, lets it run, then calls
`fast_llm_supernet.fast_llm_adapter.register()`. So `fast-llm train supernet ...` works with the
stock `fast-llm` command and no edit to Fast-LLM.

The finder is installed at interpreter start-up by `super_apriel_fast_llm.pth`, which the project's
wheel (regular or editable) puts in site-packages (see setup.py). Cost where Fast-LLM is absent or
never imported: this module (standard library only, no torch) and one string comparison per
import. Set SUPERNET_FAST_LLM_PLUGIN=0 to disable it.
"""

from __future__ import annotations

import os
import sys

# Imported by `fast_llm.cli` (and by anything that wants every Fast-LLM model registered).
TRIGGER_MODULE = "fast_llm.models.auto"
DISABLE_VARIABLE = "SUPERNET_FAST_LLM_PLUGIN"


class _RegisterAfterExec:
    """Wraps the trigger module's real loader; registers the plugin once the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # Keep introspection (source, resources) pointing at the real loader.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        from fast_llm_supernet.fast_llm_adapter import register

        register()


class FastLLMPluginFinder:
    """A `sys.meta_path` finder that finds nothing itself: for the trigger module it wraps the spec the
    other finders return. (No `importlib.abc` base classes: importing them costs more than this module.)"""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Add the finder to `sys.meta_path` (idempotent); register at once if Fast-LLM is already loaded."""
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if TRIGGER_MODULE in sys.modules:
        from fast_llm_supernet.fast_llm_adapter import register

        register()
        return
    if not any(isinstance(finder, FastLLMPluginFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, FastLLMPluginFinder())
