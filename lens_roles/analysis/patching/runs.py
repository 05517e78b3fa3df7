"""Running clean and corrupt once, then activation and attribution patching over a grid."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, ContextManager, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_roles._version import __version__
from lens_roles.analysis.patching.grids import SITE_HOOKS, Grid, get_grid, grid_cells, site_layer
from lens_roles.analysis.patching.inputs import PromptLike, encode_inputs
from lens_roles.analysis.patching.metrics import Metric
from lens_roles.analysis.patching.result import PatchResult
from lens_roles.directions.direction import Direction
from lens_roles.errors import PatchingError
from lens_roles.inputs.sets import fingerprint
from lens_roles.interventions.steering import steer
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.models import model_id, validate_layers
from lens_roles.runtime.readout import logprobs_at


#: Attribution methods: plain attribution patching, and integrated gradients along the corrupt → clean path.
ATTRIBUTION_METHODS = ("atp", "ig")
#: Default interpolation steps of ``method="ig"``: the fewest at which ``benchmarks/patch.py`` finds IG
#: tracking activation patching on the resid and mlp grids of notebook 03's setups, at about
#: ``IG_STEPS`` times the cost of plain attribution.
IG_STEPS = 4


def check_steps(steps) -> int:
    """``steps`` as an int >= 1, else a :class:`PatchingError`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PatchingError(f"steps must be an integer >= 1 (interpolation steps of method='ig'), got {steps!r}")
    return steps


