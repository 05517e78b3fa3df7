"""Persona space and the assistant axis of a model, from its own replies in many roles.

Protocol (:func:`run_persona_space`):

1. **Personas**: every shipped role (``data/roles``, system prompt ``"You are a chemist."`` by
   :func:`~lens_roles.measures.multiple_choice.persona_prompt`), every character archetype
   (``data/persona_space/archetypes.jsonl``, its own system prompt), and the default assistant
   (:func:`~lens_roles.inputs.personas.default_personas`: no system prompt, and — when the chat
   template inserts a default system prompt, as SmolLM2's does — also an explicitly empty system
   turn; a base model without a chat template is prompted with the plain template, where "no
   system prompt" is one point).
2. **Questions**: the first ``n_questions`` of ``data/persona_space/questions.jsonl`` (ordinary,
   persona-revealing questions), split once by a seeded shuffle into *build* questions and
   *held-out* questions (:meth:`~lens_roles.inputs.sets.ItemSet.split`).
3. **Replies**: the model's own, generated for every persona × question with
   :func:`~lens_roles.runtime.generation.generate` (greedy by default, or seeded sampling; at most
   ``max_new_tokens``), in batches, and cached as JSONL under ``cache_dir`` keyed by everything
   they depend on, so a rerun does not regenerate. Given replies (:func:`load_replies`, the same
   JSONL: ``{persona, system, user, reply}``) replace generation. Replies that are empty or
   whitespace are dropped and counted.
4. **Activations** of the reply tokens (position rule ``"reply"``), every layer, all personas
   and both question parts in one :func:`~lens_roles.runtime.activations.collect_sets` run
   (float64 sums, per-prompt vectors kept).
5. :func:`~lens_roles.directions.persona_space.persona_space` on the build replies: PCA of the
   role vectors, the assistant axis, and its AUC on the held-out replies.

:func:`write_persona_space` writes the axis (``assistant_axis.safetensors`` + ``.json``),
PC1 as a direction (``persona_pc1.safetensors``), the per-layer table (``persona_space.csv``),
the persona coordinates (``points.csv``), the replies (``replies.jsonl``), provenance
(``persona_space.json``) and the figures (``persona_map`` 3-D, ``variance_explained``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from lens_roles._version import __version__
from lens_roles.config import Config
from lens_roles.directions.direction import Direction
from lens_roles.directions.persona_space import PersonaSpace, persona_space
from lens_roles.errors import ConfigError, DataError
from lens_roles.inputs.personas import (
    Persona,
    check_unique,
    default_personas,
    load_archetypes,
    load_persona_questions,
)
from lens_roles.inputs.prompts import Prompt, PromptSet, read_records, resolve_roles, template_name
from lens_roles.inputs.sets import fingerprint
from lens_roles.io import atomic_write, write_csv
from lens_roles.measures.multiple_choice import SYSTEM_TEMPLATE, persona_prompt
from lens_roles.runtime.activations import collect_sets
from lens_roles.runtime.generation import generate
from lens_roles.runtime.models import model_id
from lens_roles.runtime.shards import Executor, split_units
from lens_roles.runtime.progress import progress_bar
from lens_roles.studies.role_study import load_role_domains
from lens_roles.viz.export import save_figure
from lens_roles.viz.persona import persona_map_3d, variance_explained


@dataclass(frozen=True)
class PersonaSpaceConfig(Config):
    """Settings of :func:`run_persona_space` (validated on creation).

    Attributes:
        roles: ``"all"`` or shipped role names (``data/roles``); ``()`` for none.
        archetypes: archetype file (None: the shipped ``archetypes.jsonl``); ``""`` for none.
        questions: question file (None: the shipped ``questions.jsonl``).
        n_questions: the first this many questions are asked.
        held_out: fraction of them held out from building the axis (its AUC is measured there).
        max_new_tokens, temperature, seed: generation (temperature 0: greedy).
        layers: block indices read (None: all).
        n_components: principal components kept per layer.
        map_layer: the layer of the 3-D map (None: the middle layer read).
        batch_size: prompts per generation batch and per forward pass.
        system_template: the roles' system prompt (``{article}``, ``{role}``).
    """

    roles: tuple[str, ...] | str = "all"
    archetypes: str | None = None
    questions: str | None = None
    n_questions: int = 12
    held_out: float = 0.34
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    layers: tuple[int, ...] | None = None
    n_components: int = 3
    map_layer: int | None = None
    batch_size: int = 16
    system_template: str = SYSTEM_TEMPLATE

    def __post_init__(self):
        if self.n_questions < 2:
            raise ConfigError(f"PersonaSpaceConfig: n_questions must be at least 2 (build and held-out), "
                              f"got {self.n_questions}")
        if not 0 < self.held_out < 1:
            raise ConfigError(f"PersonaSpaceConfig: held_out must be a fraction in (0, 1), got {self.held_out}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.n_components < 1:
            raise ConfigError("PersonaSpaceConfig: max_new_tokens, batch_size and n_components must be positive, "
                              f"got {self.max_new_tokens}, {self.batch_size}, {self.n_components}")
        if not self.temperature >= 0:
            raise ConfigError(f"PersonaSpaceConfig: temperature must be >= 0, got {self.temperature}")


@dataclass
class PersonaSpaceResult:
    """What :func:`run_persona_space` measured.

    Attributes:
        space: the :class:`~lens_roles.directions.persona_space.PersonaSpace` (axis, PCA).
        table: per-layer summary (:meth:`PersonaSpace.table`).
        points: every persona's coordinates at every layer (:meth:`PersonaSpace.points`).
        replies: the replies read, ``{persona, system, user, reply, split}`` records.
        meta: provenance (model, config, personas, questions, dropped replies).
    """

    space: PersonaSpace
    table: pd.DataFrame
    points: pd.DataFrame
    replies: list[dict]
    meta: dict = field(default_factory=dict)

    @property
    def axis(self) -> Direction:
        return self.space.axis


def persona_roster(tokenizer, template: str, config: PersonaSpaceConfig) -> list[Persona]:
    """Every persona of the study: roles, archetypes, then the default assistant's points.

    Raises:
        DataError: an unknown role name, an archetype file that is missing or empty, or a name
            used twice.
    """
    people: list[Persona] = []
    if config.roles:
        domains = load_role_domains()
        for name in resolve_roles(config.roles):
            people.append(Persona(name, persona_prompt(name, config.system_template), domains.get(name, "role"),
                                  "role"))
    if config.archetypes != "":
        people += load_archetypes(config.archetypes)
    people += default_personas(tokenizer, template)
    check_unique(people)
    if sum(p.kind != "default" for p in people) < 2:
        raise DataError("persona space needs at least two role-playing personas; give more --roles or archetypes")
    return people


def load_replies(path: str | Path) -> list[dict]:
    """Given replies, JSONL ``{"persona": str, "user": str, "reply": str}`` (``"system"`` optional).

    Raises:
        DataError: naming the file and line, for a missing field.
    """
    out = []
    for loc, rec in read_records(path):
        for key in ("persona", "user", "reply"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{path} line {loc}: field {key!r} must be a string, got {rec.get(key)!r:.60}")
        out.append({"persona": rec["persona"], "system": rec.get("system"), "user": rec["user"],
                    "reply": rec["reply"]})
    return out


def persona_replies(model, personas: Sequence[Persona], questions: PromptSet, *, template: str,
                    max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, batch_size: int = 16,
                    cache_dir: str | Path | None = None, progress: bool = False,
                    executor: Executor | None = None) -> list[dict]:
    """The model's replies to every question in every persona, ``{persona, system, user, reply}``.

    Generated in batches of ``batch_size`` (each batch seeded with ``seed`` plus its index), and
    cached as ``cache_dir/replies-<key>.jsonl``, the key hashing the model, template, personas'
    system prompts, questions and generation settings (the seed only when sampling: greedy replies
    do not depend on it, so another question split reuses them). With an ``executor`` the batches run as
    shards on its workers: each batch is generated as it would be here (same prompts, same seed).
    """
    jobs = [(p, q.user) for p in personas for q in questions]
    key = fingerprint({"model": model_id(model), "template": template, "max_new_tokens": max_new_tokens,
                       "temperature": temperature, "seed": seed if temperature > 0 else None, "batch_size": batch_size,
                       "jobs": [(p.name, p.system, user) for p, user in jobs]})
    path = Path(cache_dir) / f"replies-{key}.jsonl" if cache_dir is not None else None
    if path is not None and path.exists():
        cached = load_replies(path)
        if [(r["persona"], r["user"]) for r in cached] == [(p.name, user) for p, user in jobs]:
            return cached
    batches = [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, template=template)
    if executor is None:
        replies = []
        with progress_bar(progress, len(jobs), "replies") as bar:
            for b in range(len(batches)):
                replies += _reply_batches(model, (batches, settings), [b])
                bar.update(len(batches[b]))
    else:
        executor.check(model)
        payloads = split_units([len(c) for c in batches], executor.shards(len(batches)))
        shards = executor.map(_reply_batches, (batches, settings), payloads, desc="reply shards", progress=progress)
        replies = [text for shard in shards for text in shard]  # payloads cut the batches in order
    records = [{"persona": p.name, "system": p.system, "user": user, "reply": text}
               for (p, user), text in zip(jobs, replies)]
    if path is not None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)))
    return records


def _reply_batches(model, shared, batch_indices: Sequence[int]) -> list[str]:
    """The replies of the given batches of :func:`persona_replies`, in order (one shard; batch ``b`` seeded
    with ``seed + b``)."""
    batches, settings = shared
    out = []
    for b in batch_indices:
        gens = generate(model, [Prompt(user, p.system) for p, user in batches[b]], max_new_tokens=settings[
            "max_new_tokens"], temperature=settings["temperature"], seed=settings["seed"] + b,
            template=settings["template"])
        out += [g.text for g in gens]
    return out


def run_persona_space(model, *, config: PersonaSpaceConfig | None = None, replies: Sequence[dict] | None = None,
                      template: str | None = None, cache_dir: str | Path | None = None,
                      progress: bool = False, executor: Executor | None = None) -> PersonaSpaceResult:
    """Persona space, the assistant axis and its held-out AUC for ``model`` (protocol in the module docs).

    Args:
        replies: given replies (:func:`load_replies`) instead of generated ones; every persona ×
            question of the study must have one.
        template: ``"chat"`` or ``"plain"`` (default: the model's own chat template if any).
        cache_dir: caches the generated replies and the activations.
        executor: generation and activation collection run as shards on its workers
            (:class:`lens_roles.distributed.RayExecutor`); the replies, per-prompt rows and
            role vectors are those of one process.
    """
    config = config or PersonaSpaceConfig()
    template = template or template_name(model.tokenizer)
    personas = persona_roster(model.tokenizer, template, config)
    questions = load_persona_questions(config.questions).head(config.n_questions)
    if len(questions) < 2:
        raise DataError(f"{questions.source}: persona space needs at least two questions, got {len(questions)}")
    build, held = questions.split(1 - config.held_out, seed=config.seed)
    source = "given" if replies is not None else (
        "generated (greedy)" if config.temperature == 0 else f"generated (T={config.temperature}, seed {config.seed})")
    if replies is None:
        replies = persona_replies(model, personas, questions, template=template,
                                  max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  seed=config.seed, batch_size=config.batch_size, cache_dir=cache_dir,
                                  progress=progress, executor=executor)
    given = {(r["persona"], r["user"]): r["reply"] for r in replies}
    missing = [f"{p.name} / {q.user[:30]!r}" for p in personas for q in questions if (p.name, q.user) not in given]
    if missing:
        raise DataError(f"no reply for {len(missing)} persona × question pair(s), e.g. {', '.join(missing[:3])}")

    sets, records, dropped = [], [], {}
    for p in personas:
        for part, qs in (("build", build), ("held_out", held)):
            prompts = [Prompt(q.user, p.system, given[(p.name, q.user)]) for q in qs
                       if given[(p.name, q.user)].strip()]
            dropped[f"{p.name}/{part}"] = len(qs) - len(prompts)
            if not prompts:
                raise DataError(f"persona {p.name!r} gave only empty replies to its {part} questions; "
                                "ask more questions or allow more new tokens")
            sets.append(PromptSet(f"{p.name}[{part}]", tuple(prompts), "persona replies"))
            records += [{"persona": p.name, "system": p.system, "user": x.user, "reply": x.reply, "split": part}
                        for x in prompts]
    acts = collect_sets(model, sets, layers=config.layers, positions="reply", batch_size=config.batch_size,
                        template=template, keep_per_prompt=True, cache_dir=cache_dir, progress=progress,
                        executor=executor)
    by_name = {p.name: (acts[2 * i], acts[2 * i + 1]) for i, p in enumerate(personas)}
    role_names = [p.name for p in personas if p.kind != "default"]
    default_names = [p.name for p in personas if p.kind == "default"]
    space = persona_space(
        {n: by_name[n][0] for n in role_names}, {n: by_name[n][0] for n in default_names},
        held_out=({n: by_name[n][1] for n in role_names}, {n: by_name[n][1] for n in default_names}),
        n_components=config.n_components, groups={p.name: p.group for p in personas},
        kinds={p.name: p.kind for p in personas},
        questions={"source": questions.source, "fingerprint": questions.fingerprint(), "build": len(build),
                   "held_out": len(held)},
        personas=len(role_names), default_points=default_names)
    meta = {
        "model": model.cfg.model_name, "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
        "lens_roles": __version__, "template": template, "config": config.to_dict(),
        "personas": [{"name": p.name, "kind": p.kind, "group": p.group, "system": p.system} for p in personas],
        "questions": {"source": questions.source, "build": [q.user for q in build], "held_out": [q.user for q in held]},
        "replies": source,
        "dropped_empty_replies": {k: v for k, v in dropped.items() if v},
    }
    return PersonaSpaceResult(space, space.table(), space.points(), records, meta)


def map_layer(result: PersonaSpaceResult) -> int:
    """The layer of the 3-D map: ``config.map_layer``, else the middle layer read."""
    layer = result.meta["config"].get("map_layer")
    layers = result.space.layers
    if layer is None:
        return layers[len(layers) // 2]
    if layer not in layers:
        raise DataError(f"map layer {layer} was not read (layers read: {list(layers)})")
    return layer


def write_persona_space(result: PersonaSpaceResult, out: str | Path, *, png: bool = True) -> list[Path]:
    """Write the axis, PC1, the per-layer table, the points, the replies, provenance and figures into ``out``."""
    out = Path(out)
    layer = map_layer(result)
    written = [result.space.axis.save(out / "assistant_axis.safetensors"),
               result.space.pc_direction(1).save(out / "persona_pc1.safetensors"),
               write_csv(result.table, out / "persona_space.csv"),
               write_csv(result.points, out / "points.csv")]
    written.append(atomic_write(out / "replies.jsonl", lambda tmp: Path(tmp).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.replies))))
    written.append(atomic_write(out / "persona_space.json",
                                lambda tmp: Path(tmp).write_text(json.dumps(result.meta, indent=2, default=str))))
    row = result.table[result.table.layer == layer].iloc[0]
    model = result.meta["model"]
    variance = (row.var_pc1, row.var_pc2, row.var_pc3)
    fig = persona_map_3d(result.points, layer=layer, variance=variance,
                         subtitle=f"{model} · {int(row.n_roles)} personas · cos(axis, PC1) {row.cos_axis_pc1:+.2f} · "
                                  f"held-out AUC {row.auc:.2f}")
    written += save_figure(fig, out / "persona_map", meta=result.meta, png=png)
    fig = variance_explained(result.table, subtitle=f"{model} · role vectors from build questions, AUC on "
                                                    "held-out questions")
    written += save_figure(fig, out / "variance_explained", meta=result.meta, png=png)
    return written
