"""Activation patching and attribution patching: which components carry a role.

Two runs of the same token length: *clean* (role-prompted, or steered) and
*corrupt* (baseline, or unsteered). **Activation patching** runs the corrupt input
with one activation replaced by its value in the clean run and reads a metric;
values are normalised so that 0 = corrupt and 1 = clean::

    value = (m(patched) − m(corrupt)) / (m(clean) − m(corrupt))

**Attribution patching** (Nanda 2023; Syed et al. 2023) replaces every patched run
by its first-order approximation around the corrupt run,
``m(patched) − m(corrupt) ≈ (a_clean − a_corrupt) · ∂m/∂a |corrupt``, for all sites
at once from one forward and one backward pass, normalised the same way.

Grids, in TransformerLens's conventions (``transformer_lens.patching``):

==========  ===============================  ==============  ==============================
grid        hook                             axes            one cell patches
==========  ===============================  ==============  ==============================
resid       ``blocks.{l}.hook_resid_pre``    layer × pos     the residual stream entering
                                                             block l at one position
attn        ``blocks.{l}.hook_attn_out``     layer           attention output, every
                                                             patched position at once
mlp         ``blocks.{l}.hook_mlp_out``      layer           MLP output, every patched
                                                             position at once
heads       ``blocks.{l}.attn.hook_z``       layer × head    one head's output (z), every
                                                             patched position at once
attn_pos    ``blocks.{l}.hook_attn_out``     layer × pos     attention output at one position
mlp_pos     ``blocks.{l}.hook_mlp_out``      layer × pos     MLP output at one position
==========  ===============================  ==============  ==============================

Metrics are small values (:class:`DirectionProjection`, :class:`LogprobMargin`,
:class:`LogitDiff`) that read the residual stream at the end of their *read layer*
and return one number per run. A metric appends continuation tokens to the prompt
when it scores them (one run row per continuation); only the prompt's positions
are ever patched, the continuation is read. Since a causal model's later layers
and positions cannot change an earlier read-out, sites after the metric's read
layer or read position are refused with a :class:`~lens_roles.errors.PatchingError`.

Speed: a :class:`PatchSetup` runs clean and corrupt once and keeps the activations
at every patchable site. Activation patching then batches many cells into one
forward (one cell per group of batch rows), starts that forward at the patched
layer from the cached corrupt residual stream (the layers before it cannot
change), stops at the metric's read layer, and skips cells whose clean and
corrupt activations are identical (e.g. positions before the first differing
token), whose value is exactly 0.

Patching the steering effect (:func:`steering_setup`): clean = the prompt with
``α·v`` added at ``blocks.{l}.hook_resid_post`` (prompt positions), corrupt = the
same prompt unsteered; patching steered activations into the unsteered run shows
which downstream components carry the change in the metric.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, ContextManager, Mapping, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from . import __version__
from .batching import pad_batch, pad_id
from .directions import Direction, _thaw
from .errors import DirectionError, PatchingError
from .models import model_id, validate_layers
from .positions import default_prepend_bos, encode
from .prompts import Prompt, fingerprint, template_name

#: What a clean or corrupt input may be: user text, a Prompt, or token ids.
PromptLike = Union[str, Prompt, Sequence[int], Tensor]


@dataclass(frozen=True)
class Grid:
    """A family of patching sites: a hook per layer and the axes of its result."""

    name: str
    hook: str  #: hook name with ``{layer}``
    axes: tuple[str, ...]
    description: str


GRIDS: dict[str, Grid] = {
    g.name: g
    for g in (
        Grid("resid", "blocks.{layer}.hook_resid_pre", ("layer", "pos"), "residual stream entering each block"),
        Grid("attn", "blocks.{layer}.hook_attn_out", ("layer",), "attention output of each layer"),
        Grid("mlp", "blocks.{layer}.hook_mlp_out", ("layer",), "MLP output of each layer"),
        Grid("heads", "blocks.{layer}.attn.hook_z", ("layer", "head"), "each attention head's output (z)"),
        Grid("attn_pos", "blocks.{layer}.hook_attn_out", ("layer", "pos"), "attention output per position"),
        Grid("mlp_pos", "blocks.{layer}.hook_mlp_out", ("layer", "pos"), "MLP output per position"),
    )
}

#: The hook points of each layer that can be patched (and are cached by a PatchSetup).
SITE_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z")


def get_grid(name: str) -> Grid:
    """The :class:`Grid` called ``name``; a clear error for an unknown one."""
    if name not in GRIDS:
        raise PatchingError(f"unknown grid {name!r}; use one of {', '.join(GRIDS)}")
    return GRIDS[name]


# ----------------------------------------------------------------------- metrics


def final_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits from final-layer residual vectors, through ``ln_final`` and the unembedding.

    Only the vectors passed are unembedded, which for a small model with a large
    vocabulary is much cheaper than the full forward's logits at every position.
    """
    from transformer_lens.utilities import apply_softcap

    flat = resid.reshape(1, -1, resid.shape[-1])
    if model.cfg.normalization_type is not None:
        flat = model.ln_final(flat)
    logits = apply_softcap(model.unembed(flat), getattr(model.cfg, "output_logits_soft_cap", None))
    return logits.reshape(*resid.shape[:-1], logits.shape[-1])


def _prompt_position(position: int, n_prompt: int, what: str) -> int:
    if not -n_prompt <= position < n_prompt:
        raise PatchingError(f"{what}: position {position} is outside the prompt ({n_prompt} tokens)")
    return position % n_prompt


