"""Sparse autoencoders on the residual stream: load, check, train, evaluate, splice.

This is the only module that imports ``sae_lens``. SAEs are ``sae_lens`` objects
throughout (``SAE.load_from_disk`` loads what :func:`save_sae` writes), so an SAE
from ``sae_lens``'s registry and one trained here go through the same analysis
(:mod:`lens_roles.features`).

* :func:`load_sae` — a folder (``cfg.json`` + ``sae_weights.safetensors``) or a
  registry ``release`` + ``sae_id``; float32 on the asked device.
* :func:`check_sae` — the SAE reads ``blocks.{L}.hook_resid_post`` (or the same
  stream as ``blocks.{L+1}.hook_resid_pre``) of a model with its ``d_model``;
  returns ``L``.
* :func:`harvest` — residual activations of a :class:`~lens_roles.corpus.Corpus` at
  some layers, ``[token, d_model]`` per layer (position 0, the BOS attention sink
  whose norm is tens of times the others', is left out).
* :func:`train_sae` — a TopK (``k``) or L1 (``l1``) SAE trained with
  ``sae_lens``'s ``SAETrainer`` on harvested activations; decoder rows are
  unit-norm in the result.
* :func:`spliced` — run the model with the SAE's reconstruction in place of the
  residual stream (optionally plus the error term, optionally editing the feature
  activations); hooks are removed when the block ends.
* :func:`sae_quality` — explained variance, L0, dead fraction, and the next-token
  cross-entropy clean / spliced / zero-ablated with the fraction of loss recovered.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from . import __version__
from .batching import pad_batch, pad_id
from .errors import LensRolesError
from .models import resid_hook, validate_layers


class SAEError(LensRolesError, ValueError):
    """An SAE that cannot be found or loaded, or that does not fit the model, layer or direction."""


# --------------------------------------------------------------------------- loading


def load_sae(source: str | Path, sae_id: str | None = None, *, device: str = "cpu"):
    """Load an SAE in float32: from a folder written by ``sae_lens`` (or :func:`save_sae`),
    or from ``sae_lens``'s registry as ``release`` + ``sae_id`` (that needs the hub).

    Raises:
        SAEError: a missing folder, a folder without ``cfg.json``, or a registry load that failed.
    """
    from sae_lens import SAE

    path = Path(source)
    if sae_id is None:
        if not path.is_dir():
            raise SAEError(f"no SAE folder at {path} (expected a folder with cfg.json and "
                           "sae_weights.safetensors; for sae_lens's registry pass a release and an sae_id)")
        if not (path / "cfg.json").is_file():
            raise SAEError(f"{path} has no cfg.json, so it is not an SAE folder written by sae_lens")
        try:
            return SAE.load_from_disk(str(path), device=device, dtype="float32")
        except Exception as exc:  # sae_lens raises many kinds on a damaged folder
            raise SAEError(f"cannot load the SAE in {path}: {exc}") from exc
    try:
        return SAE.from_pretrained(str(source), sae_id, device=device, dtype="float32")
    except Exception as exc:
        raise SAEError(f"cannot load SAE {sae_id!r} of release {source!r} from sae_lens's registry: {exc}") from exc


def sae_hook_name(sae) -> str | None:
    return getattr(sae.cfg.metadata, "hook_name", None)


def sae_layer(sae) -> int:
    """The block ``L`` whose ``hook_resid_post`` the SAE reads (``hook_resid_pre`` of ``L+1`` is the same)."""
    hook = sae_hook_name(sae)
    parts = (hook or "").split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        if parts[2] == "hook_resid_post":
            return int(parts[1])
        if parts[2] == "hook_resid_pre" and int(parts[1]) > 0:
            return int(parts[1]) - 1
    raise SAEError(f"the SAE reads hook {hook!r}; lens_roles works with residual-stream SAEs "
                   "(blocks.L.hook_resid_post or blocks.L.hook_resid_pre)")


def check_sae(sae, model, layer: int | None = None) -> int:
    """Check that ``sae`` fits ``model`` (and the direction ``layer``, when given); return its layer.

    Raises:
        SAEError: a width other than ``d_model``, a hook that is not a residual stream
            the model has, or a layer other than ``layer``.
    """
    if sae.cfg.d_in != model.cfg.d_model:
        raise SAEError(f"the SAE reads {sae.cfg.d_in}-wide activations ({sae_hook_name(sae)}), but "
                       f"{model.cfg.model_name} has d_model {model.cfg.d_model}")
    at = sae_layer(sae)
    if at >= model.cfg.n_layers:
        raise SAEError(f"the SAE reads {sae_hook_name(sae)}, but {model.cfg.model_name} has only "
                       f"{model.cfg.n_layers} layers")
    trained_on = getattr(sae.cfg.metadata, "model_name", None)
    if trained_on and trained_on != model.cfg.model_name:
        # sae_lens names models differently from local folders; the shapes matched, so only warn
        import warnings

        warnings.warn(f"the SAE was trained on {trained_on!r}, the model is {model.cfg.model_name!r}", stacklevel=2)
    if layer is not None and layer != at:
        raise SAEError(f"the SAE reads layer {at} ({sae_hook_name(sae)}), but the direction is used at "
                       f"layer {layer}; pick the direction's layer {at} or an SAE trained at layer {layer}")
    return at


def decoder_directions(sae) -> Float[Tensor, "d_sae d_model"]:
    """Unit decoder rows, float32 on the CPU (what each feature writes, up to its scale)."""
    w = sae.W_dec.detach().float().cpu()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- activations


def padded_batch(model, sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ``[batch, pos]`` token ids and attention mask on the model's device."""
    tokens, mask = pad_batch(sequences, pad_id(model), side="right")
    return tokens.to(model.cfg.device), mask.to(model.cfg.device)


