"""`fast_llm_supernet.tools.gpu_check`: what this project needs from a CUDA GPU, checked and measured in one run.

    bash scripts/gpu_check.sh [--output DIR] [--quick]
    python -m fast_llm_supernet.tools.gpu_check [--output DIR] [--quick]

Under 5 minutes on one H100 / H200 by construction: each section runs in a process of its own and is stopped at
its share of `--time-limit-s` (default 280 s), keeping the rows it wrote (a cold machine spends much of that
compiling and autotuning Triton kernels; a second run finds them cached and gets further). Prints one table and
writes it beside a JSON file of the same rows (`DIR/gpu_check.md`, `DIR/gpu_check.json`; default
`runs/gpu_check`). `--in-process` runs everything in one process without limits. Sections:

- environment: GPU, torch, Triton, fla, tilelang; the delta-rule kernel choice (`delta_rule_kernels`) and why;
- kernel tests: pytest on `tests/test_gpu_*.py` (fla against the torch kernels, forward and training gradients;
  FlexAttention against the dense mask);
- upstream fixture: the held-out upstream export on CUDA in float32, max |logits - upstream's| per placement,
  for each kernel path (the default; torch delta-rule kernels; torch kernels and the dense mask);
- mixers: FA / SWA (FlexAttention, dense mask) / GDN / KDA forward and forward+backward, bf16, 16 heads of 128,
  window 4096, at 4k and 16k tokens (median of CUDA-event timings after a warm-up);
- training: steps of a synthetic supernet (distillation loss against a frozen copy, as `supernet-train` computes
  it) per uniform placement and with uniformly drawn placements: loss finite, first and last, tokens/s;
- decode: `generate` tok/s per uniform placement at each context, after a warm-up (a Triton kernel's first call
  includes its compile), and the prefill time.

Without a CUDA device it says so and exits 0. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fast_llm_supernet.model import SupernetForCausalLM, delta_rule_kernels, ops, windowed_attention
from shared_spec import Apriel2TextConfig, MixerKind, uniform_placement

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "apriel2_upstream_small"
KERNEL_TESTS = ("tests/test_gpu_kernels.py", "tests/test_gpu_windowed_attention.py")
MIXER_NAMES = {MixerKind.ATTENTION: "attention", MixerKind.SLIDING_WINDOW: "sliding_window",
               MixerKind.GDN: "gdn", MixerKind.KDA: "kda"}


class CheckSettings(BaseModel):
    """Sizes of the measured cases (the defaults fit a few minutes on one H100 / H200)."""

    model_config = ConfigDict(extra="forbid")

    heads: int = Field(16, ge=1)
    head_groups: int = Field(4, ge=1)
    head_size: int = Field(128, ge=16)
    window: int = Field(4096, ge=1)
    bench_lengths: list[int] = Field(default_factory=lambda: [4096, 16384])
    bench_repeats: int = Field(5, ge=1)
    # The synthetic supernet: every layer offers all four mixers; attention shapes as in the mixer benchmarks.
    hidden_size: int = Field(2048, ge=16)
    layers: int = Field(4, ge=1)
    intermediate_size: int = Field(5632, ge=1)
    vocab_size: int = Field(32000, ge=16)
    train_tokens: int = Field(4096, ge=16)
    train_steps: int = Field(20, ge=2)
    decode_contexts: list[int] = Field(default_factory=lambda: [4096, 16384])
    decode_tokens: int = Field(64, ge=2)
    # The whole check's wall time, shared among the sections (`SECTION_SHARES`); each runs in a process of its
    # own and is stopped at its share, keeping the rows it wrote.
    time_limit_s: float = Field(280.0, gt=0)


SECTIONS = ("kernels", "fixture", "mixers", "training", "decode")
SECTION_SHARES = {"kernels": 0.2, "fixture": 0.12, "mixers": 0.25, "training": 0.28, "decode": 0.15}


QUICK = {"bench_lengths": [4096], "bench_repeats": 3, "layers": 2, "train_steps": 5, "decode_contexts": [4096],
         "decode_tokens": 16}


class Report:
    """Rows of (section, case, result, detail), written as a markdown table and JSON after every row (a section
    stopped at its time limit keeps what it measured)."""

    def __init__(self, output: Path, environment: dict):
        self.output = output
        self.environment = environment
        self.rows: list[dict] = []

    def add(self, section: str, case: str, result: str, detail: str = "", **values) -> None:
        row = {"section": section, "case": case, "result": result, "detail": detail, **values}
        self.rows.append(row)
        print(f"  {section} | {case} | {result} | {detail}", flush=True)
        self.write()

    def table(self) -> str:
        lines = ["| section | case | result | detail |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['section']} | {r['case']} | {r['result']} | {r['detail']} |" for r in self.rows]
        return "\n".join(lines)

    def write(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "gpu_check.json").write_text(
            json.dumps({"environment": self.environment, "rows": self.rows}, indent=1) + "\n"
        )
        header = ", ".join(f"{key} {value}" for key, value in self.environment.items())
        (self.output / "gpu_check.md").write_text(f"{header}\n\n{self.table()}\n")


def time_ms(function: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median milliseconds of `function` after `warmup` calls: CUDA events on a GPU, the wall clock elsewhere
    (the sections run on CPU in the tests, at toy sizes)."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            function()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def environment_variable(name: str, value: str | None):
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextmanager
def dense_attention_only():
    """The attention mixers' CPU path (dense mask) on CUDA too."""
    saved = windowed_attention.FLEX_DEVICE_TYPES
    windowed_attention.FLEX_DEVICE_TYPES = frozenset()
    try:
        yield
    finally:
        windowed_attention.FLEX_DEVICE_TYPES = saved


