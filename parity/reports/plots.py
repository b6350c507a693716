"""Plots of error against layer, per site kind and variant, embedded in index.html (matplotlib)."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd

from reference.families import FAMILIES
from reference.sites import block_output_site



PNG_DPI = 72              # ~55 kB a figure: 80 subjects (10 figures) take ~0.8 MB


# ============================================================================ plots
MARKERS = ("o", "s", "^", "D", "v", "P")


def _style_keys(div: pd.DataFrame) -> dict:
    """Colour per variant and marker per dtype, the same in every figure of a report."""
    from matplotlib import colormaps
    colors = colormaps["tab10"].colors
    return {"color": {v: colors[i % len(colors)] for i, v in enumerate(pd.unique(div["variant"]))},
            "marker": {d: MARKERS[i % len(MARKERS)] for i, d in enumerate(pd.unique(div["dtype"]))}}


MAX_PLOT_KINDS = 5  # panels per figure: the key kinds plus the kinds that fail


def _plot_kinds(family: str, g: pd.DataFrame) -> list[str]:
    """The block output (the stream the next layer inherits), the attention scores (where raw
    q.k^T overflows) and the MLP activation (where large pre-activations bite), then every
    other site kind that is not a pass somewhere (GPT-J's attn.probs, say), in execution
    order, up to MAX_PLOT_KINDS."""
    present = list(pd.unique(g["kind"]))
    out = block_output_site(family) if family in FAMILIES else "resid_post"
    kinds = [k for k in (out, "attn.scores", "mlp.act") if k in present]
    bad = g[~g["verdict"].isin(["pass", "not_exposed"])]
    kinds += [k for k in pd.unique(bad["kind"]) if k not in kinds]
    return kinds[:MAX_PLOT_KINDS]


def plot_errors(g: pd.DataFrame, family: str, style: dict) -> bytes | None:
    """PNG of rel_l2 and floor_ratio against layer for one family x checkpoint, or None when it
    has no block sites. Built on a bare Figure (no pyplot state) with Matplotlib's default
    style, fixed dpi and no metadata, so the bytes depend on the data alone."""
    import matplotlib as mpl
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    g = g[g["layer"].notna()]
    kinds = _plot_kinds(family, g)
    if not kinds:
        return None
    with mpl.rc_context():
        mpl.rcdefaults()
        # a fixed title height skips the per-draw title placement (a third of the time)
        mpl.rcParams.update({"font.size": 8, "axes.titlesize": 9, "axes.titley": 1.0})
        width = 2.9 * len(kinds) + 1.4      # inches; the legend takes the last 1.4
        fig = Figure(figsize=(width, 4.6), dpi=PNG_DPI)
        # fixed margins: constrained layout would measure every tick label, 5x the cost
        fig.subplots_adjust(left=0.6 / width, right=1 - 1.5 / width, bottom=0.1, top=0.93,
                            wspace=0.3, hspace=0.3)
        axes = fig.subplots(2, len(kinds), squeeze=False, sharex=True)
        for j, kind in enumerate(kinds):
            k = g[g["kind"] == kind]
            for row, metric in enumerate(("rel_l2", "floor_ratio")):
                ax = axes[row][j]
                _draw_lines(ax, k, metric, style)
                if metric == "floor_ratio":
                    for b in sorted(pd.unique(k["budget_fail"].dropna())):
                        ax.axhline(float(b), color="0.55", linestyle=":", linewidth=1)
                    ax.set_xlabel("layer")
                what = f"{kind} (block output)" if kind == kinds[0] else kind
                ax.set_title(f"{what}: {metric}")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(True, which="major", alpha=0.3)
        handles = ([Line2D([], [], color=c, label=v) for v, c in style["color"].items()
                    if v in set(g["variant"])]
                   + [Line2D([], [], color="0.3", marker=m, linestyle="", label=d)
                      for d, m in style["marker"].items() if d in set(g["dtype"])]
                   + [Line2D([], [], color="0.3", linestyle="-", label="accumulated"),
                      Line2D([], [], color="0.3", linestyle="--", label="local")])
        fig.legend(handles=handles, loc="upper right", frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return buf.getvalue()


def _draw_lines(ax, k: pd.DataFrame, metric: str, style: dict) -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    # plain NumPy columns: a pandas groupby here costs more than the drawing
    var, dt, mode = (k[c].astype(str).to_numpy() for c in ("variant", "dtype", "mode"))
    layer = k["layer"].astype("int64").to_numpy()
    val = k[metric].astype("float64").to_numpy()
    bad_all = (k["nonfinite"].to_numpy() > 0) | (k["verdict"].to_numpy() == "overflow")
    drawn = False
    for v, d, m in dict.fromkeys(zip(var, dt, mode)):
        sel = (var == v) & (dt == d) & (mode == m)
        order = np.argsort(layer[sel], kind="stable")
        x, y, bad = layer[sel][order], val[sel][order], bad_all[sel][order]
        y = np.where(np.isfinite(y) & (y > 0) & ~bad, y, np.nan)
        kw = dict(color=style["color"][v], marker=style["marker"][d], markersize=3.5,
                  linewidth=1.2, linestyle="-" if m == "accumulated" else "--")
        ax.plot(x, y, **kw)
        if bad.any():   # non-finite: no point on a log axis, so a mark on the top edge,
            # nudged per variant so that variants overflowing at one layer stay distinguishable
            colors = list(style["color"])
            nudge = 0.08 * (colors.index(v) - (len(colors) - 1) / 2)
            ax.plot(x[bad] + nudge, np.ones(bad.sum()), transform=ax.get_xaxis_transform(),
                    linestyle="", marker="v", color=kw["color"], markersize=6, clip_on=False)
        drawn = drawn or bool(np.isfinite(y).any())
    if drawn:
        ax.set_yscale("log")
        # labelled ticks at 1, 2, 5 x 10^k (a healthy run spans less than a decade) and no
        # unlabelled minor ticks, which cost more to lay out than the lines themselves
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=8))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
