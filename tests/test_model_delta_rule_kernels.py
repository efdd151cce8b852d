"""The delta-rule kernel choice, on CPU: flash-linear-attention is stood in by a module that computes its forward
with the torch kernels and whose backward raises fla's Hopper error, is wrong, or is right."""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from fast_llm_supernet.model import delta_rule_kernels, ops

# fla 0.6.0's words on Hopper with Triton 3.6 (fla/ops/common/chunk_o.py).
HOPPER_ERROR = (
    "Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated chunk_bwd_dqkwg (see #640). "
    "Please upgrade Triton to >= 3.7.1 or install tilelang: `pip install tilelang`"
)


def _stand_in_fla(backward: str, calls: list[str]) -> dict[str, ModuleType]:
    """Modules `fla`, `fla.ops`, `fla.ops.gated_delta_rule`, `fla.ops.kda` with fla's kernel names and keywords.

    The forward is the torch chunked kernel; `backward` is "raises" (fla's Hopper RuntimeError), "wrong"
    (gradients halved) or "right" (the torch kernel's gradients)."""

    class Chunk(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, g, beta, initial_state):
            ctx.save_for_backward(q, k, v, g, beta)
            with torch.no_grad():
                return ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state)

        @staticmethod
        def backward(ctx, grad_out, grad_state):
            if backward == "raises":
                raise RuntimeError(HOPPER_ERROR)
            leaves = [x.detach().requires_grad_() for x in ctx.saved_tensors]
            with torch.enable_grad():
                out, _ = ops.chunk_gated_delta_rule(*leaves)
            grads = torch.autograd.grad(out, leaves, grad_out)
            factor = 0.5 if backward == "wrong" else 1.0
            return (*(factor * grad for grad in grads), None)

    def chunk(name):
        def kernel(q, k, v, g, beta, initial_state=None, output_final_state=False):
            calls.append(name)
            out, state = Chunk.apply(q, k, v, g, beta, initial_state)
            return out, state if output_final_state else None

        return kernel

    def recurrent(name):
        def kernel(q, k, v, g, beta, initial_state=None, output_final_state=False):
            calls.append(name)
            out, state = ops.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state)
            return out, state if output_final_state else None

        return kernel

    fla, fla_ops, gdn, kda = (ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.gated_delta_rule", "fla.ops.kda"))
    fla.ops, fla_ops.gated_delta_rule, fla_ops.kda = fla_ops, gdn, kda
    gdn.chunk_gated_delta_rule = chunk("gdn_chunk")
    gdn.fused_recurrent_gated_delta_rule = recurrent("gdn_recurrent")
    kda.chunk_kda = chunk("kda_chunk")
    kda.fused_recurrent_kda = recurrent("kda_recurrent")
    return {module.__name__: module for module in (fla, fla_ops, gdn, kda)}


@pytest.fixture
def stand_in_fla(monkeypatch):
    """Install a stand-in fla for CPU tensors; returns install(backward) -> the list of kernel calls."""

    def install(backward: str) -> list[str]:
        calls: list[str] = []
        for name, module in _stand_in_fla(backward, calls).items():
            monkeypatch.setitem(sys.modules, name, module)
        delta_rule_kernels.fla_ops.cache_clear()
        return calls

    monkeypatch.setattr(delta_rule_kernels, "FLA_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(delta_rule_kernels, "_backward", {})
    monkeypatch.delenv(delta_rule_kernels.DISABLE_FLA_ENV, raising=False)
    yield install
    delta_rule_kernels.fla_ops.cache_clear()


def _inputs(per_channel: bool, requires_grad: bool = True):
    torch.manual_seed(0)
    batch, length, heads, dim = 2, 70, 2, 8
    q = ops.l2norm(torch.randn(batch, length, heads, dim))
    k = ops.l2norm(torch.randn(batch, length, heads, dim))
    v = torch.randn(batch, length, heads, dim)
    g = F.logsigmoid(torch.randn(batch, length, heads, *((dim,) if per_channel else ())) + 2)
    beta = torch.rand(batch, length, heads)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta)]


def _outputs_and_grads(kernel, leaves):
    out, _ = kernel(*leaves)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out, grads


