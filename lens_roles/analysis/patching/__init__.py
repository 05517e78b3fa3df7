"""Activation patching and attribution patching: which components carry a role.

Two runs of the same token length: *clean* (role-prompted, or steered) and
*corrupt* (baseline, or unsteered). **Activation patching** runs the corrupt input
with one activation replaced by its value in the clean run and reads a metric;
values are normalised so that 0 = corrupt and 1 = clean::

    value = (m(patched) − m(corrupt)) / (m(clean) − m(corrupt))

**Attribution patching** (Nanda 2023; Syed et al. 2023) replaces every patched run
by its first-order approximation around the corrupt run,
``m(patched) − m(corrupt) ≈ (a_clean − a_corrupt) · ∂m/∂a |corrupt``, for all sites
at once from one forward and one backward pass, normalised the same way.

Grids, in TransformerLens's conventions (``transformer_lens.patching``):

==========  ===============================  ==============  ==============================
grid        hook                             axes            one cell patches
==========  ===============================  ==============  ==============================
resid       ``blocks.{l}.hook_resid_pre``    layer × pos     the residual stream entering
                                                             block l at one position
attn        ``blocks.{l}.hook_attn_out``     layer           attention output, every
                                                             patched position at once
mlp         ``blocks.{l}.hook_mlp_out``      layer           MLP output, every patched
                                                             position at once
heads       ``blocks.{l}.attn.hook_z``       layer × head    one head's output (z), every
                                                             patched position at once
attn_pos    ``blocks.{l}.hook_attn_out``     layer × pos     attention output at one position
mlp_pos     ``blocks.{l}.hook_mlp_out``      layer × pos     MLP output at one position
==========  ===============================  ==============  ==============================

Metrics are small values (:class:`DirectionProjection`, :class:`LogprobMargin`,
:class:`LogitDiff`) that read the residual stream at the end of their *read layer*
and return one number per run. A metric appends continuation tokens to the prompt
when it scores them (one run row per continuation); only the prompt's positions
are ever patched, the continuation is read. Since a causal model's later layers
and positions cannot change an earlier read-out, sites after the metric's read
layer or read position are refused with a :class:`~lens_roles.errors.PatchingError`.

Speed: a :class:`PatchSetup` runs clean and corrupt once and keeps the activations
at every patchable site. Activation patching then batches many cells into one
forward (one cell per group of batch rows), starts that forward at the patched
layer from the cached corrupt residual stream (the layers before it cannot
change), stops at the metric's read layer, and skips cells whose clean and
corrupt activations are identical (e.g. positions before the first differing
token), whose value is exactly 0.

Patching the steering effect (:func:`steering_setup`): clean = the prompt with
``α·v`` added at ``blocks.{l}.hook_resid_post`` (prompt positions), corrupt = the
same prompt unsteered; patching steered activations into the unsteered run shows
which downstream components carry the change in the metric.
"""

from lens_roles.analysis.patching.grids import GRIDS, Grid, get_grid
from lens_roles.analysis.patching.inputs import align_prompts
from lens_roles.analysis.patching.metrics import DirectionProjection, LogitDiff, LogprobMargin, Metric
from lens_roles.analysis.patching.result import PatchResult, patch_agreement
from lens_roles.analysis.patching.runs import PatchSetup, activation_patch, attribution_patch, steering_setup

__all__ = [
    "GRIDS",
    "Grid",
    "get_grid",
    "Metric",
    "DirectionProjection",
    "LogitDiff",
    "LogprobMargin",
    "align_prompts",
    "PatchResult",
    "patch_agreement",
    "PatchSetup",
    "activation_patch",
    "attribution_patch",
    "steering_setup",
]
