"""RMS norms of the serving model with vLLM's rms_norm op on CPU (`torch.ops._C.rms_norm`, the op
vLLM's own `RMSNorm` layer runs there).

On a decode step's few rows `torch.rms_norm` costs ~40 us here, the op ~10 us, and a step runs two
norms per layer plus one per GDN/KDA call. The references are `fast_llm_supernet.model.supernet.RMSNorm` and
`ops.gated_rms_norm`; the op computes in float32 like them but, as vLLM's Llama does, rounds
the normalised value to the model dtype before the weight multiplies it, so bf16 results differ
from the reference's in the last bit (float32: within 5e-7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fast_llm_supernet.model.supernet import RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim; x [..., D] of weight's dtype, any leading shape."""
    from vllm import _custom_ops as ops

    rows = x.reshape(-1, x.shape[-1]).contiguous()
    normed = torch.empty_like(rows)
    ops.rms_norm(normed, rows, weight, eps)
    return normed.view(x.shape)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate) over the last dim (the head dim), as `ops.gated_rms_norm`."""
    return rms_norm(x.to(weight.dtype), weight, eps) * F.silu(gate)


class VllmRMSNorm(RMSNorm):
    """The reference `RMSNorm` (same `weight` parameter) that runs vLLM's op on CPU."""

    def __init__(self, hidden_size: int, eps: float, device_type: str):
        super().__init__(hidden_size, eps)
        self.uses_op = device_type == "cpu"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.uses_op or hidden_states.dtype != self.weight.dtype:
            return super().forward(hidden_states)
        return rms_norm(hidden_states, self.weight, self.eps)
