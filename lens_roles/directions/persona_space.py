"""Persona space and the assistant axis (Lu et al., "The Assistant Axis", arXiv 2601.10387).

Inputs are activations read while the model *answers in* a persona (its reply tokens), one
:class:`~lens_roles.runtime.activations.Activations` per persona, collected with
``keep_per_prompt=True`` when held-out separation is wanted.

* A persona's **role vector** at a layer is the mean of its replies' activations there
  (``Activations.mean``, ``[layer, d_model]``).
* **Persona space** at a layer is the PCA of the role vectors of the role-playing personas
  (not the default assistant), centred on their mean: :func:`principal_components` gives the
  components and the fraction of variance each explains (fractions of all components sum to 1).
* The **assistant axis** (:func:`assistant_axis`) is the mean default-assistant activation minus
  the mean role-playing activation (every reply weighs equally on its side), a
  :class:`~lens_roles.directions.direction.Direction` built by
  :func:`~lens_roles.directions.builders.diff_in_means` with ``method="assistant_axis"``.
* PC1 is signed so that its cosine with the axis is >= 0, so "high on PC1" means "towards the
  default assistant" whenever the two agree; PC2 and PC3 are signed so that the persona farthest
  along each lies on its positive side.

:func:`persona_space` does all of it per layer and returns a :class:`PersonaSpace`, whose
``table()`` is the per-layer summary (variance of PC1..PC3, cosine of the axis with PC1,
where the default assistant sits on PC1, held-out AUC) and ``points()`` the coordinates of
every persona for the 3-D map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.directions.builders import diff_in_means
from lens_roles.directions.direction import Direction
from lens_roles.directions.separation import separation_auc
from lens_roles.errors import DataError, DirectionError
from lens_roles.runtime.activations import Activations


def principal_components(vectors: Float[Tensor, "role d_model"]
                         ) -> tuple[Float[Tensor, "component d_model"], Float[Tensor, " component"],
                                    Float[Tensor, " d_model"]]:
    """PCA of the rows of ``vectors`` (float64), centred on their mean.

    Returns ``(components, fractions, centre)``: the unit principal directions (rows, by
    decreasing variance, ``min(role, d_model)`` of them), the fraction of the total variance
    each explains (they sum to 1, or are all 0 when every row is the same), and the mean row.
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise DataError(f"PCA needs a [role, d_model] matrix of at least two rows, got {tuple(vectors.shape)}")
    x = vectors.double()
    centre = x.mean(0)
    _, s, vh = torch.linalg.svd(x - centre, full_matrices=False)
    total = (s**2).sum()
    fractions = s**2 / total if total > 0 else torch.zeros_like(s)
    return vh, fractions, centre


def pooled(sets: Sequence[Activations], name: str) -> Activations:
    """One :class:`Activations` whose mean is that of every prompt of ``sets`` (each prompt weighs
    equally), with the first set's provenance and a combined dataset entry."""
    if not sets:
        raise DataError(f"no activation sets to pool for {name}")
    layers = sets[0].layers
    bad = [i for i, a in enumerate(sets) if a.layers != layers]
    if bad:
        raise DataError(f"{name}: activation sets {bad} cover other layers than {list(layers)}")
    count = sum(a.count for a in sets)
    mean = sum(a.mean.double() * a.count for a in sets) / count
    rows = [a.per_prompt for a in sets]
    per_prompt = torch.cat(rows) if all(r is not None for r in rows) else None
    meta = dict(sets[0].meta, count=count, dataset=[a.meta.get("dataset") for a in sets])
    meta.pop("cache_key", None)
    return Activations(layers, mean, count, per_prompt, meta)


def assistant_axis(default: Sequence[Activations], roles: Sequence[Activations], **meta) -> Direction:
    """Mean default-assistant activation minus mean role-playing activation, per layer.

    Each side pools its sets' prompts (every reply weighs equally). ``meta`` is added to the
    direction's provenance (``name`` defaults to ``"assistant_axis"``).
    """
    info = {"name": "assistant_axis", "n_default_sets": len(default), "n_role_sets": len(roles)}
    info.update(meta)
    return diff_in_means(pooled(default, "default assistant"), pooled(roles, "role-playing personas"),
                         method="assistant_axis", **info)


