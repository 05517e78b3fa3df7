"""Batched collection of residual-stream activations, reduced on the fly.

:func:`collect` runs the model over prompts in length-sorted, right-padded
batches with hooks only on the requested ``blocks.{l}.hook_resid_post`` points and
``stop_at_layer`` just past the deepest one, so nothing after it is computed and
no ``ActivationCache`` is ever held. Each hook reduces its activations at once:

* per prompt, the mean over the selected positions (``[batch, d_model]``);
* over prompts, a running float64 sum, so the mean over a dataset needs memory
  independent of its size (``Activations.mean``, ``[layer, d_model]``);
* optionally the per-prompt vectors themselves (``Activations.per_prompt``,
  ``[batch, layer, d_model]`` float32), for probes, PCA and held-out separation.

Each prompt weighs equally in the mean whatever its number of selected positions.
Right padding is exact for a causal model: padding sits after every real token,
so it cannot change them, and positions need no shifting. Each batch is also
truncated after its last selected position, which a causal model cannot need.

An optional on-disk cache (``cache_dir``) keys results by everything the numbers
depend on — model id and shape, hook points, the exact token ids (which encode the
template, BOS choice and data), the selected positions and the dtype — and writes
them atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from . import __version__
from .errors import CacheError, DataError
from .models import model_id, resid_hook, validate_layers
from .positions import Encoded, PositionRule, default_prepend_bos, encode, rule_name, select_positions
from .prompts import Prompt, PromptSet, template_name


@dataclass(frozen=True)
class Activations:
    """Reduced residual-stream activations of one prompt set.

    Attributes:
        layers: block indices, in the order of the ``layer`` axis.
        mean: ``[layer, d_model]`` float64 mean over prompts of each prompt's mean
            over its selected positions.
        count: number of prompts.
        per_prompt: ``[batch, layer, d_model]`` float32, in the prompts' order, or
            None when not kept.
        meta: what the numbers depend on (model, hook, positions, template, BOS, data hash).
    """

    layers: tuple[int, ...]
    mean: Float[Tensor, "layer d_model"]
    count: int
    per_prompt: Float[Tensor, "batch layer d_model"] | None = None
    meta: dict = field(default_factory=dict)

    def subset(self, indices) -> "Activations":
        """The activations of some prompts only (needs ``per_prompt``); the mean is recomputed."""
        if self.per_prompt is None:
            raise DataError("subset needs per-prompt activations (collect with keep_per_prompt=True)")
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() == 0:
            raise DataError("subset of no prompts")
        per_prompt = self.per_prompt[idx]
        meta = dict(self.meta, count=len(idx))
        meta.pop("cache_key", None)
        return Activations(self.layers, per_prompt.double().mean(0), len(idx), per_prompt, meta)

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise DataError(f"layer {layer} was not collected (collected: {list(self.layers)})") from None


def _as_prompts(prompts) -> list[Prompt]:
    if isinstance(prompts, PromptSet):
        return list(prompts.prompts)
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    out = [Prompt(p) if isinstance(p, str) else p for p in prompts]
    if not out:
        raise DataError("no prompts given")
    return out


def _padded_batches(items: Sequence[Encoded], positions: list[list[int]], batch_size: int, pad_id: int):
    """Yield ``(indices, tokens [b, pos], positions)``, longest prompts first.

    Sorting by the length that is actually run (up to the last selected position)
    keeps padding small.
    """
    needed = [max(p) + 1 for p in positions]
    order = sorted(range(len(items)), key=lambda i: -needed[i])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(needed[i] for i in idx)
        tokens = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            n = min(len(items[i]), width)
            tokens[row, :n] = torch.tensor(items[i].tokens[:n])
        yield idx, tokens, [positions[i] for i in idx]


def _cache_key(model, layers, items, positions, keep_per_prompt) -> str:
    h = hashlib.sha256()
    head = {
        "model": model_id(model),
        "n_layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "dtype": str(model.cfg.dtype),
        "hooks": [resid_hook(layer) for layer in layers],
        "keep_per_prompt": keep_per_prompt,
        "format": 1,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for item, pos in zip(items, positions):
        h.update(json.dumps([item.tokens, pos]).encode())
    return h.hexdigest()[:32]


def _load_cached(path: Path, key: str) -> Activations:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
            mean = f.get_tensor("mean")
            per_prompt = f.get_tensor("per_prompt") if "per_prompt" in f.keys() else None
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CacheError(
            f"activation cache file {path} is corrupt ({exc}); delete it to recompute"
        ) from None
    if meta.get("cache_key") != key or mean.shape[0] != len(meta.get("layers", [])):
        raise CacheError(f"activation cache file {path} does not match its key; delete it to recompute")
    return Activations(tuple(meta["layers"]), mean, int(meta["count"]), per_prompt, meta)


def _save_cached(path: Path, acts: Activations) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mean": acts.mean.contiguous()}
    if acts.per_prompt is not None:
        tensors["per_prompt"] = acts.per_prompt.contiguous()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"meta": json.dumps(acts.meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.inference_mode()
def collect(
    model,
    prompts: PromptSet | Sequence[Prompt | str],
    *,
    layers=None,
    positions: PositionRule = "last",
    batch_size: int = 16,
    template: str | None = None,
    prepend_bos: bool | None = None,
    keep_per_prompt: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Activations:
    """Collect the mean (and optionally per-prompt) residual activations of ``prompts``.

    Args:
        model: a ``HookedTransformer``.
        prompts: a :class:`PromptSet`, or a sequence of :class:`Prompt` or strings.
        layers: block indices, ``"all"`` or None (= all).
        positions: a position rule (see :mod:`lens_roles.positions`).
        batch_size: prompts per forward pass.
        template: ``"chat"`` or ``"plain"`` (default: the model's own when it has one).
        prepend_bos: see :func:`lens_roles.positions.encode`.
        keep_per_prompt: also return ``per_prompt`` ``[batch, layer, d_model]``.
        cache_dir: directory of the on-disk cache; None disables it.
        progress: show a tqdm bar.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    layers = validate_layers(model, layers)
    plist = _as_prompts(prompts)
    template = template or template_name(model.tokenizer)
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model, template)
    items = encode(model, plist, template=template, prepend_bos=prepend_bos)
    pos = select_positions(items, positions)
    meta = {
        "model": model_id(model),
        "hook": "resid_post",
        "layers": list(layers),
        "positions": rule_name(positions),
        "template": template,
        "prepend_bos": prepend_bos,
        "dataset": getattr(prompts, "fingerprint", lambda: None)() or _fingerprint_items(items),
        "count": len(items),
        "lens_roles": __version__,
    }
    key = path = None
    if cache_dir is not None:
        key = _cache_key(model, layers, items, pos, keep_per_prompt)
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.exists():
            return _load_cached(path, key)
        meta["cache_key"] = key

    d_model = model.cfg.d_model
    sums = torch.zeros(len(layers), d_model, dtype=torch.float64)
    per_prompt = torch.zeros(len(items), len(layers), d_model) if keep_per_prompt else None
    device = model.cfg.device
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0

    batches = list(_padded_batches(items, pos, batch_size, pad_id))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"activations ({len(items)} prompts)", unit="batch")
    for idx, tokens, batch_pos in batches:
        # weights[b, p] = 1/len(selected of b) at the selected positions, else 0.
        weights = torch.zeros(tokens.shape, dtype=model.cfg.dtype)
        for row, p in enumerate(batch_pos):
            weights[row, p] = 1.0 / len(p)
        weights = weights.to(device)
        reduced: dict[int, Tensor] = {}

        def reduce_hook(acts, hook, _w=weights, _out=reduced):
            layer = int(hook.name.split(".")[1])
            _out[layer] = torch.einsum("bp,bpd->bd", _w, acts).float().cpu()

        with model.hooks(fwd_hooks=[(resid_hook(layer), reduce_hook) for layer in layers]):
            model(tokens.to(device), stop_at_layer=max(layers) + 1)
        for j, layer in enumerate(layers):
            sums[j] += reduced[layer].double().sum(0)
            if per_prompt is not None:
                per_prompt[idx, j] = reduced[layer]
    acts = Activations(layers, sums / len(items), len(items), per_prompt, meta)
    if path is not None:
        _save_cached(path, acts)
    return acts


def _fingerprint_items(items: Sequence[Encoded]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item.tokens).encode())
    return h.hexdigest()[:16]
