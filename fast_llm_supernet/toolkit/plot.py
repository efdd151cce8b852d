"""`fast_llm_supernet.toolkit.plot`: the Pareto plot (PNG) of predicted quality against predicted decode speed-up."""

from __future__ import annotations

from pathlib import Path

from fast_llm_supernet.toolkit.cost import CostModel
from fast_llm_supernet.toolkit.evaluate import PlacementQuality
from shared_spec import Placement, SupernetSpec


def plot_front(
    front: list[dict], evaluated: list[PlacementQuality], cost: CostModel, spec: SupernetSpec, path: Path,
    presets: list[dict] | None = None,
) -> None:
    """x: speed-up over all-attention (cost model), y: top-1 agreement with the teacher. Evaluated placements
    (measured quality), the predicted frontier, the presets as measured, all-attention and the single-mixer
    placements marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {name: i for i, name in enumerate(cost.mixers)}
    attention_step = cost.predict([index["attention"]] * spec.num_layers)

    def speedup(placement: str) -> float:
        mixers = Placement.parse(placement, spec).mixers
        return attention_step / cost.predict([index[m] for m in mixers])

    figure, axes = plt.subplots(figsize=(8, 5.5))
    if evaluated:
        axes.scatter([speedup(r.placement) for r in evaluated], [r.top1 for r in evaluated], s=10, alpha=0.45,
                     color="tab:gray", label=f"evaluated placements ({len(evaluated)})")
    axes.plot([p["predicted_speedup"] for p in front], [p["predicted_quality"] for p in front], "-", color="tab:blue",
              lw=1.5, label="predicted Pareto frontier (surrogate x cost model)")
    uniform = {r.placement: r for r in evaluated if len(set(Placement.parse(r.placement, spec).mixers)) == 1}
    for placement, record in uniform.items():
        axes.scatter([speedup(placement)], [record.top1], marker="*", s=160, zorder=5)
        axes.annotate(placement, (speedup(placement), record.top1), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for preset in presets or []:
        axes.scatter([preset["measured_speedup"]], [preset["measured_quality"]], marker="D", s=50, color="tab:red", zorder=6)
        axes.annotate(preset["name"], (preset["measured_speedup"], preset["measured_quality"]), textcoords="offset points",
                      xytext=(6, -10), fontsize=8, color="tab:red")
    axes.set_xlabel(f"decode speed-up over all-attention at {cost.context} tokens (cost model, vLLM CPU, bf16)")
    axes.set_ylabel("top-1 agreement with the teacher (held-out)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
