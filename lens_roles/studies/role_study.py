"""The role-vectors paper's evaluation: roles × domains under addition, ablation and prompting.

For each role (a :class:`~lens_roles.directions.Direction` built from its
instructions against the baseline) and each domain (a multiple-choice
:class:`~lens_roles.inputs.questions.QuestionSet`):

1. every domain is split once, by a seeded shuffle, into a *validation* part and
   a *test* part (:meth:`QuestionSet.split`); at most ``max_val`` / ``max_test``
   of each are kept;
2. the addition layer and α of each role are chosen on the validation questions
   of the role's own domain (all domains pooled for a role with none), as the
   best validation accuracy over the grid ``layers × alphas`` (ties: the higher
   mean probability of the right letter, then the smaller α). Test questions are
   never scored before this choice is made, and never feed it;
3. on the test questions of every domain, each role is scored under
   ``addition`` (that layer and α), ``ablation`` (that layer's unit vector
   projected out at every layer) and ``prompting`` (the role as system prompt),
   and every domain once with no intervention;
4. accuracy and mean ``p_correct`` get percentile-bootstrap intervals (questions
   resampled), and their change from no intervention a *paired* interval (the
   same resampled questions on both sides). The in-domain / off-domain summary
   resamples each domain's questions once per draw, shared by all cells, so that
   its interval reflects that every role is scored on the same questions.

The conditions that branch off the unprompted run share its blocks below their
layer (:func:`~lens_roles.measures.multiple_choice.evaluate_conditions`): the
validation grid of all roles selected on the same questions is one branched
run, and on each domain's test questions no intervention, every role's chosen
addition and its ablation (which shares only block 0) are one more. Prompting
(another prompt) runs on its own.

:func:`run_role_study` returns a :class:`RoleStudy` of tidy frames;
:func:`write_role_study` writes them as CSV plus the figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from lens_roles._version import __version__
from lens_roles.config import Config
from lens_roles.directions.direction import Direction
from lens_roles.errors import ConfigError, DataError
from lens_roles.inputs.prompts import data_dir
from lens_roles.inputs.questions import QuestionSet
from lens_roles.io import atomic_write, parse_json, read_text, write_csv
from lens_roles.measures.multiple_choice import (
    SYSTEM_TEMPLATE,
    Condition,
    evaluate_condition,
    evaluate_conditions,
    persona_prompt,
)
from lens_roles.measures.statistics import bootstrap_indices, bootstrap_mean, percentile_interval
from lens_roles.runtime.progress import progress_bar
from lens_roles.runtime.shards import Executor
from lens_roles.viz import in_off_domain_bars, role_domain_heatmap, save_figure, selection_heatmap

#: metric name → the per-question column it averages
METRICS = {"accuracy": "correct", "p_correct": "p_correct"}


def load_role_domains(path: str | Path | None = None) -> dict[str, str]:
    """Role → domain map from the shipped ``roles/domains.json`` (``{domain: [roles]}``)."""
    path = Path(path) if path else data_dir() / "roles" / "domains.json"
    raw = parse_json(read_text(path, "role-domains file"), str(path))
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(r, str) for r in v)
                                            for v in raw.values()):
        raise DataError(f"{path}: expected {{domain: [role, ...]}}")
    out = {}
    for domain, roles in raw.items():
        for role in roles:
            if role in out:
                raise DataError(f"{path}: role {role!r} is listed under both {out[role]!r} and {domain!r}")
            out[role] = domain
    return out


@dataclass(frozen=True)
class StudyConfig(Config):
    """Settings of :func:`run_role_study` (validated on creation).

    Attributes:
        layers: the addition layers tried on validation (default: 3 layers at
            25, 50 and 75 % of depth).
        alphas: multiples of the raw role vector tried on validation.
        validation: fraction of each domain set used for selection.
        max_val, max_test: at most this many validation / test questions per domain.
        conditions: which of ``addition, ablation, prompting`` to run (``none`` always runs).
        n_boot: bootstrap draws; level: interval coverage.
        seed: the split's shuffle and the bootstrap.
        answer_format: how a letter is written as the reply (see ``multiple_choice``).
        system_template: the persona prompt, e.g. ``"You are {article} {role}."``.
    """

    layers: tuple[int, ...] | None = None
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    validation: float = 0.25
    max_val: int | None = 16
    max_test: int | None = 30
    conditions: tuple[str, ...] = ("addition", "ablation", "prompting")
    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0
    batch_size: int = 16
    answer_format: str = "{letter}"
    system_template: str = SYSTEM_TEMPLATE

    def __post_init__(self):
        bad = [c for c in self.conditions if c not in ("addition", "ablation", "prompting")]
        if bad:
            raise ConfigError(f"StudyConfig: unknown condition(s) {bad} in conditions; "
                              "use addition, ablation, prompting")
        if ("addition" in self.conditions or "ablation" in self.conditions) and not self.alphas:
            raise ConfigError(f"StudyConfig: alphas must not be empty when conditions include addition or "
                              f"ablation, got alphas={self.alphas!r}")
        if any(not np.isfinite(a) for a in self.alphas):
            raise ConfigError(f"StudyConfig: alphas must be finite, got {self.alphas!r}")
        if not 0 < self.level < 1:
            raise ConfigError(f"StudyConfig: level must be in (0, 1), got {self.level!r}")
        if self.n_boot < 100:
            raise ConfigError(f"StudyConfig: n_boot must be at least 100, got {self.n_boot!r}")
        for name in ("max_val", "max_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"StudyConfig: {name} must be positive or None, got {value!r}")
        try:
            persona_prompt("chemist", self.system_template)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ConfigError(f"StudyConfig: system_template {self.system_template!r} cannot be filled in "
                              f"({type(exc).__name__}: {exc}); use the fields {{article}} and {{role}}, e.g. "
                              "'You are {article} {role}.'") from None


def default_selection_layers(n_layers: int) -> tuple[int, ...]:
    """Three layers at 25, 50 and 75 % of depth (7, 15, 22 of 30; 4, 9, 13 of 18)."""
    return tuple(sorted({min(n_layers - 1, int(n_layers * f)) for f in (0.25, 0.5, 0.75)}))


@dataclass
class RoleStudy:
    """Everything :func:`run_role_study` measured, as tidy frames.

    Attributes:
        scores: one row per (role, domain, condition, question): ``role`` (empty for
            ``none``), ``domain, split, condition, layer, alpha, question, answer,
            pred, correct, p_correct, letter_mass``.
        selection: the validation grid: ``role, layer, alpha, accuracy, p_correct, n, chosen``.
        table: per cell ``role, domain, in_domain, condition, layer, alpha, metric,
            n, value, lo, hi, delta, delta_lo, delta_hi`` (delta vs ``none``, paired).
        summary: ``condition, in_domain, metric, cells, delta, lo, hi``.
        baseline: ``domain, metric, n, value, lo, hi, chance, majority`` for ``none``.
        meta: provenance (model, config, data fingerprints, timings).
    """

    scores: pd.DataFrame
    selection: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame
    baseline: pd.DataFrame
    meta: dict = field(default_factory=dict)


def _pooled_validation(val: Mapping[str, QuestionSet], cap: int | None) -> QuestionSet:
    """Validation questions of every domain in turn (round robin), capped at ``cap``."""
    sets = list(val.values())
    order = [s.questions[i] for i in range(max(len(s) for s in sets)) for s in sets if i < len(s)]
    order = order[:cap] if cap else order
    return QuestionSet("all[val]", tuple(order), "pooled")


def select_addition(model, direction: Direction, val: QuestionSet, *, layers: Sequence[int],
                    alphas: Sequence[float], answer_format: str = "{letter}", batch_size: int = 16
                    ) -> tuple[Condition, pd.DataFrame]:
    """Grid search of the addition layer and α on validation questions only.

    Returns the chosen :class:`Condition` and the grid (``layer, alpha, accuracy,
    p_correct, n, chosen``).
    """
    return select_additions(model, {"": direction}, val, layers=layers, alphas=alphas, answer_format=answer_format,
                            batch_size=batch_size)[""]


def select_additions(model, directions: Mapping[str, Direction], val: QuestionSet, *, layers: Sequence[int],
                     alphas: Sequence[float], answer_format: str = "{letter}", batch_size: int = 16,
                     executor: Executor | None = None) -> dict[str, tuple[Condition, pd.DataFrame]]:
    """:func:`select_addition` for several directions on the same validation questions, in one branched run.

    Every question runs once up to the deepest layer of the grid; each direction,
    layer and α then runs only the blocks above its layer
    (:func:`~lens_roles.measures.multiple_choice.evaluate_conditions`).
    """
    for name, direction in directions.items():
        missing = [layer for layer in layers if layer not in direction]
        if missing:
            raise DataError(f"the direction {direction.meta.get('name', name)!r} has no layer(s) {missing}")
    grid = [(name, layer, float(alpha)) for name in directions for layer in layers for alpha in alphas]
    frames = evaluate_conditions(model, val, [(Condition("addition", layer, alpha), directions[name])
                                              for name, layer, alpha in grid],
                                 answer_format=answer_format, batch_size=batch_size, executor=executor)
    out = {}
    for name in directions:
        rows = [{"layer": layer, "alpha": alpha, "accuracy": float(f.correct.mean()),
                 "p_correct": float(f.p_correct.mean()), "n": len(f)}
                for (n, layer, alpha), f in zip(grid, frames) if n == name]
        table = pd.DataFrame(rows)
        ranked = table.assign(abs_alpha=table.alpha.abs()).sort_values(
            ["accuracy", "p_correct", "abs_alpha"], ascending=[False, False, True])
        best = ranked.iloc[0]
        table["chosen"] = (table.layer == best.layer) & (table.alpha == best.alpha)
        out[name] = (Condition("addition", int(best.layer), float(best.alpha)), table)
    return out


def _boot_indices(domains: Mapping[str, int], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Bootstrap resamples ``[draw, n]`` of each domain's test questions, drawn in turn from one seeded stream."""
    rng = np.random.default_rng(seed)
    return {d: bootstrap_indices(n, n_boot, rng) for d, n in domains.items()}


