"""The :class:`Direction` value: an immutable layer → vector map with provenance, its arithmetic and I/O."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles._version import __version__
from lens_roles.errors import DirectionError
from lens_roles.io import save_tensors, to_plain

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
