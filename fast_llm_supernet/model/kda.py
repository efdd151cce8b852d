"""`fast_llm_supernet.model.kda`: Kimi Delta Attention, as upstream Fast-LLM defines it (`fast_llm/layers/ssm/kda.py`).

    q, k, v = {q,k,v}_conv(SiLU causal depthwise conv)({q,k,v}_proj(x))      [H heads of D]
    q, k L2-normalised (eps 1e-6), q scaled by D^-0.5 (in the kernel)
    g = -exp(A_log[h]) * softplus(f_b_proj(f_a_proj(x)) + dt_bias)          (log-decay per head and channel)
    beta = sigmoid(beta_proj(x))
    o = gated delta rule; o_proj(rmsnorm(o) * norm.weight * silu(g_b_proj(g_a_proj(x))))
The low-rank gate projections have rank D (f_a/g_a: hidden -> D, f_b/g_b: D -> H*D); the output gate
is SiLU (Fast-LLM's default, not written to config.json).

`kimi_delta_attention` is the math between the input projections and the output norm, on plain tensors
and a head count: `KimiDeltaAttention.forward` calls it, and so can a serving plugin with its own
projections and per-rank (tensor-parallel) head counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fast_llm_supernet.model.linear_mixer import (
    CausalConv1d,
    GatedRMSNorm,
    LinearMixerCache,
    check_upstream_defaults,
    decay_rate_parameters,
    run_delta_rule,
)
from fast_llm_supernet.model.ops import causal_conv1d, compute_dtype
from shared_spec import KDAMixerConfig

CONVOLUTIONS = ("q_conv", "k_conv", "v_conv")  # module names, and the cache's names of their states


def kda_log_decay(
    decay_logits: torch.Tensor,
    A_log: torch.Tensor,  # noqa: N803 (the checkpoint's name)
    dt_bias: torch.Tensor,
    heads: int,
    head_dim: int,
) -> torch.Tensor:
    """g = -exp(A_log[h]) * softplus(decay_logits + dt_bias): log-decay per head and key channel.

    decay_logits [..., H*D] -> [..., H, D], in float32 for bf16/float32 weights (upstream's .float())."""
    decay_dtype = compute_dtype(decay_logits.dtype)
    gate_logits = decay_logits.unflatten(-1, (heads, head_dim)).to(decay_dtype)
    return -A_log.to(decay_dtype).exp().unsqueeze(-1) * F.softplus(gate_logits + dt_bias.view(heads, head_dim))


def kimi_delta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_logits: torch.Tensor,
    beta_logits: torch.Tensor,
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    A_log: torch.Tensor,  # noqa: N803 (the checkpoint's name)
    dt_bias: torch.Tensor,
    heads: int,
    head_dim: int,
    cache: LinearMixerCache | None,
) -> torch.Tensor:
    """KDA between its input projections and its output norm.

    q, k, v: [B, T, H*D] before their convolutions; decay_logits = f_b_proj(f_a_proj(x)) [B, T, H*D];
    beta_logits [B, T, H]; conv_weights: the q, k, v convolution weights [H*D, 1, K] each; A_log [H];
    dt_bias [H*D]. With `cache`, the input continues the cached sequences and the cache (conv states
    "q_conv", "k_conv", "v_conv", recurrent state, seen_tokens) is updated in place.
    Returns the delta-rule output o [B, T, H, D] (in v's dtype).
    """
    shape = (heads, head_dim)
    convolved = []
    for name, x, weight in zip(CONVOLUTIONS, (q, k, v), conv_weights, strict=True):
        conv_state = cache.conv_states[name] if cache is not None else None
        y, conv_state = causal_conv1d(x, weight, conv_state)
        if cache is not None:
            cache.conv_states[name] = conv_state
        convolved.append(y.unflatten(-1, shape))  # [B, T, H, D]
    query, key, value = convolved

    log_decay = kda_log_decay(decay_logits, A_log, dt_bias, heads, head_dim)  # [B, T, H, D]
    beta = beta_logits.to(log_decay.dtype).sigmoid()  # [B, T, H]
    out = run_delta_rule(query, key, value, log_decay, beta, cache)  # [B, T, H, D]
    if cache is not None:
        cache.seen_tokens += q.shape[1]
    return out


