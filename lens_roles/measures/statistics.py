"""Statistics shared by the studies and analyses: percentile-bootstrap intervals of a mean, and Pearson's r.

The bootstrap resamples items (questions, pairs) with replacement; the resamples
are drawn once as an index array ``[draw, n]`` (:func:`bootstrap_indices`) so that
several quantities can share them — a *paired* interval of a difference resamples
the same items on both sides. :func:`percentile_interval` turns bootstrap draws of
a statistic into a central interval; :func:`bootstrap_mean` does both for a mean.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from lens_roles.errors import DataError


def bootstrap_indices(n: int, n_boot: int, seed: int | np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` item indices drawn with replacement: one resample of ``n`` items per row.

    ``seed`` is a seed or a ``numpy`` Generator (to draw several sets from one stream).
    """
    if n < 1 or n_boot < 1:
        raise DataError(f"a bootstrap needs at least one item and one draw, got n={n}, n_boot={n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(draws: ArrayLike, level: float) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``draws [draw]``: their (1−level)/2 and (1+level)/2 percentiles."""
    if not 0 < level < 1:
        raise DataError(f"interval level must be in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_mean(values: ArrayLike, indices: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values [n]`` and its percentile-bootstrap interval over the resamples ``indices [draw, n]``."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), *percentile_interval(values[indices].mean(1), level)


def pearson(x: ArrayLike | Tensor, y: ArrayLike | Tensor) -> float:
    """Pearson correlation of two samples of the same size (flattened), in float64.

    NaN when either sample is constant (the correlation is undefined).

    Raises:
        DataError: the samples have different sizes.
    """
    x, y = _flat_float64(x), _flat_float64(y)
    if x.shape != y.shape:
        raise DataError(f"Pearson correlation of samples of different sizes ({x.numel()} and {y.numel()})")
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x @ y) / denom) if denom > 0 else float("nan")


def _flat_float64(v: ArrayLike | Tensor) -> Tensor:
    """A sample as a flat float64 CPU tensor (from a tensor, an array, a Series or a list)."""
    v = v.detach().cpu() if isinstance(v, Tensor) else torch.tensor(np.asarray(v, dtype=np.float64))
    return v.double().flatten()
