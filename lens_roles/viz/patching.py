"""Figures of patching results: heatmaps over layers × positions/heads, activation vs attribution."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_roles.errors import PlotError
from lens_roles.measures.statistics import pearson
from lens_roles.viz.style import PALETTE, style


def _patch_frame(data) -> pd.DataFrame:
    """Tidy patching rows from PatchResult(s) (anything with ``to_frame``) or a DataFrame of them."""
    if isinstance(data, pd.DataFrame):
        return data
    items = [data] if hasattr(data, "to_frame") else list(data)
    return pd.concat([item.to_frame() for item in items], ignore_index=True)


def _token_label(pos: int, token: str, corrupt: str | None) -> str:
    def show(t):
        return str(t).replace("\n", "\\n").replace("\t", "\\t") or "∅"

    if corrupt is None or pd.isna(corrupt) or corrupt == token:
        return f"{int(pos)} {show(token)}"
    return f"{int(pos)} {show(token)}|{show(corrupt)}"


_POS_GRIDS = ("resid", "attn_pos", "mlp_pos")


_LAYER_GRIDS = ("attn", "mlp")


def patch_heatmap(data, *, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """Patching results as heatmaps that share the layer axis (layer 0 at the top).

    Args:
        data: a PatchResult, several, or their concatenated ``to_frame()`` rows.

    Panels, left to right: position grids (``resid``, ``attn_pos``, ``mlp_pos``) with
    the prompt's tokens on the x axis (``clean|corrupt`` where the prompts differ);
    the per-layer grids (``attn``, ``mlp``) side by side in one panel; the ``heads``
    grid (layer × head). One row of panels per method (activation, attribution),
    each with its own diverging colour scale centred at 0 and symmetric about it:
    red moves the metric towards the clean run, blue towards the corrupt run.
    """
    frame = _patch_frame(data)
    methods = [m for m in ("activation", "attribution") if (frame.method == m).any()]
    grids = set(frame.grid)
    panels: list[tuple[str, tuple[str, ...]]] = [("pos", (g,)) for g in _POS_GRIDS if g in grids]
    if grids & set(_LAYER_GRIDS):
        panels.append(("layer", tuple(g for g in _LAYER_GRIDS if g in grids)))
    if "heads" in grids:
        panels.append(("head", ("heads",)))
    if not methods or not panels:
        raise PlotError("no patching rows to plot")
    n_pos = {g: frame[frame.grid == g].pos.nunique() for g in _POS_GRIDS if g in grids}
    n_heads = frame[frame.grid == "heads"]["head"].nunique() if "heads" in grids else 0
    widths = [22 * n_pos[g[0]] if kind == "pos" else 46 * len(g) if kind == "layer" else 26 * n_heads
              for kind, g in panels]
    names = {"resid": "residual stream (resid_pre)", "attn_pos": "attention output", "mlp_pos": "MLP output",
             "heads": "attention heads (z)"}
    present = {(m, g) for m, g in zip(frame.method, frame.grid)}
    titles = [f"{method}: " + (names.get(g[0], g[0]) if kind != "layer" else " / ".join(g))
              if any((method, grid) in present for grid in g) else "" for method in methods for kind, g in panels]
    n_layers = frame.layer.nunique()
    row_px = 15 * n_layers + 80
    gap_px = 170 if panels[0][0] == "pos" else 110  # room for the rotated token labels
    plot_px = len(methods) * row_px + (len(methods) - 1) * gap_px
    fig = make_subplots(rows=len(methods), cols=len(panels), column_widths=widths, shared_yaxes=True,
                        horizontal_spacing=min(0.06, 0.3 / len(panels)),
                        vertical_spacing=gap_px / plot_px if len(methods) > 1 else 0.0,
                        subplot_titles=titles)
    for r, method in enumerate(methods, start=1):
        sub = frame[frame.method == method]
        bound = float(sub.value.abs().max()) or 1.0
        axis = "coloraxis" if r == 1 else f"coloraxis{r}"
        labelled = False
        for c, (kind, group) in enumerate(panels, start=1):
            rows = sub[sub.grid.isin(group)]
            if rows.empty:  # this method did not run this grid: leave the panel out
                fig.update_xaxes(visible=False, row=r, col=c)
                fig.update_yaxes(visible=False, row=r, col=c)
                continue
            if not labelled:  # layer labels on the first panel shown in the row
                fig.update_yaxes(showticklabels=True, title_text="layer", row=r, col=c)
                labelled = True
            if kind == "pos":
                table = rows.pivot_table(index="layer", columns="pos", values="value", aggfunc="first")
                first = rows.drop_duplicates("pos").set_index("pos")
                x = [_token_label(p, first.token[p], first.corrupt_token[p]) for p in table.columns]
                hover = "layer %{y}<br>%{x}<br>" + method + " %{z:.3f}<extra></extra>"
            elif kind == "layer":
                table = rows.pivot_table(index="layer", columns="grid", values="value", aggfunc="first")
                table = table[[g for g in group if g in table.columns]]
                x = list(table.columns)
                hover = "layer %{y}<br>%{x}<br>" + method + " %{z:.3f}<extra></extra>"
            else:
                table = rows.pivot_table(index="layer", columns="head", values="value", aggfunc="first")
                x = [str(int(h)) for h in table.columns]
                hover = "layer %{y}<br>head %{x}<br>" + method + " %{z:.3f}<extra></extra>"
            fig.add_trace(go.Heatmap(z=table.values, x=x, y=[int(v) for v in table.index], coloraxis=axis,
                                     hovertemplate=hover, xgap=1, ygap=1), row=r, col=c)
            fig.update_xaxes(type="category", tickfont=dict(size=10 if kind == "pos" else 11), row=r, col=c,
                             tickangle=-60 if kind == "pos" else 0, title_text="head" if kind == "head" else None)
        fig.update_layout({axis: dict(colorscale="RdBu", reversescale=True, cmin=-bound, cmax=bound, cmid=0,
                                      colorbar=dict(title=method, len=row_px / plot_px * 0.9, yanchor="middle",
                                                    y=1 - ((r - 1) * (row_px + gap_px) + row_px / 2) / plot_px))})
    fig.update_yaxes(autorange="reversed", dtick=2 if n_layers > 12 else 1)
    fig.update_layout(width=max(700, sum(widths) + 260), height=plot_px + 250)
    return style(fig, title or "Activation patching: how much of the clean run each site restores",
                  subtitle or "0 = corrupt run, 1 = clean run")


def patch_scatter(data, *, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """Attribution patching (y) against activation patching (x), one panel per grid, Pearson r in the titles."""
    frame = _patch_frame(data)
    keys = ["grid", "layer", "pos", "head"]
    filled = frame.assign(**{k: frame[k].astype("float").fillna(-1) for k in ("layer", "pos", "head")})
    act = filled[filled.method == "activation"]
    att = filled[filled.method == "attribution"]
    both = act.merge(att[keys + ["value"]], on=keys, suffixes=("_act", "_att"))
    grids = [g for g in ("resid", "attn_pos", "mlp_pos", "attn", "mlp", "heads") if (both.grid == g).any()]
    grids += sorted(set(both.grid) - set(grids))
    if not grids:
        raise PlotError("no grid has both activation and attribution results")
    corr = {g: pearson(both[both.grid == g].value_act, both[both.grid == g].value_att) for g in grids}
    fig = make_subplots(rows=1, cols=len(grids), subplot_titles=[f"{g} (r = {corr[g]:.2f}, n = "
                                                                 f"{int((both.grid == g).sum())})" for g in grids],
                        horizontal_spacing=0.07)
    for c, g in enumerate(grids, start=1):
        sub = both[both.grid == g]
        text = [f"layer {int(r.layer)}" + (f", pos {int(r.pos)} {r.token!r}" if r.pos >= 0 else "")
                + (f", head {int(r.head)}" if r.head >= 0 else "") for r in sub.itertuples()]
        lo = float(min(sub.value_act.min(), sub.value_att.min()))
        hi = float(max(sub.value_act.max(), sub.value_att.max()))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"),
                                 showlegend=False, hoverinfo="skip"), row=1, col=c)
        fig.add_trace(go.Scatter(x=sub.value_act, y=sub.value_att, mode="markers", text=text, showlegend=False,
                                 marker=dict(size=5, color=PALETTE[(c - 1) % len(PALETTE)], opacity=0.7),
                                 hovertemplate="%{text}<br>activation %{x:.3f}<br>attribution %{y:.3f}"
                                               "<extra></extra>"), row=1, col=c)
        fig.update_xaxes(title_text="activation patching", row=1, col=c)
    fig.update_yaxes(title_text="attribution patching", row=1, col=1)
    fig.update_layout(width=330 * len(grids) + 120, height=420)
    return style(fig, title or "Attribution patching against activation patching",
                  subtitle or "normalised effects (0 = corrupt, 1 = clean); dotted: y = x")