def batches(sequences: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[int, list]]:
    """Length-sorted batches: ``(index of the first, list of (index, sequence))``."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield start, [(i, sequences[i]) for i in order[start:start + batch_size]]


@torch.no_grad()
def harvest(model, sequences: Sequence[Sequence[int]], layers: Sequence[int], *, batch_size: int = 16,
            progress: bool = False) -> dict[int, Float[Tensor, "token d_model"]]:
    """Residual activations after each of ``layers`` at every real token but the first.

    Returns float32 CPU tensors ``[token, d_model]`` per layer; tokens come in the
    order of ``sequences`` (then positions). Only the blocks up to the deepest layer run.
    """
    layers = validate_layers(model, list(layers))
    per_seq: dict[int, dict[int, Tensor]] = {layer: {} for layer in layers}
    n_batches = -(-len(sequences) // batch_size)
    store: dict[int, Tensor] = {}

    def keep(x, hook, layer):
        store[layer] = x.detach().float().cpu()

    fwd = [(resid_hook(layer), lambda x, hook, layer=layer: keep(x, hook, layer)) for layer in layers]
    for b, (_, batch) in enumerate(batches(sequences, batch_size)):
        tokens, mask = padded_batch(model, [s for _, s in batch])
        with model.hooks(fwd_hooks=fwd):
            model(tokens, attention_mask=mask, stop_at_layer=max(layers) + 1)
        for row, (i, seq) in enumerate(batch):
            for layer in layers:
                per_seq[layer][i] = store[layer][row, 1:len(seq)].clone()
        if progress and (b + 1) % 20 == 0:
            print(f"  harvest: batch {b + 1}/{n_batches}", flush=True)
    return {layer: torch.cat([per_seq[layer][i] for i in range(len(sequences))]) for layer in layers}


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SAETrainConfig:
    """How an SAE is trained (``k`` for TopK, ``l1`` for a ReLU SAE with an L1 penalty).

    ``samples`` activations are drawn, in seeded shuffled epochs over the harvested tokens.
    """

    d_sae: int = 2304
    k: int | None = 32
    l1: float | None = None
    samples: int = 1_000_000
    batch_size: int = 1024
    lr: float = 5e-4
    seed: int = 0

    def __post_init__(self):
        if (self.k is None) == (self.l1 is None):
            raise ValueError("give exactly one of k (TopK SAE) and l1 (L1-penalised ReLU SAE)")
        if self.k is not None and not 0 < self.k < self.d_sae:
            raise ValueError(f"k must be in 1..d_sae-1, got k={self.k} with d_sae={self.d_sae}")
        if self.l1 is not None and not self.l1 > 0:
            raise ValueError(f"l1 must be > 0, got {self.l1}")
        for name in ("d_sae", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def _shuffled_batches(acts: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def train_sae(acts: Float[Tensor, "token d_model"], *, layer: int, model_name: str,
              config: SAETrainConfig = SAETrainConfig(), provenance: dict | None = None,
              progress: bool = False):
    """Train an SAE on ``acts`` (from :func:`harvest`) with ``sae_lens``'s ``SAETrainer``.

    Activations are scaled to a mean norm of ``sqrt(d_model)`` while training and the
    scale is folded back into the weights; decoder rows are then folded to unit norm,
    so ``decoder_directions`` equals ``W_dec``. Returns the inference SAE (float32,
    CPU), its metadata naming the hook, the model and ``provenance``.
    """
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if acts.ndim != 2 or len(acts) < config.batch_size:
        raise SAEError(f"training needs [token, d_model] activations with at least batch_size={config.batch_size} "
                       f"tokens, got shape {tuple(acts.shape)}")
    torch.manual_seed(config.seed)
    metadata = SAEMetadata(model_name=model_name, hook_name=resid_hook(layer), hook_head_index=None,
                           prepend_bos=True, context_size=None, lens_roles_version=__version__,
                           lens_roles_training=dict(asdict(config), **(provenance or {})))
    common = dict(d_in=acts.shape[1], d_sae=config.d_sae, normalize_activations="expected_average_only_in",
                  metadata=metadata)
    if config.k is not None:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=config.k, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=config.l1,
                                                            l1_warm_up_steps=max(1, config.samples // config.batch_size
                                                                                 // 20), **common))
    steps = config.samples // config.batch_size
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * config.batch_size,
                                   train_batch_size_samples=config.batch_size, lr=config.lr,
                                   lr_scheduler_name="constant", lr_warm_up_steps=max(1, steps // 20),
                                   lr_decay_steps=max(1, steps // 5), lr_end=config.lr / 10,
                                   dead_feature_window=max(50, steps // 10),
                                   feature_sampling_window=max(50, steps // 10),
                                   n_batches_for_norm_estimate=min(50, max(1, len(acts) // config.batch_size)))
    data = _shuffled_batches(acts, config.batch_size, config.seed)
    trainer = SAETrainer(trainer_cfg, sae, data)
    if not progress:
        trainer._update_pbar = lambda *a, **k: None  # noqa: SLF001 (tqdm bar off outside terminals)
    trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device="cpu", dtype="float32", fold_W_dec_norm=True)


def save_sae(sae, path: str | Path, *, dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
    """Write ``sae`` in ``sae_lens``'s folder format (``cfg.json``, ``sae_weights.safetensors``)
    with weights in ``dtype``, plus ``extra`` as ``lens_roles.json``; the folder appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-sae-", dir=path.parent))
    try:
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sae.state_dict().items()}
        from safetensors.torch import save_file

        save_file(state, str(tmp / "sae_weights.safetensors"))
        cfg = sae.cfg.to_dict()
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg["device"] = "cpu"
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=1, default=str))
        if extra is not None:
            (tmp / "lens_roles.json").write_text(json.dumps(extra, indent=2, default=str))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-sae-", dir=path.parent))
            os.replace(path, old / "sae")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


