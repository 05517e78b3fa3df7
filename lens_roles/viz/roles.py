"""Figures of the role study: role × domain heatmaps, in/off-domain bars, selection, A/B curves, role geometry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_roles.errors import PlotError
from lens_roles.viz.style import PALETTE, style, title_text


def role_domain_heatmap(table: pd.DataFrame, *, condition: str, metric: str = "accuracy",
                        title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """Change in ``metric`` from no intervention, roles (rows) × domains (columns), for one condition.

    Each cell shows the change with its paired interval (hover and text); in-domain
    cells are starred. ``table`` is :attr:`lens_roles.studies.role_study.RoleStudy.table`.
    """
    sub = table[(table.condition == condition) & (table.metric == metric)]
    if sub.empty:
        raise PlotError(f"no {metric!r} rows for condition {condition!r}; the table has conditions "
                        f"{sorted(set(table.condition))} and metrics {sorted(set(table.metric))}")
    z = sub.pivot_table(index="role", columns="domain", values="delta", sort=False)
    lo = sub.pivot_table(index="role", columns="domain", values="delta_lo", sort=False).loc[z.index, z.columns]
    hi = sub.pivot_table(index="role", columns="domain", values="delta_hi", sort=False).loc[z.index, z.columns]
    home = set(zip(sub[sub.in_domain].role, sub[sub.in_domain].domain))
    text = [[("★ " if (r, d) in home else "") + f"{z.iat[i, j]:+.2f}<br>[{lo.iat[i, j]:+.2f}, {hi.iat[i, j]:+.2f}]"
             for j, d in enumerate(z.columns)] for i, r in enumerate(z.index)]
    bound = max(0.05, float(abs(sub[["delta_lo", "delta_hi"]]).max().max()))
    fig = go.Figure(go.Heatmap(z=z.values, x=list(z.columns), y=list(z.index), zmid=0, zmin=-bound, zmax=bound,
                               colorscale="RdBu", text=text, texttemplate="%{text}", textfont=dict(size=9),
                               colorbar=dict(title=f"Δ {metric}"),
                               hovertemplate="%{y} on %{x}<br>Δ %{text}<extra></extra>"))
    fig.update_xaxes(title_text="question domain", tickangle=-30)
    fig.update_yaxes(title_text="role", autorange="reversed")
    fig.update_layout(width=140 + 105 * z.shape[1], height=max(380, 52 * z.shape[0] + 170))
    return style(fig, title or f"{condition}: change in {metric} from no intervention (★ in-domain)", subtitle)


def in_off_domain_bars(summary: pd.DataFrame, *, metric: str = "accuracy", title: str | None = None,
                       subtitle: str | None = None) -> go.Figure:
    """Mean change in ``metric`` per condition, in-domain vs off-domain cells, with interval bars."""
    sub = summary[summary.metric == metric]
    fig = go.Figure()
    for in_domain, colour in ((True, "#d62728"), (False, "#7f7f7f")):
        grp = sub[sub.in_domain == in_domain]
        fig.add_trace(go.Bar(x=grp.condition, y=grp.delta, name="in-domain" if in_domain else "off-domain",
                             marker_color=colour,
                             customdata=grp[["lo", "hi", "cells"]].values,
                             error_y=dict(type="data", symmetric=False, array=grp.hi - grp.delta,
                                          arrayminus=grp.delta - grp.lo),
                             hovertemplate="%{x}<br>Δ %{y:+.3f} [%{customdata[0]:+.3f}, %{customdata[1]:+.3f}]"
                                           "<br>%{customdata[2]} cells<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="black", width=1))
    fig.update_layout(barmode="group", width=700, height=450)
    fig.update_yaxes(title_text=f"Δ {metric} vs no intervention")
    return style(fig, title or f"Role interventions: change in {metric}, in-domain vs off-domain", subtitle)


def selection_heatmap(selection: pd.DataFrame, *, title: str = "Validation accuracy of activation addition",
                      subtitle: str | None = None) -> go.Figure:
    """One small heatmap per role: validation accuracy over layer × α; the choice is starred."""
    roles = list(dict.fromkeys(selection.role))
    cols = min(4, len(roles))
    rows = -(-len(roles) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=roles, horizontal_spacing=0.06, vertical_spacing=0.12)
    lo, hi = float(selection.accuracy.min()), float(selection.accuracy.max())
    for k, role in enumerate(roles):
        grp = selection[selection.role == role]
        t = grp.pivot_table(index="alpha", columns="layer", values="accuracy")
        star = grp.pivot_table(index="alpha", columns="layer", values="chosen", aggfunc="max").loc[t.index, t.columns]
        text = [["★" if star.iat[i, j] else "" for j in range(t.shape[1])] for i in range(t.shape[0])]
        fig.add_trace(go.Heatmap(z=t.values, x=[str(c) for c in t.columns], y=[f"{a:g}" for a in t.index],
                                 zmin=lo, zmax=hi, colorscale="Viridis", showscale=k == 0, text=text,
                                 texttemplate="%{text}", colorbar=dict(title="val acc"),
                                 hovertemplate="layer %{x}<br>α %{y}<br>accuracy %{z:.3f}<extra></extra>"),
                      row=k // cols + 1, col=k % cols + 1)
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="α", type="category")
    fig.update_layout(width=300 * cols + 120, height=260 * rows + 120)
    return style(fig, title, subtitle)


def ab_curves(frame: pd.DataFrame, *, title: str = "Behaviour A/B curves", subtitle: str | None = None) -> go.Figure:
    """p(answer matching the behaviour) against the multiplier, one line per behaviour, with intervals.

    ``frame``: columns ``behaviour, multiplier, p_match, lo, hi`` (see :func:`lens_roles.studies.ab_curves.ab_curve`).
    """
    fig = go.Figure()
    for i, (name, grp) in enumerate(frame.groupby("behaviour", sort=True)):
        grp = grp.sort_values("multiplier")
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=list(grp.multiplier) + list(grp.multiplier[::-1]),
                                 y=list(grp.hi) + list(grp.lo[::-1]), mode="lines", fill="toself", fillcolor=colour,
                                 opacity=0.15, line=dict(width=0), hoverinfo="skip", showlegend=False,
                                 legendgroup=str(name)))
        layer = f" (layer {int(grp.layer.iloc[0])})" if "layer" in grp else ""
        fig.add_trace(go.Scatter(x=grp.multiplier, y=grp.p_match, mode="lines+markers", name=f"{name}{layer}",
                                 legendgroup=str(name), line=dict(color=colour, width=2),
                                 hovertemplate=f"{name}<br>multiplier %{{x}}<br>p(match) %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(dash="dot", color="grey"))
    fig.update_xaxes(title_text="multiplier of the steering vector")
    fig.update_yaxes(title_text="p(answer matching the behaviour)", range=[0, 1])
    fig.update_layout(width=820, height=480)
    return style(fig, title, subtitle)


def role_cosine_heatmap(frame: pd.DataFrame, *, layer: int | None = None, title: str | None = None,
                        subtitle: str | None = None) -> go.Figure:
    """Cosine similarity of role vectors, roles × roles, with a slider over layers.

    ``frame``: columns ``role_a, role_b, layer, value`` (see :func:`lens_roles.directions.geometry.cosine_matrix`).
    Rows are ordered by hierarchical clustering at ``layer`` (default: the middle
    layer present), so that roles sharing a direction sit together; the slider
    keeps that order.
    """
    layers = sorted(frame.layer.unique())
    layer = layer if layer is not None else layers[len(layers) // 2]
    order = _cluster_order(frame[frame.layer == layer].pivot_table(index="role_a", columns="role_b", values="value"))
    tables = {ly: frame[frame.layer == ly].pivot_table(index="role_a", columns="role_b", values="value")
              .loc[order, order] for ly in layers}
    fig = go.Figure()
    for ly in layers:
        t = tables[ly]
        fig.add_trace(go.Heatmap(z=t.values, x=order, y=order, zmin=-1, zmax=1, zmid=0, colorscale="RdBu_r",
                                 visible=ly == layer, colorbar=dict(title="cosine"),
                                 hovertemplate="%{y} · %{x}<br>cosine %{z:.2f}<extra></extra>"))
    steps = [dict(method="update", label=str(ly), args=[{"visible": [m == ly for m in layers]},
                                                        {"title.text": title_text(title, ly, subtitle)}])
             for ly in layers]
    fig.update_layout(sliders=[dict(active=layers.index(layer), steps=steps, currentvalue=dict(prefix="layer "),
                                    pad=dict(t=40))])
    fig.update_xaxes(tickangle=-45, tickfont=dict(size=10))
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10))
    n = len(order)
    fig.update_layout(width=max(560, 22 * n + 260), height=max(560, 22 * n + 260))
    fig = style(fig, "", None)
    fig.update_layout(title=dict(text=title_text(title, layer, subtitle)))
    return fig


def _cluster_order(table: pd.DataFrame) -> list:
    """Leaf order of average-linkage clustering on 1 − cosine (greedy nearest-neighbour chain)."""
    names = list(table.index)
    dist = 1 - table.loc[names, names].to_numpy(float)
    clusters = [[i] for i in range(len(names))]
    while len(clusters) > 1:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(np.mean(dist[np.ix_(clusters[a], clusters[b])]))
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return [names[i] for i in clusters[0]]


def role_map(frame: pd.DataFrame, *, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """2-D map of roles at one layer (columns ``role, x, y, group``; see
    :func:`lens_roles.directions.geometry.role_map`)."""
    fig = go.Figure()
    groups = list(dict.fromkeys(frame.group.fillna("other")))
    for i, g in enumerate(groups):
        grp = frame[frame.group.fillna("other") == g]
        fig.add_trace(go.Scatter(x=grp.x, y=grp.y, mode="markers+text", text=grp.role, name=str(g),
                                 textposition="top center", textfont=dict(size=10),
                                 marker=dict(size=10, color="#aaaaaa" if g == "other" else PALETTE[i % len(PALETTE)])))
    layer = int(frame.layer.iloc[0])
    var = frame.attrs.get("explained_variance")
    axis = (lambda k: f"PC{k + 1} ({var[k]:.0%} of variance)") if var is not None else (lambda k: f"PC{k + 1}")
    fig.update_xaxes(title_text=axis(0), zeroline=True)
    fig.update_yaxes(title_text=axis(1), zeroline=True)
    fig.update_layout(width=860, height=640, legend=dict(title="domain"))
    return style(fig, title or f"Role vectors at layer {layer}, first two principal components", subtitle)
