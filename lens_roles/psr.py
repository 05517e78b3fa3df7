"""Prompt Steering Replacement (PSR): token-specific steering trained to mimic prompting.

Heyman & Vandeputte ("Steer Like the LLM") observe that a system prompt acts on
the residual stream like steering whose strength differs per token, while
constant-strength steering pushes every token equally and loses coherence before
it matches the prompt's behaviour. This module measures that and replaces it:

* **Alignment.** The *prompted* run holds the system prompt, the *unprompted* run
  the same user turn and reply without it (the chat template may then insert its
  default system prompt). Both share the tokens from the start of the user turn
  onward; those are the *aligned positions* (:func:`align`). The prompted run's
  extra leading tokens have no counterpart and are never compared.
* **Prompt steering** (:func:`prompt_steering`): ``Δ = x_prompted − x_unprompted``
  at aligned positions, per layer: its projection on ``v̂`` and its norm, one row
  per token.
* **PSR** (:class:`PSR`): at each steered layer ``l``, ``x ← x + λ_t·α·v_l`` with
  ``λ_t = ReLU(w_l·â_t + b_l)``, ``â_t`` the activation arriving at the hook
  (before this layer's addition), divided by its norm. The normalisation is a
  choice of this implementation: the first token's residual norm is tens of times
  the others' (an attention sink), and on raw activations one ``w`` would give it
  a huge λ. With ``w = 0, b = 1`` (or ``constant=True``) PSR is exactly
  :func:`lens_roles.interventions.steer` with ``α``. The one-layer variant
  (S-PSR) steers one layer, the all-layer variant (A-PSR) every layer with its
  own ``w_l, b_l``; both steer every position, like ``steer``, except the
  attention sink when built by :func:`make_psr` (next point).
* **The attention sink.** No system prompt can change a sequence's first token
  (causal attention), yet a trained λ landed there (its normalised activation is
  unlike every other token's, so ``w`` could give it a λ for free). A PSR made by
  :func:`make_psr` therefore sets ``λ := 0`` on that token, recognised by its
  residual (:func:`sink_residuals`, the same in every sequence), which works
  under padding and KV caches alike; its constant baseline
  (:meth:`PSR.constant_twin`) skips it too, so the comparison isolates the
  per-token λ. ``PSR(...)`` without ``sink`` steers every token.
* **Compared positions.** The objectives cover every position that has a
  counterpart in the prompted run: the aligned tail, and the *shared prefix* (the
  leading template tokens both runs have before their system prompts differ,
  position 0 among them). A causal model computes the same activations there
  with and without the system prompt, so there the target is "no change". The
  unprompted run's own default system prompt (between the prefix and the user
  turn) has no counterpart and is still steered but not compared.
* **Training** (:func:`train_psr`): the model is frozen (``requires_grad`` off
  for the duration; only ``w, b`` are optimised). Objective ``"mse"``: squared
  distance to the prompted residuals at the read layers over the compared
  positions, each layer divided by the unprompted run's distance there (so 1.0 =
  no steering at all). Objective ``"kl"``: ``KL(prompted ‖ steered)`` of the
  next-token distributions at the shared-prefix positions and the aligned
  positions that predict reply tokens.
  The prompted targets and the unprompted residual at the first steered layer are
  computed once; each step runs the model from that layer on.
* **Comparison** (:func:`compare_at_matched_coherence`): constant steering, PSR
  and prompting; coherence = perplexity of greedy generations under the
  unsteered model, behaviour = persona adherence margin on held-out pairs (and,
  given questions, the multiple-choice effect); α of the two steering methods
  found by bisection so that their perplexity reaches a target (by default
  prompting's own).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from . import __version__
from .activations import _as_prompts
from .batching import pad_batch, pad_id
from .directions import Direction, _thaw
from .errors import DirectionError, LensRolesError
from .generation import generate
from .io import save_tensors
from .interventions import steer
from .models import resid_hook, validate_layers
from .positions import Encoded, encode
from .prompts import PairSet, Prompt, PromptSet, common_prefix_len, fingerprint
from .sweeps import _logprobs_at, repetition_rate

OBJECTIVES = ("mse", "kl")
METHODS = ("none", "constant", "psr", "prompting")
#: a token whose residual has at least this cosine with the sequence-start token's is the attention sink
SINK_COS = 0.9999


class PSRError(LensRolesError, ValueError):
    """PSR input that cannot work: mismatched runs, a system prompt that changes nothing, a foreign model."""


# ------------------------------------------------------------------ alignment


@dataclass(frozen=True)
class Aligned:
    """A prompted and an unprompted run of one prompt, and where they line up.

    ``prompted.tokens[p_start + i] == unprompted.tokens[u_start + i]`` for
    ``0 <= i < length``; ``reply`` is the aligned index where the reply starts
    (None without a reply). ``prefix``: the leading tokens both runs share before
    the system prompts differ (e.g. the first ``<|im_start|>system``), at the same
    positions in both; a causal model computes the same activations there in both
    runs, so the prompt does not change them (position 0, the attention sink,
    among them).
    """

    prompted: Encoded
    unprompted: Encoded
    p_start: int
    u_start: int
    length: int
    reply: int | None
    prefix: int = 0

    def unprompted_positions(self) -> list[int]:
        return list(range(self.u_start, self.u_start + self.length))

    def prompted_positions(self) -> list[int]:
        return list(range(self.p_start, self.p_start + self.length))

    def predicting_reply(self) -> list[int]:
        """Unprompted positions whose next token is a reply token."""
        if self.reply is None:
            return []
        return list(range(self.u_start + self.reply - 1, self.u_start + self.length - 1))

    def compared(self) -> tuple[list[int], list[int]]:
        """``(unprompted, prompted)`` positions the MSE objective compares: the shared prefix, then the aligned tail."""
        head = list(range(self.prefix))
        return head + self.unprompted_positions(), head + self.prompted_positions()

    def compared_kl(self) -> tuple[list[int], list[int]]:
        """``(unprompted, prompted)`` positions the KL objective compares: the shared prefix (whose next-token
        distributions the prompt cannot change), then the positions predicting reply tokens."""
        head = list(range(self.prefix))
        shift = self.p_start - self.u_start
        return head + self.predicting_reply(), head + [q + shift for q in self.predicting_reply()]


def prompt_pairs(prompts, system: str) -> tuple[list[Prompt], list[Prompt]]:
    """``(prompted, unprompted)``: each prompt with ``system`` as its system prompt, and without one."""
    if not isinstance(system, str) or not system.strip():
        raise PSRError(f"the system prompt must be a non-empty string, got {system!r}: it would change nothing")
    plist = _as_prompts(prompts)
    return [Prompt(p.user, system, p.reply) for p in plist], [Prompt(p.user, None, p.reply) for p in plist]


def align(model, prompted: Sequence[Prompt], unprompted: Sequence[Prompt], *,
          template: str | None = None) -> list[Aligned]:
    """Encode both runs and line them up from the start of the user turn.

    Raises:
        PSRError: different numbers of prompts; a pair whose user turns or replies
            differ, or whose tokens from the user turn on differ; or a pair whose
            two runs are token for token the same (the system prompt changes nothing).
    """
    prompted, unprompted = _as_prompts(prompted), _as_prompts(unprompted)
    if len(prompted) != len(unprompted):
        raise PSRError(f"mismatched prompt sets: {len(prompted)} prompted and {len(unprompted)} unprompted prompts")
    for i, (p, u) in enumerate(zip(prompted, unprompted)):
        if p.user != u.user or p.reply != u.reply:
            what = "user turns" if p.user != u.user else "replies"
            raise PSRError(f"mismatched prompt sets: prompt {i} has different {what} in the prompted "
                           f"({(p.user if what == 'user turns' else p.reply)[:40]!r}) and unprompted "
                           f"({(u.user if what == 'user turns' else u.reply)[:40]!r}) runs")
    enc_p = encode(model, prompted, template=template)
    enc_u = encode(model, unprompted, template=template)
    out = []
    for i, (ep, eu) in enumerate(zip(enc_p, enc_u)):
        if ep.tokens == eu.tokens:
            raise PSRError(f"the system prompt changes nothing: prompt {i}'s prompted and unprompted runs have "
                           f"identical tokens ({prompted[i].system!r} is not rendered by the template)")
        tail_p, tail_u = ep.tokens[ep.user[0]:], eu.tokens[eu.user[0]:]
        if tail_p != tail_u:
            raise PSRError(f"prompt {i}: the tokens from the user turn on differ between the prompted "
                           f"({len(tail_p)} tokens) and unprompted ({len(tail_u)} tokens) runs, so they cannot "
                           "be aligned")
        reply = None if eu.reply is None else eu.reply[0] - eu.user[0]
        prefix = min(common_prefix_len(ep.tokens, eu.tokens), ep.user[0], eu.user[0])
        out.append(Aligned(ep, eu, ep.user[0], eu.user[0], len(tail_u), reply, prefix))
    return out


@torch.no_grad()
def _resid_rows(model, rows: Sequence[Sequence[int]], layers: Sequence[int], batch_size: int = 8
                ) -> list[Tensor]:
    """Residuals ``[layer, pos, d_model]`` (CPU float32) of each token row at ``layers``."""
    out: list[Tensor] = []
    pad = pad_id(model)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        tokens, _ = pad_batch(chunk, pad)
        store: dict[int, Tensor] = {}

        def capture(acts, hook, _store=store):
            _store[int(hook.name.split(".")[1])] = acts.detach().float().cpu()

        with model.hooks(fwd_hooks=[(resid_hook(layer), capture) for layer in layers]):
            model(tokens.to(model.cfg.device), stop_at_layer=max(layers) + 1)
        for r, row in enumerate(chunk):
            out.append(torch.stack([store[layer][r, : len(row)] for layer in layers]))
    return out


def _check_direction(model, direction: Direction) -> None:
    owner = direction.meta.get("model")
    if owner is not None and owner != model.cfg.model_name:
        raise PSRError(f"the direction {direction.meta.get('name', '')!r} was made from {owner!r}, but the model is "
                       f"{model.cfg.model_name!r}")
    if direction.d_model != model.cfg.d_model:
        raise PSRError(f"the direction has width {direction.d_model}, but {model.cfg.model_name} has d_model "
                       f"{model.cfg.d_model}")


def _token_text(model, token: int) -> str:
    return model.tokenizer.decode([token])


def prompt_steering(model, direction: Direction, prompts, system: str, *, layers=None,
                    template: str | None = None, batch_size: int = 8) -> pd.DataFrame:
    """How strongly, and on which tokens, ``system`` steers the residual stream.

    Returns one row per prompt × aligned token × layer: ``prompt, position``
    (aligned index from the start of the user turn), ``token, part`` (``user``,
    ``template`` or ``reply``), ``layer, projection`` (``Δ·v̂_l``), ``norm``
    (``‖Δ‖``) and ``strength`` (``Δ·v̂_l / ‖v_l‖``: the α of constant steering
    with the raw vector that would give the same projection).

    Raises:
        PSRError: mismatched runs, a foreign direction, or a system prompt that
            leaves every aligned activation unchanged.
    """
    _check_direction(model, direction)
    layers = validate_layers(model, direction.layers if layers is None else layers)
    missing = [layer for layer in layers if layer not in direction]
    if missing:
        raise DirectionError(f"direction has no vector for layer(s) {missing} (it has {list(direction.layers)})")
    prompted, unprompted = prompt_pairs(prompts, system)
    runs = align(model, prompted, unprompted, template=template)
    acts_p = _resid_rows(model, [r.prompted.tokens for r in runs], layers, batch_size)
    acts_u = _resid_rows(model, [r.unprompted.tokens for r in runs], layers, batch_size)
    units = torch.stack([direction.unit(layer) for layer in layers])  # [layer, d_model]
    norms = torch.tensor([direction.norms()[layer] for layer in layers])
    rows, changed = [], False
    for i, (run, ap, au) in enumerate(zip(runs, acts_p, acts_u)):
        delta = ap[:, run.p_start : run.p_start + run.length] - au[:, run.u_start : run.u_start + run.length]
        changed |= bool(delta.abs().max() > 0)
        proj = torch.einsum("lpd,ld->lp", delta, units)
        dnorm = delta.norm(dim=-1)
        eu = run.unprompted
        for k in range(run.length):
            pos = run.u_start + k
            part = "reply" if run.reply is not None and k >= run.reply else "user" if pos < eu.user[1] else "template"
            token = _token_text(model, eu.tokens[pos])
            for j, layer in enumerate(layers):
                rows.append({"prompt": i, "position": k, "token": token, "part": part, "layer": layer,
                             "projection": float(proj[j, k]), "norm": float(dnorm[j, k]),
                             "strength": float(proj[j, k] / norms[j]) if norms[j] > 0 else 0.0})
    if not changed:
        raise PSRError(f"the system prompt {system!r} changes nothing: the prompted and unprompted residual streams "
                       f"are identical at every aligned position of layers {list(layers)}")
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ the model


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
                "model": self.model_name, "direction": _thaw(self.direction.meta), "lens_roles": __version__,
                **self.meta, "sink": self.has_sink}
        tensors = {"w": self.w, "b": self.b, "vectors": self.vectors}
        if self.has_sink:
            tensors["sink"] = self.sink
        return save_tensors(path, tensors, info)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "PSR":
        """Read a PSR written by :meth:`save`; with ``model``, refuse one trained on another model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PSRError(f"{path}: no such PSR file")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("meta", "{}"))
                tensors = {k: f.get_tensor(k) for k in ("w", "b", "vectors", "sink") if k in f.keys()}
        except Exception as exc:
            raise PSRError(f"{path} is not a readable PSR file ({exc})") from None
        if info.get("kind") != "psr" or len(info.get("layers", [])) != tensors["w"].shape[0]:
            raise PSRError(f"{path}: not a PSR file, or its layer list does not match its parameters")
        layers = info.pop("layers")
        direction = Direction(layers, tensors["vectors"], info.pop("direction", {}))
        for key in ("kind", "model", "lens_roles", "sink"):
            info.pop(key, None)
        psr = cls(direction, layers, info.pop("alpha"), constant=info.pop("constant", False),
                  sink=tensors.get("sink"), meta=info)
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


