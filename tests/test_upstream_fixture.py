"""Upstream compatibility: a checkpoint exported by upstream Fast-LLM gives upstream's logits.

tests/data/apriel2_upstream_small/ holds a small Apriel2 supernet (two four-mixer blocks
`fa, swa, gdn, kda` and one plain attention block, bf16 weights) exported by upstream Fast-LLM
itself, and the float32 logits upstream Fast-LLM computed for four placements (README.md there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fast_llm_supernet.model import SupernetForCausalLM
from shared_spec import Apriel2TextConfig, PlacementError

FIXTURE = Path(__file__).parent / "data" / "apriel2_upstream_small"
CHECKPOINT = FIXTURE / "checkpoint"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
# Float32 compute with weights upcast from bf16; upstream's own eager-vs-compiled spread is 4e-6.
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> SupernetForCausalLM:
    return SupernetForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_logits() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.mark.parametrize("index", range(len(REFERENCE["placements"])))
def test_logits_match_upstream(model, reference_logits, index):
    placement = REFERENCE["placements"][index]  # names the two supernet blocks; block 2 is plain
    input_ids = torch.tensor(REFERENCE["input_ids"])
    with torch.no_grad():
        logits = model(input_ids, placement=placement)
    expected = reference_logits[str(index)]
    assert logits.shape == expected.shape == (3, 20, 320)
    max_diff = (logits - expected).abs().max().item()
    print(f"placement {placement}: max abs diff {max_diff:.3g}")
    assert max_diff <= ATOL, f"placement {placement}: max abs diff {max_diff} > {ATOL}"


def test_default_placement_is_main_mixer(model):
    assert model.resolve_placement(None).mixers == ("swa", "swa", "attention")
    assert model.spec.layers[2].fixed


def test_bad_placement_names_the_layer(model):
    with pytest.raises(PlacementError, match=r"layer 1.*'mamba'.*fa, gdn, kda, swa"):
        model(torch.zeros(1, 2, dtype=torch.long), placement=["fa", "mamba"])


def test_config_round_trips_unchanged(tmp_path):
    original = json.loads((CHECKPOINT / "config.json").read_text())
    assert Apriel2TextConfig.from_file(CHECKPOINT).to_json_dict() == original
    # And through save_pretrained (weights are not needed for the config): a random-init model.
    SupernetForCausalLM(Apriel2TextConfig.from_file(CHECKPOINT)).save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == original


def test_fa_is_windowed_upstream_and_full_without_mask_sharing(reference_logits):
    """Upstream Fast-LLM runs `fa` with the block's last attention sub-mixer's (`swa`) mask.

    Per-mixer masks give the full-causal `fa` the configs describe, which upstream does not compute.
    """
    per_mixer = SupernetForCausalLM.from_pretrained(CHECKPOINT, upstream_mask_sharing=False)
    input_ids = torch.tensor(REFERENCE["input_ids"])
    with torch.no_grad():
        logits = per_mixer(input_ids, placement=["fa", "fa"])
    diff = (logits - reference_logits["0"]).abs().amax(dim=(0, 2))  # per position
    window = 5
    assert diff[:window].max() < ATOL  # inside the window both masks agree
    assert diff[window:].min() > 0.1


def test_resaved_upstream_checkpoint_keeps_upstream_masks(model, reference_logits, tmp_path):
    assert model.upstream_mask_sharing  # no supernet_model.json: an upstream export
    resaved = SupernetForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "resaved"))
    assert resaved.upstream_mask_sharing
    with torch.no_grad():
        logits = resaved(torch.tensor(REFERENCE["input_ids"]), placement=REFERENCE["placements"][0])
    assert (logits - reference_logits["0"]).abs().max().item() <= ATOL
