"""Build hook (metadata lives in pyproject.toml): ship the Fast-LLM plugin's start-up `.pth` file.

Fast-LLM has no plugin mechanism, so the wheel puts `super_apriel_fast_llm.pth` at the root of
site-packages. Python runs its one line at start-up; the line only installs an import hook
(`fast_llm_supernet/fast_llm_adapter/import_hook.py`, standard library only) that registers the
`supernet` trainer once Fast-LLM itself is imported. Where Fast-LLM is absent nothing else happens.

`package_data` cannot place a file at the site-packages root and `data_files` is relative to the
environment prefix, so an extra `build` step writes the file: into `build_lib` for a regular wheel,
and, for an editable install (PEP 660, where `build_lib` is discarded), straight into the editable
wheel's root, which setuptools exposes as `install.install_lib`.
"""

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "super_apriel_fast_llm.pth"
# One line, run by `site` at start-up. Sorted after setuptools' `__editable__.*.pth`, whose finder
# it relies on in editable installs; `find_spec` guards against a stale file if the package is gone.
PTH_LINE = (
    "import importlib.util; importlib.util.find_spec('fast_llm_supernet') is not None and "
    "__import__('fast_llm_supernet.fast_llm_adapter.import_hook', fromlist=['install']).install()\n"
)


class BuildFastLLMPth(Command):
    description = f"write {PTH_NAME} (the Fast-LLM plugin's start-up hook)"
    user_options: list = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self):
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _target(self) -> Path:
        if self.editable_mode:
            return Path(self.get_finalized_command("install").install_lib, PTH_NAME)
        return Path(self.build_lib, PTH_NAME)

    def run(self):
        target = self._target()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(PTH_LINE)

    def get_outputs(self):
        return [] if self.editable_mode else [str(self._target())]


class BuildWithPth(build):
    sub_commands = build.sub_commands + [("build_fast_llm_pth", None)]


setup(cmdclass={"build": BuildWithPth, "build_fast_llm_pth": BuildFastLLMPth})
