"""A PSR trained to mimic a system prompt, and a comparison at matched coherence, written as folders.

:func:`run_psr_training` is the whole job of ``lens-roles psr train``: make the PSR,
train it, measure the held-out distance to the prompted activations and the
per-token λ of one held-out prompt, and write ``psr.safetensors`` (+ JSON),
``history.csv``, ``distance.csv``, ``lambda_tokens.csv`` and the λ heatmap.
:func:`write_psr_comparison` writes what ``psr compare`` measured.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from lens_roles.directions.direction import Direction
from lens_roles.inputs.prompts import PairSet, Prompt, PromptSet
from lens_roles.interventions.psr.evaluate import activation_distance, token_coefficients
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.psr.train import TrainConfig, make_psr, prepare, train_psr
from lens_roles.io import write_csv
from lens_roles.studies.psr_compare import Comparison
from lens_roles.viz import psr_coherence_curve, save_figure, token_heatmap


@dataclass
class PSRTraining:
    """A trained PSR, its loss per epoch (``history``) and its held-out ``distance`` table."""

    psr: PSR
    history: pd.DataFrame
    distance: pd.DataFrame


def run_psr_training(model, direction: Direction, train: Sequence[Prompt], held: Sequence[Prompt], system: str, *,
                     config: TrainConfig, out: Path, layers: str = "one", layer: int | None = None,
                     alpha: float | None = None, provenance: dict | None = None,
                     progress: bool = True) -> PSRTraining:
    """Train a PSR along ``direction`` to mimic ``system`` on ``train``; score it on ``held``; write ``out``.

    ``layers``, ``layer`` and ``alpha`` go to :func:`make_psr`; ``provenance`` is
    added to the PSR's metadata before it is saved.
    """
    psr = make_psr(model, direction, train, system, layers=layers, layer=layer, alpha=alpha)
    if progress:
        print(f"{psr.meta['variant']} at layer(s) {list(psr.layers)[:3]}{'...' if len(psr.layers) > 3 else ''}, "
              f"α = {float(psr.alpha):.3f}", file=sys.stderr)
    history = train_psr(model, psr, train, system, config, progress=progress)
    data = prepare(model, psr, held, system, read_layers=psr.meta["read_layers"])
    distance = activation_distance(model, psr, data)
    lam = token_coefficients(model, psr, held[:1])
    out = Path(out)
    psr.meta.update(dict(provenance or {}, held_out=len(held)))
    psr.save(out / "psr.safetensors")
    write_csv(history, out / "history.csv")
    write_csv(distance, out / "distance.csv")
    write_csv(lam, out / "lambda_tokens.csv")
    meta = {"model": model.cfg.model_name, "psr": psr.meta, "layers": list(psr.layers)}
    save_figure(
        token_heatmap(lam, subtitle=f"{model.cfg.model_name} · {psr.meta['variant']} · held-out prompt 0"),
        out / "lambda_tokens",
        meta=meta,
    )
    return PSRTraining(psr, history, distance)


def write_psr_comparison(result: Comparison, out: Path, *, model_name: str, psr: PSR,
                         held: PairSet | PromptSet) -> None:
    """``matched.csv``, ``curve.csv`` and the ``matched_coherence`` figure of a comparison.

    Pairs are plotted by their margin, a role's prompts (no pairs) by mean strength.
    """
    out = Path(out)
    write_csv(result.table, out / "matched.csv")
    write_csv(result.curve, out / "curve.csv")
    kind = "pairs" if isinstance(held, PairSet) else "prompts"
    save_figure(
        psr_coherence_curve(
            result.curve,
            result.table,
            subtitle=f"{model_name} · layer(s) {list(psr.layers)[:3]} · {len(held)} held-out {kind}",
            y="margin" if kind == "pairs" else "mean_strength",
        ),
        out / "matched_coherence",
        meta=result.meta,
    )
