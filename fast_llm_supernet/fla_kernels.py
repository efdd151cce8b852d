"""Choose the gated-delta-rule kernel: flash-linear-attention on CUDA when installed, else `kernels`.

flash-linear-attention (`fla`) is imported lazily and only for CUDA tensors, so CPU runs never import it
(and never pay for its Triton start-up). Set `SUPERNET_DISABLE_FLA=1` to force the pure-PyTorch kernels
everywhere, e.g. to compare the two on a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import ModuleType

import torch

from fast_llm_supernet import kernels

logger = logging.getLogger(__name__)


@functools.cache
def _fla_ops() -> tuple[ModuleType, ModuleType] | None:
    """fla's gated-delta-rule and KDA op modules, or None when fla is missing or disabled."""
    if (
        os.environ.get("SUPERNET_DISABLE_FLA", "0") not in ("", "0")
        or importlib.util.find_spec("fla") is None
    ):
        return None
    try:
        import fla.ops.gated_delta_rule as gdn_ops
        import fla.ops.kda as kda_ops
    except Exception as error:  # a broken Triton/CUDA install should degrade to the torch path, loudly
        logger.warning(
            "flash-linear-attention is installed but failed to import (%s); using torch kernels", error
        )
        return None
    return gdn_ops, kda_ops


def uses_fla(device: torch.device) -> bool:
    """True when `gated_delta_rule` runs flash-linear-attention for tensors on `device`."""
    return device.type == "cuda" and _fla_ops() is not None


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    recurrent: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule with the best available kernel; arguments as in `kernels.chunk_gated_delta_rule`.

    q, k [B, T, H, Dk] (already L2-normalised; scaled by Dk ** -0.5 inside), v [B, T, H, Dv],
    g [B, T, H] (scalar decay, GDN) or [B, T, H, Dk] (per-channel, KDA), beta [B, T, H],
    initial_state [B, H, Dk, Dv] or None. `recurrent=True` picks the token-by-token kernel (decode).
    Returns o [B, T, H, Dv] and the final state (None from fla unless `output_final_state`).
    """
    if uses_fla(q.device):
        gdn_ops, kda_ops = _fla_ops()
        per_channel = g.dim() == 4
        if recurrent:
            kernel = kda_ops.fused_recurrent_kda if per_channel else gdn_ops.fused_recurrent_gated_delta_rule
        else:
            kernel = kda_ops.chunk_kda if per_channel else gdn_ops.chunk_gated_delta_rule
        # Keywords only: fla's recurrent GDN kernel takes (q, k, v, g, gk, gv, beta, ...) positionally.
        return kernel(
            q=q,
            k=k,
            v=v,
            g=g.float(),
            beta=beta.to(q.dtype),
            initial_state=initial_state.float() if initial_state is not None else None,
            output_final_state=output_final_state,
        )
    kernel = kernels.recurrent_gated_delta_rule if recurrent else kernels.chunk_gated_delta_rule
    return kernel(q, k, v, g, beta, initial_state=initial_state)
