"""The GPU check: without CUDA it says so and exits 0; its sections run end to end at toy sizes on CPU (so a GPU
run does not find their mistakes first) and write one table and the JSON beside it."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import torch

from fast_llm_supernet.tools import gpu_check

REPO = Path(__file__).resolve().parents[1]
TOY = gpu_check.CheckSettings(
    heads=4, head_groups=2, head_size=16, window=8, bench_lengths=[70], bench_repeats=1, hidden_size=32, layers=2,
    intermediate_size=48, vocab_size=64, train_tokens=40, train_steps=2, decode_contexts=[20], decode_tokens=3,
)


def test_without_cuda_the_script_says_so_and_exits_0():
    if torch.cuda.is_available():
        return
    completed = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "no CUDA device" in completed.stdout


def test_every_section_runs_at_toy_sizes(tmp_path):
    sections = ("fixture", "mixers", "training", "decode")
    report = gpu_check.run_checks(TOY, torch.device("cpu"), tmp_path, sections)
    assert not [row for row in report.rows if row["result"] == "ERROR"], report.table()
    rows = {(row["section"], row["case"]): row for row in report.rows}

    fixture = [row for row in report.rows if row["section"] == "upstream fixture"]
    assert len(fixture) == 3 and all(max(row["differences"].values()) < 1e-5 for row in fixture)  # CPU: exact paths
    for kind in ("attention", "sliding_window", "gdn", "kda"):
        assert rows[("decode", f"{kind}, context 20")]["tokens_per_s"] > 0
    for run in ("attention", "sliding_window", "gdn", "kda", "stochastic (uniform per layer)"):
        row = rows[("training", f"{run}: 2 steps")]
        assert row["finite"] and len(row["losses"]) == 2 and all(math.isfinite(loss) for loss in row["losses"])
    assert any(case.startswith("GDN (torch fwd, torch bwd)") for _, case in rows)

    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["rows"] == json.loads(json.dumps(report.rows))
    assert (tmp_path / "gpu_check.md").read_text().count("\n| ") == len(report.rows) + 2  # header, separator, rows


def test_sections_run_in_processes_of_their_own_and_stop_at_their_share(tmp_path):
    report = gpu_check.run_isolated(TOY.model_copy(update={"time_limit_s": 240}), torch.device("cpu"), tmp_path,
                                    ("fixture", "decode"))
    sections = [row["section"] for row in report.rows]
    assert "upstream fixture" in sections and sections.count("decode") == 5  # 4 placements and the section time
    merged = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert merged == json.loads(json.dumps(report.rows))

    stopped = gpu_check.run_isolated(TOY.model_copy(update={"time_limit_s": 0.5}), torch.device("cpu"),
                                     tmp_path / "short", ("training",))
    assert [(row["case"], row["result"]) for row in stopped.rows][-1] == ("time limit", "stopped after 0 s")
