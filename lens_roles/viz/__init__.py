"""Figures: tidy frames in, plotly figures out (the only importer of plotly); HTML and PNG export.

One module per topic — ``directions``, ``steering``, ``roles``, ``patching``, ``psr``,
``sae`` — on one house ``style``; ``export.save_figure`` writes them. Nothing here
touches a model. Inside a Jupyter kernel, importing this package makes figures shown
in the notebook fit the pane (``style.notebook_display``); saved figures keep their size.
"""

from lens_roles.viz.directions import direction_profile, layer_heatmap, line_by_layer
from lens_roles.viz.export import find_browser, save_figure
from lens_roles.viz.patching import patch_heatmap, patch_scatter
from lens_roles.viz.persona import persona_map_3d, variance_explained
from lens_roles.viz.psr import psr_coherence_curve, token_heatmap
from lens_roles.viz.roles import (
    ab_curves,
    in_off_domain_bars,
    role_cosine_heatmap,
    role_domain_heatmap,
    role_map,
    selection_heatmap,
)
from lens_roles.viz.sae import attribution_check_scatter, decomposition_plot, sae_alignment_bars
from lens_roles.viz.steering import behaviour_vs_alpha, cosine_vs_alpha, steerability_heatmap
from lens_roles.viz.style import PALETTE, fit_to_pane, in_kernel, notebook_display, px_colors, style

if in_kernel():
    notebook_display()

__all__ = [
    "direction_profile",
    "layer_heatmap",
    "line_by_layer",
    "save_figure",
    "find_browser",
    "patch_heatmap",
    "patch_scatter",
    "psr_coherence_curve",
    "token_heatmap",
    "role_domain_heatmap",
    "in_off_domain_bars",
    "selection_heatmap",
    "ab_curves",
    "role_cosine_heatmap",
    "role_map",
    "sae_alignment_bars",
    "decomposition_plot",
    "attribution_check_scatter",
    "cosine_vs_alpha",
    "steerability_heatmap",
    "behaviour_vs_alpha",
    "style",
    "fit_to_pane",
    "notebook_display",
    "px_colors",
    "PALETTE",
    "persona_map_3d",
    "variance_explained",
]
