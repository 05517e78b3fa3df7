"""The SAE features of one direction, written as a folder.

:func:`run_alignment_report` (``lens-roles sae-align``): the features whose decoder
rows are closest to the direction (``alignment.csv``), its sparse decomposition
(``decomposition.csv``) and their figures; :func:`write_direction_cards` adds
feature cards (``cards.html``), which need the model and a corpus.
:func:`run_attribution_report` (``lens-roles sae-attribute``): gradient × activation
attribution of the projection metric to every feature (``attribution.csv``), checked
by ablating the top features one by one (``check.csv`` and a scatter).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from lens_roles.analysis.sae.cards import feature_cards, write_cards
from lens_roles.analysis.sae.corpus import Corpus
from lens_roles.analysis.sae.features import (
    Decomposition,
    ProjectionMetric,
    ablation_check,
    attribute_features,
    decompose,
    feature_alignment,
)
from lens_roles.directions.direction import Direction
from lens_roles.inputs.prompts import Prompt
from lens_roles.io import atomic_write, write_csv
from lens_roles.viz import attribution_check_scatter, decomposition_plot, sae_alignment_bars, save_figure


@dataclass
class AlignmentReport:
    """The ``top`` aligned features (rank, feature, cosine), the decomposition, and the figures' subtitle."""

    top: pd.DataFrame
    decomposition: Decomposition
    subtitle: str


