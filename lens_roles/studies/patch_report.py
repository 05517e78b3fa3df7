"""Patching grids by activation and attribution, written as one folder.

:func:`run_patch_report` is the whole job of ``lens-roles patch`` once the
:class:`~lens_roles.analysis.patching.runs.PatchSetup` exists: every grid by every
method, one heatmap per grid, ``patch.csv`` (tidy rows of all of them), and with
both methods ``agreement.csv`` (per grid: the attribution method and its steps,
Pearson r against activation patching) and the attribution-vs-activation scatter;
with several grids an overview heatmap. Attribution is plain attribution patching
or integrated gradients, chosen per grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from lens_roles.analysis.patching.result import PatchResult, patch_agreement
from lens_roles.analysis.patching.runs import ATTRIBUTION_METHODS, PatchSetup, check_steps
from lens_roles.errors import PatchingError
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


def attribution_methods(grids: Sequence[str], attribution: str | Mapping[str, str]) -> dict[str, str]:
    """The attribution method (``"atp"`` or ``"ig"``) of each grid: one for all, or a mapping
    grid → method in which unnamed grids take ``"atp"``.

    Raises:
        PatchingError: an unknown method, or a mapping naming a grid not in ``grids``.
    """
    if isinstance(attribution, str):
        chosen = {grid: attribution for grid in grids}
    else:
        extra = sorted(set(attribution) - set(grids))
        if extra:
            raise PatchingError(f"attribution methods given for grids {extra} that are not patched "
                                f"(grids: {', '.join(grids)})")
        chosen = {grid: attribution.get(grid, "atp") for grid in grids}
    bad = sorted({m for m in chosen.values() if m not in ATTRIBUTION_METHODS})
    if bad:
        raise PatchingError(f"attribution method must be one of {', '.join(ATTRIBUTION_METHODS)}, got {bad[0]!r}")
    return chosen


def run_patch_report(setup: PatchSetup, grids: Sequence[str], *, out: Path, methods: Sequence[str] = METHODS,
                     layers: Sequence[int] | None = None, batch_size: int = 32,
                     attribution: str | Mapping[str, str] = "atp", steps: int | None = None,
                     progress: bool = True) -> PatchReport:
    """Patch ``grids`` of ``setup`` by ``methods`` (``activation`` batches ``batch_size`` runs
    per forward); write tables and figures under ``out``; report each grid's strongest cell.

    ``attribution`` picks plain attribution patching (``"atp"``) or integrated gradients
    with ``steps`` interpolation steps (``"ig"``), for every grid or per grid (a mapping
    grid → method), see :meth:`PatchSetup.attribution_patch`.
    """
    out = Path(out)
    methods = list(methods)
    chosen = attribution_methods(grids, attribution)
    if steps is not None:
        check_steps(steps)
        if "ig" not in chosen.values():
            raise PatchingError(f"steps={steps} is for the 'ig' attribution method, which no grid uses")
    metric = setup.metric
    results = []
    for grid in grids:
        pair = []
        for method in methods:
            if method == "activation":
                result = setup.activation_patch(grid, layers=layers, batch_size=batch_size)
                label = method
            else:
                how = chosen[grid]
                result = setup.attribution_patch(grid, layers=layers, method=how,
                                                 steps=steps if how == "ig" else None)
                label = "attribution" if how == "atp" else f"ig ({result.meta['steps']} steps)"
            pair.append(result)
            best = result.top(1).iloc[0]
            where = ", ".join(f"{k} {best[k]}" for k in ("layer", "pos", "head") if not pd.isna(best[k]))
            report(progress, f"{grid:8s} {label:15s} {result.meta['seconds']:7.2f} s   strongest: {where} "
                             f"({best.value:+.3f})")
        results += pair
        subtitle = (
            f"{setup.meta['model']} · {metric.label} · clean {setup.clean_value:.3g}, "
            f"corrupt {setup.corrupt_value:.3g} · 0 = corrupt, 1 = clean"
        )
        ig = [r.meta["steps"] for r in pair if r.method == "attribution" and r.meta["attribution"] == "ig"]
        save_figure(
            patch_heatmap(pair, title=f"Patching: {grid}",
                          subtitle=subtitle + (f" · attribution: integrated gradients, {ig[0]} steps" if ig else "")),
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
        agreement.insert(1, "attribution", [r.meta["attribution"] for r in results[1::2]])
        agreement.insert(2, "steps", [r.meta["steps"] for r in results[1::2]])
        write_csv(agreement, out / "agreement.csv")
        save_figure(
            patch_scatter(results, subtitle=f"{setup.meta['model']} · {metric.label}"),
            out / "attribution_vs_activation",
            meta=dict(setup.meta, grids=list(grids)),
        )
    return PatchReport(results, agreement)
