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

import json
import math
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from . import __version__
from .activations import Activations, collect, collect_sets
from .errors import DirectionError
from .io import save_tensors
from .models import validate_layers
from .prompts import PairSet, PromptSet

#: provenance keys that must agree for two directions to be combined
_COMPATIBLE_KEYS = ("model", "hook", "d_model")


def _freeze(value):
    """A deep, read-only copy of JSON-like data (dicts become read-only mappings)."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _thaw(value):
    """Plain JSON-serialisable data from :func:`_freeze`'s output."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class Direction:
    """An immutable layer → vector map with provenance.

    Args:
        layers: block indices, in the order of the rows of ``vectors``.
        vectors: ``[layer, d_model]``; copied to float32 on the CPU.
        meta: provenance: model, hook, positions, template, prepend_bos, method,
            dataset, and builder extras. ``d_model``, ``raw_norms`` and the
            lens_roles version are added here.

    ``direction.vectors`` and ``direction[layer]`` return copies and ``meta`` is a
    deep read-only mapping, so a direction never changes after it is made.
    """

    __slots__ = ("_layers", "_vectors", "_meta")

    def __init__(self, layers, vectors, meta: Mapping | None = None):
        vectors = torch.as_tensor(vectors).detach().to("cpu", torch.float32).clone()
        layers = tuple(int(layer) for layer in layers)
        if vectors.ndim != 2 or vectors.shape[0] != len(layers):
            raise DirectionError(
                f"vectors must be [layer, d_model] with {len(layers)} rows, got {tuple(vectors.shape)}"
            )
        if len(set(layers)) != len(layers):
            raise DirectionError(f"duplicate layers in {layers}")
        if not torch.isfinite(vectors).all():
            raise DirectionError("direction holds NaN or infinite values")
        info = _thaw(_freeze(dict(meta or {})))
        info["d_model"] = vectors.shape[1]
        info["raw_norms"] = {str(layer): float(n) for layer, n in zip(layers, vectors.norm(dim=1))}
        info.setdefault("hook", "resid_post")
        info.setdefault("lens_roles", __version__)
        self._layers = layers
        self._vectors = vectors
        self._meta = _freeze(info)

    def __setattr__(self, name, value):
        if hasattr(self, "_meta"):
            raise AttributeError("Direction is immutable; arithmetic and select() return new directions")
        object.__setattr__(self, name, value)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    @property
    def vectors(self) -> Float[Tensor, "layer d_model"]:
        """``[layer, d_model]`` float32 (a copy)."""
        return self._vectors.clone()

    @property
    def meta(self) -> Mapping:
        return self._meta

    # -------------------------------------------------------------- access
    @property
    def d_model(self) -> int:
        return self._vectors.shape[1]

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "?"))

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __getitem__(self, layer: int) -> Float[Tensor, " d_model"]:
        """The vector at ``layer`` (a copy)."""
        if layer not in self.layers:
            raise DirectionError(
                f"direction {self.meta.get('name', '')!r} has no vector for layer {layer} "
                f"(it has layers {list(self.layers)})"
            )
        return self._vectors[self.layers.index(layer)].clone()

    def unit(self, layer: int) -> Float[Tensor, " d_model"]:
        """The unit vector at ``layer``."""
        v = self[layer]
        norm = v.norm()
        if norm == 0:
            raise DirectionError(f"the vector at layer {layer} is zero and has no direction")
        return v / norm

    def norms(self) -> dict[int, float]:
        return {layer: float(n) for layer, n in zip(self.layers, self._vectors.norm(dim=1))}

    def select(self, layers) -> "Direction":
        """The direction restricted to ``layers``."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        return Direction(tuple(layers), torch.stack([self[layer] for layer in layers]), self.meta)

    def normalized(self) -> "Direction":
        """Unit vectors at every layer (the raw norms stay in ``meta['raw_norms_before']``)."""
        norms = self._vectors.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            raise DirectionError("cannot normalise a direction with a zero vector")
        meta = dict(self.meta, raw_norms_before=self.meta["raw_norms"])
        return Direction(self.layers, self._vectors / norms, meta)

    def cosine(self, other: "Direction") -> dict[int, float]:
        """Cosine similarity with ``other`` at each shared layer."""
        self._check_compatible(other)
        shared = [layer for layer in self.layers if layer in other.layers]
        return {
            layer: float(torch.nn.functional.cosine_similarity(self[layer], other[layer], dim=0))
            for layer in shared
        }

    # ---------------------------------------------------------- arithmetic
    def _check_compatible(self, other: "Direction") -> None:
        if not isinstance(other, Direction):
            raise DirectionError(f"cannot combine a Direction with {type(other).__name__}")
        for key in _COMPATIBLE_KEYS:
            if self.meta.get(key) != other.meta.get(key):
                raise DirectionError(
                    f"directions differ in {key}: {self.meta.get(key)!r} vs {other.meta.get(key)!r}"
                )

    def _combine(self, other: "Direction", op, symbol: str) -> "Direction":
        self._check_compatible(other)
        if self.layers != other.layers:
            raise DirectionError(f"directions cover different layers: {self.layers} vs {other.layers}")
        meta = {k: v for k, v in self.meta.items() if other.meta.get(k) == v}
        meta["method"] = f"({self.method}) {symbol} ({other.method})"
        return Direction(self.layers, op(self._vectors, other._vectors), meta)

    def __add__(self, other):
        return self._combine(other, torch.add, "+")

    def __sub__(self, other):
        return self._combine(other, torch.sub, "-")

    def __mul__(self, scalar: float):
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        if not math.isfinite(scalar):
            raise DirectionError(f"cannot scale a direction by {scalar}")
        meta = dict(self.meta, method=f"{scalar} * ({self.method})")
        return Direction(self.layers, self._vectors * float(scalar), meta)

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0

    def __truediv__(self, scalar: float):
        if scalar == 0:
            raise DirectionError("cannot divide a direction by zero")
        return self * (1.0 / scalar)

    def __repr__(self) -> str:
        span = f"{self.layers[0]}..{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])
        return (
            f"Direction({self.meta.get('name', '')!r}, method={self.method!r}, model={self.meta.get('model')!r}, "
            f"layers={span} ({len(self.layers)}), d_model={self.d_model})"
        )

    # ---------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors, key ``vectors``) and a JSON sidecar beside it.

        Both are written to temporary files first and renamed into place.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise DirectionError(f"direction files end in .safetensors, got {path}")
        return save_tensors(path, {"vectors": self._vectors}, {"layers": list(self.layers), **_thaw(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        """Read a direction written by :meth:`save` (the sidecar is optional)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DirectionError(f"{path}: no such direction file")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("meta", "{}"))
                vectors = f.get_tensor("vectors")
        except Exception as exc:
            raise DirectionError(f"{path} is not a readable direction file ({exc})") from None
        layers = info.pop("layers", None)
        if layers is None or len(layers) != vectors.shape[0]:
            raise DirectionError(f"{path}: layer list does not match the {vectors.shape[0]} stored vectors")
        return cls(tuple(layers), vectors, info)

    def to_frame(self):
        """Tidy per-layer summary: ``layer, metric, value`` with the norm of each vector."""
        import pandas as pd

        return pd.DataFrame(
            [{"layer": layer, "metric": "norm", "value": n} for layer, n in self.norms().items()]
        )


# --------------------------------------------------------------------- builders


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
    allowed = {"batch_size", "template", "prepend_bos", "cache_dir", "progress", "share_prefixes"}
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
    """One role vector per prompt set, sharing one pass over the baseline."""
    _collect_kw(collect_kw)
    layers = validate_layers(model, layers)
    base = collect(model, baseline, layers=layers, positions=positions, **collect_kw)
    out = {}
    for role in roles:
        acts = collect(model, role, layers=layers, positions=positions, **collect_kw)
        out[role.name] = diff_in_means(acts, base, method="role_vector", name=role.name, baseline=baseline.name)
    return out


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