def run_alignment_report(sae, direction: Direction, *, layer: int, name: str, out: Path, top: int = 10,
                         max_features: int = 16, meta: dict | None = None, frequencies=None,
                         exclude: bool = False) -> AlignmentReport:
    """Alignment of every feature with ``direction`` at ``layer`` and its decomposition into at
    most ``max_features`` features; tables and figures under ``out`` (``meta`` beside the figures).

    ``frequencies`` (``[d_sae]`` firing fractions, e.g. the file shipped beside the SAE)
    mark dead and dense features in ``alignment.csv``; ``exclude`` leaves them out of both
    the ranking and the decomposition. ``decomposition_summary.json`` holds the decomposition's
    relative residual and the fraction of the direction in the candidate rows' span."""
    out = Path(out)
    alignment = feature_alignment(sae, direction, frequencies=frequencies, exclude=exclude)
    write_csv(alignment, out / "alignment.csv")
    dec = decompose(sae, direction, max_features=max_features, frequencies=frequencies, exclude=exclude)
    write_csv(dec.to_frame(), out / "decomposition.csv")
    summary = {"relative_residual": dec.relative_residual, "span_fraction": dec.span_fraction,
               "candidates": dec.candidates, "features": list(dec.features), "excluded_dead_dense": exclude}
    atomic_write(out / "decomposition_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    head = alignment.head(top)
    sub = f"{direction.meta.get('model')} · SAE at layer {layer} ({sae.cfg.d_sae} features)"
    save_figure(sae_alignment_bars({f"{name}, layer {layer}": head}, subtitle=sub), out / "alignment", meta=meta)
    save_figure(
        decomposition_plot({name: dec}, subtitle=sub + f" · residual {dec.relative_residual:.3f} of ‖v‖, "
                                                       f"{dec.span_fraction:.3f} of ‖v‖ in the decoder's span"),
        out / "decomposition",
        meta=meta,
    )
    return AlignmentReport(head, dec, sub)


def write_direction_cards(model, sae, report: AlignmentReport, corpus: Corpus, *, name: str, layer: int,
                          directions: Mapping[str, Direction], out: Path, corpus_label: str, batch_size: int = 16,
                          meta: dict | None = None) -> list:
    """Cards of the report's top features and the decomposition's first five, on ``corpus``.

    Each card's alignment table lists ``directions`` (the analysed one first).
    Written to ``out/cards.html``; returns the cards.
    """
    top = report.top
    features = list(dict.fromkeys([int(f) for f in top.feature] + [int(f) for f in report.decomposition.features[:5]]))
    notes = {int(r.feature): f"rank {int(r.rank)} by cosine with {name} ({r.cosine:+.3f})" for r in top.itertuples()}
    cards = feature_cards(
        model, sae, features, corpus.sequences, directions=dict(directions), notes=notes, batch_size=batch_size
    )
    write_cards(
        cards,
        Path(out) / "cards.html",
        title=f"Features of {name} at layer {layer}",
        subtitle=f"{report.subtitle} · corpus {corpus_label} ({len(corpus)} sequences)",
        meta=meta,
    )
    return cards


@dataclass
class AttributionReport:
    """Attribution per feature (``frame``, ``attrs['metric']`` the mean metric), the ablation
    ``check`` of the top features (None when not asked) and the attribution's seconds."""

    frame: pd.DataFrame
    check: pd.DataFrame | None
    seconds: float


def run_attribution_report(model, sae, prompts: Sequence[Prompt], metric: ProjectionMetric, *, layer: int,
                           out: Path, check: int = 16, batch_size: int = 16,
                           meta: dict | None = None) -> AttributionReport:
    """Attribute ``metric`` over ``prompts`` to the SAE's features; ablate the top ``check``
    (0: none) to test it; tables and the scatter under ``out``."""
    out = Path(out)
    t0 = time.perf_counter()
    frame = attribute_features(model, sae, prompts, metric, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    write_csv(frame, out / "attribution.csv")
    checked = None
    if check:
        checked = ablation_check(model, sae, prompts, metric, frame, top=check, batch_size=batch_size)
        write_csv(checked, out / "check.csv")
        save_figure(
            attribution_check_scatter(
                checked,
                subtitle=f"{model.cfg.model_name} · SAE layer {layer} · {metric.label} · {len(prompts)} prompts",
            ),
            out / "attribution_vs_ablation",
            meta=dict(meta or {}, pearson=checked.attrs["pearson"]),
        )
    return AttributionReport(frame, checked, seconds)


def compare_saes(saes: Mapping[str, Mapping[int, object]], directions: Mapping[str, Direction], *,
                 frequencies: Mapping[str, Mapping[int, object]] | None = None, top: int = 10,
                 max_features: int = 16) -> pd.DataFrame:
    """The alignment and decomposition of each direction with each set of SAEs, one row per
    (SAE set, direction, layer): for comparing SAEs (e.g. ``{"before": ..., "after": ...}``).

    ``saes`` maps a set name to ``{layer: sae}``; ``frequencies`` (optional) the same
    names to ``{layer: [d_sae] firing fractions}`` for the dead/dense marks. Columns:
    ``top_features`` and ``top_cosines`` (the ``top`` best aligned, ``;``-joined),
    ``top_dead`` / ``top_dense`` (how many of them are dead or dense), ``best_live_cosine``
    (the best cosine among live features; NaN without frequencies), the decomposition's
    ``relative_residual``, ``span_fraction`` and its features.
    """
    import math

    rows = []
    for set_name, by_layer in saes.items():
        for name, direction in directions.items():
            for layer, sae in sorted(by_layer.items()):
                if layer not in direction:
                    continue
                freq = (frequencies or {}).get(set_name, {}).get(layer)
                align = feature_alignment(sae, direction[layer], top=top, frequencies=freq)
                live = feature_alignment(sae, direction[layer], top=1, frequencies=freq, exclude=True) \
                    if freq is not None else None
                dec = decompose(sae, direction[layer], max_features=max_features)
                rows.append({
                    "saes": set_name, "direction": name, "layer": layer, "d_sae": sae.cfg.d_sae,
                    "top_features": ";".join(str(int(f)) for f in align["feature"]),
                    "top_cosines": ";".join(f"{c:.3f}" for c in align["cosine"]),
                    "best_cosine": float(align["cosine"].iloc[0]),
                    "top_dead": int((align["status"] == "dead").sum()) if freq is not None else math.nan,
                    "top_dense": int((align["status"] == "dense").sum()) if freq is not None else math.nan,
                    "best_live_cosine": float(live["cosine"].iloc[0]) if live is not None and len(live) else math.nan,
                    "relative_residual": dec.relative_residual, "span_fraction": dec.span_fraction,
                    "decomposition_features": ";".join(str(f) for f in dec.features),
                })
    return pd.DataFrame(rows)