def run_role_study(model, roles: Mapping[str, Direction], domains: Mapping[str, QuestionSet], *,
                   role_domains: Mapping[str, str] | None = None, config: StudyConfig | None = None,
                   progress: bool = True, executor: Executor | None = None) -> RoleStudy:
    """Run the roles × domains evaluation (see the module docs for the protocol).

    With an ``executor`` (:class:`lens_roles.distributed.RayExecutor`) every scoring runs its
    questions as shards on the workers; the per-question rows, hence every count, are the same.

    With ``progress`` a tqdm bar on stderr counts the evaluations (no
    intervention per domain, each role's layer/α selection, each role × condition ×
    domain); its postfix names the one under way.
    """
    config = config or StudyConfig()
    if not roles:
        raise DataError("no role vectors to evaluate")
    if not domains:
        raise DataError("no question sets to evaluate on")
    role_domains = dict(role_domains or {})
    layers = config.layers or default_selection_layers(model.cfg.n_layers)
    t0 = time.perf_counter()

    val, test = {}, {}
    for name, qs in domains.items():
        v, t = qs.split(config.validation, seed=config.seed, names=(f"{qs.name}[val]", None))
        val[name], test[name] = v.head(config.max_val), t.head(config.max_test)
    kw = dict(answer_format=config.answer_format, batch_size=config.batch_size, executor=executor)
    needs_layer = "addition" in config.conditions or "ablation" in config.conditions
    n_conditions = sum(c in config.conditions for c in ("addition", "ablation", "prompting"))
    bar = progress_bar(progress, len(test) + len(roles) * (needs_layer + n_conditions * len(test)), "role study",
                       unit="eval")

    # the validation grid first (it never sees a test question): roles selected on the same questions share
    # one branched run
    grids, chosen = [], {}
    by_set: dict[str, tuple[QuestionSet, list[str]]] = {}
    for role in roles if needs_layer else ():
        home = role_domains.get(role)
        sel = val[home] if home in val else _pooled_validation(val, config.max_val)
        by_set.setdefault(sel.name, (sel, []))[1].append(role)
    for sel, names in by_set.values():
        bar.set_postfix_str(f"select · {', '.join(names)} on {sel.name} ({len(sel)} questions × "
                            f"{len(layers) * len(config.alphas)} settings)")
        picked = select_additions(model, {r: roles[r] for r in names}, sel, layers=layers, alphas=config.alphas,
                                  **kw)
        for role in names:
            chosen[role] = picked[role][0]
            grids.append((role, picked[role][1].assign(role=role, selected_on=sel.name)))
        bar.update(len(names))
    grids = [g for _, g in sorted(grids, key=lambda rg: list(roles).index(rg[0]))]
    t_select = time.perf_counter() - t0

    # on the test questions: no intervention, every role's chosen addition and its ablation from one branched run
    # per domain; prompting (another prompt) on its own
    cells: dict[tuple[str, str, str], pd.DataFrame] = {}
    shared = [(r, chosen[r]) for r in roles if "addition" in config.conditions]
    shared += [(r, Condition("ablation", chosen[r].layer)) for r in roles if "ablation" in config.conditions]
    for name, qs in test.items():
        bar.set_postfix_str(f"none{', addition, ablation' if shared else ''} · {name} ({len(qs)} questions)")
        frames = evaluate_conditions(model, qs, [(Condition("none"), None)] + [(c, roles[r]) for r, c in shared],
                                     **kw)
        cells[("", "none", name)] = frames[0]
        cells.update({(r, c.kind, name): f for (r, c), f in zip(shared, frames[1:])})
        bar.update(1 + len(shared))
    if "prompting" in config.conditions:
        for role, direction in roles.items():
            cond = Condition("prompting", system=persona_prompt(role, config.system_template))
            for name, qs in test.items():
                bar.set_postfix_str(f"prompting · {role} · {name}")
                cells[(role, "prompting", name)] = evaluate_condition(model, qs, cond, direction, **kw)
                bar.update()
    bar.close()
    # in the order of the scores table: no intervention per domain, then role × condition × domain
    order = [("", "none", name) for name in test] + [
        (role, kind, name) for role in roles for kind in ("addition", "ablation", "prompting")
        if kind in config.conditions for name in test]
    frames = [cells[key].assign(role=key[0], domain=key[2]) for key in order]
    scores = pd.concat(frames, ignore_index=True).assign(split="test")
    selection = pd.concat(grids, ignore_index=True) if grids else pd.DataFrame()

    table, summary, baseline = _tables(scores, test, list(roles), role_domains, config)
    meta = {
        "model": model.cfg.model_name, "n_layers": model.cfg.n_layers, "lens_roles": __version__,
        "config": config.to_dict(), "selection_layers": list(layers),
        "roles": {r: {"domain": role_domains.get(r), "dataset": d.meta.get("dataset"), "method": d.method,
                      "positions": d.meta.get("positions")} for r, d in roles.items()},
        "domains": {d: {"source": qs.source, "fingerprint": qs.fingerprint(), "n_val": len(val[d]),
                        "n_test": len(test[d])} for d, qs in domains.items()},
        "seconds": {"selection": round(t_select, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    return RoleStudy(scores, selection, table, summary, baseline, _plain(meta))


def _plain(meta: dict) -> dict:
    """Provenance as plain JSON types (direction metadata holds read-only mappings)."""
    return json.loads(json.dumps(meta, default=lambda o: dict(o) if isinstance(o, Mapping) else str(o)))


def _tables(scores: pd.DataFrame, test: Mapping[str, QuestionSet], roles: list[str],
            role_domains: Mapping[str, str], config: StudyConfig):
    """The cell table, the in/off-domain summary and the no-intervention baseline."""
    sizes = {d: len(qs) for d, qs in test.items()}
    boot = _boot_indices(sizes, config.n_boot, config.seed)
    base = {d: scores[(scores.condition == "none") & (scores.domain == d)].reset_index(drop=True) for d in test}
    conditions = [c for c in ("addition", "ablation", "prompting") if (scores.condition == c).any()]
    rows, base_rows = [], []
    cell_draws: dict[tuple[str, bool, str], list[np.ndarray]] = {}
    for metric, column in METRICS.items():
        for d, b in base.items():
            v = b[column].to_numpy(float)
            value, lo, hi = bootstrap_mean(v, boot[d], config.level)
            counts = test[d].answer_counts()
            base_rows.append({"domain": d, "metric": metric, "n": len(v), "value": value, "lo": lo, "hi": hi,
                              "chance": 1 / len(counts), "majority": max(counts.values()) / len(test[d])})
        for role in roles:
            for cond in conditions:
                for d, b in base.items():
                    cell = scores[(scores.role == role) & (scores.condition == cond) & (scores.domain == d)]
                    cell = cell.reset_index(drop=True)
                    if list(cell.question) != list(b.question):
                        raise DataError(f"internal: {role}/{cond}/{d} scored other questions than the baseline")
                    v, v0 = cell[column].to_numpy(float), b[column].to_numpy(float)
                    value, lo, hi = bootstrap_mean(v, boot[d], config.level)
                    delta_draws = (v - v0)[boot[d]].mean(1)
                    dlo, dhi = percentile_interval(delta_draws, config.level)
                    in_domain = role_domains.get(role) == d
                    cell_draws.setdefault((cond, in_domain, metric), []).append(delta_draws)
                    rows.append({"role": role, "domain": d, "in_domain": in_domain, "condition": cond,
                                 "layer": cell.layer.iloc[0], "alpha": cell.alpha.iloc[0], "metric": metric,
                                 "n": len(v), "value": value, "lo": lo, "hi": hi, "delta": float((v - v0).mean()),
                                 "delta_lo": dlo, "delta_hi": dhi})
    table = pd.DataFrame(rows)
    summary_rows = []
    for (cond, in_domain, metric), draws in sorted(cell_draws.items(), key=lambda kv: (kv[0][0], not kv[0][1],
                                                                                          kv[0][2])):
        cells = table[(table.condition == cond) & (table.in_domain == in_domain) & (table.metric == metric)]
        lo, hi = percentile_interval(np.mean(draws, axis=0), config.level)
        summary_rows.append({"condition": cond, "in_domain": in_domain, "metric": metric, "cells": len(draws),
                             "delta": float(cells.delta.mean()), "lo": lo, "hi": hi})
    return table, pd.DataFrame(summary_rows), pd.DataFrame(base_rows)


def write_role_study(study: RoleStudy, out: str | Path, *, png: bool = True) -> list[Path]:
    """Write the study's frames as CSV, its provenance as JSON, and its figures, into ``out``."""
    out = Path(out)
    written = [write_csv(getattr(study, name), out / f"{name}.csv")
               for name in ("scores", "selection", "table", "summary", "baseline")]
    written.append(atomic_write(out / "study.json",
                                lambda tmp: Path(tmp).write_text(json.dumps(study.meta, indent=2, default=str))))
    model = study.meta.get("model", "")
    for cond in study.table.condition.unique():
        fig = role_domain_heatmap(study.table, condition=cond, metric="accuracy",
                                  subtitle=f"{model} · test questions · paired bootstrap intervals in hover")
        written += save_figure(fig, out / f"role_domain_{cond}", meta=study.meta, png=png)
    if not study.summary.empty:
        level = study.meta["config"]["level"]
        fig = in_off_domain_bars(study.summary, metric="accuracy", subtitle=f"{model} · {level:.0%} bootstrap "
                                 "intervals (questions resampled per domain)")
        written += save_figure(fig, out / "in_off_domain", meta=study.meta, png=png)
    if not study.selection.empty:
        fig = selection_heatmap(study.selection, subtitle=f"{model} · validation questions only")
        written += save_figure(fig, out / "selection", meta=study.meta, png=png)
    return written
