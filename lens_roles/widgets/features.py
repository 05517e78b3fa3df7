"""The feature explorer: which SAE features make up a direction, what they mean, and steering with one.

For an SAE and a direction it lists, in one table, the features whose decoder rows
align best with the direction (:func:`~lens_roles.analysis.sae.features.feature_alignment`)
and, when prompts are given, those with the largest gradient × activation attribution
of the direction's projection at a later layer
(:func:`~lens_roles.analysis.sae.features.attribute_features`). Selecting a row shows
the feature's card (:mod:`lens_roles.analysis.sae.cards`: top-activating contexts with
shaded tokens, promoted and suppressed tokens, cosine with each role direction). The
**Steer** button hands the feature's unit decoder row, as a one-layer
:class:`~lens_roles.directions.direction.Direction` at the SAE's layer, to a steering
explorer shown below (:class:`~lens_roles.widgets.steering.SteeringExplorer`).

The cards of every listed feature come from one pass over the corpus, made when the
explorer is built. Without a live kernel :func:`feature_explorer` returns the static
alignment bars (``viz.sae.sae_alignment_bars``).
"""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import pandas as pd

from lens_roles.analysis.sae.cards import CARD_CSS, card_html, feature_cards
from lens_roles.analysis.sae.core import check_sae, decoder_directions
from lens_roles.analysis.sae.features import ProjectionMetric, attribute_features, feature_alignment
from lens_roles.directions.direction import Direction
from lens_roles.errors import SAEError
from lens_roles.inputs.prompts import as_prompts
from lens_roles.viz.sae import sae_alignment_bars
from lens_roles.widgets.common import live, ui
from lens_roles.widgets.steering import SteeringExplorer

SCOPE = "lens-roles-cards"


def scoped_css(css: str, scope: str = SCOPE) -> str:
    """``css`` with every selector put under ``.scope``, so the cards' rules style nothing else on the page."""
    rules = []
    for rule in css.split("}"):
        if "{" in rule:
            selectors, body = rule.split("{", 1)
            rules.append(",".join(f".{scope} {s.strip()}" for s in selectors.split(",")) + "{" + body + "}")
    return "".join(rules)


def feature_table(sae, direction: Direction, *, top: int = 10, attribution: pd.DataFrame | None = None
                  ) -> pd.DataFrame:
    """The listed features: the ``top`` best aligned and (given an attribution frame) the ``top``
    most attributed, one row each: ``feature, cosine, alignment_rank, attribution, attribution_rank``."""
    full = feature_alignment(sae, direction)
    full = full.rename(columns={"rank": "alignment_rank"})
    chosen = list(full.feature[:top])
    if attribution is not None:
        ranks = attribution.reset_index(drop=True).assign(attribution_rank=lambda f: f.index + 1)
        chosen += [f for f in ranks.feature[:top] if f not in chosen]
        full = full.merge(ranks[["feature", "attribution", "attribution_rank"]], on="feature", how="left")
    table = full.set_index("feature").loc[chosen].reset_index()
    return table


