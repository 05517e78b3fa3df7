"""Which SAE features a role or persona direction is made of.

Three views of one direction ``v`` at the SAE's layer, each a tidy DataFrame:

* **Alignment** (:func:`feature_alignment`): ``cos(v, d_i)`` for every unit decoder
  row ``d_i`` — the features that write along the direction.
* **Decomposition** (:func:`decompose`): a sparse non-negative combination
  ``v ≈ Σ c_i d_i`` (``c_i ≥ 0``, at most ``max_features`` rows), chosen greedily
  (the row best aligned with the residual, then all coefficients refitted by
  non-negative least squares), with the residual ``‖v − Σ c_i d_i‖ / ‖v‖`` — "which
  features is this role made of, and how much of it is left unexplained".
* **Attribution** (:func:`attribute_features`): gradient × activation of a metric
  (the projection of a later residual stream on the direction, at the last
  prompt token) with respect to each feature's activation, with the SAE spliced
  in and its error term held fixed, summed over positions and averaged over
  prompts. ``−attribution`` is the first-order prediction of what ablating the
  feature does; :func:`ablation_check` measures it by ablating features one at a
  time through the same splice and reports both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.analysis.sae.core import (
    SpliceRecord,
    check_sae,
    decoder_directions,
    sae_layer,
    spliced,
)
from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError, SAEError
from lens_roles.inputs.positions import encode
from lens_roles.measures.behaviour import direction_projection, projection_label
from lens_roles.measures.statistics import pearson
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.capture import capture
from lens_roles.runtime.models import resid_hook


def _direction_at(direction: Direction | Tensor, sae, layer: int | None = None) -> Float[Tensor, " d_model"]:
    """The direction's vector at the SAE's layer (a bare tensor is taken as is)."""
    at = sae_layer(sae)
    if isinstance(direction, Direction):
        if layer is not None and layer != at:
            raise SAEError(f"the SAE reads layer {at}, but layer {layer} was asked for")
        if at not in direction:
            raise SAEError(f"the direction has no vector at the SAE's layer {at} "
                           f"({resid_hook(at)}); it has layers {list(direction.layers)}")
        vec = direction[at]
    else:
        vec = torch.as_tensor(direction)
    vec = vec.detach().float().cpu()
    if vec.shape != (sae.cfg.d_in,):
        raise SAEError(f"the direction has shape {tuple(vec.shape)}, but the SAE reads {sae.cfg.d_in}-wide "
                       f"activations at {resid_hook(at)}")
    if not torch.isfinite(vec).all() or float(vec.norm()) == 0:
        raise DirectionError("the direction is zero or not finite at the SAE's layer")
    return vec


# --------------------------------------------------------------------------- alignment


#: A feature firing on more than this fraction of tokens is marked dense (as in the quality table).
DENSE_FREQUENCY = 0.1


def feature_status(frequencies: Tensor | None, d_sae: int, *, dense: float = DENSE_FREQUENCY) -> np.ndarray:
    """Per feature ``"dead"`` (never fired), ``"dense"`` (fired on more than ``dense`` of the tokens) or
    ``"live"``, from firing ``frequencies`` ``[d_sae]`` (fractions of tokens); all ``"unknown"`` without them.

    Raises:
        SAEError: frequencies of another length than ``d_sae``, or outside [0, 1].
    """
    if frequencies is None:
        return np.full(d_sae, "unknown", dtype=object)
    f = torch.as_tensor(frequencies).detach().float().cpu()
    if f.shape != (d_sae,) or not bool(((f >= 0) & (f <= 1)).all()):
        raise SAEError(f"feature frequencies must be {d_sae} fractions in [0, 1], got shape {tuple(f.shape)}")
    out = np.full(d_sae, "live", dtype=object)
    out[(f == 0).numpy()] = "dead"
    out[(f > dense).numpy()] = "dense"
    return out


def feature_alignment(sae, direction: Direction | Tensor, *, top: int | None = None,
                      frequencies: Tensor | None = None, exclude: bool = False,
                      dense: float = DENSE_FREQUENCY) -> pd.DataFrame:
    """Cosine of the direction with every decoder row, sorted from most to least aligned.

    Returns columns ``feature, cosine, rank, status`` (``top`` rows, or all ``d_sae``);
    ``status`` is :func:`feature_status` of ``frequencies`` (``[d_sae]`` firing
    fractions, e.g. from :func:`~lens_roles.analysis.sae.quality.feature_frequencies`
    or the ``feature_frequency.safetensors`` shipped beside an SAE), plus a
    ``frequency`` column when they are given. ``exclude`` drops dead and dense
    features before ranking (it needs ``frequencies``): a dead row never writes, and
    a dense one fires on most text, so neither says what the direction is made of.

    Raises:
        SAEError: ``exclude`` without ``frequencies``.
    """
    if exclude and frequencies is None:
        raise SAEError("feature_alignment(exclude=True) needs the features' firing frequencies")
    v = _direction_at(direction, sae)
    cos = decoder_directions(sae) @ (v / v.norm())
    status = feature_status(frequencies, sae.cfg.d_sae, dense=dense)
    order = torch.argsort(cos, descending=True)
    if exclude:
        order = order[torch.from_numpy(status[order.numpy()] == "live")]
    if top is not None:
        order = order[:top]
    frame = pd.DataFrame({"feature": order.numpy(), "cosine": cos[order].numpy(),
                          "rank": np.arange(1, len(order) + 1), "status": status[order.numpy()]})
    if frequencies is not None:
        frame["frequency"] = torch.as_tensor(frequencies).float()[order].numpy()
    return frame


def span_fraction(sae, direction: Direction | Tensor, features=None) -> float:
    """``‖P v‖ / ‖v‖``: how much of the direction lies in the span of the decoder rows of ``features``
    (default: all rows), ``P`` the orthogonal projection onto that span (by least squares).

    1 means the SAE's decoder can write the direction exactly; a large decomposition residual is then a
    direction that is not sparse in the features, not a subspace the SAE misses. For an overcomplete SAE
    whose live rows span ``d_model`` it is 1 up to rounding; it drops below 1 for a narrow SAE or
    one restricted to few (e.g. live, non-dense) features.
    """
    v = _direction_at(direction, sae).double()
    rows = decoder_directions(sae).double()
    if features is not None:
        rows = rows[torch.as_tensor(np.asarray(features), dtype=torch.long)]
    if len(rows) == 0:
        return 0.0
    coef = torch.linalg.lstsq(rows.T, v[:, None]).solution
    return float((rows.T @ coef)[:, 0].norm() / v.norm())


@dataclass(frozen=True)
class Decomposition:
    """``v ≈ Σ coefficients[i] · decoder_row[features[i]]`` with non-negative coefficients.

    ``residual`` is ``‖v − reconstruction‖`` and ``relative_residual`` that over ``‖v‖``;
    ``steps`` records the relative residual after each added feature. ``span_fraction``
    (:func:`span_fraction` over the candidate rows) is how much of ``v`` the candidate
    rows could write at all; ``candidates`` counts them.
    """

    features: tuple[int, ...]
    coefficients: tuple[float, ...]
    reconstruction: Tensor
    residual: float
    relative_residual: float
    norm: float
    steps: tuple[float, ...] = field(default=())
    span_fraction: float = float("nan")
    candidates: int = 0

    def to_frame(self) -> pd.DataFrame:
        order = np.argsort(self.coefficients)[::-1]
        return pd.DataFrame({"feature": [self.features[i] for i in order],
                             "coefficient": [self.coefficients[i] for i in order],
                             "share": [self.coefficients[i] / self.norm for i in order]})


def decompose(sae, direction: Direction | Tensor, *, max_features: int = 16, tol: float = 1e-3,
              frequencies: Tensor | None = None, exclude: bool = False,
              dense: float = DENSE_FREQUENCY) -> Decomposition:
    """Greedy sparse non-negative decomposition of the direction into unit decoder rows.

    With ``exclude`` (needs ``frequencies``, as in :func:`feature_alignment`) dead and
    dense rows are not candidates.

    At each step the row with the largest positive inner product with the current
    residual joins, then every coefficient is refitted by non-negative least squares
    (``scipy.optimize.nnls``); rows whose coefficient drops to 0 leave. Stops after
    ``max_features`` rows, when no row has a positive inner product with the residual,
    or when the relative residual is below ``tol``.
    """
    if max_features < 1:
        raise SAEError(f"decompose: max_features must be >= 1, got {max_features!r}")
    if exclude and frequencies is None:
        raise SAEError("decompose(exclude=True) needs the features' firing frequencies")
    # deferred: scipy.optimize takes seconds to import, and every lens-roles command imports this module
    from scipy.optimize import nnls

    v = _direction_at(direction, sae).double()
    rows = decoder_directions(sae).double()
    allowed = np.ones(len(rows), dtype=bool)
    if exclude:
        allowed = feature_status(frequencies, sae.cfg.d_sae, dense=dense) == "live"
    candidates = np.flatnonzero(allowed)
    chosen: list[int] = []
    coef = np.zeros(0)
    residual = v.clone()
    steps = []
    for _ in range(max_features):
        scores = rows @ residual
        scores[torch.from_numpy(~allowed)] = -np.inf
        if chosen:
            scores[chosen] = -np.inf
        best = int(torch.argmax(scores))
        if float(scores[best]) <= 0:
            break
        chosen.append(best)
        coef, _ = nnls(rows[chosen].T.numpy(), v.numpy())
        keep = coef > 0
        chosen = [f for f, k in zip(chosen, keep) if k]
        coef = coef[keep]
        residual = v - torch.from_numpy(coef) @ rows[chosen]
        steps.append(float(residual.norm() / v.norm()))
        if steps[-1] < tol:
            break
    recon = torch.from_numpy(coef) @ rows[chosen] if chosen else torch.zeros_like(v)
    res = float((v - recon).norm())
    return Decomposition(tuple(chosen), tuple(float(c) for c in coef), recon.float(), res,
                         res / float(v.norm()), float(v.norm()), tuple(steps),
                         span_fraction=span_fraction(sae, v, candidates), candidates=len(candidates))


# --------------------------------------------------------------------------- attribution


@dataclass(frozen=True)
class ProjectionMetric:
    """Projection of the residual stream after block ``layer`` at each prompt's last token on ``v̂_layer``.

    The SAE attribution's target, read at every prompt's own last token in a padded
    batch of prompts of different lengths (the patching metric
    :class:`~lens_roles.analysis.patching.DirectionProjection` reads one position of
    two equal-length runs instead); both compute
    :func:`~lens_roles.measures.behaviour.direction_projection`.
    """

    direction: Direction
    layer: int

    def __post_init__(self):
        self.direction.unit(self.layer)  # a missing layer or a zero vector is a DirectionError

    @property
    def label(self) -> str:
        return projection_label(self.direction, self.layer)

    def __call__(self, resid: Float[Tensor, "batch d_model"]) -> Float[Tensor, " batch"]:
        """The projection of each prompt's residual vector after block ``layer`` (at its last token)."""
        return direction_projection(resid, self.direction, self.layer)


