"""Sparse autoencoders on the residual stream: load, check, train, evaluate, splice.

This is the only module that imports ``sae_lens``. SAEs are ``sae_lens`` objects
throughout (``SAE.load_from_disk`` loads what :func:`save_sae` writes), so an SAE
from ``sae_lens``'s registry and one trained here go through the same analysis
(:mod:`lens_roles.analysis.sae.features`).

* :func:`load_sae` — a folder (``cfg.json`` + ``sae_weights.safetensors``) or a
  registry ``release`` + ``sae_id``; float32 on the asked device.
* :func:`check_sae` — the SAE reads ``blocks.{L}.hook_resid_post`` (or the same
  stream as ``blocks.{L+1}.hook_resid_pre``) of a model with its ``d_model``;
  returns ``L``.
* :func:`harvest` — residual activations of a :class:`~lens_roles.analysis.sae.corpus.Corpus` at
  some layers, ``[token, d_model]`` per layer (position 0, the BOS attention sink
  whose norm is tens of times the others', is left out).

Every forward over a corpus goes through :func:`lens_roles.runtime.batching.token_batches`
(length-sorted, right-padded, with the attention mask) and reads activations through
:func:`lens_roles.runtime.capture.capture`.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lens_roles.errors import DataError, SAEError
from lens_roles.inputs.sets import fingerprint
from lens_roles.io import atomic_write, check_writable, parse_json, read_tensors, read_text
from lens_roles.runtime.activations import residual_rows
from lens_roles.runtime.models import model_id, resid_hook, validate_layers
from lens_roles.runtime.shards import Executor, split_units

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
        check_sae_folder(path)
        try:
            return SAE.load_from_disk(str(path), device=device, dtype="float32")
        except Exception as exc:  # sae_lens raises many kinds on a damaged folder
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SAEError(f"cannot load the SAE in {path}: {first[:300]}") from None
    try:
        return SAE.from_pretrained(str(source), sae_id, device=device, dtype="float32")
    except Exception as exc:
        raise SAEError(f"cannot load SAE {sae_id!r} of release {source!r} from sae_lens's registry: {exc}") from exc


#: File beside an SAE's weights holding its features' firing frequencies (``frequency``, ``[d_sae]``).
FREQUENCY_FILE = "feature_frequency.safetensors"


def load_feature_frequencies(folder: str | Path) -> Tensor | None:
    """The firing frequency of each feature ``[d_sae]`` (fraction of training tokens it fired on), saved
    beside the SAE by ``train-sae``; None when the folder has none.

    Raises:
        SAEError: a frequency file that cannot be read or holds no ``frequency`` tensor.
    """
    path = Path(folder) / FREQUENCY_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("frequency").float()
    except Exception as exc:  # a damaged file
        raise SAEError(f"{path} is not a readable feature-frequency file ({type(exc).__name__})") from None


def check_sae_folder(path: Path) -> None:
    """Check an SAE folder's ``cfg.json`` against the shapes in ``sae_weights.safetensors``, before loading.

    Raises:
        SAEError: naming the folder, for a ``cfg.json`` that is not an object with
            positive integer ``d_in`` and ``d_sae``, a missing or unreadable weights
            file, or an encoder/decoder whose shape disagrees with ``cfg.json``.
    """
    try:
        cfg = parse_json(read_text(path / "cfg.json", "SAE config"), str(path / "cfg.json"))
    except DataError as exc:
        raise SAEError(str(exc)) from None
    dims = {k: cfg.get(k) if isinstance(cfg, dict) else None for k in ("d_in", "d_sae")}
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in dims.values()):
        raise SAEError(f"{path / 'cfg.json'}: d_in and d_sae must be positive integers, got {dims}")
    weights = path / "sae_weights.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # missing or damaged file
        raise SAEError(f"{weights} is not a readable SAE weights file ({type(exc).__name__})") from None
    expected = {"W_enc": (dims["d_in"], dims["d_sae"]), "W_dec": (dims["d_sae"], dims["d_in"])}
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise SAEError(f"{weights}: {key} has shape {shapes[key]}, but cfg.json says d_in {dims['d_in']} and "
                           f"d_sae {dims['d_sae']} (expected {shape}); the weights and cfg.json do not belong "
                           "together")


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


@torch.no_grad()
def harvest(model, sequences: Sequence[Sequence[int]], layers: Sequence[int], *, batch_size: int = 16,
            progress: bool = False) -> dict[int, Float[Tensor, "token d_model"]]:
    """Residual activations after each of ``layers`` at every real token but the first.

    Returns float32 CPU tensors ``[token, d_model]`` per layer; tokens come in the
    order of ``sequences`` (then positions). Only the blocks up to the deepest layer
    run (:func:`~lens_roles.runtime.activations.residual_rows`); ``progress`` shows a bar.
    """
    layers = validate_layers(model, list(layers))
    rows = residual_rows(model, sequences, layers, start=1, batch_size=batch_size, progress=progress,
                         desc="harvest")  # per sequence [layer, pos - 1, d_model]
    return {layer: torch.cat([r[j] for r in rows]) for j, layer in enumerate(layers)}


#: the manifest a sharded harvest writes beside its shard files
HARVEST_MANIFEST = "harvest.json"


def harvest_shards(model, sequences: Sequence[Sequence[int]], layers: Sequence[int], folder: str | Path, *,
                   batch_size: int = 16, executor: Executor | None = None, progress: bool = False) -> list[Path]:
    """:func:`harvest` written as identified safetensors shard files under ``folder``; read back with
    :func:`read_harvest`.

    The sequences run in :func:`harvest`'s own batches (length-sorted, ``batch_size``
    each); whole batches are cut into shards (``executor.shards``, or one shard
    without an executor), and shard ``i`` writes ``shard-<i>-of-<n>.safetensors``
    (one ``[token, d_model]`` float32 tensor per layer, plus each sequence's index
    and token count), atomically and stamped with the job's key. ``harvest.json``
    lists the shards. A shard re-run after its worker died rewrites the same file,
    so it is never counted twice; shards already on disk with the job's key are not
    run again (a resumed job). With an ``executor`` the workers write the files:
    ``folder`` must be storage they share (any local path on a one-machine cluster).

    Raises:
        SAEError: a shard file that did not appear in ``folder`` (not shared with the workers).
    """
    layers = validate_layers(model, list(layers))
    folder = Path(folder)
    check_writable(folder, "harvest folder")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # token_batches' order
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if not batches:
        raise DataError("no sequences to harvest")
    n_shards = executor.shards(len(batches)) if executor is not None else 1
    cut = split_units([len(b) for b in batches], n_shards)
    key = fingerprint({"model": model_id(model), "layers": list(layers), "batch_size": batch_size, "shards": len(cut),
                       "sequences": [list(map(int, s)) for s in sequences]})
    names = [f"shard-{i:05d}-of-{len(cut):05d}.safetensors" for i in range(len(cut))]
    payloads = [(i, [r for b in cut[i] for r in batches[b]]) for i in range(len(cut))]
    todo = [p for p in payloads if _shard_key(folder / names[p[0]]) != key]
    shared = {"sequences": [list(map(int, s)) for s in sequences], "layers": layers, "batch_size": batch_size,
              "folder": str(folder), "names": names, "key": key}
    if todo:
        if executor is None:
            for p in todo:
                _harvest_shard(model, shared, p)
        else:
            executor.check(model)
            executor.map(_harvest_shard, shared, todo, desc="harvest shards", progress=progress)
    missing = [n for n in names if _shard_key(folder / n) != key]
    if missing:
        raise SAEError(f"harvest shard(s) {', '.join(missing[:3])} did not appear in {folder}: the workers must "
                       "write to storage this process reads (a shared folder on a multi-machine cluster)")
    manifest = {"key": key, "model": model_id(model), "layers": list(layers), "n_sequences": len(sequences),
                "shards": names}
    atomic_write(folder / HARVEST_MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return [folder / n for n in names]


def _shard_key(path: Path) -> str | None:
    """The job key stamped in a harvest shard file, or None when there is no readable one."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}")).get("key")
    except Exception:  # a damaged or foreign file: run the shard again
        return None