def _token_ids(model, text: str | Sequence[int], what: str) -> list[int]:
    """Token ids of a continuation or token given as text (no special tokens) or as ids."""
    if isinstance(text, str):
        if model.tokenizer is None:
            raise PatchingError(f"{what} is text, but the model has no tokenizer; pass token ids")
        ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = [int(t) for t in text]
    if not ids:
        raise PatchingError(f"{what} {text!r} has no tokens")
    bad = [t for t in ids if not 0 <= t < model.cfg.d_vocab]
    if bad:
        raise PatchingError(f"{what}: token ids {bad} are outside the vocabulary (d_vocab {model.cfg.d_vocab})")
    return ids


class Metric:
    """A scalar read from a run, one per batch of :meth:`continuations` rows.

    Subclasses say which rows a run has (:meth:`continuations`: token lists appended
    to the prompt, one row each; ``[[]]`` = the prompt alone), where they read
    (:meth:`read_layer`, :meth:`read_position`, the last prompt position that can
    matter), and compute the value from the residual stream after the read layer::

        metric(model, resid [batch·rows, pos, d_model], n_prompt) -> [batch]

    Rows of one run are consecutive in ``resid``.
    """

    kind: ClassVar[str] = "metric"

    def continuations(self, model) -> list[list[int]]:
        return [[]]

    def read_layer(self, model) -> int:
        return model.cfg.n_layers - 1

    def read_position(self, n_prompt: int) -> int:
        return n_prompt - 1

    @property
    def label(self) -> str:
        return self.kind

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label}

    def __call__(self, model, resid: Float[Tensor, "row pos d_model"], n_prompt: int) -> Float[Tensor, " batch"]:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class DirectionProjection(Metric):
    """Projection of the residual stream after block ``layer`` at ``position`` on ``v̂_layer``.

    ``position`` indexes the prompt (``-1``: its last token). In residual units.
    """

    direction: Direction
    layer: int
    position: int = -1
    kind: ClassVar[str] = "projection"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise DirectionError(f"projection layer must be a block index >= 0, got {self.layer!r}")
        self.direction.unit(self.layer)  # raises for a missing layer or a zero vector

    def read_layer(self, model) -> int:
        if self.direction.d_model != model.cfg.d_model:
            raise DirectionError(
                f"direction {self.name!r} has width {self.direction.d_model}, but {model.cfg.model_name} "
                f"has d_model {model.cfg.d_model}"
            )
        return validate_layers(model, self.layer)[0]

    def read_position(self, n_prompt: int) -> int:
        return _prompt_position(self.position, n_prompt, f"{self.label}")

    @property
    def name(self) -> str:
        return str(self.direction.meta.get("name", "direction"))

    @property
    def label(self) -> str:
        return f"projection on {self.name} after layer {self.layer}"

    def describe(self) -> dict:
        meta = self.direction.meta
        return {"kind": self.kind, "label": self.label, "direction": self.name, "layer": self.layer,
                "position": self.position, "direction_model": meta.get("model"),
                "direction_method": meta.get("method"), "direction_dataset": _thaw(meta.get("dataset"))}

    def __call__(self, model, resid, n_prompt):
        u = self.direction.unit(self.layer).to(resid.device, resid.dtype)
        return resid[:, self.read_position(n_prompt)] @ u


@dataclass(frozen=True)
class LogitDiff(Metric):
    """``logit(token_a) − logit(token_b)`` predicted at ``position`` of the prompt (default: the last).

    Tokens are single tokens, given as text (e.g. ``" Paris"``) or as ids.
    """

    token_a: str | int
    token_b: str | int
    position: int = -1
    kind: ClassVar[str] = "logit_diff"

    def ids(self, model) -> tuple[int, int]:
        out = []
        for which, tok in (("token_a", self.token_a), ("token_b", self.token_b)):
            ids = _token_ids(model, [tok] if isinstance(tok, int) else tok, f"LogitDiff {which}")
            if len(ids) != 1:
                pieces = [model.tokenizer.decode([t]) for t in ids]
                raise PatchingError(f"LogitDiff {which} {tok!r} is {len(ids)} tokens {pieces}, not one; "
                                    "pass a single token (or use LogprobMargin for multi-token continuations)")
            out.append(ids[0])
        if out[0] == out[1]:
            raise PatchingError(f"LogitDiff compares token {out[0]} with itself")
        return out[0], out[1]

    def read_position(self, n_prompt: int) -> int:
        return _prompt_position(self.position, n_prompt, self.label)

    @property
    def label(self) -> str:
        return f"logit({self.token_a!r}) − logit({self.token_b!r})"

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "token_a": self.token_a, "token_b": self.token_b,
                "position": self.position}

    def __call__(self, model, resid, n_prompt):
        a, b = self.ids(model)
        logits = final_logits(model, resid[:, self.read_position(n_prompt)])  # [batch, vocab]
        return logits[:, a] - logits[:, b]


