"""`vllm_supernet.batch`: how one step's requests split over each layer's mixers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from shared_spec import Apriel2TextConfig, SupernetSpec  # noqa: E402
from tests.vllm_helpers import FIXTURE_CHECKPOINT  # noqa: E402
from vllm_supernet.batch import SupernetBatch  # noqa: E402
from vllm_supernet.placements import ServingPlacements  # noqa: E402


@pytest.fixture(scope="module")
def spec() -> SupernetSpec:
    return SupernetSpec.from_config(Apriel2TextConfig.from_file(FIXTURE_CHECKPOINT))


def test_uniform_step_runs_each_layer_once_on_the_whole_batch(spec):
    serving = ServingPlacements(spec)
    placement = serving.resolve("gdn*")
    batch = SupernetBatch(placements=[placement] * 3, query_start_loc=[0, 1, 2, 7], num_computed=[5, 9, 0])
    for groups, name in zip(batch.layer_groups(serving.default, spec.num_layers, torch.device("cpu")), placement.mixers, strict=True):
        assert len(groups) == 1
        assert (
            groups[0][0] == name and groups[0][1].token_index is None and groups[0][1].requests == [0, 1, 2]
        )


def test_mixed_step_gives_each_mixer_exactly_its_requests_tokens(spec):
    serving = ServingPlacements(spec)
    a, b = serving.resolve(["gdn", "fa"]), serving.resolve(["kda", "fa"])
    batch = SupernetBatch(placements=[a, b, a], query_start_loc=[0, 1, 4, 6], num_computed=[3, 0, 0])
    layer0, layer1, layer2 = batch.layer_groups(serving.default, spec.num_layers, torch.device("cpu"))
    by_name = {name: step for name, step in layer0}
    assert by_name["gdn"].requests == [0, 2] and by_name["gdn"].token_index.tolist() == [0, 4, 5]
    assert by_name["kda"].requests == [1] and by_name["kda"].token_index.tolist() == [1, 2, 3]
    assert [name for name, _ in layer1] == ["fa"] and layer1[0][1].token_index is None
    assert [name for name, _ in layer2] == ["attention"]


def test_deferred_metadata_is_built_once_when_a_layer_first_reads_it(monkeypatch):
    from types import SimpleNamespace

    from vllm_supernet import batch as batch_module

    class CountingBuilder:
        calls = 0

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            CountingBuilder.calls += 1
            return {"prefix": common_prefix_len, "common": common_attn_metadata}

    builder = batch_module.deferred_builder(CountingBuilder)()
    assert isinstance(builder, CountingBuilder)
    group = builder.build(0, "step inputs")  # what vLLM's runner does before every step
    unread = builder.build(0, "another group's inputs")
    assert CountingBuilder.calls == 0
    context = SimpleNamespace(attn_metadata={"layers.0.gdn": group, "layers.1.gdn": group, "layers.0.kda": unread})
    monkeypatch.setattr(batch_module, "get_forward_context", lambda: context)
    first = batch_module.layer_metadata("layers.0.gdn")
    assert first == {"prefix": 0, "common": "step inputs"} and CountingBuilder.calls == 1
    assert batch_module.layer_metadata("layers.1.gdn") is first and CountingBuilder.calls == 1  # shared by the group
    assert batch_module.layer_metadata("layers.9.gdn") is None
