"""`fast_llm_supernet.model.gdn`: Gated DeltaNet, as upstream Fast-LLM defines it (`fast_llm/layers/ssm/gdn.py`).

x -> in_proj_qkvz -> Q|K|V (flat, all heads of Q, then K, then V) and Z (output gate)
  -> in_proj_ba  -> beta logits | alpha (one of each per value head)
Q|K|V -> causal depthwise conv + SiLU -> q, k [key heads], v [value heads]
q, k repeated to the value heads with repeat_interleave (value head h reads key head h // ratio)
q, k L2-normalised (eps 1e-6), q scaled by Dk^-0.5 (in the kernel)
g = -exp(A_log) * softplus(alpha + dt_bias)   (scalar log-decay per value head)
beta = sigmoid(b)
o = gated delta rule; out_proj(rmsnorm(o) * norm.weight * silu(Z))

`gated_delta_net` is the math between the input projections and the output norm, on plain tensors and
a head count (`GDNHeads`): `GatedDeltaNet.forward` calls it, and so can a serving plugin with its own
projections and per-rank (tensor-parallel) head counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fast_llm_supernet.model.linear_mixer import (
    DEFAULT_NORM_EPSILON,
    CausalConv1d,
    GatedRMSNorm,
    LinearMixerCache,
    check_upstream_defaults,
    decay_rate_parameters,
    run_delta_rule,
)
from fast_llm_supernet.model.ops import causal_conv1d, compute_dtype
from shared_spec import GDNMixerConfig

CONVOLUTION = "convolution"  # the cache's name of the Q|K|V convolution state


@dataclass(frozen=True)
class GDNHeads:
    """Head counts and sizes of one GDN mixer (or of one tensor-parallel rank's share of it)."""

    key_heads: int
    key_head_dim: int
    value_heads: int
    value_head_dim: int

    @property
    def key_dim(self) -> int:
        """Width of Q and of K."""
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        """Width of V and of Z."""
        return self.value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Width of Q|K|V, which the convolution runs over."""
        return 2 * self.key_dim + self.value_dim


def split_heads(qkv: torch.Tensor, heads: GDNHeads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convolved Q|K|V [B, T, conv_dim] -> q, k [B, T, Hk, Dk], v [B, T, Hv, Dv]."""
    query, key, value = qkv.split([heads.key_dim, heads.key_dim, heads.value_dim], dim=-1)
    return (
        query.unflatten(-1, (heads.key_heads, heads.key_head_dim)),
        key.unflatten(-1, (heads.key_heads, heads.key_head_dim)),
        value.unflatten(-1, (heads.value_heads, heads.value_head_dim)),
    )


def gated_delta_net(
    qkv: torch.Tensor,
    beta_logits: torch.Tensor,
    alpha: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,  # noqa: N803 (the checkpoint's name)
    dt_bias: torch.Tensor,
    heads: GDNHeads,
    cache: LinearMixerCache | None,
) -> torch.Tensor:
    """GDN between its input projections and its output norm.

    qkv: Q|K|V before the convolution [B, T, conv_dim]; beta_logits, alpha [B, T, Hv];
    conv_weight [conv_dim, 1, K]; A_log, dt_bias [Hv]. With `cache`, the input continues the cached
    sequences and the cache (conv state "convolution", recurrent state, seen_tokens) is updated in place.
    Returns the delta-rule output o [B, T, Hv, Dv].
    """
    conv_state = cache.conv_states[CONVOLUTION] if cache is not None else None
    qkv, conv_state = causal_conv1d(qkv, conv_weight, conv_state)
    query, key, value = split_heads(qkv, heads)
    value_heads_per_key = heads.value_heads // heads.key_heads
    if value_heads_per_key > 1:
        # Value head h uses key head h // ratio (Fast-LLM's repeat_interleave, not a tiled repeat).
        query = query.repeat_interleave(value_heads_per_key, dim=2)
        key = key.repeat_interleave(value_heads_per_key, dim=2)

    # Log-decay per value head [B, T, Hv], in float32 for bf16/float32 weights (upstream's .float()).
    decay_dtype = compute_dtype(alpha.dtype)
    log_decay = -A_log.to(decay_dtype).exp() * F.softplus(alpha.to(decay_dtype) + dt_bias)
    beta = beta_logits.sigmoid()
    out = run_delta_rule(query, key, value, log_decay, beta, cache)  # [B, T, Hv, Dv]
    if cache is not None:
        cache.conv_states[CONVOLUTION] = conv_state
        cache.seen_tokens += qkv.shape[1]
    return out


class GatedDeltaNet(nn.Module):
    """GDN mixer: parameters `in_proj_qkvz`, `in_proj_ba`, `convolution`, `out_proj`, `A_log`, `dt_bias`, `norm`."""

    def __init__(self, config: GDNMixerConfig, hidden_size: int):
        super().__init__()
        check_upstream_defaults(config, "gdn")
        self.config = config
        self.hidden_size = hidden_size
        self.num_value_heads = config.value_heads
        self.num_key_heads = config.key_heads
        self.key_head_dim = config.key_head_dim
        self.value_head_dim = config.value_head_dim
        self.value_heads_per_key = config.value_heads // config.key_heads
        self.heads = GDNHeads(self.num_key_heads, self.key_head_dim, self.num_value_heads, self.value_head_dim)
        self.key_dim = self.heads.key_dim  # width of Q and of K
        self.value_dim = self.heads.value_dim  # width of V and of Z
        self.conv_dim = self.heads.conv_dim  # the convolution runs over Q|K|V

        self.in_proj_qkvz = nn.Linear(hidden_size, self.conv_dim + self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * self.num_value_heads, bias=False)
        self.convolution = CausalConv1d(self.conv_dim, config.convolution_layer.kernel_size)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.A_log, self.dt_bias = decay_rate_parameters(
            self.num_value_heads, self.num_value_heads, a_min=0.0
        )
        eps = config.normalization.epsilon if config.normalization is not None else DEFAULT_NORM_EPSILON
        self.norm = GatedRMSNorm(self.value_head_dim, eps)
        for linear in (self.in_proj_qkvz, self.in_proj_ba, self.out_proj):
            nn.init.normal_(linear.weight, std=hidden_size**-0.5)  # Fast-LLM's default

    def new_cache(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype, max_length: int | None = None
    ) -> LinearMixerCache:
        """An empty decode cache: conv state [B, conv_dim, K-1], recurrent state [B, Hv, Dk, Dv] (sizes that do not
        depend on `max_length`)."""
        state_shape = (self.num_value_heads, self.key_head_dim, self.value_head_dim)
        return LinearMixerCache.empty(
            {CONVOLUTION: self.convolution}, state_shape, batch_size, device, dtype
        )

    def forward(self, hidden_states: torch.Tensor, cache: LinearMixerCache | None = None) -> torch.Tensor:
        """hidden_states [B, T, D] (continuing `cache`'s sequences if given; cache updated in place) -> [B, T, D]."""
        qkv, z, beta_logits, alpha = self.project_inputs(hidden_states)
        out = gated_delta_net(
            qkv, beta_logits, alpha, self.convolution.weight, self.A_log, self.dt_bias, self.heads, cache
        )
        return self.project_output(out, z)

    # The steps of `forward` around `gated_delta_net`, which serving reuses (vllm_supernet).

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, T, D] -> Q|K|V before the convolution [B, T, conv_dim], Z [B, T, value_dim],
        beta logits and alpha [B, T, Hv]."""
        qkv, z = self.in_proj_qkvz(hidden_states).split([self.conv_dim, self.value_dim], dim=-1)
        beta_logits, alpha = self.in_proj_ba(hidden_states).split(self.num_value_heads, dim=-1)
        return qkv, z, beta_logits, alpha

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolved Q|K|V [B, T, conv_dim] -> q, k [B, T, Hk, Dk], v [B, T, Hv, Dv]."""
        return split_heads(qkv, self.heads)

    def project_output(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Delta-rule output [B, T, Hv, Dv], Z [B, T, value_dim] -> [B, T, D]."""
        out = self.norm(out, z.unflatten(-1, (self.num_value_heads, self.value_head_dim)))
        return self.out_proj(out.flatten(-2))
