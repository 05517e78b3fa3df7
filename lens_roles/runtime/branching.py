"""Branching a forward pass at the steered layer: the shared part runs once, each branch only the rest.

An intervention at ``blocks.{L}.hook_resid_post`` (activation addition, a
condition of a multiple-choice comparison, one multiplier of an A/B curve)
leaves blocks ``0..L`` exactly as in the unsteered run. A sweep over α values,
conditions or layers therefore needs the lower blocks only once per batch:

1. the *shared* run stops after block ``L`` (``stop_at_layer=L + 1``) with no
   intervention attached and keeps the residual ``resid_post`` of ``L``;
2. each *branch* attaches its hooks, passes that residual through the hook
   point ``blocks.{L}.hook_resid_post`` (so the hooks there act on it, exactly as
   inside the block) and continues with ``model(x, start_at_layer=L + 1, ...)``,
   with the same attention mask (and, under prefix sharing, the same keys and
   values below ``L``) as the full run. :func:`forward_from` is that second step.

A branch is a :class:`Branch`: the layer it starts at and its ``(hook name, fn)``
pairs, which may touch only ``blocks.{layer}.hook_resid_post`` and hook points of
later blocks (:func:`check_branch` says so before anything runs). A branch with
no hooks at the last layer is the unsteered run itself.

The arithmetic of every block is that of the unbranched run: results agree bit
for bit where the batch composition is the same, and to float rounding where
it differs (a matrix product over more rows may sum in another order).

:func:`branch_batch` branches one right-padded :class:`~lens_roles.runtime.batching.Batch`;
:func:`lens_roles.runtime.batching.run_branched` does the same through the
shared-prefix KV cache. Models with shortformer positional embeddings (which
need the positional embedding again at every block) are run in full per branch
(:func:`can_branch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from jaxtyping import Float
from torch import Tensor

from lens_roles.errors import DataError
from lens_roles.runtime.capture import capture
from lens_roles.runtime.models import resid_hook


@dataclass(frozen=True)
class Branch:
    """One branch of a branched run.

    Attributes:
        layer: the block whose ``hook_resid_post`` is the first point the hooks
            touch; blocks ``0..layer`` are shared with every other branch.
        hooks: ``(hook name, fn)`` pairs attached while the branch runs.
    """

    layer: int
    hooks: tuple = ()


def can_branch(model) -> bool:
    """Whether a forward can resume from a residual (every positional scheme but shortformer's)."""
    return model.cfg.positional_embedding_type != "shortformer"


def unsteered(model) -> Branch:
    """The branch with no intervention: it shares every block (its "rest" is the last hook point alone)."""
    return Branch(model.cfg.n_layers - 1)


def check_branch(model, branch: Branch) -> Branch:
    """``branch`` with its layer made non-negative, after checking its hooks can run in a branch.

    Raises:
        DataError: the layer is out of range, or a hook sits at a point the
            branch does not run (below its layer, or in its layer before
            ``hook_resid_post``).
    """
    n = model.cfg.n_layers
    if not isinstance(branch.layer, int) or not -n <= branch.layer < n:
        raise DataError(f"branch layer {branch.layer!r} is out of range for a model with {n} layers")
    layer = branch.layer % n
    start = resid_hook(layer)
    if model.hook_dict[start].fwd_hooks:
        raise DataError(f"{start} already has hooks attached: a branched run attaches each branch's own hooks; "
                        "pass the intervention as a branch instead of wrapping the run in it")
    for name, _ in branch.hooks:
        point = model.hook_dict.get(name)
        if point is None:
            raise DataError(f"branch at layer {layer}: the model has no hook point {name!r}")
        if name == start:
            continue
        try:
            later = point.layer() > layer
        except (ValueError, IndexError):  # a point outside the blocks (embedding, final norm, unembedding)
            later = False
        if not later:
            raise DataError(f"branch at layer {layer} cannot run a hook at {name!r}: a branch runs only {start} "
                            f"and the blocks after layer {layer}; branch at an earlier layer")
    return Branch(layer, tuple(branch.hooks))


def forward_from(model, resid: Float[Tensor, "batch pos d_model"], layer: int, *, attention_mask: Tensor,
                 past_kv_cache=None, stop_at_layer: int | None = None):
    """Continue a forward from ``resid``, the unhooked ``blocks.{layer}.hook_resid_post`` of a shared run.

    The hooks attached at ``blocks.{layer}.hook_resid_post`` act on ``resid`` first
    (the hook point is called as the block would), then blocks ``layer + 1 ..``
    run with ``attention_mask`` (``[batch, past + pos]``: the full mask, keys and
    values of ``past_kv_cache`` included) — the same call as ``model(tokens, ...)``
    from there on: logits ``[batch, pos, d_vocab]``, or the residual when
    ``stop_at_layer`` is given.
    """
    x = model.blocks[layer].hook_resid_post(resid)
    return model(x, start_at_layer=layer + 1, attention_mask=attention_mask, past_kv_cache=past_kv_cache,
                 stop_at_layer=stop_at_layer)


@dataclass(frozen=True)
class Shared:
    """The shared part of a branched run over one batch.

    Attributes:
        resid: per branch layer, ``resid_post`` ``[batch, pos, d_model]`` of the unhooked run.
        batch: the :class:`~lens_roles.runtime.batching.Batch` it ran.
    """

    resid: dict
    batch: object


def shared_run(model, batch, layers: Sequence[int]) -> Shared:
    """Run ``batch`` once, unhooked, to the deepest of ``layers``, keeping ``resid_post`` at each of them."""
    layers = sorted({int(layer) % model.cfg.n_layers for layer in layers})
    if not can_branch(model):
        return Shared({}, batch)
    with capture(model, layers) as cap:
        batch.forward(model, stop_at_layer=cap.stop_at_layer)
    return Shared({layer: cap[layer] for layer in layers}, batch)


def branch_batch(model, shared: Shared, branch: Branch, *, stop_at_layer: int | None = None,
                 extra_hooks: Sequence = ()):
    """One branch of ``shared``'s batch: its hooks (and ``extra_hooks``, e.g. a capture) attached,
    the rest of the forward run from the shared residual. Returns what ``batch.forward`` would."""
    hooks = list(branch.hooks) + list(extra_hooks)
    with model.hooks(fwd_hooks=hooks):
        if branch.layer not in shared.resid:  # no resumable residual: the whole forward (see can_branch)
            return shared.batch.forward(model, stop_at_layer=stop_at_layer)
        return forward_from(model, shared.resid[branch.layer], branch.layer, attention_mask=shared.batch.mask,
                            stop_at_layer=stop_at_layer)


def branched_batches(model, batches, branches: Sequence[Branch], *, keep: Sequence[int] = ()
                     ) -> Iterator[tuple[object, Callable, dict]]:
    """For each batch of ``batches``: ``(batch, run, resid)``.

    ``run(b, **kw)`` is :func:`branch_batch` of branch ``b``; ``resid`` maps each
    branch layer and each layer of ``keep`` to the unhooked run's ``resid_post``
    ``[batch, pos, d_model]`` there (``keep`` deeper than every branch makes the
    shared run go that deep). The shared run goes to the deepest of those layers
    once per batch; the branches are checked before the first batch runs.
    """
    branches = [check_branch(model, b) for b in branches]
    if not branches:
        raise DataError("no branches to run")
    layers = [b.layer for b in branches] + [int(k) % model.cfg.n_layers for k in keep]
    for batch in batches:
        shared = shared_run(model, batch, layers)

        def run(b: int, _shared=shared, **kw):
            return branch_batch(model, _shared, branches[b], **kw)

        yield batch, run, shared.resid
