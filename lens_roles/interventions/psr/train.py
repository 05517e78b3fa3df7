"""Training a PSR to mimic the prompted run (MSE on residuals or KL on next-token distributions)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.config import Config
from lens_roles.directions.direction import Direction
from lens_roles.errors import ConfigError, PSRError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import as_prompts
from lens_roles.inputs.sets import fingerprint
from lens_roles.interventions.psr.align import (
    Aligned,
    align,
    check_direction,
    prompt_pairs,
    prompt_steering,
)
from lens_roles.interventions.psr.model import PSR
from lens_roles.runtime.activations import residual_rows
from lens_roles.runtime.batching import padded
from lens_roles.runtime.capture import capture
from lens_roles.runtime.models import validate_layers
from lens_roles.runtime.progress import progress_bar
from lens_roles.runtime.readout import kl_divergence, logprobs_at

OBJECTIVES = ("mse", "kl")


@dataclass(frozen=True)
class TrainConfig(Config):
    """How a PSR is trained.

    Attributes:
        objective: ``"mse"`` (activations at ``read_layers``) or ``"kl"`` (next-token distributions).
        epochs, lr, batch_size, seed: Adam on ``w`` and ``b``, prompts in fixed
            batches visited in a seeded random order each epoch.
        read_layers: layers the MSE objective compares (default: the steered layers and the last).
    """

    objective: str = "mse"
    epochs: int = 4
    lr: float = 0.02
    batch_size: int = 4
    seed: int = 0
    read_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"TrainConfig: unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"TrainConfig: epochs must be a positive integer, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"TrainConfig: lr must be positive and finite, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"TrainConfig: batch_size must be a positive integer, got {self.batch_size!r}")


@dataclass
class _Batch:
    tokens: Tensor  # [batch, pos] unprompted, right-padded
    mask: Tensor  # [batch, pos] attention mask of tokens
    start: Tensor  # [batch, pos, d_model] unprompted residual at the first steered layer (unsteered)
    rows: list[int]  # item index per row
    positions: list[list[int]]  # compared unprompted positions per row (MSE): shared prefix + aligned tail
    reply_pos: list[list[int]]  # compared positions per row (KL): shared prefix + those predicting reply tokens


@dataclass
class TrainingData:
    """Everything training and held-out scoring need, computed once without gradients.

    ``targets[layer][i]``: the prompted residual ``[compared, d_model]`` of item ``i``
    at the compared positions (:meth:`Aligned.compared`: the shared prefix, where it
    equals the unprompted one, then the aligned tail); ``base[layer][i]``: the
    unprompted one; ``final_p[i]``: the prompted final residual at the KL positions
    (:meth:`Aligned.compared_kl`); ``scale[layer]``: mean
    squared unprompted-to-prompted distance (MSE normaliser).
    """

    runs: list[Aligned]
    start_layer: int
    read_layers: tuple[int, ...]
    targets: dict[int, list[Tensor]]
    base: dict[int, list[Tensor]]
    final_p: list[Tensor]
    scale: dict[int, float]
    batches: list[_Batch]
    fingerprint: str


def prepare(model, psr: PSR, prompts, system: str, *, read_layers: Sequence[int] | None = None,
            batch_size: int = 4, template: str | None = None) -> TrainingData:
    """Align the runs and cache the prompted targets and unprompted starting residuals (no gradients)."""
    psr.check_model(model)
    prompted, unprompted = prompt_pairs(prompts, system)
    runs = align(model, prompted, unprompted, template=template)
    last = model.cfg.n_layers - 1
    read = tuple(sorted(set(read_layers if read_layers is not None else (*psr.layers, last))))
    validate_layers(model, list(read))
    start = min(psr.layers)
    if min(read) < start:
        raise PSRError(f"read layers {list(read)} include layers before the first steered layer {start}, which "
                       "steering cannot change")
    layers_needed = sorted(set(read) | {last})
    acts_p = residual_rows(model, [r.prompted.tokens for r in runs], layers_needed, batch_size=batch_size)
    acts_u = residual_rows(model, [r.unprompted.tokens for r in runs], sorted(set(layers_needed) | {start}),
                           batch_size=batch_size)
    u_layers = sorted(set(layers_needed) | {start})
    targets = {layer: [] for layer in read}
    base = {layer: [] for layer in read}
    final_p, starts = [], []
    changed = False
    for run, ap, au in zip(runs, acts_p, acts_u):
        uu, pp = run.compared()
        for layer in read:
            targets[layer].append(ap[layers_needed.index(layer), pp])
            base[layer].append(au[u_layers.index(layer), uu])
            changed |= bool((targets[layer][-1] - base[layer][-1]).abs().max() > 0)
        final_p.append(ap[layers_needed.index(last), run.compared_kl()[1]])
        starts.append(au[u_layers.index(start)])
    if not changed:
        raise PSRError(f"the system prompt {system!r} changes nothing at the read layers {list(read)}: there is "
                       "nothing to mimic")
    scale = {layer: float(torch.cat([(t - b).pow(2).sum(-1) for t, b in zip(targets[layer], base[layer])]).mean())
             for layer in read}
    batches = []
    for s in range(0, len(runs), batch_size):
        idx = list(range(s, min(s + batch_size, len(runs))))
        unprompted_rows = padded(model, [runs[i].unprompted.tokens for i in idx], idx)
        width = unprompted_rows.tokens.shape[1]
        st = torch.zeros(len(idx), width, model.cfg.d_model)
        for r, i in enumerate(idx):
            st[r, : starts[i].shape[0]] = starts[i]
        batches.append(_Batch(unprompted_rows.tokens.cpu(), unprompted_rows.mask.cpu(), st.to(model.cfg.dtype), idx,
                              [runs[i].compared()[0] for i in idx], [runs[i].compared_kl()[0] for i in idx]))
    fp = fingerprint([system, [(p.user, p.reply) for p in prompted]])
    return TrainingData(runs, start, read, targets, base, final_p, scale, batches, fp)


def forward_batch(model, psr: PSR, batch: _Batch, data: TrainingData, *, alpha: Tensor | None = None,
                  constant_alpha: float | None = None) -> tuple[dict[int, Tensor], Tensor]:
    """Run the batch from the first steered layer: residuals at the read layers and the final one.

    With ``constant_alpha``, constant steering ``x + α·v`` replaces the PSR (same layers and tokens:
    :meth:`PSR.constant_twin`).
    """
    device = model.cfg.device
    start = data.start_layer
    last = model.cfg.n_layers - 1
    k0 = psr.layers.index(start)
    x = batch.start.to(device)
    if constant_alpha is not None:
        psr = psr.constant_twin(constant_alpha).to(device)
    x = psr.add(x, k0, alpha)
    hooks = psr.hooks(model, skip=(start,), alpha=None if alpha is None else float(alpha))
    store: dict[int, Tensor] = {start: x}
    wanted = sorted((set(data.read_layers) | {last}) - {start})
    if start < last:
        # the capture (with the graph, for training) sits inside the PSR's hooks: it reads the steered stream
        with model.hooks(fwd_hooks=hooks), capture(model, wanted, grad=True) as cap:
            model(x, attention_mask=batch.mask.to(device), start_at_layer=start + 1,
                  stop_at_layer=model.cfg.n_layers)
        store.update(cap.values)
    return store, store[last]


def _losses(model, data: TrainingData, batch: _Batch, store: dict[int, Tensor], final: Tensor,
            objective: str) -> Tensor:
    if objective == "mse":
        total = 0.0
        for layer in data.read_layers:
            x = store[layer]
            errs = [(x[r, pos] - data.targets[layer][i].to(x.device, x.dtype)).pow(2).sum(-1)
                    for r, (i, pos) in enumerate(zip(batch.rows, batch.positions))]
            total = total + torch.cat(errs).mean() / data.scale[layer]
        return total / len(data.read_layers)
    rows = [r for r, i in enumerate(batch.rows) if data.runs[i].predicting_reply()]
    if not rows:
        raise PSRError("the KL objective needs prompts with replies (it compares the distributions over reply "
                       "tokens)")
    logq = logprobs_at(model, torch.cat([final[r, batch.reply_pos[r]] for r in rows]))
    with torch.no_grad():
        logp = logprobs_at(model, torch.cat([data.final_p[batch.rows[r]] for r in rows]).to(final.device,
                                                                                               final.dtype))
    return kl_divergence(logp, logq).mean()


@contextmanager
def _frozen(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def psr_loss(model, psr: PSR, data: TrainingData, objective: str = "mse", *,
             constant_alpha: float | None = None) -> float:
    """The objective over all of ``data`` (no gradients); ``constant_alpha`` scores constant steering instead."""
    if objective not in OBJECTIVES:
        raise PSRError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in data.batches:
            store, final = forward_batch(model, psr, batch, data, constant_alpha=constant_alpha)
            total += float(_losses(model, data, batch, store, final, objective)) * len(batch.rows)
            n += len(batch.rows)
    return total / n


def train_psr(model, psr: PSR, prompts, system: str, config: TrainConfig = TrainConfig(), *,
              data: TrainingData | None = None, progress: bool = False) -> pd.DataFrame:
    """Train ``psr`` in place to mimic the ``system``-prompted run; returns the loss history.

    The model's parameters are frozen for the duration (and restored after);
    only ``psr.w`` and ``psr.b`` are optimised. History rows: ``epoch, step,
    objective, loss, seconds`` (epoch 0 is the loss before training). With
    ``progress`` a tqdm bar on stderr counts the optimiser steps and shows the
    epoch and its running mean loss.
    """
    if psr.constant:
        raise PSRError("a constant PSR (λ ≡ 1) has nothing to train")
    if data is None:
        data = prepare(model, psr, prompts, system, read_layers=config.read_layers, batch_size=config.batch_size)
    psr.to(model.cfg.device)
    opt = torch.optim.Adam([psr.w, psr.b], lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    history = [{"epoch": 0, "step": 0, "objective": config.objective, "loss": psr_loss(model, psr, data,
                                                                                        config.objective),
                "seconds": 0.0}]
    step = 0
    bar = progress_bar(progress, config.epochs * len(data.batches), "PSR training", unit="step")
    with _frozen(model), bar:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            total, n = 0.0, 0
            for b in torch.randperm(len(data.batches), generator=gen).tolist():
                batch = data.batches[b]
                opt.zero_grad()
                store, final = forward_batch(model, psr, batch, data)
                loss = _losses(model, data, batch, store, final, config.objective)
                loss.backward()
                opt.step()
                step += 1
                total += float(loss.detach()) * len(batch.rows)
                n += len(batch.rows)
                bar.set_postfix_str(f"epoch {epoch}: {config.objective} loss {total / n:.4f}", refresh=False)
                bar.update()
            history.append({"epoch": epoch, "step": step, "objective": config.objective, "loss": total / n,
                            "seconds": time.perf_counter() - t0})
    psr.meta.update({"objective": config.objective, "epochs": config.epochs, "lr": config.lr,
                     "system": system, "train_prompts": len(data.runs), "train_data": data.fingerprint,
                     "read_layers": list(data.read_layers), "final_loss": history[-1]["loss"]})
    return pd.DataFrame(history)


def matched_alpha(model, direction: Direction, prompts, system: str, layer: int) -> float:
    """The constant α whose addition ``α·v_layer`` matches prompting's mean projection on ``v̂`` at ``layer``."""
    frame = prompt_steering(model, direction, prompts, system, layers=[layer])
    return float(frame.strength.mean())