class KimiDeltaAttention(nn.Module):
    """KDA mixer: `{q,k,v,o}_proj`, `{f,g}_{a,b}_proj`, `beta_proj`, `{q,k,v}_conv`, `A_log`, `dt_bias`, `norm`."""

    def __init__(self, config: KDAMixerConfig, hidden_size: int):
        super().__init__()
        check_upstream_defaults(config, "kda")
        self.config = config
        self.hidden_size = hidden_size
        self.num_heads = config.heads
        self.head_dim = config.head_dim
        projection_size = self.num_heads * self.head_dim
        kernel_size = config.convolution_layer.kernel_size

        self.q_proj = nn.Linear(hidden_size, projection_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, projection_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, projection_size, bias=False)
        self.q_conv = CausalConv1d(projection_size, kernel_size)
        self.k_conv = CausalConv1d(projection_size, kernel_size)
        self.v_conv = CausalConv1d(projection_size, kernel_size)
        # Low-rank decay gate and output gate, rank = head_dim.
        self.f_a_proj = nn.Linear(hidden_size, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, projection_size, bias=False)
        self.g_a_proj = nn.Linear(hidden_size, self.head_dim, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, projection_size, bias=False)
        self.beta_proj = nn.Linear(hidden_size, self.num_heads, bias=False)
        self.o_proj = nn.Linear(projection_size, hidden_size, bias=False)
        self.A_log, self.dt_bias = decay_rate_parameters(projection_size, self.num_heads, a_min=1.0)
        self.norm = GatedRMSNorm(self.head_dim, config.normalization.epsilon)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=hidden_size**-0.5)  # Fast-LLM's default for all of them

    def new_cache(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype, max_length: int | None = None
    ) -> LinearMixerCache:
        """An empty decode cache: three conv states [B, H*D, K-1], recurrent state [B, H, D, D] (sizes that do not
        depend on `max_length`)."""
        convolutions = {name: getattr(self, name) for name in CONVOLUTIONS}
        state_shape = (self.num_heads, self.head_dim, self.head_dim)
        return LinearMixerCache.empty(convolutions, state_shape, batch_size, device, dtype)

    def forward(self, hidden_states: torch.Tensor, cache: LinearMixerCache | None = None) -> torch.Tensor:
        """hidden_states [B, T, D] (continuing `cache`'s sequences if given; cache updated in place) -> [B, T, D]."""
        heads = (self.num_heads, self.head_dim)
        query, key, value, decay_low, gate_low, beta_logits = self.project_inputs(hidden_states)
        out = kimi_delta_attention(
            query,
            key,
            value,
            self.f_b_proj(decay_low),
            beta_logits,
            tuple(getattr(self, name).weight for name in CONVOLUTIONS),
            self.A_log,
            self.dt_bias,
            self.num_heads,
            self.head_dim,
            cache,
        ).to(hidden_states.dtype)

        output_gate = self.g_b_proj(gate_low).unflatten(-1, heads)
        out = self.norm(out, output_gate)
        return self.o_proj(out.flatten(-2))

    # The step of `forward` before `kimi_delta_attention`, which serving reuses with its projections
    # stacked into one matmul (vllm_supernet).

    def project_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, T, D] -> q, k, v before their convolutions [B, T, H*D], the low-rank decay and output-gate
        inputs [B, T, D] (f_a, g_a) and the beta logits [B, T, H]."""
        return tuple(projection(hidden_states) for projection in self.input_projections())

    def input_projections(self) -> list[nn.Linear]:
        """The linear layers of `project_inputs`, in the order of its outputs."""
        return [self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.g_a_proj, self.beta_proj]

