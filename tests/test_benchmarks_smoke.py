"""Smoke tests of benchmarks/bench_vllm.py: the code path runs and its outputs have the right shape.

Timings are never asserted: only that every number the tables promise is there and positive.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vllm.py"


def _load_bench(name: str = "bench_vllm"):
    # Imported by name from sys.path (not from a file spec): the benchmark's engine workers are spawned
    # processes, which must import the module that defines them, and they inherit sys.path (the other
    # benchmarks import bench_vllm by name from there too).
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    return importlib.import_module(name)


def _synthetic_results(bench, contexts):
    rate = {str(c): 100.0 / (i + 1) for i, c in enumerate(contexts)}
    budget = 2**30
    return {
        "settings": {"contexts": contexts, "batch": 4, "mixed_batch": [16], "new_tokens": 8, "reps": 1,
                     "kv_cache_gib": 1.0},  # fmt: skip
        "model": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 4, "head_dim": 64, "window": 512},
        "decode": {name: dict(rate) for name in bench.PLACEMENTS},
        "native": {name: dict(rate) for name in bench.NATIVE_FOR},
        "mixed": {"mixed": dict(rate), "uniform_average": dict(rate)},
        "uniform_beside_mixed": {name: dict(rate) for name in bench.MIXED},
        "larger_mixed": {
            "16": {
                "mixed": {str(contexts[0]): 80.0},
                "uniform": {name: {str(contexts[0]): 100.0} for name in bench.MIXED},
                "uniform_average": {str(contexts[0]): 100.0},
            },
        },
        "memory": {
            "unthinned": {
                "kv_cache_tokens": 1000,
                "max_concurrency": 2.0,
                "bytes_per_request_at_max_len": budget / 2.0,
            },  # fmt: skip
            "thinned: all-GDN only": {
                "allowed": ["gdn*"],
                "kv_cache_tokens": 9000,
                "max_concurrency": 20.0,
                "bytes_per_request_at_max_len": budget / 20.0,
            },  # fmt: skip
        },
        "mixed_weight_read_ratio": 0.57,
        "blocked": [],
        "wall_seconds": 60.0,
    }


def test_table_from_results():
    bench = _load_bench()
    results = _synthetic_results(bench, [64, 128])
    table = bench.markdown(results, "python benchmarks/bench_vllm.py --quick")
    for name in bench.PLACEMENTS:
        assert f"| {name} |" in table
    assert "Llama" in table and "Mistral" in table and "Qwen3.5" in table
    assert "| 128 | 50.0 | 50.0 | **1.00x** | 0.57x |" in table  # mixed batch row
    assert "Mixed batch of 16 (4 requests each of" in table and "| 64 | 80.0 | 100.0 | **0.80x** |" in table
    assert "| thinned: all-GDN only | 9000 | 20.0 | 51.2 | 0.10x |" in table


def test_weight_read_ratio_counts_each_mixer_a_step_reads(tmp_path):
    """One layer: MLP 10 parameters, attention and SWA 2 each, GDN and KDA 4 each (embeddings skipped)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    bench = _load_bench()
    prefix = "model.decoder.blocks.0.mixer.mixers"
    tensors = {"model.decoder.blocks.0.mlp.up_proj.weight": torch.zeros(10),
               "model.embed_tokens.weight": torch.zeros(1000),
               f"{prefix}.attention.q_proj.weight": torch.zeros(2),
               f"{prefix}.sliding_window.q_proj.weight": torch.zeros(2),
               f"{prefix}.gdn.in_proj_qkvz.weight": torch.zeros(3), f"{prefix}.gdn.A_log": torch.zeros(1),
               f"{prefix}.kda.q_proj.weight": torch.zeros(4)}  # fmt: skip
    save_file(tensors, tmp_path / "model.safetensors")
    # Uniform steps read 12, 12, 14, 14; the mixed step reads 10 + 2 + 2 + 4 + 4 = 22.
    expected = 1 / (22 * (1 / 12 + 1 / 12 + 1 / 14 + 1 / 14) / 4)
    assert bench.weight_read_ratio(tmp_path) == pytest.approx(expected)


@pytest.mark.slow  # matplotlib's import alone takes seconds on 2 cores
def test_plot_from_results(tmp_path):
    bench = _load_bench()
    results = _synthetic_results(bench, [64, 128])
    bench.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.engine
