"""Geometry of a family of role vectors: which roles share a direction, and where.

* :func:`cosine_matrix` — cosine similarity of every pair of roles, per layer;
* :func:`role_map` — a 2-D projection of the roles at one layer (PCA of their
  unit vectors, centred on the roles' mean so that the direction every role
  shares — "any expert" vs the baseline — does not dominate the picture);
* :func:`nearest_roles` — for each role, the most similar other role per layer;
* :func:`mean_offdiagonal_cosine` — per layer, how much the roles share.

Per-layer signal strength (held-out AUC of role vs baseline projections) is
:func:`lens_roles.directions.separation.separation_auc`; the demo draws it for every role.
All functions take ``{role: Direction}`` and return tidy DataFrames.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError


def _stack(directions: Mapping[str, Direction], layer: int) -> torch.Tensor:
    """Unit vectors of every role at ``layer``: ``[role, d_model]``."""
    missing = [name for name, d in directions.items() if layer not in d]
    if missing:
        raise DirectionError(f"role vector(s) {', '.join(missing)} have no layer {layer}")
    return torch.stack([d.unit(layer).double() for d in directions.values()])


def _layers(directions: Mapping[str, Direction], layers: Sequence[int] | None) -> list[int]:
    if len(directions) < 2:
        raise DirectionError(f"role geometry needs at least two role vectors, got {len(directions)}")
    widths = {d.d_model for d in directions.values()}
    if len(widths) > 1:
        raise DirectionError(f"role vectors of different widths: {sorted(widths)}")
    common = sorted(set.intersection(*(set(d.layers) for d in directions.values())))
    return list(layers) if layers is not None else common


def cosine_matrix(directions: Mapping[str, Direction], layers: Sequence[int] | None = None, *,
                  centre: bool = False) -> pd.DataFrame:
    """Cosine of every ordered pair of roles per layer: ``role_a, role_b, layer, value``.

    With ``centre``, the roles' mean unit vector is subtracted first: role vectors
    share a large common component (any expert's instruction vs a generic one), and
    centring shows which roles resemble each other beyond it.
    """
    names = list(directions)
    rows = []
    for layer in _layers(directions, layers):
        units = _stack(directions, layer)
        if centre:
            units = units - units.mean(0, keepdim=True)
            units = units / units.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (units @ units.T).tolist()
        rows += [{"role_a": a, "role_b": b, "layer": layer, "value": cos[i][j]}
                 for i, a in enumerate(names) for j, b in enumerate(names)]
    return pd.DataFrame(rows)


def mean_offdiagonal_cosine(cosines: pd.DataFrame) -> pd.DataFrame:
    """Per layer, the mean cosine between distinct roles: ``layer, metric, value``."""
    off = cosines[cosines.role_a != cosines.role_b]
    out = off.groupby("layer", as_index=False)["value"].mean()
    return out.assign(metric="mean_pairwise_cosine")[["layer", "metric", "value"]]


def nearest_roles(cosines: pd.DataFrame) -> pd.DataFrame:
    """For each role and layer, its most similar other role: ``role, layer, nearest, value``."""
    off = cosines[cosines.role_a != cosines.role_b]
    idx = off.groupby(["role_a", "layer"])["value"].idxmax()
    best = off.loc[idx]
    return best.rename(columns={"role_a": "role", "role_b": "nearest"})[["role", "layer", "nearest", "value"]] \
        .reset_index(drop=True)


def role_map(directions: Mapping[str, Direction], layer: int, *, groups: Mapping[str, str] | None = None,
             centre: bool = True) -> pd.DataFrame:
    """2-D PCA coordinates of the roles' unit vectors at ``layer``.

    Args:
        groups: role → label (e.g. its question domain), carried as column ``group``.
        centre: subtract the mean unit vector first (see the module docs).

    Returns ``role, layer, x, y, group``; ``frame.attrs["explained_variance"]`` holds
    the fraction of variance on each of the two axes.
    """
    _layers(directions, [layer])
    units = _stack(directions, layer)
    if centre:
        units = units - units.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(units, full_matrices=False)
    coords = units @ vh[:2].T  # [role, 2]
    # a deterministic sign: the role farthest along each axis is on its positive side
    for k in range(coords.shape[1]):
        if coords[coords[:, k].abs().argmax(), k] < 0:
            coords[:, k] = -coords[:, k]
    var = (s**2 / (s**2).sum()).tolist()
    groups = groups or {}
    frame = pd.DataFrame({"role": list(directions), "layer": layer, "x": coords[:, 0].tolist(),
                          "y": coords[:, 1].tolist(), "group": [groups.get(r) for r in directions]})
    frame.attrs["explained_variance"] = var[:2]
    return frame
