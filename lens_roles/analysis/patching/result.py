"""The result of a patching run (values over a grid's axes, with labels and provenance), and how two
methods agree."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from lens_roles.errors import PatchingError
from lens_roles.measures.statistics import pearson


@dataclass(frozen=True, eq=False)
class PatchResult:
    """One grid of patching results.

    Attributes:
        values: normalised effects (0 = corrupt, 1 = clean), float64, one axis per
            entry of ``axes``: ``[layer, pos]``, ``[layer]`` or ``[layer, head]``.
        axes: axis names, from ``layer``, ``pos``, ``head``.
        labels: per axis, the layer / position / head index of each entry.
        grid, method: which grid (see :data:`GRIDS`), ``"activation"`` or ``"attribution"``
            (plain or integrated gradients: ``meta["attribution"]`` is ``"atp"`` or ``"ig"``,
            ``meta["steps"]`` the interpolation steps).
        metric: the metric's label; ``clean_value`` and ``corrupt_value`` its raw values.
        tokens, corrupt_tokens: the prompt's tokens as strings, every position.
        positions: the prompt positions patched (the ``pos`` axis, or pooled by a
            per-layer/per-head cell).
        meta: what the numbers depend on (model, prompts, token hashes, template, BOS,
            metric, normalisation, package version, timing).
    """

    values: Float[Tensor, "..."]
    axes: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    grid: str
    method: str
    metric: str
    clean_value: float
    corrupt_value: float
    tokens: tuple[str, ...]
    corrupt_tokens: tuple[str, ...]
    positions: tuple[int, ...]
    meta: dict

    def __post_init__(self):
        shape = tuple(len(labels) for labels in self.labels)
        if len(self.axes) != len(self.labels) or tuple(self.values.shape) != shape:
            raise PatchingError(f"values of shape {tuple(self.values.shape)} do not match axes {self.axes} "
                                f"with {shape} labels")

    @property
    def raw(self) -> Float[Tensor, "..."]:
        """The values in the metric's own units (for attribution: the linear estimate)."""
        return self.corrupt_value + self.values * (self.clean_value - self.corrupt_value)

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: ``grid, method, metric, layer, pos, head, token, corrupt_token, value, raw``."""
        rows = []
        raw = self.raw
        for idx in itertools.product(*(range(len(labels)) for labels in self.labels)):
            rec = {"grid": self.grid, "method": self.method, "metric": self.metric,
                   "layer": None, "pos": None, "head": None, "token": None, "corrupt_token": None}
            for axis, labels, i in zip(self.axes, self.labels, idx):
                rec[axis] = labels[i]
            if rec["pos"] is not None:
                rec["token"], rec["corrupt_token"] = self.tokens[rec["pos"]], self.corrupt_tokens[rec["pos"]]
            rec["value"], rec["raw"] = float(self.values[idx]), float(raw[idx])
            rows.append(rec)
        frame = pd.DataFrame(rows)
        for col in ("layer", "pos", "head"):
            frame[col] = frame[col].astype("Int64")
        return frame

    def top(self, n: int = 5) -> pd.DataFrame:
        """The ``n`` cells with the largest effect (by absolute value)."""
        frame = self.to_frame()
        return frame.loc[frame.value.abs().sort_values(ascending=False, kind="stable").index[:n]]

    def __repr__(self) -> str:
        dims = " × ".join(f"{a} {len(lab)}" for a, lab in zip(self.axes, self.labels))
        return (f"PatchResult({self.method} patching, grid {self.grid!r} ({dims}), metric {self.metric!r}, "
                f"clean {self.clean_value:.4g}, corrupt {self.corrupt_value:.4g})")


def patch_agreement(activation: PatchResult | Sequence[PatchResult],
                    attribution: PatchResult | Sequence[PatchResult]) -> pd.DataFrame:
    """How well attribution patching matches activation patching, per grid.

    Returns ``grid, metric, cells, pearson, max_abs_diff`` (Pearson correlation over
    every cell of the grid).
    """
    acts = [activation] if isinstance(activation, PatchResult) else list(activation)
    attrs = {r.grid: r for r in ([attribution] if isinstance(attribution, PatchResult) else attribution)}
    rows = []
    for act in acts:
        att = attrs.get(act.grid)
        if att is None:
            raise PatchingError(f"no attribution result for grid {act.grid!r} (have {sorted(attrs)})")
        if act.labels != att.labels or act.positions != att.positions or act.metric != att.metric:
            raise PatchingError(f"grid {act.grid!r}: activation and attribution results cover different cells "
                                "or metrics; compute both from the same PatchSetup and arguments")
        rows.append({"grid": act.grid, "metric": act.metric, "cells": act.values.numel(),
                     "pearson": pearson(act.values, att.values),
                     "max_abs_diff": float((act.values - att.values).abs().max())})
    return pd.DataFrame(rows)
