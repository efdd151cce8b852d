"""A KDA kernel for Fast-LLM's CPU (pure-torch) path that trains with finite gradients.

Upstream Fast-LLM's `torch_chunk_kda` (fast_llm/layers/ssm/kda.py) exponentiates the within-chunk
decay matrix exp(G_t - G_s) over the whole chunk and masks the upper triangle afterwards. Above the
diagonal G_t - G_s > 0, so with strong decays exp overflows to inf; the forward pass survives the
`masked_fill`, but the backward pass multiplies inf by a zero gradient and gives NaN.

This project's `ops.chunk_gated_delta_rule` masks before the exponential. This module adapts it
to upstream's call signature (layout [batch, seq, heads, dim], q/k L2-normalised inside the kernel,
q scaled by head_dim^-0.5, packed documents through `cu_seqlens`) and swaps it into Fast-LLM's KDA
layer. The CUDA path (flash-linear-attention's `chunk_kda`) is left alone.

The swap is scoped: `use_finite_kda_kernel()` changes the module-level function that Fast-LLM's
`KimiDeltaAttention.__init__` picks on CPU, so it affects KDA layers built afterwards. The
`supernet` trainer calls it before building its model; `fast-llm train gpt` is unaffected.
"""

from __future__ import annotations

import torch

from fast_llm_supernet.model.ops import chunk_gated_delta_rule, l2norm


def finite_torch_chunk_kda(
    q: torch.Tensor,  # [B, T, H, D]
    k: torch.Tensor,  # [B, T, H, D]
    v: torch.Tensor,  # [B, T, H, D]
    g: torch.Tensor,  # [B, T, H, D] per-channel log-decays <= 0
    beta: torch.Tensor,  # [B, T, H]
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,  # [B, H, D, D]
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,  # [documents + 1] boundaries in the (packed) sequence dim
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop-in for upstream `torch_chunk_kda`: same arguments, same outputs ([B, T, H, D], state or None)."""
    input_dtype = q.dtype
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.float()), l2norm(k.float())
    if cu_seqlens is None:
        output, state = chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, chunk_size=chunk_size
        )
        return output.to(input_dtype), state if output_final_state else None
    # Packed documents: each one starts from a zero state (upstream ignores initial_state here too).
    boundaries = cu_seqlens.tolist()
    outputs = [
        chunk_gated_delta_rule(
            q[:, start:end],
            k[:, start:end],
            v[:, start:end],
            g[:, start:end],
            beta[:, start:end],
            chunk_size=chunk_size,
        )[0]
        for start, end in zip(boundaries[:-1], boundaries[1:], strict=True)
    ]
    return torch.cat(outputs, dim=1).to(input_dtype), None


def use_finite_kda_kernel() -> bool:
    """Make Fast-LLM's KDA layers built from now on use `finite_torch_chunk_kda` on their torch path.

    Idempotent. Returns True when the kernel was swapped in by this call.
    """
    from fast_llm.engine.config_utils.run import log_main_rank
    from fast_llm.layers.ssm import kda as upstream_kda

    if upstream_kda.torch_chunk_kda is finite_torch_chunk_kda:
        return False
    upstream_kda.torch_chunk_kda = finite_torch_chunk_kda
    log_main_rank(
        "Supernet: KDA layers use the mask-before-exp torch kernel (finite gradients) on the non-fla path."
    )
    return True
