"""The layer × α sweep viewer: the cosine-vs-α and adherence/coherence figures with a layer selector.

Fed by the tidy frames the sweeps return (:func:`~lens_roles.measures.sweeps.cosine_sweep`,
:func:`~lens_roles.measures.sweeps.adherence_sweep`, the metrics of
:func:`~lens_roles.measures.sweeps.generation_sweep`), drawn by the figure functions of
:mod:`lens_roles.viz.steering`, fitted to the pane, whose hover shows each value.
Choosing a steering layer redraws the cosine figure for it and highlights it in the
behaviour figure. Nothing here runs a model.

Without a live kernel :func:`sweep_viewer` returns the figures of the first layer.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from lens_roles.errors import PlotError
from lens_roles.viz.steering import behaviour_vs_alpha, cosine_vs_alpha
from lens_roles.widgets.common import FigureOutput, live, ui


def highlight_layer(fig: go.Figure, layer: int) -> go.Figure:
    """Fade every trace of ``fig`` but those of steering layer ``layer`` (legend group ``str(layer)``)."""
    for trace in fig.data:
        trace.opacity = 1.0 if trace.legendgroup == str(layer) else 0.2
    return fig


class SweepViewer:
    """The live sweep viewer; :attr:`widget` holds a layer selector and the figures.

    Args:
        cosine: a cosine-sweep frame (or None).
        behaviour: adherence and/or generation-sweep metrics, concatenated (or None).
        subtitle: the figures' subtitle.
    """

    def __init__(self, cosine: pd.DataFrame | None = None, behaviour: pd.DataFrame | None = None, *,
                 subtitle: str | None = None):
        if cosine is None and behaviour is None:
            raise PlotError("the sweep viewer needs a cosine frame, a behaviour frame or both")
        w = ui()
        self.cosine, self.behaviour, self.subtitle = cosine, behaviour, subtitle
        layers = sorted(set(cosine.layer) if cosine is not None else set()) or sorted(set(behaviour.layer))
        if not layers:
            raise PlotError("the sweep frames hold no rows")
        self.layer = w.Dropdown(options=[int(v) for v in layers], description="steer layer")
        self.cosine_output = FigureOutput(self.cosine_figure(layers[0])) if cosine is not None else None
        self.behaviour_output = (FigureOutput(self.behaviour_figure(layers[0])) if behaviour is not None
                                 else None)
        self.widget = w.VBox([self.layer] + [f.widget for f in (self.cosine_output, self.behaviour_output) if f])
        self.layer.observe(lambda change: self.show(change["new"]), "value")

    def cosine_figure(self, layer: int) -> go.Figure:
        return cosine_vs_alpha(self.cosine, layer, subtitle=self.subtitle)

    def behaviour_figure(self, layer: int) -> go.Figure:
        return highlight_layer(behaviour_vs_alpha(self.behaviour, subtitle=self.subtitle), layer)

    def figures(self, layer: int | None = None) -> list[go.Figure]:
        """The static figures of ``layer`` (default: the selected one)."""
        layer = self.layer.value if layer is None else layer
        out = [self.cosine_figure(layer)] if self.cosine is not None else []
        return out + ([self.behaviour_figure(layer)] if self.behaviour is not None else [])

    def show(self, layer: int) -> None:
        """Draw ``layer``: its cosine figure, and the behaviour figure with it highlighted."""
        if self.cosine_output is not None:  # the selector offers the cosine frame's layers
            self.cosine_output.show(self.cosine_figure(layer))
        if self.behaviour_output is not None:
            self.behaviour_output.show(self.behaviour_figure(layer))


def sweep_viewer(cosine: pd.DataFrame | None = None, behaviour: pd.DataFrame | None = None, *,
                 subtitle: str | None = None, live_kernel: bool | None = None):
    """The layer × α sweep viewer (see the module docs).

    Returns the viewer's ``widget`` (``widget.viewer`` is the :class:`SweepViewer`) in a
    live kernel; without one, the static figure of the first layer (the cosine figure
    when there is a cosine frame, else the behaviour figure).
    """
    viewer = SweepViewer(cosine, behaviour, subtitle=subtitle)
    if not live(live_kernel):
        return viewer.figures()[0]
    viewer.widget.viewer = viewer
    return viewer.widget
