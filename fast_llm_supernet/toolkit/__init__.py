"""`fast_llm_supernet.toolkit`: measure, predict and choose placements (`supernet-place`).

Public, stable API: `pareto_front(single, pairs, cost) -> [(cost, loss, placement)]`.
"""

from fast_llm_supernet.toolkit.pareto import pareto_front

__all__ = ["pareto_front"]
