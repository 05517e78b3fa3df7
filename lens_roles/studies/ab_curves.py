"""Behaviour A/B curves (Contrastive Activation Addition style).

A CAA pair is one question with two lettered choices, answered once with the
letter that matches a behaviour (``positive``) and once with the other. For a
behaviour:

1. the pairs are shuffled with a seed and cut into a *training* part and a
   disjoint *test* part;
2. the steering vector at ``layer`` is the mean residual at the answer-letter
   token of the positive answers minus the same for the negative answers, over
   the training pairs (CAA reads that one position; it is the first token where
   a pair's two texts differ);
3. for every multiplier ``m``, ``m·v`` is added at ``layer`` at every position,
   and each test question is scored by the probability of the matching letter,
   the softmax over the two letter tokens at the position where the answer
   letter comes (the same scoring as :mod:`lens_roles.measures.multiple_choice`).

The curve is the mean of that probability over the test questions against
``m``, with percentile-bootstrap intervals; :func:`monotonicity` says whether it
rises with ``m``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lens_roles._version import __version__
from lens_roles.directions.builders import diff_in_means
from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import PairSet, common_prefix_len
from lens_roles.interventions.steering import steer
from lens_roles.measures.multiple_choice import ChoiceItem, choice_logprobs
from lens_roles.measures.statistics import bootstrap_indices, bootstrap_mean, pearson
from lens_roles.runtime.activations import collect_sets
from lens_roles.runtime.models import validate_layers

DEFAULT_MULTIPLIERS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def ab_items(model, pairs: PairSet, *, template: str | None = None) -> tuple[list[ChoiceItem], list[int]]:
    """Each pair as a two-choice item (matching letter first) and the index of its letter token.

    Raises:
        DataError: naming the pair, when its two texts do not differ in a token
            after a shared prefix (e.g. the answers are identical).
    """
    encoded = encode(model, [p for pair in pairs.pairs for p in pair.as_prompts()], template=template)
    items, letter_at = [], []
    for k in range(len(pairs)):
        pos, neg = encoded[2 * k].tokens, encoded[2 * k + 1].tokens
        n = common_prefix_len(pos, neg)
        if n == 0 or n >= min(len(pos), len(neg)):
            raise DataError(f"{pairs.source or pairs.name} pair {k}: the positive and negative answers do not "
                            "differ in one token after a shared prefix")
        items.append(ChoiceItem(tuple(pos[:n]), (pos[n], neg[n]), 0))
        letter_at.append(n)
    return items, letter_at


def ab_vector(model, pairs: PairSet, layers, *, template: str | None = None, batch_size: int = 16) -> Direction:
    """CAA steering vector: mean(positive) − mean(negative) at the answer-letter token."""
    layers = validate_layers(model, layers)
    _, letter_at = ab_items(model, pairs, template=template)
    # one position list per prompt of both sets, in order: the positives, then the negatives
    positions = [[n] for n in letter_at] * 2
    pos, neg = collect_sets(model, [pairs.positives(), pairs.negatives()], layers=layers,
                            positions=positions, template=template, batch_size=batch_size)
    return diff_in_means(pos, neg, method="caa", name=pairs.name, dataset=pairs.fingerprint(), source=pairs.source,
                         positions="answer_letter")


@dataclass
class ABCurve:
    """One behaviour's curve: ``frame`` (``behaviour, layer, multiplier, p_match, lo, hi, n``),
    the ``vector`` it steered with, the per-question ``scores`` and provenance ``meta``."""

    frame: pd.DataFrame
    vector: Direction
    scores: pd.DataFrame
    meta: dict = field(default_factory=dict)


@torch.no_grad()
def ab_curve(model, pairs: PairSet, *, layer: int, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
             n_train: int = 128, n_test: int = 64, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
             template: str | None = None, batch_size: int = 16, progress: bool = True) -> ABCurve:
    """p(matching answer) against the multiplier of the behaviour's CAA vector at ``layer``.

    With ``progress`` a tqdm bar on stderr counts the multipliers scored.
    """
    (layer,) = validate_layers(model, [layer])
    mults = [float(m) for m in multipliers]
    if not mults or any(not np.isfinite(m) for m in mults):
        raise DataError(f"multipliers must be finite numbers, got {list(multipliers)}")
    train, test = pairs.split(n_train, seed=seed, rest=n_test, names=(f"{pairs.name}[train]", f"{pairs.name}[test]"))
    vector = ab_vector(model, train, [layer], template=template, batch_size=batch_size)
    items, _ = ab_items(model, test, template=template)
    draws = bootstrap_indices(len(items), n_boot, seed)
    rows, scores = [], []
    for m in tqdm(mults, desc=f"A/B curve {pairs.name}", unit="multiplier", disable=not progress):
        with steer(model, vector, m, layers=[layer]):
            logps = choice_logprobs(model, items, batch_size=batch_size)
        p = np.array([float(torch.softmax(lp.double(), -1)[0]) for lp in logps])
        mean, lo, hi = bootstrap_mean(p, draws, level)
        rows.append({"behaviour": pairs.name, "layer": layer, "multiplier": m, "p_match": mean, "lo": lo, "hi": hi,
                     "n": len(p)})
        scores += [{"behaviour": pairs.name, "multiplier": m, "pair": i, "p_match": float(x)} for i, x in enumerate(p)]
    meta = {"model": model.cfg.model_name, "behaviour": pairs.name, "source": pairs.source, "layer": layer,
            "n_train": len(train), "n_test": len(test), "seed": seed, "dataset": pairs.fingerprint(),
            "vector_norm": vector.norms()[layer], "lens_roles": __version__,
            "steered_positions": "all", "multiplier_of": "raw mean-difference vector"}
    return ABCurve(pd.DataFrame(rows), vector, pd.DataFrame(scores), meta)


def monotonicity(frame: pd.DataFrame) -> pd.DataFrame:
    """Per behaviour: Spearman ρ of p_match vs multiplier, whether the curve never falls
    (``monotone``), and p_match at the lowest and highest multiplier."""
    rows = []
    for name, grp in frame.groupby("behaviour", sort=True):
        grp = grp.sort_values("multiplier")
        p = grp.p_match.to_numpy(float)
        ranks_m = grp.multiplier.rank().to_numpy(float)
        ranks_p = grp.p_match.rank().to_numpy(float)
        rho = pearson(ranks_m, ranks_p) if len(p) > 1 and p.std() > 0 else float("nan")  # of the ranks
        rows.append({"behaviour": name, "spearman": rho, "monotone": bool(np.all(np.diff(p) >= 0)),
                     "p_at_min": float(p[0]), "p_at_max": float(p[-1]), "rises": bool(p[-1] > p[0])})
    return pd.DataFrame(rows)