# ------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainConfig:
    """How a PSR is trained.

    Attributes:
        objective: ``"mse"`` (activations at ``read_layers``) or ``"kl"`` (next-token distributions).
        epochs, lr, batch_size, seed: Adam on ``w`` and ``b``, prompts in fixed
            batches visited in a seeded random order each epoch.
        read_layers: layers the MSE objective compares (default: the steered layers and the last).
    """

    objective: str = "mse"
    epochs: int = 4
    lr: float = 0.02
    batch_size: int = 4
    seed: int = 0
    read_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; use one of {OBJECTIVES}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")


@dataclass
class _Batch:
    tokens: Tensor  # [batch, pos] unprompted, right-padded
    start: Tensor  # [batch, pos, d_model] unprompted residual at the first steered layer (unsteered)
    rows: list[int]  # item index per row
    positions: list[list[int]]  # compared unprompted positions per row (MSE): shared prefix + aligned tail
    reply_pos: list[list[int]]  # compared positions per row (KL): shared prefix + those predicting reply tokens


@dataclass
class TrainingData:
    """Everything training and held-out scoring need, computed once without gradients.

    ``targets[layer][i]``: the prompted residual ``[compared, d_model]`` of item ``i``
    at the compared positions (:meth:`Aligned.compared`: the shared prefix, where it
    equals the unprompted one, then the aligned tail); ``base[layer][i]``: the
    unprompted one; ``final_p[i]``: the prompted final residual at the KL positions
    (:meth:`Aligned.compared_kl`); ``scale[layer]``: mean
    squared unprompted-to-prompted distance (MSE normaliser).
    """

    runs: list[Aligned]
    start_layer: int
    read_layers: tuple[int, ...]
    targets: dict[int, list[Tensor]]
    base: dict[int, list[Tensor]]
    final_p: list[Tensor]
    scale: dict[int, float]
    batches: list[_Batch]
    fingerprint: str


