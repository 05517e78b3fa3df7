"""Full-depth per-layer tables in ``.pt`` files: persona_vectors' ``*_avg_diff.pt`` and assistant-axis vectors.

* **persona-pt** (``persona_vectors/generate_vec.py``): ``torch.save`` of one float
  tensor ``[n_layers + 1, d_model]``, row ``k`` the mean difference of
  ``hidden_states[k]`` — row 0 the embeddings (our ``blocks.0.hook_resid_pre``, which a
  direction does not hold: it is left out, its norm kept in the provenance), row
  ``k + 1`` block ``k``'s output.
* **assistant-axis** (``pipeline/4_vectors.py`` / ``5_axis.py``): ``torch.save`` of a
  dict ``{"vector": [n_layers, d_model], "type": ..., "role": ...}`` per role (or
  ``{"axis": [n_layers, d_model], ...}`` for the axis itself, or a bare tensor), row
  ``k`` a forward hook on ``model.layers[k]``'s output: block ``k``.

Both hold every layer. Exporting a direction at some layers writes zeros at the
others, and reading leaves rows that are exactly zero out, so export → import gives
the same direction back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lens_roles.directions.direction import Direction
from lens_roles.directions.formats.common import (
    ModelShape,
    Rows,
    check_table,
    check_width,
    export_vectors,
    full_table,
    load_plain_torch,
    zero_rows_dropped,
)
from lens_roles.errors import DirectionError
from lens_roles.io import atomic_write


def _rows(path: Path, table: torch.Tensor, shift: int, extra: dict) -> Rows:
    """Rows ``shift ..`` of ``table`` as blocks ``0 ..``, zero rows left out."""
    table = table.detach().to("cpu", torch.float32)
    if not torch.isfinite(table).all():
        raise DirectionError(f"{path}: the table holds NaN or infinite values")
    layers, vectors, zeros = zero_rows_dropped(range(table.shape[0] - shift), table[shift:])
    if not layers:
        raise DirectionError(f"{path}: every block's row is zero; there is no direction in this file")
    return Rows(layers, tuple(v.clone() for v in vectors), {**extra, "zero_rows_left_out": zeros})


def read_persona_pt(path: Path, shape: ModelShape) -> Rows:
    """A persona_vectors ``[n_layers + 1, d_model]`` tensor as blocks ``0 .. n_layers - 1``.

    Raises:
        DirectionError: naming the file: not one float tensor ``[rows, d_model]``, fewer than 2 rows,
            not ``n_layers + 1`` rows for the model, or the wrong width.
    """
    table = load_plain_torch(path, "persona-vector file")
    rows = None if shape.n_layers is None else shape.n_layers + 1
    check_table(path, table, "a persona-vector file (one tensor [n_layers + 1, d_model], row 0 the embeddings)", rows)
    if table.shape[0] < 2:
        raise DirectionError(f"{path}: a persona-vector file has a row for the embeddings and one per block, "
                             f"[n_layers + 1, d_model]; got shape {tuple(table.shape)}")
    check_width(path, table.shape[1], shape)
    embeddings = float(table[0].float().norm())
    return _rows(path, table, 1, {"n_layers": table.shape[0] - 1, "embedding_row_norm_left_out": embeddings})


def write_persona_pt(direction: Direction, path: Path, *, n_layers: int, layers=None) -> Path:
    """Write ``[n_layers + 1, d_model]``: zeros in row 0 (embeddings) and at layers not exported."""
    table = full_table(export_vectors(direction, layers, "persona-pt"), n_layers, "persona-pt", 1)
    return atomic_write(path, lambda tmp: torch.save(table, tmp))


_TABLE_KEYS = ("vector", "axis")


def read_assistant_axis(path: Path, shape: ModelShape) -> Rows:
    """An assistant-axis vector (``{"vector": ...}``, ``{"axis": ...}`` or a tensor ``[n_layers, d_model]``).

    Raises:
        DirectionError: naming the file: neither a tensor nor a dict with ``vector`` / ``axis``,
            not ``[n_layers, d_model]`` for the model, or the wrong width.
    """
    data = load_plain_torch(path, "assistant-axis file")
    extra: dict = {}
    if isinstance(data, dict):
        key = next((k for k in _TABLE_KEYS if k in data), None)
        if key is None:
            raise DirectionError(f"{path}: an assistant-axis file holds 'vector' (a role) or 'axis' "
                                 f"[n_layers, d_model]; it has keys {sorted(map(str, data))[:8]}")
        extra = {k: data[k] for k in ("type", "role") if isinstance(data.get(k), (str, int, float))}
        extra["key"] = key
        data = data[key]
    check_table(path, data, "an assistant-axis vector ([n_layers, d_model])", shape.n_layers)
    check_width(path, data.shape[1], shape)
    return _rows(path, data, 0, {**extra, "n_layers": data.shape[0]})


def write_assistant_axis(direction: Direction, path: Path, *, n_layers: int, layers=None) -> Path:
    """Write ``{"vector": [n_layers, d_model], "type": "lens_roles", "role": name}`` (zeros at layers not exported)."""
    table = full_table(export_vectors(direction, layers, "assistant-axis"), n_layers, "assistant-axis", 0)
    data = {"vector": table, "type": "lens_roles", "role": str(direction.meta.get("name") or path.stem)}
    return atomic_write(path, lambda tmp: torch.save(data, tmp))
