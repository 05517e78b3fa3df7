"""The house style of every figure: template, font, palette, title with subtitle; and how figures fit a notebook.

Figures are built at their *publication* size (a fixed ``width`` and ``height``),
which :func:`lens_roles.viz.export.save_figure` writes to HTML and PNG unchanged.
Shown in a notebook, a figure 1,300 px wide would overflow a narrower pane, so
the *display* path fits it to the pane instead (:func:`fit_to_pane`): no fixed
width (``autosize``, plotly.js's responsive mode), and a horizontal legend that
wraps below the plot. :func:`notebook_display` installs that on plotly's
notebook renderers; importing :mod:`lens_roles.viz` does it automatically when
running inside a Jupyter kernel. Only the figure sent to the notebook changes:
the ``go.Figure`` object keeps its size, so saving it gives the publication figure.
"""

from __future__ import annotations

import copy
import sys

import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import sample_colorscale
from plotly.io.base_renderers import MimetypeRenderer

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


#: where a fitted figure's legend goes: horizontal, below the plot area, wrapping to the pane's width
PANE_LEGEND = dict(orientation="h", yref="container", y=0.0, yanchor="bottom", x=0.0, xanchor="left")


def fit_to_pane(fig: go.Figure | dict) -> go.Figure | dict:
    """A copy of ``fig`` (a figure or a figure dict) that sizes to the notebook pane.

    The fixed ``width`` goes (``autosize=True``: plotly.js fills the output area
    and follows its resizes), the legend becomes horizontal below the plot, where
    it wraps, and the bottom margin grows to hold it. The height is kept.
    ``fig`` itself is not changed.
    """
    out = copy.deepcopy(fig)
    layout = out.setdefault("layout", {}) if isinstance(out, dict) else None
    if layout is None:
        out.update_layout(width=None, autosize=True, legend=PANE_LEGEND)
        margin_b = out.layout.margin.b
        out.update_layout(margin=dict(b=max(margin_b or 0, 60) + 60))
        return out
    layout.pop("width", None)
    layout["autosize"] = True
    layout["legend"] = {**layout.get("legend", {}), **PANE_LEGEND}
    margin = layout.setdefault("margin", {})
    margin["b"] = max(margin.get("b") or 0, 60) + 60
    return out


class PaneRenderer(MimetypeRenderer):
    """A plotly mimetype renderer that hands ``inner`` the figure fitted to the pane (:func:`fit_to_pane`)."""

    def __init__(self, inner: MimetypeRenderer):
        self.inner = inner

    def activate(self):
        self.inner.activate()

    def to_mimebundle(self, fig_dict):
        return self.inner.to_mimebundle(fit_to_pane(fig_dict))


PANE_PREFIX = "lens_roles_pane_"


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (figures are shown in a notebook pane)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def notebook_display(enabled: bool = True) -> str:
    """Fit figures shown in a notebook to the pane (``enabled``), or show them at their own size again.

    Wraps each of plotly's current default mimetype renderers in a
    :class:`PaneRenderer` (registered as ``lens_roles_pane_<name>``) and makes
    those the default; ``enabled=False`` restores the original names. Saving
    (``save_figure``, ``write_html``, ``write_image``) never goes through these
    renderers. Returns the new ``plotly.io.renderers.default``.
    """
    names = [n for n in (pio.renderers.default or "").split("+") if n]
    if enabled:
        wrapped = []
        for name in names:
            renderer = pio.renderers[name]
            if isinstance(renderer, MimetypeRenderer) and not name.startswith(PANE_PREFIX):
                pio.renderers[PANE_PREFIX + name] = PaneRenderer(renderer)
                name = PANE_PREFIX + name
            wrapped.append(name)
        names = wrapped
    else:
        names = [n[len(PANE_PREFIX):] if n.startswith(PANE_PREFIX) else n for n in names]
    pio.renderers.default = "+".join(names)
    return pio.renderers.default
