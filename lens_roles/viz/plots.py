"""Figures: tidy DataFrames in, ``plotly`` figures out. The only importer of plotly.

Nothing here touches a model. :func:`save_figure` always writes a self-contained
HTML file and, when a Chrome/Chromium is available to ``kaleido``, a PNG beside
it; a missing browser only skips the PNG (with one warning), and a browser that
hangs is given up after ``LENS_ROLES_PNG_TIMEOUT`` seconds (default 120).
``LENS_ROLES_PNG=0`` switches PNG export off (the test suite does, so that it
needs no browser).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens_roles.errors import PlotError
from lens_roles.io import atomic_write
from lens_roles.measures.statistics import pearson

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
        raise PlotError(f"order must be 'peak' or 'mean', got {order!r}")
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
    # plotly.js is written once beside the figures, so the HTML works offline; figures in
    # sub-folders reuse a copy up to three folders above them (figures/plotly.min.js).
    plotlyjs = _shared_plotlyjs(stem.parent)
    _atomic(stem.with_suffix(".html"), lambda t: fig.write_html(t, include_plotlyjs=plotlyjs, full_html=True))
    if png and os.environ.get("LENS_ROLES_PNG", "1") == "0":
        png = False  # PNG export switched off (the test suite does this: it needs no browser)
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
                _atomic(stem.with_suffix(".png"), lambda t: _write_png(fig, t, scale))
            except Exception as exc:  # kaleido/browser failures must not lose the HTML
                warnings.warn(f"PNG export of {stem} failed ({exc}); HTML written", stacklevel=2)
    return written


#: seconds a PNG export may take before it is given up (a browser can hang on a loaded machine)
PNG_TIMEOUT = float(os.environ.get("LENS_ROLES_PNG_TIMEOUT", "120"))


def _write_png(fig: go.Figure, path: str, scale: float) -> None:
    """``fig.write_image`` in a worker thread, abandoned with an error after ``PNG_TIMEOUT`` seconds."""
    import threading

    errors: list[BaseException] = []

    def work():
        try:
            fig.write_image(path, format="png", scale=scale)
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(PNG_TIMEOUT)
    if worker.is_alive():
        raise TimeoutError(f"the browser did not finish within {PNG_TIMEOUT:g} s")
    if errors:
        raise errors[0]


def _shared_plotlyjs(folder: Path) -> str:
    """``"directory"`` (write plotly.min.js here) or the relative path of a copy in a parent folder."""
    folder = folder.resolve()
    for parent in list(folder.parents)[:3]:
        if (parent / "plotly.min.js").is_file():
            return os.path.relpath(parent / "plotly.min.js", folder)
    return "directory"


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


# ------------------------------------------------------------------ role study


def role_domain_heatmap(table: pd.DataFrame, *, condition: str, metric: str = "accuracy",
                        title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """Change in ``metric`` from no intervention, roles (rows) × domains (columns), for one condition.

    Each cell shows the change with its paired interval (hover and text); in-domain
    cells are starred. ``table`` is :attr:`lens_roles.studies.role_study.RoleStudy.table`.
    """
    sub = table[(table.condition == condition) & (table.metric == metric)]
    if sub.empty:
        raise PlotError(f"no {metric!r} rows for condition {condition!r}; the table has conditions "
                        f"{sorted(set(table.condition))} and metrics {sorted(set(table.metric))}")
    z = sub.pivot_table(index="role", columns="domain", values="delta", sort=False)
    lo = sub.pivot_table(index="role", columns="domain", values="delta_lo", sort=False).loc[z.index, z.columns]
    hi = sub.pivot_table(index="role", columns="domain", values="delta_hi", sort=False).loc[z.index, z.columns]
    home = set(zip(sub[sub.in_domain].role, sub[sub.in_domain].domain))
    text = [[("★ " if (r, d) in home else "") + f"{z.iat[i, j]:+.2f}<br>[{lo.iat[i, j]:+.2f}, {hi.iat[i, j]:+.2f}]"
             for j, d in enumerate(z.columns)] for i, r in enumerate(z.index)]
    bound = max(0.05, float(abs(sub[["delta_lo", "delta_hi"]]).max().max()))
    fig = go.Figure(go.Heatmap(z=z.values, x=list(z.columns), y=list(z.index), zmid=0, zmin=-bound, zmax=bound,
                               colorscale="RdBu", text=text, texttemplate="%{text}", textfont=dict(size=9),
                               colorbar=dict(title=f"Δ {metric}"),
                               hovertemplate="%{y} on %{x}<br>Δ %{text}<extra></extra>"))
    fig.update_xaxes(title_text="question domain", tickangle=-30)
    fig.update_yaxes(title_text="role", autorange="reversed")
    fig.update_layout(width=140 + 105 * z.shape[1], height=max(380, 52 * z.shape[0] + 170))
    return _style(fig, title or f"{condition}: change in {metric} from no intervention (★ in-domain)", subtitle)


def in_off_domain_bars(summary: pd.DataFrame, *, metric: str = "accuracy", title: str | None = None,
                       subtitle: str | None = None) -> go.Figure:
    """Mean change in ``metric`` per condition, in-domain vs off-domain cells, with interval bars."""
    sub = summary[summary.metric == metric]
    fig = go.Figure()
    for in_domain, colour in ((True, "#d62728"), (False, "#7f7f7f")):
        grp = sub[sub.in_domain == in_domain]
        fig.add_trace(go.Bar(x=grp.condition, y=grp.delta, name="in-domain" if in_domain else "off-domain",
                             marker_color=colour,
                             customdata=grp[["lo", "hi", "cells"]].values,
                             error_y=dict(type="data", symmetric=False, array=grp.hi - grp.delta,
                                          arrayminus=grp.delta - grp.lo),
                             hovertemplate="%{x}<br>Δ %{y:+.3f} [%{customdata[0]:+.3f}, %{customdata[1]:+.3f}]"
                                           "<br>%{customdata[2]} cells<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="black", width=1))
    fig.update_layout(barmode="group", width=700, height=450)
    fig.update_yaxes(title_text=f"Δ {metric} vs no intervention")
    return _style(fig, title or f"Role interventions: change in {metric}, in-domain vs off-domain", subtitle)


def selection_heatmap(selection: pd.DataFrame, *, title: str = "Validation accuracy of activation addition",
                      subtitle: str | None = None) -> go.Figure:
    """One small heatmap per role: validation accuracy over layer × α; the choice is starred."""
    roles = list(dict.fromkeys(selection.role))
    cols = min(4, len(roles))
    rows = -(-len(roles) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=roles, horizontal_spacing=0.06, vertical_spacing=0.12)
    lo, hi = float(selection.accuracy.min()), float(selection.accuracy.max())
    for k, role in enumerate(roles):
        grp = selection[selection.role == role]
        t = grp.pivot_table(index="alpha", columns="layer", values="accuracy")
        star = grp.pivot_table(index="alpha", columns="layer", values="chosen", aggfunc="max").loc[t.index, t.columns]
        text = [["★" if star.iat[i, j] else "" for j in range(t.shape[1])] for i in range(t.shape[0])]
        fig.add_trace(go.Heatmap(z=t.values, x=[str(c) for c in t.columns], y=[f"{a:g}" for a in t.index],
                                 zmin=lo, zmax=hi, colorscale="Viridis", showscale=k == 0, text=text,
                                 texttemplate="%{text}", colorbar=dict(title="val acc"),
                                 hovertemplate="layer %{x}<br>α %{y}<br>accuracy %{z:.3f}<extra></extra>"),
                      row=k // cols + 1, col=k % cols + 1)
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="α", type="category")
    fig.update_layout(width=300 * cols + 120, height=260 * rows + 120)
    return _style(fig, title, subtitle)


def ab_curves(frame: pd.DataFrame, *, title: str = "Behaviour A/B curves", subtitle: str | None = None) -> go.Figure:
    """p(answer matching the behaviour) against the multiplier, one line per behaviour, with intervals.

    ``frame``: columns ``behaviour, multiplier, p_match, lo, hi`` (see :func:`lens_roles.studies.ab_curves.ab_curve`).
    """
    fig = go.Figure()
    for i, (name, grp) in enumerate(frame.groupby("behaviour", sort=True)):
        grp = grp.sort_values("multiplier")
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=list(grp.multiplier) + list(grp.multiplier[::-1]),
                                 y=list(grp.hi) + list(grp.lo[::-1]), mode="lines", fill="toself", fillcolor=colour,
                                 opacity=0.15, line=dict(width=0), hoverinfo="skip", showlegend=False,
                                 legendgroup=str(name)))
        layer = f" (layer {int(grp.layer.iloc[0])})" if "layer" in grp else ""
        fig.add_trace(go.Scatter(x=grp.multiplier, y=grp.p_match, mode="lines+markers", name=f"{name}{layer}",
                                 legendgroup=str(name), line=dict(color=colour, width=2),
                                 hovertemplate=f"{name}<br>multiplier %{{x}}<br>p(match) %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(dash="dot", color="grey"))
    fig.update_xaxes(title_text="multiplier of the steering vector")
    fig.update_yaxes(title_text="p(answer matching the behaviour)", range=[0, 1])
    fig.update_layout(width=820, height=480)
    return _style(fig, title, subtitle)


def role_cosine_heatmap(frame: pd.DataFrame, *, layer: int | None = None, title: str | None = None,
                        subtitle: str | None = None) -> go.Figure:
    """Cosine similarity of role vectors, roles × roles, with a slider over layers.

    ``frame``: columns ``role_a, role_b, layer, value`` (see :func:`lens_roles.directions.geometry.cosine_matrix`).
    Rows are ordered by hierarchical clustering at ``layer`` (default: the middle
    layer present), so that roles sharing a direction sit together; the slider
    keeps that order.
    """
    layers = sorted(frame.layer.unique())
    layer = layer if layer is not None else layers[len(layers) // 2]
    order = _cluster_order(frame[frame.layer == layer].pivot_table(index="role_a", columns="role_b", values="value"))
    tables = {ly: frame[frame.layer == ly].pivot_table(index="role_a", columns="role_b", values="value")
              .loc[order, order] for ly in layers}
    fig = go.Figure()
    for ly in layers:
        t = tables[ly]
        fig.add_trace(go.Heatmap(z=t.values, x=order, y=order, zmin=-1, zmax=1, zmid=0, colorscale="RdBu_r",
                                 visible=ly == layer, colorbar=dict(title="cosine"),
                                 hovertemplate="%{y} · %{x}<br>cosine %{z:.2f}<extra></extra>"))
    steps = [dict(method="update", label=str(ly), args=[{"visible": [m == ly for m in layers]},
                                                        {"title.text": _title_text(title, ly, subtitle)}])
             for ly in layers]
    fig.update_layout(sliders=[dict(active=layers.index(layer), steps=steps, currentvalue=dict(prefix="layer "),
                                    pad=dict(t=40))])
    fig.update_xaxes(tickangle=-45, tickfont=dict(size=10))
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10))
    n = len(order)
    fig.update_layout(width=max(560, 22 * n + 260), height=max(560, 22 * n + 260))
    fig = _style(fig, "", None)
    fig.update_layout(title=dict(text=_title_text(title, layer, subtitle)))
    return fig


def _title_text(title: str | None, layer: int, subtitle: str | None) -> str:
    text = (title or "Cosine similarity of role vectors") + f" — layer {layer}"
    return f"{text}<br><sup>{subtitle}</sup>" if subtitle else text


def _cluster_order(table: pd.DataFrame) -> list:
    """Leaf order of average-linkage clustering on 1 − cosine (greedy nearest-neighbour chain)."""
    names = list(table.index)
    dist = 1 - table.loc[names, names].to_numpy(float)
    clusters = [[i] for i in range(len(names))]
    while len(clusters) > 1:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(np.mean(dist[np.ix_(clusters[a], clusters[b])]))
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return [names[i] for i in clusters[0]]


def role_map(frame: pd.DataFrame, *, title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """2-D map of roles at one layer (columns ``role, x, y, group``; see
    :func:`lens_roles.directions.geometry.role_map`)."""
    fig = go.Figure()
    groups = list(dict.fromkeys(frame.group.fillna("other")))
    for i, g in enumerate(groups):
        grp = frame[frame.group.fillna("other") == g]
        fig.add_trace(go.Scatter(x=grp.x, y=grp.y, mode="markers+text", text=grp.role, name=str(g),
                                 textposition="top center", textfont=dict(size=10),
                                 marker=dict(size=10, color="#aaaaaa" if g == "other" else PALETTE[i % len(PALETTE)])))
    layer = int(frame.layer.iloc[0])
    var = frame.attrs.get("explained_variance")
    axis = (lambda k: f"PC{k + 1} ({var[k]:.0%} of variance)") if var is not None else (lambda k: f"PC{k + 1}")
    fig.update_xaxes(title_text=axis(0), zeroline=True)
    fig.update_yaxes(title_text=axis(1), zeroline=True)
    fig.update_layout(width=860, height=640, legend=dict(title="domain"))
    return _style(fig, title or f"Role vectors at layer {layer}, first two principal components", subtitle)
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
    return _style(fig, title or "Attribution patching against activation patching",
                  subtitle or "normalised effects (0 = corrupt, 1 = clean); dotted: y = x")


# ----------------------------------------------------------------------- PSR

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
    fig = _style(fig, title, subtitle)
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
    return _style(fig, title, subtitle)


# ----------------------------------------------------------------------- SAE features


def sae_alignment_bars(frames: dict, *, title: str = "SAE features aligned with the direction",
                       subtitle: str | None = None) -> go.Figure:
    """Cosine of the top decoder rows with each direction, one panel per ``label → alignment frame``
    (columns ``feature, cosine``, as from ``features.feature_alignment``), best at the top."""
    labels = list(frames)
    if not labels:
        raise PlotError("no alignment frames to plot")
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=labels, horizontal_spacing=0.12)
    for c, label in enumerate(labels, start=1):
        sub = frames[label].iloc[::-1]
        fig.add_trace(go.Bar(x=sub.cosine, y=[f"f{int(f)}" for f in sub.feature], orientation="h",
                             marker_color=PALETTE[(c - 1) % len(PALETTE)], showlegend=False,
                             hovertemplate="feature %{y}<br>cosine %{x:.3f}<extra></extra>"), row=1, col=c)
        fig.update_xaxes(title_text="cosine with decoder row", row=1, col=c)
    n = max(len(f) for f in frames.values())
    fig.update_layout(width=330 * len(labels) + 120, height=max(360, 22 * n + 160))
    return _style(fig, title, subtitle)


def decomposition_plot(decompositions: dict, *, title: str = "Sparse non-negative decomposition into features",
                       subtitle: str | None = None) -> go.Figure:
    """Left: relative residual ``‖v − Σ c_i d_i‖/‖v‖`` against the number of features, one line per
    direction. Right: the coefficients (as a share of ``‖v‖``) of the features kept, per direction."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["residual as features are added",
                                                        "coefficients / ‖v‖"], horizontal_spacing=0.14)
    for i, (label, dec) in enumerate(decompositions.items()):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=list(range(1, len(dec.steps) + 1)), y=list(dec.steps), mode="lines+markers",
                                 name=label, line=dict(color=color), legendgroup=label), row=1, col=1)
        frame = dec.to_frame()
        fig.add_trace(go.Bar(x=[f"f{int(f)}" for f in frame.feature], y=frame.share, name=label,
                             marker_color=color, legendgroup=label, showlegend=False,
                             hovertemplate="feature %{x}<br>share %{y:.3f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="features in the decomposition", row=1, col=1)
    fig.update_yaxes(title_text="relative residual", range=[0, 1.02], row=1, col=1)
    fig.update_layout(width=1100, height=440, barmode="group")
    return _style(fig, title, subtitle)


def attribution_check_scatter(check: pd.DataFrame, *, title: str = "Feature attribution against ablation",
                              subtitle: str | None = None) -> go.Figure:
    """Measured change of the metric when a feature is ablated (x) against the attribution's
    prediction ``−attribution`` (y), one point per feature; dotted: y = x; Pearson r in the title."""
    lo = float(min(check.predicted.min(), check.actual.min()))
    hi = float(max(check.predicted.max(), check.actual.max()))
    r = pearson(check.predicted, check.actual) if len(check) > 2 else float("nan")
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), showlegend=False,
                   hoverinfo="skip"),
        go.Scatter(x=check.actual, y=check.predicted, mode="markers+text", text=[f"f{int(f)}" for f in check.feature],
                   textposition="top center", textfont=dict(size=10), showlegend=False,
                   marker=dict(size=8, color=PALETTE[0]),
                   hovertemplate="%{text}<br>ablation %{x:.3f}<br>predicted %{y:.3f}<extra></extra>"),
    ])
    fig.update_xaxes(title_text="Δ metric when the feature is ablated (measured)")
    fig.update_yaxes(title_text="Δ predicted by gradient × activation")
    fig.update_layout(width=620, height=520)
    return _style(fig, f"{title} (r = {r:.2f}, {len(check)} features)", subtitle)
