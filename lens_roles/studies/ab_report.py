"""CAA A/B behaviour curves for several behaviours, written as one folder.

:func:`run_ab_report` is the whole job of ``lens-roles ab-curve``: one
:func:`~lens_roles.studies.ab_curves.ab_curve` per pair set (its vector saved to
``vectors/<behaviour>.safetensors``), then ``curves.csv``, ``scores.csv``,
``monotonicity.csv`` and the ``ab_curves`` figure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from lens_roles.inputs.prompts import PairSet
from lens_roles.io import write_csv
from lens_roles.studies.ab_curves import ab_curve, monotonicity
from lens_roles.viz import ab_curves, save_figure


def run_ab_report(model, pair_sets: Sequence[PairSet], *, layer: int, multipliers: Sequence[float], out: Path,
                  n_train: int = 128, n_test: int = 64, seed: int = 0, template: str | None = None,
                  batch_size: int = 16, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Curves of p(matching answer) against the multiplier at ``layer``, one per behaviour.

    Returns ``(curves, monotonicity)``: the tidy curve rows of every behaviour and
    their monotonicity summary, both also written under ``out``. With ``progress``,
    a bar per behaviour and a one-line summary of each on stderr.
    """
    out = Path(out)
    curves = []
    for pairs in pair_sets:
        curve = ab_curve(
            model,
            pairs,
            layer=layer,
            multipliers=multipliers,
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            template=template,
            batch_size=batch_size,
            progress=progress,
        )
        curve.vector.save(out / "vectors" / f"{pairs.name}.safetensors")
        curves.append(curve)
        p = curve.frame.p_match
        if progress:
            print(f"{pairs.name}: p(match) {p.iloc[0]:.3f} at {multipliers[0]:g} → {p.iloc[-1]:.3f} at "
                  f"{multipliers[-1]:g}", file=sys.stderr)
    frame = pd.concat([c.frame for c in curves], ignore_index=True)
    mono = monotonicity(frame)
    write_csv(frame, out / "curves.csv")
    write_csv(pd.concat([c.scores for c in curves], ignore_index=True), out / "scores.csv")
    write_csv(mono, out / "monotonicity.csv")
    meta = {"model": model.cfg.model_name, "behaviours": [c.meta for c in curves]}
    save_figure(
        ab_curves(frame, subtitle=f"{model.cfg.model_name} · layer {layer} · held-out pairs, 95% bootstrap bands"),
        out / "ab_curves",
        meta=meta,
    )
    return frame, mono