# ---- sections ---------------------------------------------------------------------------------------------


def check_kernels(report: Report, settings: CheckSettings, device: torch.device) -> None:
    choice = delta_rule_kernels.kernel_choice(device)
    report.add("kernels", "delta-rule choice", f"inference {choice.forward}; training "
               + ", ".join(f"{kind} {kernel}" for kind, kernel in choice.backward.items()), choice.reason or "",
               choice={"forward": choice.forward, "backward": choice.backward, "reason": choice.reason})
    tests = [str(REPO / name) for name in KERNEL_TESTS if (REPO / name).exists()]
    if not tests:
        report.add("kernels", "GPU kernel tests", "not run", "no tests/ beside the package (installed copy)")
        return
    try:
        import pytest
    except ImportError:
        report.add("kernels", "GPU kernel tests", "not run", "pytest is not installed")
        return

    class Outcomes:  # a pytest plugin that keeps each test's outcome
        def __init__(self):
            self.results: dict[str, str] = {}

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                self.results[report.nodeid] = report.outcome

    outcomes = Outcomes()
    started = time.perf_counter()
    # In this process: the kernels it compiles are the ones the sections below time.
    exit_code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(REPO), *tests], plugins=[outcomes])
    counts = {outcome: list(outcomes.results.values()).count(outcome) for outcome in ("passed", "failed", "skipped")}
    not_passed = [f"{nodeid.split('::')[-1]} {outcome}" for nodeid, outcome in outcomes.results.items()
                  if outcome != "passed"]
    report.add("kernels", "GPU kernel tests (" + ", ".join(Path(t).name for t in tests) + ")",
               ", ".join(f"{count} {outcome}" for outcome, count in counts.items() if count),
               "; ".join(not_passed)[:600] + f" ({time.perf_counter() - started:.0f} s)",
               exit_code=int(exit_code), outcomes=outcomes.results)


