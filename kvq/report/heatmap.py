"""The retrieval heatmap: accuracy by needle depth (rows) x prompt length (columns), one panel
per retrieval run (``eval=passkey`` / ``eval=needle``), written as ``retrieval.png``."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

__all__ = ["MAX_PANELS", "plot_retrieval"]

#: panels drawn at most (the table lists every run)
MAX_PANELS = 24


def _title(row: dict[str, object]) -> str:
    if row["method"] == "none":
        q = "fp16 KV"
    else:
        q = " ".join(str(row[a]) for a in ("method", "bits", "grouping", "granularity") if row[a] != "none")
    return f"{row['task']} · {row['model']}\n{q}"


def plot_retrieval(df: pd.DataFrame, path: Path) -> Path | None:
    """Draw the heatmaps of :func:`kvq.report.sections.retrieval_table` (its ``attrs["cells"]``)
    on an Agg canvas (no pyplot).

    Args:
        df: the retrieval table.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` when no run has depth x length cells.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(row, cells) for row, cells in zip(df.to_dict("records"), df.attrs.get("cells", [])) if cells]
    panels = panels[:MAX_PANELS]
    if not panels:
        return None
    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.4 * ncols + 1.2, 3.6 * nrows), layout="constrained", dpi=130)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, (row, cells) in zip(axes.flat, panels):
        lengths = sorted({L for L, _ in cells})
        depths = sorted({d for _, d in cells})
        grid = [[cells.get((L, d), math.nan) for L in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("depth")
        ax.set_title(_title(row), fontsize=9)
        for i, row_vals in enumerate(grid):
            for j, v in enumerate(row_vals):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    path = Path(path)
    fig.savefig(path)
    return path
