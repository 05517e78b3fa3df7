"""Vectors that travel: a :class:`~lens_roles.directions.direction.Direction` read from and written to the files
of other tools, with each tool's layer numbering stated (see :mod:`lens_roles.directions.formats.common`).

``import_direction(path, fmt, model=...)`` checks the file against the model (width,
depth) when one is given and records ``{"source": tool, "format": fmt, "convention":
...}`` in the direction's provenance; ``export_direction(direction, path, fmt)``
writes it atomically. Formats: ``gguf`` (llama.cpp control vector), ``repeng``
(its ``.gguf``), ``steering-vectors``, ``persona-pt``, ``assistant-axis``, ``npz``
(also reads ``.npy``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lens_roles.directions.direction import Direction
from lens_roles.directions.formats.common import CONVENTIONS, Convention, ModelShape, Rows
from lens_roles.directions.formats.control_vector import read_control_vector, write_control_vector
from lens_roles.directions.formats.layer_tables import (
    read_assistant_axis,
    read_persona_pt,
    write_assistant_axis,
    write_persona_pt,
)
from lens_roles.directions.formats.numpy_arrays import read_numpy, write_npz
from lens_roles.directions.formats.steering_vectors import read_steering_vector, write_steering_vector
from lens_roles.errors import DirectionError

FORMATS = tuple(CONVENTIONS)
#: formats whose file holds every layer, so writing one needs the model's depth
FULL_DEPTH = ("persona-pt", "assistant-axis")


def _shape(model) -> ModelShape:
    if model is None:
        return ModelShape()
    return model if isinstance(model, ModelShape) else ModelShape.of(model)


def _check_format(fmt: str) -> Convention:
    if fmt not in CONVENTIONS:
        raise DirectionError(f"unknown vector format {fmt!r}; use one of {', '.join(FORMATS)}")
    return CONVENTIONS[fmt]


def read_rows(path: str | Path, fmt: str, shape: ModelShape, *, layer_offset: int | None = None) -> Rows:
    """The layers and vectors of a ``fmt`` file (see :func:`import_direction`)."""
    _check_format(fmt)
    path = Path(path)
    if fmt == "npz":
        if layer_offset is None:
            raise DirectionError("numpy files say nothing about layers: give the layer offset (--layer-offset; "
                                 "0 when row k is block k's output, -1 for hidden_states with the embeddings first)")
        return read_numpy(path, shape, layer_offset=layer_offset)
    if layer_offset is not None:
        raise DirectionError(f"the {fmt} format has a fixed layer convention; --layer-offset is for npz only")
    if fmt in ("gguf", "repeng"):
        return read_control_vector(path, shape, allow_layer_zero=fmt == "repeng")
    if fmt == "steering-vectors":
        return read_steering_vector(path, shape)
    if fmt == "persona-pt":
        return read_persona_pt(path, shape)
    return read_assistant_axis(path, shape)


def import_direction(path: str | Path, fmt: str, *, model=None, layer_offset: int | None = None) -> Direction:
    """Read a ``fmt`` file as a :class:`Direction` on ``blocks.{layer}.hook_resid_post``.

    Args:
        model: a ``HookedTransformer`` or :class:`ModelShape`: the file must fit its width and
            depth, and the direction is recorded as that model's (None: nothing checked but the file).
        layer_offset: npz only, required there: file index ``k`` is block ``k + layer_offset``.

    Raises:
        DirectionError: naming the file and what does not fit.
    """
    convention = _check_format(fmt)
    shape = _shape(model)
    path = Path(path)
    rows = read_rows(path, fmt, shape, layer_offset=layer_offset)
    meta = {
        "name": path.stem,
        "model": shape.name,
        "hook": "resid_post",
        "method": f"imported ({convention.tool})",
        "source": convention.tool,
        "format": fmt,
        "convention": convention.text,
        "source_file": str(path),
        "source_info": dict(rows.extra),
    }
    return Direction(rows.layers, torch.stack(rows.vectors), meta)


def export_direction(direction: Direction, path: str | Path, fmt: str, *, layers=None, n_layers: int | None = None,
                     layer_offset: int = 0, model_hint: str | None = None) -> Path:
    """Write ``direction`` (at ``layers``, default all) as a ``fmt`` file, atomically.

    Args:
        n_layers: the model's depth; required by the full-depth formats (persona-pt, assistant-axis).
        layer_offset: npz only: layer ``l`` is written as ``layer_{l - layer_offset}``.
        model_hint: gguf / repeng only: ``controlvector.model_hint`` (default: the direction's model).

    Raises:
        DirectionError: a layer the format cannot hold (0 for llama.cpp), a layer the direction
            lacks, a missing depth.
    """
    _check_format(fmt)
    path = Path(path)
    if fmt in ("gguf", "repeng"):
        return write_control_vector(direction, path, layers=layers, model_hint=model_hint,
                                    allow_layer_zero=fmt == "repeng", fmt=fmt)
    if fmt == "steering-vectors":
        return write_steering_vector(direction, path, layers=layers)
    if fmt == "npz":
        return write_npz(direction, path, layers=layers, layer_offset=layer_offset)
    if n_layers is None:
        raise DirectionError(f"a {fmt} file holds a row for every layer: give the model's depth (--n-layers)")
    if fmt == "persona-pt":
        return write_persona_pt(direction, path, n_layers=n_layers, layers=layers)
    return write_assistant_axis(direction, path, n_layers=n_layers, layers=layers)


__all__ = ["CONVENTIONS", "FORMATS", "FULL_DEPTH", "ModelShape", "import_direction", "export_direction", "read_rows"]
