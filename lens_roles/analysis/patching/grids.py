"""The families of patchable sites (grids), in TransformerLens's hook conventions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lens_roles.errors import PatchingError


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


def site_layer(name: str) -> int | None:
    """The layer of a patchable hook name (``blocks.{L}.<site>``, site in :data:`SITE_HOOKS`), else None."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit() and ".".join(parts[2:]) in SITE_HOOKS:
        return int(parts[1])
    return None


def grid_cells(spec: Grid, layers: Sequence[int], positions: Sequence[int], heads: Sequence[int], *, width: int,
               n_heads: int, device) -> list[tuple[tuple[int, ...], int, Tensor]]:
    """The cells of a grid: ``(index into the result's values, layer, mask)`` each.

    A mask is ``[pos]`` (``[pos, head]`` for the heads grid) over ``width`` token
    columns, True where the cell patches: one position (``layer × pos`` grids),
    every given position (per-layer grids), or every given position of one head.
    """
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
                mask = torch.zeros(width, n_heads, dtype=torch.bool, device=device)
                mask[list(positions), h] = True
                cells.append(((li, hi), layer, mask))
    return cells
