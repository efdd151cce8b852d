"""`vllm_supernet.model`: what the served model refuses before any weight is loaded, and how
checkpoint names map onto its stacked parameters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

from shared_spec import Apriel2TextConfig, SupernetSpec  # noqa: E402
from tests.vllm_helpers import FIXTURE_CHECKPOINT  # noqa: E402
from vllm_supernet.model import check_parallel  # noqa: E402
from vllm_supernet.placements import ServingPlacements  # noqa: E402


def _parallel(tensor: int = 1, pipeline: int = 1):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)
    )


@pytest.fixture(scope="module")
def fixture_config() -> Apriel2TextConfig:
    return Apriel2TextConfig.from_file(FIXTURE_CHECKPOINT)


def test_tensor_parallel_split_that_does_not_divide_names_the_mixer_and_counts(fixture_config):
    serving = ServingPlacements(SupernetSpec.from_config(fixture_config))
    check_parallel(fixture_config, serving, _parallel(1))
    # The upstream fixture: attention 6 heads / 3 KV groups, GDN 3 key heads: nothing splits in two.
    with pytest.raises(ValueError, match=r"layer 0 mixer '\w+': .*tensor_parallel_size=2"):
        check_parallel(fixture_config, serving, _parallel(2))


def test_thinned_deployment_is_checked_on_its_served_mixers_only(fixture_config):
    """A deployment serving only all-attention placements is refused by attention's counts alone."""
    spec = SupernetSpec.from_config(fixture_config)
    serving = ServingPlacements(spec, allowed=["fa,fa,attention"])
    with pytest.raises(ValueError, match=r"layer 0 mixer 'fa': attention with 6 heads and 3 KV groups"):
        check_parallel(fixture_config, serving, _parallel(2))
    # Three ranks: 6 heads and 3 groups divide; the unserved GDN/KDA mixers are not checked.
    check_parallel(fixture_config, serving, _parallel(3))


def test_pipeline_parallelism_is_refused_with_what_to_use_instead(fixture_config):
    serving = ServingPlacements(SupernetSpec.from_config(fixture_config))
    with pytest.raises(NotImplementedError, match="pipeline parallelism.*tensor_parallel_size"):
        check_parallel(fixture_config, serving, _parallel(1, pipeline=2))