def _metric_run(model, sae, prompts, metric: ProjectionMetric, *, batch_size: int, template=None,
                edit=None, grad: bool = False, progress: bool = False, desc: str = "SAE metric"):
    """Yield, per batch, ``(indices, per-prompt metric [batch], SpliceRecord, attention mask [batch, pos])``
    with the SAE spliced in (error term kept, so without ``edit`` the values are the clean model's)."""
    at = check_sae(sae, model)
    if metric.layer < at:
        raise SAEError(f"the metric reads layer {metric.layer}, before the SAE's layer {at}: "
                       "the features cannot change it")
    items = encode(model, prompts, template=template)
    seqs = [it.tokens for it in items]
    for batch in token_batches(model, seqs, batch_size, progress=progress, desc=desc):
        idx = batch.index
        last = torch.tensor([n - 1 for n in batch.lengths], device=batch.tokens.device)
        record = SpliceRecord([])
        # the capture sits inside the splice: it reads the stream the SAE's features wrote (with the graph if grad)
        with spliced(model, sae, error_term=True, edit=edit, grad=grad, record=record), \
                capture(model, [metric.layer], grad=grad) as cap, torch.set_grad_enabled(grad):
            batch.forward(model, stop_at_layer=cap.stop_at_layer)
        x = cap[metric.layer]
        values = metric(x[torch.arange(len(idx), device=x.device), last])
        yield idx, values, record, batch.mask