def _warnings(caplog):
    return [record for record in caplog.records if record.name == delta_rule_kernels.__name__ and record.levelno >= logging.WARNING]


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("backward", ["raises", "wrong"])
def test_a_failing_fla_backward_trains_on_the_torch_kernels(stand_in_fla, caplog, per_channel, backward):
    calls = stand_in_fla(backward)
    leaves = _inputs(per_channel)
    with caplog.at_level(logging.INFO, logger=delta_rule_kernels.__name__):
        out, grads = _outputs_and_grads(delta_rule_kernels.gated_delta_rule, leaves)
        again = _outputs_and_grads(delta_rule_kernels.gated_delta_rule, leaves)  # decided once: no second warning
    expected_out, expected_grads = _outputs_and_grads(ops.chunk_gated_delta_rule, leaves)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for grad, expected, repeated in zip(grads, expected_grads, again[1], strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)
        torch.testing.assert_close(repeated, expected, rtol=0, atol=0)

    warnings = _warnings(caplog)
    assert len(warnings) == 1, [record.getMessage() for record in warnings]
    message = warnings[0].getMessage()
    assert "torch " in message and "Triton " in message and "fla " in message  # the versions
    assert "Triton >= 3.7.1" in message and "tilelang" in message  # the fix
    if backward == "raises":
        assert "3.4.0 and < 3.7.1" in message  # fla's own words
    else:
        assert "differ" in message
    # The check ran fla's kernel for this kind only; training itself never called it.
    assert calls == ["kda_chunk" if per_channel else "gdn_chunk"]
    choice = delta_rule_kernels.kernel_choice("cpu")  # now the other kind is checked too
    assert choice.forward == "fla" and choice.backward == {"gdn": "torch", "kda": "torch"}
    assert sorted(calls) == ["gdn_chunk", "kda_chunk"]


def test_one_warning_for_the_kinds_asked_for_together(stand_in_fla, caplog):
    stand_in_fla("raises")
    with caplog.at_level(logging.INFO, logger=delta_rule_kernels.__name__):
        choice = delta_rule_kernels.kernel_choice("cpu", ("gdn", "kda"))  # what the trainer does before step 1
        delta_rule_kernels.kernel_choice("cpu", ("gdn",))
    assert len(_warnings(caplog)) == 1 and "gdn, kda" in _warnings(caplog)[0].getMessage()
    assert "fla's gdn, kda backward: RuntimeError" in choice.describe()  # one clause for a shared reason


def test_inference_keeps_fla_when_its_backward_fails(stand_in_fla):
    calls = stand_in_fla("raises")
    with torch.no_grad():
        delta_rule_kernels.gated_delta_rule(*_inputs(per_channel=True, requires_grad=False))
        delta_rule_kernels.gated_delta_rule(*_inputs(per_channel=False, requires_grad=False), recurrent=True)
    assert calls == ["kda_chunk", "gdn_recurrent"]  # and no backward check: nothing needed it


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_a_correct_fla_backward_trains_on_fla(stand_in_fla, caplog, per_channel):
    calls = stand_in_fla("right")
    leaves = _inputs(per_channel)
    with caplog.at_level(logging.INFO, logger=delta_rule_kernels.__name__):
        out, grads = _outputs_and_grads(delta_rule_kernels.gated_delta_rule, leaves)
    assert not _warnings(caplog)
    kernel = "kda_chunk" if per_channel else "gdn_chunk"
    assert calls == [kernel, kernel]  # the check, then the step itself on fla
    assert delta_rule_kernels.kernel_choice("cpu").backward == {"gdn": "fla", "kda": "fla"}
    expected_out, expected_grads = _outputs_and_grads(ops.chunk_gated_delta_rule, leaves)
    torch.testing.assert_close(out, expected_out)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)


def test_the_setting_sends_everything_to_the_torch_kernels(stand_in_fla, monkeypatch):
    calls = stand_in_fla("right")
    monkeypatch.setenv(delta_rule_kernels.DISABLE_FLA_ENV, "1")
    with torch.no_grad():
        delta_rule_kernels.gated_delta_rule(*_inputs(per_channel=False, requires_grad=False))
    assert calls == []
    choice = delta_rule_kernels.kernel_choice("cpu")
    assert choice.forward == "torch" and "SUPERNET_DISABLE_FLA" in choice.describe()


def test_without_fla_the_choice_is_the_torch_kernels():
    choice = delta_rule_kernels.kernel_choice("cpu")
    assert choice.forward == "torch" and set(choice.backward.values()) == {"torch"}


def test_the_torch_kernels_keep_float32_under_autocast():
    leaves = [x.detach().to(torch.bfloat16) if i < 3 else x.detach() for i, x in enumerate(_inputs(per_channel=True))]
    expected, _ = ops.chunk_gated_delta_rule(*leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = delta_rule_kernels.gated_delta_rule(*leaves)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("capability", "triton", "tilelang", "bad"),
    [
        ((9, 0), "3.6.0", False, True),  # H100 / H200 with torch 2.11's Triton
        ((9, 0), "3.4.0", False, True),
        ((9, 0), "3.7.0+git1234", False, True),
        ((9, 0), "3.7.1", False, False),  # torch 2.13's Triton
        ((9, 0), "3.3.1", False, False),
        ((9, 0), "3.6.0", True, False),  # fla's tilelang kernels take over
        ((8, 0), "3.6.0", False, False),  # A100
        ((10, 0), "3.6.0", False, False),  # Blackwell: not the Hopper regression
    ],
)
def test_the_known_bad_combination(capability, triton, tilelang, bad):
    reason = delta_rule_kernels.known_bad_backward(capability, triton, tilelang)
    assert (reason is not None) == bad
    if bad:
        assert triton in reason and "#640" in reason
