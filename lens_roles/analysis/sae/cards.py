"""Feature cards: what an SAE feature means, on one HTML page per feature set.

For each feature a card shows

* its **top-activating contexts** in a corpus (by default the SAE's own training
  corpus), a window of tokens around the peak, each token shaded by the
  feature's activation there;
* its **output tokens**: the decoder row through the unembedding (``d_i · W_U``),
  the ten most promoted and most suppressed tokens — the direct path only,
  ignoring the final norm's per-token scale and everything the feature does
  through later layers;
* its **alignment with each role**: ``cos(d_i, v_role)`` at the SAE's layer, for
  the directions given;
* its density (fraction of corpus tokens where it fires) and its largest activation.

:func:`feature_cards` computes the cards (plain data, testable); :func:`write_cards`
renders them as one self-contained HTML page.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lens_roles.analysis.sae.core import check_sae, decoder_directions
from lens_roles.directions.direction import Direction
from lens_roles.errors import SAEError
from lens_roles.io import atomic_write
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.capture import capture


@dataclass(frozen=True)
class Context:
    """One activating context: tokens of a window and the feature's activation on each."""

    sequence: int
    position: int
    peak: float
    tokens: tuple[str, ...]
    activations: tuple[float, ...]


@dataclass(frozen=True)
class Card:
    feature: int
    density: float
    max_activation: float
    contexts: tuple[Context, ...]
    promoted: tuple[tuple[str, float], ...]
    suppressed: tuple[tuple[str, float], ...]
    alignment: Mapping[str, float]
    note: str = ""


