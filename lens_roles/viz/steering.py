"""Figures of steering sweeps: cosine to the unsteered run, adherence and coherence against α."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_roles.errors import PlotError
from lens_roles.viz.style import px_colors, style


def cosine_vs_alpha(frame: pd.DataFrame, steer_layer: int, *, title: str | None = None,
                    subtitle: str | None = None) -> go.Figure:
    """Cosine(steered, unsteered) against α, one line per downstream layer, plus a heatmap.

    Args:
        frame: a :func:`lens_roles.measures.sweeps.cosine_sweep` frame.
    """
    sub = frame[(frame.metric == "cosine") & (frame.layer == steer_layer)]
    if sub.empty:
        raise PlotError(f"no cosine rows for steering layer {steer_layer} (layers in the frame: "
                        f"{sorted(set(frame.layer))}); pass one of those or sweep this layer")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per downstream layer", "layer × α"),
                        horizontal_spacing=0.2)
    layers = sorted(sub.read_layer.unique())
    scale = px_colors(len(layers))
    for colour, layer in zip(scale, layers):
        grp = sub[sub.read_layer == layer].sort_values("alpha")
        fig.add_trace(go.Scatter(x=grp.alpha, y=grp.value, mode="lines+markers", name=f"layer {layer}",
                                 line=dict(color=colour, width=1.5), marker=dict(size=4)), row=1, col=1)
    table = sub.pivot_table(index="read_layer", columns="alpha", values="value")
    fig.add_trace(go.Heatmap(z=table.values, x=[f"{a:g}" for a in table.columns], y=list(table.index),
                             colorscale="Viridis", zmax=1.0, colorbar=dict(title="cosine", x=1.02),
                             hovertemplate="layer %{y}<br>α %{x}<br>cosine %{z:.3f}<extra></extra>"), row=1, col=2)
    mode = sub.alpha_mode.iloc[0] if "alpha_mode" in sub else "absolute"
    alpha_title = "α (× typical residual norm)" if mode == "relative" else "α (residual units)"
    fig.update_xaxes(title_text=alpha_title, row=1, col=1)
    fig.update_xaxes(title_text=alpha_title, type="category", row=1, col=2)
    fig.update_yaxes(title_text="cosine(steered, unsteered)", row=1, col=1)
    fig.update_yaxes(title_text="downstream layer", row=1, col=2)
    fig.update_layout(width=1300, height=560, legend=dict(font=dict(size=9), x=0.41, y=1.0, xanchor="left"))
    return style(fig, title or f"Steering at layer {steer_layer}: similarity to the unsteered run", subtitle)


def behaviour_vs_alpha(frame: pd.DataFrame, *, title: str = "Persona adherence and coherence against α",
                       subtitle: str | None = None,
                       panels: tuple[tuple[str, str], ...] = (
                           ("logprob_margin", "adherence: log p(positive) − log p(negative), per token"),
                           ("kl_from_unsteered", "next-token KL from the unsteered model"),
                           ("perplexity", "perplexity of generations (unsteered model)"),
                           ("repetition", "repeated 3-grams in generations"),
                       )) -> go.Figure:
    """One panel per metric present, one line per steering layer, against α."""
    panels = tuple(p for p in panels if (frame.metric == p[0]).any())
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels], horizontal_spacing=0.06)
    steer_layers = sorted(frame.layer.unique())
    colours = px_colors(len(steer_layers))
    for col, (metric, _) in enumerate(panels, start=1):
        for colour, layer in zip(colours, steer_layers):
            grp = frame[(frame.metric == metric) & (frame.layer == layer)].sort_values("alpha")
            fig.add_trace(go.Scatter(x=grp.alpha, y=grp.value, mode="lines+markers", name=f"steer layer {layer}",
                                     legendgroup=str(layer), showlegend=col == 1, line=dict(color=colour)),
                          row=1, col=col)
    mode = frame.alpha_mode.iloc[0] if "alpha_mode" in frame else "absolute"
    fig.update_xaxes(title_text="α (× typical residual norm)" if mode == "relative" else "α")
    fig.update_layout(width=430 * len(panels) + 160, height=460)
    return style(fig, title, subtitle)


def steerability_heatmap(frame: pd.DataFrame, steerability: pd.DataFrame | None = None, *,
                         title: str = "Where is each behaviour steerable?", subtitle: str | None = None) -> go.Figure:
    """A/B curves over every layer: per behaviour, p(match) over layer × multiplier, and its steerability.

    Args:
        frame: A/B curve rows ``behaviour, layer, multiplier, p_match`` (see
            :func:`lens_roles.studies.ab_curves.ab_curve` with several layers).
        steerability: per behaviour and layer ``slope, lo, hi`` (see
            :func:`lens_roles.studies.ab_curves.steerability`); drawn as a second
            row, the slope with its interval against the layer.
    """
    if frame.empty:
        raise PlotError("no A/B curve rows to draw")
    names = list(dict.fromkeys(frame.behaviour))
    rows = 1 if steerability is None or steerability.empty else 2
    fig = make_subplots(rows=rows, cols=len(names), subplot_titles=names, horizontal_spacing=0.05,
                        vertical_spacing=0.14, shared_xaxes=False)
    for k, name in enumerate(names):
        grp = frame[frame.behaviour == name]
        table = grp.pivot_table(index="multiplier", columns="layer", values="p_match").sort_index()
        fig.add_trace(go.Heatmap(z=table.values, x=[str(c) for c in table.columns], y=[f"{m:g}" for m in table.index],
                                 zmin=0, zmax=1, colorscale="RdBu", reversescale=True, showscale=k == 0,
                                 colorbar=dict(title="p(match)", len=0.5 if rows == 2 else 1.0,
                                               y=0.78 if rows == 2 else 0.5),
                                 hovertemplate=f"{name}<br>layer %{{x}}<br>multiplier %{{y}}<br>"
                                               "p(match) %{z:.3f}<extra></extra>"),
                      row=1, col=k + 1)
        fig.update_xaxes(title_text="layer", type="category", row=1, col=k + 1)
        fig.update_yaxes(title_text="multiplier" if k == 0 else None, type="category", row=1, col=k + 1)
        if rows == 2:
            s = steerability[steerability.behaviour == name].sort_values("layer")
            fig.add_trace(go.Scatter(x=s.layer, y=s.slope, mode="lines+markers", showlegend=False,
                                     line=dict(color=px_colors(1)[0], width=1.5), marker=dict(size=4),
                                     error_y=dict(type="data", symmetric=False, array=s.hi - s.slope,
                                                  arrayminus=s.slope - s.lo, thickness=1),
                                     hovertemplate=f"{name}<br>layer %{{x}}<br>slope %{{y:.4f}}<extra></extra>"),
                          row=2, col=k + 1)
            fig.add_hline(y=0, line=dict(dash="dot", color="grey"), row=2, col=k + 1)
            fig.update_xaxes(title_text="layer", row=2, col=k + 1)
            fig.update_yaxes(title_text="steerability (Δp per unit)" if k == 0 else None, row=2, col=k + 1)
    fig.update_layout(width=max(520, 330 * len(names) + 120), height=420 * rows + 80)
    return style(fig, title, subtitle)
