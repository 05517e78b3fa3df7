"""The :class:`Direction` value: an immutable layer → vector map with provenance, its arithmetic and I/O."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles._version import __version__
from lens_roles.errors import DirectionError
from lens_roles.io import parse_json, read_tensors, read_text, save_tensors, to_plain

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


#: no model has this many blocks; a larger stored layer index is a damaged file
MAX_LAYERS = 4096


def layer_indices(layers) -> tuple[int, ...]:
    """``layers`` as a tuple of block indices: integers (not booleans, not fractions) in
    ``0 .. MAX_LAYERS - 1``, at least one.

    Raises:
        DirectionError: naming the offending entry.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise DirectionError(f"layers must be a list of block indices, got {layers!r}")
    out = []
    for layer in layers:
        if isinstance(layer, (bool, torch.Tensor)) or not isinstance(layer, numbers.Integral):
            raise DirectionError(f"layer {layer!r} is not an integer block index")
        if not 0 <= int(layer) < MAX_LAYERS:
            raise DirectionError(f"layer {layer} is not a block index (0..{MAX_LAYERS - 1})")
        out.append(int(layer))
    if not out:
        raise DirectionError("a direction needs at least one layer")
    return tuple(out)


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
        vectors = torch.as_tensor(vectors).detach()
        if not (vectors.is_floating_point() or vectors.dtype in (torch.int32, torch.int64)):
            raise DirectionError(f"vectors must hold floats, got {vectors.dtype}")
        vectors = vectors.to("cpu", torch.float32).clone()
        layers = layer_indices(layers)
        if vectors.ndim != 2 or vectors.shape[0] != len(layers) or vectors.shape[1] == 0:
            raise DirectionError(
                f"vectors must be [layer, d_model] with {len(layers)} rows and d_model >= 1, "
                f"got {tuple(vectors.shape)}"
            )
        if len(set(layers)) != len(layers):
            raise DirectionError(f"duplicate layers in {layers}")
        if not torch.isfinite(vectors).all():
            raise DirectionError("direction holds NaN or infinite values")
        info = to_plain(_freeze(dict(meta or {})))
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
        return save_tensors(path, {"vectors": self._vectors}, {"layers": list(self.layers), **to_plain(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        """Read a direction written by :meth:`save`.

        The stored metadata is checked like any input (a list of block indices as
        long as the ``[layer, d_model]`` float tensor, finite values); the JSON
        sidecar is optional, but when present it must agree with the file.

        Raises:
            DirectionError: naming the file and what is wrong with it.
        """
        path = Path(path)
        tensors, info = read_tensors(path, "direction file", DirectionError, required=("vectors",))
        vectors = tensors["vectors"]
        layers = info.pop("layers", None)
        if not isinstance(layers, list):
            raise DirectionError(f"{path}: its metadata has no layer list (got {layers!r}); it was not written by "
                                 "Direction.save")
        if vectors.ndim != 2 or vectors.shape[0] != len(layers):
            raise DirectionError(f"{path}: {len(layers)} layers listed but the stored vectors have shape "
                                 f"{tuple(vectors.shape)} (expected [{len(layers)}, d_model])")
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            side = parse_json(read_text(sidecar, "direction sidecar"), str(sidecar))
            if not isinstance(side, dict) or side.get("layers") != layers or any(
                    side.get(k) != info.get(k) for k in ("model", "hook", "d_model", "method", "dataset")):
                raise DirectionError(f"{sidecar} does not describe {path.name} (its layers, model, hook, width, "
                                     "method or dataset differ): one of the two was replaced; save the direction "
                                     "again or delete the stale sidecar")
        try:
            return cls(layers, vectors, info)
        except DirectionError as exc:
            raise DirectionError(f"{path}: {exc}") from None

    def to_frame(self):
        """Tidy per-layer summary: ``layer, metric, value`` with the norm of each vector."""
        import pandas as pd

        return pd.DataFrame(
            [{"layer": layer, "metric": "norm", "value": n} for layer, n in self.norms().items()]
        )