@torch.no_grad()
def feature_cards(model, sae, features: Sequence[int], sequences: Sequence[Sequence[int]], *,
                  directions: Mapping[str, Direction] | None = None, n_contexts: int = 6, window: int = 12,
                  n_tokens: int = 10, batch_size: int = 16, notes: Mapping[int, str] | None = None,
                  progress: bool = False) -> list[Card]:
    """Cards for ``features`` of ``sae`` over the corpus ``sequences`` (token ids, BOS first).

    ``progress`` shows a bar over the corpus pass.
    """
    layer = check_sae(sae, model)
    feats = torch.as_tensor([int(f) for f in features], dtype=torch.long)
    if len(feats) and (feats.min() < 0 or feats.max() >= sae.cfg.d_sae):
        raise SAEError(f"features must be in 0..{sae.cfg.d_sae - 1} for this SAE, got {feats.tolist()}")
    per_seq: dict[int, torch.Tensor] = {}
    fired = torch.zeros(len(feats))
    n_tok = 0

    def feature_acts(x, weights, at):  # the chosen features' activations at positions 1..: [batch, pos - 1, feature]
        return sae.encode(x[:, 1:].to(sae.dtype))[..., feats.to(sae.device)].float().cpu()

    for batch in token_batches(model, sequences, batch_size, progress=progress, desc="feature cards"):
        with capture(model, [layer], feature_acts) as cap:
            batch.forward(model, stop_at_layer=cap.stop_at_layer)
        acts = cap[layer]
        for row, (i, n) in enumerate(zip(batch.index, batch.lengths)):
            a = acts[row, : n - 1]  # positions 1..len-1
            per_seq[i] = a
            fired += (a > 0).sum(0)
            n_tok += len(a)
    w_u = model.W_U.detach().float().cpu()
    rows = decoder_directions(sae)[feats]
    logits = rows @ w_u
    unit = {name: d.unit(layer).float().cpu() for name, d in (directions or {}).items() if layer in d}
    tok = model.tokenizer
    cards = []
    for j, feature in enumerate(feats.tolist()):
        peaks = [(float(a[:, j].max()), i, int(a[:, j].argmax())) for i, a in per_seq.items() if len(a)]
        peaks = sorted((p for p in peaks if p[0] > 0), reverse=True)[:n_contexts]
        contexts = []
        for peak, i, pos in peaks:
            seq = sequences[i]
            at = pos + 1  # token index in the sequence
            lo, hi = max(1, at - window), min(len(seq), at + window // 3 + 1)
            contexts.append(Context(i, at, peak, tuple(tok.decode([t]) for t in seq[lo:hi]),
                                    tuple(float(v) for v in per_seq[i][lo - 1:hi - 1, j])))
        top = torch.topk(logits[j], n_tokens)
        bottom = torch.topk(-logits[j], n_tokens)
        cards.append(Card(
            feature=feature, density=float(fired[j] / max(n_tok, 1)),
            max_activation=peaks[0][0] if peaks else 0.0, contexts=tuple(contexts),
            promoted=tuple((tok.decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices)),
            suppressed=tuple((tok.decode([int(t)]), float(-v)) for v, t in zip(bottom.values, bottom.indices)),
            alignment={name: float(rows[j] @ u) for name, u in unit.items()},
            note=(notes or {}).get(feature, "")))
    return cards


def _token_html(text: str, act: float, peak: float) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    shown = html.escape(text).replace("\n", "⏎")
    return (f'<span class="t" style="background: rgba(255, 120, 0, {alpha:.2f})" '
            f'title="{act:.2f}">{shown or "&nbsp;"}</span>')


#: the style rules the card HTML (:func:`card_html`) uses
CARD_CSS = (".card{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}"
            ".ctx{font-family:ui-monospace,monospace;font-size:13px;margin:.3em 0;white-space:pre-wrap}"
            ".t{border-radius:2px}.tok{font-family:ui-monospace,monospace;background:#eef;padding:0 3px;"
            "margin:0 2px}.neg{background:#fee}table{border-collapse:collapse}"
            "td,th{padding:2px 8px;text-align:left}h2{margin:.2em 0}.muted{color:#666}")


def card_html(c: Card) -> str:
    """One card as an HTML fragment (a ``div.card``; style rules in :data:`CARD_CSS`)."""
    parts = [f"<div class='card' id='f{c.feature}'><h2>Feature {c.feature}</h2>"]
    if c.note:
        parts.append(f"<p>{html.escape(c.note)}</p>")
    parts.append(f"<p class='muted'>density {c.density:.3g} of corpus tokens · max activation "
                 f"{c.max_activation:.2f}</p>")
    if c.alignment:
        cells = "".join(f"<td>{html.escape(k)}</td><td>{v:+.3f}</td>" for k, v in c.alignment.items())
        parts.append(f"<table><tr><th>cosine with</th>{cells}</tr></table>")
    promoted = "".join(f"<span class='tok'>{html.escape(t)}</span>" for t, _ in c.promoted)
    suppressed = "".join(f"<span class='tok neg'>{html.escape(t)}</span>" for t, _ in c.suppressed)
    parts.append(f"<p>promotes {promoted}</p><p>suppresses {suppressed}</p>")
    if not c.contexts:
        parts.append("<p class='muted'>never fires on this corpus</p>")
    for ctx in c.contexts:
        toks = "".join(_token_html(t, a, ctx.peak) for t, a in zip(ctx.tokens, ctx.activations))
        parts.append(f"<div class='ctx'><span class='muted'>[{ctx.peak:.2f}]</span> {toks}</div>")
    parts.append("</div>")
    return "".join(parts)


def write_cards(cards: Sequence[Card], path: str | Path, *, title: str, subtitle: str = "",
                meta: dict | None = None) -> Path:
    """One self-contained HTML page with a card per feature (and ``path`` ``.json`` with the data)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             f"{CARD_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(subtitle)}</p>",
             "<p class='muted'>Shading: the feature's activation on each token relative to the context's "
             "peak (hover for the value). Output tokens: decoder row · W_U (direct path only).</p>"]
    parts += [card_html(c) for c in cards]
    parts.append("</body></html>")
    path = Path(path)
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(
        json.dumps({"meta": meta or {}, "cards": [asdict(c) for c in cards]}, indent=1, default=str)))
    return atomic_write(path, lambda tmp: Path(tmp).write_text("".join(parts), encoding="utf-8"))
