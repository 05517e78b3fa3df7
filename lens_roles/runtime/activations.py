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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from lens_roles._version import __version__
from lens_roles.errors import CacheError, DataError
from lens_roles.inputs.positions import Encoded, PositionRule, default_prepend_bos, encode, rule_name, select_positions
from lens_roles.inputs.prompts import Prompt, PromptSet, as_prompts, template_name
from lens_roles.io import atomic_write, check_writable, read_tensors
from lens_roles.runtime.batching import Schedule, run_batches, schedule, token_batches
from lens_roles.runtime.capture import Capture, capture, position_mean
from lens_roles.runtime.models import model_id, resid_hook, validate_layers
from lens_roles.runtime.progress import progress_bar
from lens_roles.runtime.shards import Executor, check_cover, split_units


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


def _load_cached(path: Path, key: str, layers: tuple[int, ...], d_model: int, count: int,
                 keep_per_prompt: bool) -> Activations:
    """Read a cache entry, checking everything in it against what was asked for.

    Raises:
        CacheError: naming the file, for a damaged or unreadable file, or an entry whose
            key, layers, count, shapes or values (NaN, infinite) are not the ones asked for.
    """
    tensors, meta = read_tensors(path, "activation cache file", CacheError, required=("mean",))
    mean, per_prompt = tensors["mean"], tensors.get("per_prompt")
    expected = {"cache_key": key, "layers": list(layers), "count": count}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if not wrong and tuple(mean.shape) != (len(layers), d_model):
        wrong.append(f"mean shape {tuple(mean.shape)}")
    rows_shape = (count, len(layers), d_model)
    if not wrong and keep_per_prompt and (per_prompt is None or tuple(per_prompt.shape) != rows_shape):
        wrong.append("per_prompt")
    if not wrong and any(not (x.is_floating_point() and torch.isfinite(x).all())
                         for x in (mean, per_prompt) if x is not None):
        wrong.append("values (not finite floats)")
    if wrong:
        raise CacheError(f"activation cache file {path} does not hold what was asked for ({', '.join(wrong)}); "
                         "delete it to recompute")
    return Activations(layers, mean.double(), count, per_prompt if keep_per_prompt else None, meta)


def _save_cached(path: Path, acts: Activations) -> None:
    tensors = {"mean": acts.mean.contiguous()}
    if acts.per_prompt is not None:
        tensors["per_prompt"] = acts.per_prompt.contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": json.dumps(acts.meta)}))


@dataclass(frozen=True)
class SumsJob:
    """What every shard of one :func:`collect_sets` run shares (sent to each worker once).

    ``items``/``positions``/``owner`` list the prompts to run (``owner``: the
    index of each one's prompt set); ``schedule`` is their forward passes, whose
    chunks the shards divide between them.
    """

    items: list[Encoded]
    positions: list[list[int]]
    owner: list[int]
    n_sets: int
    layers: tuple[int, ...]
    keep_per_prompt: bool
    batch_size: int
    schedule: Schedule


@dataclass(frozen=True)
class ShardSums:
    """One shard's mergeable statistics.

    Attributes:
        chunks: the schedule chunks this shard ran (its identity).
        sums: ``[set, layer, d_model]`` float64 sums of the per-prompt means.
        counts: ``[set]`` number of prompts summed per set.
        index: ``[n]`` indices into ``SumsJob.items`` of the rows (long).
        rows: ``[n, layer, d_model]`` float32 per-prompt means, or None when not kept.
    """

    chunks: tuple[int, ...]
    sums: Float[Tensor, "set layer d_model"]
    counts: Tensor
    index: Tensor
    rows: Float[Tensor, "n layer d_model"] | None


@torch.no_grad()
def activation_sums(model, job: SumsJob, chunks, progress=None) -> ShardSums:
    """Run the given chunks of ``job.schedule`` and return their :class:`ShardSums`.

    The one per-shard computation: :func:`collect_sets` runs it on all chunks
    (one shard) or has an executor run it on each shard.
    """
    layers, d_model = job.layers, model.cfg.d_model
    sums = torch.zeros(job.n_sets, len(layers), d_model, dtype=torch.float64)
    counts = torch.zeros(job.n_sets, dtype=torch.long)
    order: list[int] = []
    rows: list[Tensor] = []
    # per prompt, the mean over its read positions: [batch, d_model] float32 on the CPU
    cap = Capture(layers, lambda acts, weights, layer: position_mean(acts, weights, layer).float().cpu())

    def on_batch(members: list[int]) -> None:
        owner = torch.tensor([job.owner[m] for m in members], dtype=torch.long)
        reduced = torch.stack([cap[layer] for layer in layers], 1)  # [batch, layer, d_model]
        sums.index_add_(0, owner, reduced.double())
        counts.index_add_(0, owner, torch.ones_like(owner))
        if job.keep_per_prompt:
            order.extend(members)
            rows.append(reduced)
        cap.values.clear()

    run_batches(model, job.items, job.positions, batch_size=job.batch_size, stop_at_layer=cap.stop_at_layer,
                capture=cap, on_batch=on_batch, progress=progress, only=job.schedule.subset(chunks))
    kept = torch.cat(rows) if rows else (torch.zeros(0, len(layers), d_model) if job.keep_per_prompt else None)
    return ShardSums(tuple(chunks), sums, counts, torch.tensor(order, dtype=torch.long), kept)


