"""Bootstrap intervals and Pearson's r (lens_roles.measures.statistics) against direct numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from lens_roles.errors import DataError
from lens_roles.measures.statistics import bootstrap_indices, bootstrap_mean, pearson, percentile_interval


def test_bootstrap_mean_matches_numpy():
    rng = np.random.default_rng(0)
    v = rng.random(20)
    idx = rng.integers(0, 20, size=(500, 20))
    mean, lo, hi = bootstrap_mean(v, idx, 0.9)
    draws = v[idx].mean(1)
    assert mean == pytest.approx(v.mean())
    assert (lo, hi) == pytest.approx(tuple(np.percentile(draws, [5, 95])))
    assert bootstrap_mean(np.ones(5), idx[:, :5] % 5)[1:] == (1.0, 1.0)


def test_bootstrap_indices_are_seeded_resamples():
    idx = bootstrap_indices(7, 300, seed=3)
    assert idx.shape == (300, 7) and idx.min() >= 0 and idx.max() <= 6
    assert np.array_equal(idx, np.random.default_rng(3).integers(0, 7, size=(300, 7)))
    # a Generator continues its stream: two sets drawn in turn differ, and equal a direct draw
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    first, second = bootstrap_indices(4, 10, rng), bootstrap_indices(6, 10, rng)
    assert np.array_equal(first, ref.integers(0, 4, size=(10, 4)))
    assert np.array_equal(second, ref.integers(0, 6, size=(10, 6)))
    with pytest.raises(DataError, match="at least one item and one draw, got n=0"):
        bootstrap_indices(0, 10, 0)


def test_percentile_interval():
    draws = np.arange(101, dtype=float)
    assert percentile_interval(draws, 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_interval(draws, 0.5) == pytest.approx((25.0, 75.0))
    with pytest.raises(DataError, match=r"level must be in \(0, 1\), got 95"):
        percentile_interval(draws, 95)


def test_pearson_matches_numpy_for_every_input_kind():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    ref = float(np.corrcoef(x, y)[0, 1])
    assert pearson(x, y) == pytest.approx(ref, abs=1e-12)
    assert pearson(torch.tensor(x).reshape(5, 6), torch.tensor(y, dtype=torch.float64).reshape(5, 6)) == \
        pytest.approx(ref, abs=1e-12)
    assert pearson(pd.Series(x), list(y)) == pytest.approx(ref, abs=1e-12)
    assert pearson(x, -2 * x + 1) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(pearson(x, np.full(30, 3.0)))  # a constant sample: undefined
    with pytest.raises(DataError, match="different sizes \\(30 and 29\\)"):
        pearson(x, y[:-1])
