"""The persona-drift study on one model: drift per category, capping's effect and cost, the
projection-vs-behaviour correlation, and one drift explained. Written to a folder.

Steps (sizes are arguments, ``categories`` anything
:func:`~lens_roles.inputs.conversations.load_conversations` takes,
so the notebook's fast mode and the full run share the code):

1. **Axis.** The direction to monitor: the one passed in (e.g. the assistant axis of
   the persona space), or a *stand-in* built here with
   :func:`~lens_roles.directions.builders.diff_in_means`: the mean activation over the
   default assistant's own replies (no system prompt) minus the mean over its replies
   to the same instructions under ``"You are a <role>."`` system prompts, for the
   shipped roles (``data/roles``), read at the reply tokens.
2. **Capping range.** :func:`~lens_roles.interventions.steering.cap_range` over the
   default assistant's replies at ``cap_layers`` (quantile ``cap_quantile`` from
   below, open above: the axis points towards the assistant, and drift goes down).
3. **Drift.** :func:`~lens_roles.measures.drift.drift_traces` on the shipped
   conversations with their written replies, read uncapped (``given``) and capped
   (``given+cap``), and with the model's own replies
   (:func:`~lens_roles.measures.drift.self_play`; the first ``n_self`` conversations of
   each category, all when None) generated and read uncapped (``self``) and capped
   (``self+cap``); ``drift_table.csv`` per condition × category.
4. **Cost of capping.** :func:`~lens_roles.measures.drift.cap_cost` on ordinary
   prompts (``roles/baseline``) with the model's own replies; persona adherence
   (mean librarian log-prob margin) with and without the cap.
5. **Projection vs behaviour.** A librarian persona vector from the first half of the
   pairs; on the held-out half, under three system prompts, the projection at the
   last prompt token against the reply margin
   (:func:`~lens_roles.measures.screening.projection_behaviour`, :func:`correlation`).
6. **One drift explained.** The self-play conversation with the most negative drift:
   :func:`~lens_roles.analysis.drift.explain_drift` of its last turn.

Outputs: ``summary.json`` (every number), ``drift_table.csv``, ``drift.csv``, ``turns.csv``,
``correlation.csv``, ``explain_grid.csv``, ``conversations_self.jsonl`` and figures.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd

from lens_roles._version import __version__
from lens_roles.analysis.drift import explain_drift
from lens_roles.directions.builders import diff_in_means, persona_vector
from lens_roles.directions.direction import Direction
from lens_roles.inputs.conversations import load_conversations
from lens_roles.inputs.prompts import Prompt, available_roles, load_baseline, load_pairs, load_role
from lens_roles.interventions.steering import cap, cap_range
from lens_roles.io import atomic_write, write_csv
from lens_roles.measures.drift import cap_cost, drift_summary, drift_table, drift_traces, self_play
from lens_roles.measures.screening import correlation, projection_behaviour
from lens_roles.runtime.activations import collect
from lens_roles.runtime.generation import generate
from lens_roles.runtime.models import model_id
from lens_roles.studies.reporting import report
from lens_roles.viz.drift import drift_bars, turn_layer_heatmap, turn_trace
from lens_roles.viz.export import save_figure

LIBRARIAN_SYSTEMS = (None, "You are a warm, patient librarian who loves helping every patron.",
                     "You are a rude, impatient librarian who hates helping people.")


def standin_axis(model, *, n_roles: int = 8, per_role: int = 2, max_new_tokens: int = 24, layers=None,
                 batch_size: int = 16) -> tuple[Direction, list[Prompt]]:
    """A stand-in assistant axis: mean(default replies) − mean(role-played replies), per layer.

    The first ``per_role`` instructions of the first ``n_roles`` shipped roles are
    answered by the model twice: with no system prompt (the default assistant) and
    under ``"You are a <role>."``; both sets are read at their reply tokens. Returns
    the direction and the default assistant's prompts with their replies.
    """
    roles = available_roles()[:n_roles]
    users, systems = [], []
    for role in roles:
        for p in load_role(role).prompts[:per_role]:
            users.append(p.user)
            systems.append(f"You are a {role.replace('_', ' ')}.")
    default = [Prompt(u) for u in users]
    played = [Prompt(u, s) for u, s in zip(users, systems)]
    replies = []
    for group in (default, played):
        out = []
        for start in range(0, len(group), batch_size):
            out += generate(model, group[start : start + batch_size], max_new_tokens=max_new_tokens)
        replies.append([g.text.strip() or "…" for g in out])
    default = [Prompt(p.user, p.system, r) for p, r in zip(default, replies[0])]
    played = [Prompt(p.user, p.system, r) for p, r in zip(played, replies[1])]
    a = collect(model, default, layers=layers, positions="reply", batch_size=batch_size)
    b = collect(model, played, layers=layers, positions="reply", batch_size=batch_size)
    axis = diff_in_means(a, b, name="assistant axis (stand-in)", roles=roles, per_role=per_role,
                         note="mean default-assistant reply activation minus mean role-played reply activation")
    return axis, default


def run_drift_study(model, *, out: Path, read_layer: int, cap_layers, direction: Direction | None = None,
                    categories=None, n_roles: int = 8, per_role: int = 2, n_ordinary: int = 8,
                    max_new_tokens: int = 24, cap_quantile: float = 0.25, explain_layers=None,
                    n_pairs: int | None = None, n_self: int | None = None, n_boot: int = 2000, batch_size: int = 12,
                    progress: bool = True) -> dict:
    """Run the study (module docs) and write its outputs to ``out``; returns the summary dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": model_id(model), "read_layer": read_layer, "cap_layers": list(cap_layers),
                     "cap_quantile": cap_quantile, "max_new_tokens": max_new_tokens, "lens_roles": __version__}
    layers = sorted({read_layer, *cap_layers})
    if direction is None:
        direction, default = standin_axis(model, n_roles=n_roles, per_role=per_role,
                                          max_new_tokens=max_new_tokens, layers=layers, batch_size=batch_size)
        summary["axis"] = "stand-in: " + direction.meta["note"]
    else:
        _, default = standin_axis(model, n_roles=n_roles, per_role=per_role, max_new_tokens=max_new_tokens,
                                  layers=layers, batch_size=batch_size)
        summary["axis"] = str(direction.meta.get("name"))
    direction.save(out / "axis.safetensors")
    bounds = cap_range(model, default, direction, layers=cap_layers, quantiles=(cap_quantile, None))
    summary["cap_bounds"] = {str(k): v for k, v in bounds.items()}
    report(progress, f"cap bounds (low, high) per layer: {summary['cap_bounds']}")

    # ---- drift: given replies, own replies, own replies under the cap
    convs = load_conversations(categories)
    traces = {"given": drift_traces(model, convs, direction, layers=[read_layer], batch_size=batch_size)}
    with cap(model, direction, bounds, layers=cap_layers):
        traces["given+cap"] = drift_traces(model, convs, direction, layers=[read_layer], batch_size=batch_size)
    if n_self is not None:  # the first n_self conversations of each category play themselves
        kept: dict[str, list] = {}
        for c in convs:
            kept.setdefault(c.category, []).append(c)
        convs = [c for group in kept.values() for c in group[:n_self]]
    played = {}
    for cond in ("self", "self+cap"):
        with cap(model, direction, bounds, layers=cap_layers) if cond == "self+cap" else contextlib.nullcontext():
            played[cond] = self_play(model, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
            traces[cond] = drift_traces(model, played[cond], direction, layers=[read_layer], batch_size=batch_size)
    drift = pd.concat([drift_summary(t, read_layer).assign(condition=c) for c, t in traces.items()],
                      ignore_index=True)
    table = drift_table(drift, n_boot=n_boot)
    turns = pd.concat([tr.assistant_turns(read_layer).assign(condition=c) for c, ts in traces.items() for tr in ts],
                      ignore_index=True)
    write_csv(drift, out / "drift.csv")
    write_csv(table, out / "drift_table.csv")
    write_csv(turns, out / "turns.csv")
    for cond, cs in played.items():
        text = "".join(json.dumps(c.to_record()) + "\n" for c in cs)
        atomic_write(out / f"conversations_{cond.replace('+', '_')}.jsonl", lambda t, s=text: Path(t).write_text(s))
    summary["drift_table"] = table.to_dict(orient="records")
    for rec in table.itertuples():
        report(progress, f"drift {rec.condition:9s} {rec.category:11s} {rec.mean:+.3f} "
                         f"[{rec.low:+.3f}, {rec.high:+.3f}]")
    sub = f"{model_id(model)}, {direction.meta.get('name')} after layer {read_layer}"
    save_figure(drift_bars(table, subtitle=sub), out / "drift", meta=summary)
    save_figure(turn_trace(turns[turns.condition != "given"], subtitle=sub), out / "turns", meta=summary)

    # ---- cost of capping on ordinary prompts, and persona adherence
    ordinary = [p.user for p in load_baseline().prompts[:n_ordinary]]
    own = generate(model, ordinary, max_new_tokens=max_new_tokens)
    replies = [Prompt(u, reply=g.text.strip() or "…") for u, g in zip(ordinary, own)]
    summary["cap_cost"] = cap_cost(model, replies, direction, bounds, layers=cap_layers, batch_size=batch_size)
    report(progress, f"cap cost on ordinary replies: {summary['cap_cost']}")
    pairs = load_pairs("librarian")
    train, held = pairs.split(0.5)
    held = held.head(n_pairs)
    persona = persona_vector(model, train, layers=[read_layer], batch_size=batch_size)
    margins = {}
    for cond in ("uncapped", "capped"):
        with cap(model, direction, bounds, layers=cap_layers) if cond == "capped" else contextlib.nullcontext():
            frame = projection_behaviour(model, held, persona, read_layer, systems=LIBRARIAN_SYSTEMS,
                                         batch_size=batch_size)
        margins[cond] = frame
    summary["adherence"] = {c: float(f[f.system == ""].margin.mean()) for c, f in margins.items()}
    report(progress, f"librarian margin (no system prompt), uncapped vs capped: {summary['adherence']}")

    # ---- projection at the last prompt token vs the reply's persona margin (uncapped)
    frame = margins["uncapped"]
    write_csv(frame, out / "correlation.csv")
    summary["correlation"] = correlation(frame.projection, frame.margin, n_boot=n_boot)
    summary["correlation_by_system"] = {s or "none": float(g.margin.mean()) for s, g in frame.groupby("system")}
    report(progress, f"projection vs margin: {summary['correlation']}")

    # ---- one drift explained: the most negative self-play drift
    worst = drift[drift.condition == "self"].sort_values("change").iloc[0]
    conv = next(c for c in played["self"] if c.id == worst.conversation)
    exp = explain_drift(model, conv, direction, read_layer, layers=explain_layers, attribution=False)
    write_csv(exp.grid, out / "explain_grid.csv")
    summary["explained"] = {"conversation": conv.id, "change": float(worst.change),
                            "clean_value": exp.clean_value, "corrupt_value": exp.corrupt_value,
                            "by_message": {str(k): {str(c): round(float(v), 3) for c, v in row.items()}
                                           for k, row in exp.by_message().iterrows()}}
    save_figure(turn_layer_heatmap(exp.grid, subtitle=f"{conv.id}, last turn; {sub}"), out / "explain_heatmap",
                meta={k: v for k, v in summary.items() if k != "drift_table"})
    atomic_write(out / "summary.json", lambda t: Path(t).write_text(json.dumps(summary, indent=2, default=str)))
    return summary


__all__ = ["standin_axis", "run_drift_study", "LIBRARIAN_SYSTEMS"]
