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
