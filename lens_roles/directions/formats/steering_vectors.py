"""steering-vectors' ``SteeringVector`` as a ``.pt`` file: ``{"layer_activations": {k: [d_model]}, "layer_type": str}``.

The library (``steering_vectors.SteeringVector``, a dataclass of ``layer_activations:
dict[int, Tensor]`` and ``layer_type``) has no file format of its own; this is its
dataclass as plain data, ``torch.save(dataclasses.asdict(vector), path)``, read back
with ``SteeringVector(**torch.load(path, weights_only=True))``. A pickled
``SteeringVector`` object is refused (unpickling it would run code): save it as a dict.

With ``layer_type="decoder_block"`` (the default) the library adds
``layer_activations[k]`` to the output of ``model.layers[k]``: our
``blocks.{k}.hook_resid_post``. The other layer types (``self_attn``, ``mlp``, the
layer norms) are not the residual stream and are refused.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

from lens_roles.directions.direction import Direction
from lens_roles.directions.formats.common import (
    ModelShape,
    Rows,
    as_vector,
    check_width,
    export_vectors,
    load_plain_torch,
    our_layer,
)
from lens_roles.errors import DirectionError
from lens_roles.io import atomic_write

RESIDUAL_LAYER_TYPE = "decoder_block"


def read_steering_vector(path: Path, shape: ModelShape) -> Rows:
    """The layers of a saved ``SteeringVector`` dict.

    Raises:
        DirectionError: naming the file: not a dict with ``layer_activations`` (a mapping from
            integer layers to 1-D tensors), a ``layer_type`` other than ``decoder_block``, a layer
            beyond the model, widths that differ.
    """
    data = load_plain_torch(path, "steering-vectors file")
    if not isinstance(data, dict) or not isinstance(data.get("layer_activations"), dict):
        raise DirectionError(f"{path}: a steering-vectors file is a dict with 'layer_activations' "
                             f"({{layer: tensor}}) and 'layer_type'; got {type(data).__name__}"
                             + (f" with keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else ""))
    layer_type = data.get("layer_type", RESIDUAL_LAYER_TYPE)
    if layer_type != RESIDUAL_LAYER_TYPE:
        raise DirectionError(f"{path}: layer_type {layer_type!r} is not the residual stream; only "
                             f"{RESIDUAL_LAYER_TYPE!r} (a decoder block's output) maps to blocks.{{k}}.hook_resid_post")
    acts = data["layer_activations"]
    if not acts:
        raise DirectionError(f"{path}: layer_activations is empty")
    layers, vectors, width = [], [], None
    for key in sorted(acts, key=str):
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise DirectionError(f"{path}: layer_activations key {key!r} is not an integer layer")
        index = int(key)
        if index < 0:  # the library counts negative layers from the end of model.layers
            if shape.n_layers is None:
                raise DirectionError(f"{path}: layer_activations[{key}] counts from the end, so its block depends "
                                     "on the model's depth: give the model (--model)")
            index += shape.n_layers
        layer = our_layer(path, f"layer_activations[{key}]", index, 0, shape)
        vector = as_vector(path, f"layer_activations[{key}]", acts[key], width)
        width = vector.shape[0]
        layers.append(layer)
        vectors.append(vector)
    check_width(path, width, shape)
    order = sorted(range(len(layers)), key=layers.__getitem__)
    return Rows(tuple(layers[i] for i in order), tuple(vectors[i] for i in order), {"layer_type": layer_type})


def write_steering_vector(direction: Direction, path: Path, *, layers=None) -> Path:
    """Write ``direction`` as ``{"layer_activations": {layer: [d_model] float32}, "layer_type": "decoder_block"}``."""
    vectors = export_vectors(direction, layers, "steering-vectors")
    data = {"layer_activations": {int(k): v.clone() for k, v in sorted(vectors.items())},
            "layer_type": RESIDUAL_LAYER_TYPE}
    return atomic_write(path, lambda tmp: torch.save(data, tmp))
