"""lens_roles: find, measure and use role and persona directions in language models.

The public API, in the order of the data flow::

    model = load_model()                                   # models
    pairs = load_pairs("data/personas/librarian.jsonl")    # prompts
    persona = persona_vector(model, pairs)                 # directions (via activations)
    role = role_vector(model, load_role("chemist"), load_baseline())
    persona.save("librarian.safetensors"); Direction.load("librarian.safetensors")
    sae = load_sae("data/saes/layer_12")                   # sae (sae_lens SAEs)
    feature_alignment(sae, persona, top=10)                # features (alignment, decomposition, attribution)
"""

__version__ = "0.1.0"

from .errors import CacheError, DataError, DirectionError, LensRolesError, ModelError  # noqa: E402
from .models import (  # noqa: E402
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    load_hf_model,
    load_model,
    resid_hook,
    validate_layers,
)
from .prompts import (  # noqa: E402
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
from .positions import encode, select_positions  # noqa: E402
from .activations import Activations, collect, collect_sets  # noqa: E402
from .directions import (  # noqa: E402
    Direction,
    diff_in_means,
    pca_direction,
    persona_vector,
    probe_direction,
    role_vector,
    role_vectors,
)
from .evaluation import separation_auc, split_half_agreement  # noqa: E402
from .errors import PatchingError  # noqa: E402
from .patching import (  # noqa: E402
    DirectionProjection,
    LogitDiff,
    LogprobMargin,
    PatchResult,
    PatchSetup,
    activation_patch,
    align_prompts,
    attribution_patch,
    patch_agreement,
    steering_setup,
)
from .psr import PSR, PSRError, TrainConfig, compare_at_matched_coherence, prompt_steering, train_psr  # noqa: E402
from .sae import SAEError, SAETrainConfig, check_sae, load_sae, sae_quality, save_sae, spliced, train_sae  # noqa: E402
from .corpus import Corpus, build_corpus  # noqa: E402
from .features import (  # noqa: E402
    ProjectionMetric,
    ablation_check,
    attribute_features,
    decompose,
    feature_alignment,
)
from .cards import feature_cards, write_cards  # noqa: E402

__all__ = [
    "Activations",
    "CacheError",
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
