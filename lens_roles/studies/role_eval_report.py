"""Role vectors evaluated on multiple-choice domains, written as one folder.

:func:`run_role_evaluation` is the whole job of ``lens-roles evaluate``: one role
vector per prompt set (against ``baseline``, every layer), the role study
(addition, ablation, prompting; :func:`~lens_roles.studies.role_study.run_role_study`),
its tables (:func:`~lens_roles.studies.role_study.write_role_study`), the vectors
(``vectors/<role>.safetensors``) and, with several roles, their cosine heatmap and
role map at the most often selected addition layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from lens_roles.directions.builders import role_vectors
from lens_roles.directions.geometry import cosine_matrix, role_map
from lens_roles.inputs.prompts import PromptSet
from lens_roles.inputs.questions import QuestionSet
from lens_roles.studies.role_study import RoleStudy, StudyConfig, run_role_study, write_role_study
from lens_roles.viz import role_cosine_heatmap, save_figure
from lens_roles.viz import role_map as role_map_figure


def run_role_evaluation(model, role_sets: Sequence[PromptSet], baseline: PromptSet,
                        domains: Mapping[str, QuestionSet], *, role_domains: Mapping[str, str], config: StudyConfig,
                        out: Path, collect_kw: dict | None = None,
                        progress: bool = True) -> RoleStudy:
    """Build the role vectors (``collect_kw`` goes to the activation collection), run and write the study.

    An ``executor`` in ``collect_kw`` runs both the extraction and the study's scoring on its workers.
    """
    vectors = role_vectors(model, role_sets, baseline, **(collect_kw or {}))
    out = Path(out)
    study = run_role_study(model, vectors, domains, role_domains=role_domains, config=config, progress=progress,
                           executor=(collect_kw or {}).get("executor"))
    write_role_study(study, out)
    for name, direction in vectors.items():
        direction.save(out / "vectors" / f"{name}.safetensors")
    if len(vectors) > 1:
        cos = cosine_matrix(vectors)
        save_figure(role_cosine_heatmap(cos, subtitle=model.cfg.model_name), out / "role_cosine")
        layer = study.selection.layer.mode().iloc[0] if not study.selection.empty else model.cfg.n_layers // 2
        save_figure(
            role_map_figure(role_map(vectors, int(layer), groups=role_domains), subtitle=model.cfg.model_name),
            out / "role_map",
        )
    return study