@dataclass(frozen=True)
class PersonaSpace:
    """Persona space at each layer (see the module docs).

    Attributes:
        names: the role-playing personas, in the order of ``role_vectors``.
        default_names: the default-assistant points, in the order of ``default_vectors``.
        layers: block indices, the ``layer`` axis.
        role_vectors: ``[role, layer, d_model]`` float64 mean reply activation of each persona.
        default_vectors: ``[default, layer, d_model]`` float64, the same for the default assistant.
        axis: the assistant axis (:func:`assistant_axis`).
        components: ``[layer, component, d_model]`` float64 unit principal directions (signed as in
            the module docs), the first ``n_components``.
        fractions: ``[layer, component]`` fraction of variance of *every* component.
        centre: ``[layer, d_model]`` the role vectors' mean.
        auc: per layer, held-out AUC of default vs role replies projected on the axis (or None).
        auc_counts: how many held-out default and role replies that AUC compares.
        groups: persona name → group label; kinds: persona name → ``role``/``archetype``/``default``.
    """

    names: tuple[str, ...]
    default_names: tuple[str, ...]
    layers: tuple[int, ...]
    role_vectors: Tensor
    default_vectors: Tensor
    axis: Direction
    components: Tensor
    fractions: Tensor
    centre: Tensor
    auc: dict[int, float] | None = None
    auc_counts: tuple[int, int] = (0, 0)
    groups: Mapping[str, str] = field(default_factory=dict)
    kinds: Mapping[str, str] = field(default_factory=dict)

    def pc_direction(self, k: int = 1) -> Direction:
        """Principal component ``k`` (1-based) at every layer as a unit :class:`Direction`."""
        if not 1 <= k <= self.components.shape[1]:
            raise DirectionError(f"persona space keeps components 1..{self.components.shape[1]}, not {k}")
        meta = {key: v for key, v in self.axis.meta.items() if key not in ("raw_norms", "method", "name")}
        return Direction(self.layers, self.components[:, k - 1].float(),
                         dict(meta, method=f"persona_space_pc{k}", name=f"persona_pc{k}"))

    def coordinates(self, vectors: Float[Tensor, "point layer d_model"]) -> Float[Tensor, "point layer component"]:
        """Coordinates of ``vectors`` on the kept components, centred on the role vectors' mean."""
        return torch.einsum("pld,lkd->plk", vectors.double() - self.centre, self.components)

    def table(self) -> pd.DataFrame:
        """One row per layer: ``layer, var_pc1, var_pc2, var_pc3, var_total_kept, cos_axis_pc1,
        default_pc1, roles_pc1_min, roles_pc1_max, default_position, default_rank, n_roles, auc,
        auc_n_default, auc_n_roles`` (the held-out replies the AUC compares: few default ones make it coarse).

        ``default_pc1`` is the default assistant's coordinate on PC1 (the mean of its points),
        ``default_position`` where it falls in the roles' range (0 = the lowest role, 1 = the
        highest, beyond 1 past every role on the axis side), ``default_rank`` how many roles lie
        higher on PC1 than it (0: it is the extreme point on the axis side).
        """
        roles = self.coordinates(self.role_vectors)[..., 0]  # [role, layer]
        default = self.coordinates(self.default_vectors)[..., 0].mean(0)  # [layer]
        unit_axis = torch.stack([self.axis.unit(layer).double() for layer in self.layers])
        cos = (unit_axis * self.components[:, 0]).sum(-1)
        rows = []
        for j, layer in enumerate(self.layers):
            lo, hi = float(roles[:, j].min()), float(roles[:, j].max())
            d = float(default[j])
            row = {"layer": layer}
            for k in range(3):
                row[f"var_pc{k + 1}"] = float(self.fractions[j, k]) if k < self.fractions.shape[1] else 0.0
            row.update({
                "var_total_kept": float(self.fractions[j, : self.components.shape[1]].sum()),
                "cos_axis_pc1": float(cos[j]),
                "default_pc1": d,
                "roles_pc1_min": lo,
                "roles_pc1_max": hi,
                "default_position": (d - lo) / (hi - lo) if hi > lo else float("nan"),
                "default_rank": int((roles[:, j] > d).sum()),
                "n_roles": len(self.names),
                "auc": self.auc.get(layer, float("nan")) if self.auc else float("nan"),
                "auc_n_default": self.auc_counts[0],
                "auc_n_roles": self.auc_counts[1],
            })
            rows.append(row)
        return pd.DataFrame(rows)

    def points(self, colour: Direction | None = None) -> pd.DataFrame:
        """Every persona's coordinates: ``name, kind, group, layer, pc1, pc2, pc3, axis``.

        ``axis`` is the projection of the persona's vector on the unit axis (or on ``colour``, any
        direction of this model, e.g. a persona vector), minus that of the role vectors' mean, so
        0 is the average role.

        Raises:
            DirectionError: ``colour`` is from a model of another width, or lacks a layer.
        """
        direction = self.axis if colour is None else colour
        if direction.d_model != self.role_vectors.shape[-1]:
            raise DirectionError(f"the colouring direction {direction.meta.get('name', '')!r} has d_model "
                                 f"{direction.d_model}, but persona space was read from a model of width "
                                 f"{self.role_vectors.shape[-1]}; use a direction of the same model")
        missing = [layer for layer in self.layers if layer not in direction]
        if missing:
            raise DirectionError(f"the colouring direction has no layer(s) {missing} (it has {list(direction.layers)})")
        units = torch.stack([direction.unit(layer).double() for layer in self.layers])  # [layer, d_model]
        rows = []
        for names, vectors in ((self.names, self.role_vectors), (self.default_names, self.default_vectors)):
            coords = self.coordinates(vectors)
            proj = ((vectors.double() - self.centre) * units).sum(-1)  # [point, layer]
            for i, name in enumerate(names):
                for j, layer in enumerate(self.layers):
                    c = coords[i, j].tolist() + [0.0] * (3 - coords.shape[-1])
                    rows.append({"name": name, "kind": self.kinds.get(name, ""), "group": self.groups.get(name, ""),
                                 "layer": layer, "pc1": c[0], "pc2": c[1], "pc3": c[2], "axis": float(proj[i, j])})
        return pd.DataFrame(rows)


