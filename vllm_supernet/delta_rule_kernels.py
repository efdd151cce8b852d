"""Decode steps of the linear mixers on CPU: one token of each of B requests, on vLLM's state pages
in place. A decode step of one request costs mostly fixed per-operation time on this build, and a
batch that mixes placements calls each mixer once per layer, so these steps are written for few
operations: stacked input projections (one matmul, `stacked_weights.py`) through oneDNN
(`packed_linear.py`), vLLM's CPU ops where one applies, index_select / index_copy_ on the pages
(several times cheaper than `pages[slots]`). `GDNDecodeWeights` / `KDADecodeWeights` hold what a step
multiplies by, built from the mixer's own parameters.

* `gdn_decode_cpu` (bfloat16 models): between the mixer's own projections and output norm, vLLM's
  `causal_conv1d_update_cpu_vec` and `fused_sigmoid_gating_delta_rule_update_cpu`
  (vllm/_custom_ops.py, the ops vLLM's Qwen3.5 GDN decodes with on CPU). The latter computes the
  gates from the raw projections exactly as the reference does (g = -exp(A_log) * softplus(alpha +
  dt_bias), beta = sigmoid(b)), L2-normalises q and k, maps value head h to key head h // (Hv / Hk)
  and updates each request's [Hv, Dk, Dv] state where it lies in the page pool. It takes bfloat16
  only: float32 GDN models (the upstream fixture's tests) run the reference.
* `kda_decode_cpu`: vLLM has no CPU kernel for a per-channel decay. The three convolutions run as
  one (their states lie side by side in the page) and the delta rule as `ops.gated_delta_rule_step`.

The reference for both is the mixer's own `forward` on a cache copied out of the pages (what
`_LinearMixerLayer` runs for everything these steps do not take), i.e. `ops.causal_conv1d` and
`ops.recurrent_gated_delta_rule` for one token; tests/test_decode_steps.py checks them against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fast_llm_supernet.model import ops
from fast_llm_supernet.model.gdn import GatedDeltaNet
from fast_llm_supernet.model.kda import KimiDeltaAttention
from fast_llm_supernet.model.ops import gated_delta_rule_step
from vllm_supernet.norms import gated_rms_norm
from vllm_supernet.packed_linear import PackedLinear, free_weights, route_through
from vllm_supernet.stacked_weights import stack_parameters


@dataclass
class GDNDecodeWeights:
    """input: in_proj_qkvz|in_proj_ba as one matmul (the mixer's parameters become views of it);
    input_sizes: how its output splits into what the mixer's `project_inputs` returns."""

    input: PackedLinear
    output: PackedLinear
    input_sizes: list[int]

    @classmethod
    def stack(cls, mixer: GatedDeltaNet) -> GDNDecodeWeights:
        heads = mixer.num_value_heads
        return cls(
            input=PackedLinear.stacked([mixer.in_proj_qkvz, mixer.in_proj_ba]),
            output=PackedLinear.of(mixer.out_proj),
            input_sizes=[mixer.conv_dim, mixer.value_dim, heads, heads],  # Q|K|V, Z, beta logits, alpha
        )

    def linears(self) -> list[PackedLinear]:
        return [self.input, self.output]

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.input(hidden_states).split(self.input_sizes, dim=-1)

    def free_originals(self, mixer: GatedDeltaNet) -> None:
        """Once packed: the projections then run only through these (`project_inputs` among them)."""
        free_weights([mixer.in_proj_qkvz, mixer.in_proj_ba])
        route_through(mixer.out_proj, self.output)


@dataclass
class KDADecodeWeights:
    """input: q|k|v|f_a|g_a|beta projections as one matmul [3HDh + 2Dh + H, D]; conv: the q|k|v
    convolution weights [3HDh, 1, K] (the page's conv-state layout); decay, gate: the f_b and g_b
    up-projections of the low-rank decay and output gate."""

    input: PackedLinear
    decay: PackedLinear
    gate: PackedLinear
    output: PackedLinear
    conv: torch.Tensor
    input_sizes: list[int]  # q, k, v, f_a, g_a, beta: what the mixer's `project_inputs` returns

    @classmethod
    def stack(cls, mixer: KimiDeltaAttention) -> KDADecodeWeights:
        inputs = mixer.input_projections()
        return cls(
            input=PackedLinear.stacked(inputs),
            decay=PackedLinear.of(mixer.f_b_proj),
            gate=PackedLinear.of(mixer.g_b_proj),
            output=PackedLinear.of(mixer.o_proj),
            conv=stack_parameters([mixer.q_conv, mixer.k_conv, mixer.v_conv]),
            input_sizes=[linear.out_features for linear in inputs],
        )

    def linears(self) -> list[PackedLinear]:
        return [self.input, self.decay, self.gate, self.output]

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.input(hidden_states).split(self.input_sizes, dim=-1)

    def free_originals(self, mixer: KimiDeltaAttention) -> None:
        """Once packed: the projections then run only through these (`project_inputs` among them)."""
        free_weights(mixer.input_projections())
        route_through(mixer.f_b_proj, self.decay)
        route_through(mixer.g_b_proj, self.gate)
        route_through(mixer.o_proj, self.output)


def uses_gdn_cpu_kernel(dtype: torch.dtype, device_type: str) -> bool:
    return device_type == "cpu" and dtype == torch.bfloat16


def gdn_decode_cpu(
    mixer: GatedDeltaNet,
    weights: GDNDecodeWeights,
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

    batch_size, dtype = hidden_states.shape[0], hidden_states.dtype
    value_heads = mixer.num_value_heads
    qkv, z, beta_logits, alpha = weights.project_inputs(hidden_states)
    qkv = convolution_step(qkv, mixer.convolution.weight, conv_pages, slots)
    # The kernel reads a flat token dimension: [1, B, heads, dim], one token per request.
    query, key, value = (x.contiguous() for x in mixer.split_heads(qkv[None]))
    out = ops.fused_sigmoid_gating_delta_rule_update_cpu(
        A_log=mixer.A_log.float(),
        dt_bias=mixer.dt_bias.to(dtype),
        q=query,
        k=key,
        v=value,
        a=alpha.contiguous(),
        b=beta_logits.contiguous(),
        initial_state_source=recurrent_pages,
        initial_state_indices=slots.to(torch.int32),
        cu_seqlens=torch.arange(batch_size + 1, dtype=torch.int32),
        use_qk_l2norm_in_kernel=True,
    )  # [B, 1, Hv, Dv]
    output_gate = z.view(batch_size, value_heads, mixer.value_head_dim)
    normed = gated_rms_norm(out[:, 0], output_gate, mixer.norm.weight, mixer.norm.eps)
    return weights.output(normed.flatten(-2))


def convolution_step(
    x: torch.Tensor, weight: torch.Tensor, conv_pages: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """One token of the causal depthwise convolution + SiLU for each of B requests, with vLLM's CPU op
    (`causal_conv1d_update_cpu_vec`, its Qwen3.5 GDN decode path on CPU); the states in `conv_pages`
    are updated in place.

    x [B, C], weight [C, 1, K], conv_pages [num_slots, C, K-1], slots [B] -> y [B, C].
    The reference is `ops.causal_conv1d` for T = 1 (float32: equal within 5e-7).
    """
    from vllm import _custom_ops as ops

    channels, _, kernel_size = weight.shape
    return ops.causal_conv1d_update_cpu_vec(
        x, conv_pages, weight.view(channels, kernel_size), None, "silu", slots, None, -1
    )


def kda_decode_cpu(
    mixer: KimiDeltaAttention,
    weights: KDADecodeWeights,
    hidden_states: torch.Tensor,
    conv_pages: torch.Tensor,
    recurrent_pages: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """hidden_states [B, D]: one new token of each request -> [B, D].

    conv_pages [num_slots, 3HDh, K-1] (q|k|v, the page layout), recurrent_pages
    [num_slots, H, Dh, Dh]; slots [B] the requests' pages (both updated in place).
    """
    batch_size, dtype = hidden_states.shape[0], hidden_states.dtype
    heads, head_dim = mixer.num_heads, mixer.head_dim
    state_dtype = ops.compute_dtype(dtype)
    # The stacked projections' layout: q|k|v (kept together for the one conv), f_a, g_a, beta.
    q_size, k_size, v_size, *rest = weights.input_sizes
    projected = weights.input(hidden_states)
    qkv, decay_low, gate_low, beta_logits = projected.split([q_size + k_size + v_size, *rest], dim=-1)

    # The three convolutions as one: their states lie side by side in the page.
    qkv = convolution_step(qkv, weights.conv, conv_pages, slots)
    query_key, value = qkv.view(batch_size, 3, heads, head_dim).split([2, 1], dim=1)
    query, key = ops.l2norm(query_key).to(state_dtype).unbind(1)  # [B, H, Dh] each

    # Log-decay per head and channel, and beta, as the reference computes them.
    gate_logits = weights.decay(decay_low).view(batch_size, heads, head_dim)
    log_decay = -mixer.A_log.to(state_dtype).exp().unsqueeze(-1) * F.softplus(
        gate_logits.to(state_dtype) + mixer.dt_bias.view(heads, head_dim)
    )
    beta = beta_logits.to(state_dtype).sigmoid()

    # (index_select / index_copy_: several times cheaper than pages[slots] on CPU.)
    state = recurrent_pages.index_select(0, slots).to(state_dtype)  # [B, H, Dh, Dh]
    out = gated_delta_rule_step(
        query, key, value[:, 0].to(state_dtype), log_decay, beta, state, head_dim**-0.5
    )
    recurrent_pages.index_copy_(0, slots, state.to(recurrent_pages.dtype))

    output_gate = weights.gate(gate_low).view(batch_size, heads, head_dim)
    normed = gated_rms_norm(out.to(dtype), output_gate, mixer.norm.weight, mixer.norm.eps)
    return weights.output(normed.flatten(-2))
