"""Runtime: loading models, batching, capturing activations, reading out logits, generating."""

from lens_roles.runtime.activations import Activations, collect, collect_sets, residual_rows
from lens_roles.runtime.capture import Capture, capture
from lens_roles.runtime.generation import Generation, generate
from lens_roles.runtime.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    load_hf_model,
    load_model,
    resid_hook,
    validate_layers,
)
from lens_roles.runtime.readout import final_logits, kl_divergence, logprobs_at

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "load_model",
    "load_hf_model",
    "resid_hook",
    "validate_layers",
    "Activations",
    "collect",
    "collect_sets",
    "residual_rows",
    "Capture",
    "capture",
    "Generation",
    "generate",
    "final_logits",
    "logprobs_at",
    "kl_divergence",
]
