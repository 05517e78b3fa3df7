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
from lens_roles.io import write_csv
from lens_roles.viz import attribution_check_scatter, decomposition_plot, sae_alignment_bars, save_figure


@dataclass
class AlignmentReport:
    """The ``top`` aligned features (rank, feature, cosine), the decomposition, and the figures' subtitle."""

    top: pd.DataFrame
    decomposition: Decomposition
    subtitle: str


def run_alignment_report(sae, direction: Direction, *, layer: int, name: str, out: Path, top: int = 10,
                         max_features: int = 16, meta: dict | None = None) -> AlignmentReport:
    """Alignment of every feature with ``direction`` at ``layer`` and its decomposition into at
    most ``max_features`` features; tables and figures under ``out`` (``meta`` beside the figures)."""
    out = Path(out)
    alignment = feature_alignment(sae, direction)
    write_csv(alignment, out / "alignment.csv")
    dec = decompose(sae, direction, max_features=max_features)
    write_csv(dec.to_frame(), out / "decomposition.csv")
    head = alignment.head(top)
    sub = f"{direction.meta.get('model')} · SAE at layer {layer} ({sae.cfg.d_sae} features)"
    save_figure(sae_alignment_bars({f"{name}, layer {layer}": head}, subtitle=sub), out / "alignment", meta=meta)
    save_figure(
        decomposition_plot({name: dec}, subtitle=sub + f" · residual {dec.relative_residual:.3f} of ‖v‖"),
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
