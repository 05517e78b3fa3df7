"""Figures of SAE features: aligned features, decompositions, attribution checked by ablation."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_roles.errors import PlotError
from lens_roles.measures.statistics import pearson
from lens_roles.viz.style import PALETTE, style


#: Bar colours of features that are not live: dead (never fire) lighter than dense (fire on > 10 %).
STATUS_GREY = {"dead": "#cfcfcf", "dense": "#8c8c8c"}


def sae_alignment_bars(frames: dict, *, title: str = "SAE features aligned with the direction",
                       subtitle: str | None = None) -> go.Figure:
    """Cosine of the top decoder rows with each direction, one panel per ``label → alignment frame``
    (columns ``feature, cosine``, as from ``features.feature_alignment``), best at the top.

    Where a frame has the ``status`` column (alignment with ``frequencies``), dead and dense
    features are named so on their bar and drawn grey: a dead row's or a dense feature's cosine
    says little about what the direction is made of."""
    labels = list(frames)
    if not labels:
        raise PlotError("no alignment frames to plot")
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, horizontal_spacing=0.12)
    for c, label in enumerate(labels, start=1):
        sub = frames[label].iloc[::-1]
        status = list(sub["status"]) if "status" in sub else [None] * len(sub)
        names = [f"f{int(f)}" + (f" ({s})" if s in STATUS_GREY else "") for f, s in zip(sub.feature, status)]
        colours = [STATUS_GREY.get(s, PALETTE[(c - 1) % len(PALETTE)]) for s in status]
        fig.add_trace(go.Bar(x=sub.cosine, y=names, orientation="h", marker_color=colours, showlegend=False,
                             hovertemplate="feature %{y}<br>cosine %{x:.3f}<extra></extra>"), row=1, col=c)
        fig.update_xaxes(title_text="cosine with decoder row", row=1, col=c)
    n = max(len(f) for f in frames.values())
    fig.update_layout(width=330 * len(labels) + 120, height=max(360, 22 * n + 160))
    return style(fig, title, subtitle)


def decomposition_plot(decompositions: dict, *, title: str = "Sparse non-negative decomposition into features",
                       subtitle: str | None = None) -> go.Figure:
    """Left: relative residual ``‖v − Σ c_i d_i‖/‖v‖`` against the number of features, one line per
    direction. Right: the coefficients (as a share of ``‖v‖``) of the features kept, per direction."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["residual as features are added",
                                                        "coefficients / ‖v‖"], horizontal_spacing=0.14)
    for i, (label, dec) in enumerate(decompositions.items()):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=list(range(1, len(dec.steps) + 1)), y=list(dec.steps), mode="lines+markers",
                                 name=label, line=dict(color=color), legendgroup=label), row=1, col=1)
        frame = dec.to_frame()
        fig.add_trace(go.Bar(x=[f"f{int(f)}" for f in frame.feature], y=frame.share, name=label,
                             marker_color=color, legendgroup=label, showlegend=False,
                             hovertemplate="feature %{x}<br>share %{y:.3f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="features in the decomposition", row=1, col=1)
    fig.update_yaxes(title_text="relative residual", range=[0, 1.02], row=1, col=1)
    fig.update_layout(width=1100, height=440, barmode="group")
    return style(fig, title, subtitle)


def attribution_check_scatter(check: pd.DataFrame, *, title: str = "Feature attribution against ablation",
                              subtitle: str | None = None) -> go.Figure:
    """Measured change of the metric when a feature is ablated (x) against the attribution's
    prediction ``−attribution`` (y), one point per feature; dotted: y = x; Pearson r in the title."""
    lo = float(min(check.predicted.min(), check.actual.min()))
    hi = float(max(check.predicted.max(), check.actual.max()))
    r = pearson(check.predicted, check.actual) if len(check) > 2 else float("nan")
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), showlegend=False,
                   hoverinfo="skip"),
        go.Scatter(x=check.actual, y=check.predicted, mode="markers+text", text=[f"f{int(f)}" for f in check.feature],
                   textposition="top center", textfont=dict(size=10), showlegend=False,
                   marker=dict(size=8, color=PALETTE[0]),
                   hovertemplate="%{text}<br>ablation %{x:.3f}<br>predicted %{y:.3f}<extra></extra>"),
    ])
    fig.update_xaxes(title_text="Δ metric when the feature is ablated (measured)")
    fig.update_yaxes(title_text="Δ predicted by gradient × activation")
    fig.update_layout(width=620, height=520)
    return style(fig, f"{title} (r = {r:.2f}, {len(check)} features)", subtitle)
