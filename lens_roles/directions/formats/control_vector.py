"""Control vectors as GGUF files: llama.cpp's ``--control-vector`` format, which repeng's ``export_gguf`` writes.

A file holds ``general.architecture = "controlvector"``, ``controlvector.model_hint``
(a string: repeng writes the Hugging Face ``model_type``, e.g. ``"llama"``),
``controlvector.layer_count`` (uint32: the number of direction tensors, as repeng
writes it) and one F32 1-D tensor ``direction.{k}`` of length ``d_model`` per layer.

llama.cpp adds ``direction.{k}`` to the output of block ``k`` at every position
(``build_cvec(cur, il)`` after the block's FFN residual), which is our
``blocks.{k}.hook_resid_post``. Its loader rejects ``direction.0`` and any tensor
that is not F32 or not 1-D, so ``format="gguf"`` refuses them too, and a direction
at layer 0 cannot be exported for llama.cpp. repeng itself steers any
``model.layers[k]`` including 0, so ``format="repeng"`` reads and writes layer 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from lens_roles.directions.direction import Direction
from lens_roles.directions.formats.common import ModelShape, Rows, as_vector, check_width, export_vectors, our_layer
from lens_roles.errors import DirectionError
from lens_roles.io import atomic_write, regular_file

ARCH = "controlvector"
HINT_KEY = f"{ARCH}.model_hint"
COUNT_KEY = f"{ARCH}.layer_count"
_NAME = re.compile(r"^direction\.(\d+)$")


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.types or field.types[0] != gguf.GGUFValueType.STRING:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read_control_vector(path: Path, shape: ModelShape, *, allow_layer_zero: bool) -> Rows:
    """The directions of a control-vector GGUF, as our layers.

    Raises:
        DirectionError: naming the file: unreadable or not a control vector, no ``direction.*``
            tensor, a tensor name without a layer, ``direction.0`` (unless ``allow_layer_zero``),
            a layer beyond the model, a tensor that is not F32 or not 1-D, widths that differ
            from each other or from the model.
    """
    regular_file(path, "control-vector GGUF", DirectionError)
    try:
        reader = gguf.GGUFReader(path)
        tensors = list(reader.tensors)
    except Exception as exc:  # the gguf reader raises ValueError, KeyError, struct errors ... on damaged files
        raise DirectionError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {str(exc)[:200]})") from None
    arch = _string_field(reader, "general.architecture")
    if arch != ARCH:
        raise DirectionError(f"{path}: general.architecture is {arch!r}, not {ARCH!r}; this GGUF is not a "
                             "control vector (a model file?)")
    found = [t for t in tensors if t.name.startswith("direction.")]
    if not found:
        raise DirectionError(f"{path}: no direction.* tensors in this control vector (it has "
                             f"{[t.name for t in tensors][:8]})")
    layers, vectors, width = [], [], None
    for t in tensors:
        match = _NAME.match(t.name)
        if not match:
            raise DirectionError(f"{path}: tensor {t.name!r} is not direction.<layer>; llama.cpp rejects such a file")
        index = int(match[1])
        if index == 0 and not allow_layer_zero:
            raise DirectionError(f"{path}: direction.0 is not a llama.cpp control vector layer (its loader rejects "
                                 "index 0: block 0's output has no control vector); read it as --format repeng")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise DirectionError(f"{path}: {t.name} is {t.tensor_type.name}, not F32; llama.cpp reads F32 "
                                 "control vectors only")
        if len(t.shape) != 1:
            raise DirectionError(f"{path}: {t.name} has shape {list(t.shape)}; a control vector is 1-D [d_model]")
        layer = our_layer(path, t.name, index, 0, shape)
        if layer in layers:
            raise DirectionError(f"{path}: {t.name} appears twice")
        vector = as_vector(path, t.name, np.array(t.data, dtype=np.float32), width)
        width = vector.shape[0]
        layers.append(layer)
        vectors.append(vector)
    check_width(path, width, shape)
    order = sorted(range(len(layers)), key=layers.__getitem__)
    extra = {"model_hint": _string_field(reader, HINT_KEY)}
    del reader
    return Rows(tuple(layers[i] for i in order), tuple(vectors[i] for i in order), extra)


def write_control_vector(direction: Direction, path: Path, *, layers=None, model_hint: str | None = None,
                         allow_layer_zero: bool = False, fmt: str = "gguf") -> Path:
    """Write ``direction`` at ``layers`` as a control-vector GGUF, the way repeng's ``export_gguf`` does.

    ``model_hint`` defaults to the direction's model name.

    Raises:
        DirectionError: layer 0 for llama.cpp (``allow_layer_zero=False``), or a layer the direction lacks.
    """
    vectors = export_vectors(direction, layers, fmt)
    if 0 in vectors and not allow_layer_zero:
        raise DirectionError("layer 0 cannot be written for llama.cpp: it has no direction.0 (its loader rejects "
                             "index 0, block 0's output is never steered); leave layer 0 out (--layers 1-...) "
                             "or write --format repeng")
    hint = model_hint if model_hint is not None else str(direction.meta.get("model") or "")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(HINT_KEY, hint)
        writer.add_uint32(COUNT_KEY, len(vectors))
        for layer in sorted(vectors):
            writer.add_tensor(f"direction.{layer}", vectors[layer].numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)
