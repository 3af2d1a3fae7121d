"""The `--plot` curve of `nanoseek plan serve`: concurrent sequences and the decode bound against context
length, MLA latent beside MHA and GQA of the same heads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nanoseek.model.config import ModelConfig
from nanoseek.model.stats import model_stats
from nanoseek.plan.hardware import Accelerator, PlanError
from nanoseek.plan.serve import ServePlanConfig, plan_serving


def context_grid(max_context: int) -> list[int]:
    grid, t = [], 256
    while t <= max_context:
        grid.append(t)
        t *= 2
    return grid or [max_context]


def serving_curves(
    cfg: ModelConfig, plan: ServePlanConfig, device: Accelerator, contexts: list[int]
) -> dict[str, list[tuple[int, int, float]]]:
    """{cache kind: [(context, concurrent sequences, decode tokens/s per device at that many sequences)]};
    a point where not one sequence fits is left out."""
    out: dict[str, list[tuple[int, int, float]]] = {}
    stats = model_stats(cfg)
    for kind in ("mla", "gqa", "mha"):
        points = []
        for t in contexts:
            try:
                p = plan_serving(cfg, replace(plan, cache=kind, context=t, batch=0), device, stats)
            except PlanError:
                continue
            points.append((t, p.max_sequences, p.tokens_per_s_device))
        out[kind] = points
    return out


def write_plot(path: str | Path, title: str, curves: dict[str, list[tuple[int, int, float]]], groups: int) -> None:
    import matplotlib  # optional dependency, imported only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency (see above)

    labels = {"mla": "MLA latent", "gqa": f"GQA, {groups} groups", "mha": "MHA, same heads"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, points in curves.items():
        if not points:
            continue
        t, seqs, tok = zip(*points)
        a.plot(t, seqs, marker="o", label=labels[kind])
        b.plot(t, tok, marker="o", label=labels[kind])
    for ax, ylabel in ((a, "concurrent sequences (group)"), (b, "decode tokens/s per device (bound)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
