"""Every PNG plot of the project: the report's (flip ratio, channels, latency) and the study's
Pareto plot. Written atomically, without a timestamp, so equal data gives equal files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnnprune.core.files import write_atomic


def _save_fig(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100,
                                             metadata={"Software": None}))
    plt.close(fig)


def plot_all(s: dict[str, Any], flip_ratio: list[dict[str, float]],
             latency_rows: list[dict[str, Any]], paths: dict[str, Path]) -> None:
    """The report's PNGs: flip ratio per layer and epoch, channels per layer, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in flip_ratio]
    layers = [k for k in flip_ratio[0] if k != "epoch"]
    for layer in layers:
        ax.plot(epochs, [r[layer] for r in flip_ratio], marker="o", label=layer)
    positive = all(r[k] > 0 for r in flip_ratio for k in layers)
    ax.set(xlabel="epoch", ylabel="flip ratio per observation",
           yscale="log" if positive else "linear",
           title="Weight sign flips per layer during training")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    _save_fig(fig, paths["flip_ratio"])

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["layer"] for r in s["layers"]]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["channels_before"] for r in s["layers"]], 0.4,
           label="before")
    ax.bar([i + 0.2 for i in x], [r["channels_after"] for r in s["layers"]], 0.4, label="after")
    ax.set_xticks(list(x), names)
    ax.set(ylabel="output channels", title="Channels per binary layer")
    ax.legend()
    _save_fig(fig, paths["channels"])

    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(latency_rows))
    ax.bar([i - 0.2 for i in x], [r["baseline_ms"] for r in latency_rows], 0.4,
           label="baseline")
    ax.bar([i + 0.2 for i in x], [r["pruned_ms"] for r in latency_rows], 0.4, label="pruned")
    ax.set_xticks(list(x), [r["backend"] for r in latency_rows])
    ax.set(ylabel="latency (ms per batch)", yscale="log", title="Latency per backend")
    ax.legend()
    _save_fig(fig, paths["latency"])


def pareto_plot(summary: dict[str, Any], path: str | Path) -> None:
    """Test accuracy vs BOP reduction per method, before and after recovery, 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    titles = ("right after surgery", "after recovery")
    for ax, phase, title in zip(axes, ("before", "after"), titles, strict=True):
        for m, by_budget in summary["methods"].items():
            rows = list(by_budget.values())
            x = [r["bops_reduction_pct"] for r in rows]
            y = [100 * r[phase]["mean"] for r in rows]
            err = [0 if r[phase]["lo"] is None else 100 * (r[phase]["hi"] - r[phase]["mean"])
                   for r in rows]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=m)
        ax.axhline(100 * summary["baseline_test_acc"], color="gray", ls="--", lw=1,
                   label="baseline")
        ax.set(xlabel="BOP reduction (%)", ylabel="test accuracy (%)",
               title=f"Test accuracy {title} (mean, 95% CI over seeds)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    _save_fig(fig, path)
