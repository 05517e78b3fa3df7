"""Figures of directions over depth: profiles, layer heatmaps, per-layer lines."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_roles.errors import PlotError
from lens_roles.viz.style import PALETTE, style


def direction_profile(frame: pd.DataFrame, *, title: str = "Direction profile by layer",
                      subtitle: str | None = None,
                      panels: tuple[tuple[str, str], ...] = (
                          ("norm", "Raw norm ‖v‖"),
                          ("auc", "Held-out AUC vs baseline / negatives"),
                          ("auc_vs_roles", "Held-out AUC vs other roles"),
                      )) -> go.Figure:
    """Panels over depth, one line per direction, one panel per metric present in ``frame``.

    Args:
        frame: columns ``direction, layer, metric, value`` (and optionally ``kind``;
            directions of kind ``"persona"`` are drawn black and thick).
        panels: ``(metric, panel title)`` pairs; metrics absent from ``frame`` are skipped.
    """
    panels = tuple(p for p in panels if (frame.metric == p[0]).any())
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels], horizontal_spacing=0.07)
    kinds = frame.groupby("direction")["kind"].first() if "kind" in frame else {}
    names = sorted(frame.direction.unique())
    for col, (metric, _) in enumerate(panels, start=1):
        sub = frame[frame.metric == metric]
        for i, name in enumerate(names):
            grp = sub[sub.direction == name].sort_values("layer")
            if grp.empty:
                continue
            persona = kinds.get(name) == "persona"
            line = dict(width=3.5, color="black") if persona else dict(width=1.3, color=PALETTE[i % len(PALETTE)])
            fig.add_trace(go.Scatter(x=grp.layer, y=grp.value, mode="lines", name=str(name), legendgroup=str(name),
                                     showlegend=col == 1, line=line,
                                     hovertemplate=f"{name}<br>layer %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>"),
                          row=1, col=col)
        if metric.startswith("auc"):
            low = min(0.4, float(sub.value.min()) - 0.02) if len(sub) else 0.4
            fig.update_yaxes(range=[low, 1.02], row=1, col=col)
            fig.add_hline(y=0.5, line=dict(dash="dot", color="grey"), row=1, col=col)
    fig.update_xaxes(title_text="layer")
    n_names = len(names)
    fig.update_layout(width=520 * len(panels) + 180, height=max(520, 20 * n_names + 200),
                      legend=dict(font=dict(size=10), tracegroupgap=0))
    return style(fig, title, subtitle)


def layer_heatmap(frame: pd.DataFrame, *, metric: str = "auc", title: str | None = None,
                  subtitle: str | None = None, zmin: float | None = None, zmax: float | None = None,
                  zmid: float | None = None, colorscale: str = "Viridis", order: str = "peak") -> go.Figure:
    """Heatmap of one metric, directions (rows) × layers (columns).

    Args:
        order: ``"peak"`` sorts rows by the layer where each direction peaks,
            ``"mean"`` by the mean over layers (highest on top).
        zmid: centre of a diverging colour scale (e.g. 0.5 for AUC).
    """
    sub = frame[frame.metric == metric]
    table = sub.pivot_table(index="direction", columns="layer", values="value")
    if order == "peak":
        table = table.loc[table.idxmax(axis=1).sort_values(kind="stable").index]
    elif order == "mean":
        table = table.loc[table.mean(axis=1).sort_values(kind="stable").index]
    else:
        raise PlotError(f"order must be 'peak' or 'mean', got {order!r}")
    fig = go.Figure(go.Heatmap(z=table.values, x=list(table.columns), y=list(table.index), zmin=zmin, zmax=zmax,
                               zmid=zmid, colorscale=colorscale, colorbar=dict(title=metric),
                               hovertemplate="%{y}<br>layer %{x}<br>" + metric + " %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="layer", dtick=2)
    fig.update_yaxes(title_text="", tickfont=dict(size=10))
    fig.update_layout(width=900, height=max(360, 18 * len(table) + 140))
    return style(fig, title or f"{metric} by layer", subtitle)


def line_by_layer(frame: pd.DataFrame, *, title: str, subtitle: str | None = None,
                  y_title: str = "value") -> go.Figure:
    """One line per direction of ``value`` over ``layer`` (columns ``direction, layer, value``)."""
    fig = go.Figure()
    for name, grp in frame.groupby("direction", sort=True):
        grp = grp.sort_values("layer")
        fig.add_trace(go.Scatter(x=grp.layer, y=grp.value, mode="lines+markers", name=str(name)))
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text=y_title)
    fig.update_layout(width=800, height=420)
    return style(fig, title, subtitle)