@dataclass(frozen=True)
class LogprobMargin(Metric):
    """Log-probability margin between two continuations of the prompt.

    ``mean log p(good tokens) − mean log p(bad tokens)`` (``reduce="sum"``: total
    log-probabilities), each continuation scored as its own row after the prompt.
    Continuations are text (tokenised on their own, without special tokens) or ids.
    """

    good: str | tuple[int, ...]
    bad: str | tuple[int, ...]
    reduce: str = "mean"
    kind: ClassVar[str] = "logprob_margin"

    def __post_init__(self):
        if self.reduce not in ("mean", "sum"):
            raise PatchingError(f"LogprobMargin reduce must be 'mean' or 'sum', got {self.reduce!r}")
        if self.good == self.bad:
            raise PatchingError("LogprobMargin: the good and bad continuations are identical")

    def continuations(self, model) -> list[list[int]]:
        return [_token_ids(model, self.good, "LogprobMargin good continuation"),
                _token_ids(model, self.bad, "LogprobMargin bad continuation")]

    @property
    def label(self) -> str:
        def short(x):
            s = x if isinstance(x, str) else f"<{len(x)} ids>"
            return s if len(s) <= 24 else s[:21] + "…"

        return f"{self.reduce} log p({short(self.good)!r}) − log p({short(self.bad)!r})"

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "good": self.good if isinstance(self.good, str) else
                list(self.good), "bad": self.bad if isinstance(self.bad, str) else list(self.bad),
                "reduce": self.reduce}

    def __call__(self, model, resid, n_prompt):
        conts = self.continuations(model)
        rows = len(conts)
        scores = []
        for r, ids in enumerate(conts):
            k = len(ids)
            # positions n_prompt-1 .. n_prompt+k-2 predict the continuation's k tokens
            x = resid[r::rows, n_prompt - 1 : n_prompt - 1 + k]  # [batch, k, d_model]
            logp = torch.log_softmax(final_logits(model, x).float(), dim=-1)
            target = torch.tensor(ids, device=logp.device).expand(x.shape[0], k)
            lp = logp.gather(-1, target[..., None])[..., 0]  # [batch, k]
            scores.append(lp.mean(-1) if self.reduce == "mean" else lp.sum(-1))
        return scores[0] - scores[1]


# ------------------------------------------------------------------------ inputs


def _as_prompt(x, which: str) -> Prompt | None:
    if isinstance(x, str):
        return Prompt(x)
    if isinstance(x, Prompt):
        return x
    return None


def _ids_of(model, x, which: str, template, prepend_bos) -> list[int]:
    prompt = _as_prompt(x, which)
    if prompt is not None:
        return list(encode(model, [prompt], template=template, prepend_bos=prepend_bos)[0].tokens)
    if isinstance(x, Tensor):
        if x.ndim == 2 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 1:
            raise PatchingError(f"{which} token ids must be one sequence [pos], got shape {tuple(x.shape)}")
        x = x.tolist()
    try:
        ids = [int(t) for t in x]
    except (TypeError, ValueError):
        raise PatchingError(f"{which} must be text, a Prompt or token ids, got {type(x).__name__}") from None
    if not ids:
        raise PatchingError(f"{which} has no tokens")
    return _token_ids(model, ids, which)


def _str_tokens(model, ids: Sequence[int]) -> tuple[str, ...]:
    if model.tokenizer is None:
        return tuple(str(t) for t in ids)
    return tuple(model.tokenizer.decode([t]) for t in ids)


def _differing_field(a: Prompt, b: Prompt, short: Prompt) -> str:
    """The prompt field to pad: the first one that differs and is set on the shorter prompt."""
    for name in ("system", "user", "reply"):
        if getattr(a, name) != getattr(b, name) and getattr(short, name) is not None:
            return name
    return "user"


def align_prompts(model, clean: str | Prompt, corrupt: str | Prompt, *, filler: str = " .",
                  template: str | None = None, prepend_bos: bool | None = None,
                  max_filler: int = 64) -> tuple[Prompt, Prompt]:
    """Make two prompts the same token length by appending ``filler`` to the shorter one.

    The filler goes at the end of the field in which the prompts differ (the system
    prompt if that is where they differ, else the user text), so the template tokens
    after it line up position by position. Returns ``(clean, corrupt)`` as Prompts.

    Raises:
        PatchingError: token-id inputs (nothing to pad), or a filler that jumps past
            the target length (try another, e.g. ``" -"``).
    """
    prompts = [_as_prompt(clean, "clean"), _as_prompt(corrupt, "corrupt")]
    if any(p is None for p in prompts):
        raise PatchingError("align_prompts needs text or Prompt inputs, not token ids")
    lengths = [len(encode(model, [p], template=template, prepend_bos=prepend_bos)[0]) for p in prompts]
    if lengths[0] == lengths[1]:
        return prompts[0], prompts[1]
    s = 0 if lengths[0] < lengths[1] else 1
    short, target = prompts[s], lengths[1 - s]
    name = _differing_field(prompts[0], prompts[1], short)
    for k in range(1, max_filler + 1):
        padded = replace(short, **{name: (getattr(short, name) or "") + filler * k})
        n = len(encode(model, [padded], template=template, prepend_bos=prepend_bos)[0])
        if n == target:
            prompts[s] = padded
            return prompts[0], prompts[1]
        if n > target:
            break
    which = ("clean", "corrupt")[s]
    raise PatchingError(
        f"could not align: appending {filler!r} to the {which} prompt's {name} text does not reach exactly "
        f"{target} tokens; pass another filler (e.g. ' -' or ' so') or reword one prompt"
    )


# ------------------------------------------------------------------------ result