def attribute_features(model, sae, prompts, metric: ProjectionMetric, *, batch_size: int = 16,
                       template: str | None = None, progress: bool = False) -> pd.DataFrame:
    """Gradient × activation attribution of ``metric`` to every SAE feature, averaged over prompts.

    For prompt ``p``, ``attribution_i = Σ_t ∂metric/∂a_{t,i} · a_{t,i}`` over the
    positions after BOS, with the SAE's error term held fixed (so the spliced run is
    the clean run). Returns ``feature, attribution, mean_activation`` (per token),
    ``frac_prompts_active`` (prompts where it fires anywhere)
    sorted by ``|attribution|``, and ``.attrs["metric"]``: the mean metric value.
    ``progress`` shows a bar counting prompts.
    """
    n_feat = sae.cfg.d_sae
    total = torch.zeros(n_feat, dtype=torch.float64)
    act_sum = torch.zeros(n_feat, dtype=torch.float64)
    active = torch.zeros(n_feat, dtype=torch.float64)
    metric_sum = n_tokens = 0.0
    n = 0
    for idx, values, record, mask in _metric_run(model, sae, prompts, metric, batch_size=batch_size,
                                                 template=template, grad=True, progress=progress,
                                                 desc="attribution"):
        leaf = record.acts[0]
        (grads,) = torch.autograd.grad(values.sum(), leaf)
        acts = leaf.detach()
        real = mask[:, 1:, None].to(acts.dtype)
        total += (grads * acts * real).sum((0, 1)).double().cpu()
        act_sum += (acts * real).sum((0, 1)).double().cpu()
        n_tokens += float(real.sum())
        active += ((acts * real) > 0).any(1).sum(0).double().cpu()
        metric_sum += float(values.detach().sum())
        n += len(idx)
    frame = pd.DataFrame({"feature": np.arange(n_feat), "attribution": (total / n).numpy(),
                          "mean_activation": (act_sum / max(n_tokens, 1)).numpy(),
                          "frac_prompts_active": (active / n).numpy()})
    frame = frame.iloc[np.argsort(-np.abs(frame["attribution"].to_numpy()), kind="stable")].reset_index(drop=True)
    frame.attrs.update(metric=metric_sum / n, label=metric.label, n_prompts=n, sae_layer=sae_layer(sae))
    return frame