def persona_space(roles: Mapping[str, Activations], default: Mapping[str, Activations], *,
                  held_out: tuple[Mapping[str, Activations], Mapping[str, Activations]] | None = None,
                  n_components: int = 3, groups: Mapping[str, str] | None = None,
                  kinds: Mapping[str, str] | None = None, **meta) -> PersonaSpace:
    """Persona space, the assistant axis and (with ``held_out``) its held-out AUC, per layer.

    Args:
        roles: role-playing persona name → activations of its replies (the build questions).
        default: default-assistant point name → activations of its replies (the build questions).
        held_out: ``(roles, default)`` activations of replies to *other* questions, with
            ``per_prompt``: the axis's AUC separating default from role replies there
            (:func:`~lens_roles.directions.separation.separation_auc`).
        n_components: principal directions kept per layer (all fractions are kept).
        meta: added to the axis's provenance.

    Raises:
        DataError: fewer than two roles, no default point, or sets over different layers.
    """
    if len(roles) < 2:
        raise DataError(f"persona space needs at least two role-playing personas, got {len(roles)}")
    if not default:
        raise DataError("persona space needs at least one default-assistant point")
    if n_components < 1:
        raise DataError(f"n_components must be >= 1, got {n_components}")
    clash = sorted(set(roles) & set(default))
    if clash:
        raise DataError(f"persona name(s) {clash} are both a role and a default point")
    axis = assistant_axis(list(default.values()), list(roles.values()), **meta)
    layers = axis.layers
    role_vectors = torch.stack([a.mean.double() for a in roles.values()])
    default_vectors = torch.stack([a.mean.double() for a in default.values()])
    comps, fracs, centres = [], [], []
    for j, layer in enumerate(layers):
        vh, frac, centre = principal_components(role_vectors[:, j])
        vh = vh[:n_components].clone()
        if float(vh[0] @ axis.unit(layer).double()) < 0:
            vh[0] = -vh[0]
        coords = (role_vectors[:, j] - centre) @ vh.T
        for k in range(1, vh.shape[0]):
            if coords[coords[:, k].abs().argmax(), k] < 0:
                vh[k] = -vh[k]
        comps.append(vh)
        fracs.append(frac)
        centres.append(centre)
    width = min(f.shape[0] for f in fracs)
    keep = min(c.shape[0] for c in comps)
    auc, counts = None, (0, 0)
    if held_out is not None:
        held_roles, held_default = held_out
        frame = separation_auc(axis, list(held_default.values()), list(held_roles.values()))
        auc = dict(zip(frame.layer.tolist(), frame.value.tolist()))
        counts = (sum(a.count for a in held_default.values()), sum(a.count for a in held_roles.values()))
    all_kinds = {name: "role" for name in roles} | {name: "default" for name in default} | dict(kinds or {})
    return PersonaSpace(tuple(roles), tuple(default), layers, role_vectors, default_vectors, axis,
                        torch.stack([c[:keep] for c in comps]), torch.stack([f[:width] for f in fracs]),
                        torch.stack(centres), auc, counts, dict(groups or {}), all_kinds)