@torch.no_grad()
def sink_residuals(model, layers: Sequence[int], token: int) -> Float[Tensor, "layer d_model"]:
    """The residual of ``token`` as a sequence's first token at ``layers``: the attention sink.

    Causal attention makes it the same in every sequence that starts with ``token``
    (it sees only itself; padding is masked and a lone key's attention weight is 1
    whatever its position), so :class:`PSR` recognises the sink by it.
    """
    return residual_rows(model, [[int(token)]], layers, batch_size=1)[0][:, 0]


def make_psr(model, direction: Direction, prompts, system: str, *, layers: str | Sequence[int] = "one",
             layer: int | None = None, alpha: float | None = None, skip_sink: bool = True,
             template: str | None = None) -> PSR:
    """A fresh PSR starting as constant steering at prompting's mean strength.

    ``layers="one"`` steers ``layer`` (default: the middle layer) — S-PSR;
    ``"all"`` every layer of the direction — A-PSR, each starting at ``b = 1/L``
    so that the accumulated addition matches the one-layer start. ``alpha``
    defaults to :func:`matched_alpha` at the (first) steered layer. With
    ``skip_sink`` (the default) the PSR never steers the sequence-start token (the
    attention sink), which no system prompt can change (see :class:`PSR`).
    """
    check_direction(model, direction)
    if layers == "one":
        chosen = [model.cfg.n_layers // 2 if layer is None else layer]
    elif layers == "all":
        chosen = list(direction.layers)
    else:
        chosen = list(layers)
    chosen = validate_layers(model, chosen)
    probe = chosen[0] if layers != "all" else (model.cfg.n_layers // 2 if layer is None else layer)
    if alpha is None:
        alpha = matched_alpha(model, direction, prompts, system, probe)
        if alpha <= 0:
            raise PSRError(f"prompting with {system!r} moves the residual stream against the direction at layer "
                           f"{probe} (mean strength {alpha:.3g}); negate the direction or pass alpha")
    sink = None
    if skip_sink:
        first = encode(model, as_prompts(prompts)[:1], template=template)[0].tokens[0]
        sink = sink_residuals(model, chosen, first)
    return PSR(direction, chosen, alpha, bias=1.0 if len(chosen) == 1 else 1.0 / len(chosen), sink=sink,
               meta={"system": system, "variant": "S-PSR" if len(chosen) == 1 else "A-PSR"})
