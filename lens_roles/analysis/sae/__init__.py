"""SAE features of a direction: SAEs (the only importer of ``sae_lens``), their training corpus,
alignment, decomposition, attribution and feature cards."""

from lens_roles.analysis.sae.cards import feature_cards, write_cards
from lens_roles.analysis.sae.core import (
    SpliceRecord,
    check_sae,
    decoder_directions,
    harvest,
    identity_sae,
    load_sae,
    sae_layer,
    spliced,
)
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

__all__ = [
    "load_sae",
    "check_sae",
    "sae_layer",
    "decoder_directions",
    "harvest",
    "spliced",
    "identity_sae",
    "SpliceRecord",
    "SAETrainConfig",
    "train_sae",
    "save_sae",
    "sae_quality",
    "Corpus",
    "build_corpus",
    "feature_alignment",
    "decompose",
    "attribute_features",
    "ablation_check",
    "ProjectionMetric",
    "feature_cards",
    "write_cards",
]