@pytest.mark.slow
def test_benchmark_runs_end_to_end(tmp_path):
    """Real engines (supernet, native Llama, one thinned deployment) on a trivially small setting."""
    bench = _load_bench()
    out = tmp_path / "out"
    bench.THINNED = {"thinned: all-GDN only": ["gdn*"]}
    bench.main(["--contexts", "32", "64", "--new-tokens", "4", "--reps", "1", "--kv-cache-gib", "0.25",
                "--mixed-batch", "8", "--natives", "llama", "--workdir", str(tmp_path / "work"),
                "--out", str(out)])  # fmt: skip
    results = json.loads((out / "vllm_decode.json").read_text())
    assert not results["blocked"], results["blocked"]
    for name in bench.PLACEMENTS:
        assert set(results["decode"][name]) == {"32", "64"}
        assert all(rate > 0 for rate in results["decode"][name].values())
    assert set(results["native"]) == {"all-FA"}
    assert set(results["mixed"]["uniform_average"]) == {"32", "64"}
    assert set(results["larger_mixed"]["8"]["uniform_average"]) == {"32"}  # the shortest context only
    assert 0 < results["mixed_weight_read_ratio"] < 1
    memory = results["memory"]
    assert memory["unthinned"]["kv_cache_tokens"] > 0
    assert memory["thinned: all-GDN only"]["bytes_per_request_at_max_len"] > 0
    assert (out / "vllm_decode.md").exists() and (out / "vllm_decode.png").exists()


def test_tensor_parallel_table_has_a_ratio_per_model_and_context():
    sys.path.insert(0, str(BENCH.parents[1]))
    bench_tp = importlib.import_module("benchmarks.bench_tensor_parallel")
    rows = [
        {"model": name, "context": context, "tp1": 100.0, "tp2": 150.0, "ratio": 1.5}
        for name in ["Llama", *bench_tp.SUPERNET_PLACEMENTS]
        for context in (512, 2048)
    ]
    table = bench_tp.markdown({"rows": rows}, "python benchmarks/bench_tensor_parallel.py")
    assert table.count("**1.50x**") == len(rows)
    assert "| Llama | 512 |" in table and "| supernet all-GDN | 2048 |" in table


