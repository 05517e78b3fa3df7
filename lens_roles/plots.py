"""Figures: tidy DataFrames in, ``plotly`` figures out. The only importer of plotly.

Nothing here touches a model. :func:`save_figure` always writes a self-contained
HTML file and, when a Chrome/Chromium is available to ``kaleido``, a PNG beside
it; a missing browser only skips the PNG (with one warning).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .io import atomic_write

TEMPLATE = "simple_white"
FONT = dict(family="Helvetica, Arial, sans-serif", size=13)
_png_warned = False


def _style(fig: go.Figure, title: str, subtitle: str | None = None) -> go.Figure:
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


def direction_profile(frame: pd.DataFrame, *, title: str = "Direction profile by layer",
                      subtitle: str | None = None,
                      panels: tuple[tuple[str, str], ...] = (
                          ("norm", "Raw norm ‖v‖"),
                          ("auc", "Held-out AUC vs baseline / negatives"),
                          ("auc_vs_roles", "Held-out AUC vs other roles"),
                      )) -> go.Figure:
    """Panels over depth, one line per direction, one panel per metric present in ``frame``.

    Args:
        frame: columns ``direction, layer, metric, value`` (and optionally ``kind``;
            directions of kind ``"persona"`` are drawn black and thick).
        panels: ``(metric, panel title)`` pairs; metrics absent from ``frame`` are skipped.
    """
    panels = tuple(p for p in panels if (frame.metric == p[0]).any())
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels], horizontal_spacing=0.07)
    kinds = frame.groupby("direction")["kind"].first() if "kind" in frame else {}
    names = sorted(frame.direction.unique())
    for col, (metric, _) in enumerate(panels, start=1):
        sub = frame[frame.metric == metric]
        for i, name in enumerate(names):
            grp = sub[sub.direction == name].sort_values("layer")
            if grp.empty:
                continue
            persona = kinds.get(name) == "persona"
            line = dict(width=3.5, color="black") if persona else dict(width=1.3, color=PALETTE[i % len(PALETTE)])
            fig.add_trace(go.Scatter(x=grp.layer, y=grp.value, mode="lines", name=str(name), legendgroup=str(name),
                                     showlegend=col == 1, line=line,
                                     hovertemplate=f"{name}<br>layer %{{x}}<br>{metric} %{{y:.3f}}<extra></extra>"),
                          row=1, col=col)
        if metric.startswith("auc"):
            low = min(0.4, float(sub.value.min()) - 0.02) if len(sub) else 0.4
            fig.update_yaxes(range=[low, 1.02], row=1, col=col)
            fig.add_hline(y=0.5, line=dict(dash="dot", color="grey"), row=1, col=col)
    fig.update_xaxes(title_text="layer")
    n_names = len(names)
    fig.update_layout(width=520 * len(panels) + 180, height=max(520, 20 * n_names + 200),
                      legend=dict(font=dict(size=10), tracegroupgap=0))
    return _style(fig, title, subtitle)


def layer_heatmap(frame: pd.DataFrame, *, metric: str = "auc", title: str | None = None,
                  subtitle: str | None = None, zmin: float | None = None, zmax: float | None = None,
                  zmid: float | None = None, colorscale: str = "Viridis", order: str = "peak") -> go.Figure:
    """Heatmap of one metric, directions (rows) × layers (columns).

    Args:
        order: ``"peak"`` sorts rows by the layer where each direction peaks,
            ``"mean"`` by the mean over layers (highest on top).
        zmid: centre of a diverging colour scale (e.g. 0.5 for AUC).
    """
    sub = frame[frame.metric == metric]
    table = sub.pivot_table(index="direction", columns="layer", values="value")
    if order == "peak":
        table = table.loc[table.idxmax(axis=1).sort_values(kind="stable").index]
    elif order == "mean":
        table = table.loc[table.mean(axis=1).sort_values(kind="stable").index]
    else:
        raise ValueError(f"order must be 'peak' or 'mean', got {order!r}")
    fig = go.Figure(go.Heatmap(z=table.values, x=list(table.columns), y=list(table.index), zmin=zmin, zmax=zmax,
                               zmid=zmid, colorscale=colorscale, colorbar=dict(title=metric),
                               hovertemplate="%{y}<br>layer %{x}<br>" + metric + " %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="layer", dtick=2)
    fig.update_yaxes(title_text="", tickfont=dict(size=10))
    fig.update_layout(width=900, height=max(360, 18 * len(table) + 140))
    return _style(fig, title or f"{metric} by layer", subtitle)


def find_browser() -> str | None:
    """Path of a Chrome/Chromium for static export, or None."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def save_figure(fig: go.Figure, stem: str | Path, *, meta: dict | None = None, png: bool = True,
                scale: float = 2.0) -> list[Path]:
    """Write ``stem.html`` (always) and ``stem.png`` (when a browser exists), atomically.

    ``meta`` (what the figure depends on) is embedded in the HTML and written to
    ``stem.json``. Returns the paths written.
    """
    global _png_warned
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []

    def _atomic(path: Path, write) -> None:
        written.append(atomic_write(path, write))

    if meta is not None:
        fig.update_layout(meta=meta)
        _atomic(stem.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(meta, indent=2, default=str)))
    # plotly.min.js is written once beside the figures, so the HTML works offline.
    _atomic(stem.with_suffix(".html"), lambda t: fig.write_html(t, include_plotlyjs="directory", full_html=True))
    if png:
        browser = find_browser()
        if browser is None:
            if not _png_warned:
                warnings.warn("no Chrome/Chromium found: writing HTML figures only (install Debian's 'chromium' "
                              "or set BROWSER_PATH for PNGs)", stacklevel=2)
                _png_warned = True
        else:
            os.environ.setdefault("BROWSER_PATH", browser)
            try:
                _atomic(stem.with_suffix(".png"), lambda t: fig.write_image(t, format="png", scale=scale))
            except Exception as exc:  # kaleido/browser failures must not lose the HTML
                warnings.warn(f"PNG export of {stem} failed ({exc}); HTML written", stacklevel=2)
    return written


