"""Measurements of directions, returned as tidy DataFrames (``layer, metric, value`` …).

* :func:`separation_auc` — how well projections on a direction separate two
  held-out prompt sets (ROC AUC per layer; 0.5 = chance, 1 = perfect);
* :func:`split_half_agreement` — cosine per layer between directions built from
  two disjoint halves of a pair set (is the direction stable?).
"""

from __future__ import annotations

import pandas as pd
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.runtime.activations import Activations


def roc_auc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """ROC AUC of ``pos_scores`` above ``neg_scores`` (Mann–Whitney U, ties count half)."""
    if pos_scores.numel() == 0 or neg_scores.numel() == 0:
        raise DataError("AUC needs at least one score on each side")
    p = pos_scores.double().flatten()[:, None]
    n = neg_scores.double().flatten()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def separation_auc(direction: Direction, positive: Activations, negative: Activations) -> pd.DataFrame:
    """Per-layer AUC of projections of held-out ``positive`` vs ``negative`` prompts.

    Both activation sets need ``per_prompt`` (collect with ``keep_per_prompt=True``).
    Returns columns ``layer, metric ("auc"), value``.
    """
    for acts in (positive, negative):
        if acts.per_prompt is None:
            raise DataError("separation_auc needs per-prompt activations (keep_per_prompt=True)")
    rows = []
    for layer in direction.layers:
        unit = direction.unit(layer)
        pos = positive.per_prompt[:, positive.layer_index(layer)] @ unit
        neg = negative.per_prompt[:, negative.layer_index(layer)] @ unit
        rows.append({"layer": layer, "metric": "auc", "value": roc_auc(pos, neg)})
    return pd.DataFrame(rows)


def split_half_agreement(model, pairs, *, build=None, **kwargs) -> pd.DataFrame:
    """Cosine per layer between the directions of the two halves of ``pairs``.

    Args:
        build: ``build(model, pair_set, **kwargs) -> Direction``; default
            :func:`lens_roles.directions.persona_vector`.
    Returns columns ``layer, metric ("split_half_cosine"), value``.
    """
    from lens_roles.directions.builders import persona_vector

    build = build or persona_vector
    first, second = pairs.halves()
    a, b = build(model, first, **kwargs), build(model, second, **kwargs)
    return pd.DataFrame(
        [{"layer": layer, "metric": "split_half_cosine", "value": c} for layer, c in a.cosine(b).items()]
    )
