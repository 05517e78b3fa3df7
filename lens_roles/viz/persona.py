"""Figures of persona space: the 3-D map of personas and the variance explained per layer.

Frames in (from :class:`lens_roles.directions.persona_space.PersonaSpace`), figures out.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from lens_roles.errors import PlotError
from lens_roles.viz.style import PALETTE, style

#: marker symbol of each kind of persona
SYMBOLS = {"role": "circle", "archetype": "diamond", "default": "square"}


def persona_map_3d(points: pd.DataFrame, *, layer: int, title: str | None = None,
                   subtitle: str | None = None, variance: tuple[float, ...] | None = None,
                   colour_label: str = "projection on the assistant axis") -> go.Figure:
    """Personas at ``layer`` on PC1–PC3, coloured by ``axis`` (their projection on the axis).

    ``points``: columns ``name, kind, group, layer, pc1, pc2, pc3, axis``
    (:meth:`~lens_roles.directions.persona_space.PersonaSpace.points`). Roles are circles,
    archetypes diamonds, the default assistant large squares with their names written out.
    ``variance``: fractions of variance of PC1..PC3, shown in the axis titles.
    """
    sub = points[points.layer == layer]
    if sub.empty:
        raise PlotError(f"no persona points at layer {layer}; the frame has layers {sorted(set(points.layer))}")
    bound = max(1e-12, float(sub["axis"].abs().max()))  # symmetric: white is the average role (0)
    fig = go.Figure()
    for kind in ("role", "archetype", "default"):
        grp = sub[sub.kind == kind]
        if grp.empty:
            continue
        is_default = kind == "default"
        fig.add_trace(go.Scatter3d(
            x=grp.pc1, y=grp.pc2, z=grp.pc3, mode="markers+text" if is_default else "markers",
            name={"role": "roles (data/roles)", "archetype": "archetypes", "default": "default assistant"}[kind],
            text=grp["name"], textposition="top center",
            customdata=grp[["group", "axis"]].values,
            marker=dict(size=9 if is_default else 5, symbol=SYMBOLS[kind], color=grp["axis"], colorscale="RdBu",
                        cmin=-bound, cmax=bound, line=dict(width=2 if is_default else 0, color="black"),
                        showscale=kind == "role", colorbar=dict(title=colour_label, len=0.6)),
            hovertemplate="%{text} (%{customdata[0]})<br>PC1 %{x:.2f} · PC2 %{y:.2f} · PC3 %{z:.2f}"
                          "<br>axis %{customdata[1]:.2f}<extra></extra>"))
    names = [f"PC{k + 1}" + (f" ({variance[k]:.0%})" if variance is not None and k < len(variance) else "")
             for k in range(3)]
    fig.update_layout(scene=dict(xaxis_title=names[0], yaxis_title=names[1], zaxis_title=names[2]),
                      width=900, height=720, legend=dict(x=0.01, y=0.98))
    return style(fig, title or f"Persona space at layer {layer}", subtitle)


def variance_explained(table: pd.DataFrame, *, title: str = "Persona space: variance explained and the axis",
                       subtitle: str | None = None) -> go.Figure:
    """Per layer: variance fraction of PC1, PC2, PC3, the cosine of the assistant axis with PC1,
    and (when present) the axis's held-out AUC and the default assistant's position in the roles'
    PC1 range.

    ``table``: :meth:`~lens_roles.directions.persona_space.PersonaSpace.table`.
    """
    missing = {"layer", "var_pc1", "cos_axis_pc1"} - set(table.columns)
    if missing:
        raise PlotError(f"the persona-space table lacks column(s) {sorted(missing)}")
    fig = go.Figure()
    lines = [("var_pc1", "variance PC1"), ("var_pc2", "variance PC2"), ("var_pc3", "variance PC3"),
             ("cos_axis_pc1", "cos(axis, PC1)"), ("auc", "held-out AUC (axis)"),
             ("default_position", "default on PC1 (0 = lowest role, 1 = highest)")]
    for i, (column, label) in enumerate(lines):
        if column not in table or table[column].isna().all():
            continue
        dash = "solid" if column.startswith("var") else "dash"
        fig.add_trace(go.Scatter(x=table.layer, y=table[column], mode="lines+markers", name=label,
                                 line=dict(color=PALETTE[i % len(PALETTE)], dash=dash),
                                 hovertemplate=f"{label}<br>layer %{{x}}<br>%{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="grey", width=1))
    fig.add_hline(y=0.5, line=dict(color="grey", width=1, dash="dot"))  # chance AUC
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="fraction / cosine / AUC")
    fig.update_layout(width=900, height=480)
    return style(fig, title, subtitle)
