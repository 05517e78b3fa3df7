"""The :class:`Direction` value and the builders that make one from activations.

A direction maps each layer to a vector in the model's native residual basis
(``blocks.{l}.hook_resid_post``) and carries its provenance: model, hook point,
position rule, chat template, BOS choice, method, dataset hash, and the raw norm
of each vector. It is immutable; arithmetic returns new values.

Builders (all return un-normalised vectors in activation units, so the norm says
how far apart the two sets are):

* :func:`diff_in_means` — mean(positive set) − mean(negative set);
* :func:`role_vector` — a role's instructions against the baseline, read at the
  end-of-instruction positions (Potertì et al.);
* :func:`persona_vector` — contrastive pairs, mean(positive replies) − mean(negative
  replies) (CAA / persona vectors), or ``method="pca"`` / ``"probe"``;
* :func:`pca_direction` — top right-singular vector of the (uncentred) matrix of
  pair differences, signed so positives project higher, scaled to the mean
  difference's projection on it;
* :func:`probe_direction` — normal of an L2-regularised logistic regression
  separating positives from negatives, signed and scaled the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError
from lens_roles.inputs.prompts import PairSet, PromptSet
from lens_roles.runtime.activations import Activations, collect_sets
from lens_roles.runtime.models import validate_layers


def diff_in_means(positive: Activations, negative: Activations, **meta) -> Direction:
    """mean(positive) − mean(negative), per layer, as a :class:`Direction`."""
    if positive.layers != negative.layers:
        raise DirectionError(f"activation sets cover different layers: {positive.layers} vs {negative.layers}")
    for key in ("model", "hook", "positions", "template"):
        if positive.meta.get(key) != negative.meta.get(key):
            raise DirectionError(
                f"activation sets differ in {key}: {positive.meta.get(key)!r} vs {negative.meta.get(key)!r}"
            )
    info = {
        "model": positive.meta.get("model"),
        "hook": positive.meta.get("hook", "resid_post"),
        "positions": positive.meta.get("positions"),
        "template": positive.meta.get("template"),
        "prepend_bos": positive.meta.get("prepend_bos"),
        "method": "diff_in_means",
        "dataset": {"positive": positive.meta.get("dataset"), "negative": negative.meta.get("dataset")},
        "n_positive": positive.count,
        "n_negative": negative.count,
    }
    info.update(meta)
    return Direction(positive.layers, (positive.mean - negative.mean).float(), info)


def _collect_kw(kw: dict) -> dict:
    allowed = {"batch_size", "template", "prepend_bos", "cache_dir", "progress", "share_prefixes", "executor"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(f"unexpected keyword(s): {', '.join(sorted(unknown))}")
    return kw


def role_vector(
    model, role: PromptSet, baseline: PromptSet, *, layers=None, positions="eoi", **collect_kw
) -> Direction:
    """Role vector: mean activation over the role's instructions minus over the baseline's."""
    return role_vectors(model, [role], baseline, layers=layers, positions=positions, **collect_kw)[role.name]


def role_vectors(
    model, roles: Sequence[PromptSet], baseline: PromptSet, *, layers=None, positions="eoi", **collect_kw
) -> dict[str, Direction]:
    """One role vector per prompt set, from one run over the baseline and every role together.

    The baseline is read once for all roles, and all sets share batches and the chat
    template's common prefix (:func:`~lens_roles.runtime.activations.collect_sets`).
    """
    _collect_kw(collect_kw)
    layers = validate_layers(model, layers)
    base, *acts = collect_sets(model, [baseline, *roles], layers=layers, positions=positions, **collect_kw)
    return {role.name: diff_in_means(role_acts, base, method="role_vector", name=role.name, baseline=baseline.name)
            for role, role_acts in zip(roles, acts)}


def persona_vector(
    model, pairs: PairSet, *, layers=None, positions="reply", method: str = "mean_diff", **collect_kw
) -> Direction:
    """Persona vector from contrast pairs.

    Args:
        method: ``"mean_diff"`` (mean positive − mean negative), ``"pca"`` or ``"probe"``.
        positions: which tokens are read (default: the reply's tokens).
    """
    if method not in ("mean_diff", "pca", "probe"):
        raise DirectionError(f"unknown method {method!r}; use mean_diff, pca or probe")
    _collect_kw(collect_kw)
    keep = method != "mean_diff"
    # one run over both sides, so each pair's shared user turn is computed once
    pos, neg = collect_sets(model, [pairs.positives(), pairs.negatives()], layers=layers, positions=positions,
                            keep_per_prompt=keep, **collect_kw)
    meta = {"name": pairs.name, "dataset": pairs.fingerprint(), "source": pairs.source}
    if method == "mean_diff":
        return diff_in_means(pos, neg, method="mean_diff", **meta)
    build = pca_direction if method == "pca" else probe_direction
    return build(pos, neg, paired=True, **meta)


def _signed_scaled(units: Tensor, pos: Activations, neg: Activations) -> Tensor:
    """Flip each unit vector so positives project higher; scale by the mean-difference projection."""
    diff = (pos.mean - neg.mean).float()
    proj = (units * diff).sum(-1, keepdim=True)
    sign = torch.where(proj < 0, -1.0, 1.0)
    return units * sign * proj.abs()


def _require_per_prompt(*acts: Activations) -> None:
    for a in acts:
        if a.per_prompt is None:
            raise DirectionError("this method needs per-prompt activations: collect with keep_per_prompt=True")


def pca_direction(positive: Activations, negative: Activations, *, paired: bool = True, **meta) -> Direction:
    """Top principal direction of the per-pair differences (uncentred), per layer.

    With ``paired=False`` the differences are taken against the negative mean.
    """
    _require_per_prompt(positive, negative)
    if paired and positive.count != negative.count:
        raise DirectionError(f"paired PCA needs equal counts, got {positive.count} and {negative.count}")
    base = negative.per_prompt if paired else negative.per_prompt.mean(0, keepdim=True)
    diffs = (positive.per_prompt - base).double()  # [batch, layer, d_model]
    units = []
    for j in range(diffs.shape[1]):
        _, _, vh = torch.linalg.svd(diffs[:, j], full_matrices=False)
        units.append(vh[0])
    vectors = _signed_scaled(torch.stack(units).float(), positive, negative)
    info = dict(diff_in_means(positive, negative).meta, method="pca")
    info.update(meta)
    return Direction(positive.layers, vectors, info)


def _probe_unit(x: Tensor, y: Tensor, l2: float, steps: int) -> Tensor:
    """Unit normal of an L2-regularised logistic regression of ``y`` on ``x`` ``[batch, d_model]``."""
    x = (x - x.mean(0)) / x.std().clamp_min(1e-12)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / w.detach().norm().clamp_min(1e-12)).float()


def probe_direction(
    positive: Activations, negative: Activations, *, l2: float = 1e-2, steps: int = 200, paired: bool = True, **meta
) -> Direction:
    """Normal of a logistic-regression probe (positive = 1) per layer.

    Features are centred and divided by one global scale per layer, so the
    weight vector stays in the native residual basis up to a positive factor.
    ``l2`` is the penalty on the weights (mean loss + l2·|w|²/2).
    """
    _require_per_prompt(positive, negative)
    del paired  # the probe does not use the pairing
    x_all = torch.cat([positive.per_prompt, negative.per_prompt]).double()
    y = torch.cat([torch.ones(positive.count), torch.zeros(negative.count)]).double()
    units = [_probe_unit(x_all[:, j], y, l2, steps) for j in range(x_all.shape[1])]
    vectors = _signed_scaled(torch.stack(units), positive, negative)
    info = dict(diff_in_means(positive, negative).meta, method="probe", l2=l2)
    info.update(meta)
    return Direction(positive.layers, vectors, info)
