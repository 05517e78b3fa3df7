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
rises with ``m``, and :func:`steerability` gives its least-squares slope with a
bootstrap interval (the steerability of Tan et al., 2024). Every layer can be
measured in one run: the layers below each steered one are shared
(:mod:`lens_roles.runtime.branching`), so all layers cost little more than one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from lens_roles._version import __version__
from lens_roles.directions.builders import diff_in_means
from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import PairSet, common_prefix_len
from lens_roles.interventions.steering import steering_hooks
from lens_roles.measures.multiple_choice import (
    ChoiceItem,
    Condition,
    branched_choice_logprobs,
    sharded_choice_logprobs,
)
from lens_roles.measures.statistics import bootstrap_indices, bootstrap_mean, pearson, percentile_interval
from lens_roles.runtime.activations import collect_sets
from lens_roles.runtime.branching import Branch, unsteered
from lens_roles.runtime.models import validate_layers
from lens_roles.runtime.shards import Executor

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


def ab_vector(model, pairs: PairSet, layers, *, template: str | None = None, batch_size: int = 16,
              executor: Executor | None = None) -> Direction:
    """CAA steering vector: mean(positive) − mean(negative) at the answer-letter token (``executor``: the
    collection runs as shards on its workers)."""
    layers = validate_layers(model, layers)
    _, letter_at = ab_items(model, pairs, template=template)
    # one position list per prompt of both sets, in order: the positives, then the negatives
    positions = [[n] for n in letter_at] * 2
    pos, neg = collect_sets(model, [pairs.positives(), pairs.negatives()], layers=layers,
                            positions=positions, template=template, batch_size=batch_size, executor=executor)
    return diff_in_means(pos, neg, method="caa", name=pairs.name, dataset=pairs.fingerprint(), source=pairs.source,
                         positions="answer_letter")


@dataclass
class ABCurve:
    """One behaviour's curves: ``frame`` (``behaviour, layer, multiplier, p_match, lo, hi, n``), one curve
    per steered layer; the ``vector`` it steered with; the per-question ``scores`` (``behaviour, layer,
    multiplier, pair, p_match``); the ``steerability`` per layer (:func:`steerability`); provenance ``meta``."""

    frame: pd.DataFrame
    vector: Direction
    scores: pd.DataFrame
    meta: dict = field(default_factory=dict)
    steerability: pd.DataFrame = field(default_factory=pd.DataFrame)


@torch.no_grad()
def ab_curve(model, pairs: PairSet, *, layer: int | Sequence[int], multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
             n_train: int = 128, n_test: int = 64, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
             template: str | None = None, batch_size: int = 16, progress: bool = True,
             executor: Executor | None = None) -> ABCurve:
    """p(matching answer) against the multiplier of the behaviour's CAA vector at ``layer`` (one or several).

    With several layers the vector is read at each of them and the curve of each
    is measured in one branched run: every test question runs once up to the
    deepest layer, and each layer and multiplier only the blocks above its layer
    (:func:`~lens_roles.measures.multiple_choice.branched_choice_logprobs`); the
    bootstrap resamples the same questions for every layer and multiplier. With
    ``progress`` a tqdm bar on stderr counts the test questions × runs (one per layer and non-zero multiplier,
    and the unsteered one). With an ``executor`` the vector's collection and the scoring run as
    shards on its workers (:func:`~lens_roles.measures.multiple_choice.sharded_choice_logprobs`): the
    same per-question probabilities, so the same curve sums.
    """
    layers = validate_layers(model, [layer] if isinstance(layer, int) else list(layer))
    if len(set(layers)) != len(layers):
        raise DataError(f"layers must not repeat, got {list(layers)}")
    mults = [float(m) for m in multipliers]
    if not mults or any(not np.isfinite(m) for m in mults):
        raise DataError(f"multipliers must be finite numbers, got {list(multipliers)}")
    train, test = pairs.split(n_train, seed=seed, rest=n_test, names=(f"{pairs.name}[train]", f"{pairs.name}[test]"))
    vector = ab_vector(model, train, layers, template=template, batch_size=batch_size, executor=executor)
    items, _ = ab_items(model, test, template=template)
    draws = bootstrap_indices(len(items), n_boot, seed)
    # one unsteered branch (multiplier 0 at any layer adds nothing), one per layer and non-zero multiplier
    branches, index = [unsteered(model)], {}
    for ly in layers:
        for m in mults:
            if m == 0.0:
                index[(ly, m)] = 0
            else:
                index[(ly, m)] = len(branches)
                branches.append(Branch(ly, tuple(steering_hooks(model, vector, m, layers=[ly]))))
    if executor is None:
        logps = branched_choice_logprobs(model, items, branches, batch_size=batch_size, progress=progress,
                                         desc=f"A/B curve {pairs.name}")
    else:  # the same branches, as conditions each worker builds on its own model
        conditions = [(Condition("none"), None)] + [(Condition("addition", ly, m), vector) for ly in layers
                                                    for m in mults if m != 0.0]
        logps = sharded_choice_logprobs(model, items, conditions, batch_size=batch_size, executor=executor,
                                        progress=progress)
    probs = [np.array([float(torch.softmax(lp.double(), -1)[0]) for lp in branch]) for branch in logps]
    rows, scores = [], []
    for ly in layers:
        for m in mults:
            p = probs[index[(ly, m)]]
            mean, lo, hi = bootstrap_mean(p, draws, level)
            rows.append({"behaviour": pairs.name, "layer": ly, "multiplier": m, "p_match": mean, "lo": lo, "hi": hi,
                         "n": len(p)})
            scores += [{"behaviour": pairs.name, "layer": ly, "multiplier": m, "pair": i, "p_match": float(x)}
                       for i, x in enumerate(p)]
    meta = {"model": model.cfg.model_name, "behaviour": pairs.name, "source": pairs.source,
            **({"layer": layers[0]} if isinstance(layer, int) else {"layers": list(layers)}),
            "n_train": len(train), "n_test": len(test), "seed": seed, "dataset": pairs.fingerprint(),
            "vector_norm": (vector.norms()[layers[0]] if isinstance(layer, int)
                            else {ly: vector.norms()[ly] for ly in layers}),
            "lens_roles": __version__, "steered_positions": "all", "multiplier_of": "raw mean-difference vector",
            "n_boot": n_boot, "level": level}
    scores = pd.DataFrame(scores)
    return ABCurve(pd.DataFrame(rows), vector, scores, meta, steerability(scores, draws, level))


