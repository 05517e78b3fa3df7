"""The families of patchable sites (grids), in TransformerLens's hook conventions."""

from __future__ import annotations

from dataclasses import dataclass

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
