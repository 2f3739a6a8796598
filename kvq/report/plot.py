"""The Pareto plot: perplexity vs KV-cache bits per element, one panel per setting.

One colour per method, one marker per granularity, the Pareto front as a step line, the fp
baseline as a dashed line; Pareto points are labelled (bits, grouping) without overlaps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .table import as_float, rank

__all__ = ["plot_pareto"]

_METHOD_COLOURS = {"none": "#4d4d4d", "uniform": "#1f77b4", "normal": "#2ca02c", "adaptive": "#ff7f0e"}
_EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")
_GRAN_MARKERS = {"head": "s", "layer": "o", "token": "^"}
_EXTRA_MARKERS = ("D", "v", "P", "X", "<", ">")


def _palette(values: Iterable[str], fixed: dict[str, str], extra: Sequence[str]) -> dict[str, str]:
    out, n = {}, 0
    for v in values:
        if v in fixed:
            out[v] = fixed[v]
        elif v not in out:
            out[v] = extra[n % len(extra)]
            n += 1
    return out


def _short(row: Any) -> str:
    if row.method == "none":
        return "fp16"
    parts = [row.bits, row.grouping if row.grouping != "none" else ""]
    return " ".join(p for p in parts if p)


#: where a Pareto label may sit, in order of preference: (dx, dy) in points, ha, va.
#: Lower-left first: a point there would dominate the front point, so it is empty of data.
_LABEL_SPOTS = (
    ((-7, -5), "right", "top"),
    ((7, -5), "left", "top"),
    ((-7, 5), "right", "bottom"),
    ((7, 5), "left", "bottom"),
)


def _place_labels(
    ax: Any, texts: list[Any], points: Sequence[tuple[float, float]], fixed: Sequence[Any]
) -> None:
    """Place each label (greedy, in order) at the first spot near its point where it overlaps no
    data point, no other label and no ``fixed`` text and stays inside the axes; else push it down
    step by step with a leader line; a label that still cannot be placed is hidden."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    if not texts:
        return
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    r = 5.0 * ax.figure.dpi / 72  # about a marker's radius, in pixels
    disp = ax.transData.transform(points) if len(points) else []
    taken: list[Any] = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in disp]

    def box(t: Any) -> Any:  # the text alone, without its leader line
        t.update_positions(renderer)
        return Text.get_window_extent(t, renderer)

    def free(t: Any) -> bool:
        b = box(t)
        inside = frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
        return inside and not any(b.overlaps(o) for o in taken)

    taken += [box(f) for f in fixed]
    for t in texts:
        t.arrow_patch.set_visible(False)  # a leader line only for a label moved off its point
        ok = False
        for offset, ha, va in _LABEL_SPOTS:
            t.set_position(offset)
            t.set_horizontalalignment(ha)
            t.set_verticalalignment(va)
            if ok := free(t):
                break
        if not ok:
            t.set_position(_LABEL_SPOTS[0][0])
            t.set_horizontalalignment(_LABEL_SPOTS[0][1])
            t.set_verticalalignment(_LABEL_SPOTS[0][2])
            t.arrow_patch.set_visible(True)
            for _ in range(8):
                x, y = t.get_position()  # offset points
                t.set_position((x - 4, y - box(t).height * 72 / ax.figure.dpi))
                if ok := free(t):
                    break
        if ok:
            taken.append(box(t).expanded(1.04, 1.1))
        else:
            t.set_visible(False)


