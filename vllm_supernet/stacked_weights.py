"""Several layers' weights in one tensor, so that a decode step runs them as one matmul.

vLLM's own models get this from `QKVParallelLinear` / `MergedColumnParallelLinear` and a
`stacked_params_mapping` in `load_weights`. Here the mixers *are* the reference modules (separate
`q_proj`, `k_proj`, ... as the checkpoint names them), so instead each of those parameters is made a
view into one stacked tensor: checkpoint loading writes through the views (vLLM's
`default_weight_loader` copies into `param.data`), the reference `forward` keeps working unchanged,
and the weights are held once.

On this CPU build a bf16 matmul of a few rows costs a fixed ~20 us plus time linear in the rows, so a
decode step of one request pays mostly fixed costs: fewer, larger matmuls are what make a batch that
mixes placements (one mixer call per placement and layer) affordable.
"""

from __future__ import annotations

import torch
from torch import nn


def stack_parameters(
    modules: list[nn.Module], name: str = "weight", missing_as_zeros: bool = False
) -> torch.Tensor | None:
    """Concatenate `module.<name>` of `modules` along dim 0 and make each parameter a view of the result.

    Returns the stacked tensor ([sum of the dim-0 sizes, ...]); the modules' parameters keep their
    names, shapes and values. A module whose `<name>` is None (a linear layer without bias) is an
    error unless `missing_as_zeros`: then its rows are zeros (its output rows are unchanged by
    adding them), and None is returned when no module has the parameter.
    """
    parameters = [getattr(module, name) for module in modules]
    if all(parameter is None for parameter in parameters) and missing_as_zeros:
        return None
    if any(parameter is None for parameter in parameters) and not missing_as_zeros:
        raise ValueError(f"every module needs a {name!r} parameter to stack")
    # A missing bias of a linear layer: zeros, one per output row (the weight's dim 0).
    blocks = [
        parameter.detach() if parameter is not None else module.weight.new_zeros(module.weight.shape[0])
        for module, parameter in zip(modules, parameters, strict=True)
    ]
    stacked = torch.cat(blocks, dim=0)
    start = 0
    for module, parameter, block in zip(modules, parameters, blocks, strict=True):
        if parameter is not None:
            view = nn.Parameter(
                stacked[start : start + block.shape[0]], requires_grad=parameter.requires_grad
            )
            if hasattr(parameter, "weight_loader"):  # keep vLLM's loader hook
                view.weight_loader = parameter.weight_loader
            setattr(module, name, view)
        start += block.shape[0]
    return stacked


def check_still_stacked(stacked: torch.Tensor, first_parameter: torch.Tensor, owner: str) -> None:
    """Raise if `stacked` is no longer the storage of the parameters stacked into it (a `.to()` or a
    parameter replaced after building would leave it stale: silently wrong outputs)."""
    if stacked.data_ptr() != first_parameter.data_ptr():
        raise RuntimeError(
            f"{owner}: parameters were moved or replaced after the model was built; "
            "the stacked decode weights (stacked_weights.py) no longer share their storage"
        )