def prepare(model, psr: PSR, prompts, system: str, *, read_layers: Sequence[int] | None = None,
            batch_size: int = 4, template: str | None = None) -> TrainingData:
    """Align the runs and cache the prompted targets and unprompted starting residuals (no gradients)."""
    psr.check_model(model)
    prompted, unprompted = prompt_pairs(prompts, system)
    runs = align(model, prompted, unprompted, template=template)
    last = model.cfg.n_layers - 1
    read = tuple(sorted(set(read_layers if read_layers is not None else (*psr.layers, last))))
    validate_layers(model, list(read))
    start = min(psr.layers)
    if min(read) < start:
        raise PSRError(f"read layers {list(read)} include layers before the first steered layer {start}, which "
                       "steering cannot change")
    layers_needed = sorted(set(read) | {last})
    acts_p = _resid_rows(model, [r.prompted.tokens for r in runs], layers_needed, batch_size)
    acts_u = _resid_rows(model, [r.unprompted.tokens for r in runs], sorted(set(layers_needed) | {start}),
                         batch_size)
    u_layers = sorted(set(layers_needed) | {start})
    targets = {layer: [] for layer in read}
    base = {layer: [] for layer in read}
    final_p, starts = [], []
    changed = False
    for run, ap, au in zip(runs, acts_p, acts_u):
        uu, pp = run.compared()
        for layer in read:
            targets[layer].append(ap[layers_needed.index(layer), pp])
            base[layer].append(au[u_layers.index(layer), uu])
            changed |= bool((targets[layer][-1] - base[layer][-1]).abs().max() > 0)
        final_p.append(ap[layers_needed.index(last), run.compared_kl()[1]])
        starts.append(au[u_layers.index(start)])
    if not changed:
        raise PSRError(f"the system prompt {system!r} changes nothing at the read layers {list(read)}: there is "
                       "nothing to mimic")
    scale = {layer: float(torch.cat([(t - b).pow(2).sum(-1) for t, b in zip(targets[layer], base[layer])]).mean())
             for layer in read}
    pad = pad_id(model)
    batches = []
    for s in range(0, len(runs), batch_size):
        idx = list(range(s, min(s + batch_size, len(runs))))
        tokens, _ = pad_batch([runs[i].unprompted.tokens for i in idx], pad)
        width = tokens.shape[1]
        st = torch.zeros(len(idx), width, model.cfg.d_model)
        for r, i in enumerate(idx):
            st[r, : starts[i].shape[0]] = starts[i]
        batches.append(_Batch(tokens, st.to(model.cfg.dtype), idx, [runs[i].compared()[0] for i in idx],
                              [runs[i].compared_kl()[0] for i in idx]))
    fp = fingerprint([system, [(p.user, p.reply) for p in prompted]])
    return TrainingData(runs, start, read, targets, base, final_p, scale, batches, fp)