def merge_sums(job: SumsJob, shards: Sequence[ShardSums]):
    """Add the shards' sums and counts (float64, in shard order) and put their rows in prompt order.

    Returns ``(sums [set, layer, d_model], counts [set], rows [n, layer, d_model] or None)``.

    Raises:
        DataError: a chunk of the schedule is missing from the shards or in two of them.
    """
    check_cover([s.chunks for s in shards], len(job.schedule.chunks))
    sums = torch.zeros_like(shards[0].sums)
    counts = torch.zeros_like(shards[0].counts)
    for s in shards:
        sums += s.sums
        counts += s.counts
    rows = None
    if job.keep_per_prompt:
        rows = torch.zeros(len(job.items), len(job.layers), shards[0].sums.shape[-1])
        for s in shards:
            rows[s.index] = s.rows
    return sums, counts, rows


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
    share_prefixes: bool = True,
    executor: Executor | None = None,
) -> Activations:
    """Collect the mean (and optionally per-prompt) residual activations of ``prompts``.

    Args:
        model: a ``HookedTransformer``.
        prompts: a :class:`PromptSet`, or a sequence of :class:`Prompt` or strings.
        layers: block indices, ``"all"`` or None (= all).
        positions: a position rule (see :mod:`lens_roles.inputs.positions`).
        batch_size: prompts per forward pass.
        template: ``"chat"`` or ``"plain"`` (default: the model's own when it has one).
        prepend_bos: see :func:`lens_roles.inputs.positions.encode`.
        keep_per_prompt: also return ``per_prompt`` ``[batch, layer, d_model]``.
        cache_dir: directory of the on-disk cache; None disables it.
        progress: show a tqdm bar.
        share_prefixes: compute prefixes shared by several prompts (the chat
            template's system prompt, a pair's common user turn) once, through the
            KV cache (see :mod:`lens_roles.runtime.batching`). The numbers agree with
            ``False`` to float rounding.
        executor: run the forward passes as shards on its workers (see :func:`collect_sets`).
    """
    return collect_sets(
        model, [prompts], layers=layers, positions=positions, batch_size=batch_size, template=template,
        prepend_bos=prepend_bos, keep_per_prompt=keep_per_prompt, cache_dir=cache_dir, progress=progress,
        share_prefixes=share_prefixes, executor=executor,
    )[0]


