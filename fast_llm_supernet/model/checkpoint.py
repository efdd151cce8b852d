"""`fast_llm_supernet.model.checkpoint`: checkpoint I/O in the Apriel2 text layout (config.json +
model.safetensors + this project's side files).

Reads a single `model.safetensors` or a sharded set listed in `model.safetensors.index.json`
(the layout upstream Fast-LLM writes), eagerly (`load_state_dict`) or tensor by tensor
(`SafetensorsReader`, which the teacher conversion uses too). Writes are atomic: everything goes to a
temporary directory next to the target, which is renamed into place only once complete.
`read_checkpoint` / `load_weights` / `write_checkpoint` are the file side of
`SupernetForCausalLM.from_pretrained` and `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from shared_spec import PRESETS_FILENAME, Apriel2TextConfig, PresetsFile

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


class SafetensorsReader:
    """Tensor-by-tensor access to a checkpoint directory's safetensors (one file, or the shards of the index).

    Opening reads only the files' headers; `get` reads one tensor. A name in more than one shard is an error.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._file_of: dict[str, Path] = {}
        for path in checkpoint_files(self.directory):
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    if name in self._file_of:
                        raise CheckpointError(f"tensor {name!r} appears in more than one shard of {directory}")
                    self._file_of[name] = path
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, as stored (on the CPU)."""
        if name not in self._file_of:
            raise CheckpointError(f"checkpoint {self.directory} has no tensor {name!r}")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path].get_tensor(name)


def load_state_dict(
    directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint; floating tensors cast to `dtype` when given (bf16 -> fp32 is exact)."""
    reader = SafetensorsReader(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name in reader.keys():
        tensor = reader.get(name)
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
    `fast_llm_supernet.model.attention.effective_attention_configs`).
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


@dataclass
class LoadedCheckpoint:
    """What `read_checkpoint` read from a checkpoint directory, before a model exists."""

    config: Apriel2TextConfig
    presets: PresetsFile | None
    state: dict[str, torch.Tensor]
    upstream_mask_sharing: bool


def read_checkpoint(
    directory: str | Path, dtype: torch.dtype | None = None, upstream_mask_sharing: bool | None = None
) -> LoadedCheckpoint:
    """config.json, supernet_presets.json if present, the weights (floating ones cast to `dtype`) and
    the attention-mask choice (`upstream_mask_sharing` None: as `supernet_model.json` says)."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"no config.json in {directory}")
    config = Apriel2TextConfig.from_file(directory)
    if upstream_mask_sharing is None:
        upstream_mask_sharing = read_upstream_mask_sharing(directory)
    presets = PresetsFile.load(directory)
    state = load_state_dict(directory, dtype=dtype)
    return LoadedCheckpoint(config, presets, state, upstream_mask_sharing)


def load_weights(model: nn.Module, loaded: LoadedCheckpoint, source: str) -> None:
    """Copy the checkpoint's tensors into `model` (a `SupernetForCausalLM` built from `loaded.config`),
    after checking that names and shapes match its `checkpoint_state_dict`."""
    state = dict(loaded.state)
    expected = {name: tensor.shape for name, tensor in model.checkpoint_state_dict().items()}
    tied = loaded.config.tie_word_embeddings
    if tied:
        # Some exporters also write the tied head; it is the embedding by definition.
        state.pop("lm_head.weight", None)
    check_keys(expected, state, source)
    model.load_state_dict(state, strict=not tied)


def write_checkpoint(
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: Apriel2TextConfig,
    presets: PresetsFile | None,
    upstream_mask_sharing: bool,
) -> Path:
    """Write config.json, model.safetensors, supernet_model.json and (if any) supernet_presets.json, atomically."""
    extra_files = {MODEL_NOTES_FILE: model_notes_json(upstream_mask_sharing)}
    if presets is not None:
        extra_files[PRESETS_FILENAME] = presets.model_dump_json(indent=2) + "\n"
    return save_checkpoint(directory, state_dict, config.to_json_dict(), extra_files)
