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

**Integrated-gradients attribution** (``attribution_patch(grid, method="ig", steps=K)``;
Sundararajan et al. 2017, as in EAP-IG, Hanna et al. 2024, and the IG of Marks et al. 2024)
averages that gradient over ``K`` runs along the straight path between the two runs: run
``k`` starts from the residual stream ``corrupt + (k/K)·(clean − corrupt)`` entering the
first layer (from layer 0: the token embeddings) and every site's gradient is read on
the way back, ``Δa · mean_k ∂m/∂a``. All grids share the ``K`` forwards and backwards
(batched), and ``K = 1`` is plain attribution patching. Where the clean/corrupt change
is large and non-linear (a swapped role word in the early residual stream and MLPs)
plain attribution misjudges the effect and IG tracks activation patching (see
``benchmarks/patch.py`` for the correlations on notebook 03's setups).

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
from lens_roles.analysis.patching.runs import (
    ATTRIBUTION_METHODS,
    IG_STEPS,
    PatchSetup,
    activation_patch,
    attribution_patch,
    steering_setup,
)

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
    "ATTRIBUTION_METHODS",
    "IG_STEPS",
    "activation_patch",
    "attribution_patch",
    "steering_setup",
]