@torch.no_grad()
def collect_sets(
    model,
    prompt_sets: Sequence[PromptSet | Sequence[Prompt | str]],
    *,
    layers=None,
    positions: PositionRule = "last",
    batch_size: int = 16,
    template: str | None = None,
    prepend_bos: bool | None = None,
    keep_per_prompt: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    share_prefixes: bool = True,
    executor: Executor | None = None,
) -> list[Activations]:
    """:func:`collect` for several prompt sets in one run, one :class:`Activations` each.

    Running them together lets prompts of different sets share prefixes — the
    positive and negative replies of a contrast pair share their user turn — and
    batches. An explicit position rule needs one entry per prompt of all sets,
    in order. Each set is cached on disk under its own key.

    With an ``executor`` (e.g. :class:`lens_roles.distributed.RayExecutor`) the
    forward passes run as shards on its workers and the float64 sums, counts
    and per-prompt rows are merged here: the same batches run either way (see
    :class:`~lens_roles.runtime.batching.Schedule`), so the rows are identical
    and the means agree to float64 rounding.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    layers = validate_layers(model, layers)
    if cache_dir is not None:  # a cache that cannot be written fails now, not after the computation
        check_writable(Path(cache_dir) / "entry.safetensors", "activation cache folder")
    lists = [as_prompts(prompts) for prompts in prompt_sets]
    if not lists:
        raise DataError("no prompt sets given")
    template = template or template_name(model.tokenizer)
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model, template)
    items = encode(model, [p for plist in lists for p in plist], template=template, prepend_bos=prepend_bos)
    pos = select_positions(items, positions)
    bounds = [0]
    for plist in lists:
        bounds.append(bounds[-1] + len(plist))
    spans = [range(bounds[k], bounds[k + 1]) for k in range(len(lists))]

    metas, paths, results = [], [], [None] * len(lists)
    for k, (prompts, span) in enumerate(zip(prompt_sets, spans)):
        set_items, set_pos = [items[i] for i in span], [pos[i] for i in span]
        meta = {
            "model": model_id(model),
            "hook": "resid_post",
            "layers": list(layers),
            "positions": rule_name(positions),
            "template": template,
            "prepend_bos": prepend_bos,
            "dataset": getattr(prompts, "fingerprint", lambda: None)() or _fingerprint_items(set_items),
            "count": len(set_items),
            "lens_roles": __version__,
        }
        path = None
        if cache_dir is not None:
            key = _cache_key(model, layers, set_items, set_pos, keep_per_prompt)
            path = Path(cache_dir) / f"{key}.safetensors"
            if path.exists():
                results[k] = _load_cached(path, key, layers, model.cfg.d_model, len(set_items), keep_per_prompt)
            meta["cache_key"] = key
        metas.append(meta)
        paths.append(path)
    todo = [k for k in range(len(lists)) if results[k] is None]
    if not todo:
        return results
    run_items = [i for k in todo for i in spans[k]]
    set_of = {i: k for k in todo for i in spans[k]}
    job = SumsJob(
        items=[items[i] for i in run_items],
        positions=[pos[i] for i in run_items],
        owner=[set_of[i] for i in run_items],
        n_sets=len(lists),
        layers=layers,
        keep_per_prompt=keep_per_prompt,
        batch_size=batch_size,
        schedule=schedule([items[i] for i in run_items], [pos[i] for i in run_items], batch_size=batch_size,
                          share_prefixes=share_prefixes),
    )
    n_chunks = len(job.schedule.chunks)
    if executor is None:  # one shard, on this process
        with progress_bar(progress, len(run_items), "activations") as bar:
            shards = [activation_sums(model, job, list(range(n_chunks)), progress=bar.update)]
    else:
        executor.check(model)
        sizes = [len(job.schedule.members(c)) for c in range(n_chunks)]
        payloads = split_units(sizes, executor.shards(n_chunks))
        shards = executor.map(activation_sums, job, payloads, desc="activation shards", progress=progress)
    sums, counts, per_prompt = merge_sums(job, shards)
    per_prompt_all = None
    if per_prompt is not None:  # rows back at their prompts' places in all sets
        per_prompt_all = torch.zeros(len(items), len(layers), model.cfg.d_model)
        per_prompt_all[torch.tensor(run_items, dtype=torch.long)] = per_prompt
    for k in todo:
        n = len(spans[k])
        if int(counts[k]) != n:  # a shard lost or merged twice
            raise DataError(f"prompt set {k}: the shards hold {int(counts[k])} prompts, not {n}")
        kept = per_prompt_all[bounds[k] : bounds[k + 1]].clone() if per_prompt_all is not None else None
        results[k] = Activations(layers, sums[k] / n, n, kept, metas[k])
        if paths[k] is not None:
            _save_cached(paths[k], results[k])
    return results


@torch.no_grad()
def residual_rows(model, rows: Sequence[Sequence[int]], layers, *, start: int = 0, batch_size: int = 8,
                  progress: bool = False, desc: str = "residuals") -> list[Float[Tensor, "layer pos d_model"]]:
    """Every real position's residual stream of each token row, kept whole (no reduction over positions).

    Returns, in the order of ``rows``, float32 CPU tensors ``[layer, pos, d_model]``:
    ``blocks.{l}.hook_resid_post`` for ``l`` in ``validate_layers(layers)`` (sorted),
    at positions ``start .. len(row) - 1`` (``start=1`` leaves out the attention sink).
    Rows run in length-sorted, right-padded batches with their attention masks
    (:func:`~lens_roles.runtime.batching.token_batches`), and only the blocks up to
    the deepest layer. Use :func:`collect` instead when a mean over positions or
    prompts is all that is needed: it never holds more than a batch.
    """
    layers = validate_layers(model, layers)
    out: list[Tensor | None] = [None] * len(rows)

    def to_cpu(acts, weights, layer):
        return acts.float().cpu()

    for batch in token_batches(model, rows, batch_size, progress=progress, desc=desc):
        with capture(model, layers, to_cpu) as cap:
            batch.forward(model, stop_at_layer=cap.stop_at_layer)
        for row, (i, n) in enumerate(zip(batch.index, batch.lengths)):
            out[i] = torch.stack([cap[layer][row, start:n] for layer in layers])
    return out


def _fingerprint_items(items: Sequence[Encoded]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item.tokens).encode())
    return h.hexdigest()[:16]
