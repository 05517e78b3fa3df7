"""CAA A/B behaviour curves for several behaviours, written as one folder.

:func:`run_ab_report` is the whole job of ``lens-roles ab-curve``: one
:func:`~lens_roles.studies.ab_curves.ab_curve` per pair set (its vector saved to
``vectors/<behaviour>.safetensors``), then ``curves.csv``, ``scores.csv``,
``monotonicity.csv``, ``steerability.csv`` and the figures: ``ab_curves`` at one
layer; with several layers (one branched run per behaviour) ``steerability``, the
layer × multiplier heatmap of every behaviour with its slope per layer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from lens_roles.inputs.prompts import PairSet
from lens_roles.io import write_csv
from lens_roles.runtime.shards import Executor
from lens_roles.studies.ab_curves import ab_curve, monotonicity
from lens_roles.viz import ab_curves, save_figure, steerability_heatmap


def run_ab_report(model, pair_sets: Sequence[PairSet], *, layer: int | Sequence[int], multipliers: Sequence[float],
                  out: Path, n_train: int = 128, n_test: int = 64, seed: int = 0, template: str | None = None,
                  batch_size: int = 16, progress: bool = True, executor: Executor | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Curves of p(matching answer) against the multiplier at ``layer`` (one or several), one per behaviour.

    Returns ``(curves, monotonicity, steerability)``: the tidy curve rows of every
    behaviour (and layer), their monotonicity summary and their steerability per
    layer (slope of p(match) against the multiplier, bootstrap interval), all also
    written under ``out``. With ``progress``, a bar per behaviour and a one-line
    summary of each on stderr. ``executor``: the forward passes run as shards on its workers.
    """
    out = Path(out)
    several = not isinstance(layer, int)
    curves = []
    for pairs in pair_sets:
        curve = ab_curve(model, pairs, layer=layer, multipliers=multipliers, n_train=n_train, n_test=n_test,
                         seed=seed, template=template, batch_size=batch_size, progress=progress,
                         executor=executor)
        curve.vector.save(out / "vectors" / f"{pairs.name}.safetensors")
        curves.append(curve)
        if progress:
            s = curve.steerability
            if several:
                best = s.loc[s.slope.abs().idxmax()]
                print(f"{pairs.name}: steepest at layer {int(best.layer)}, slope {best.slope:.4f} per unit "
                      f"[{best.lo:.4f}, {best.hi:.4f}]", file=sys.stderr)
            else:
                p = curve.frame.p_match
                print(f"{pairs.name}: p(match) {p.iloc[0]:.3f} at {multipliers[0]:g} → {p.iloc[-1]:.3f} at "
                      f"{multipliers[-1]:g}", file=sys.stderr)
    frame = pd.concat([c.frame for c in curves], ignore_index=True)
    steer = pd.concat([c.steerability for c in curves], ignore_index=True)
    mono = monotonicity(frame)
    write_csv(frame, out / "curves.csv")
    write_csv(pd.concat([c.scores for c in curves], ignore_index=True), out / "scores.csv")
    write_csv(mono, out / "monotonicity.csv")
    write_csv(steer, out / "steerability.csv")
    meta = {"model": model.cfg.model_name, "behaviours": [c.meta for c in curves]}
    if several:
        layers = sorted(set(frame.layer))
        save_figure(steerability_heatmap(frame, steer, subtitle=f"{model.cfg.model_name} · layers {layers[0]}–"
                                         f"{layers[-1]} · held-out pairs, 95% bootstrap intervals of the slope"),
                    out / "steerability", meta=meta)
    else:
        save_figure(
            ab_curves(frame, subtitle=f"{model.cfg.model_name} · layer {layer} · held-out pairs, 95% bootstrap bands"),
            out / "ab_curves",
            meta=meta,
        )
    return frame, mono, steer