def plot_pareto(df: pd.DataFrame, base: pd.DataFrame, path: Path) -> Path:
    """Draw ``pareto.png`` on an Agg canvas (no pyplot: the global backend is left alone).

    Args:
        df: the table of :func:`kvq.report.build_table` (its ``attrs["setting"]`` gives the panels).
        base: the baselines of :func:`kvq.report.baselines` (the dashed line of each panel).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    settings = list(dict.fromkeys(df.attrs.get("setting", [])))
    n = max(len(settings), 1)
    ncols = 1 if n <= 2 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.6 * ncols + 2.0, 4.6 * nrows), layout="constrained", dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    methods = sorted(set(df["method"]), key=lambda v: rank("method", v))
    grans = sorted(set(df["granularity"]), key=lambda v: rank("granularity", v))
    colour = _palette(methods, _METHOD_COLOURS, _EXTRA_COLOURS)
    marker = _palette(grans, _GRAN_MARKERS, _EXTRA_MARKERS)
    base_ppl = dict(zip(base["setting"], base["ppl"]))
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    setting_col = pd.Series(df.attrs.get("setting", []), index=df.index, dtype=object)
    to_declutter = []
    for ax, setting in zip(axes.flat, settings):
        finite = df["ppl"].map(math.isfinite) & df["bits_per_element"].map(math.isfinite)
        sub = df[(setting_col == setting) & finite]
        for (m, g), grp in sub.groupby(["method", "granularity"], sort=False):
            ax.scatter(
                grp["bits_per_element"],
                grp["ppl"],
                c=colour[m],
                marker=marker[g],
                s=50,
                alpha=0.9,
                edgecolors="white",
                linewidths=0.6,
                zorder=3,
            )
        front = sub[sub["pareto"]].sort_values(["bits_per_element", "ppl"])
        labels = []
        if len(front):
            xs, ys = front["bits_per_element"].tolist(), front["ppl"].tolist()
            x_end = max(sub["bits_per_element"].max(), xs[-1]) * 1.04
            ax.step([*xs, x_end], [*ys, ys[-1]], where="post", color="black", lw=1.3, zorder=2)
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4)
            # lower-left of a front point is empty: anything there would dominate it
            for row in front.drop_duplicates(["bits_per_element", "ppl"]).itertuples():
                labels.append(
                    ax.annotate(
                        _short(row),
                        (row.bits_per_element, row.ppl),
                        xytext=(-7, -5),
                        textcoords="offset points",
                        ha="right",
                        va="top",
                        fontsize=8.5,
                        color=colour[row.method],
                        fontweight="bold",
                        zorder=5,
                        arrowprops={"arrowstyle": "-", "color": colour[row.method], "lw": 0.7, "shrinkB": 5},
                    )
                )
        b = base_ppl.get(setting)
        fixed = []
        if b is not None and math.isfinite(b):
            ax.axhline(b, ls="--", color="#4d4d4d", lw=1.1, zorder=1)
            if len(settings) > 1:  # one setting: the value is in the legend
                fixed.append(
                    ax.annotate(
                        f"fp16 {b:.4g}",
                        (0.01, b),
                        xycoords=("axes fraction", "data"),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="left",
                        va="bottom",
                        fontsize=8.5,
                        color="#4d4d4d",
                    )
                )
        xs_all, ys_all = sub["bits_per_element"], sub["ppl"]
        if len(xs_all) and xs_all.min() > 0 and xs_all.max() / xs_all.min() > 6:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(fmt)
        if len(ys_all) and ys_all.min() > 0 and ys_all.max() / ys_all.min() > 3:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(fmt)
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.08, y=0.1)
        ax.set_xlabel("KV-cache bits per element (stored bytes × 8 / elements)", fontsize=10)
        ax.set_ylabel("perplexity (lower is better)", fontsize=10)
        ax.set_title(setting, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=9.5)
        points = list(zip(sub["bits_per_element"], sub["ppl"]))
        to_declutter.append((ax, labels, points, fixed))
    for ax in list(axes.flat)[len(settings) :]:
        ax.set_visible(False)
    if not settings:
        axes.flat[0].text(
            0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes.flat[0].transAxes
        )
    baseline_label = "fp16 baseline"
    if len(settings) == 1 and math.isfinite(as_float(base_ppl.get(settings[0]))):
        baseline_label += f"\n(ppl {base_ppl[settings[0]]:.4g})"
    header = {"method": Line2D([], [], ls="none", label="method")}
    handles = [header["method"]]
    handles += [Line2D([], [], ls="none", marker="o", color=colour[m], ms=7, label=m) for m in methods]
    header["granularity"] = Line2D([], [], ls="none", label="granularity")
    handles.append(header["granularity"])
    handles += [Line2D([], [], ls="none", marker=marker[g], color="#777777", ms=7, label=g) for g in grans]
    handles += [
        Line2D([], [], ls="none", label=" "),
        Line2D([], [], color="black", lw=1.3, marker="o", mfc="none", ms=10, label="Pareto front"),
        Line2D([], [], color="#4d4d4d", ls="--", lw=1.1, label=baseline_label),
    ]
    leg = fig.legend(
        handles=handles, loc="outside right upper", fontsize=9.5, frameon=False, handlelength=1.6
    )
    for text in leg.get_texts():
        if text.get_text() in header:
            text.set_fontweight("bold")
            text.set_x(-20)
    fig.suptitle("Perplexity vs KV-cache memory (labels: bits, grouping)", fontsize=12)
    fig.canvas.draw()  # final layout first: label overlaps are measured in display space
    for ax, labels, points, fixed in to_declutter:
        _place_labels(ax, labels, points, fixed)
    fig.savefig(path)
    return path
