"""Patching grids by activation and attribution, written as one folder.

:func:`run_patch_report` is the whole job of ``lens-roles patch`` once the
:class:`~lens_roles.analysis.patching.runs.PatchSetup` exists: every grid by every
method, one heatmap per grid, ``patch.csv`` (tidy rows of all of them), and with
both methods ``agreement.csv`` and the attribution-vs-activation scatter; with
several grids an overview heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from lens_roles.analysis.patching.result import PatchResult, patch_agreement
from lens_roles.analysis.patching.runs import PatchSetup
from lens_roles.io import write_csv
from lens_roles.studies.reporting import report
from lens_roles.viz import patch_heatmap, patch_scatter, save_figure

METHODS = ("activation", "attribution")


@dataclass
class PatchReport:
    """What :func:`run_patch_report` computed: results in grid order (methods alternating
    within a grid), and the per-grid Pearson agreement (None with one method)."""

    results: list[PatchResult]
    agreement: pd.DataFrame | None


def run_patch_report(setup: PatchSetup, grids: Sequence[str], *, out: Path, methods: Sequence[str] = METHODS,
                     layers: Sequence[int] | None = None, batch_size: int = 32,
                     progress: bool = True) -> PatchReport:
    """Patch ``grids`` of ``setup`` by ``methods`` (``activation`` batches ``batch_size`` runs
    per forward); write tables and figures under ``out``; report each grid's strongest cell."""
    out = Path(out)
    methods = list(methods)
    metric = setup.metric
    results = []
    for grid in grids:
        pair = []
        for method in methods:
            if method == "activation":
                result = setup.activation_patch(grid, layers=layers, batch_size=batch_size)
            else:
                result = setup.attribution_patch(grid, layers=layers)
            pair.append(result)
            best = result.top(1).iloc[0]
            where = ", ".join(f"{k} {best[k]}" for k in ("layer", "pos", "head") if not pd.isna(best[k]))
            report(progress, f"{grid:8s} {method:11s} {result.meta['seconds']:7.2f} s   strongest: {where} "
                             f"({best.value:+.3f})")
        results += pair
        subtitle = (
            f"{setup.meta['model']} · {metric.label} · clean {setup.clean_value:.3g}, "
            f"corrupt {setup.corrupt_value:.3g} · 0 = corrupt, 1 = clean"
        )
        save_figure(
            patch_heatmap(pair, title=f"Patching: {grid}", subtitle=subtitle),
            out / f"patch_{grid}",
            meta=dict(pair[0].meta, methods=methods),
        )
    write_csv(pd.concat([r.to_frame() for r in results], ignore_index=True), out / "patch.csv")
    if len(grids) > 1:
        save_figure(
            patch_heatmap(results, title="Patching: every grid", subtitle=subtitle),
            out / "patch_overview",
            meta=dict(setup.meta, grids=list(grids), methods=methods),
        )
    agreement = None
    if len(methods) == 2:
        agreement = patch_agreement(results[0::2], results[1::2])
        write_csv(agreement, out / "agreement.csv")
        save_figure(
            patch_scatter(results, subtitle=f"{setup.meta['model']} · {metric.label}"),
            out / "attribution_vs_activation",
            meta=dict(setup.meta, grids=list(grids)),
        )
    return PatchReport(results, agreement)
