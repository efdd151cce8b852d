"""benchmarks/bench_speculative.py without engines: the break-even acceptance and the tables from synthetic runs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speculative.py"


def _load_bench():
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    return importlib.import_module("bench_speculative")


def test_break_even_acceptance_solves_the_expected_round_output():
    bench = _load_bench()
    k = 4
    for target in (1.5, 2.0, 3.7):
        a = bench.break_even_acceptance(target, k)
        assert abs(sum(a**i for i in range(k + 1)) - target) < 1e-9
    assert bench.break_even_acceptance(0.8, k) == 0.0  # a round cheaper than a step: any acceptance wins
    assert bench.break_even_acceptance(k + 1.5, k) is None  # k + 1 tokens per round at best


def test_speed_rows_and_tables_from_synthetic_runs():
    bench = _load_bench()
    k = 2
    runs = [
        {"context": 1024, "target": "all-attention", "draft": None, "tokens_per_second": 20.0, "seconds": 6.4,
         "decoded": 128},
        {"context": 1024, "target": "all-attention", "draft": "all-SWA", "tokens_per_second": 25.0, "seconds": 5.12,
         "decoded": 128, "speculation": {"rounds": 50, "drafted": 100, "accepted": 78},
         "draft_timing": {"seconds": 2.0, "catch_up_seconds": 1.0, "rounds": 51, "drafted": 102, "forwards": 60}},
    ]  # fmt: skip
    (row,) = bench.summarise_speed(runs, k)
    assert row["speedup"] == pytest.approx(1.25)
    assert row["tokens_per_round"] == pytest.approx(1 + 78 / 50)
    assert row["round_over_step"] == pytest.approx((5.12 / 50) / (1 / 20.0))
    assert row["draft_share"] == pytest.approx(2.0 / 5.12)
    even = row["break_even_acceptance"]
    assert 0 < even < 1 and abs(1 + even + even**2 - row["round_over_step"]) < 1e-9
    results = {
        "settings": {"command": "python benchmarks/bench_speculative.py", "minutes": 1.0, "k": k,
                     "checkpoint": "runs/smollm2/distilled", "max_tokens": 96, "new_tokens": 128, "reps": 1},
        "acceptance": [{"target": "all-attention", "draft": "all-SWA", "rounds": 10, "drafted": 20, "accepted": 15,
                        "acceptance": 0.75, "mean_accepted_length": 2.5}],
        "speed": [row],
    }  # fmt: skip
    table = bench.markdown(results)
    assert "| all-attention | all-SWA | 20 | 15 | 0.750 | 2.50 |" in table
    assert "**1.25x**" in table
