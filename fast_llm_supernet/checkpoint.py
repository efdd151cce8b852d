"""Safetensors checkpoint I/O in the Apriel2 text layout (config.json + model.safetensors).

Reads a single `model.safetensors` or a sharded set listed in `model.safetensors.index.json`
(the layout upstream Fast-LLM writes). Writes are atomic: everything goes to a temporary
directory next to the target, which is renamed into place only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# This project's note on how the checkpoint's attention sub-mixers mask (upstream readers ignore it).
MODEL_NOTES_FILE = "supernet_model.json"
MASKS_SHARED, MASKS_PER_MIXER = "upstream_shared", "per_mixer"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as this model. The message names what is wrong."""


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one, or the shards of the index)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no `weight_map`")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(path) for path in files if not path.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    single = directory / SINGLE_FILE
    if single.exists():
        return [single]
    found = sorted(path.name for path in directory.glob("*")) if directory.is_dir() else []
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (found: {found or 'nothing'}); "
        "only safetensors checkpoints are read"
    )


def load_state_dict(
    directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint; floating tensors cast to `dtype` when given (bf16 -> fp32 is exact)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in more than one shard of {directory}")
                tensor = handle.get_tensor(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[name] = tensor if device is None else tensor.to(device)
    return tensors


def save_checkpoint(
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    config_json: dict,
    extra_files: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write config.json, model.safetensors and `extra_files` (name -> text) atomically.

    An existing directory at `directory` is replaced only after the new one is complete.
    """
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        # safetensors refuses shared or non-contiguous storage: give each tensor its own.
        tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}
        save_file(tensors, str(staging / SINGLE_FILE), metadata={"format": "pt", **(metadata or {})})
        (staging / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if directory.exists():
            # Swap: move the old one aside, move the new one in, then delete the old one.
            previous = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rename(directory, previous / directory.name)
            os.rename(staging, directory)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(
        f"{name}: checkpoint {tuple(found[name].shape)}, model {tuple(expected[name])}"
        for name in set(expected) & set(found)
        if tuple(found[name].shape) != tuple(expected[name])
    )
    if not (missing or unexpected or wrong_shape):
        return

    def listed(names: list[str]) -> str:
        shown = ", ".join(names[:8])
        return shown + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")

    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {listed(wrong_shape)}")
    raise CheckpointError(f"checkpoint {source} does not match its config.json: " + "; ".join(problems))


def read_upstream_mask_sharing(directory: str | Path) -> bool:
    """Whether a checkpoint's supernet attention sub-mixers share one mask, as upstream Fast-LLM computes.

    Checkpoints this project writes say so in `supernet_model.json`; a checkpoint without that file
    is an upstream Fast-LLM export and is computed as upstream does (shared masks, see
    `fast_llm_supernet.mixers.attention.effective_attention_configs`).
    """
    path = Path(directory) / MODEL_NOTES_FILE
    if not path.exists():
        return True
    value = json.loads(path.read_text()).get("stochastic_attention_masks")
    if value not in (MASKS_SHARED, MASKS_PER_MIXER):
        raise CheckpointError(
            f"{path}: stochastic_attention_masks is {value!r}; valid choices: {MASKS_SHARED}, {MASKS_PER_MIXER}"
        )
    return value == MASKS_SHARED


def model_notes_json(upstream_mask_sharing: bool) -> str:
    notes = {"format_version": 1, "stochastic_attention_masks": MASKS_SHARED if upstream_mask_sharing else MASKS_PER_MIXER}
    return json.dumps(notes, indent=2) + "\n"