@torch.no_grad()
def _harvest_shard(model, shared: dict, payload: tuple[int, list[int]]) -> str:
    """One harvest shard: its sequences' residuals (the same batches as :func:`harvest`), written to its file."""
    shard, index = payload
    layers = shared["layers"]
    rows = residual_rows(model, [shared["sequences"][i] for i in index], layers, start=1,
                         batch_size=shared["batch_size"])  # per sequence [layer, pos - 1, d_model]
    tensors = {f"layer_{layer}": torch.cat([r[j] for r in rows]).contiguous() for j, layer in enumerate(layers)}
    tensors["index"] = torch.tensor(index, dtype=torch.long)
    tensors["tokens"] = torch.tensor([r.shape[1] for r in rows], dtype=torch.long)
    meta = json.dumps({"key": shared["key"], "shard": shard})
    path = Path(shared["folder"]) / shared["names"][shard]
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": meta}))
    return path.name


def read_harvest(folder: str | Path) -> dict[int, Float[Tensor, "token d_model"]]:
    """The activations :func:`harvest_shards` wrote, per layer ``[token, d_model]`` in sequence order —
    what :func:`harvest` returns.

    Raises:
        SAEError: no manifest, a listed shard missing or from another job, or the
            shards not holding every sequence exactly once.
    """
    folder = Path(folder)
    manifest = parse_json(read_text(folder / HARVEST_MANIFEST, "harvest manifest"), str(folder / HARVEST_MANIFEST))
    if not isinstance(manifest, dict) or not {"key", "layers", "n_sequences", "shards"} <= set(manifest):
        raise SAEError(f"{folder / HARVEST_MANIFEST} is not a harvest manifest (written by harvest_shards)")
    layers, n = manifest["layers"], manifest["n_sequences"]
    pieces: list[list[Tensor] | None] = [None] * n
    for name in manifest["shards"]:
        tensors, info = read_tensors(folder / name, "harvest shard", SAEError, required=("index", "tokens"))
        if info.get("key") != manifest["key"]:
            raise SAEError(f"{folder / name} belongs to another harvest (key {info.get('key')}, not "
                           f"{manifest['key']}); harvest again into an empty folder")
        splits = [torch.split(tensors[f"layer_{layer}"], tensors["tokens"].tolist()) for layer in layers]
        for k, i in enumerate(tensors["index"].tolist()):
            if pieces[i] is not None:
                raise SAEError(f"{folder}: sequence {i} is in two shards")
            pieces[i] = [sp[k] for sp in splits]
    lost = [i for i, p in enumerate(pieces) if p is None]
    if lost:
        raise SAEError(f"{folder}: {len(lost)} sequence(s) in no shard, e.g. {lost[:5]}")
    return {layer: torch.cat([p[j] for p in pieces]) for j, layer in enumerate(layers)}


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

    Raises:
        SAEError: an SAE that does not fit the model (width, hook, layer), before
            any hook is attached (:func:`check_sae`).
    """
    hook = resid_hook(check_sae(sae, model))

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