@pytest.mark.engine
@pytest.mark.slow
def test_step_time_benchmark_runs_end_to_end(tmp_path):
    """Three real in-process engines (supernet, thinned, native Mistral); every stage timed on every decode step."""
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    bench_step = importlib.import_module("bench_step_time")
    out = tmp_path / "out"
    bench_step.main(["--placement", "all-SWA", "--context", "48", "--new-tokens", "6", "--rounds", "2", "--slice", "2",
                     "--kv-cache-gib", "0.25", "--workdir", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    results = json.loads((out / "step_time_all-SWA_48.json").read_text())
    assert set(results["median_ms"]) == {"supernet", "supernet thinned", "mistral_swa"}
    stages = {*bench_step.SCHEDULER_STAGES, *bench_step.RUNNER_STAGES}
    for median in results["median_ms"].values():
        assert median["steps_timed"] == 2 * 2  # one turn of two timed decode steps in each of two rounds
        assert set(median) == {"step", "steps_timed", "paired_ratio", *stages}  # vLLM 0.32 has every stage the table names
        assert all(median[stage] > 0 for stage in stages) and median["step"] > median["_model_forward"]
    assert results["median_ms"]["mistral_swa"]["paired_ratio"] == 1.0  # the native engine against itself
    assert "| supernet thinned |" in (out / "step_time_all-SWA_48.md").read_text()
    with pytest.raises(SystemExit):  # too few new tokens for one turn: refused before any engine starts
        bench_step.main(["--new-tokens", "4", "--slice", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)])


def test_capacity_table_compares_each_engine_with_the_thinned_one():
    bench = _load_bench("bench_capacity")
    row = {"preemptions": 0, "tokens_per_s": 100.0, "generated_per_s": 10.0}
    results = {
        "command": "python benchmarks/bench_capacity.py", "window": 512,
        "load": {"budget": 128 * 2**20, "requests": 32, "prompt": 2048, "new_tokens": 32},
        "model": {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4, "head_dim": 64},
        "rows": [{"workload": "all-FA", "engine": "unthinned", "peak_running": 14, **row},
                 {"workload": "all-FA", "engine": "thinned", "peak_running": 16, **row},
                 {"workload": "mixed (1/4 each uniform)", "engine": "unthinned", "peak_running": 32, **row}],
    }  # fmt: skip
    table = bench.markdown(results)
    assert "| all-FA | unthinned | 14 | 0.88x | 0 | 100 | 10.0 |" in table
    assert "| mixed (1/4 each uniform) | unthinned | 32 |  | 0 | 100 | 10.0 |" in table
    assert "Budget 128 MiB" in table


@pytest.mark.engine
@pytest.mark.slow
def test_capacity_benchmark_runs_end_to_end(tmp_path):
    """Five real engines (all-GDN unthinned, with vLLM's per-kind groups and thinned; the mixed workload the first two
    ways) at toy sizes, the engines picked by name."""
    bench = _load_bench("bench_capacity")
    results = bench.main(["--requests", "4", "--prompt", "64", "--new-tokens", "4", "--budget-mib", "8", "--layers", "2",
                          "--natives", "--workloads", "all-GDN", "--engines", "unthinned", "per kind", "thinned",
                          "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])  # fmt: skip
    engines = [(row["workload"], row["engine"]) for row in results["rows"]]
    assert engines == [("all-GDN", "unthinned"), ("all-GDN", "per kind"), ("all-GDN", "thinned"),
                       ("mixed (1/4 each uniform)", "unthinned"), ("mixed (1/4 each uniform)", "per kind")]  # fmt: skip
    for row in results["rows"]:
        assert 1 <= row["peak_running"] <= 4 and row["generated"] == 4 * 4 and row["tokens_per_s"] > 0
    assert (tmp_path / "out" / "capacity.png").exists() and (tmp_path / "out" / "capacity.md").exists()


def test_load_ramp_summary_and_verdict():
    bench = _load_bench("bench_load")
    quality = {"attention": 1.0, "window": 0.758, "gdn": 0.556}
    samples = [  # step 0: two quick requests; step 1: one slow one, one below its floor
        bench.Sample(sent=0.0, step=0, floor=0.5, ttft=1.0, tpot=0.1, done=2.0, tokens=11, preset="attention"),
        bench.Sample(sent=5.0, step=0, floor=0.75, ttft=1.0, tpot=0.1, done=7.0, tokens=11, preset="window"),
        bench.Sample(sent=10.0, step=1, floor=0.5, ttft=6.0, tpot=0.2, done=18.0, tokens=11, preset="gdn"),
        bench.Sample(sent=11.0, step=1, floor=0.75, ttft=2.0, tpot=0.1, done=14.0, tokens=11, preset="gdn"),
        bench.Sample(sent=12.0, step=1, floor=0.5, error="APIError: boom"),
    ]
    steps = bench.summarise(samples, [[0, 1], [2]], [0.2, 0.4], 10.0, quality, 100)
    assert [s.requests for s in steps] == [2, 3] and [s.errors for s in steps] == [0, 1]
    assert steps[0].ttft_p50 == 1.0 and steps[1].ttft_p99 == 6.0
    assert steps[0].quality_mean == pytest.approx((1.0 + 0.758) / 2) and steps[1].below_floor == 1
    assert steps[0].tokens_per_s == pytest.approx((2 * 100 + 2 * 11) / 10)  # both streams end inside step 0
    assert steps[0].waiting_mean == 0.5 and steps[1].presets == {"gdn": 2}

    results = {"idle": {"attention": {"ttft": 1.0}}, "ramps": {
        "attention": [{"ttft_p99": 1.2, "rate": 0.2}, {"ttft_p99": 6.0, "rate": 0.4}],
        "adaptive": [{"ttft_p99": 1.1, "rate": 0.2, "presets": {"attention": 2}, "below_floor": 0},
                     {"ttft_p99": 1.8, "rate": 0.4, "presets": {"window": 3}, "below_floor": 0}]}}  # fmt: skip
    verdict = bench.verdict(results)
    assert "p99 TTFT is 6.0x its idle value (0.40 req/s), the adaptive policy's is 1.8x" in verdict
    assert "{'attention': 2}" in verdict


@pytest.mark.engine
@pytest.mark.slow
def test_load_benchmark_runs_end_to_end(tmp_path):
    """Two servers (fixed presets, then the load policy), a two-step ramp of short requests (too short to measure
    the presets' speed-ups, so they are given)."""
    bench = _load_bench("bench_load")
    results = bench.main(["--prompt", "64", "--new-tokens", "4", "--rates", "1", "2", "--step-seconds", "3",
                          "--idle-requests", "1", "--max-num-seqs", "4", "--budget-mib", "32",
                          "--policies", "attention", "adaptive", "--speedups", '{"attention": 1, "window": 1.6, "gdn": 1.3}',
                          "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out")])  # fmt: skip
    assert set(results["ramps"]) == {"attention", "adaptive"} and results["speedups"]["window"] == 1.6
    for ramp in results["ramps"].values():
        assert [step["rate"] for step in ramp] == [1.0, 2.0]
        assert all(step["errors"] == 0 and step["below_floor"] == 0 and step["requests"] > 0 for step in ramp)
    assert results["ramps"]["attention"][0]["presets"] == {"attention": results["ramps"]["attention"][0]["requests"]}
    assert "ttft_target_s" in results["policy"]
    assert (tmp_path / "out" / "load.png").exists() and "| adaptive | 2.00 |" in (tmp_path / "out" / "load.md").read_text()
