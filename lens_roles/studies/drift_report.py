"""The drift monitor and the data screen written to a folder (``lens-roles monitor`` / ``lens-roles screen``).

:func:`run_monitor` writes, for conversations and a direction:

* ``turns.csv`` — per conversation, layer and message: mean projection (``DriftTrace.turns``);
* ``tokens.csv`` — per conversation and token at the read layer: the projection;
* ``drift.csv`` — per conversation at the read layer: first, last, change;
* ``drift_table.csv`` — per category: mean change with its bootstrap interval;
* ``conversations.jsonl`` — the conversations read (with the model's own replies under ``self_play``);
* figures ``turns``, ``drift`` and ``tokens_<conversation>`` (the first conversation's token view).

With ``bounds`` the replies are generated and read under activation capping
(:func:`~lens_roles.interventions.steering.cap`), so the same command shows drift
with and without it.

:func:`run_screen` writes ``ranking.csv`` (:func:`~lens_roles.measures.screening.screen`)
and ``screen_histogram``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from lens_roles._version import __version__
from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.conversations import Conversation
from lens_roles.interventions.steering import cap, check_direction
from lens_roles.io import atomic_write, write_csv
from lens_roles.measures.drift import drift_summary, drift_table, drift_traces, self_play
from lens_roles.measures.screening import screen
from lens_roles.runtime.models import model_id
from lens_roles.studies.reporting import report
from lens_roles.viz.drift import drift_bars, screen_histogram, token_view, turn_trace
from lens_roles.viz.export import save_figure


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60] or "conversation"


def run_monitor(model, conversations: Sequence[Conversation], direction: Direction, *, read_layer: int,
                layers=None, out: Path, use_self_play: bool = False, max_new_tokens: int = 48,
                temperature: float = 0.0, seed: int = 0, bounds=None, cap_layers=None, batch_size: int = 4,
                progress: bool = True) -> pd.DataFrame:
    """Measure drift on ``conversations`` (their own replies, or the model's with ``use_self_play``) and write
    the outputs listed in the module docs to ``out``; returns the drift table.

    Raises:
        DirectionError: a direction that does not fit the model, before anything runs.
        DataError: no conversations, or a read layer not among ``layers``.
    """
    layers = check_direction(model, direction, sorted({*(layers or direction.layers), read_layer}))
    if bounds is not None:
        check_direction(model, direction, cap_layers)
    conversations = list(conversations)
    if not conversations:
        raise DataError("no conversations to monitor")
    out = Path(out)
    with contextlib.ExitStack() as stack:
        if bounds is not None:
            stack.enter_context(cap(model, direction, bounds, layers=cap_layers))
        if use_self_play:
            conversations = self_play(model, conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                      seed=seed, batch_size=batch_size)
        traces = drift_traces(model, conversations, direction, layers=layers, batch_size=batch_size)
    turns = pd.concat([t.turns() for t in traces], ignore_index=True)
    tokens = pd.concat([t.token_frame(read_layer).assign(conversation=t.conversation.id,
                                                         category=t.conversation.category) for t in traces],
                       ignore_index=True)
    summary = drift_summary(traces, read_layer)
    table = drift_table(summary)
    meta = {"model": model_id(model), "direction": direction.meta.get("name"), "read_layer": read_layer,
            "layers": list(layers), "self_play": use_self_play, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed, "lens_roles": __version__,
            "cap": None if bounds is None else {"bounds": str(bounds), "layers": cap_layers}}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(turns, out / "turns.csv")
    write_csv(tokens, out / "tokens.csv")
    write_csv(summary, out / "drift.csv")
    write_csv(table, out / "drift_table.csv")
    lines = "".join(json.dumps(c.to_record()) + "\n" for c in conversations)
    atomic_write(out / "conversations.jsonl", lambda t: Path(t).write_text(lines))
    sub = f"{model_id(model)}, {direction.meta.get('name', 'direction')} after layer {read_layer}"
    assistant = turns[(turns.role == "assistant") & (turns.layer == read_layer)]
    save_figure(turn_trace(assistant, subtitle=sub), out / "turns", meta=meta)
    save_figure(drift_bars(table, subtitle=sub), out / "drift", meta=meta)
    first = traces[0]
    save_figure(token_view(first.token_frame(read_layer), title=f"Projection per token — {first.conversation.id}",
                           subtitle=sub), out / f"tokens_{_safe(first.conversation.id)}", meta=meta)
    for rec in table.itertuples():
        report(progress, f"{rec.category}: drift {rec.mean:+.3f} [{rec.low:+.3f}, {rec.high:+.3f}] (n={rec.n})")
    return table


def run_screen(model, records: Sequence[tuple[str, str]], direction: Direction, *, layer: int, out: Path,
               max_new_tokens: int = 48, batch_size: int = 8, top: int = 5, progress: bool = True) -> pd.DataFrame:
    """Screen ``records`` (:func:`~lens_roles.measures.screening.screen`) and write ``ranking.csv`` and the
    histogram to ``out``; returns the ranking."""
    ranking = screen(model, records, direction, layer, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(ranking, out / "ranking.csv")
    meta = {"model": model_id(model), "direction": direction.meta.get("name"), "layer": layer,
            "n_records": len(ranking), "max_new_tokens": max_new_tokens, "lens_roles": __version__}
    save_figure(screen_histogram(ranking, top=top, subtitle=f"{model_id(model)}, layer {layer}"),
                out / "screen_histogram", meta=meta)
    for rec in ranking.head(top).itertuples():
        report(progress, f"#{rec.rank} score {rec.score:+.3f}: {rec.prompt[:50]!r}")
    return ranking


__all__ = ["run_monitor", "run_screen"]
