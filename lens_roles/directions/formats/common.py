"""What every vector-file format shares: the layer conventions of the tools, the model a file must fit,
and the checks that turn a file's rows into a :class:`~lens_roles.directions.direction.Direction`.

Every tool numbers layers its own way, and none of the files says which way. The table
below (:data:`CONVENTIONS`) states, for each format, which of our layers a file's index
``k`` is; ours is always ``blocks.{layer}.hook_resid_post``, the output of block
``layer`` (0-based), which is ``transformers``' ``output_hidden_states[layer + 1]``.

=================  ==========================================  =======================  =====================
format             file index ``k``                            our layer                not expressible
=================  ==========================================  =======================  =====================
gguf (llama.cpp)   tensor ``direction.{k}``, added to the       ``k``                    layer 0 (no
                   output of block ``k`` (``l_out``)                                     ``direction.0``)
repeng             ``directions[k]`` (and ``direction.{k}``     ``k``                    —
                   in its ``.gguf``): ``model.layers[k]``
                   output, ``hidden_states[k + 1]``
steering-vectors   ``layer_activations[k]``, ``layer_type``     ``k``                    other layer types
                   ``"decoder_block"``: ``model.layers[k]``
                   output
persona-pt         row ``k`` of ``[n_layers + 1, d_model]``:    ``k − 1``                row 0 (embeddings)
                   ``hidden_states[k]``, row 0 = embeddings
assistant-axis     row ``k`` of ``[n_layers, d_model]``: a      ``k``                    —
                   forward hook on ``model.layers[k]``
npz / npy          key ``layer_{k}`` or row ``k``               ``k + layer_offset``     ``k + offset < 0``
=================  ==========================================  =======================  =====================

The llama.cpp row was measured, not only read: ``benchmarks/llama_cpp_agreement.py``
steers the default model's own GGUF in llama.cpp with ``direction.{k}`` and
``lens_roles`` at ``k − 1``, ``k`` and ``k + 1``; only ``k`` agrees.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from lens_roles.directions.direction import MAX_LAYERS, Direction
from lens_roles.errors import DirectionError
from lens_roles.io import read_bytes


@dataclass(frozen=True)
class Convention:
    """How one tool's files index layers.

    ``shift``: the file's index is ``our layer + shift`` (None: chosen per file, ``--layer-offset``).
    """

    format: str
    tool: str
    shift: int | None
    text: str


CONVENTIONS: dict[str, Convention] = {
    c.format: c
    for c in (
        Convention("gguf", "llama.cpp", 0,
                   "direction.{k} is added to the output of block k (l_out, 0-based) at every position; "
                   "= blocks.{k}.hook_resid_post; llama.cpp has no direction.0"),
        Convention("repeng", "repeng", 0,
                   "directions[k] / direction.{k} steers model.layers[k]'s output (hidden_states[k + 1]); "
                   "= blocks.{k}.hook_resid_post"),
        Convention("steering-vectors", "steering-vectors", 0,
                   "layer_activations[k] with layer_type 'decoder_block' is added to model.layers[k]'s output; "
                   "= blocks.{k}.hook_resid_post"),
        Convention("persona-pt", "persona_vectors", 1,
                   "row k of [n_layers + 1, d_model] is hidden_states[k]: row 0 the embeddings, row k + 1 "
                   "= blocks.{k}.hook_resid_post"),
        Convention("assistant-axis", "assistant-axis", 0,
                   "row k of [n_layers, d_model] is a forward hook on model.layers[k]'s output "
                   "= blocks.{k}.hook_resid_post"),
        Convention("npz", "numpy", None,
                   "row or key layer_{k} is blocks.{k + layer_offset}.hook_resid_post (layer_offset given)"),
    )
}


@dataclass(frozen=True)
class ModelShape:
    """The model a vector file must fit: its depth, width and name (None: not checked / not known)."""

    n_layers: int | None = None
    d_model: int | None = None
    name: str | None = None

    @classmethod
    def of(cls, model) -> "ModelShape":
        """The shape of a ``HookedTransformer`` (or anything with a ``cfg`` of the same fields)."""
        return cls(int(model.cfg.n_layers), int(model.cfg.d_model), str(model.cfg.model_name))

    def describe(self) -> str:
        return f"{self.name or 'the model'} ({self.n_layers} layers, d_model {self.d_model})"


@dataclass(frozen=True)
class Rows:
    """What a format reader found: our block indices, one float32 vector ``[d_model]`` each, and what the
    file said about itself (kept in the imported direction's provenance)."""

    layers: tuple[int, ...]
    vectors: tuple[Tensor, ...]
    extra: Mapping


def our_layer(path: Path, what: str, index: int, shift: int, shape: ModelShape) -> int:
    """Our block index for the file's index ``index`` (``index − shift``), checked against the model's depth.

    Raises:
        DirectionError: naming the file, the entry and the model, when the layer is negative or beyond
            the model's (or any model's) depth.
    """
    layer = index - shift
    limit = shape.n_layers if shape.n_layers is not None else MAX_LAYERS
    if not 0 <= layer < limit:
        where = f"{shape.describe()}, blocks 0..{limit - 1}" if shape.n_layers is not None else f"0..{limit - 1}"
        raise DirectionError(f"{path}: {what} is block {layer}, out of range ({where})")
    return layer


def as_vector(path: Path, what: str, value, width: int | None) -> Tensor:
    """``value`` as a float32 ``[d_model]`` tensor, checked: a 1-D float array, finite, of the file's width.

    Raises:
        DirectionError: naming the file and the entry at fault.
    """
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise DirectionError(f"{path}: {what} is not an array of numbers ({type(value).__name__})") from None
    if not t.is_floating_point():
        raise DirectionError(f"{path}: {what} holds {t.dtype}, not floating-point numbers")
    if t.ndim != 1 or t.shape[0] == 0:
        raise DirectionError(f"{path}: {what} has shape {tuple(t.shape)}; a direction is one vector [d_model]")
    if width is not None and t.shape[0] != width:
        raise DirectionError(f"{path}: {what} has width {t.shape[0]}, but {width} was expected")
    t = t.detach().to("cpu", torch.float32).clone()
    if not torch.isfinite(t).all():
        raise DirectionError(f"{path}: {what} holds NaN or infinite values")
    return t


def check_width(path: Path, width: int, shape: ModelShape) -> None:
    """Raise :class:`DirectionError` when the file's vectors are not as wide as the model's residual stream."""
    if shape.d_model is not None and width != shape.d_model:
        raise DirectionError(f"{path}: the vectors have width {width}, but {shape.describe()} needs "
                             f"{shape.d_model}; this file was made for another model")


def check_table(path: Path, table: Tensor, what: str, rows: int | None) -> None:
    """A per-layer table ``[rows, d_model]`` of floats: 2-D, the expected number of rows when known.

    Raises:
        DirectionError: naming the file, its shape and the shape expected.
    """
    if not isinstance(table, Tensor) or not table.is_floating_point() or table.ndim != 2:
        got = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise DirectionError(f"{path}: {what} must be a float tensor [rows, d_model], got {got}")
    if rows is not None and table.shape[0] != rows:
        raise DirectionError(f"{path}: {what} has shape {tuple(table.shape)}, but {rows} rows were expected "
                             f"for this model; it was made for a model of another depth")


def load_plain_torch(path: Path, what: str):
    """``torch.load`` of ``path`` with ``weights_only=True``: tensors, numbers, strings, lists and dicts only.

    Raises:
        DirectionError: naming the file, when it is missing or damaged, or holds any other
            pickled object (code would run to rebuild it, so it is refused).
    """
    data = read_bytes(path, what, DirectionError)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DirectionError(f"{path}: not a {what} of plain tensors: it pickles other objects, which are "
                             f"refused ({first[:200]})") from None
    except Exception as exc:  # torch raises many types for damaged archives
        raise DirectionError(f"{path} is not a readable {what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def zero_rows_dropped(layers: Sequence[int], table: Tensor) -> tuple[tuple[int, ...], tuple[Tensor, ...], list]:
    """``(layers, vectors, zero layers)`` of a full-depth table, leaving out rows that are exactly zero.

    The full-depth formats (persona-pt, assistant-axis) have a row for every layer; an
    export of a direction at some layers writes zeros at the others, which are no
    direction and are left out again here.
    """
    keep = [(layer, row) for layer, row in zip(layers, table) if bool(row.any())]
    zeros = [layer for layer, row in zip(layers, table) if not bool(row.any())]
    return tuple(k for k, _ in keep), tuple(r for _, r in keep), zeros


def export_vectors(direction: Direction, layers: Sequence[int] | None, fmt: str) -> dict[int, Tensor]:
    """``{layer: float32 [d_model]}`` of ``direction`` at ``layers`` (default: all), for writing as ``fmt``.

    Raises:
        DirectionError: a layer the direction lacks, or a direction read elsewhere than the block output.
    """
    hook = str(direction.meta.get("hook", "resid_post"))
    if hook not in ("resid_post", "blocks.{layer}.hook_resid_post"):
        raise DirectionError(f"this direction was read at {hook!r}; the {fmt} format holds block outputs "
                             "(blocks.{layer}.hook_resid_post) only")
    chosen = direction.layers if layers is None else tuple(layers)
    missing = [layer for layer in chosen if layer not in direction.layers]
    if missing:
        raise DirectionError(f"the direction has no vector at layer(s) {missing} (it has {list(direction.layers)})")
    if not chosen:
        raise DirectionError("no layers chosen to export")
    return {layer: direction[layer] for layer in chosen}


def full_table(vectors: Mapping[int, Tensor], n_layers: int, fmt: str, shift: int) -> Tensor:
    """``[n_layers + shift, d_model]`` with each vector at row ``layer + shift`` and zeros elsewhere.

    Raises:
        DirectionError: a layer beyond ``n_layers``.
    """
    beyond = [layer for layer in vectors if layer >= n_layers]
    if beyond:
        raise DirectionError(f"layer(s) {beyond} do not exist in a model of {n_layers} layers; "
                             f"give the model's depth for the {fmt} file")
    width = next(iter(vectors.values())).shape[0]
    table = torch.zeros(n_layers + shift, width, dtype=torch.float32)
    for layer, v in vectors.items():
        table[layer + shift] = v
    return table
