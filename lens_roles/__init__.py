"""lens_roles: find, measure and use role and persona directions in language models.

The public API, in the order of the data flow::

    model = load_model()                                   # models
    pairs = load_pairs("librarian")                        # prompts (a shipped set, or any path)
    persona = persona_vector(model, pairs)                 # directions (via activations)
    role = role_vector(model, load_role("chemist"), load_baseline())
    persona.save("librarian.safetensors"); Direction.load("librarian.safetensors")
    sae = load_sae(data_dir() / "saes" / "layer_12")       # sae (shipped sae_lens SAEs; inputs.prompts.data_dir)
    feature_alignment(sae, persona, top=10)                # features (alignment, decomposition, attribution)
"""

from lens_roles._version import __version__
from lens_roles.analysis.patching.inputs import align_prompts
from lens_roles.analysis.patching.metrics import DirectionProjection, LogitDiff, LogprobMargin
from lens_roles.analysis.patching.result import PatchResult, patch_agreement
from lens_roles.analysis.patching.runs import PatchSetup, activation_patch, attribution_patch, steering_setup
from lens_roles.analysis.sae.cards import feature_cards, write_cards
from lens_roles.analysis.sae.core import check_sae, load_sae, spliced
from lens_roles.analysis.sae.corpus import Corpus, build_corpus
from lens_roles.analysis.sae.features import (
    ProjectionMetric,
    ablation_check,
    attribute_features,
    decompose,
    feature_alignment,
)
from lens_roles.analysis.sae.quality import sae_quality
from lens_roles.analysis.sae.training import SAETrainConfig, save_sae, train_sae
from lens_roles.directions.builders import (
    diff_in_means,
    pca_direction,
    persona_vector,
    probe_direction,
    role_vector,
    role_vectors,
)
from lens_roles.directions.direction import Direction
from lens_roles.directions.separation import separation_auc, split_half_agreement
from lens_roles.errors import (
    CacheError,
    ConfigError,
    DataError,
    DirectionError,
    LensRolesError,
    ModelError,
    PatchingError,
    PlotError,
    PSRError,
    SAEError,
)
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.inputs.prompts import (
    ContrastPair,
    PairSet,
    Prompt,
    PromptSet,
    available_roles,
    load_baseline,
    load_pairs,
    load_prompt_set,
    load_role,
    render,
)
from lens_roles.interventions.psr.align import prompt_steering
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.psr.train import TrainConfig, train_psr
from lens_roles.runtime.activations import Activations, collect, collect_sets
from lens_roles.runtime.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    load_hf_model,
    load_model,
    resid_hook,
    validate_layers,
)
from lens_roles.studies.psr_compare import compare_at_matched_coherence

__all__ = [
    "Activations",
    "CacheError",
    "ConfigError",
    "ContrastPair",
    "DEFAULT_MODEL",
    "DataError",
    "Direction",
    "DirectionError",
    "DirectionProjection",
    "EMBEDDED_MODELS",
    "LensRolesError",
    "LogitDiff",
    "LogprobMargin",
    "ModelError",
    "PairSet",
    "PatchResult",
    "PatchSetup",
    "PatchingError",
    "PlotError",
    "Prompt",
    "PromptSet",
    "activation_patch",
    "align_prompts",
    "attribution_patch",
    "available_roles",
    "collect",
    "collect_sets",
    "diff_in_means",
    "encode",
    "load_baseline",
    "load_hf_model",
    "load_model",
    "load_pairs",
    "load_prompt_set",
    "load_role",
    "patch_agreement",
    "pca_direction",
    "persona_vector",
    "probe_direction",
    "render",
    "resid_hook",
    "role_vector",
    "role_vectors",
    "select_positions",
    "separation_auc",
    "split_half_agreement",
    "steering_setup",
    "validate_layers",
    "__version__",
    # psr (issue 7)
    "PSR",
    "PSRError",
    "TrainConfig",
    "compare_at_matched_coherence",
    "prompt_steering",
    "train_psr",
    # sae (issue 6)
    "Corpus",
    "ProjectionMetric",
    "SAEError",
    "SAETrainConfig",
    "ablation_check",
    "attribute_features",
    "build_corpus",
    "check_sae",
    "decompose",
    "feature_alignment",
    "feature_cards",
    "load_sae",
    "sae_quality",
    "save_sae",
    "spliced",
    "train_sae",
    "write_cards",
]
