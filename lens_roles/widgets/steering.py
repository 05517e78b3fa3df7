"""The steering explorer: pick a direction, a layer, α and positions, see what steering does.

For a few prompts it shows, side by side, the unsteered and the steered greedy
generations (:func:`~lens_roles.runtime.generation.generate` under
:func:`~lens_roles.interventions.steering.steer`), the next-token KL divergence
KL(unsteered ‖ steered) at each prompt's last token (the one readout,
:mod:`lens_roles.runtime.readout`), and the cosine between the steered and the
unsteered residual stream at every layer downstream of the steering (averaged
over the prompts' tokens, as :func:`~lens_roles.measures.sweeps.cosine_sweep` does).

α is absolute (residual units) or a multiple of the typical residual norm at the
steering layer (:func:`~lens_roles.interventions.steering.residual_norms` over the
explorer's prompts, measured once per layer). What does not depend on the setting
is computed once and kept: the unsteered generations per prompt, and per steering
layer the unsteered run of the prompts (:func:`shared_runs`, the branch-from-layer
machinery of :mod:`lens_roles.runtime.branching`). The KL and the cosine curve of a
new α, direction or positions then run only the blocks after the steering layer
(:func:`steered_readout`); only the steered generations run in full.

Every change runs in a background thread (:class:`~lens_roles.widgets.common.Runner`)
with a progress bar and a Cancel button; a new change cancels the run in progress.
All hooks live in ``with`` blocks around the forwards, so none is left on the model
after a run, a cancelled one included.

Without a live kernel :func:`steering_explorer` computes the initial setting once
and returns its static figure (:func:`snapshot_figure`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError, UsageError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import as_prompts
from lens_roles.interventions.steering import POSITION_MODES, residual_norms, steer, steering_hooks
from lens_roles.measures.sweeps import token_cosine_sum
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.branching import Branch, Shared, branch_batch, check_branch, shared_run
from lens_roles.runtime.capture import Capture
from lens_roles.runtime.generation import Generation, generate
from lens_roles.runtime.models import validate_layers
from lens_roles.runtime.readout import kl_divergence, logprobs_at
from lens_roles.viz.style import px_colors, style
from lens_roles.widgets.common import FigureOutput, Runner, Ticket, live, ui

MODES = {"× typical norm": "relative", "absolute": "absolute"}


@torch.no_grad()
def shared_runs(model, prompts, layer: int, *, batch_size: int = 8) -> list[Shared]:
    """The unsteered runs of ``prompts`` that every steering at ``layer`` branches from, one per batch.

    Each :class:`~lens_roles.runtime.branching.Shared` keeps ``resid_post`` ``[batch, pos, d_model]``
    at ``layer`` (where the branches start) and at every later layer (the unsteered reference of
    the cosine curve; the last one is the final residual, read out for the next token). The
    batches are those of :func:`~lens_roles.measures.sweeps.cosine_sweep` (in order, ``batch_size``
    prompts), so the curve is the sweep's.
    """
    items = encode(model, as_prompts(prompts))
    batches = token_batches(model, [it.tokens for it in items], batch_size, sort=False)
    return [shared_run(model, batch, range(layer, model.cfg.n_layers)) for batch in batches]


def last_positions(batch) -> Tensor:
    """Each row's last real position of a right-padded batch: ``[batch]``."""
    return torch.as_tensor(batch.lengths, device=batch.mask.device) - 1


@torch.no_grad()
def unsteered_logprobs(model, shared: Sequence[Shared], n_prompts: int) -> Float[Tensor, "prompt d_vocab"]:
    """The next-token log-probabilities after each prompt's last token, from the shared runs' final residual."""
    last = model.cfg.n_layers - 1
    out: list[Tensor | None] = [None] * n_prompts
    for run in shared:
        rows = torch.arange(len(run.batch.index), device=run.batch.mask.device)
        for i, lp in zip(run.batch.index, logprobs_at(model, run.resid[last][rows, last_positions(run.batch)])):
            out[i] = lp.cpu()
    return torch.stack(out)


