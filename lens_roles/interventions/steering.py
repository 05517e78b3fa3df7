"""Interventions on the residual stream, as context managers that never leak hooks.

Every intervention attaches its hooks through ``model.hooks(fwd_hooks=...)``
(TransformerLens removes exactly those hooks when the block ends, also when the
body or a hook raises) and acts on ``blocks.{l}.hook_resid_post``, the point the
directions are read from:

* :func:`steer` — activation addition ``x + α·v_l`` (α may differ per batch row,
  which is how an α sweep runs in one batched forward);
* :func:`ablate` — directional ablation ``x − (x·v̂_l) v̂_l``;
* :func:`clamp` — set the projection on ``v̂_l`` to a value;
* :func:`ablate_then_add` — ablation followed by addition at the same point.

α is *absolute* (residual units) by default. With ``relative=norms`` (a map
layer → typical residual norm, from :func:`residual_norms`), α is a multiple of
the typical norm at that layer, and the vector is normalised first:
``x + α·norm_l·v̂_l``. Results record which was used.

Which positions are touched: ``"all"``; ``"prompt"`` or ``"generated"`` (during
:func:`lens_roles.runtime.generation.generate`, columns before / from the end of the
padded prompt; outside generation every position counts as prompt); or a
boolean mask ``[batch, pos]``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.inputs.prompts import as_prompts
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.capture import capture
from lens_roles.runtime.generation import _STATE
from lens_roles.runtime.models import resid_hook, validate_layers

POSITION_MODES = ("all", "prompt", "generated")


def _gate(positions, acts: Tensor) -> Tensor | None:
    """``[batch, pos, 1]`` 0/1 mask of the positions to touch, or None for all."""
    if isinstance(positions, str):
        if positions == "all":
            return None
        state = _STATE.get()
        offset = state.offset if state else 0
        prompt_len = state.prompt_len if state and state.prompt_len is not None else None
        cols = torch.arange(offset, offset + acts.shape[1], device=acts.device)
        if prompt_len is None:  # no generation: everything is prompt
            keep = torch.ones_like(cols, dtype=torch.bool) if positions == "prompt" else torch.zeros_like(
                cols, dtype=torch.bool)
        else:
            keep = cols < prompt_len if positions == "prompt" else cols >= prompt_len
        return keep.to(acts.dtype)[None, :, None]
    mask = positions
    state = _STATE.get()
    offset = state.offset if state else 0
    if mask.ndim != 2 or mask.shape[0] != acts.shape[0] or mask.shape[1] < offset + acts.shape[1]:
        raise DirectionError(
            f"position mask of shape {tuple(mask.shape)} does not cover activations of shape "
            f"{tuple(acts.shape[:2])} at offset {offset}"
        )
    return mask[:, offset : offset + acts.shape[1]].to(acts.device, acts.dtype)[..., None]


def _check_positions(positions) -> None:
    if isinstance(positions, str):
        if positions not in POSITION_MODES:
            raise DirectionError(f"unknown positions {positions!r}; use one of {POSITION_MODES} or a bool mask")
    elif not (isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.ndim == 2):
        raise DirectionError("positions must be 'all', 'prompt', 'generated' or a bool tensor [batch, pos]")


def _check_alpha(alpha) -> Tensor:
    if isinstance(alpha, (str, bytes, bool)):
        raise DirectionError(f"alpha must be a number or a 1-D tensor of numbers, got {alpha!r}")
    try:
        a = torch.as_tensor(alpha, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise DirectionError(f"alpha must be a number or a 1-D tensor of numbers, got {alpha!r}") from None
    if a.ndim > 1:
        raise DirectionError(f"alpha must be a number or a 1-D tensor (one per batch row), got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise DirectionError(f"alpha must be finite, got {alpha}")
    return a


def _layer_vectors(model, direction: Direction, layers, *, unit: bool) -> dict[int, Tensor]:
    if direction.d_model != model.cfg.d_model:
        raise DirectionError(
            f"direction {direction.meta.get('name', '')!r} has width {direction.d_model}, but "
            f"{model.cfg.model_name} has d_model {model.cfg.d_model}"
        )
    layers = validate_layers(model, direction.layers if layers is None else layers)
    missing = [layer for layer in layers if layer not in direction.layers]
    if missing:
        raise DirectionError(f"direction has no vector for layer(s) {missing} (it has {list(direction.layers)})")
    device, dtype = model.cfg.device, model.cfg.dtype
    return {
        layer: (direction.unit(layer) if unit else direction[layer]).to(device, dtype) for layer in layers
    }


def _alpha_rows(alpha: Tensor, acts: Tensor) -> Tensor:
    """α as ``[batch, 1, 1]`` (or a scalar), checked against the batch."""
    if alpha.ndim == 0:
        return alpha.to(acts.device, acts.dtype)
    if alpha.shape[0] != acts.shape[0]:
        raise DirectionError(f"alpha has {alpha.shape[0]} entries but the batch has {acts.shape[0]} rows")
    return alpha.to(acts.device, acts.dtype)[:, None, None]


def steering_hooks(model, direction: Direction, alpha, *, layers=None, positions="all",
                   relative: Mapping[int, float] | None = None) -> list:
    """The ``(hook name, fn)`` pairs of activation addition (see :func:`steer`)."""
    _check_positions(positions)
    alpha = _check_alpha(alpha)
    vectors = _layer_vectors(model, direction, layers, unit=relative is not None)
    if relative is not None:
        missing = [layer for layer in vectors if layer not in relative]
        if missing:
            raise DirectionError(f"relative α needs residual norms for layer(s) {missing}")
        bad = {layer: relative[layer] for layer in vectors
               if isinstance(relative[layer], bool) or not isinstance(relative[layer], (int, float))
               or not math.isfinite(relative[layer]) or relative[layer] <= 0}
        if bad:
            raise DirectionError(f"relative α needs positive, finite residual norms; got {bad} "
                                 "(use residual_norms(model, prompts) to measure them)")
        vectors = {layer: v * float(relative[layer]) for layer, v in vectors.items()}

    def make(vector: Tensor):
        def hook(acts, hook):
            gate = _gate(positions, acts)
            delta = _alpha_rows(alpha, acts) * vector
            return acts + (delta if gate is None else gate * delta)

        return hook

    return [(resid_hook(layer), make(v)) for layer, v in vectors.items()]


def ablation_hooks(model, direction: Direction, *, layers=None, positions="all", value: float | None = None,
                   unit_layer: int | None = None) -> list:
    """Hooks that project ``v̂`` out (``value=None``) or clamp the projection to ``value``."""
    _check_positions(positions)
    if value is not None and not math.isfinite(value):
        raise DirectionError(f"clamp value must be finite, got {value}")
    units = _layer_vectors(model, direction, layers if unit_layer is None else [unit_layer], unit=True)
    if unit_layer is not None:  # one direction at every chosen layer (Arditi et al.)
        u = units[unit_layer % model.cfg.n_layers]
        units = {layer: u for layer in validate_layers(model, layers)}

    def make(u: Tensor):
        def hook(acts, hook):
            proj = acts @ u  # [batch, pos]
            target = 0.0 if value is None else value
            delta = (target - proj)[..., None] * u
            gate = _gate(positions, acts)
            return acts + (delta if gate is None else gate * delta)

        return hook

    return [(resid_hook(layer), make(u)) for layer, u in units.items()]


@contextmanager
def intervene(model, hooks: Sequence):
    """Run the block with ``hooks`` attached; they are removed however the block ends."""
    with model.hooks(fwd_hooks=list(hooks)):
        yield model


@contextmanager
def steer(model, direction: Direction, alpha: float | Sequence[float] | Tensor, *, layers=None,
          positions="all", relative: Mapping[int, float] | None = None):
    """Add ``α·v_l`` to ``blocks.{l}.hook_resid_post`` for each chosen layer.

    Args:
        alpha: a number, or one per batch row (``[batch]``) for batched sweeps.
        layers: layers to steer (default: every layer of ``direction``).
        positions: ``"all"``, ``"prompt"``, ``"generated"`` or a bool mask ``[batch, pos]``.
        relative: layer → typical residual norm; α then multiplies the norm and
            the unit vector (see the module docs).

    Raises:
        DirectionError: NaN/inf α, a vector of the wrong width, a layer the model
            or the direction lacks, bad positions — before any hook is attached.
    """
    with intervene(model, steering_hooks(model, direction, alpha, layers=layers, positions=positions,
                                         relative=relative)):
        yield model


@contextmanager
def ablate(model, direction: Direction, *, layers=None, positions="all", unit_layer: int | None = None):
    """Project ``v̂_l`` out of the residual stream at each chosen layer (default: all of them).

    With ``unit_layer``, the unit vector of that one layer is ablated everywhere.
    """
    layers = "all" if layers is None and unit_layer is not None else layers
    with intervene(model, ablation_hooks(model, direction, layers=layers, positions=positions,
                                         unit_layer=unit_layer)):
        yield model


@contextmanager
def clamp(model, direction: Direction, value: float, *, layers=None, positions="all"):
    """Set the projection of the residual stream on ``v̂_l`` to ``value`` at each chosen layer."""
    with intervene(model, ablation_hooks(model, direction, layers=layers, positions=positions, value=value)):
        yield model


@contextmanager
def ablate_then_add(model, direction: Direction, alpha, *, layers=None, positions="all",
                    relative: Mapping[int, float] | None = None):
    """Ablate ``v̂_l`` and then add ``α·v_l`` at the same hook points."""
    hooks = ablation_hooks(model, direction, layers=layers, positions=positions)
    hooks += steering_hooks(model, direction, alpha, layers=layers, positions=positions, relative=relative)
    with intervene(model, hooks):
        yield model


@torch.no_grad()
def residual_norms(model, prompts, *, layers=None, positions="all", batch_size: int = 16,
                   progress: bool = False) -> dict[int, float]:
    """Typical residual norm per layer: mean over prompts of the mean ‖x‖ over their positions.

    The first token is left out: its residual norm is often tens of times the others'
    (an attention sink) and would make "typical" meaningless. ``progress`` shows a bar.
    """
    layers = validate_layers(model, layers)
    items = encode(model, as_prompts(prompts))
    pos = select_positions(items, positions)
    totals = dict.fromkeys(layers, 0.0)

    def add_norms(acts, weights, layer) -> None:  # Σ over rows of the mean ‖x‖ over the read positions
        totals[layer] += float((acts.norm(dim=-1) * weights).sum())

    for batch in token_batches(model, [it.tokens for it in items], batch_size, sort=False, progress=progress,
                               desc="residual norms"):
        weights = torch.zeros(batch.tokens.shape)
        for row, i in enumerate(batch.index):
            read = [q for q in pos[i] if q > 0] or pos[i]
            weights[row, read] = 1.0 / len(read)
        with capture(model, layers, add_norms, weights=weights.to(model.cfg.device)) as cap:
            batch.forward(model, stop_at_layer=cap.stop_at_layer)
    return {layer: totals[layer] / len(items) for layer in layers}


def projection(acts: Float[Tensor, "batch pos d_model"], direction: Direction,
               layer: int) -> Float[Tensor, "batch pos"]:
    """Projection of activations on the unit vector of ``direction`` at ``layer``."""
    return acts @ direction.unit(layer).to(acts.device, acts.dtype)


# ------------------------------------------------------------------ capping
#
# Activation capping (Lu et al. 2026, "The Assistant Axis"): keep the projection on
# v̂_l within [low, high]; positions already inside are left bit for bit as they were.


def check_direction(model, direction: Direction, layers=None) -> tuple[int, ...]:
    """The validated layers ``direction`` is used at on ``model`` (default: all of its layers).

    Raises:
        DirectionError: a direction of another width (naming both), or a layer the
            direction lacks; ModelError for a layer the model lacks.
    """
    return tuple(_layer_vectors(model, direction, layers, unit=False))


def cap_bounds(bounds, layers: Sequence[int]) -> dict[int, tuple[float, float]]:
    """``bounds`` — one ``(low, high)`` for every layer, or a map layer → ``(low, high)`` — per layer.

    ``None`` (or ±inf) leaves a side open.

    Raises:
        DirectionError: ``low > high``, a NaN bound, a malformed pair, or a layer without bounds.
    """
    if isinstance(bounds, Mapping):
        missing = [layer for layer in layers if layer not in bounds]
        if missing:
            raise DirectionError(f"cap bounds given for layers {sorted(bounds)} but not for layer(s) {missing}")
        per = {layer: bounds[layer] for layer in layers}
    else:
        per = dict.fromkeys(layers, bounds)
    out = {}
    for layer, pair in per.items():
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise DirectionError(f"cap bounds at layer {layer} must be a pair (low, high), got {pair!r}")
        try:
            low, high = (float(-math.inf if pair[0] is None else pair[0]),
                         float(math.inf if pair[1] is None else pair[1]))
        except (TypeError, ValueError):
            raise DirectionError(f"cap bounds at layer {layer} must be numbers or None, got {pair!r}") from None
        if math.isnan(low) or math.isnan(high):
            raise DirectionError(f"cap bounds at layer {layer} must not be NaN, got {pair!r}")
        if low > high:
            raise DirectionError(f"cap range at layer {layer} has low {low:g} > high {high:g}; pass low <= high")
        out[layer] = (low, high)
    return out


def capping_hooks(model, direction: Direction, bounds, *, layers=None, positions="all",
                  sink_ratio: float | None = 10.0) -> list:
    """Hooks that keep the projection on ``v̂_l`` within ``bounds`` at each chosen layer (see :func:`cap`)."""
    _check_positions(positions)
    if sink_ratio is not None and not (math.isfinite(sink_ratio) and sink_ratio > 1):
        raise DirectionError(f"sink_ratio must be a finite number > 1 or None, got {sink_ratio}")
    units = _layer_vectors(model, direction, layers, unit=True)
    ranges = cap_bounds(bounds, list(units))

    def make(u: Tensor, low: float, high: float):
        def hook(acts, hook):
            proj = acts @ u  # [batch, pos]
            target = proj.clamp(low, high)
            outside = target != proj
            if sink_ratio is not None and acts.shape[1] > 1:  # leave attention sinks alone
                norms = acts.norm(dim=-1)
                outside &= norms <= sink_ratio * norms.median(dim=-1, keepdim=True).values
            gate = _gate(positions, acts)
            if gate is not None:
                outside &= gate[..., 0].bool()
            moved = acts + (target - proj)[..., None] * u
            return torch.where(outside[..., None], moved, acts)

        return hook

    return [(resid_hook(layer), make(u, *ranges[layer])) for layer, u in units.items()]


@contextmanager
def cap(model, direction: Direction, bounds, *, layers=None, positions="all", sink_ratio: float | None = 10.0):
    """Activation capping: keep ``x·v̂_l`` within ``[low, high]`` at ``blocks.{l}.hook_resid_post``.

    A position whose projection is already inside is left exactly as it was (bit
    for bit); one outside is moved along ``v̂_l`` onto the nearer bound
    (``x + (bound − x·v̂_l) v̂_l``; on the bound up to float rounding).

    Args:
        bounds: ``(low, high)`` for every layer, or layer → ``(low, high)`` (e.g. from
            :func:`cap_range`); ``None`` leaves a side open.
        layers: capped layers (default: every layer of ``direction``).
        positions: ``"all"``, ``"prompt"``, ``"generated"`` or a bool mask ``[batch, pos]``.
        sink_ratio: positions whose residual norm exceeds this multiple of the median
            norm of their row in the forward (attention sinks: the first token's norm is
            often tens of times the others') are left alone; None caps them too. Their
            projection lies hundreds of times outside any range read from ordinary
            tokens, and moving them disturbs every later token (on SmolLM2-135M, capping
            the sink too raised the next-token KL on ordinary replies from 0.0004 to 0.37).

    Raises:
        DirectionError: ``low > high``, NaN bounds, a bad ``sink_ratio``, a direction of another width, a
            layer the direction lacks — before any hook is attached.
    """
    with intervene(model, capping_hooks(model, direction, bounds, layers=layers, positions=positions,
                                        sink_ratio=sink_ratio)):
        yield model


@torch.no_grad()
def cap_range(model, prompts, direction: Direction, *, layers=None, quantiles=(0.05, 0.95),
              positions="reply", batch_size: int = 16, template: str | None = None) -> dict[int, tuple[float, float]]:
    """Per layer, a capping range from quantiles of the projections on ``v̂_l`` over ``prompts``' tokens.

    ``prompts`` are the default assistant's turns (e.g. ordinary prompts with the
    model's own replies, read at ``positions="reply"``); ``quantiles`` is
    ``(q_low, q_high)``, either None for an open side (Lu et al. cap from below
    only: ``(0.25, None)``). Every selected token of every prompt counts once.

    Raises:
        DirectionError: quantiles outside [0, 1] or out of order, or a direction that
            does not fit the model.
    """
    qs = tuple(quantiles) if isinstance(quantiles, Sequence) and not isinstance(quantiles, str) else ()
    if len(qs) != 2 or any(q is not None and (isinstance(q, bool) or not 0 <= q <= 1) for q in qs):
        raise DirectionError(f"quantiles must be a pair (q_low, q_high) in [0, 1] or None, got {quantiles!r}")
    if qs[0] is not None and qs[1] is not None and qs[0] > qs[1]:
        raise DirectionError(f"quantiles {quantiles!r} run backwards; pass q_low <= q_high")
    units = _layer_vectors(model, direction, layers, unit=True)
    items = encode(model, as_prompts(prompts), template=template)
    pos = select_positions(items, positions)
    values: dict[int, list[Tensor]] = {layer: [] for layer in units}

    def project(acts, weights, layer):  # the projections at the read positions, flat
        values[layer].append((acts @ units[layer])[weights > 0].double().cpu())

    for batch in token_batches(model, [it.tokens for it in items], batch_size):
        weights = torch.zeros(batch.tokens.shape)
        for row, i in enumerate(batch.index):
            weights[row, pos[i]] = 1.0
        with capture(model, list(units), project, weights=weights.to(model.cfg.device)) as cap_:
            batch.forward(model, stop_at_layer=cap_.stop_at_layer)
    out = {}
    for layer, chunks in values.items():
        flat = torch.cat(chunks)
        low = float(torch.quantile(flat, qs[0])) if qs[0] is not None else None
        high = float(torch.quantile(flat, qs[1])) if qs[1] is not None else None
        out[layer] = (low, high)
    return out


__all__ = [
    "steer", "ablate", "clamp", "ablate_then_add", "intervene",
    "steering_hooks", "ablation_hooks", "residual_norms", "projection",
    "cap", "capping_hooks", "cap_bounds", "cap_range", "check_direction",
]