@dataclass(frozen=True, eq=False)
class PatchResult:
    """One grid of patching results.

    Attributes:
        values: normalised effects (0 = corrupt, 1 = clean), float64, one axis per
            entry of ``axes``: ``[layer, pos]``, ``[layer]`` or ``[layer, head]``.
        axes: axis names, from ``layer``, ``pos``, ``head``.
        labels: per axis, the layer / position / head index of each entry.
        grid, method: which grid (see :data:`GRIDS`), ``"activation"`` or ``"attribution"``.
        metric: the metric's label; ``clean_value`` and ``corrupt_value`` its raw values.
        tokens, corrupt_tokens: the prompt's tokens as strings, every position.
        positions: the prompt positions patched (the ``pos`` axis, or pooled by a
            per-layer/per-head cell).
        meta: what the numbers depend on (model, prompts, token hashes, template, BOS,
            metric, normalisation, package version, timing).
    """

    values: Float[Tensor, "..."]
    axes: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    grid: str
    method: str
    metric: str
    clean_value: float
    corrupt_value: float
    tokens: tuple[str, ...]
    corrupt_tokens: tuple[str, ...]
    positions: tuple[int, ...]
    meta: dict

    def __post_init__(self):
        shape = tuple(len(labels) for labels in self.labels)
        if len(self.axes) != len(self.labels) or tuple(self.values.shape) != shape:
            raise PatchingError(f"values of shape {tuple(self.values.shape)} do not match axes {self.axes} "
                                f"with {shape} labels")

    @property
    def raw(self) -> Float[Tensor, "..."]:
        """The values in the metric's own units (for attribution: the linear estimate)."""
        return self.corrupt_value + self.values * (self.clean_value - self.corrupt_value)

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: ``grid, method, metric, layer, pos, head, token, corrupt_token, value, raw``."""
        rows = []
        raw = self.raw
        for idx in itertools.product(*(range(len(labels)) for labels in self.labels)):
            rec = {"grid": self.grid, "method": self.method, "metric": self.metric,
                   "layer": None, "pos": None, "head": None, "token": None, "corrupt_token": None}
            for axis, labels, i in zip(self.axes, self.labels, idx):
                rec[axis] = labels[i]
            if rec["pos"] is not None:
                rec["token"], rec["corrupt_token"] = self.tokens[rec["pos"]], self.corrupt_tokens[rec["pos"]]
            rec["value"], rec["raw"] = float(self.values[idx]), float(raw[idx])
            rows.append(rec)
        frame = pd.DataFrame(rows)
        for col in ("layer", "pos", "head"):
            frame[col] = frame[col].astype("Int64")
        return frame

    def top(self, n: int = 5) -> pd.DataFrame:
        """The ``n`` cells with the largest effect (by absolute value)."""
        frame = self.to_frame()
        return frame.loc[frame.value.abs().sort_values(ascending=False, kind="stable").index[:n]]

    def __repr__(self) -> str:
        dims = " × ".join(f"{a} {len(lab)}" for a, lab in zip(self.axes, self.labels))
        return (f"PatchResult({self.method} patching, grid {self.grid!r} ({dims}), metric {self.metric!r}, "
                f"clean {self.clean_value:.4g}, corrupt {self.corrupt_value:.4g})")


# ------------------------------------------------------------------------- setup


class PatchSetup:
    """A clean and a corrupt run of one metric, ready to be patched.

    Building one runs both inputs once (up to the metric's read layer), records the
    metric on each, and keeps the activations at every patchable site of every layer
    up to the read layer (:data:`SITE_HOOKS`; a few MB for a prompt of tens of
    tokens). :meth:`activation_patch` and :meth:`attribution_patch` then give one
    :class:`PatchResult` per grid; :meth:`patch` patches any set of sites at once.

    Args:
        clean, corrupt: user text, a :class:`~lens_roles.prompts.Prompt` (rendered
            with the chat template) or token ids; both must have the same length.
        metric: a :class:`Metric`.
        align: pad the shorter prompt with ``filler`` (:func:`align_prompts`) when the
            lengths differ, instead of raising.
        clean_context: a callable taking the prompt-position mask ``[row, pos]`` and
            returning a context manager to run the clean run in (how
            :func:`steering_setup` steers it).
        first_layer: the first layer of a grid by default (``steering_setup``:
            the layer after the steering).

    Raises:
        PatchingError: different token lengths (both token lists are named, and how
            to align them), or the same metric value on both runs (normalisation
            undefined).
    """

    def __init__(self, model, clean: PromptLike, corrupt: PromptLike, metric: Metric, *, align: bool = False,
                 filler: str = " .", template: str | None = None, prepend_bos: bool | None = None,
                 clean_context: Callable[[Tensor], ContextManager] | None = None, first_layer: int = 0,
                 meta: Mapping | None = None):
        if not isinstance(metric, Metric):
            raise PatchingError(f"metric must be a lens_roles.patching.Metric, got {type(metric).__name__}")
        self.model, self.metric = model, metric
        if model.tokenizer is not None:
            template = template or template_name(model.tokenizer)
            if prepend_bos is None:
                prepend_bos = default_prepend_bos(model, template)
        aligned = False
        if align and _as_prompt(clean, "clean") is not None and _as_prompt(corrupt, "corrupt") is not None:
            new = align_prompts(model, clean, corrupt, filler=filler, template=template, prepend_bos=prepend_bos)
            aligned = new != (_as_prompt(clean, "clean"), _as_prompt(corrupt, "corrupt"))
            clean, corrupt = new
        clean_ids = _ids_of(model, clean, "clean", template, prepend_bos)
        corrupt_ids = _ids_of(model, corrupt, "corrupt", template, prepend_bos)
        self.tokens, self.corrupt_tokens = _str_tokens(model, clean_ids), _str_tokens(model, corrupt_ids)
        if len(clean_ids) != len(corrupt_ids):
            text = _as_prompt(clean, "") is not None and _as_prompt(corrupt, "") is not None
            raise self._length_error(clean_ids, corrupt_ids, filler, text)
        self.clean_ids, self.corrupt_ids = tuple(clean_ids), tuple(corrupt_ids)
        self.n_prompt = len(clean_ids)
        self.read_layer = metric.read_layer(model)
        self.read_position = metric.read_position(self.n_prompt)
        self.first_layer = first_layer
        conts = metric.continuations(model)
        self.rows = len(conts)
        device = model.cfg.device
        pad = pad_id(model) if model.tokenizer is not None else 0
        self._inputs: dict[str, Int[Tensor, "row pos"]] = {
            kind: pad_batch([list(ids) + c for c in conts], pad)[0].to(device)
            for kind, ids in (("clean", clean_ids), ("corrupt", corrupt_ids))
        }
        width = self._inputs["clean"].shape[1]
        self.prompt_mask: Bool[Tensor, "row pos"] = torch.zeros(self.rows, width, dtype=torch.bool, device=device)
        self.prompt_mask[:, : self.n_prompt] = True
        self.site_names = [f"blocks.{layer}.{h}" for layer in range(self.read_layer + 1) for h in SITE_HOOKS]
        missing = [n for n in self.site_names if n not in model.hook_dict]
        if missing:
            raise PatchingError(f"{model.cfg.model_name} has no hook point {missing[0]!r}; it cannot be patched here")
        self._acts: dict[tuple[str, str], Tensor] = {}
        self._grads: dict[str, Tensor] | None = None
        self.clean_value = self._reference("clean", clean_context)
        self.corrupt_value = self._reference("corrupt", None)
        diff = self.clean_value - self.corrupt_value
        if not math.isfinite(diff) or abs(diff) <= 1e-5 * max(1.0, abs(self.clean_value), abs(self.corrupt_value)):
            raise PatchingError(
                f"clean and corrupt runs give the same {metric.label} ({self.clean_value:.6g} vs "
                f"{self.corrupt_value:.6g}), so normalised patching (0 = corrupt, 1 = clean) is undefined; "
                "choose prompts or a metric that tell the two runs apart"
            )

        def describe(x):
            p = _as_prompt(x, "")
            return {"system": p.system, "user": p.user, "reply": p.reply} if p is not None else "token ids"

        self.meta = {
            "model": model_id(model), "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
            "metric": metric.describe(), "read_layer": self.read_layer, "read_position": self.read_position,
            "clean": describe(clean), "corrupt": describe(corrupt), "aligned_with_filler": filler if aligned else None,
            "clean_tokens_hash": fingerprint(list(clean_ids)), "corrupt_tokens_hash": fingerprint(list(corrupt_ids)),
            "n_prompt_tokens": self.n_prompt, "template": template, "prepend_bos": prepend_bos,
            "clean_value": self.clean_value, "corrupt_value": self.corrupt_value,
            "normalisation": "(m(patched) - m(corrupt)) / (m(clean) - m(corrupt))",
            "patched_positions": "prompt tokens only (metric continuations are read, never patched)",
            "lens_roles": __version__, **dict(meta or {}),
        }

    # ---------------------------------------------------------------- runs
    def _length_error(self, clean_ids, corrupt_ids, filler, text: bool) -> PatchingError:
        first = next((i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b),
                     min(len(clean_ids), len(corrupt_ids)))
        fix = (f"pass align=True (CLI: --align), which appends {filler!r} to the shorter prompt's differing text "
               "until the lengths match (lens_roles.patching.align_prompts), or reword one prompt" if text else
               "pad or cut the token ids to one length (align=True only works on text and Prompt inputs)")
        return PatchingError(
            f"clean and corrupt prompts have different token lengths: clean {len(clean_ids)} tokens "
            f"{list(self.tokens)}, corrupt {len(corrupt_ids)} tokens {list(self.corrupt_tokens)} (they first differ "
            f"at position {first}). Patching swaps activations position by position, so the two runs must line up "
            f"token for token. Fix: {fix}"
        )

    def _forward(self, tokens: Tensor, **kw) -> Float[Tensor, "row pos d_model"]:
        if self.model.tokenizer is not None:
            kw.setdefault("padding_side", "right")  # no attention mask: right padding is exact for a causal model
        return self.model(tokens, stop_at_layer=self.read_layer + 1, **kw)

    @torch.no_grad()
    def _reference(self, kind: str, context) -> float:
        captured: dict[str, Tensor] = {}

        def capture(acts, hook):
            captured[hook.name] = acts.detach().clone()

        with contextlib.ExitStack() as stack:
            if context is not None:
                stack.enter_context(context(self.prompt_mask))
            stack.enter_context(self.model.hooks(fwd_hooks=[(name, capture) for name in self.site_names]))
            resid = self._forward(self._inputs[kind])
        for name, acts in captured.items():
            self._acts[kind, name] = acts
        return float(self.metric(self.model, resid, self.n_prompt).reshape(-1)[0])

    def normalise(self, raw):
        """``(raw − corrupt) / (clean − corrupt)`` (float64)."""
        if isinstance(raw, Tensor):
            raw = raw.double()
        return (raw - self.corrupt_value) / (self.clean_value - self.corrupt_value) + 0.0  # + 0.0: no -0.0

    # ---------------------------------------------------------- validation
    def _layer_of(self, name: str) -> int | None:
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit() and ".".join(parts[2:]) in SITE_HOOKS:
            return int(parts[1])
        return None

    def _late(self, what: str, layers: Sequence[int]) -> PatchingError:
        return PatchingError(
            f"the metric ({self.metric.label}) is read after layer {self.read_layer}, so it does not depend on "
            f"{what} at layer(s) {list(layers)}: patch layers up to {self.read_layer}, or read the metric later"
        )

    def _positions(self, positions) -> tuple[int, ...]:
        if positions is None or (isinstance(positions, str) and positions == "all"):
            return tuple(range(self.read_position + 1))
        if isinstance(positions, str):
            raise PatchingError(f"positions must be 'all' or token indices, got {positions!r}")
        out = []
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, int):
                raise PatchingError(f"position {p!r} is not an integer")
            if not -self.n_prompt <= p < self.n_prompt:
                raise PatchingError(f"position {p} is outside the prompt ({self.n_prompt} tokens); "
                                    "a metric's continuation tokens are read, never patched")
            p %= self.n_prompt
            if p > self.read_position:
                raise PatchingError(
                    f"the metric ({self.metric.label}) is read at position {self.read_position} "
                    f"({self.tokens[self.read_position]!r}); position {p} ({self.tokens[p]!r}) comes after it, "
                    "and a causal model cannot carry anything back to it"
                )
            out.append(p)
        if not out:
            raise PatchingError("no positions given")
        return tuple(sorted(set(out)))

    def _axes(self, grid: str, layers, positions, heads):
        spec = get_grid(grid)
        if layers is None:
            layers = tuple(range(self.first_layer, self.read_layer + 1))
            if not layers:
                raise PatchingError(f"no layer from {self.first_layer} to the metric's read layer {self.read_layer}")
        else:
            layers = validate_layers(self.model, layers)
            late = [layer for layer in layers if layer > self.read_layer]
            if late:
                raise self._late(spec.hook.format(layer="L"), late)
        positions = self._positions(positions)
        n_heads = self.model.cfg.n_heads
        if heads is None:
            heads = tuple(range(n_heads))
        else:
            heads = tuple(sorted({int(h) for h in ([heads] if isinstance(heads, int) else heads)}))
            bad = [h for h in heads if not 0 <= h < n_heads]
            if bad or not heads:
                raise PatchingError(f"heads {bad or list(heads)} are not in 0..{n_heads - 1}")
        return spec, layers, positions, heads

    def _cells(self, spec: Grid, layers, positions, heads):
        """``(index into values, layer, mask)`` per cell; masks are ``[pos]`` or ``[pos, head]`` bools."""
        width, device = self.prompt_mask.shape[1], self.model.cfg.device
        cells = []
        for li, layer in enumerate(layers):
            if spec.axes == ("layer", "pos"):
                for pi, p in enumerate(positions):
                    mask = torch.zeros(width, dtype=torch.bool, device=device)
                    mask[p] = True
                    cells.append(((li, pi), layer, mask))
            elif spec.axes == ("layer",):
                mask = torch.zeros(width, dtype=torch.bool, device=device)
                mask[list(positions)] = True
                cells.append(((li,), layer, mask))
            else:
                for hi, h in enumerate(heads):
                    mask = torch.zeros(width, self.model.cfg.n_heads, dtype=torch.bool, device=device)
                    mask[list(positions), h] = True
                    cells.append(((li, hi), layer, mask))
        return cells

    def _result(self, spec: Grid, method: str, values: Tensor, layers, positions, heads, **extra) -> PatchResult:
        labels = {"layer": tuple(layers), "pos": tuple(positions), "head": tuple(heads)}
        meta = dict(self.meta, grid=spec.name, hook=spec.hook, method=method, layers=list(layers),
                    positions=list(positions), **extra)
        if "head" in spec.axes:
            meta["heads"] = list(heads)
        return PatchResult(values=values, axes=spec.axes, labels=tuple(labels[a] for a in spec.axes),
                           grid=spec.name, method=method, metric=self.metric.label, clean_value=self.clean_value,
                           corrupt_value=self.corrupt_value, tokens=self.tokens, corrupt_tokens=self.corrupt_tokens,
                           positions=tuple(positions), meta=meta)

    # ------------------------------------------------------------ patching
    @torch.no_grad()
    def patch(self, sites: Mapping[str, object], *, normalise: bool = True) -> float:
        """Run the corrupt input with several sites patched at once; the (normalised) metric.

        Args:
            sites: hook name → ``"all"`` (every prompt position), a list of prompt
                positions, or a bool mask ``[pos]`` (``[pos, head]`` for ``attn.hook_z``)
                over the prompt's positions. ``{}`` patches nothing.

        Patching ``blocks.0.hook_resid_pre`` at all positions gives exactly 1.0, and
        patching nothing exactly 0.0: the runs are the reference runs bit for bit.
        """
        hooks = []
        width = self.prompt_mask.shape[1]
        for name, where in sites.items():
            if ("clean", name) not in self._acts:
                layer = self._layer_of(name)
                if layer is not None and layer < self.model.cfg.n_layers:
                    raise self._late(name, [layer])
                raise PatchingError(f"{name!r} is not a patchable site; use blocks.L.{{{', '.join(SITE_HOOKS)}}} "
                                    f"with L in 0..{self.read_layer}")
            clean = self._acts["clean", name]
            per_head = clean.ndim == 4
            if isinstance(where, Tensor) and where.dtype == torch.bool:
                expect = (self.n_prompt, clean.shape[2]) if per_head else (self.n_prompt,)
                if tuple(where.shape) != expect:
                    raise PatchingError(f"mask for {name} has shape {tuple(where.shape)}, expected {expect}")
                chosen = where.reshape(self.n_prompt, -1).any(-1).nonzero().flatten().tolist()
                if chosen:
                    self._positions(chosen)  # refuses positions after the metric's read position
                mask = torch.zeros((width, *expect[1:]), dtype=torch.bool, device=clean.device)
                mask[: self.n_prompt] = where.to(clean.device)
            else:
                positions = (tuple(range(self.n_prompt)) if isinstance(where, str) and where == "all"
                             else self._positions(where))
                mask = torch.zeros((width, *clean.shape[2:-1]), dtype=torch.bool, device=clean.device)
                mask[list(positions)] = True

            def hook(acts, hook, _m=mask[..., None], _c=clean):
                return torch.where(_m, _c, acts)

            hooks.append((name, hook))
        with self.model.hooks(fwd_hooks=hooks):
            resid = self._forward(self._inputs["corrupt"])
        raw = float(self.metric(self.model, resid, self.n_prompt).reshape(-1)[0])
        return float(self.normalise(raw)) if normalise else raw

    @torch.no_grad()
    def activation_patch(self, grid: str = "resid", *, layers=None, positions=None, heads=None,
                         batch_size: int = 32) -> PatchResult:
        """Activation patching over one grid (see :data:`GRIDS`), normalised 0 = corrupt, 1 = clean.

        Args:
            layers: layers of the grid (default: from ``first_layer`` to the metric's
                read layer); later layers are refused.
            positions: prompt positions (default: every position up to the metric's
                read position); per-layer and per-head grids patch them all at once.
            heads: heads of the ``heads`` grid (default: all).
            batch_size: cells per forward (each cell takes one row per continuation).
        """
        if batch_size < 1:
            raise PatchingError(f"batch_size must be >= 1, got {batch_size}")
        t0 = time.perf_counter()
        spec, layers, positions, heads = self._axes(grid, layers, positions, heads)
        shape = [len(layers)] + ([len(positions)] if "pos" in spec.axes else []) + (
            [len(heads)] if "head" in spec.axes else [])
        raw = torch.empty(shape, dtype=torch.float64)
        cells = self._cells(spec, layers, positions, heads)
        todo = []
        for index, layer, mask in cells:
            name = spec.hook.format(layer=layer)
            if torch.equal(self._acts["clean", name][:, mask], self._acts["corrupt", name][:, mask]):
                raw[index] = self.corrupt_value  # nothing to patch: exactly the corrupt run
            else:
                todo.append((index, layer, mask))
        forwards = 0
        # Cells are in layer order; a chunk may span a few layers and starts at its first one.
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            n, first = len(chunk), chunk[0][1]
            hooks = []
            for layer in sorted({c[1] for c in chunk}):
                name = spec.hook.format(layer=layer)
                masks = torch.stack([m if lay == layer else torch.zeros_like(m) for _, lay, m in chunk])
                masks = masks.repeat_interleave(self.rows, dim=0)[..., None]  # [cell·row, pos(, head), 1]
                clean = self._acts["clean", name]
                source = clean.repeat(n, *([1] * (clean.ndim - 1)))

                def hook(acts, hook, _m=masks, _c=source):
                    return torch.where(_m, _c, acts)

                hooks.append((name, hook))
            start = self._acts["corrupt", f"blocks.{first}.hook_resid_pre"].repeat(n, 1, 1)
            with self.model.hooks(fwd_hooks=hooks):
                resid = self._forward(start, start_at_layer=first)
            values = self.metric(self.model, resid, self.n_prompt).double().cpu()
            forwards += 1
            for (index, _, _), v in zip(chunk, values):
                raw[index] = v
        skipped = len(cells) - len(todo)
        return self._result(spec, "activation", self.normalise(raw), layers, positions, heads,
                            batch_size=batch_size, forwards=forwards, skipped_identical_cells=skipped,
                            seconds=time.perf_counter() - t0)

    def gradients(self) -> dict[str, Tensor]:
        """∂metric/∂activation on the corrupt run at every site, from one forward and one backward.

        Computed once per setup and shared by every attribution grid.
        """
        if self._grads is None:
            captured: dict[str, Tensor] = {}

            def leaf(acts, hook):  # put the run on the autograd tape even if the weights are frozen
                return acts.detach().requires_grad_(True)

            def capture(acts, hook):
                captured[hook.name] = acts

            hooks = [("hook_embed", leaf)] + [(name, capture) for name in self.site_names]
            with torch.enable_grad(), self.model.hooks(fwd_hooks=hooks):
                resid = self._forward(self._inputs["corrupt"])
                value = self.metric(self.model, resid, self.n_prompt).sum()
                grads = torch.autograd.grad(value, [captured[n] for n in self.site_names], allow_unused=True)
            self._grads = {
                name: (torch.zeros_like(captured[name]) if g is None else g.detach())
                for name, g in zip(self.site_names, grads)
            }
        return self._grads

    def attribution_patch(self, grid: str = "resid", *, layers=None, positions=None, heads=None) -> PatchResult:
        """Attribution patching over one grid: ``(clean − corrupt) · ∂m/∂a`` summed over each cell.

        Same arguments and normalisation as :meth:`activation_patch`.
        """
        t0 = time.perf_counter()
        spec, layers, positions, heads = self._axes(grid, layers, positions, heads)
        grads = self.gradients()
        pos = torch.tensor(positions, dtype=torch.long)
        rows = []
        for layer in layers:
            name = spec.hook.format(layer=layer)
            delta = (self._acts["clean", name] - self._acts["corrupt", name]).double()
            contrib = (delta * grads[name].double()).sum(-1).sum(0).cpu()[pos]  # [pos] or [pos, head]
            if spec.axes == ("layer", "pos"):
                rows.append(contrib)
            elif spec.axes == ("layer",):
                rows.append(contrib.sum())
            else:
                rows.append(contrib.sum(0)[list(heads)])
        values = torch.stack(rows) / (self.clean_value - self.corrupt_value)
        return self._result(spec, "attribution", values, layers, positions, heads,
                            seconds=time.perf_counter() - t0)

    def __repr__(self) -> str:
        return (f"PatchSetup({self.meta['model']}, {self.n_prompt} prompt tokens × {self.rows} row(s), "
                f"metric {self.metric.label!r}: clean {self.clean_value:.4g}, corrupt {self.corrupt_value:.4g})")


# --------------------------------------------------------------- entry points


def activation_patch(model, clean: PromptLike, corrupt: PromptLike, metric: Metric, grid: str = "resid", *,
                     layers=None, positions=None, heads=None, batch_size: int = 32, align: bool = False,
                     template: str | None = None, prepend_bos: bool | None = None) -> PatchResult:
    """Activation patching of one grid in one call (see :class:`PatchSetup` to run several grids)."""
    setup = PatchSetup(model, clean, corrupt, metric, align=align, template=template, prepend_bos=prepend_bos)
    return setup.activation_patch(grid, layers=layers, positions=positions, heads=heads, batch_size=batch_size)


def attribution_patch(model, clean: PromptLike, corrupt: PromptLike, metric: Metric, grid: str = "resid", *,
                      layers=None, positions=None, heads=None, align: bool = False, template: str | None = None,
                      prepend_bos: bool | None = None) -> PatchResult:
    """Attribution patching of one grid in one call (see :class:`PatchSetup` to run several grids)."""
    setup = PatchSetup(model, clean, corrupt, metric, align=align, template=template, prepend_bos=prepend_bos)
    return setup.attribution_patch(grid, layers=layers, positions=positions, heads=heads)


def steering_setup(model, prompt: PromptLike, direction: Direction, alpha: float, layer: int, metric: Metric, *,
                   relative: Mapping[int, float] | None = None, template: str | None = None,
                   prepend_bos: bool | None = None) -> PatchSetup:
    """A :class:`PatchSetup` for the steering effect: clean = steered, corrupt = unsteered.

    The clean run adds ``α·v_layer`` at ``blocks.{layer}.hook_resid_post`` over the
    prompt's positions (:func:`lens_roles.interventions.steer`; ``relative`` makes α a
    multiple of the typical norm). Patching a steered activation into the unsteered
    run measures how much of the steering effect on the metric flows through it.
    Grids default to the layers after ``layer``; every site at or before it is the
    same in both runs (exactly 0), and patching ``blocks.{layer+1}.hook_resid_pre`` at
    all positions restores the steered run (exactly 1).

    Raises:
        PatchingError: a metric read at or before the steering layer (nothing
            downstream of the steering could carry it).
    """
    from .interventions import steer

    layer = validate_layers(model, layer)[0]
    read = metric.read_layer(model)
    if read <= layer:
        raise PatchingError(
            f"the metric ({metric.label}) is read after layer {read}, but steering acts after layer {layer}: "
            "no component downstream of the steering can be patched; read the metric at a later layer"
        )

    def context(mask):
        return steer(model, direction, alpha, layers=[layer], positions=mask, relative=relative)

    info = {"steering": {"direction": direction.meta.get("name"), "layer": layer, "alpha": float(alpha),
                         "alpha_mode": "absolute" if relative is None else "relative", "positions": "prompt",
                         "convention": "clean = steered, corrupt = unsteered; steered activations patched in"}}
    return PatchSetup(model, prompt, prompt, metric, template=template, prepend_bos=prepend_bos,
                      clean_context=context, first_layer=layer + 1, meta=info)


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x @ y) / denom) if denom > 0 else float("nan")


def patch_agreement(activation: PatchResult | Sequence[PatchResult],
                    attribution: PatchResult | Sequence[PatchResult]) -> pd.DataFrame:
    """How well attribution patching matches activation patching, per grid.

    Returns ``grid, metric, cells, pearson, max_abs_diff`` (Pearson correlation over
    every cell of the grid).
    """
    acts = [activation] if isinstance(activation, PatchResult) else list(activation)
    attrs = {r.grid: r for r in ([attribution] if isinstance(attribution, PatchResult) else attribution)}
    rows = []
    for act in acts:
        att = attrs.get(act.grid)
        if att is None:
            raise PatchingError(f"no attribution result for grid {act.grid!r} (have {sorted(attrs)})")
        if act.labels != att.labels or act.positions != att.positions or act.metric != att.metric:
            raise PatchingError(f"grid {act.grid!r}: activation and attribution results cover different cells "
                                "or metrics; compute both from the same PatchSetup and arguments")
        rows.append({"grid": act.grid, "metric": act.metric, "cells": act.values.numel(),
                     "pearson": _pearson(act.values, att.values),
                     "max_abs_diff": float((act.values - att.values).abs().max())})
    return pd.DataFrame(rows)


__all__ = [
    "GRIDS", "Grid", "Metric", "DirectionProjection", "LogitDiff", "LogprobMargin", "PatchResult", "PatchSetup",
    "activation_patch", "attribution_patch", "steering_setup", "patch_agreement", "align_prompts", "final_logits",
    "get_grid",
]