# --------------------------------------------------------------------------- splice


@dataclass
class SpliceRecord:
    """What a :func:`spliced` run saw: the feature activations ``[batch, pos, d_sae]``
    of positions ``1..`` (a leaf with ``requires_grad`` when ``grad=True``)."""

    acts: list


@contextmanager
def spliced(model, sae, *, error_term: bool = False, edit: Callable[[Tensor], Tensor] | None = None,
            grad: bool = False, record: SpliceRecord | None = None):
    """Replace the residual stream at the SAE's hook by the SAE's reconstruction.

    Position 0 (BOS) is left alone, as in training. With ``error_term`` the
    reconstruction error ``x − x̂`` is added back, so the forward pass is unchanged
    unless ``edit`` changes the feature activations (``edit(acts) -> acts``,
    ``[batch, pos, d_sae]``). With ``grad`` the activations are a leaf that requires
    grad (appended to ``record.acts``), for gradients of a metric with respect to
    the features. Hooks are removed when the block ends, also on error.
    """
    hook = resid_hook(sae_layer(sae))

    def fn(x, hook):
        head, rest = x[:, :1], x[:, 1:]
        with torch.set_grad_enabled(grad or torch.is_grad_enabled()):
            acts = sae.encode(rest.to(sae.dtype))
            clean_recon = sae.decode(acts)
            if grad:
                acts = acts.detach().requires_grad_(True)
            if record is not None:
                record.acts.append(acts)
            used = edit(acts) if edit is not None else acts
            out = sae.decode(used)
            if error_term:
                out = out + (rest.to(sae.dtype) - clean_recon).detach()
        return torch.cat([head, out.to(x.dtype)], dim=1)

    with model.hooks(fwd_hooks=[(hook, fn)]):
        yield


