"""The PSR module: token-specific steering ``x + λ_t·α·v_l`` with ``λ_t = ReLU(w_l·â_t + b_l)``."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from lens_roles._version import __version__
from lens_roles.directions.direction import Direction, layer_indices
from lens_roles.errors import DirectionError, LensRolesError, PSRError
from lens_roles.io import read_tensors, save_tensors, to_plain
from lens_roles.runtime.models import resid_hook, validate_layers

#: a token whose residual has at least this cosine with the sequence-start token's is the attention sink
SINK_COS = 0.9999


class PSR(nn.Module):
    """Token-specific steering ``x ← x + λ_t·α·v_l``, ``λ_t = ReLU(w_l·â_t + b_l)``.

    Args:
        direction: the steering direction; its raw vectors ``v_l`` are used (like
            :func:`lens_roles.interventions.steer` with absolute α).
        layers: the steered layers (one for S-PSR, all for A-PSR).
        alpha: the overall strength α (a buffer, not trained).
        bias: initial ``b`` (default 1: the PSR starts as constant steering).
        constant: force ``λ ≡ 1`` (constant steering through the PSR code path).
        sink: ``[layer, d_model]``, the residual of the sequence-start token (the
            attention sink) at each steered layer (:func:`sink_residuals`). Given,
            ``λ_t := 0`` on tokens whose residual has cosine ≥ :data:`SINK_COS` with
            it — the first token of every sequence, wherever padding or a KV cache
            puts it — because a system prompt cannot change that token (causal
            attention). None (the default): every token is steered, and ``w = 0,
            b = 1`` or ``constant=True`` is :func:`lens_roles.interventions.steer` bit
            for bit; with a sink, the same holds for ``steer`` on every token but the
            first. :func:`make_psr` passes one.

    Attributes:
        w: ``[layer, d_model]`` (starts at 0), b: ``[layer]`` — the only parameters.
    """

    def __init__(self, direction: Direction, layers: Sequence[int], alpha: float, *, bias: float = 1.0,
                 constant: bool = False, sink: Tensor | None = None, meta: dict | None = None):
        super().__init__()
        layers = tuple(int(layer) for layer in layers)
        if not layers or len(set(layers)) != len(layers):
            raise PSRError(f"PSR needs distinct steered layers, got {layers}")
        missing = [layer for layer in layers if layer not in direction]
        if missing:
            raise DirectionError(f"direction has no vector for layer(s) {missing} (it has {list(direction.layers)})")
        if not math.isfinite(float(alpha)):
            raise PSRError(f"alpha must be finite, got {alpha}")
        self.layers = layers
        self.direction = direction.select(list(layers))
        self.constant = bool(constant)
        self.meta = dict(meta or {})
        self.w = nn.Parameter(torch.zeros(len(layers), direction.d_model))
        self.b = nn.Parameter(torch.full((len(layers),), float(bias)))
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self.register_buffer("vectors", torch.stack([direction[layer] for layer in layers]))
        if sink is not None and tuple(sink.shape) != tuple(self.vectors.shape):
            raise PSRError(f"sink residuals have shape {tuple(sink.shape)}, expected {tuple(self.vectors.shape)} "
                           "(steered layer x d_model)")
        self.has_sink = sink is not None
        self.register_buffer("sink", torch.zeros_like(self.vectors) if sink is None else sink.detach().float().clone())

    def constant_twin(self, alpha: float) -> "PSR":
        """Constant steering (``λ ≡ 1``) with strength ``alpha`` at the same layers and on the same tokens (the
        sink rule included): the fair constant baseline for this PSR."""
        return PSR(self.direction, self.layers, alpha, constant=True, sink=self.sink if self.has_sink else None)

    @property
    def model_name(self) -> str | None:
        return self.direction.meta.get("model")

    def extra_repr(self) -> str:
        return (f"layers={list(self.layers)}, alpha={float(self.alpha):.4g}, constant={self.constant}, "
                f"sink={self.has_sink}, model={self.model_name!r}")

    def keep(self, acts: Float[Tensor, "batch pos d_model"], k: int) -> Float[Tensor, "batch pos"] | None:
        """0 on the attention-sink token(s), 1 elsewhere, at the ``k``-th steered layer (None without a sink)."""
        if not self.has_sink:
            return None
        sink = self.sink[k].to(acts.device, acts.dtype)
        cos = (acts @ sink) / (acts.norm(dim=-1) * sink.norm()).clamp_min(1e-12)
        return (cos < SINK_COS).to(acts.dtype)

    def coefficient(self, acts: Float[Tensor, "batch pos d_model"], k: int) -> Float[Tensor, "batch pos"]:
        """``λ_t`` at the ``k``-th steered layer from the activations arriving there."""
        if self.constant:
            return torch.ones(acts.shape[:-1], dtype=acts.dtype, device=acts.device)
        unit = acts / acts.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return torch.relu(unit @ self.w[k].to(acts.dtype) + self.b[k].to(acts.dtype))

    def add(self, acts: Float[Tensor, "batch pos d_model"], k: int, alpha: Tensor | None = None,
            record: list | None = None) -> Float[Tensor, "batch pos d_model"]:
        """``acts + λ·(α·v)`` at the ``k``-th steered layer (α·v first, as ``steer`` computes it)."""
        alpha = self.alpha if alpha is None else alpha
        delta = alpha.to(acts.device, acts.dtype) * self.vectors[k].to(acts.device, acts.dtype)
        lam = self.coefficient(acts, k)
        keep = self.keep(acts, k)
        if keep is not None:
            lam = lam * keep
        if record is not None:
            record.append((self.layers[k], lam.detach()))
        if self.constant and keep is None:
            return acts + delta
        return acts + lam[..., None] * delta

    def check_model(self, model) -> None:
        if self.model_name is not None and self.model_name != model.cfg.model_name:
            raise PSRError(f"this PSR was trained on {self.model_name!r}, but the model is {model.cfg.model_name!r}")
        if self.vectors.shape[1] != model.cfg.d_model:
            raise PSRError(f"this PSR has width {self.vectors.shape[1]}, but {model.cfg.model_name} has d_model "
                           f"{model.cfg.d_model}")
        validate_layers(model, list(self.layers))

    def hooks(self, model, *, alpha: float | None = None, record: list | None = None, skip: Sequence[int] = ()
              ) -> list:
        """``(hook name, fn)`` pairs applying the PSR (``alpha`` overrides the trained α)."""
        self.check_model(model)
        a = None if alpha is None else torch.tensor(float(alpha), dtype=torch.float32)
        if a is not None and not torch.isfinite(a):
            raise PSRError(f"alpha must be finite, got {alpha}")

        def make(k: int):
            def hook(acts, hook):
                return self.add(acts, k, a, record)

            return hook

        return [(resid_hook(layer), make(k)) for k, layer in enumerate(self.layers) if layer not in skip]

    @contextmanager
    def applied(self, model, *, alpha: float | None = None, record: list | None = None):
        """Steer ``model`` with this PSR for the block (hooks via ``model.hooks``; none outlive it).

        ``record``, if given, receives ``(layer, λ [batch, pos])`` for every forward.
        """
        with model.hooks(fwd_hooks=self.hooks(model, alpha=alpha, record=record)):
            yield model

    # -------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: w, b, vectors) and a JSON sidecar, both atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise PSRError(f"PSR files end in .safetensors, got {path}")
        info = {"kind": "psr", "layers": list(self.layers), "alpha": float(self.alpha), "constant": self.constant,
                "model": self.model_name, "direction": to_plain(self.direction.meta), "lens_roles": __version__,
                **self.meta, "sink": self.has_sink}
        tensors = {"w": self.w, "b": self.b, "vectors": self.vectors}
        if self.has_sink:
            tensors["sink"] = self.sink
        return save_tensors(path, tensors, info)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "PSR":
        """Read a PSR written by :meth:`save`; with ``model``, refuse one trained on another model.

        Everything stored is checked as input: the metadata (kind, layer list, a
        finite α, the direction's provenance) and the tensors' shapes (``w`` and
        ``vectors`` ``[layer, d_model]``, ``b`` ``[layer]``, the optional ``sink``
        like ``vectors``), each float and finite.

        Raises:
            PSRError: naming the file and what is wrong with it.
        """
        path = Path(path)
        tensors, info = read_tensors(path, "PSR file", PSRError, required=("w", "b", "vectors"))

        def bad(what: str) -> PSRError:
            return PSRError(f"{path}: {what}; it is not a PSR file written by PSR.save, or it was damaged")

        if info.get("kind") != "psr":
            raise bad(f"its metadata says kind {info.get('kind')!r}, not 'psr'")
        try:
            layers = layer_indices(info.pop("layers", None))
        except DirectionError as exc:
            raise bad(f"bad layer list ({exc})") from None
        n, width = len(layers), tensors["vectors"].shape[-1] if tensors["vectors"].ndim == 2 else -1
        shapes = {"w": (n, width), "b": (n,), "vectors": (n, width), "sink": (n, width)}
        for key, tensor in tensors.items():
            if key not in shapes:
                continue
            if tuple(tensor.shape) != shapes[key] or width < 1:
                raise bad(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shapes[key]} for {n} layer(s)")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise bad(f"tensor {key!r} is not finite floats")
        alpha = info.pop("alpha", None)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise bad(f"alpha {alpha!r} is not a finite number")
        constant = info.pop("constant", False)
        direction_meta = info.pop("direction", {})
        if not isinstance(constant, bool) or not isinstance(direction_meta, dict):
            raise bad("'constant' must be true/false and 'direction' an object")
        for key in ("kind", "model", "lens_roles", "sink"):
            info.pop(key, None)
        try:
            direction = Direction(layers, tensors["vectors"], direction_meta)
            psr = cls(direction, layers, alpha, constant=constant, sink=tensors.get("sink"), meta=info)
        except LensRolesError as exc:
            raise bad(str(exc)) from None
        with torch.no_grad():
            psr.w.copy_(tensors["w"])
            psr.b.copy_(tensors["b"])
        if model is not None:
            psr.check_model(model)
        return psr


@contextmanager
def apply_psr(model, psr: PSR, *, alpha: float | None = None):
    """``with apply_psr(model, psr): ...`` — the same as ``psr.applied(model)``."""
    with psr.applied(model, alpha=alpha):
        yield model
