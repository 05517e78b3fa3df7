"""Directions: the :class:`Direction` value, the builders that make one from activations, role
geometry and separation measures."""

from lens_roles.directions.builders import (
    diff_in_means,
    pca_direction,
    persona_vector,
    probe_direction,
    role_vector,
    role_vectors,
)
from lens_roles.directions.direction import Direction
from lens_roles.directions.persona_space import PersonaSpace, assistant_axis, persona_space, principal_components
from lens_roles.directions.geometry import cosine_matrix, mean_offdiagonal_cosine, nearest_roles, role_map
from lens_roles.directions.separation import roc_auc, separation_auc, split_half_agreement

__all__ = [
    "Direction",
    "diff_in_means",
    "role_vector",
    "role_vectors",
    "persona_vector",
    "pca_direction",
    "probe_direction",
    "roc_auc",
    "separation_auc",
    "split_half_agreement",
    "cosine_matrix",
    "role_map",
    "nearest_roles",
    "mean_offdiagonal_cosine",
    "PersonaSpace",
    "assistant_axis",
    "persona_space",
    "principal_components",
]