def identity_sae(d_model: int, *, layer: int, model_name: str | None = None):
    """A ReLU SAE that reconstructs exactly: ``W_enc = [I, −I]``, ``W_dec = [I; −I]``, no biases
    (``relu(x) − relu(−x) = x``). For tests of the splice."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_model, d_sae=2 * d_model, apply_b_dec_to_input=False,
                            metadata=SAEMetadata(hook_name=resid_hook(layer), **({"model_name": model_name}
                                                                                  if model_name else {})))
    sae = StandardSAE(cfg)
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# --------------------------------------------------------------------------- quality


def _next_token_loss(logits: Tensor, tokens: Tensor, mask: Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropy over the real tokens from position 2 on, and their count.

    Token 1 is not scored: it is predicted from the untouched BOS alone, so no splice can change it.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = tokens[:, 1:]
    nll = -logp.gather(-1, target[..., None])[..., 0]
    keep = mask[:, 1:].bool().clone()
    keep[:, 0] = False
    return float(nll[keep].sum()), int(keep.sum())


@torch.no_grad()
def sae_quality(model, sae, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                acts: Tensor | None = None) -> dict:
    """Reconstruction and downstream quality of ``sae`` on held-out ``sequences``.

    Returns ``explained_variance`` (``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²``), ``l0`` (mean
    active features per token), ``dead_fraction`` (features that never fire on these
    tokens), ``ce_clean``, ``ce_sae`` (reconstruction spliced in, no error term),
    ``ce_zero`` (the residual stream zeroed at that layer) — mean next-token
    cross-entropy in nats — and ``loss_recovered`` ``(ce_zero − ce_sae)/(ce_zero − ce_clean)``.
    ``acts`` (from :func:`harvest`) saves recomputing the activations.
    """
    layer = check_sae(sae, model)
    if acts is None:
        acts = harvest(model, sequences, [layer], batch_size=batch_size)[layer]
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    sse = l0 = 0.0
    for chunk in acts.split(4096):
        feats = sae.encode(chunk.to(sae.device))
        recon = sae.decode(feats).cpu()
        sse += float(((chunk - recon) ** 2).sum())
        l0 += float((feats > 0).sum())
        fired |= (feats > 0).any(0).cpu()
    total_var = float(((acts - acts.mean(0)) ** 2).sum())
    losses = {"clean": [0.0, 0], "sae": [0.0, 0], "zero": [0.0, 0]}
    zero_hook = [(resid_hook(layer), lambda x, hook: torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], 1))]
    for _, batch in batches(sequences, batch_size):
        tokens, mask = padded_batch(model, [s for _, s in batch])
        for name in losses:
            if name == "clean":
                logits = model(tokens, attention_mask=mask)
            elif name == "sae":
                with spliced(model, sae):
                    logits = model(tokens, attention_mask=mask)
            else:
                with model.hooks(fwd_hooks=zero_hook):
                    logits = model(tokens, attention_mask=mask)
            s, n = _next_token_loss(logits, tokens, mask)
            losses[name][0] += s
            losses[name][1] += n
    ce = {name: s / max(n, 1) for name, (s, n) in losses.items()}
    gap = ce["zero"] - ce["clean"]
    return {"layer": layer, "hook": resid_hook(layer), "d_sae": sae.cfg.d_sae,
            "explained_variance": 1 - sse / total_var, "l0": l0 / len(acts),
            "dead_fraction": 1 - float(fired.float().mean()), "ce_clean": ce["clean"], "ce_sae": ce["sae"],
            "ce_zero": ce["zero"], "loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap else math.nan,
            "eval_tokens": len(acts), "eval_sequences": len(sequences)}


__all__ = ["SAEError", "SAETrainConfig", "SpliceRecord", "batches", "check_sae", "decoder_directions", "harvest",
           "identity_sae", "load_sae", "padded_batch", "sae_layer", "sae_quality", "save_sae", "spliced", "train_sae"]
