"""Gated DeltaNet as a vLLM layer: the layer, its state page, its decode step.

Built from vLLM's parallel layers as vLLM's own GDN layer (`model_executor/layers/mamba/gdn/
qwen_gdn_linear_attn.py`) is, with upstream Fast-LLM's checkpoint layout: `in_proj_qkvz` (flat
Q|K|V|Z) and `in_proj_ba` (beta logits | alpha) load into one `MergedColumnParallelLinear` whose six
blocks are each split over ranks by head; the convolution over Q|K|V, `A_log` and `dt_bias` are split
the same way; `out_proj` is a `RowParallelLinear`. Value head h reads key head h // (Hv / Hk), so a
rank's value heads read only its own key heads.

The math between the projections and the output norm is the reference's
(`fast_llm_supernet.model.gdn.gated_delta_net`) for prefills, and on CPU in bfloat16 a decode step
runs vLLM's CPU kernels on the pages in place (`causal_conv1d_update_cpu_vec`,
`fused_sigmoid_gating_delta_rule_update_cpu`: the ops vLLM's Qwen3.5 GDN decodes with on CPU; the
latter computes the gates exactly as the reference, g = -exp(A_log) * softplus(alpha + dt_bias),
beta = sigmoid(b), L2-normalises q and k, and takes bfloat16 only). Float32 models and other devices
decode with the reference on states copied out of the pages.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

from fast_llm_supernet.model.gdn import GDNHeads, gated_delta_net
from fast_llm_supernet.model.linear_mixer import (
    DEFAULT_NORM_EPSILON,
    LinearMixerCache,
    check_upstream_defaults,
)
from shared_spec import GDNMixerConfig
from vllm_supernet.linear_mixer import (
    LinearMixerLayer,
    PageShapes,
    ShardedConvolution,
    SupernetGatedRMSNorm,
    divide_heads,
    head_sharded,
)


class SupernetGatedDeltaNet(LinearMixerLayer):
    """`mixer.mixers.{NAME}` of a GDN mixer, one rank's heads."""

    conv_names = ("convolution",)
    # Checkpoint name -> (parameter, shards) of the stacked input projection (model.load_weights).
    stacked_params = {"in_proj_qkvz": ("in_proj", (0, 1, 2, 3)), "in_proj_ba": ("in_proj", (4, 5))}

    def __init__(self, config: GDNMixerConfig, hidden_size: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        check_upstream_defaults(config, "gdn")
        self._init_pages(config, vllm_config, prefix)
        self.heads = GDNHeads(  # this rank's
            key_heads=config.key_heads // self.tp_size,
            key_head_dim=config.key_head_dim,
            value_heads=config.value_heads // self.tp_size,
            value_head_dim=config.value_head_dim,
        )
        key_dim = config.key_heads * config.key_head_dim
        value_dim = config.value_heads * config.value_head_dim
        self.in_proj = MergedColumnParallelLinear(
            hidden_size,
            [key_dim, key_dim, value_dim, value_dim, config.value_heads, config.value_heads],
            bias=False,
            prefix=f"{prefix}.in_proj",
        )
        heads = self.heads
        self.input_sizes = [heads.conv_dim, heads.value_dim, heads.value_heads, heads.value_heads]
        self.convolution = ShardedConvolution(
            [key_dim, key_dim, value_dim], config.convolution_layer.kernel_size, self.tp_size, self.tp_rank
        )
        self.A_log = head_sharded(nn.Parameter(torch.empty(heads.value_heads), requires_grad=False))
        self.dt_bias = head_sharded(nn.Parameter(torch.empty(heads.value_heads), requires_grad=False))
        eps = config.normalization.epsilon if config.normalization is not None else DEFAULT_NORM_EPSILON
        self.norm = SupernetGatedRMSNorm(config.value_head_dim, eps)  # per head: the same on every rank
        self.out_proj = RowParallelLinear(
            value_dim, hidden_size, bias=False, input_is_parallel=True, prefix=f"{prefix}.out_proj"
        )
        # vLLM's CPU GDN kernel takes bfloat16 only.
        self.decodes_on_pages = (
            vllm_config.device_config.device_type == "cpu" and vllm_config.model_config.dtype == torch.bfloat16
        )

    @staticmethod
    def conv_blocks(config: GDNMixerConfig, tp_size: int) -> list[tuple[int, int]]:
        """One rank's (heads, head dim) of Q, K and V, the convolution's channels in page order."""
        key_heads, value_heads = config.key_heads // tp_size, config.value_heads // tp_size
        return [(key_heads, config.key_head_dim)] * 2 + [(value_heads, config.value_head_dim)]

    @staticmethod
    def page_shapes(config: GDNMixerConfig, tp_size: int, where: str) -> PageShapes:
        """One rank's (conv state over Q|K|V, delta-rule state [Hv, Dk, Dv])."""
        divide_heads(config.key_heads, tp_size, "gdn key_heads", where)
        value_heads = divide_heads(config.value_heads, tp_size, "gdn value_heads", where)
        conv_channels = sum(heads * dim for heads, dim in SupernetGatedDeltaNet.conv_blocks(config, tp_size))
        kernel_size = config.convolution_layer.kernel_size
        return (conv_channels, kernel_size - 1), (value_heads, config.key_head_dim, config.value_head_dim)

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., D] -> Q|K|V before the convolution [..., conv_dim], Z [..., value_dim], beta logits and
        alpha [..., Hv] (this rank's heads)."""
        projected, _ = self.in_proj(hidden_states)
        return projected.split(self.input_sizes, dim=-1)

    def project_output(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Delta-rule output [..., Hv, Dv], Z [..., value_dim] -> [..., D] (summed over ranks)."""
        normed = self.norm(out, z.unflatten(-1, (self.heads.value_heads, self.heads.value_head_dim)))
        output, _ = self.out_proj(normed.flatten(-2))
        return output

    def forward_sequence(self, hidden_states: torch.Tensor, cache: LinearMixerCache) -> torch.Tensor:
        qkv, z, beta_logits, alpha = self.project_inputs(hidden_states)
        out = gated_delta_net(
            qkv, beta_logits, alpha, self.convolution.weight, self.A_log, self.dt_bias, self.heads, cache
        )
        return self.project_output(out, z)

    @property
    def conv_weight(self) -> torch.Tensor:
        return self.convolution.weight

    def decode_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """[B, D] -> Q|K|V before the convolution [B, conv_dim], (Z, beta logits, alpha)."""
        qkv, z, beta_logits, alpha = self.project_inputs(hidden_states)
        return qkv, (z, beta_logits, alpha)

    def delta_rule_step(self, qkv: torch.Tensor, heads: slice, rest: tuple, recurrent_pages: torch.Tensor,
                        slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Q|K|V of value heads `heads` and their key heads [B, C'] -> [B, heads, Dv], with vLLM's CPU kernel on
        the pages in place."""
        from vllm import _custom_ops as vllm_ops

        _, beta_logits, alpha = rest
        batch_size, dims = qkv.shape[0], self.heads
        value_heads = heads.stop - heads.start
        key_heads = max(value_heads * dims.key_heads // dims.value_heads, 1)  # fewer value heads than a key head has: 1
        query, key, value = qkv.split([key_heads * dims.key_head_dim] * 2 + [value_heads * dims.value_head_dim], dim=-1)
        # The kernel reads a flat token dimension: [1, B, heads, dim], one token per request.
        out = vllm_ops.fused_sigmoid_gating_delta_rule_update_cpu(
            A_log=self.A_log[heads].float(),
            dt_bias=self.dt_bias[heads].to(qkv.dtype),
            q=query.reshape(1, batch_size, key_heads, dims.key_head_dim).contiguous(),
            k=key.reshape(1, batch_size, key_heads, dims.key_head_dim).contiguous(),
            v=value.reshape(1, batch_size, value_heads, dims.value_head_dim).contiguous(),
            a=alpha[:, heads].contiguous(),
            b=beta_logits[:, heads].contiguous(),
            initial_state_source=recurrent_pages,
            initial_state_indices=slots.to(torch.int32),
            cu_seqlens=torch.arange(batch_size + 1, dtype=torch.int32),
            use_qk_l2norm_in_kernel=True,
        )  # [B, 1, heads, Dv]
        return out[:, 0]

    def decode_output(self, out: torch.Tensor, rest: tuple) -> torch.Tensor:
        return self.project_output(out, rest[0])
