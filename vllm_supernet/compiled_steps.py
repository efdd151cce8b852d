"""GDN/KDA decode steps, compiled with `torch.compile` unless the engine runs eager.

Why: a decode step runs each mixer on one token per request, and a GDN or KDA step is a few hundred
small tensor ops (projections, three convolutions, gates, L2 norms, the recurrence, the gated norm)
whose dispatch on CPU costs more than their arithmetic: eager KDA takes ~2.3 ms per layer for one
token, of which ~0.4 ms are matmuls. Inductor fuses them into a few loops (~0.6 ms). A batch that
mixes placements runs up to four mixers per layer, so it pays each mixer's fixed cost once per mixer.
Attention and the MLP stay eager: they are a handful of large ops, and a compiled call costs more
here (~70-90 us of guards and wrappers) than it saves on them.

When: vLLM's own switch. `enforce_eager=False` (vLLM's default) leaves vLLM's compilation mode on
and these functions are compiled; `enforce_eager=True` (compilation mode NONE) runs them as
written. The math is the reference modules' own (`fast_llm_supernet`); nothing here redefines it.

How: each function takes its module as the first argument, so one compiled graph serves every
layer (dynamo inlines module arguments and guards on their structure, not their identity); a
function compiles once for one request and once for a dynamic batch size.
`Apriel2ForCausalLM.warm_up_linear_mixers` triggers both in vLLM's first dummy run, so no request
waits for the compiler (~50 s on 2 cores the first time, ~7 s from inductor's on-disk cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fast_llm_supernet.mixers.common import LinearMixerCache


def linear_mixer_decode(
    mixer: nn.Module, hidden_states: torch.Tensor, conv: torch.Tensor, recurrent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference GDN/KDA module on one token per request.

    hidden_states [B, D]; conv [B, C_total, K-1] (its convolutions' states stacked in page order);
    recurrent [B, H, Dk, Dv] -> (output [B, D], new conv, new recurrent).
    """
    names, widths = list(mixer.conv_channels), list(mixer.conv_channels.values())
    cache = LinearMixerCache(
        conv_states=dict(zip(names, conv.split(widths, dim=1), strict=True)), recurrent_state=recurrent
    )
    output = mixer(hidden_states[:, None], cache)[:, 0]
    return output, torch.cat([cache.conv_states[name] for name in names], dim=1), cache.recurrent_state


def gdn_kernel_inputs(mixer: nn.Module, hidden_states: torch.Tensor, conv_state: torch.Tensor):
    """GDN up to its delta rule, laid out for vLLM's fused decode kernel (one token per request).

    hidden_states [B, D], conv_state [B, conv_dim, K-1] -> query, key [1, B, Hk, Dk], value
    [1, B, Hv, Dv], alpha and beta logits [B, Hv], Z [B, 1, value_dim], new conv state.
    """
    qkv, z, beta_logits, alpha = mixer.project_inputs(hidden_states[:, None])  # [B, 1, ...]
    qkv, conv_state = mixer.convolution(qkv, conv_state)
    query, key, value = (x.transpose(0, 1).contiguous() for x in mixer.split_heads(qkv))
    return query, key, value, alpha[:, 0].contiguous(), beta_logits[:, 0].contiguous(), z, conv_state


def gdn_kernel_output(mixer: nn.Module, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Kernel output [B, 1, Hv, Dv], Z [B, 1, value_dim] -> [B, D]."""
    return mixer.project_output(out, z)[:, 0]


@dataclass(frozen=True)
class StepFunctions:
    """The functions above, compiled or as written; one instance per mode (`step_functions`)."""

    compiled: bool
    linear_mixer_decode: Callable
    gdn_kernel_inputs: Callable
    gdn_kernel_output: Callable


_FUNCTIONS = (linear_mixer_decode, gdn_kernel_inputs, gdn_kernel_output)
_by_mode: dict[bool, StepFunctions] = {}


def step_functions(vllm_config) -> StepFunctions:
    """Compiled unless vLLM runs this engine eagerly (`enforce_eager=True`: compilation mode NONE)."""
    from vllm.config import CompilationMode

    compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
    if compiled not in _by_mode:
        # dynamic=None: the first call compiles for its shapes, the first call with another batch size
        # recompiles with that dimension symbolic; dimensions that never change stay static.
        wrap = (lambda function: torch.compile(function, dynamic=None)) if compiled else (lambda f: f)
        _by_mode[compiled] = StepFunctions(compiled, *(wrap(function) for function in _FUNCTIONS))
    return _by_mode[compiled]
