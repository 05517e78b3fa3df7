"""One way to read activations out of a forward pass: :func:`capture`.

::

    with capture(model, [3, 5]) as cap:            # record blocks.{3,5}.hook_resid_post
        batch.forward(model, stop_at_layer=6)
    cap[3]                                         # [batch, pos, d_model]

A :class:`Capture` owns one recording hook per chosen layer at one hook point
(``hook_resid_post`` unless told otherwise). Each hook identifies its layer with
TransformerLens's ``HookPoint.layer()`` and hands the activations straight to a
*reduction* ``reduce(acts, weights, layer) -> value``; ``cap[layer]`` is the value of
the latest forward. The reduction runs inside the hook, so nothing bigger than
what it returns outlives the forward:

* :func:`keep` — the activations themselves ``[batch, pos, d_model]`` (the default);
* :func:`position_mean` — per row, the weighted sum over positions with the
  capture's ``weights`` ``[batch, pos]`` (``1/n`` at a row's ``n`` read positions, 0
  elsewhere: the mean over them), ``[batch, d_model]``;
* any function of the caller's (a running float64 sum, a cosine with a reference
  row, a norm ...), which may read ``weights`` too and may return None when it
  accumulates elsewhere.

``weights`` are the positions read in the current batch; whoever runs the batches
sets them before each forward (:func:`lens_roles.runtime.batching.run_batches`
does). Activations are detached unless ``grad=True`` (PSR training and SAE
attribution need gradients through what is captured). Recording hooks never
change the activations.

Hooks are attached only through ``model.hooks(fwd_hooks=...)``, which removes
exactly them when the block ends, also when the body or a hook raises. Captures
nest with interventions: hooks attached in an outer block run before the
capture's at the same point, so a capture inside ``steer(...)`` sees the steered
stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.errors import DataError

#: ``(acts [batch, pos, d_model], weights [batch, pos] or None, layer) -> value``
Reduce = Callable[[Tensor, Tensor | None, int], Any]


def keep(acts: Float[Tensor, "batch pos d_model"], weights: Tensor | None, layer: int
         ) -> Float[Tensor, "batch pos d_model"]:
    """The activations as they are (every position)."""
    return acts


def position_mean(acts: Float[Tensor, "batch pos d_model"], weights: Float[Tensor, "batch pos"] | None,
                  layer: int) -> Float[Tensor, "batch d_model"]:
    """Per row, ``Σ_p weights[b, p] · acts[b, p]``: the mean over the read positions when the
    weights are ``1/n`` at a row's ``n`` read positions (a one-hot row picks one position exactly).

    Raises:
        DataError: when the capture was given no weights for this batch.
    """
    if weights is None:
        raise DataError(f"position_mean at layer {layer} needs position weights [batch, pos]: set "
                        "Capture.weights before the forward (run_batches does)")
    return torch.einsum("bp,bpd->bd", weights.to(acts.dtype), acts)


class Capture:
    """Recording hooks at ``blocks.{layer}.{point}`` for each chosen layer; see the module docs.

    Attributes:
        layers: the recorded block indices, in the caller's order.
        point: the hook point within each block (``"hook_resid_post"``).
        reduce: the reduction applied in the hook.
        grad: keep the autograd graph (else the activations are detached first).
        weights: ``[batch, pos]`` position weights of the current batch, or None.
        values: per layer, the reduction of the latest forward.
    """

    def __init__(self, layers: Sequence[int], reduce: Reduce = keep, *, point: str = "hook_resid_post",
                 grad: bool = False, weights: Tensor | None = None):
        self.layers = tuple(int(layer) for layer in layers)
        if not self.layers:
            raise DataError("a capture needs at least one layer")
        self.point = point
        self.reduce = reduce
        self.grad = grad
        self.weights = weights
        self.values: dict[int, Any] = {}

    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.{self.point}" for layer in self.layers]

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        """The ``(hook name, fn)`` pairs to pass to ``model.hooks(fwd_hooks=...)``."""
        return [(name, self._record) for name in self.hook_names()]

    def _record(self, acts: Tensor, hook) -> None:
        layer = hook.layer()
        self.values[layer] = self.reduce(acts if self.grad else acts.detach(), self.weights, layer)

    @property
    def stop_at_layer(self) -> int:
        """The ``stop_at_layer`` that runs just the blocks this capture needs."""
        return max(self.layers) + 1

    def __getitem__(self, layer: int) -> Any:
        try:
            return self.values[layer]
        except KeyError:
            raise DataError(f"layer {layer} was not recorded (recorded: {sorted(self.values)}; captured: "
                            f"{list(self.layers)}); did the forward stop before it?") from None

    def stacked(self) -> Tensor:
        """The values of every layer stacked on a new first axis: ``[layer, ...]`` in ``layers`` order."""
        return torch.stack([self[layer] for layer in self.layers])


@contextmanager
def capture(model, layers: Sequence[int], reduce: Reduce = keep, *, point: str = "hook_resid_post",
            grad: bool = False, weights: Tensor | None = None) -> Iterator[Capture]:
    """Record ``layers`` at ``point`` during the block (see the module docs); yields the :class:`Capture`."""
    cap = Capture(layers, reduce, point=point, grad=grad, weights=weights)
    with model.hooks(fwd_hooks=cap.fwd_hooks()):
        yield cap
