"""The main job (``lens-roles demo``, ``make demo``).

On one model: the librarian persona vector from the project's contrast pairs and
a role vector for every shipped role (``lens_roles/data/roles``) against the baseline, each at every
layer. Each set is split deterministically (first 75 % to build, the rest held
out); the held-out prompts measure how well each direction separates its two
sides (AUC per layer), and the pairs' two halves measure the persona vector's
stability (split-half cosine per layer).

Writes to ``out`` (default ``figures/``):

* ``directions_summary.csv`` — tidy ``direction, kind, layer, metric, value``;
* ``direction_profile.{html,png,json}`` — raw norm and held-out AUC over depth;
* ``role_auc_heatmap.{html,png,json}`` — held-out AUC against the baseline, roles × layers;
* ``role_specificity_heatmap.{html,png,json}`` — held-out AUC of each role's prompts against
  all other roles' prompts, projected on that role's vector (harder than the baseline);
* ``librarian_split_half.{html,png,json}`` — split-half cosine of the persona vector;
* ``roles/`` — role geometry: ``role_cosine`` (cosine of every pair of role vectors,
  a slider over layers), ``role_map`` (2-D PCA of the roles at the layer where they
  are most distinct), ``role_sharing`` (mean pairwise cosine and mean specificity
  AUC by layer), ``role_cosine.csv`` and ``nearest_roles.csv``;
* ``steering/`` — steering with the librarian vector at three layers on the held-out
  pairs (see :mod:`lens_roles.studies.steering_report`): ``sweep.csv``, ``generations.csv``,
  cosine-vs-α per layer and adherence/coherence-vs-α figures;

and the vectors themselves to ``directions_out`` (one ``.safetensors`` + ``.json`` each).

A rerun writes the same files (values to :data:`lens_roles.io.SIGNIFICANT_DIGITS`
significant digits, no random ids: see :mod:`lens_roles.viz.export`). The wall time of
each phase goes to ``timings`` when a dict is passed (``lens-roles demo --timings``
writes it as JSON, for ``benchmarks/demo.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from lens_roles._version import __version__
from lens_roles.directions.builders import diff_in_means
from lens_roles.directions.geometry import cosine_matrix, mean_offdiagonal_cosine, nearest_roles, role_map
from lens_roles.directions.separation import separation_auc, split_half_agreement
from lens_roles.inputs.prompts import PairSet, available_roles, data_dir, load_baseline, load_pairs, load_role
from lens_roles.inputs.sets import split_indices
from lens_roles.io import write_csv
from lens_roles.runtime.activations import collect_sets
from lens_roles.runtime.models import parse_layers, validate_layers
from lens_roles.runtime.progress import progress_bar
from lens_roles.studies.role_study import load_role_domains
from lens_roles.studies.steering_report import run_steering_report
from lens_roles.viz import (
    direction_profile,
    layer_heatmap,
    line_by_layer,
    role_cosine_heatmap,
    save_figure,
)
from lens_roles.viz import role_map as role_map_figure

TRAIN_FRACTION = 0.75
#: α values of the demo's steering sweep, as multiples of the typical residual norm
STEER_ALPHAS = (-0.5, -0.25, 0.25, 0.5)


def default_steer_layers(n_layers: int) -> list[int]:
    """Early-middle, middle and late-middle layers (6, 12, 18 of SmolLM2's 30)."""
    return sorted({round(n_layers * f) for f in (0.2, 0.4, 0.6)})


class PhaseTimer:
    """Wall time per named phase, in seconds, into a dict (in the order the phases ran).

    ``with timer("roles"): ...`` adds the block's time to ``timings["roles"]``.
    """

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def __call__(self, name: str) -> "PhaseTimer":
        self.name = name
        return self

    def __enter__(self) -> "PhaseTimer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


def run_demo(model, *, out: Path, directions_out: Path, layers="all", roles="all", steer_layers=None,
             progress: bool = True, timings: dict[str, float] | None = None, **collect_kw) -> pd.DataFrame:
    """Run the main job on ``model``; returns the summary frame (also written as CSV).

    With ``progress`` every phase a user waits on shows a tqdm bar on stderr, one
    after another: the activations of the persona pairs and of the roles, the role
    vectors, the held-out AUCs, the figures, the role geometry and the steering study
    (its sweeps, generations and figures). stdout gets the report alone.

    Args:
        timings: a dict that receives the seconds of each phase (``persona``, ``role
            activations``, ``role vectors``, ``held-out AUCs``, ``figures``, ``role
            geometry``, ``steering``), e.g. for a benchmark.
    """
    t_start = time.perf_counter()
    phase = PhaseTimer(timings if timings is not None else {})
    layers = validate_layers(model, parse_layers(layers) if isinstance(layers, str) else layers)
    rows: list[dict] = []

    def add(direction: str, kind: str, frame: pd.DataFrame) -> None:
        for rec in frame.to_dict("records"):
            rows.append({"direction": direction, "kind": kind, **rec})

    # -- the librarian persona, read over the reply tokens -----------------------------------
    pairs = load_pairs(data_dir() / "personas" / "librarian.jsonl", "librarian")
    with phase("persona"):
        pos, neg = collect_sets(model, [pairs.positives(), pairs.negatives()], layers=layers, positions="reply",
                                keep_per_prompt=True, progress=progress, **collect_kw)
        pair_train, pair_held = split_indices(len(pairs), TRAIN_FRACTION)
        persona = diff_in_means(pos.subset(pair_train), neg.subset(pair_train), method="mean_diff",
                                name="librarian", dataset=pairs.fingerprint(),
                                split=f"first {len(pair_train)} of {len(pairs)} pairs")
        persona.save(directions_out / "librarian.safetensors")
        add("librarian", "persona", persona.to_frame())
        add("librarian", "persona", separation_auc(persona, pos.subset(pair_held), neg.subset(pair_held)))
        add("librarian", "persona", split_half_agreement(model, pairs, activations=(pos, neg)))

    # -- every role against the baseline, read at the end-of-instruction tokens ----------------
    # the baseline and every role in one run (shared template prefix, full batches)
    baseline = load_baseline()
    names = available_roles() if roles == "all" else list(roles)
    role_sets = [load_role(name) for name in names]
    with phase("role activations"):
        base, *all_role_acts = collect_sets(model, [baseline, *role_sets], layers=layers, positions="eoi",
                                            keep_per_prompt=True, progress=progress, **collect_kw)
    base_train, base_held = split_indices(len(baseline), TRAIN_FRACTION)
    base_train_acts, base_held_acts = base.subset(base_train), base.subset(base_held)
    role_acts, vectors = {}, {}
    with phase("role vectors"), progress_bar(progress, len(names), "role vectors", unit="role") as bar:
        for name, role_set, acts in zip(names, role_sets, all_role_acts):
            role_train, role_held = split_indices(len(role_set), TRAIN_FRACTION)
            role_acts[name] = acts.subset(role_held)
            vectors[name] = diff_in_means(acts.subset(role_train), base_train_acts, method="role_vector",
                                          name=name, baseline="baseline", dataset=role_set.fingerprint(),
                                          split=f"first {len(role_train)} of {len(role_set)} instructions")
            vectors[name].save(directions_out / "roles" / f"{name}.safetensors")
            bar.update(1)
    with phase("held-out AUCs"), progress_bar(progress, len(vectors), "held-out AUCs", unit="role") as bar:
        for name, vector in vectors.items():
            add(name, "role", vector.to_frame())
            add(name, "role", separation_auc(vector, role_acts[name], base_held_acts))
            if len(names) > 1:  # specificity: this role's held-out prompts against every other role's, pooled
                others = [role_acts[other] for other in names if other != name]
                add(name, "role", separation_auc(vector, role_acts[name], others).assign(metric="auc_vs_roles"))
            bar.update(1)

    summary = pd.DataFrame(rows)
    meta = {
        "model": model.cfg.model_name,
        "hook": "blocks.{layer}.hook_resid_post",
        "positions": {"persona": "reply", "roles": "eoi"},
        "template": pos.meta["template"],
        "prepend_bos": pos.meta["prepend_bos"],
        "datasets": {"librarian": pairs.fingerprint(), "baseline": baseline.fingerprint()},
        "split": f"first {TRAIN_FRACTION:.0%} build, rest held out",
        "lens_roles": __version__,
    }
    with phase("figures"):
        write_outputs(summary, out, meta, progress=progress)
    if len(vectors) > 1:
        with phase("role geometry"):
            write_geometry(vectors, summary, out / "roles", meta, progress=progress)

    # -- steering with the librarian vector, evaluated on the held-out pairs ---------------------
    if steer_layers:
        held_pairs = PairSet("librarian", tuple(pairs.pairs[i] for i in pair_held), pairs.source)
        print("steering the librarian persona (held-out pairs):")
        with phase("steering"):
            run_steering_report(model, persona, held_pairs,
                                layers=[layer for layer in steer_layers if layer in layers],
                                alphas=STEER_ALPHAS, relative=True, out=out / "steering", n_generate=3,
                                max_new_tokens=32, progress=progress)
    report(summary)
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s; figures in {out}/, vectors in {directions_out}/")
    return summary


def save_figures(figures: list, meta: dict, *, desc: str, progress: bool = False) -> None:
    """Save each ``(figure, stem)`` with :func:`~lens_roles.viz.save_figure`, in order, under a tqdm bar.

    Figures are built first and saved here, one by one: the PNG export (a
    browser) is what takes seconds, and the bar shows it.
    """
    with progress_bar(progress, len(figures), desc, unit="figure") as bar:
        for fig, stem in figures:
            save_figure(fig, stem, meta=meta)
            bar.update(1)


def write_outputs(summary: pd.DataFrame, out: Path, meta: dict, *, progress: bool = False) -> None:
    """Write the summary CSV and the figures of directions by layer (see the module docs)."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(summary, out / "directions_summary.csv")
    sub = f"{meta['model']} · resid_post · persona: reply tokens, roles: end-of-instruction tokens"
    figures = [(direction_profile(summary, title="Role and persona directions by layer", subtitle=sub),
                out / "direction_profile")]
    roles_only = summary[summary.kind == "role"]
    role_sub = (f"{meta['model']} · resid_post · end-of-instruction tokens · "
                "held-out prompts projected on each role vector")
    figures.append((layer_heatmap(roles_only, metric="auc", zmin=0.5, zmax=1.0,
                                  title="Held-out separation of each role from the baseline (AUC)",
                                  subtitle=role_sub),
                    out / "role_auc_heatmap"))
    if (roles_only.metric == "auc_vs_roles").any():
        figures.append((layer_heatmap(roles_only, metric="auc_vs_roles", zmin=0.0, zmax=1.0, zmid=0.5,
                                      colorscale="RdBu_r", order="mean",
                                      title="Role specificity: held-out role prompts vs all other roles' (AUC)",
                                      subtitle=role_sub),
                        out / "role_specificity_heatmap"))
    split_half = summary[(summary.direction == "librarian") & (summary.metric == "split_half_cosine")]
    figures.append((line_by_layer(split_half, title="Librarian persona vector: agreement of two disjoint halves",
                                  subtitle=f"{meta['model']} · resid_post · reply tokens · even vs odd pairs",
                                  y_title="cosine(half A, half B)"),
                    out / "librarian_split_half"))
    save_figures(figures, meta, desc="figures", progress=progress)


def write_geometry(vectors: dict, summary: pd.DataFrame, out: Path, meta: dict, *, progress: bool = False) -> None:
    """Role geometry: cosine matrix per layer (slider), the 2-D map of roles, and how much they share.

    The map is drawn at the layer where the roles are most distinguishable from
    one another (highest mean held-out AUC against the other roles).
    """
    cos = cosine_matrix(vectors)
    spec = summary[summary.metric == "auc_vs_roles"].groupby("layer").value.mean()
    layer = int(spec.idxmax()) if len(spec) else int(cos.layer.median())
    groups = load_role_domains()
    write_csv(cos, out / "role_cosine.csv")
    centred = cosine_matrix(vectors, centre=True)
    write_csv(nearest_roles(cos).merge(nearest_roles(centred), on=["role", "layer"], suffixes=("", "_centred")),
              out / "nearest_roles.csv")
    sub = f"{meta['model']} · role vectors at the end-of-instruction tokens"
    shared = mean_offdiagonal_cosine(cos).assign(direction="mean cosine between distinct roles")
    if len(spec):
        shared = pd.concat([shared, pd.DataFrame({"layer": spec.index, "value": spec.values,
                                                  "direction": "mean held-out AUC vs other roles"})])
    figures = [
        (role_cosine_heatmap(centred, layer=layer, title="Cosine of role vectors, centred on the roles' mean",
                             subtitle=f"{meta['model']} · what roles share beyond the common expert direction"),
         out / "role_cosine_centred"),
        (role_cosine_heatmap(cos, layer=layer, subtitle=sub), out / "role_cosine"),
        (role_map_figure(role_map(vectors, layer, groups=groups), subtitle=sub + " · centred on the roles' "
                         "mean · colour: MMLU domain"), out / "role_map"),
        (line_by_layer(shared, title="How much the roles share, and how separable they are, by layer",
                       subtitle=sub, y_title="value"), out / "role_sharing"),
    ]
    save_figures(figures, meta, desc="role geometry", progress=progress)


def report(summary: pd.DataFrame, file=None) -> None:
    """Print the headline numbers per direction.

    For each direction: the first layer whose held-out AUC against the baseline
    (roles) or the negatives (persona) reaches 0.99, and the layer where the AUC
    against the other roles peaks (the sharper test of a role's own direction).
    """
    file = file or sys.stdout

    def first_at(frame, threshold):
        hit = frame[frame.value >= threshold].sort_values("layer")
        return int(hit.layer.iloc[0]) if len(hit) else None

    print(f"{'direction':<20s} {'AUC>=0.99 from layer':>21s} {'peak AUC vs other roles':>26s}", file=file)
    for name, grp in summary.groupby("direction", sort=True):
        first = first_at(grp[grp.metric == "auc"], 0.99)
        spec = grp[grp.metric == "auc_vs_roles"]
        peak = (f"{spec.value.max():.3f} at layer {int(spec.loc[spec.value.idxmax(), 'layer']):>2d}"
                if len(spec) else "-")
        print(f"{name:<20s} {('-' if first is None else first):>21} {peak:>26s}", file=file)
    half = summary[summary.metric == "split_half_cosine"]
    if len(half):
        print("librarian split-half cosine per layer: "
              + " ".join(f"{v:.3f}" for v in half.sort_values("layer").value), file=file)
