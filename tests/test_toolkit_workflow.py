"""The placement toolkit end to end on a tiny supernet: evaluate -> fit -> cost (through vLLM) -> pareto + plot."""

import json

import pytest

from fast_llm_supernet.toolkit.cli import main
from fast_llm_supernet.toolkit.cost import CostModel, cache_bytes_per_request
from fast_llm_supernet.toolkit.surrogate import Surrogate
from shared_spec import Apriel2TextConfig, Placement, SupernetSpec
from tests.test_toolkit_evaluate import tiny  # noqa: F401  (fixture)


def test_cache_bytes_per_request_from_the_config(tiny):  # noqa: F811
    config = Apriel2TextConfig.from_file(tiny / "supernet" / "config.json")
    spec = SupernetSpec.from_config(config)
    context = 100
    # attention: K and V, 1 group of 16, bf16, every token; SWA: the 4-token window
    assert cache_bytes_per_request(config, Placement.parse("attention*", spec), context) == 3 * 2 * 16 * context * 2
    assert cache_bytes_per_request(config, Placement.parse("sliding_window*", spec), context) == 3 * 2 * 16 * 4 * 2
    # GDN: float32 state [2 value heads, 16, 16] + conv states of q, k (1 x 16) and v (2 x 16) over 3 taps
    gdn = 2 * 16 * 16 * 4 + (16 + 16 + 32) * 3 * 2
    assert cache_bytes_per_request(config, Placement.parse("gdn*", spec), context) == 3 * gdn
    kda = 2 * 16 * 16 * 4 + 3 * 32 * 3 * 2
    assert cache_bytes_per_request(config, Placement.parse("gdn,kda,attention", spec), context) == gdn + kda + 2 * 16 * context * 2


@pytest.mark.engine
def test_evaluate_fit_cost_pareto_plot(tiny, tmp_path, capsys):  # noqa: F811
    checkpoint, data = str(tiny / "supernet"), str(tiny / "heldout.jsonl")
    evaluations = tmp_path / "evals.jsonl"
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", data, "--sequence-length", "32", "--max-tokens", "64",
                 "--output", str(evaluations), "--sample", "uniform", "--count", "40"]) == 0
    assert main(["fit", "--checkpoint", checkpoint, "--evaluations", str(evaluations),
                 "--output", str(tmp_path / "surrogate.json")]) == 0
    report = json.loads((tmp_path / "surrogate_report.json").read_text())
    assert report["held_out"] == 8 and "spearman" in report["held_out_metrics"]
    assert Surrogate.load(tmp_path / "surrogate.json").num_layers == 3

    assert main(["cost", "--checkpoint", checkpoint, "--context", "64", "--steps", "4", "--validate", "3",
                 "--output", str(tmp_path / "cost.json")]) == 0
    cost = CostModel.load(tmp_path / "cost.json")
    assert sorted(cost.mixers) == ["attention", "gdn", "kda", "sliding_window"]
    assert all(value > 0 for row in cost.per_layer for value in row) and cost.shared > 0
    assert cost.validation and all(abs(v["relative_error"]) < 5 for v in cost.validation)
    assert "on 3 hybrids not used to build it" in capsys.readouterr().out or len(cost.validation) < 3

    assert main(["pareto", "--checkpoint", checkpoint, "--surrogate", str(tmp_path / "surrogate.json"),
                 "--cost", str(tmp_path / "cost.json"), "--evaluations", str(evaluations),
                 "--output", str(tmp_path / "front.json"), "--plot", str(tmp_path / "front.png")]) == 0
    front = json.loads((tmp_path / "front.json").read_text())["points"]
    speedups = [p["predicted_speedup"] for p in front]
    assert speedups == sorted(speedups, reverse=True)  # sorted by cost: fastest first
    assert (tmp_path / "front.png").stat().st_size > 10_000

    # Presets along the frontier, measured for real, installed into (a copy of) the checkpoint.
    import shutil

    from shared_spec import PresetsFile

    served = tmp_path / "served"
    shutil.copytree(checkpoint, served)
    qualities = sorted(p["predicted_quality"] for p in front)  # a random tiny model: targets it can reach
    assert main(["presets", "--checkpoint", str(served), "--front", str(tmp_path / "front.json"), "--data", data,
                 "--sequence-length", "32", "--max-tokens", "64", "--repeats", "1",
                 "--quality-targets", str(qualities[-1]), str(qualities[0]), "--speed-targets",
                 "--output", str(tmp_path / "presets.json"), "--install"]) == 0
    assert "q" in capsys.readouterr().out
    presets = PresetsFile.load(served)
    picked = {name: p for name, p in presets.presets.items() if "speedup" in p.metrics}
    assert picked and all({"quality", "speedup", "speedup_context", "predicted_quality"} <= set(p.metrics)
                          for p in picked.values())
    assert "all-attention" in presets.presets  # the checkpoint's own presets are kept
    assert main(["pareto", "--checkpoint", checkpoint, "--surrogate", str(tmp_path / "surrogate.json"),
                 "--cost", str(tmp_path / "cost.json"), "--presets", str(tmp_path / "presets.json"),
                 "--output", str(tmp_path / "front.json"), "--plot", str(tmp_path / "front.png")]) == 0
