"""The serving model's matmuls through vLLM's CPU GEMM: oneDNN with the weight prepacked.

vLLM's own linear layers run `ops.onednn_mm` on CPU (vllm/model_executor/layers/utils.py:
`dispatch_cpu_unquantized_gemm`), with the weight reordered once for oneDNN after loading. The
mixers here are the reference modules, whose `nn.Linear`s run `F.linear`; on this build a bf16
`F.linear` of the few rows of a decode step costs about twice as much (hidden 512, one row: 1736
outputs 86 us against 36 us, 512 outputs 35 against 14), and matmuls are the largest part of a
decode step. So every matmul of a decode step (and of the block MLP) goes through a `PackedLinear`.

The packed copy is oneDNN's own (it does not follow later writes to the weight), so it is made in
the model's `process_weights_after_loading`, once the checkpoint is in. The original weights are then
freed, as vLLM frees its own CPU linear weights (`remove_weight=True`), so a served model cannot
reload weights in place: attention mixers and MLPs compute only through their `PackedLinear`s, and
the reference `forward` that GDN and KDA prefills run takes its stacked input projections from an
overridden `project_inputs` and its other linear layers through `route_through`. Elsewhere (GPU, a
build without oneDNN) a `PackedLinear` is `F.linear` and nothing is freed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_supernet.stacked_weights import check_still_stacked, stack_parameters


def onednn_available(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    from vllm import _custom_ops as ops

    return bool(getattr(ops, "_supports_onednn", False))


class PackedLinear:
    """y = x W^T + b for x [..., K], W [N, K]; W may be a view (a stacked weight, `stacked_weights.py`).

    Not an `nn.Module`: the weight belongs to the module that declares it (checkpoint names), this
    only computes with it. Call `pack()` after the weights are loaded."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self._onednn = None  # vLLM's handler, holding oneDNN's reordered copy of the weight

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    @classmethod
    def stacked(cls, linears: list[nn.Linear]) -> PackedLinear:
        """The layers as one matmul: their weights (and biases, zeros for a layer without) become
        views of stacked tensors (`stacked_weights.stack_parameters`), outputs side by side."""
        return cls(stack_parameters(linears), stack_parameters(linears, "bias", missing_as_zeros=True))

    @property
    def packed(self) -> bool:
        return self._onednn is not None

    def pack(self) -> None:
        if self.packed or not onednn_available(self.weight.device):
            return
        from vllm import _custom_ops as ops

        self._onednn = ops.create_onednn_mm(self.weight.detach().t(), 32)
        self.weight = None  # the owner's parameters keep (or free) the original

    def check_still_stacked(self, first_parameter: torch.Tensor, owner: str) -> None:
        """For a stacked weight not packed (yet): raise if its parameters no longer share its storage."""
        if not self.packed:
            check_still_stacked(self.weight, first_parameter, owner)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn is None:
            return F.linear(x, self.weight, self.bias)
        from vllm import _custom_ops as ops

        return ops.onednn_mm(self._onednn, x, self.bias)


def pack_and_free(module: nn.Module) -> None:
    """Pack a module's `packed_linears()`; where all of them packed (CPU with oneDNN), free the
    original weights with its `free_packed_weights()`."""
    linears = module.packed_linears()
    for linear in linears:
        linear.pack()
    if linears and all(linear.packed for linear in linears):
        module.free_packed_weights()


def free_weights(linears: list[nn.Linear]) -> None:
    """Replace the modules' weights with empty parameters (biases stay: a packed matmul adds them).
    Only for weights that nothing reads once packed."""
    for linear in linears:
        linear.weight = nn.Parameter(linear.weight.new_empty(0), requires_grad=False)


def route_through(linear: nn.Linear, packed: PackedLinear) -> None:
    """Calls of the module (`self.o_proj(x)` in a reference `forward`) run its packed copy; its weight
    is freed."""
    linear.forward = packed
    free_weights([linear])
