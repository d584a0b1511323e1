"""Training-loss curves from Detectron2's metrics.json (one JSON object per line, written by JSONWriter)."""

import json
from typing import Dict, List, Optional, Sequence

__all__ = ["read_metrics", "plot_loss_curve"]


def read_metrics(metrics_json: str) -> List[Dict]:
    """The rows of metrics.json that hold an iteration (evaluation rows have one too; all are kept)."""
    with open(metrics_json) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "iteration" in r]


def plot_loss_curve(
    metrics_json: str, output_png: str, keys: Optional[Sequence[str]] = None
) -> List[str]:
    """Plot total_loss and every loss_* key (or `keys`) against the iteration, log y axis, to output_png.

    Returns the keys plotted. Uses matplotlib's Agg backend (no display needed). A ValueError names the
    file when it holds no loss at all.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_metrics(metrics_json)
    if keys is None:
        keys = sorted({k for r in rows for k in r if k == "total_loss" or k.startswith("loss_")})
    if not keys:
        raise ValueError(f"{metrics_json} has no total_loss or loss_* values to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for key in keys:
        points = [(r["iteration"], r[key]) for r in rows if key in r and r[key] > 0]
        if points:
            its, values = zip(*points)
            ax.plot(its, values, label=key, linewidth=2.2 if key == "total_loss" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the logging window)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_png)
    plt.close(fig)
    return list(keys)