@torch.no_grad()
def steered_readout(model, shared: Sequence[Shared], branch: Branch, n_prompts: int
                    ) -> tuple[Float[Tensor, " read_layer"], Float[Tensor, "prompt d_vocab"]]:
    """One steering setting, run from the shared runs: only the blocks after ``branch.layer`` run.

    Returns the cosine(steered, unsteered) at each layer from ``branch.layer`` on (mean over
    each prompt's real tokens, then over prompts, as in ``cosine_sweep``) and the steered
    next-token log-probabilities after each prompt (``[prompt, d_vocab]``, float32, CPU).
    """
    branch = check_branch(model, branch)
    n, layer = model.cfg.n_layers, branch.layer
    sums = torch.zeros(n - layer, dtype=torch.float64)
    logq: list[Tensor | None] = [None] * n_prompts
    for run in shared:
        cap = Capture(range(layer, n))
        branch_batch(model, run, branch, stop_at_layer=n, extra_hooks=cap.fwd_hooks())
        valid = run.batch.mask.bool()
        for down in range(layer, n):
            sums[down - layer] += token_cosine_sum(cap[down], run.resid[down], valid)
        rows = torch.arange(len(run.batch.index), device=valid.device)
        for i, lq in zip(run.batch.index, logprobs_at(model, cap[n - 1][rows, last_positions(run.batch)])):
            logq[i] = lq.cpu()
    return (sums / n_prompts).float(), torch.stack(logq)


@dataclass(frozen=True)
class Snapshot:
    """One setting of the explorer and what it gave.

    Attributes:
        direction, layer, alpha, alpha_mode, positions: the setting (``alpha_mode``
            ``"relative"``: α × the typical norm ``norm`` at ``layer``).
        prompts: the user turns.
        unsteered, steered: one generation per prompt.
        kl: ``[prompt]`` KL(unsteered ‖ steered) of the next token after each prompt.
        cosine: the :func:`cosine_sweep` rows of this setting (``read_layer, value``).
    """

    direction: str
    layer: int
    alpha: float
    alpha_mode: str
    norm: float | None
    positions: str
    prompts: tuple[str, ...]
    unsteered: tuple[Generation, ...]
    steered: tuple[Generation, ...]
    kl: tuple[float, ...]
    cosine: pd.DataFrame


def snapshot_figure(snap: Snapshot, history: Sequence[Snapshot] = ()) -> go.Figure:
    """The explorer's static view: generations side by side with the next-token KL, and the cosine curve.

    ``history``: earlier settings whose cosine curves are drawn faintly for comparison.
    """
    fig = make_subplots(rows=2, cols=1, row_heights=[0.55, 0.45], vertical_spacing=0.12,
                        specs=[[{"type": "table"}], [{"type": "xy"}]])
    fig.add_trace(go.Table(
        columnwidth=[2, 3, 3, 1],
        header=dict(values=["prompt", "unsteered", f"steered (α = {snap.alpha:g})", "next-token KL"],
                    align="left", font=dict(size=12)),
        cells=dict(values=[list(snap.prompts), [g.text.strip() for g in snap.unsteered],
                           [g.text.strip() for g in snap.steered], [f"{k:.3f}" for k in snap.kl]],
                   align="left", font=dict(size=11))), row=1, col=1)
    colours = px_colors(len(history) + 1)
    for colour, old in zip(colours, history):
        fig.add_trace(go.Scatter(x=old.cosine.read_layer, y=old.cosine.value, mode="lines", opacity=0.35,
                                 name=f"{old.direction} L{old.layer} α={old.alpha:g}", line=dict(color=colour)),
                      row=2, col=1)
    fig.add_trace(go.Scatter(x=snap.cosine.read_layer, y=snap.cosine.value, mode="lines+markers",
                             name=f"{snap.direction} L{snap.layer} α={snap.alpha:g}", line=dict(width=3),
                             hovertemplate="layer %{x}<br>cosine %{y:.4f}<extra></extra>"), row=2, col=1)
    fig.update_xaxes(title_text="downstream layer", row=2, col=1)
    fig.update_yaxes(title_text="cosine(steered, unsteered)", row=2, col=1)
    unit = f"× typical norm {snap.norm:.1f}" if snap.alpha_mode == "relative" else "residual units"
    fig.update_layout(width=1100, height=720)
    mean_kl = sum(snap.kl) / len(snap.kl)
    return style(fig, f"Steering with {snap.direction} at layer {snap.layer}, α = {snap.alpha:g} ({unit})",
                 f"positions: {snap.positions} · mean next-token KL {mean_kl:.3f} over {len(snap.prompts)} prompts")


