"""Interventions on the residual stream (steering, ablation, clamping, PSR), as context managers
that never leave a hook behind."""

from lens_roles.interventions.steering import (
    ablate,
    ablate_then_add,
    ablation_hooks,
    clamp,
    intervene,
    projection,
    residual_norms,
    steer,
    steering_hooks,
)

__all__ = [
    "steer",
    "ablate",
    "clamp",
    "ablate_then_add",
    "intervene",
    "steering_hooks",
    "ablation_hooks",
    "residual_norms",
    "projection",
]
