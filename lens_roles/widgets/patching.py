"""The patching explorer: a patching heatmap to hover and click.

The heatmap is :func:`lens_roles.viz.patching.patch_heatmap` of one or more
:class:`~lens_roles.analysis.patching.PatchResult` s, as a pane-fitted plotly
``FigureWidget``: hovering a cell shows its layer, its token (``clean|corrupt`` where
the prompts differ) or head, and its value. Clicking a cell patches that one site
into the corrupt run (:meth:`~lens_roles.analysis.patching.PatchSetup.next_token_logprobs`)
and lists the patched run's most likely next tokens beside the clean and the corrupt
run's, with their probabilities.

Without a live kernel :func:`patching_explorer` returns the static heatmap.
"""

from __future__ import annotations

import html
from typing import Sequence

import torch

from lens_roles.analysis.patching.grids import get_grid
from lens_roles.analysis.patching.result import PatchResult
from lens_roles.analysis.patching.runs import PatchSetup
from lens_roles.errors import PatchingError
from lens_roles.viz.patching import patch_heatmap
from lens_roles.widgets.common import figure_widget, live, ui


def cell_sites(setup: PatchSetup, result: PatchResult, layer: int, pos: int | None = None,
               head: int | None = None) -> dict:
    """The sites one cell of ``result`` patches, as :meth:`PatchSetup.patch` takes them.

    A position grid's cell is one position of one layer's hook; a per-layer cell
    patches every position of the result at that layer; a head cell, that head at
    every position of the result.
    """
    spec = get_grid(result.grid)
    name = spec.hook.format(layer=layer)
    if "pos" in spec.axes:
        if pos is None:
            raise PatchingError(f"a cell of the {result.grid!r} grid needs a position")
        return {name: [pos]}
    if "head" in spec.axes:
        if head is None:
            raise PatchingError(f"a cell of the {result.grid!r} grid needs a head")
        mask = torch.zeros(setup.n_prompt, setup.model.cfg.n_heads, dtype=torch.bool)
        mask[list(result.positions), head] = True
        return {name: mask}
    return {name: list(result.positions)}


#: the order of ``patch_heatmap``'s panels in each row: position grids, the per-layer grids, heads
POSITION_GRIDS = ("resid", "attn_pos", "mlp_pos")
LAYER_GRIDS = ("attn", "mlp")


def top_tokens(model, logp: torch.Tensor, k: int) -> list[tuple[str, float]]:
    """The ``k`` most likely tokens of a ``[d_vocab]`` log-probability vector, with their probabilities."""
    top = torch.topk(logp, k)
    return [(model.tokenizer.decode([int(t)]) if model.tokenizer is not None else str(int(t)), float(v.exp()))
            for v, t in zip(top.values, top.indices)]