def check_upstream_fixture(report: Report, settings: CheckSettings, device: torch.device) -> None:
    if not (FIXTURE / "reference.json").exists():
        report.add("upstream fixture", "float32 on CUDA", "not run", f"{FIXTURE} is missing")
        return
    from safetensors.torch import load_file

    reference = json.loads((FIXTURE / "reference.json").read_text())
    expected = load_file(str(FIXTURE / "reference.safetensors"))
    model = SupernetForCausalLM.from_pretrained(FIXTURE / "checkpoint", dtype=torch.float32, device=device)
    input_ids = torch.tensor(reference["input_ids"], device=device)
    paths = {
        "default (fla forward, FlexAttention)": (None, False),
        "torch delta-rule kernels (SUPERNET_DISABLE_FLA=1), FlexAttention": ("1", False),
        "torch kernels, dense mask (the CPU path)": ("1", True),
    }
    for path, (disable_fla, dense) in paths.items():
        differences = {}
        with environment_variable(delta_rule_kernels.DISABLE_FLA_ENV, disable_fla), torch.no_grad():
            with dense_attention_only() if dense else _nothing():
                for index, placement in enumerate(reference["placements"]):
                    logits = model(input_ids, placement=placement).float().cpu()
                    differences[",".join(placement)] = (logits - expected[str(index)]).abs().max().item()
        detail = ", ".join(f"{name} {value:.2g}" for name, value in differences.items())
        report.add("upstream fixture", f"float32, {path}", f"max {max(differences.values()):.2g}", detail,
                   differences=differences)


@contextmanager
def _nothing():
    yield


def check_mixers(report: Report, settings: CheckSettings, device: torch.device) -> None:
    for length in settings.bench_lengths:
        _mixers_at(report, settings, device, length)
        empty_cache(device)


def _mixers_at(report: Report, settings: CheckSettings, device: torch.device, length: int) -> None:
    heads, groups, dim, window = settings.heads, settings.head_groups, settings.head_size, settings.window
    scale = dim**-0.5
    shape = f"bf16, 1 x {heads} heads of {dim} ({groups} KV groups)"
    generator = torch.Generator(device=device).manual_seed(length)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    query, key, value = randn(1, heads, length, dim), randn(1, groups, length, dim), randn(1, groups, length, dim)
    positions = torch.arange(length, device=device)
    allowed = ops.attention_mask(positions, positions, window)

    def expand(x):
        return x.repeat_interleave(heads // groups, dim=1)

    fa, flex, dense = "FA (SDPA causal)", f"SWA w{window} (FlexAttention)", f"SWA w{window} (dense mask)"
    attention = {
        fa: lambda q, k, v: F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True, scale=scale),
        flex: lambda q, k, v: windowed_attention.sliding_window_attention(q, k, v, window, scale),
        dense: lambda q, k, v: F.scaled_dot_product_attention(
            q, expand(k), expand(v), attn_mask=allowed, scale=scale),
    }
    if not windowed_attention.usable(query):
        del attention[flex]
        report.add("mixers", f"{flex}, T={length}", "not run", f"FlexAttention does not run on {device.type} here")
    timings = {}
    for name, function in attention.items():
        timings[name] = _forward_backward_ms(function, (query, key, value), settings.bench_repeats, device)
        report.add("mixers", f"{name}, T={length}", _ms_pair(timings[name]), shape,
                   length=length, forward_ms=timings[name][0], forward_backward_ms=timings[name][1])
    if flex in timings:
        ratios = [windowed / full for windowed, full in zip(timings[flex], timings[fa], strict=True)]
        report.add("mixers", f"SWA (FlexAttention) / FA, T={length}", f"{ratios[0]:.2f}x / {ratios[1]:.2f}x",
                   "forward / forward+backward", ratios=ratios)

    q, k = ops.l2norm(randn(1, length, heads, dim)), ops.l2norm(randn(1, length, heads, dim))
    v = randn(1, length, heads, dim)
    beta = torch.rand(1, length, heads, device=device, generator=generator).to(torch.bfloat16)
    choice = delta_rule_kernels.kernel_choice(device)
    for kind, decay_shape in (("gdn", (1, length, heads)), ("kda", (1, length, heads, dim))):
        g = F.logsigmoid(randn(*decay_shape, dtype=torch.float32) + 2)
        inputs = (q, k, v, g, beta)
        label = f"{kind.upper()} ({choice.forward} fwd, {choice.backward[kind]} bwd)"
        measured = _forward_backward_ms(
            lambda *x: delta_rule_kernels.gated_delta_rule(*x)[0], inputs, settings.bench_repeats, device
        )
        report.add("mixers", f"{label}, T={length}", _ms_pair(measured), f"bf16 inputs, {heads} heads of {dim}",
                   length=length, forward_ms=measured[0], forward_backward_ms=measured[1])