class SteeringExplorer:
    """The live steering explorer (see the module docs); :attr:`widget` is what the notebook shows.

    Args:
        model: a HookedTransformer.
        directions: name → :class:`Direction` (or one direction).
        prompts: a few user turns.
        layer: the first steering layer shown (default: the middle layer the first direction has).
        alpha, alpha_mode: the first α, ``"relative"`` (× typical norm) or ``"absolute"``.
        alpha_max: the slider's range in absolute mode is ``±alpha_max`` (relative: ``±relative_max``).
        max_new_tokens: the generations' length.
    """

    def __init__(self, model, directions: Direction | Mapping[str, Direction], prompts: Sequence[str], *,
                 layer: int | None = None, alpha: float = 0.25, alpha_mode: str = "relative",
                 positions: str = "all", max_new_tokens: int = 24, alpha_max: float = 40.0,
                 relative_max: float = 1.0):
        w = ui()
        self.model = model
        self.directions: dict[str, Direction] = {}
        for name, d in (directions.items() if isinstance(directions, Mapping)
                        else [(str(directions.meta.get("name") or "direction"), directions)]):
            self.add_direction(name, d, select=False)
        if not self.directions:
            raise DirectionError("the steering explorer needs at least one direction")
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise UsageError("the steering explorer needs at least one prompt")
        if alpha_mode not in MODES.values():
            raise UsageError(f"alpha_mode must be 'relative' or 'absolute', got {alpha_mode!r}")
        if positions not in POSITION_MODES:
            raise UsageError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.alpha_max, self.relative_max = float(alpha_max), float(relative_max)
        first = next(iter(self.directions.values()))
        layers = self._layers(first)
        layer = layers[len(layers) // 2] if layer is None else validate_layers(model, [layer])[0]
        if layer not in layers:
            raise DirectionError(f"the direction has no vector at layer {layer} (it has {layers})")
        self._norms: dict[tuple[int, tuple[str, ...]], float] = {}
        self._base: dict[tuple[str, int], Generation] = {}
        # (layer, prompts) -> the unsteered shared runs and next-token log-probs every α branches from
        self._shared: dict[tuple[int, tuple[str, ...]], tuple[list[Shared], Tensor]] = {}
        self.history: list[Snapshot] = []
        self.snapshot: Snapshot | None = None

        self.direction = w.Dropdown(options=list(self.directions), description="direction")
        self.layer = w.Dropdown(options=layers, value=layer, description="layer")
        self.mode = w.ToggleButtons(options=list(MODES.items()), value=alpha_mode, description="α is")
        self.alpha = w.FloatSlider(value=alpha, description="α", continuous_update=False, readout_format=".3g")
        self._set_alpha_range(alpha_mode)
        self.alpha.value = alpha
        self.positions = w.Dropdown(options=list(POSITION_MODES), value=positions, description="positions")
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=1, max=128, description="new tokens",
                                          continuous_update=False)
        self.prompts = w.Textarea(value="\n".join(prompts), description="prompts", rows=max(3, len(prompts)),
                                  continuous_update=False, layout=w.Layout(width="95%"))
        self.runner = Runner("steering")
        self.table = w.HTML()
        self.curve = FigureOutput(self._curve_figure())
        controls = w.VBox([w.HBox([self.direction, self.layer, self.positions]), self.mode,
                           w.HBox([self.alpha, self.max_new_tokens]), self.prompts])
        self.widget = w.VBox([controls, self.runner.widget, self.table, self.curve.widget])
        self.direction.observe(self._direction_changed, "value")
        self.mode.observe(self._mode_changed, "value")
        for control in (self.layer, self.alpha, self.positions, self.max_new_tokens, self.prompts):
            control.observe(lambda _: self.update(), "value")

    # ------------------------------------------------------------------ controls
    def _layers(self, direction: Direction) -> list[int]:
        return [layer for layer in direction.layers if 0 <= layer < self.model.cfg.n_layers]

    def add_direction(self, name: str, direction: Direction, *, select: bool = True,
                      layer: int | None = None) -> None:
        """Offer ``direction`` under ``name`` (and show it at ``layer`` when ``select``)."""
        if not isinstance(direction, Direction):
            raise DirectionError(f"{name!r} is a {type(direction).__name__}, not a Direction")
        if direction.d_model != self.model.cfg.d_model:
            raise DirectionError(f"direction {name!r} has width {direction.d_model}, the model d_model "
                                 f"{self.model.cfg.d_model}")
        if not self._layers(direction):
            raise DirectionError(f"direction {name!r} has no layer of this model ({list(direction.layers)})")
        self.directions[name] = direction
        if select:
            with self.direction.hold_trait_notifications():
                self.direction.options = list(self.directions)
            self.direction.value = name
            if layer is not None:
                self.layer.value = layer

    def _direction_changed(self, change) -> None:
        layers = self._layers(self.directions[change["new"]])
        current = self.layer.value
        self.layer.unobserve_all("value")
        self.layer.options = layers
        self.layer.value = current if current in layers else layers[len(layers) // 2]
        self.layer.observe(lambda _: self.update(), "value")
        self.update()

    def _set_alpha_range(self, mode: str) -> None:
        top = self.relative_max if mode == "relative" else self.alpha_max
        self.alpha.min, self.alpha.max = -top, top
        self.alpha.step = top / 40

    def _mode_changed(self, change) -> None:
        self.alpha.unobserve_all("value")
        self._set_alpha_range(change["new"])
        self.alpha.value = max(self.alpha.min, min(self.alpha.max, self.alpha.value))
        self.alpha.observe(lambda _: self.update(), "value")
        self.update()

    def prompt_list(self) -> list[str]:
        return [line.strip() for line in self.prompts.value.splitlines() if line.strip()]

    # ------------------------------------------------------------------ computing
    def _norm(self, layer: int, prompts: tuple[str, ...]) -> float:
        """The typical residual norm at ``layer`` over ``prompts`` (measured once)."""
        key = (layer, prompts)
        if key not in self._norms:
            self._norms[key] = residual_norms(self.model, list(prompts), layers=[layer])[layer]
        return self._norms[key]

    def compute(self, ticket: Ticket | None = None) -> Snapshot:
        """Run the current setting (in the caller's thread) and return its :class:`Snapshot`."""
        ticket = ticket or Ticket()
        model, name = self.model, self.direction.value
        direction, layer, alpha = self.directions[name], int(self.layer.value), float(self.alpha.value)
        mode, positions, n_new = self.mode.value, self.positions.value, int(self.max_new_tokens.value)
        prompts = tuple(self.prompt_list())
        if not prompts:
            raise UsageError("no prompts: write one per line")
        with ticket.watch(model):
            norm = self._norm(layer, prompts) if mode == "relative" else None
            relative = {layer: norm} if norm is not None else None
            todo = [p for p in prompts if (p, n_new) not in self._base]
            if todo:  # the unsteered generations, once per prompt
                for p, g in zip(todo, generate(model, todo, max_new_tokens=n_new)):
                    self._base[p, n_new] = g
            if (layer, prompts) not in self._shared:  # the unsteered stream, once per layer and prompts
                shared = shared_runs(model, prompts, layer)
                self._shared[layer, prompts] = (shared, unsteered_logprobs(model, shared, len(prompts)))
            shared, base_logp = self._shared[layer, prompts]
            hooks = steering_hooks(model, direction, alpha, layers=[layer], positions=positions, relative=relative)
            cos, logq = steered_readout(model, shared, Branch(layer, tuple(hooks)), len(prompts))
            with steer(model, direction, alpha, layers=[layer], positions=positions, relative=relative):
                steered = generate(model, list(prompts), max_new_tokens=n_new)
        kl = kl_divergence(base_logp, logq)
        cos = pd.DataFrame({"read_layer": range(layer, model.cfg.n_layers), "value": cos.tolist()})
        return Snapshot(name, layer, alpha, mode, norm, positions, prompts,
                        tuple(self._base[p, n_new] for p in prompts), tuple(steered),
                        tuple(float(k) for k in kl), cos)

    def update(self) -> None:
        """Start a run of the current setting (cancelling the one in progress)."""
        prompts = self.prompt_list()
        n = max(1, len(prompts))
        fresh = sum((p, self.max_new_tokens.value) not in self._base for p in prompts)
        shared = (self.layer.value, tuple(prompts)) not in self._shared
        total = self.max_new_tokens.value * (1 + (fresh > 0)) + (n // 8 + 1) * (1 + shared)

        def work(ticket: Ticket) -> None:
            snap = self.compute(ticket)
            if self.snapshot is not None:
                self.history = (self.history + [self.snapshot])[-4:]
            self.snapshot = snap
            self._show(snap)

        self.runner.submit(work, total=total, label="steering")

    # ------------------------------------------------------------------ showing
    def _curve_figure(self) -> go.Figure:
        fig = go.Figure()
        fig.update_layout(height=360, xaxis_title="downstream layer", yaxis_title="cosine(steered, unsteered)")
        return style(fig, "Cosine to the unsteered run", "runs when a setting changes")

    def _show(self, snap: Snapshot) -> None:
        rows = "".join(
            f"<tr><td>{html.escape(p)}</td><td>{html.escape(u.text.strip())}</td>"
            f"<td>{html.escape(s.text.strip())}</td><td>{k:.3f}</td></tr>"
            for p, u, s, k in zip(snap.prompts, snap.unsteered, snap.steered, snap.kl))
        unit = f" × typical norm {snap.norm:.1f}" if snap.norm is not None else " (absolute)"
        self.table.value = (
            "<table style='border-collapse:collapse;width:100%;table-layout:fixed' class='lens-roles-steering'>"
            "<tr style='text-align:left'><th style='width:22%'>prompt</th><th>unsteered</th>"
            f"<th>steered: {html.escape(snap.direction)}, layer {snap.layer}, α = {snap.alpha:g}{unit}</th>"
            "<th style='width:9%'>next-token KL</th></tr>" + rows + "</table>")
        fig = self._curve_figure()
        fig.add_traces([t for t in snapshot_figure(snap, self.history).data if isinstance(t, go.Scatter)])
        fig.update_layout(title_text=f"Cosine to the unsteered run — {html.escape(snap.direction)}, "
                                     f"layer {snap.layer}, α = {snap.alpha:g}")
        self.curve.show(fig)


def steering_explorer(model, directions: Direction | Mapping[str, Direction], prompts: Sequence[str], *,
                      live_kernel: bool | None = None, **options):
    """The steering explorer (see the module docs): an ``ipywidgets`` box in a live notebook.

    Args:
        live_kernel: build the live widget (default: when running in a Jupyter kernel).
            Without one, the initial setting is computed once and its static figure
            (:func:`snapshot_figure`) is returned instead.
        options: :class:`SteeringExplorer`'s keyword arguments (layer, alpha, alpha_mode, ...).

    Returns:
        The :class:`SteeringExplorer`'s ``widget`` (the explorer itself is its
        ``explorer`` attribute), or a ``go.Figure`` without a kernel.
    """
    explorer = SteeringExplorer(model, directions, prompts, **options)
    if not live(live_kernel):
        return snapshot_figure(explorer.compute())
    explorer.widget.explorer = explorer
    explorer.update()
    return explorer.widget
