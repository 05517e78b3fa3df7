"""The house style of every figure: template, font, palette, title with subtitle."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import sample_colorscale

TEMPLATE = "simple_white"
FONT = dict(family="Helvetica, Arial, sans-serif", size=13)


def style(fig: go.Figure, title: str, subtitle: str | None = None) -> go.Figure:
    """Apply the house template, font and margins, and a left-aligned title with ``subtitle`` in small type."""
    text = f"{title}<br><sup>{subtitle}</sup>" if subtitle else title
    fig.update_layout(template=TEMPLATE, font=FONT, title=dict(text=text, x=0.01, xanchor="left"),
                      margin=dict(l=70, r=30, t=80, b=60))
    return fig


PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
    "#756bb1", "#636363", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8", "#969696", "#9c9ede", "#cedb9c",
    "#e7ba52", "#e7969c", "#de9ed6",
]


def px_colors(n: int) -> list[str]:
    """``n`` colours along a perceptual scale (early layers dark, late layers light)."""
    return sample_colorscale("Plasma", [i / max(1, n - 1) * 0.9 for i in range(n)])


def title_text(title: str | None, layer: int, subtitle: str | None) -> str:
    """The title of a per-layer role-cosine figure (default wording), with the layer and a small subtitle."""
    text = (title or "Cosine similarity of role vectors") + f" — layer {layer}"
    return f"{text}<br><sup>{subtitle}</sup>" if subtitle else text