def line_by_layer(frame: pd.DataFrame, *, title: str, subtitle: str | None = None,
                  y_title: str = "value") -> go.Figure:
    """One line per direction of ``value`` over ``layer`` (columns ``direction, layer, value``)."""
    fig = go.Figure()
    for name, grp in frame.groupby("direction", sort=True):
        grp = grp.sort_values("layer")
        fig.add_trace(go.Scatter(x=grp.layer, y=grp.value, mode="lines+markers", name=str(name)))
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text=y_title)
    fig.update_layout(width=800, height=420)
    return _style(fig, title, subtitle)


def cosine_vs_alpha(frame: pd.DataFrame, steer_layer: int, *, title: str | None = None,
                    subtitle: str | None = None) -> go.Figure:
    """Cosine(steered, unsteered) against α, one line per downstream layer, plus a heatmap.

    Args:
        frame: a :func:`lens_roles.sweeps.cosine_sweep` frame.
    """
    sub = frame[(frame.metric == "cosine") & (frame.layer == steer_layer)]
    if sub.empty:
        raise ValueError(f"no cosine rows for steering layer {steer_layer}")
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
    return _style(fig, title or f"Steering at layer {steer_layer}: similarity to the unsteered run", subtitle)


def px_colors(n: int) -> list[str]:
    """``n`` colours along a perceptual scale (early layers dark, late layers light)."""
    from plotly.colors import sample_colorscale

    return sample_colorscale("Plasma", [i / max(1, n - 1) * 0.9 for i in range(n)])


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
    return _style(fig, title, subtitle)


# ------------------------------------------------------------------ patching


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
        raise ValueError("no patching rows to plot")
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
    return _style(fig, title or "Activation patching: how much of the clean run each site restores",
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
        raise ValueError("no grid has both activation and attribution results")
    corr = {g: both[both.grid == g][["value_act", "value_att"]].corr().iloc[0, 1] for g in grids}
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
    return _style(fig, title or "Attribution patching against activation patching",
                  subtitle or "normalised effects (0 = corrupt, 1 = clean); dotted: y = x")
