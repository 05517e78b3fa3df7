"""Measurements of directions, returned as tidy DataFrames (``layer, metric, value`` …).

* :func:`separation_auc` — how well projections on a direction separate two
  held-out prompt sets (ROC AUC per layer; 0.5 = chance, 1 = perfect);
* :func:`split_half_agreement` — cosine per layer between directions built from
  two disjoint halves of a pair set (is the direction stable?).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.directions.builders import diff_in_means, persona_vector
from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.prompts import PairSet
from lens_roles.runtime.activations import Activations


def roc_auc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """ROC AUC of ``pos_scores`` above ``neg_scores`` (Mann–Whitney U, ties count half)."""
    if pos_scores.numel() == 0 or neg_scores.numel() == 0:
        raise DataError("AUC needs at least one score on each side")
    p = pos_scores.double().flatten()[:, None]
    n = neg_scores.double().flatten()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def separation_auc(direction: Direction, positive: Activations | Sequence[Activations],
                   negative: Activations | Sequence[Activations]) -> pd.DataFrame:
    """Per-layer AUC of projections of held-out ``positive`` vs ``negative`` prompts.

    Each side is one :class:`Activations` or several, whose prompts are pooled (a
    role's prompts against every other role's, say). Every set needs
    ``per_prompt`` (collect with ``keep_per_prompt=True``) and the direction's layers.
    Returns columns ``layer, metric ("auc"), value``.
    """
    sides = [[positive] if isinstance(positive, Activations) else list(positive),
             [negative] if isinstance(negative, Activations) else list(negative)]
    for side, name in zip(sides, ("positive", "negative")):
        if not side:
            raise DataError(f"separation_auc: no {name} activation sets given")
        for acts in side:
            if acts.per_prompt is None:
                raise DataError("separation_auc needs per-prompt activations (keep_per_prompt=True)")
    rows = []
    for layer in direction.layers:
        unit = direction.unit(layer)
        pos, neg = (_pooled_at(side, layer) @ unit for side in sides)
        rows.append({"layer": layer, "metric": "auc", "value": roc_auc(pos, neg)})
    return pd.DataFrame(rows)


def _pooled_at(sets: Sequence[Activations], layer: int) -> Float[Tensor, "batch d_model"]:
    """The per-prompt vectors ``[batch, d_model]`` of ``sets`` at ``layer``, the sets' prompts one after another."""
    return torch.cat([acts.per_prompt[:, acts.layer_index(layer)] for acts in sets])


def split_half_agreement(model, pairs: PairSet, *, build=None,
                         activations: tuple[Activations, Activations] | None = None, **kwargs) -> pd.DataFrame:
    """Cosine per layer between the directions of the two halves of ``pairs`` (even and odd pairs).

    Args:
        build: ``build(model, pair_set, **kwargs) -> Direction``; default
            :func:`lens_roles.directions.persona_vector` (each half collected in its own run).
        activations: the pairs' ``(positive, negative)`` activations already collected
            with ``keep_per_prompt=True`` (one prompt per pair, in the pairs' order):
            nothing is run, and each half's direction is the difference of its
            prompts' means (:func:`~lens_roles.directions.builders.diff_in_means`).
            Excludes ``build`` and ``kwargs``.
    Returns columns ``layer, metric ("split_half_cosine"), value``.
    """
    first, second = pairs.halves()
    if activations is None:
        build = build or persona_vector
        a, b = build(model, first, **kwargs), build(model, second, **kwargs)
    else:
        given = ["build"] * (build is not None) + sorted(kwargs)
        if given:
            raise DataError(f"split_half_agreement: with activations= nothing is collected or built; drop "
                            f"{', '.join(given)}")
        positive, negative = activations
        for acts, side in ((positive, "positive"), (negative, "negative")):
            if acts.per_prompt is None or acts.count != len(pairs):
                raise DataError(f"split_half_agreement: the {side} activations must hold one per-prompt vector "
                                f"per pair ({len(pairs)} pairs of {pairs.name!r}), got count {acts.count} with "
                                f"per_prompt {'None' if acts.per_prompt is None else tuple(acts.per_prompt.shape)}; "
                                "collect them from pairs.positives()/negatives() with keep_per_prompt=True")
        evens, odds = range(0, len(pairs), 2), range(1, len(pairs), 2)  # the halves of PairSet.halves
        a = diff_in_means(positive.subset(evens), negative.subset(evens))
        b = diff_in_means(positive.subset(odds), negative.subset(odds))
    return pd.DataFrame(
        [{"layer": layer, "metric": "split_half_cosine", "value": c} for layer, c in a.cosine(b).items()]
    )