def _forward(model, psr: PSR, batch: _Batch, data: TrainingData, *, alpha: Tensor | None = None,
             constant_alpha: float | None = None) -> tuple[dict[int, Tensor], Tensor]:
    """Run the batch from the first steered layer: residuals at the read layers and the final one.

    With ``constant_alpha``, constant steering ``x + α·v`` replaces the PSR (same layers and tokens:
    :meth:`PSR.constant_twin`).
    """
    device = model.cfg.device
    start = data.start_layer
    last = model.cfg.n_layers - 1
    k0 = psr.layers.index(start)
    x = batch.start.to(device)
    if constant_alpha is not None:
        psr = psr.constant_twin(constant_alpha).to(device)
    x = psr.add(x, k0, alpha)
    hooks = psr.hooks(model, skip=(start,), alpha=None if alpha is None else float(alpha))
    store: dict[int, Tensor] = {start: x}

    def capture(acts, hook):
        store[int(hook.name.split(".")[1])] = acts

    wanted = sorted((set(data.read_layers) | {last}) - {start})
    hooks += [(resid_hook(layer), capture) for layer in wanted]  # after the steering hooks of the same layer
    if start < last:
        with model.hooks(fwd_hooks=hooks):
            model(x, start_at_layer=start + 1, stop_at_layer=model.cfg.n_layers)
    return store, store[last]


def _losses(model, data: TrainingData, batch: _Batch, store: dict[int, Tensor], final: Tensor,
            objective: str) -> Tensor:
    if objective == "mse":
        total = 0.0
        for layer in data.read_layers:
            x = store[layer]
            errs = [(x[r, pos] - data.targets[layer][i].to(x.device, x.dtype)).pow(2).sum(-1)
                    for r, (i, pos) in enumerate(zip(batch.rows, batch.positions))]
            total = total + torch.cat(errs).mean() / data.scale[layer]
        return total / len(data.read_layers)
    rows = [r for r, i in enumerate(batch.rows) if data.runs[i].predicting_reply()]
    if not rows:
        raise PSRError("the KL objective needs prompts with replies (it compares the distributions over reply "
                       "tokens)")
    logq = _logprobs_at(model, torch.cat([final[r, batch.reply_pos[r]] for r in rows]))
    with torch.no_grad():
        logp = _logprobs_at(model, torch.cat([data.final_p[batch.rows[r]] for r in rows]).to(final.device,
                                                                                               final.dtype))
    return (logp.exp() * (logp - logq)).sum(-1).mean()