class FeatureExplorer:
    """The live feature explorer (see the module docs); :attr:`widget` is what the notebook shows.

    Args:
        model, sae, direction: the model, a residual-stream SAE that fits it, a direction with a
            vector at the SAE's layer.
        sequences: corpus token ids (BOS first) for the cards' contexts.
        prompts: prompts for the attribution (None: alignment only).
        metric_layer: where the attribution's projection is read (default: the model's last layer).
        directions: name → direction, for the cards' role cosines.
        steering: the steering explorer to send features to (default: a new one on ``steer_prompts``).
        steer_prompts: prompts of that new steering explorer.
    """

    def __init__(self, model, sae, direction: Direction, sequences: Sequence[Sequence[int]], *,
                 prompts=None, metric_layer: int | None = None, directions: Mapping[str, Direction] | None = None,
                 top: int = 10, n_contexts: int = 4, steering: SteeringExplorer | None = None,
                 steer_prompts: Sequence[str] | None = None, name: str | None = None):
        w = ui()
        self.model, self.sae, self.direction = model, sae, direction
        self.layer = check_sae(sae, model)
        if self.layer not in direction:
            raise SAEError(f"the direction has no vector at the SAE's layer {self.layer} "
                           f"(it has {list(direction.layers)})")
        self.name = name or str(direction.meta.get("name") or "direction")
        attribution = None
        if prompts is not None:
            metric = ProjectionMetric(direction, model.cfg.n_layers - 1 if metric_layer is None else metric_layer)
            attribution = attribute_features(model, sae, as_prompts(prompts), metric)
        self.table = feature_table(sae, direction, top=top, attribution=attribution)
        cards = feature_cards(model, sae, list(self.table.feature), sequences,
                              directions=dict(directions or {}, **{self.name: direction}), n_contexts=n_contexts)
        self.cards = {c.feature: c for c in cards}
        self.select = w.Select(options=[(self.row_label(r), int(r.feature)) for r in self.table.itertuples()],
                               rows=min(12, len(self.table)), description="feature",
                               layout=w.Layout(width="95%"))
        self.card = w.HTML()
        self.steer_button = w.Button(description="Steer with this feature", icon="arrow-right",
                                     layout=w.Layout(width="auto"))
        if steering is None:
            if steer_prompts is None:
                raise SAEError("give steer_prompts (a few user turns) or a steering explorer to steer features with")
            steering = SteeringExplorer(model, {self.name: direction}, steer_prompts, layer=self.layer)
        self.steering = steering
        header = w.HTML(f"<b>{html.escape(self.name)}</b>: SAE features at layer {self.layer} — "
                        "<code>cos</code> = cosine of the decoder row with the direction, <code>attr</code> = "
                        "gradient × activation attribution of its projection")
        self.widget = w.VBox([header, self.select, self.steer_button, self.card,
                              w.HTML("<b>Steering explorer</b>"), steering.widget])
        self.select.observe(lambda change: self.show(change["new"]), "value")
        self.steer_button.on_click(lambda _: self.steer_with(self.select.value))
        self.show(self.select.value)

    @staticmethod
    def row_label(row) -> str:
        attr = getattr(row, "attribution", float("nan"))
        rank = getattr(row, "attribution_rank", float("nan"))
        attr_text = "" if pd.isna(attr) else f"  attr {attr:+.3g} (#{int(rank)})"
        return f"f{int(row.feature):<6d} cos {row.cosine:+.3f} (#{int(row.alignment_rank)}){attr_text}"

    def show(self, feature: int) -> None:
        """Show ``feature``'s card."""
        self.card.value = (f"<style>{scoped_css(CARD_CSS)}</style><div class='{SCOPE}'>"
                           f"{card_html(self.cards[int(feature)])}</div>")

    def feature_direction(self, feature: int) -> Direction:
        """The feature's unit decoder row as a one-layer direction at the SAE's layer."""
        row = decoder_directions(self.sae)[int(feature)]
        return Direction([self.layer], row[None], {"name": f"{self.name} SAE feature {int(feature)}",
                                                   "method": "sae_decoder_row", "feature": int(feature)})

    def steer_with(self, feature: int) -> str:
        """Send ``feature``'s decoder row to the steering explorer (it starts a run); returns its name there."""
        name = f"feature {int(feature)}"
        self.steering.add_direction(name, self.feature_direction(feature), layer=self.layer)
        return name


def feature_explorer(model, sae, direction: Direction, sequences: Sequence[Sequence[int]], *,
                     live_kernel: bool | None = None, **options):
    """The feature explorer (see the module docs).

    Returns the explorer's ``widget`` (``widget.explorer`` is the :class:`FeatureExplorer`)
    in a live kernel; without one, the static bars of the best-aligned features.
    """
    if not live(live_kernel):
        top = feature_alignment(sae, direction, top=options.get("top", 10))
        name = options.get("name") or str(direction.meta.get("name") or "direction")
        return sae_alignment_bars({f"{name}, layer {check_sae(sae, model)}": top})
    explorer = FeatureExplorer(model, sae, direction, sequences, **options)
    explorer.widget.explorer = explorer
    explorer.steering.update()
    return explorer.widget
