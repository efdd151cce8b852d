"""The GDN decode step with vLLM's CPU kernel, on vLLM's state pages in place.

`gdn_decode_cpu` runs one token for each of a batch of requests: the mixer's own projections,
convolution and output norm (`fast_llm_supernet.mixers.gdn.GatedDeltaNet`), and between them vLLM's
`fused_sigmoid_gating_delta_rule_update_cpu` (vllm/_custom_ops.py, the op vLLM's Qwen3.5 GDN decodes
with on CPU), which computes the gates from the raw projections exactly as the reference does
(g = -exp(A_log) * softplus(alpha + dt_bias), beta = sigmoid(b)), L2-normalises q and k, maps value
head h to key head h // (Hv / Hk), and updates each request's [Hv, Dk, Dv] state where it lies in
the page pool. The reference for it is the mixer's `forward` on a cache copied out of the pages
(what `_LinearMixerLayer` does for everything this kernel does not take).

The kernel takes bfloat16 activations only; float32 models (the upstream fixture's tests) and KDA
(per-channel decay: no vLLM CPU kernel) run the reference.
"""

from __future__ import annotations

import torch

from fast_llm_supernet.mixers.gdn import GatedDeltaNet


def uses_gdn_cpu_kernel(dtype: torch.dtype, device_type: str) -> bool:
    return device_type == "cpu" and dtype == torch.bfloat16


def gdn_decode_cpu(
    mixer: GatedDeltaNet,
    hidden_states: torch.Tensor,
    conv_pages: torch.Tensor,
    recurrent_pages: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """hidden_states [B, D]: one new token of each request -> [B, D].

    conv_pages [num_slots, conv_dim, K-1], recurrent_pages [num_slots, Hv, Dk, Dv]; slots [B] the
    requests' pages (both updated in place).
    """
    from vllm import _custom_ops as ops

    batch_size = hidden_states.shape[0]
    qkv, z, beta_logits, alpha = mixer.project_inputs(hidden_states[:, None])  # [B, 1, ...]
    qkv, conv_state = mixer.convolution(qkv, conv_pages[slots].to(qkv.dtype))
    conv_pages[slots] = conv_state.to(conv_pages.dtype)
    # The kernel reads a flat token dimension: [1, B, heads, dim], one token per request.
    query, key, value = (x.transpose(0, 1).contiguous() for x in mixer.split_heads(qkv))
    out = ops.fused_sigmoid_gating_delta_rule_update_cpu(
        A_log=mixer.A_log.float(),
        dt_bias=mixer.dt_bias.to(qkv.dtype),
        q=query,
        k=key,
        v=value,
        a=alpha[:, 0].contiguous(),
        b=beta_logits[:, 0].contiguous(),
        initial_state_source=recurrent_pages,
        initial_state_indices=slots.to(torch.int32),
        cu_seqlens=torch.arange(batch_size + 1, dtype=torch.int32),
        use_qk_l2norm_in_kernel=True,
    )  # [B, 1, Hv, Dv]
    return mixer.project_output(out, z)[:, 0]
