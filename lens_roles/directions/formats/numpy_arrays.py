"""Plain numpy vectors: ``.npy`` (one array) and ``.npz`` (named arrays), with an explicit layer offset.

numpy files carry no layer convention, so the caller states it: file index ``k`` is
our block ``k + layer_offset``. An ``.npy`` array is ``[rows, d_model]`` (row ``k``)
or one vector ``[d_model]`` (``k = 0``); an ``.npz`` holds ``layer_{k}`` vectors
``[d_model]`` (what :func:`write_npz` writes) or a single ``[rows, d_model]`` array.
Arrays of ``transformers``' ``hidden_states`` (row 0 the embeddings) take offset
``-1``; their embeddings row (block 0's input) is no block output and is left out,
its norm kept in the provenance. Object arrays (pickles) are refused.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from lens_roles.directions.direction import Direction
from lens_roles.directions.formats.common import ModelShape, Rows, as_vector, check_width, export_vectors, our_layer
from lens_roles.errors import DirectionError
from lens_roles.io import atomic_write, read_bytes

_KEY = re.compile(r"^layer_(\d+)$")


def _load(path: Path):
    data = read_bytes(path, "numpy file", DirectionError)
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            return {k: loaded[k] for k in loaded.files}
        return loaded
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DirectionError(f"{path}: holds pickled objects, which are refused; save plain float arrays") from None
        raise DirectionError(f"{path} is not a readable numpy file ({str(exc)[:200]})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DirectionError(f"{path} is not a readable numpy file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _entries(path: Path, loaded) -> list[tuple[int, str, np.ndarray]]:
    """``(file index, name, vector)`` for every vector in the file."""
    if isinstance(loaded, dict):
        if not loaded:
            raise DirectionError(f"{path}: the .npz file holds no arrays")
        keyed = {k: _KEY.match(k) for k in loaded}
        if all(keyed.values()):
            return sorted((int(m[1]), k, loaded[k]) for k, m in keyed.items())
        if len(loaded) == 1:
            (key, table), = loaded.items()
            return _table_entries(path, table, f"{key}")
        raise DirectionError(f"{path}: an .npz file holds layer_<k> vectors or one [rows, d_model] array; "
                             f"it has {sorted(loaded)[:8]}")
    return _table_entries(path, loaded, "the array")


def _table_entries(path: Path, table: np.ndarray, name: str) -> list[tuple[int, str, np.ndarray]]:
    if table.ndim == 1:
        return [(0, name, table)]
    if table.ndim != 2:
        raise DirectionError(f"{path}: {name} has shape {table.shape}; give [rows, d_model] or [d_model]")
    return [(k, f"{name}[{k}]", table[k]) for k in range(table.shape[0])]


def read_numpy(path: Path, shape: ModelShape, *, layer_offset: int) -> Rows:
    """The vectors of an ``.npy`` / ``.npz`` file, file index ``k`` at block ``k + layer_offset``.

    Raises:
        DirectionError: naming the file: unreadable, pickled, of the wrong shape, a layer beyond
            the model or below the embeddings, widths that differ from each other or the model.
    """
    entries = _entries(path, _load(path))
    layers, vectors, width, left_out = [], [], None, {}
    for index, name, value in entries:
        if value.dtype.kind not in "fiu":
            raise DirectionError(f"{path}: {name} holds {value.dtype}, not numbers")
        vector = as_vector(path, name, torch.from_numpy(np.asarray(value, dtype=np.float32)), width)
        width = vector.shape[0]
        if index + layer_offset == -1:  # the embeddings: block 0's input, no block output
            left_out[name] = float(vector.norm())
            continue
        layers.append(our_layer(path, f"{name} (layer offset {layer_offset:+d})", index, -layer_offset, shape))
        vectors.append(vector)
    if not layers:
        raise DirectionError(f"{path}: with layer offset {layer_offset:+d} no vector falls on a block output")
    if len(set(layers)) != len(layers):
        raise DirectionError(f"{path}: two vectors fall on the same layer")
    check_width(path, width, shape)
    order = sorted(range(len(layers)), key=layers.__getitem__)
    extra = {"layer_offset": layer_offset, "embeddings_left_out": left_out}
    return Rows(tuple(layers[i] for i in order), tuple(vectors[i] for i in order), extra)


def write_npz(direction: Direction, path: Path, *, layers=None, layer_offset: int = 0) -> Path:
    """Write ``layer_{layer - layer_offset}`` float32 vectors to an ``.npz`` file.

    Raises:
        DirectionError: a layer whose file index would be negative.
    """
    vectors = export_vectors(direction, layers, "npz")
    below = [layer for layer in vectors if layer - layer_offset < 0]
    if below:
        raise DirectionError(f"layer(s) {below} would get a negative index with layer offset {layer_offset:+d}")
    arrays = {f"layer_{layer - layer_offset}": v.numpy().astype(np.float32) for layer, v in sorted(vectors.items())}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)