@contextmanager
def _frozen(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def psr_loss(model, psr: PSR, data: TrainingData, objective: str = "mse", *,
             constant_alpha: float | None = None) -> float:
    """The objective over all of ``data`` (no gradients); ``constant_alpha`` scores constant steering instead."""
    if objective not in OBJECTIVES:
        raise PSRError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in data.batches:
            store, final = _forward(model, psr, batch, data, constant_alpha=constant_alpha)
            total += float(_losses(model, data, batch, store, final, objective)) * len(batch.rows)
            n += len(batch.rows)
    return total / n


def train_psr(model, psr: PSR, prompts, system: str, config: TrainConfig = TrainConfig(), *,
              data: TrainingData | None = None, progress: Callable[[str], None] | None = None
              ) -> pd.DataFrame:
    """Train ``psr`` in place to mimic the ``system``-prompted run; returns the loss history.

    The model's parameters are frozen for the duration (and restored after);
    only ``psr.w`` and ``psr.b`` are optimised. History rows: ``epoch, step,
    objective, loss, seconds`` (epoch 0 is the loss before training).
    """
    if psr.constant:
        raise PSRError("a constant PSR (λ ≡ 1) has nothing to train")
    if data is None:
        data = prepare(model, psr, prompts, system, read_layers=config.read_layers, batch_size=config.batch_size)
    psr.to(model.cfg.device)
    opt = torch.optim.Adam([psr.w, psr.b], lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    history = [{"epoch": 0, "step": 0, "objective": config.objective, "loss": psr_loss(model, psr, data,
                                                                                        config.objective),
                "seconds": 0.0}]
    step = 0
    with _frozen(model):
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            total, n = 0.0, 0
            for b in torch.randperm(len(data.batches), generator=gen).tolist():
                batch = data.batches[b]
                opt.zero_grad()
                store, final = _forward(model, psr, batch, data)
                loss = _losses(model, data, batch, store, final, config.objective)
                loss.backward()
                opt.step()
                step += 1
                total += float(loss.detach()) * len(batch.rows)
                n += len(batch.rows)
            history.append({"epoch": epoch, "step": step, "objective": config.objective, "loss": total / n,
                            "seconds": time.perf_counter() - t0})
            if progress:
                progress(f"epoch {epoch}: {config.objective} loss {total / n:.4f} "
                         f"({time.perf_counter() - t0:.1f} s)")
    psr.meta.update({"objective": config.objective, "epochs": config.epochs, "lr": config.lr,
                     "system": system, "train_prompts": len(data.runs), "train_data": data.fingerprint,
                     "read_layers": list(data.read_layers), "final_loss": history[-1]["loss"]})
    return pd.DataFrame(history)


def matched_alpha(model, direction: Direction, prompts, system: str, layer: int) -> float:
    """The constant α whose addition ``α·v_layer`` matches prompting's mean projection on ``v̂`` at ``layer``."""
    frame = prompt_steering(model, direction, prompts, system, layers=[layer])
    return float(frame.strength.mean())


@torch.no_grad()
def sink_residuals(model, layers: Sequence[int], token: int) -> Float[Tensor, "layer d_model"]:
    """The residual of ``token`` as a sequence's first token at ``layers``: the attention sink.

    Causal attention makes it the same in every sequence that starts with ``token``
    (it sees only itself; padding is masked and a lone key's attention weight is 1
    whatever its position), so :class:`PSR` recognises the sink by it.
    """
    layers = validate_layers(model, list(layers))
    store: dict[int, Tensor] = {}

    def capture(acts, hook):
        store[int(hook.name.split(".")[1])] = acts[0, 0].detach().float().cpu()

    with model.hooks(fwd_hooks=[(resid_hook(layer), capture) for layer in layers]):
        model(torch.tensor([[int(token)]], device=model.cfg.device), stop_at_layer=max(layers) + 1)
    return torch.stack([store[layer] for layer in layers])


def make_psr(model, direction: Direction, prompts, system: str, *, layers: str | Sequence[int] = "one",
             layer: int | None = None, alpha: float | None = None, skip_sink: bool = True,
             template: str | None = None) -> PSR:
    """A fresh PSR starting as constant steering at prompting's mean strength.

    ``layers="one"`` steers ``layer`` (default: the middle layer) — S-PSR;
    ``"all"`` every layer of the direction — A-PSR, each starting at ``b = 1/L``
    so that the accumulated addition matches the one-layer start. ``alpha``
    defaults to :func:`matched_alpha` at the (first) steered layer. With
    ``skip_sink`` (the default) the PSR never steers the sequence-start token (the
    attention sink), which no system prompt can change (see :class:`PSR`).
    """
    _check_direction(model, direction)
    if layers == "one":
        chosen = [model.cfg.n_layers // 2 if layer is None else layer]
    elif layers == "all":
        chosen = list(direction.layers)
    else:
        chosen = list(layers)
    chosen = validate_layers(model, chosen)
    probe = chosen[0] if layers != "all" else (model.cfg.n_layers // 2 if layer is None else layer)
    if alpha is None:
        alpha = matched_alpha(model, direction, prompts, system, probe)
        if alpha <= 0:
            raise PSRError(f"prompting with {system!r} moves the residual stream against the direction at layer "
                           f"{probe} (mean strength {alpha:.3g}); negate the direction or pass alpha")
    sink = None
    if skip_sink:
        first = encode(model, _as_prompts(prompts)[:1], template=template)[0].tokens[0]
        sink = sink_residuals(model, chosen, first)
    return PSR(direction, chosen, alpha, bias=1.0 if len(chosen) == 1 else 1.0 / len(chosen), sink=sink,
               meta={"system": system, "variant": "S-PSR" if len(chosen) == 1 else "A-PSR"})


# --------------------------------------------------------------- evaluation


def mean_strength(model, psr: PSR, data: TrainingData) -> float:
    """Mean of ``λ_t·α`` over the compared positions (shared prefix + aligned tail, and steered layers) of ``data``."""
    record: list = []
    vals = []
    with torch.no_grad():
        for batch in data.batches:
            record.clear()
            with psr.applied(model, record=record):
                model(batch.tokens.to(model.cfg.device), stop_at_layer=max(psr.layers) + 1)
            for _, lam in record:
                for r, pos in enumerate(batch.positions):
                    vals.append(lam[r, pos].float().cpu())
    return float(torch.cat(vals).mean() * psr.alpha)


def activation_distance(model, psr: PSR, data: TrainingData) -> pd.DataFrame:
    """Held-out distance to the prompted activations: unsteered, constant steering and PSR.

    Constant steering uses the PSR's own mean strength (:func:`mean_strength`) at
    the same layers and on the same tokens (:meth:`PSR.constant_twin`: a PSR that
    skips the attention sink is compared with constant steering that skips it
    too); for such a PSR a row ``constant_all_tokens`` adds plain
    :func:`~lens_roles.interventions.steer` (the sink steered as well) at the same
    strength. Rows: ``method, alpha, read_layer, mse, relative_mse`` (MSE over the
    compared positions, summed over ``d_model``; relative = divided by the
    unsteered run's).
    """
    strength = mean_strength(model, psr, data)
    rows = []
    runs = [("none", psr, 0.0), ("constant", psr, strength), ("psr", psr, None)]
    if psr.has_sink:
        runs.insert(2, ("constant_all_tokens", PSR(psr.direction, psr.layers, float(psr.alpha)), strength))
    for method, model_psr, const in runs:
        sums = {layer: [] for layer in data.read_layers}
        with torch.no_grad():
            for batch in data.batches:
                store, _ = _forward(model, model_psr, batch, data, constant_alpha=const)
                for layer in data.read_layers:
                    for r, (i, pos) in enumerate(zip(batch.rows, batch.positions)):
                        sums[layer].append((store[layer][r, pos].float().cpu() - data.targets[layer][i]
                                            ).pow(2).sum(-1))
        for layer in data.read_layers:
            mse = float(torch.cat(sums[layer]).mean())
            rows.append({"method": method, "alpha": strength if method != "none" else 0.0, "read_layer": layer,
                         "mse": mse})
    frame = pd.DataFrame(rows)
    ref = frame[frame.method == "none"].set_index("read_layer").mse
    frame["relative_mse"] = frame.mse / frame.read_layer.map(ref)
    return frame


def token_coefficients(model, psr: PSR, prompts, *, template: str | None = None) -> pd.DataFrame:
    """λ per token of each prompt: ``prompt, position, token, part, layer, lam, strength`` (λ·α)."""
    plist = _as_prompts(prompts)
    items = encode(model, plist, template=template)
    rows = []
    with torch.no_grad():
        for i, item in enumerate(items):
            record: list = []
            with psr.applied(model, record=record):
                model(torch.tensor([item.tokens], device=model.cfg.device), stop_at_layer=max(psr.layers) + 1)
            for layer, lam in record:
                for pos, tok in enumerate(item.tokens):
                    part = ("reply" if item.reply and pos >= item.reply[0] else
                            "user" if item.user[0] <= pos < item.user[1] else "template")
                    rows.append({"prompt": i, "position": pos, "token": _token_text(model, tok), "part": part,
                                 "layer": layer, "lam": float(lam[0, pos]),
                                 "strength": float(lam[0, pos]) * float(psr.alpha)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------- comparison


@dataclass(frozen=True)
class CompareConfig:
    """Settings of :func:`compare_at_matched_coherence`.

    Attributes:
        target_perplexity: coherence to match (default: prompting's own perplexity).
        max_new_tokens: length of the generations scored for coherence.
        steps: bisection steps per method (after bracketing).
        alpha_hi: first upper bracket, as a multiple of the PSR's α (doubled until it brackets).
        tolerance: a method's point counts as matched (``matched`` column) when its
            perplexity is within this relative distance of the target (``|log(ppl/target)|``).
    """

    target_perplexity: float | None = None
    max_new_tokens: int = 24
    steps: int = 5
    alpha_hi: float = 2.0
    tolerance: float = 0.05

    def __post_init__(self):
        if self.target_perplexity is not None and not (self.target_perplexity > 1
                                                       and math.isfinite(self.target_perplexity)):
            raise ValueError(f"target_perplexity must be finite and > 1, got {self.target_perplexity}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be an integer >= 2, got {self.max_new_tokens!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.alpha_hi > 0:
            raise ValueError(f"alpha_hi must be positive, got {self.alpha_hi}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}")


@dataclass(frozen=True)
class Comparison:
    """``curve``: every evaluated point (``method, alpha, perplexity, repetition, margin, mean_strength``);
    ``table``: behaviour at matched coherence, one row per method; ``meta``: provenance."""

    curve: pd.DataFrame
    table: pd.DataFrame
    meta: dict


def _context(model, method: str, direction: Direction, psr: PSR, alpha: float):
    if method == "constant":
        if psr.has_sink:  # the same tokens as the PSR: every one but the sink
            return psr.constant_twin(alpha).applied(model)
        return steer(model, direction, alpha, layers=list(psr.layers))
    if method == "psr":
        return psr.applied(model, alpha=alpha)
    return nullcontext(model)


def _coherence(model, ctx, prompts: list[Prompt], system: str | None, max_new_tokens: int
               ) -> tuple[float, float]:
    """Mean perplexity (under the unsteered, unprompted model) and repetition of greedy generations."""
    gen_prompts = [Prompt(p.user, system) for p in prompts]
    with torch.no_grad():
        with ctx:
            outs = generate(model, gen_prompts, max_new_tokens=max_new_tokens)
        items = encode(model, [Prompt(p.user) for p in prompts])
        full = [list(it.tokens) + list(o.tokens) for it, o in zip(items, outs)]
        tokens, _ = pad_batch(full, pad_id(model))
        logp = torch.log_softmax(model(tokens.to(model.cfg.device)).float(), dim=-1).cpu()
    ppl, rep = [], []
    for r, (it, o) in enumerate(zip(items, outs)):
        if not o.tokens:
            continue
        idx = torch.arange(len(it.tokens), len(it.tokens) + len(o.tokens))
        ppl.append(float((-logp[r, idx - 1, tokens[r, idx]].mean()).exp()))
        rep.append(repetition_rate(o.tokens))
    if not ppl:
        return float("nan"), float("nan")
    return sum(ppl) / len(ppl), sum(rep) / len(rep)


def _margin(model, ctx, pairs: PairSet, system: str | None, batch_size: int = 8) -> float:
    """Persona adherence: mean log p(positive reply) − mean log p(negative reply), per token, over pairs."""
    prompts = [Prompt(p.user, system, r) for p in pairs.pairs for r in (p.positive, p.negative)]
    items = encode(model, prompts)
    lps = []
    with torch.no_grad(), ctx:
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            tokens, _ = pad_batch([it.tokens for it in chunk], pad_id(model))
            resid = model(tokens.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
            for r, it in enumerate(chunk):
                a, b = it.reply
                logp = _logprobs_at(model, resid[r, a - 1 : b - 1]).cpu()
                lps.append(float(logp[torch.arange(b - a), torch.tensor(it.tokens[a:b])].mean()))
    return sum(lps[0::2]) / len(pairs) - sum(lps[1::2]) / len(pairs)


def _mc(model, ctx, questions, system: str | None) -> tuple[float, float]:
    from .multiple_choice import score_questions

    with ctx:
        frame = score_questions(model, questions, system=system)
    return float(frame.correct.mean()), float(frame.p_correct.mean())


def compare_at_matched_coherence(model, direction: Direction, psr: PSR, pairs: PairSet | PromptSet, system: str,
                                 *, questions=None, config: CompareConfig = CompareConfig(),
                                 progress: Callable[[str], None] | None = None) -> Comparison:
    """Constant steering, PSR and prompting at matched coherence (see the module docs).

    Coherence is measured on the pairs' user turns; behaviour on the pairs (held
    out: pass pairs not used to build the direction or train the PSR). A role has
    instructions, not contrast pairs: ``pairs`` may then be a :class:`PromptSet`
    (or a list of prompts), whose user turns give the coherence, and the
    behaviour is the multiple-choice effect alone (``margin`` is NaN, and
    ``questions`` are required). For each
    steering method α is bisected on ``[0, hi]`` so that the perplexity of its
    generations reaches the target; the point closest to it is the matched one.
    With ``questions``, the matched points (and prompting, and no intervention)
    are also scored on them: ``accuracy`` and ``p_correct`` and their changes from
    no intervention (the multiple-choice effect).
    """
    _check_direction(model, direction)
    psr.check_model(model)
    missing = [layer for layer in psr.layers if layer not in direction]
    if missing or not torch.allclose(torch.stack([direction[layer] for layer in psr.layers]),
                                     psr.vectors.cpu(), rtol=1e-4, atol=1e-6):
        raise PSRError(f"the PSR steers with a different direction (or layers {missing}) than the one compared "
                       "against")
    say = progress or (lambda msg: None)
    has_pairs = isinstance(pairs, PairSet)
    if has_pairs:
        users = [Prompt(p.user) for p in pairs.pairs]
        lam_prompts = [Prompt(p.user, None, p.positive) for p in pairs.pairs]
    else:
        plist = _as_prompts(pairs)
        if questions is None:
            raise PSRError("without contrast pairs there is no persona margin: pass questions (the multiple-choice "
                           "effect is then the behaviour)")
        users = [Prompt(p.user) for p in plist]
        lam_prompts = [Prompt(p.user, None, p.reply) for p in plist]
        if not users:
            raise PSRError("no prompts to measure coherence on")
    t0 = time.perf_counter()
    points = []

    def evaluate(method: str, alpha: float) -> dict:
        system_ = system if method == "prompting" else None
        ppl, rep = _coherence(model, _context(model, method, direction, psr, alpha), users, system_,
                              config.max_new_tokens)
        margin = (_margin(model, _context(model, method, direction, psr, alpha), pairs, system_) if has_pairs
                  else float("nan"))
        row = {"method": method, "alpha": alpha, "perplexity": ppl, "repetition": rep, "margin": margin}
        points.append(row)
        say(f"{method} α={alpha:.3g}: perplexity {ppl:.2f}" + (f", margin {margin:.3f}" if has_pairs else ""))
        return row

    base = evaluate("none", 0.0)
    prompting = evaluate("prompting", 0.0)
    target = config.target_perplexity or prompting["perplexity"]
    matched = {"none": base, "prompting": prompting}
    # PSR's mean λ on these texts, so that both methods start bracketing at the same mean strength
    lam = token_coefficients(model, psr, lam_prompts)
    mean_lambda = float(lam.lam.mean())
    if mean_lambda <= 0:
        raise PSRError("the PSR's λ is 0 on every token of these prompts: it does not steer at all")
    strength = {"none": 0.0, "prompting": float("nan"), "constant": 1.0, "psr": mean_lambda}
    for method in ("constant", "psr"):
        lo, hi = 0.0, config.alpha_hi * float(psr.alpha) / strength[method]
        row = evaluate(method, hi)
        for _ in range(8):  # bracket: grow hi until the perplexity passes the target
            if row["perplexity"] >= target:
                break
            lo, hi = hi, 2 * hi
            row = evaluate(method, hi)
        tried = [row]
        for _ in range(config.steps):
            mid = (lo + hi) / 2
            row = evaluate(method, mid)
            tried.append(row)
            if row["perplexity"] >= target:
                hi = mid
            else:
                lo = mid
        best = min(tried, key=lambda r: abs(math.log(r["perplexity"] / target)))
        matched[method] = best
    rows = []
    for method in ("none", "prompting", "constant", "psr"):
        m = matched[method]
        rows.append({"method": method, "alpha": m["alpha"], "perplexity": m["perplexity"],
                     "target_perplexity": target, "repetition": m["repetition"], "margin": m["margin"]})
    table = pd.DataFrame(rows)
    # the closest point found is reported either way; say whether it is a matched one
    table["matched"] = [abs(math.log(p / target)) <= config.tolerance for p in table.perplexity]
    for row in table[~table.matched & table.method.isin(["constant", "psr"])].itertuples():
        say(f"warning: {row.method} did not reach the target perplexity {target:.3f} (closest: "
            f"{row.perplexity:.3f} at α={row.alpha:.3g}); its row is not a matched-coherence point")
    table["mean_strength"] = table.alpha * table.method.map(strength)
    table["margin_gain"] = table.margin - base["margin"]
    if questions is not None:
        accs = {}
        for method in ("none", "prompting", "constant", "psr"):
            system_ = system if method == "prompting" else None
            accs[method] = _mc(model, _context(model, method, direction, psr, matched[method]["alpha"]), questions,
                               system_)
            say(f"{method}: multiple-choice accuracy {accs[method][0]:.3f}")
        table["mc_accuracy"] = table.method.map(lambda m: accs[m][0])
        table["mc_p_correct"] = table.method.map(lambda m: accs[m][1])
        table["mc_effect"] = table.mc_p_correct - accs["none"][1]
    curve = pd.DataFrame(points)
    curve["mean_strength"] = curve.alpha * curve.method.map(strength)
    meta = {"model": model.cfg.model_name, "layers": list(psr.layers), "system": system,
            "pairs": getattr(pairs, "name", "prompts"), "pairs_kind": "contrast pairs" if has_pairs else "prompts",
            "pairs_hash": pairs.fingerprint() if hasattr(pairs, "fingerprint") else fingerprint(
                [(p.system, p.user, p.reply) for p in plist]), "n_pairs": len(users), "target_perplexity": target,
            "max_new_tokens": config.max_new_tokens, "bisection_steps": config.steps, "psr_mean_lambda": mean_lambda,
            "psr": dict(psr.meta, alpha=float(psr.alpha)), "direction": _thaw(direction.meta),
            "questions": None if questions is None else getattr(questions, "name", "questions"),
            "n_questions": None if questions is None else len(list(questions)), "lens_roles": __version__,
            "seconds": time.perf_counter() - t0}
    return Comparison(curve, table, meta)


__all__ = [
    "PSR", "PSRError", "Aligned", "TrainConfig", "TrainingData", "CompareConfig", "Comparison", "align",
    "prompt_pairs", "prompt_steering", "prepare", "train_psr", "psr_loss", "make_psr", "matched_alpha",
    "sink_residuals", "SINK_COS",
    "mean_strength", "activation_distance", "token_coefficients", "compare_at_matched_coherence", "apply_psr",
]