def check_batch_size(batch_size) -> int:
    """``batch_size`` as an int >= 1, else a :class:`PatchingError`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PatchingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


class PatchSetup:
    """A clean and a corrupt run of one metric, ready to be patched.

    Building one runs both inputs once (up to the metric's read layer), records the
    metric on each, and keeps the activations at every patchable site of every layer
    up to the read layer (:data:`SITE_HOOKS`; a few MB for a prompt of tens of
    tokens). :meth:`activation_patch` and :meth:`attribution_patch` then give one
    :class:`PatchResult` per grid; :meth:`patch` patches any set of sites at once.

    Args:
        clean, corrupt: user text, a :class:`~lens_roles.inputs.prompts.Prompt` (rendered
            with the chat template) or token ids; both must have the same length.
        metric: a :class:`Metric`.
        align: pad the shorter prompt with ``filler`` (:func:`align_prompts`) when the
            lengths differ, instead of raising.
        clean_context: a callable taking the prompt-position mask ``[row, pos]`` and
            returning a context manager to run the clean run in (how
            :func:`steering_setup` steers it).
        first_layer: the first layer of a grid by default (``steering_setup``:
            the layer after the steering).

    Raises:
        PatchingError: different token lengths (both token lists are named, and how
            to align them), or the same metric value on both runs (normalisation
            undefined).
    """

    def __init__(self, model, clean: PromptLike, corrupt: PromptLike, metric: Metric, *, align: bool = False,
                 filler: str = " .", template: str | None = None, prepend_bos: bool | None = None,
                 clean_context: Callable[[Tensor], ContextManager] | None = None, first_layer: int = 0,
                 meta: Mapping | None = None):
        if not isinstance(metric, Metric):
            raise PatchingError(f"metric must be a lens_roles.analysis.patching.Metric, got {type(metric).__name__}")
        self.model, self.metric = model, metric
        inputs = encode_inputs(model, clean, corrupt, align=align, filler=filler, template=template,
                               prepend_bos=prepend_bos)
        self.tokens, self.corrupt_tokens = inputs.tokens, inputs.corrupt_tokens
        self.clean_ids, self.corrupt_ids = inputs.clean_ids, inputs.corrupt_ids
        self.n_prompt = len(inputs)
        self.read_layer = metric.read_layer(model)
        self.read_position = metric.read_position(self.n_prompt)
        self.first_layer = first_layer
        conts = metric.continuations(model)
        self.rows = len(conts)
        device = model.cfg.device
        pad = pad_id(model) if model.tokenizer is not None else 0
        self._inputs: dict[str, Int[Tensor, "row pos"]] = {
            kind: pad_batch([list(ids) + c for c in conts], pad)[0].to(device)
            for kind, ids in (("clean", self.clean_ids), ("corrupt", self.corrupt_ids))
        }
        width = self._inputs["clean"].shape[1]
        self.prompt_mask: Bool[Tensor, "row pos"] = torch.zeros(self.rows, width, dtype=torch.bool, device=device)
        self.prompt_mask[:, : self.n_prompt] = True
        self.site_names = [f"blocks.{layer}.{h}" for layer in range(self.read_layer + 1) for h in SITE_HOOKS]
        missing = [n for n in self.site_names if n not in model.hook_dict]
        if missing:
            raise PatchingError(f"{model.cfg.model_name} has no hook point {missing[0]!r}; it cannot be patched here")
        self._acts: dict[tuple[str, str], Tensor] = {}
        self._grads: dict[str, Tensor] | None = None
        self._ig_grads: dict[int, dict[str, Tensor]] = {}
        self.clean_value = self._reference("clean", clean_context)
        self.corrupt_value = self._reference("corrupt", None)
        diff = self.clean_value - self.corrupt_value
        if not math.isfinite(diff) or abs(diff) <= 1e-5 * max(1.0, abs(self.clean_value), abs(self.corrupt_value)):
            raise PatchingError(
                f"clean and corrupt runs give the same {metric.label} ({self.clean_value:.6g} vs "
                f"{self.corrupt_value:.6g}), so normalised patching (0 = corrupt, 1 = clean) is undefined; "
                "choose prompts or a metric that tell the two runs apart"
            )
        self.meta = {
            "model": model_id(model), "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
            "metric": metric.describe(), "read_layer": self.read_layer, "read_position": self.read_position,
            **inputs.described, "aligned_with_filler": inputs.aligned_with,
            "clean_tokens_hash": fingerprint(list(self.clean_ids)),
            "corrupt_tokens_hash": fingerprint(list(self.corrupt_ids)),
            "n_prompt_tokens": self.n_prompt, "template": inputs.template, "prepend_bos": inputs.prepend_bos,
            "clean_value": self.clean_value, "corrupt_value": self.corrupt_value,
            "normalisation": "(m(patched) - m(corrupt)) / (m(clean) - m(corrupt))",
            "patched_positions": "prompt tokens only (metric continuations are read, never patched)",
            "lens_roles": __version__, **dict(meta or {}),
        }

    # ---------------------------------------------------------------- runs
    def _forward(self, tokens: Tensor, **kw) -> Float[Tensor, "row pos d_model"]:
        if self.model.tokenizer is not None:
            kw.setdefault("padding_side", "right")  # no attention mask: right padding is exact for a causal model
        return self.model(tokens, stop_at_layer=self.read_layer + 1, **kw)

    @torch.no_grad()
    def _reference(self, kind: str, context) -> float:
        captured: dict[str, Tensor] = {}

        def capture(acts, hook):
            captured[hook.name] = acts.detach().clone()

        with contextlib.ExitStack() as stack:
            if context is not None:
                stack.enter_context(context(self.prompt_mask))
            stack.enter_context(self.model.hooks(fwd_hooks=[(name, capture) for name in self.site_names]))
            resid = self._forward(self._inputs[kind])
        for name, acts in captured.items():
            self._acts[kind, name] = acts
        return float(self.metric(self.model, resid, self.n_prompt).reshape(-1)[0])

    def normalise(self, raw):
        """``(raw − corrupt) / (clean − corrupt)`` (float64)."""
        if isinstance(raw, Tensor):
            raw = raw.double()
        return (raw - self.corrupt_value) / (self.clean_value - self.corrupt_value) + 0.0  # + 0.0: no -0.0

    # ---------------------------------------------------------- validation
    def _late(self, what: str, layers: Sequence[int]) -> PatchingError:
        return PatchingError(
            f"the metric ({self.metric.label}) is read after layer {self.read_layer}, so it does not depend on "
            f"{what} at layer(s) {list(layers)}: patch layers up to {self.read_layer}, or read the metric later"
        )

    def _positions(self, positions) -> tuple[int, ...]:
        if positions is None or (isinstance(positions, str) and positions == "all"):
            return tuple(range(self.read_position + 1))
        if isinstance(positions, str):
            raise PatchingError(f"positions must be 'all' or token indices, got {positions!r}")
        out = []
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, int):
                raise PatchingError(f"position {p!r} is not an integer")
            if not -self.n_prompt <= p < self.n_prompt:
                raise PatchingError(f"position {p} is outside the prompt ({self.n_prompt} tokens); "
                                    "a metric's continuation tokens are read, never patched")
            p %= self.n_prompt
            if p > self.read_position:
                raise PatchingError(
                    f"the metric ({self.metric.label}) is read at position {self.read_position} "
                    f"({self.tokens[self.read_position]!r}); position {p} ({self.tokens[p]!r}) comes after it, "
                    "and a causal model cannot carry anything back to it"
                )
            out.append(p)
        if not out:
            raise PatchingError("no positions given")
        return tuple(sorted(set(out)))

    def _axes(self, grid: str, layers, positions, heads):
        spec = get_grid(grid)
        if layers is None:
            layers = tuple(range(self.first_layer, self.read_layer + 1))
            if not layers:
                raise PatchingError(f"no layer from {self.first_layer} to the metric's read layer {self.read_layer}")
        else:
            layers = validate_layers(self.model, layers)
            late = [layer for layer in layers if layer > self.read_layer]
            if late:
                raise self._late(spec.hook.format(layer="L"), late)
        positions = self._positions(positions)
        n_heads = self.model.cfg.n_heads
        if heads is None:
            heads = tuple(range(n_heads))
        else:
            heads = tuple(sorted({int(h) for h in ([heads] if isinstance(heads, int) else heads)}))
            bad = [h for h in heads if not 0 <= h < n_heads]
            if bad or not heads:
                raise PatchingError(f"heads {bad or list(heads)} are not in 0..{n_heads - 1}")
        return spec, layers, positions, heads

    def _result(self, spec: Grid, method: str, values: Tensor, layers, positions, heads, **extra) -> PatchResult:
        labels = {"layer": tuple(layers), "pos": tuple(positions), "head": tuple(heads)}
        meta = dict(self.meta, grid=spec.name, hook=spec.hook, method=method, layers=list(layers),
                    positions=list(positions), **extra)
        if "head" in spec.axes:
            meta["heads"] = list(heads)
        return PatchResult(values=values, axes=spec.axes, labels=tuple(labels[a] for a in spec.axes),
                           grid=spec.name, method=method, metric=self.metric.label, clean_value=self.clean_value,
                           corrupt_value=self.corrupt_value, tokens=self.tokens, corrupt_tokens=self.corrupt_tokens,
                           positions=tuple(positions), meta=meta)

    # ------------------------------------------------------------ patching
    @torch.no_grad()
    def patch(self, sites: Mapping[str, object], *, normalise: bool = True) -> float:
        """Run the corrupt input with several sites patched at once; the (normalised) metric.

        Args:
            sites: hook name → ``"all"`` (every prompt position), a list of prompt
                positions, or a bool mask ``[pos]`` (``[pos, head]`` for ``attn.hook_z``)
                over the prompt's positions. ``{}`` patches nothing.

        Patching ``blocks.0.hook_resid_pre`` at all positions gives exactly 1.0, and
        patching nothing exactly 0.0: the runs are the reference runs bit for bit.
        """
        with self.model.hooks(fwd_hooks=self.site_hooks(sites)):
            resid = self._forward(self._inputs["corrupt"])
        raw = float(self.metric(self.model, resid, self.n_prompt).reshape(-1)[0])
        return float(self.normalise(raw)) if normalise else raw

    @torch.no_grad()
    def next_token_logprobs(self, sites: Mapping[str, object]) -> Float[Tensor, " d_vocab"]:
        """The patched corrupt run's next-token log-probabilities after the prompt's last token.

        ``sites`` as in :meth:`patch` (``{}``: the corrupt run). The run goes through
        every layer (not just to the metric's read layer) and is read by the one
        readout (:func:`~lens_roles.runtime.readout.logprobs_at`); float32 on the CPU.
        What the patching explorer shows for a clicked cell.
        """
        with self.model.hooks(fwd_hooks=self.site_hooks(sites)):
            resid = self.model(self._inputs["corrupt"], stop_at_layer=self.model.cfg.n_layers,
                               **({"padding_side": "right"} if self.model.tokenizer is not None else {}))
        return logprobs_at(self.model, resid[0, self.n_prompt - 1]).cpu()

    def site_hooks(self, sites: Mapping[str, object]) -> list:
        """The ``(hook name, fn)`` pairs that patch ``sites`` (see :meth:`patch`) into the corrupt run."""
        hooks = []
        width = self.prompt_mask.shape[1]
        for name, where in sites.items():
            if ("clean", name) not in self._acts:
                layer = site_layer(name)
                if layer is not None and layer < self.model.cfg.n_layers:
                    raise self._late(name, [layer])
                raise PatchingError(f"{name!r} is not a patchable site; use blocks.L.{{{', '.join(SITE_HOOKS)}}} "
                                    f"with L in 0..{self.read_layer}")
            clean = self._acts["clean", name]
            per_head = clean.ndim == 4
            if isinstance(where, Tensor) and where.dtype == torch.bool:
                expect = (self.n_prompt, clean.shape[2]) if per_head else (self.n_prompt,)
                if tuple(where.shape) != expect:
                    raise PatchingError(f"mask for {name} has shape {tuple(where.shape)}, expected {expect}")
                chosen = where.reshape(self.n_prompt, -1).any(-1).nonzero().flatten().tolist()
                if chosen:
                    self._positions(chosen)  # refuses positions after the metric's read position
                mask = torch.zeros((width, *expect[1:]), dtype=torch.bool, device=clean.device)
                mask[: self.n_prompt] = where.to(clean.device)
            else:
                positions = (tuple(range(self.n_prompt)) if isinstance(where, str) and where == "all"
                             else self._positions(where))
                mask = torch.zeros((width, *clean.shape[2:-1]), dtype=torch.bool, device=clean.device)
                mask[list(positions)] = True

            def hook(acts, hook, _m=mask[..., None], _c=clean):
                return torch.where(_m, _c, acts)

            hooks.append((name, hook))
        return hooks

    @torch.no_grad()
    def activation_patch(self, grid: str = "resid", *, layers=None, positions=None, heads=None,
                         batch_size: int = 32) -> PatchResult:
        """Activation patching over one grid (see :data:`GRIDS`), normalised 0 = corrupt, 1 = clean.

        Args:
            layers: layers of the grid (default: from ``first_layer`` to the metric's
                read layer); later layers are refused.
            positions: prompt positions (default: every position up to the metric's
                read position); per-layer and per-head grids patch them all at once.
            heads: heads of the ``heads`` grid (default: all).
            batch_size: cells per forward (each cell takes one row per continuation).
        """
        if batch_size < 1:
            raise PatchingError(f"batch_size must be >= 1, got {batch_size}")
        t0 = time.perf_counter()
        spec, layers, positions, heads = self._axes(grid, layers, positions, heads)
        shape = [len(layers)] + ([len(positions)] if "pos" in spec.axes else []) + (
            [len(heads)] if "head" in spec.axes else [])
        raw = torch.empty(shape, dtype=torch.float64)
        cells = grid_cells(spec, layers, positions, heads, width=self.prompt_mask.shape[1],
                           n_heads=self.model.cfg.n_heads, device=self.model.cfg.device)
        todo = []
        for index, layer, mask in cells:
            name = spec.hook.format(layer=layer)
            if torch.equal(self._acts["clean", name][:, mask], self._acts["corrupt", name][:, mask]):
                raw[index] = self.corrupt_value  # nothing to patch: exactly the corrupt run
            else:
                todo.append((index, layer, mask))
        forwards = 0
        # Cells are in layer order; a chunk may span a few layers and starts at its first one.
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            n, first = len(chunk), chunk[0][1]
            hooks = []
            for layer in sorted({c[1] for c in chunk}):
                name = spec.hook.format(layer=layer)
                masks = torch.stack([m if lay == layer else torch.zeros_like(m) for _, lay, m in chunk])
                masks = masks.repeat_interleave(self.rows, dim=0)[..., None]  # [cell·row, pos(, head), 1]
                clean = self._acts["clean", name]
                source = clean.repeat(n, *([1] * (clean.ndim - 1)))

                def hook(acts, hook, _m=masks, _c=source):
                    return torch.where(_m, _c, acts)

                hooks.append((name, hook))
            start = self._acts["corrupt", f"blocks.{first}.hook_resid_pre"].repeat(n, 1, 1)
            with self.model.hooks(fwd_hooks=hooks):
                resid = self._forward(start, start_at_layer=first)
            values = self.metric(self.model, resid, self.n_prompt).double().cpu()
            forwards += 1
            for (index, _, _), v in zip(chunk, values):
                raw[index] = v
        skipped = len(cells) - len(todo)
        return self._result(spec, "activation", self.normalise(raw), layers, positions, heads,
                            batch_size=batch_size, forwards=forwards, skipped_identical_cells=skipped,
                            seconds=time.perf_counter() - t0)

    def gradients(self) -> dict[str, Tensor]:
        """∂metric/∂activation on the corrupt run at every site, from one forward and one backward.

        Computed once per setup and shared by every attribution grid.
        """
        if self._grads is None:
            captured: dict[str, Tensor] = {}

            def leaf(acts, hook):  # put the run on the autograd tape even if the weights are frozen
                return acts.detach().requires_grad_(True)

            def capture(acts, hook):
                captured[hook.name] = acts

            hooks = [("hook_embed", leaf)] + [(name, capture) for name in self.site_names]
            with torch.enable_grad(), self.model.hooks(fwd_hooks=hooks):
                resid = self._forward(self._inputs["corrupt"])
                value = self.metric(self.model, resid, self.n_prompt).sum()
                grads = torch.autograd.grad(value, [captured[n] for n in self.site_names], allow_unused=True)
            self._grads = {
                name: (torch.zeros_like(captured[name]) if g is None else g.detach())
                for name, g in zip(self.site_names, grads)
            }
        return self._grads

    def forget_gradients(self) -> None:
        """Drop the cached gradients (:meth:`gradients`, :meth:`integrated_gradients`), e.g. to time them."""
        self._grads = None
        self._ig_grads = {}

    def integrated_gradients(self, steps: int, *, batch_size: int = 8) -> dict[str, Tensor]:
        """∂metric/∂activation at every site, averaged along the straight path from corrupt to clean.

        Run ``k`` (``k = 0 … steps − 1``) starts at ``first_layer`` from the residual
        stream ``corrupt + (k/steps)·(clean − corrupt)`` entering it (every position and
        continuation row; from layer 0 that is the token embeddings), runs on to the read
        layer and back, and the gradients at every site are averaged over the runs (a
        left Riemann sum of the integral over the path; ``steps = 1`` is the corrupt run
        alone, i.e. the gradients of plain attribution patching). Sites below
        ``first_layer`` are the same in both runs and get zero gradients.

        Args:
            steps: interpolation steps ``K >= 1``.
            batch_size: steps per forward and backward (each takes one row per continuation).

        Returns:
            hook name → mean gradient, the shape of the site's activations
            (``[row, pos, d_model]``; ``[row, pos, head, d_head]`` for ``attn.hook_z``).
            Cached per ``steps`` and shared by every grid.
        """
        steps, batch_size = check_steps(steps), check_batch_size(batch_size)
        if steps not in self._ig_grads:
            first = self.first_layer
            start = f"blocks.{first}.hook_resid_pre"
            lo, hi = self._acts["corrupt", start], self._acts["clean", start]  # [row, pos, d_model]
            sites = [n for n in self.site_names if site_layer(n) >= first]
            sums = {n: torch.zeros_like(self._acts["corrupt", n]) for n in self.site_names}
            captured: dict[str, Tensor] = {}

            def capture(acts, hook):
                captured[hook.name] = acts

            for k0 in range(0, steps, batch_size):
                alphas = torch.arange(k0, min(k0 + batch_size, steps), dtype=lo.dtype, device=lo.device) / steps
                n = len(alphas)
                path = (lo + alphas[:, None, None, None] * (hi - lo)).reshape(n * self.rows, *lo.shape[1:])
                path.requires_grad_(True)
                with torch.enable_grad(), self.model.hooks(fwd_hooks=[(name, capture) for name in sites]):
                    resid = self._forward(path, start_at_layer=first)
                    value = self.metric(self.model, resid, self.n_prompt).sum()
                    grads = torch.autograd.grad(value, [captured[name] for name in sites], allow_unused=True)
                captured.clear()
                for name, g in zip(sites, grads):
                    if g is not None:
                        sums[name] += g.detach().reshape(n, *sums[name].shape).sum(0)
            self._ig_grads[steps] = {name: g / steps for name, g in sums.items()}
        return self._ig_grads[steps]

    def attribution_patch(self, grid: str = "resid", *, layers=None, positions=None, heads=None,
                          method: str = "atp", steps: int | None = None, batch_size: int = 8) -> PatchResult:
        """Attribution patching over one grid: ``(clean − corrupt) · ∂m/∂a`` summed over each cell.

        Same arguments and normalisation as :meth:`activation_patch`, and:

        Args:
            method: ``"atp"``: the gradient at the corrupt run (:meth:`gradients`; one
                forward and one backward for every grid); ``"ig"``: integrated gradients,
                the gradient averaged over ``steps`` runs along the straight path from the
                corrupt to the clean run (:meth:`integrated_gradients`; ``steps`` forwards
                and backwards shared by every grid), which follows the non-linear change
                that plain attribution misjudges. ``method="ig", steps=1`` gives the
                numbers of ``"atp"``.
            steps: interpolation steps of ``"ig"`` (default :data:`IG_STEPS`); ``"atp"``
                takes none (or 1).
            batch_size: ``"ig"`` steps per forward.
        """
        t0 = time.perf_counter()
        if method not in ATTRIBUTION_METHODS:
            raise PatchingError(f"attribution method must be one of {', '.join(ATTRIBUTION_METHODS)}, got {method!r}")
        if method == "atp" and steps not in (None, 1):
            raise PatchingError(f"steps={steps!r} is for method='ig'; plain attribution ('atp') takes no steps")
        steps = 1 if method == "atp" else check_steps(IG_STEPS if steps is None else steps)
        check_batch_size(batch_size)
        spec, layers, positions, heads = self._axes(grid, layers, positions, heads)
        grads = self.gradients() if method == "atp" else self.integrated_gradients(steps, batch_size=batch_size)
        pos = torch.tensor(positions, dtype=torch.long)
        rows = []
        for layer in layers:
            name = spec.hook.format(layer=layer)
            delta = (self._acts["clean", name] - self._acts["corrupt", name]).double()
            contrib = (delta * grads[name].double()).sum(-1).sum(0).cpu()[pos]  # [pos] or [pos, head]
            if spec.axes == ("layer", "pos"):
                rows.append(contrib)
            elif spec.axes == ("layer",):
                rows.append(contrib.sum())
            else:
                rows.append(contrib.sum(0)[list(heads)])
        values = torch.stack(rows) / (self.clean_value - self.corrupt_value)
        return self._result(spec, "attribution", values, layers, positions, heads, attribution=method,
                            steps=steps, seconds=time.perf_counter() - t0)

    def __repr__(self) -> str:
        return (f"PatchSetup({self.meta['model']}, {self.n_prompt} prompt tokens × {self.rows} row(s), "
                f"metric {self.metric.label!r}: clean {self.clean_value:.4g}, corrupt {self.corrupt_value:.4g})")


# --------------------------------------------------------------- entry points


def activation_patch(model, clean: PromptLike, corrupt: PromptLike, metric: Metric, grid: str = "resid", *,
                     layers=None, positions=None, heads=None, batch_size: int = 32, align: bool = False,
                     template: str | None = None, prepend_bos: bool | None = None) -> PatchResult:
    """Activation patching of one grid in one call (see :class:`PatchSetup` to run several grids)."""
    setup = PatchSetup(model, clean, corrupt, metric, align=align, template=template, prepend_bos=prepend_bos)
    return setup.activation_patch(grid, layers=layers, positions=positions, heads=heads, batch_size=batch_size)


def attribution_patch(model, clean: PromptLike, corrupt: PromptLike, metric: Metric, grid: str = "resid", *,
                      layers=None, positions=None, heads=None, method: str = "atp", steps: int | None = None,
                      align: bool = False, template: str | None = None,
                      prepend_bos: bool | None = None) -> PatchResult:
    """Attribution patching of one grid in one call, plain (``method="atp"``) or by integrated
    gradients (``method="ig"``, ``steps``); see :class:`PatchSetup` to run several grids."""
    if method not in ATTRIBUTION_METHODS:  # before the two runs of the setup
        raise PatchingError(f"attribution method must be one of {', '.join(ATTRIBUTION_METHODS)}, got {method!r}")
    if steps is not None:
        check_steps(steps)
    setup = PatchSetup(model, clean, corrupt, metric, align=align, template=template, prepend_bos=prepend_bos)
    return setup.attribution_patch(grid, layers=layers, positions=positions, heads=heads, method=method, steps=steps)


def steering_setup(model, prompt: PromptLike, direction: Direction, alpha: float, layer: int, metric: Metric, *,
                   relative: Mapping[int, float] | None = None, template: str | None = None,
                   prepend_bos: bool | None = None) -> PatchSetup:
    """A :class:`PatchSetup` for the steering effect: clean = steered, corrupt = unsteered.

    The clean run adds ``α·v_layer`` at ``blocks.{layer}.hook_resid_post`` over the
    prompt's positions (:func:`lens_roles.interventions.steer`; ``relative`` makes α a
    multiple of the typical norm). Patching a steered activation into the unsteered
    run measures how much of the steering effect on the metric flows through it.
    Grids default to the layers after ``layer``; every site at or before it is the
    same in both runs (exactly 0), and patching ``blocks.{layer+1}.hook_resid_pre`` at
    all positions restores the steered run (exactly 1).

    Raises:
        PatchingError: a metric read at or before the steering layer (nothing
            downstream of the steering could carry it).
    """
    layer = validate_layers(model, layer)[0]
    read = metric.read_layer(model)
    if read <= layer:
        raise PatchingError(
            f"the metric ({metric.label}) is read after layer {read}, but steering acts after layer {layer}: "
            "no component downstream of the steering can be patched; read the metric at a later layer"
        )

    def context(mask):
        return steer(model, direction, alpha, layers=[layer], positions=mask, relative=relative)

    info = {"steering": {"direction": direction.meta.get("name"), "layer": layer, "alpha": float(alpha),
                         "alpha_mode": "absolute" if relative is None else "relative", "positions": "prompt",
                         "convention": "clean = steered, corrupt = unsteered; steered activations patched in"}}
    return PatchSetup(model, prompt, prompt, metric, template=template, prepend_bos=prepend_bos,
                      clean_context=context, first_layer=layer + 1, meta=info)
