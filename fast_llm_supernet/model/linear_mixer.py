"""`fast_llm_supernet.model.linear_mixer`: what the GDN and KDA mixers share: the causal convolution and
gated norm modules, the decode cache and the delta rule run from and into it, the config checks and the
decay-rate parameters (their math: `ops`; which kernel runs it: `delta_rule_kernels`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fast_llm_supernet.model import delta_rule_kernels, ops

# Fast-LLM's defaults where an Apriel2 config.json leaves them out.
DEFAULT_NORM_EPSILON = 1e-5


@dataclass
class LinearMixerCache:
    """Decode state of one GDN or KDA mixer for a batch of sequences, updated in place by `forward`.

    conv_states: convolution name -> [B, C, K-1], the last K-1 inputs of that convolution
                 (GDN: "convolution" over Q|K|V; KDA: "q_conv", "k_conv", "v_conv").
    recurrent_state: [B, H, Dk, Dv], the delta-rule memory, in `ops.compute_dtype` (float32 at least).
    seen_tokens: how many tokens of each sequence the state already covers.
    """

    conv_states: dict[str, torch.Tensor]
    recurrent_state: torch.Tensor
    seen_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.recurrent_state.shape[0]

    @classmethod
    def empty(
        cls,
        convolutions: dict[str, CausalConv1d],
        state_shape: tuple[int, int, int],
        batch_size: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> LinearMixerCache:
        """Zero states for `batch_size` new sequences; state_shape = (H, Dk, Dv) of the recurrent state."""
        return cls(
            conv_states={
                name: conv.new_state(batch_size, device, dtype) for name, conv in convolutions.items()
            },
            recurrent_state=torch.zeros(
                batch_size, *state_shape, device=device, dtype=ops.compute_dtype(dtype)
            ),
        )


class CausalConv1d(nn.Module):
    """Depthwise causal convolution followed by SiLU; holds `weight` [C, 1, K] as the checkpoint names it."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Fast-LLM's default: uniform in +-(C*K)^-0.5.
        bound = (self.weight.shape[0] * self.weight.shape[-1]) ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C], state [B, C, K-1] or None -> (y [B, T, C], new state [B, C, K-1])."""
        return ops.causal_conv1d(x, self.weight, state)

    def new_state(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return torch.zeros(
            batch_size, self.weight.shape[0], self.weight.shape[-1] - 1, device=device, dtype=dtype
        )


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * weight * silu(gate) over the head dim; `weight` [D]."""

    def __init__(self, dim: int, eps: float = DEFAULT_NORM_EPSILON):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, gate, self.weight, self.eps)


def check_upstream_defaults(config, mixer: str) -> None:
    """Reject config values that change upstream's math but that these mixers do not implement.

    Apriel2 exports leave these out (Fast-LLM's defaults apply); a checkpoint that sets them otherwise
    must fail loudly rather than compute something else.
    """
    conv_activation = getattr(config.convolution_layer, "activation", None)
    if conv_activation not in (None, "silu"):
        raise ValueError(
            f"{mixer} convolution_layer.activation={conv_activation!r} is not supported (valid: 'silu', the default)"
        )
    norm = getattr(config, "normalization", None)
    norm_activation = getattr(norm, "activation", None)
    if norm_activation not in (None, "silu"):
        raise ValueError(
            f"{mixer} normalization.activation={norm_activation!r} is not supported (valid: 'silu', the default)"
        )
    for field in ("add_linear_biases",):
        if getattr(config, field, False):
            raise ValueError(
                f"{mixer} {field}=True is not supported (valid: false; upstream GDN/KDA have no biases)"
            )


def decay_rate_parameters(num_values: int, num_heads: int, a_min: float) -> tuple[nn.Parameter, nn.Parameter]:
    """(A_log [num_heads], dt_bias [num_values]) with Fast-LLM's init: A uniform in [a_min, 16], dt_bias = 1."""
    a_log = nn.Parameter(torch.empty(num_heads).uniform_(a_min, 16).log_())
    dt_bias = nn.Parameter(torch.ones(num_values))
    return a_log, dt_bias


def run_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cache: LinearMixerCache | None,
) -> torch.Tensor:
    """L2-normalise q and k, run the gated delta rule from the cached state, store the new state.

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; g [B, T, H] or [B, T, H, Dk]; beta [B, T, H] -> o [B, T, H, Dv].
    A one-token step with a cache (decode) runs the recurrent kernel, anything else the chunked one.
    """
    o, state = delta_rule_kernels.gated_delta_rule(
        ops.l2norm(q),
        ops.l2norm(k),
        v,
        g,
        beta,
        initial_state=cache.recurrent_state if cache is not None else None,
        output_final_state=cache is not None,
        recurrent=cache is not None and q.shape[1] == 1,
    )
    if cache is not None:
        cache.recurrent_state = state
    return o