def steerability_slope(multipliers: Sequence[float], p: np.ndarray, draws: np.ndarray, level: float = 0.95
                       ) -> tuple[float, float, float]:
    """Least-squares slope of mean p(match) against the multiplier, and its percentile-bootstrap interval.

    ``p`` is ``[multiplier, question]``; each draw of ``draws`` ``[draw, question]``
    resamples the same questions at every multiplier. NaN when fewer than two
    distinct multipliers are given (no slope).
    """
    x = np.asarray(multipliers, dtype=float)
    p = np.asarray(p, dtype=float)
    if len(np.unique(x)) < 2:
        return float("nan"), float("nan"), float("nan")
    x = x - x.mean()

    def slope(means: np.ndarray) -> np.ndarray:  # means [multiplier, ...]
        return np.tensordot(x, means - means.mean(0), axes=(0, 0)) / (x @ x)

    boot = slope(p[:, draws].mean(-1))  # [multiplier, draw] -> [draw]
    return (float(slope(p.mean(1))), *percentile_interval(boot, level))


def steerability(scores: pd.DataFrame, draws: np.ndarray, level: float = 0.95) -> pd.DataFrame:
    """Steerability (Tan et al., 2024) per behaviour and layer: the slope of p(match) against the multiplier.

    ``scores``: per-question rows ``behaviour, layer, multiplier, pair, p_match``;
    ``draws``: the bootstrap resamples of the questions ``[draw, question]``. Returns
    ``behaviour, layer, slope, lo, hi, n, p_at_min, p_at_max`` (mean p(match) at the
    lowest and highest multiplier); an interval that excludes 0 says the behaviour
    moves with the multiplier at that layer.
    """
    rows = []
    for (name, ly), grp in scores.groupby(["behaviour", "layer"], sort=False):
        table = grp.pivot_table(index="multiplier", columns="pair", values="p_match").sort_index()
        slope, lo, hi = steerability_slope(table.index.to_numpy(float), table.to_numpy(float), draws, level)
        rows.append({"behaviour": name, "layer": int(ly), "slope": slope, "lo": lo, "hi": hi,
                     "n": table.shape[1], "p_at_min": float(table.iloc[0].mean()),
                     "p_at_max": float(table.iloc[-1].mean())})
    return pd.DataFrame(rows)


def monotonicity(frame: pd.DataFrame) -> pd.DataFrame:
    """Per behaviour (and layer, when the frame holds several): Spearman ρ of p_match vs multiplier,
    whether the curve never falls (``monotone``), and p_match at the lowest and highest multiplier."""
    rows = []
    by_layer = "layer" in frame and frame.layer.nunique() > 1
    for key, grp in frame.groupby(["behaviour", "layer"] if by_layer else "behaviour", sort=True):
        name, where = (key[0], {"layer": int(key[1])}) if by_layer else (key, {})
        grp = grp.sort_values("multiplier")
        p = grp.p_match.to_numpy(float)
        ranks_m = grp.multiplier.rank().to_numpy(float)
        ranks_p = grp.p_match.rank().to_numpy(float)
        rho = pearson(ranks_m, ranks_p) if len(p) > 1 and p.std() > 0 else float("nan")  # of the ranks
        rows.append({"behaviour": name, **where, "spearman": rho, "monotone": bool(np.all(np.diff(p) >= 0)),
                     "p_at_min": float(p[0]), "p_at_max": float(p[-1]), "rises": bool(p[-1] > p[0])})
    return pd.DataFrame(rows)