@torch.no_grad()
def metric_values(model, sae, prompts, metric: ProjectionMetric, *, edit=None, batch_size: int = 16,
                  template: str | None = None) -> Tensor:
    """The metric per prompt ``[batch]`` with the SAE spliced in (error term kept), under ``edit``."""
    out = torch.zeros(len(prompts), dtype=torch.float64)
    for idx, values, _, _ in _metric_run(model, sae, prompts, metric, batch_size=batch_size, template=template,
                                         edit=edit):
        out[idx] = values.double().cpu()
    return out


def ablate_features(features) -> callable:
    """An ``edit`` for :func:`~lens_roles.analysis.sae.spliced` that zeroes these features' activations."""
    index = torch.as_tensor(list(features), dtype=torch.long)

    def edit(acts):
        acts = acts.clone()
        acts[..., index.to(acts.device)] = 0
        return acts

    return edit


def ablation_check(model, sae, prompts, metric: ProjectionMetric, attribution: pd.DataFrame, *,
                   top: int = 16, batch_size: int = 16, template: str | None = None) -> pd.DataFrame:
    """Ablate each of the ``top`` features (by ``|attribution|``) alone; compare the measured change of
    the mean metric with the attribution's prediction ``−attribution``.

    Returns ``feature, predicted, actual`` (and ``.attrs``: Pearson ``r`` and the clean mean).
    """
    base = metric_values(model, sae, prompts, metric, batch_size=batch_size, template=template).mean()
    rows = []
    for feature, attr in attribution[["feature", "attribution"]].head(top).itertuples(index=False):
        after = metric_values(model, sae, prompts, metric, edit=ablate_features([int(feature)]),
                              batch_size=batch_size, template=template).mean()
        rows.append({"feature": int(feature), "predicted": -float(attr), "actual": float(after - base)})
    frame = pd.DataFrame(rows)
    r = pearson(frame["predicted"], frame["actual"]) if len(frame) > 2 else float("nan")
    frame.attrs.update(pearson=r, metric=float(base), label=metric.label)
    return frame


__all__ = ["Decomposition", "ProjectionMetric", "ablate_features", "ablation_check", "attribute_features",
           "decompose", "feature_alignment", "metric_values"]
