"""Figures of persona drift: per-turn traces, a token-level view, the drift table, the patching
heatmap over turns × layers, and the screening histogram. DataFrame in, ``go.Figure`` out."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from lens_roles.errors import PlotError
from lens_roles.viz.style import PALETTE, style


def _need(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    if not isinstance(frame, pd.DataFrame) or frame.empty:
        raise PlotError(f"{what}: no rows to plot")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PlotError(f"{what}: the frame lacks column(s) {missing}")


def turn_trace(turns: pd.DataFrame, *, title: str = "Projection per assistant turn",
               subtitle: str | None = None) -> go.Figure:
    """One line per conversation: mean projection of each assistant turn, coloured by category.

    ``turns``: rows of ``DriftTrace.assistant_turns(layer)`` (``conversation, category, turn,
    projection``), several conversations concatenated; an optional ``condition`` column
    (e.g. capped / uncapped) is drawn dashed for its second value.
    """
    _need(turns, ("conversation", "category", "turn", "projection"), "turn_trace")
    cats = list(dict.fromkeys(turns.category))
    if "condition" not in turns.columns:
        turns = turns.assign(condition="")
    conds = list(dict.fromkeys(turns.condition))
    fig = go.Figure()
    shown = set()
    for (conv, cond), g in turns.groupby(["conversation", "condition"], sort=False):
        cat = g.category.iloc[0]
        name = f"{cat} ({cond})" if cond else cat
        dash = "dash" if cond != conds[0] else None
        fig.add_trace(go.Scatter(
            x=g.turn, y=g.projection, mode="lines+markers", name=name, legendgroup=name,
            showlegend=name not in shown, line=dict(color=PALETTE[cats.index(cat) % len(PALETTE)], dash=dash),
            hovertemplate=f"{html.escape(str(conv))}<br>turn %{{x}}<br>projection %{{y:.3f}}<extra></extra>"))
        shown.add(name)
    fig.update_xaxes(title="assistant turn", dtick=1)
    fig.update_yaxes(title="mean projection over the reply")
    return style(fig, title, subtitle)


def token_view(tokens: pd.DataFrame, *, title: str = "Projection per token", subtitle: str | None = None,
               per_row: int = 24) -> go.Figure:
    """The conversation's tokens laid out as text in rows, each cell coloured by its projection.

    ``tokens``: ``DriftTrace.token_frame(layer)`` (``pos, token, role, projection``).
    Template tokens are drawn too (their role is ``template``); hover shows the value.
    """
    _need(tokens, ("pos", "token", "role", "projection"), "token_view")
    n = len(tokens)
    rows = (n + per_row - 1) // per_row
    z = [[None] * per_row for _ in range(rows)]
    text = [[""] * per_row for _ in range(rows)]
    hover = [[""] * per_row for _ in range(rows)]
    for i, rec in enumerate(tokens.itertuples()):
        r, c = divmod(i, per_row)
        z[r][c] = rec.projection
        shown = str(rec.token).replace("\n", "↵")
        text[r][c] = html.escape(shown)
        hover[r][c] = f"{rec.pos} {html.escape(repr(rec.token))} ({rec.role}): {rec.projection:.3f}"
    values = tokens.projection
    mid = float(values.median())
    span = float(max(values.max() - mid, mid - values.min(), 1e-9))
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
                               colorscale="RdBu", zmin=mid - span, zmax=mid + span, xgap=1, ygap=1,
                               colorbar=dict(title="projection")))
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(height=max(300, 28 * rows + 120))
    return style(fig, title, subtitle)


def drift_bars(table: pd.DataFrame, *, title: str = "Drift from first to last assistant turn",
               subtitle: str | None = None) -> go.Figure:
    """Mean change per category with its bootstrap interval (``drift_table`` rows; grouped by ``condition``)."""
    _need(table, ("category", "mean", "low", "high"), "drift_bars")
    fig = go.Figure()
    conds = list(dict.fromkeys(table["condition"])) if "condition" in table.columns else [None]
    for j, cond in enumerate(conds):
        g = table if cond is None else table[table.condition == cond]
        fig.add_trace(go.Bar(x=g.category, y=g["mean"], name=str(cond or "drift"), marker_color=PALETTE[j],
                             error_y=dict(type="data", symmetric=False, array=g.high - g["mean"],
                                          arrayminus=g["mean"] - g.low)))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="mean change in projection (last − first turn)")
    return style(fig, title, subtitle)


def turn_layer_heatmap(grid: pd.DataFrame, *, title: str = "Which earlier turns carry the drift",
                       subtitle: str | None = None) -> go.Figure:
    """``DriftExplanation.grid`` as a heatmap: earlier messages (rows, in order) × layers, value 0..1."""
    _need(grid, ("label", "layer", "value"), "turn_layer_heatmap")
    order = list(dict.fromkeys(grid.label))
    table = grid.pivot(index="label", columns="layer", values="value").loc[order]
    bound = float(max(1.0, table.abs().max().max()))
    fig = go.Figure(go.Heatmap(z=table.values, x=[str(c) for c in table.columns], y=order, colorscale="RdBu_r",
                               zmid=0, zmin=-bound, zmax=bound, colorbar=dict(title="restored<br>(0..1)"),
                               hovertemplate="%{y}<br>layer %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="patched message (turn:role)")
    fig.update_xaxes(title="layer (residual stream entering it)")
    return style(fig, title, subtitle)


def screen_histogram(ranking: pd.DataFrame, *, title: str = "Screening: projection of response minus own response",
                     subtitle: str | None = None, top: int = 5) -> go.Figure:
    """Histogram of the screening ``score``; the ``top`` highest records marked and labelled by rank."""
    _need(ranking, ("score", "rank"), "screen_histogram")
    fig = go.Figure(go.Histogram(x=ranking.score, nbinsx=min(40, max(5, len(ranking))), marker_color=PALETTE[0],
                                 name="records"))
    head = ranking.nsmallest(top, "rank")
    fig.add_trace(go.Scatter(x=head.score, y=[0] * len(head), mode="markers+text", text=[f"#{r}" for r in head["rank"]],
                             textposition="top center", marker=dict(color=PALETTE[3], size=9), name=f"top {top}"))
    fig.update_xaxes(title="projection(response) − projection(own response)")
    fig.update_yaxes(title="records")
    return style(fig, title, subtitle)


__all__ = ["turn_trace", "token_view", "drift_bars", "turn_layer_heatmap", "screen_histogram"]
