"""Kimi Delta Attention as a vLLM layer: the layer, its state page, its decode step.

Built from vLLM's parallel layers as vLLM's Kimi KDA layer (`model_executor/layers/mamba/gdn/
kimi_gdn_linear_attn.py`) is, with upstream Fast-LLM's checkpoint names: `q_proj`, `k_proj`,
`v_proj` and `beta_proj` load into one `MergedColumnParallelLinear` split over ranks by head; the
low-rank gate inputs `f_a_proj` and `g_a_proj` (rank = head dim) into one replicated merged linear;
their up-projections `f_b_proj` and `g_b_proj` are `ColumnParallelLinear`s; the three convolutions
are one weight (their states lie side by side in the page); `A_log` (per head) and `dt_bias` (per
head and channel) are split by head; `o_proj` is a `RowParallelLinear`.

vLLM has no CPU kernel for a per-channel decay: prefills run the reference's math
(`fast_llm_supernet.model.kda.kimi_delta_attention`), and a decode step on CPU runs the three
convolutions as one with vLLM's op and the delta rule as `ops.gated_delta_rule_step` on the pages in
place. Other devices decode with the reference on states copied out of the pages.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)

from fast_llm_supernet.model import ops
from fast_llm_supernet.model.kda import CONVOLUTIONS, kda_log_decay, kimi_delta_attention
from fast_llm_supernet.model.linear_mixer import LinearMixerCache, check_upstream_defaults
from shared_spec import KDAMixerConfig
from vllm_supernet.linear_mixer import (
    LinearMixerLayer,
    PageShapes,
    ShardedConvolution,
    SupernetGatedRMSNorm,
    divide_heads,
    head_sharded,
)


class SupernetKimiDeltaAttention(LinearMixerLayer):
    """`mixer.mixers.{NAME}` of a KDA mixer, one rank's heads."""

    conv_names = CONVOLUTIONS
    # Checkpoint name -> (parameter, shard) of the stacked weights (model.load_weights).
    stacked_params = {
        "q_proj": ("in_proj", 0),
        "k_proj": ("in_proj", 1),
        "v_proj": ("in_proj", 2),
        "beta_proj": ("in_proj", 3),
        "f_a_proj": ("low_rank_proj", 0),
        "g_a_proj": ("low_rank_proj", 1),
        "q_conv": ("qkv_conv", 0),
        "k_conv": ("qkv_conv", 1),
        "v_conv": ("qkv_conv", 2),
    }

    def __init__(self, config: KDAMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        check_upstream_defaults(config, "kda")
        self._init_pages(config, vllm_config, prefix)
        self.num_heads = config.heads // self.tp_size  # this rank's
        self.head_dim = config.head_dim
        width = config.heads * config.head_dim  # of q, k, v, the decay and the output gate, all ranks
        self.in_proj = MergedColumnParallelLinear(
            hidden_size, [width, width, width, config.heads], bias=False, prefix=f"{prefix}.in_proj"
        )
        self.low_rank_proj = MergedColumnParallelLinear(
            hidden_size, [self.head_dim, self.head_dim], bias=False, disable_tp=True, prefix=f"{prefix}.low_rank_proj"
        )
        self.f_b_proj = ColumnParallelLinear(self.head_dim, width, bias=False, prefix=f"{prefix}.f_b_proj")
        self.g_b_proj = ColumnParallelLinear(self.head_dim, width, bias=False, prefix=f"{prefix}.g_b_proj")
        self.qkv_conv = ShardedConvolution(
            [width] * 3, config.convolution_layer.kernel_size, self.tp_size, self.tp_rank
        )
        local_width = self.num_heads * self.head_dim
        self.A_log = head_sharded(nn.Parameter(torch.empty(self.num_heads), requires_grad=False))
        self.dt_bias = head_sharded(nn.Parameter(torch.empty(local_width), requires_grad=False))
        self.norm = SupernetGatedRMSNorm(self.head_dim, config.normalization.epsilon)  # per head: same on every rank
        self.o_proj = RowParallelLinear(width, hidden_size, bias=False, input_is_parallel=True, prefix=f"{prefix}.o_proj")
        self.input_sizes = [local_width, local_width, local_width, self.num_heads]
        self.decodes_on_pages = vllm_config.device_config.device_type == "cpu"  # vLLM's CPU conv op

    @staticmethod
    def conv_blocks(config: KDAMixerConfig, tp_size: int) -> list[tuple[int, int]]:
        """One rank's (heads, head dim) of q, k and v, the convolutions' channels in page order."""
        return [(config.heads // tp_size, config.head_dim)] * 3

    @staticmethod
    def page_shapes(config: KDAMixerConfig, tp_size: int, where: str) -> PageShapes:
        """One rank's (conv states of q|k|v, delta-rule state [H, D, D])."""
        heads = divide_heads(config.heads, tp_size, "kda heads", where)
        kernel_size = config.convolution_layer.kernel_size
        return (3 * heads * config.head_dim, kernel_size - 1), (heads, config.head_dim, config.head_dim)

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., D] -> q, k, v before their convolutions [..., H*Dh], beta logits [..., H] (this rank's
        heads), and the low-rank decay and output-gate inputs [..., Dh]."""
        projected, _ = self.in_proj(hidden_states)
        low_rank, _ = self.low_rank_proj(hidden_states)
        return (*projected.split(self.input_sizes, dim=-1), *low_rank.chunk(2, dim=-1))

    def project_output(self, out: torch.Tensor, gate_low: torch.Tensor) -> torch.Tensor:
        """Delta-rule output [..., H, Dh], output-gate input [..., Dh] -> [..., D] (summed over ranks)."""
        gate, _ = self.g_b_proj(gate_low)
        normed = self.norm(out.to(gate.dtype), gate.unflatten(-1, (self.num_heads, self.head_dim)))
        output, _ = self.o_proj(normed.flatten(-2))
        return output

    def forward_sequence(self, hidden_states: torch.Tensor, cache: LinearMixerCache) -> torch.Tensor:
        query, key, value, beta_logits, decay_low, gate_low = self.project_inputs(hidden_states)
        decay_logits, _ = self.f_b_proj(decay_low)
        out = kimi_delta_attention(
            query,
            key,
            value,
            decay_logits,
            beta_logits,
            self.qkv_conv.blocks(),
            self.A_log,
            self.dt_bias,
            self.num_heads,
            self.head_dim,
            cache,
        )
        return self.project_output(out, gate_low)

    @property
    def conv_weight(self) -> torch.Tensor:
        return self.qkv_conv.weight  # the three convolutions as one: their weights and states lie side by side

    def decode_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """[B, D] -> q|k|v before their convolutions [B, 3 H Dh], (log decay [B, H, Dh], beta [B, H], output-gate
        input [B, Dh])."""
        heads, head_dim = self.num_heads, self.head_dim
        state_dtype = ops.compute_dtype(hidden_states.dtype)
        projected, _ = self.in_proj(hidden_states)
        qkv, beta_logits = projected.split([3 * heads * head_dim, heads], dim=-1)
        low_rank, _ = self.low_rank_proj(hidden_states)
        decay_low, gate_low = low_rank.chunk(2, dim=-1)
        decay_logits, _ = self.f_b_proj(decay_low)
        log_decay = kda_log_decay(decay_logits, self.A_log, self.dt_bias, heads, head_dim)  # [B, H, Dh]
        return qkv, (log_decay, beta_logits.to(state_dtype).sigmoid(), gate_low)

    def delta_rule_step(self, qkv: torch.Tensor, heads: slice, rest: tuple, recurrent_pages: torch.Tensor,
                        slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """q|k|v of heads `heads` after their convolutions [B, 3 H' Dh] -> [B, H', Dh], the states of pages `slots`
        updated in place."""
        log_decay, beta, _ = rest
        batch_size, state_dtype = qkv.shape[0], beta.dtype
        query_key, value = qkv.view(batch_size, 3, heads.stop - heads.start, self.head_dim).split([2, 1], dim=1)
        query, key = ops.l2norm(query_key).to(state_dtype).unbind(1)  # [B, H', Dh] each
        # (index_select / index_copy_: several times cheaper than pages[slots] on CPU.)
        state = recurrent_pages.index_select(0, slots).to(state_dtype)  # [B, H', Dh, Dh]
        out = ops.gated_delta_rule_step(query, key, value[:, 0].to(state_dtype), log_decay[:, heads], beta[:, heads],
                                        state, self.head_dim**-0.5)  # fmt: skip
        recurrent_pages.index_copy_(0, slots, state.to(recurrent_pages.dtype))
        return out.to(qkv.dtype)

    def decode_output(self, out: torch.Tensor, rest: tuple) -> torch.Tensor:
        return self.project_output(out, rest[2])