class PatchingExplorer:
    """The live patching explorer; :attr:`widget` is the heatmap and the clicked cell's next tokens.

    Args:
        setup: the :class:`PatchSetup` the results came from (it reruns a clicked cell).
        results: the results to draw (e.g. ``setup.activation_patch("resid")``); clicks
            are answered for the first result of each grid drawn.
        k: how many next tokens to list.
    """

    def __init__(self, setup: PatchSetup, results: PatchResult | Sequence[PatchResult], *, k: int = 8,
                 title: str | None = None, subtitle: str | None = None):
        w = ui()
        self.setup, self.k = setup, int(k)
        self.results = [results] if isinstance(results, PatchResult) else list(results)
        if not self.results:
            raise PatchingError("the patching explorer needs at least one PatchResult")
        self.figure = patch_heatmap(self.results, title=title, subtitle=subtitle)
        self.heatmap = figure_widget(self.figure)
        self.tokens = w.HTML("<i>click a cell to patch it alone and see the next tokens</i>")
        self._reference = None
        for trace in self.heatmap.data:
            trace.on_click(self._clicked)
        self.widget = w.VBox([self.heatmap, self.tokens])

    def _result_of(self, trace, x) -> PatchResult:
        """The result a clicked heatmap trace shows.

        ``patch_heatmap`` lays out one row of panels per method (its hover text names
        it) and, per row, the position grids (in ``POSITION_GRIDS`` order), then one
        panel of the per-layer grids (the x label names the grid), then the heads:
        the trace's x axis says which panel it is in.
        """
        method = "attribution" if "attribution" in (trace.hovertemplate or "") else "activation"
        grids = {r.grid for r in self.results}
        panels = [g for g in POSITION_GRIDS if g in grids]
        panels += ["layer"] if grids & set(LAYER_GRIDS) else []
        panels += ["heads"] if "heads" in grids else []
        axis = trace.xaxis or "x"
        column = (int(axis[1:]) if len(axis) > 1 else 1) - 1
        panel = panels[column % len(panels)]
        grid = str(x) if panel == "layer" else panel
        for result in self.results:
            if result.method == method and result.grid == grid:
                return result
        raise PatchingError(f"the clicked panel ({method}, {grid!r}) matches none of the explorer's results")

    def _clicked(self, trace, points, state) -> None:
        """A click on a heatmap cell: patch that cell alone (runs in the kernel; one forward)."""
        if not points.xs:
            return
        layer, x = int(points.ys[0]), points.xs[0]
        result = self._result_of(trace, x)
        if "pos" in result.axes:
            self.select(result, layer, pos=int(str(x).split(" ", 1)[0]))
        elif "head" in result.axes:
            self.select(result, layer, head=int(x))
        else:
            self.select(result, layer)

    def select(self, result: PatchResult, layer: int, *, pos: int | None = None,
               head: int | None = None) -> list[tuple[str, float]]:
        """Patch one cell of ``result`` alone and show the patched run's top next tokens beside the clean
        and corrupt runs'. Returns the patched run's top tokens."""
        sites = cell_sites(self.setup, result, layer, pos, head)
        if self._reference is None:
            clean_sites = {f"blocks.{self.setup.first_layer}.hook_resid_pre": "all"}
            self._reference = (top_tokens(self.setup.model, self.setup.next_token_logprobs(clean_sites), self.k),
                               top_tokens(self.setup.model, self.setup.next_token_logprobs({}), self.k))
        patched = top_tokens(self.setup.model, self.setup.next_token_logprobs(sites), self.k)
        clean, corrupt = self._reference
        where = f"layer {layer}" + (f", position {pos} {result.tokens[pos]!r}" if pos is not None else "") + (
            f", head {head}" if head is not None else "") + f" ({result.grid}, {result.method})"

        def cell(pair):
            return f"<td><code>{html.escape(repr(pair[0]))}</code> {pair[1]:.3f}</td>"

        rows = "".join(f"<tr><td>{i + 1}</td>{cell(p)}{cell(c)}{cell(r)}</tr>"
                       for i, (p, c, r) in enumerate(zip(patched, clean, corrupt)))
        self.tokens.value = (f"<b>patched {html.escape(where)}</b> — next tokens after the prompt"
                             "<table><tr><th>#</th><th>patched run</th><th>clean run</th><th>corrupt run</th></tr>"
                             f"{rows}</table>")
        return patched


def patching_explorer(setup: PatchSetup, results: PatchResult | Sequence[PatchResult], *, k: int = 8,
                      title: str | None = None, subtitle: str | None = None, live_kernel: bool | None = None):
    """The patching explorer (see the module docs).

    Returns the explorer's ``widget`` (``widget.explorer`` is the :class:`PatchingExplorer`)
    in a live kernel; without one, the static heatmap (``patch_heatmap``).
    """
    explorer = PatchingExplorer(setup, results, k=k, title=title, subtitle=subtitle)
    if not live(live_kernel):
        return explorer.figure
    explorer.widget.explorer = explorer
    return explorer.widget
