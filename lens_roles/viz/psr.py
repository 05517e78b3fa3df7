"""Figures of Prompt Steering Replacement: matched-coherence curves and per-token λ heatmaps."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from lens_roles.errors import PlotError
from lens_roles.viz.style import style

_PSR_COLORS = {"none": "#7f7f7f", "prompting": "#2ca02c", "constant": "#1f77b4", "psr": "#d62728"}


_PSR_NAMES = {"none": "no intervention", "prompting": "prompting", "constant": "constant steering", "psr": "PSR"}


_PSR_Y = {"margin": "persona adherence: log-prob margin<br>(positive − negative reply)",
          "mean_strength": "mean steering strength α·mean(λ)<br>(prompting and none: 0)"}


def psr_coherence_curve(curve: pd.DataFrame, table: pd.DataFrame | None = None, *,
                        title: str = "Behaviour against coherence: constant steering, PSR and prompting",
                        subtitle: str | None = None, y: str = "margin") -> go.Figure:
    """Persona margin (or another ``y`` column) against perplexity, one line per steering method (sorted by α).

    Args:
        curve: ``method, alpha, perplexity`` and the ``y`` column (every evaluated point).
        table: the matched points (``method, perplexity`` and ``y``), drawn as large
            markers; the target perplexity as a dashed line when present.
        y: ``"margin"`` (persona adherence) or ``"mean_strength"`` (how hard each
            method steers to reach a perplexity: a role, which has no contrast pairs).
    """
    if y not in _PSR_Y:
        raise PlotError(f"unknown y {y!r}; use one of {list(_PSR_Y)}")
    curve = curve.assign(**{y: curve[y].fillna(0.0)}) if y == "mean_strength" else curve
    if table is not None and y == "mean_strength":
        table = table.assign(mean_strength=table.mean_strength.fillna(0.0))
    fig = go.Figure()
    for method in ("constant", "psr", "none", "prompting"):
        part = curve[curve.method == method].sort_values("alpha")
        if part.empty:
            continue
        mode = "lines+markers" if method in ("constant", "psr") else "markers"
        fig.add_trace(go.Scatter(x=part.perplexity, y=part[y], mode=mode, name=_PSR_NAMES[method],
                                 marker=dict(color=_PSR_COLORS[method], size=8),
                                 line=dict(color=_PSR_COLORS[method]),
                                 text=[f"α={a:.3g}" for a in part.alpha],
                                 hovertemplate="%{text}<br>perplexity %{x:.2f}<br>" + y
                                               + " %{y:.3f}<extra></extra>"))
    if table is not None:
        for _, row in table.iterrows():
            fig.add_trace(go.Scatter(x=[row.perplexity], y=[row[y]], mode="markers", showlegend=False,
                                     marker=dict(color=_PSR_COLORS.get(row.method, "#000"), size=16, symbol="star",
                                                 line=dict(color="black", width=1)),
                                     hovertemplate=f"{_PSR_NAMES.get(row.method, row.method)} (matched)"
                                                   "<extra></extra>"))
        if "target_perplexity" in table:
            # a line trace, not add_vline: plotly places vline annotations in log10 units on log axes
            target = float(table.target_perplexity.iloc[0])
            ys = list(curve[y]) + list(table[y])
            fig.add_trace(go.Scatter(x=[target, target], y=[min(ys), max(ys)], mode="lines", name="target coherence",
                                     line=dict(color="#555", dash="dash", width=1)))
    fig.update_xaxes(title="perplexity of generations under the unsteered model (lower = more coherent)",
                     type="log")
    fig.update_yaxes(title=_PSR_Y[y])
    fig = style(fig, title, subtitle)
    fig.update_layout(margin=dict(l=100, t=110))
    return fig


def token_heatmap(frame: pd.DataFrame, *, value: str = "lam", row: str = "layer", prompt: int = 0,
                  title: str = "PSR coefficient λ per token", subtitle: str | None = None,
                  colorbar: str | None = None) -> go.Figure:
    """Heatmap of ``value`` over the tokens of one prompt (x) and ``row`` (y, e.g. layer).

    ``frame`` needs ``prompt, position, token`` and the ``row`` and ``value`` columns
    (from :func:`lens_roles.interventions.psr.token_coefficients` or
    :func:`lens_roles.interventions.psr.prompt_steering`).
    """
    part = frame[frame.prompt == prompt]
    table = part.pivot_table(index=row, columns="position", values=value, aggfunc="mean").sort_index()
    tokens = part.drop_duplicates("position").set_index("position").token.reindex(table.columns)
    labels = [f"{t!r}"[1:-1].replace(" ", "·") or "∅" for t in tokens]
    x = [f"{p}:{lab}" for p, lab in zip(table.columns, labels)]
    diverging = bool((table.values < 0).any())
    fig = go.Figure(go.Heatmap(z=table.values, x=x, y=[f"{row} {r}" for r in table.index],
                               colorscale="RdBu" if diverging else "Viridis", zmid=0 if diverging else None,
                               colorbar=dict(title=colorbar or value)))
    fig.update_xaxes(tickangle=-60, tickfont=dict(size=9), title="token")
    fig.update_layout(height=max(320, 120 + 22 * len(table.index)), width=max(700, 16 * len(x) + 200))
    return style(fig, title, subtitle)