def _forward_backward_ms(function, inputs, repeats, device) -> tuple[float, float]:
    with torch.no_grad():
        forward = time_ms(lambda: function(*inputs), repeats, device)

    def step():
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = function(*leaves)
        out.backward(torch.ones_like(out))

    return forward, time_ms(step, repeats, device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ms_pair(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.2f} / {pair[1]:.2f} ms"


def synthetic_config(settings: CheckSettings) -> Apriel2TextConfig:
    attention = {"type": "attention", "heads": settings.heads, "head_groups": settings.head_groups,
                 "head_size": settings.head_size, "add_linear_biases": False,
                 "rotary": {"type": "mistral_1d", "theta": 500000.0}}
    block = {
        "mixer": {
            "type": "stochastic",
            "main_mixer_name": "attention",
            "mixers": {
                "attention": attention,
                "sliding_window": {**attention, "window_size": settings.window},
                "gdn": {"type": "gdn", "value_heads": settings.heads, "key_heads": settings.head_groups,
                        "key_head_dim": settings.head_size, "value_head_dim": settings.head_size,
                        "convolution_layer": {"kernel_size": 4}},
                "kda": {"type": "kda", "heads": settings.heads, "head_dim": settings.head_size,
                        "convolution_layer": {"kernel_size": 4}, "normalization": {"epsilon": 1e-5}},
            },
        },
        "mlp": {"type": "mlp", "intermediate_size": settings.intermediate_size, "activation": "silu", "gated": True,
                "add_linear_biases": False},
        "normalization": {"type": "rms_norm", "epsilon": 1e-5},
    }
    return Apriel2TextConfig.model_validate({
        "hidden_size": settings.hidden_size,
        "vocab_size": settings.vocab_size,
        "tie_word_embeddings": False,
        "decoder": {"type": "fixed", "num_blocks": settings.layers, "block": block},
        "head": {"normalization": {"type": "rms_norm", "epsilon": 1e-5}},
    })


def check_training(report: Report, settings: CheckSettings, device: torch.device) -> SupernetForCausalLM:
    from fast_llm_supernet.training.loss import DistillLossConfig, distillation_loss
    from fast_llm_supernet.training.placement_sampling import MixerSampler
    from fast_llm_supernet.training.trainer import distillation_forward, select_trainable_parameters

    torch.manual_seed(0)
    student = SupernetForCausalLM(synthetic_config(settings)).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    teacher_placement = uniform_placement(student.spec, MixerKind.ATTENTION)
    trainable = select_trainable_parameters(student, "mixers", [])
    parameters = [p for p in student.parameters() if p.requires_grad]
    loss_config = DistillLossConfig()
    sampler = MixerSampler(student.spec)
    tokens = settings.train_tokens
    report.add("training", "synthetic supernet",
               f"{sum(p.numel() for p in student.parameters()) / 1e6:.0f}M parameters",
               f"{settings.layers} layers x 4 mixers, hidden {settings.hidden_size}, vocab {settings.vocab_size}; "
               f"1 x {tokens} tokens a step, bf16 autocast on CUDA, AdamW on the mixers")
    runs = {kind.value: (lambda step, kind=kind: uniform_placement(student.spec, kind)) for kind in MIXER_NAMES}
    runs["stochastic (uniform per layer)"] = sampler.sample
    initial_weights = copy.deepcopy(student.state_dict())
    for name, placement_of in runs.items():
        student.load_state_dict(initial_weights)  # every run starts from the same weights
        optimizer = torch.optim.AdamW(parameters, lr=1e-4)
        losses, times = [], []
        for step in range(settings.train_steps):
            placement = placement_of(step)
            input_ids = torch.randint(settings.vocab_size, (1, tokens + 1), device=device,
                                      generator=torch.Generator(device=device).manual_seed(step))
            match_layers = [i for i, mixer in enumerate(placement.mixers) if (i, mixer) in trainable]
            synchronize(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits, teacher_logits, activations = distillation_forward(
                    student, teacher, teacher_placement, placement, input_ids[:, :-1], match_layers
                )
                output = distillation_loss(loss_config, logits, teacher_logits, input_ids[:, 1:], None, activations)
            output.total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - started)
            losses.append(output.total.item())
        finite = all(math.isfinite(loss) for loss in losses)
        step_s = statistics.median(times[1:])  # the first step compiles kernels
        report.add("training", f"{name}: {settings.train_steps} steps",
                   f"loss {'finite' if finite else 'NOT FINITE'}, {tokens / step_s:,.0f} tok/s",
                   f"loss {losses[0]:.4g} -> {losses[-1]:.4g}; {step_s * 1e3:.0f} ms/step (first {times[0]:.1f} s)",
                   losses=losses, step_seconds=times, finite=finite)
        del optimizer
    student.load_state_dict(initial_weights)
    del teacher
    empty_cache(device)
    return student


def check_decode(report: Report, settings: CheckSettings, device: torch.device,
                 model: SupernetForCausalLM | None = None) -> None:
    if model is None:
        torch.manual_seed(0)
        model = SupernetForCausalLM(synthetic_config(settings))
    model = model.to(device, torch.bfloat16).eval()
    for context in settings.decode_contexts:
        prompt = torch.randint(settings.vocab_size, (1, context), device=device,
                               generator=torch.Generator(device=device).manual_seed(context))
        for kind in MIXER_NAMES:
            placement = uniform_placement(model.spec, kind)
            _prefill_and_decode_seconds(model, prompt, placement, 4, device)  # warm-up: compiles the kernels
            prefill, decode = _prefill_and_decode_seconds(model, prompt, placement, settings.decode_tokens, device)
            tokens_per_s = settings.decode_tokens / decode
            report.add("decode", f"{kind.value}, context {context}", f"{tokens_per_s:,.0f} tok/s",
                       f"batch 1, bf16, {settings.decode_tokens} tokens; prefill {prefill * 1e3:.0f} ms",
                       context=context, tokens_per_s=tokens_per_s, prefill_s=prefill)
        del prompt
        empty_cache(device)


@torch.no_grad()
def _prefill_and_decode_seconds(model, prompt, placement, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """Seconds of the prompt's forward and of `new_tokens` greedy decode steps after it, each timed on its own
    (a difference of two whole generations can come out negative when the decode is short and the box noisy)."""
    caches = model.new_caches(placement, prompt.shape[0], device=device, max_length=prompt.shape[1] + new_tokens)
    synchronize(device)
    started = time.perf_counter()
    token = model(prompt, caches=caches, last_logits_only=True)[:, -1:].argmax(-1)  # [B, 1]
    synchronize(device)
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, caches=caches, last_logits_only=True)[:, -1:].argmax(-1)
    synchronize(device)
    return prefilled - started, time.perf_counter() - prefilled


# ---- the run -------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    return {
        "GPU": delta_rule_kernels.describe_device(device),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda if device.type == "cuda" else None,
        "Triton": delta_rule_kernels.package_version("triton"),
        "fla": delta_rule_kernels.package_version("flash-linear-attention"),
        "tilelang": delta_rule_kernels.package_version("tilelang"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/gpu_check"), help="where the table and JSON go")
    parser.add_argument("--quick", action="store_true", help="smaller cases (4k only, 2 layers, 5 steps)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections, in this order")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="wall time of the whole check, shared among the sections (default 280)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the sections in this process, without time limits")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one section, for run_isolated
    parser.add_argument("--settings", type=Path, help=argparse.SUPPRESS)  # a child reads its parent's settings
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # the tests run the sections on CPU
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check here.")
        return 0
    if args.settings is not None:
        settings = CheckSettings.model_validate_json(args.settings.read_text())
    else:
        settings = CheckSettings(**(QUICK if args.quick else {}))
    if args.time_limit_s is not None:
        settings = settings.model_copy(update={"time_limit_s": args.time_limit_s})
    if args.child or args.in_process:
        run_checks(settings, device, args.output, args.sections, quiet=args.child)
    else:
        run_isolated(settings, device, args.output, args.sections)
    return 0


def run_isolated(settings: CheckSettings, device: torch.device, output: Path, names=SECTIONS) -> Report:
    """Each section in a process of its own, stopped at its share of `settings.time_limit_s` (a cold machine's
    compiles and autotuning can take minutes; a hang stops one section, not the check); one merged table."""
    output.mkdir(parents=True, exist_ok=True)
    settings_file = output / "settings.json"
    settings_file.write_text(settings.model_dump_json(indent=1) + "\n")
    report = Report(output, environment(device))
    print("gpu_check:", ", ".join(f"{key} {value}" for key, value in report.environment.items()), flush=True)
    started = time.perf_counter()
    total_share = sum(SECTION_SHARES[name] for name in names)
    environment_variables = {**os.environ, "PYTHONPATH": os.pathsep.join(
        part for part in (str(REPO), os.environ.get("PYTHONPATH")) if part)}
    for name in names:
        limit = settings.time_limit_s * SECTION_SHARES[name] / total_share
        section_output = output / "sections" / name
        shutil.rmtree(section_output, ignore_errors=True)
        print(f"[{time.perf_counter() - started:.0f} s] {name} (at most {limit:.0f} s)", flush=True)
        command = [sys.executable, "-m", "fast_llm_supernet.tools.gpu_check", "--child", "--sections", name,
                   "--output", str(section_output), "--settings", str(settings_file), "--device", str(device)]
        process = subprocess.Popen(command, env=environment_variables, start_new_session=True)
        try:
            process.wait(timeout=limit)
            stopped = False
        except subprocess.TimeoutExpired:  # the whole group: inductor's compile workers too
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            stopped = True
        written = section_output / "gpu_check.json"
        report.rows += json.loads(written.read_text())["rows"] if written.exists() else []
        if stopped:
            report.add(name, "time limit", f"stopped after {limit:.0f} s",
                       "the rows above are what it measured by then (first calls compile and autotune)")
        elif process.returncode:
            report.add(name, "section", f"exit code {process.returncode}")
        report.write()
    print(f"\nGPU check ({time.perf_counter() - started:.0f} s): "
          + ", ".join(f"{key} {value}" for key, value in report.environment.items()))
    print(report.table())
    print(f"\nwritten: {output / 'gpu_check.md'} and {output / 'gpu_check.json'}")
    return report


def run_checks(
    settings: CheckSettings, device: torch.device, output: Path, names=SECTIONS, quiet: bool = False
) -> Report:
    """Run the named sections on `device` in this process, each caught so that one failure keeps the others'
    figures; `quiet`: no header and no final table (a child of `run_isolated`)."""
    report = Report(output, environment(device))
    if not quiet:
        print("gpu_check:", ", ".join(f"{key} {value}" for key, value in report.environment.items()), flush=True)
    started = time.perf_counter()
    model = None
    sections = {
        "kernels": lambda: check_kernels(report, settings, device),
        "fixture": lambda: check_upstream_fixture(report, settings, device),
        "mixers": lambda: check_mixers(report, settings, device),
        "training": lambda: check_training(report, settings, device),
        "decode": lambda: check_decode(report, settings, device, model),
    }
    for name in names:
        section_started = time.perf_counter()
        print(f"[{time.perf_counter() - started:.0f} s] {name}", flush=True)
        try:
            result = sections[name]()
            if name == "training":
                model = result
        except Exception as error:  # one failing section must not hide the others' figures
            traceback.print_exc()
            report.add(name, "section", "ERROR", f"{type(error).__name__}: {str(error)[:300]}")
        report.add(name, "section time", f"{time.perf_counter() - section_started:.0f} s")
    if not quiet:
        print(f"\nGPU check ({time.perf_counter() - started:.0f} s): "
              + ", ".join(f"{key} {value}" for key, value in report.environment.items()))
        print(report.table())
        print(f"\nwritten: {output / 'gpu_check.md'} and {output / 'gpu_check.json'}")
    return report


if __name__ == "__main__":
    sys.exit(main())
