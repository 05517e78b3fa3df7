"""Does a control vector act in llama.cpp as the same direction does in ``lens_roles``?

llama.cpp reads no metadata from a control vector, so an off-by-one in the layer
numbering would go unnoticed. This module measures it: the default model's own GGUF
runs in llama.cpp (through ``llama-cpp-python``, an optional dependency: ``pip install
.[interop]``) with an exported ``direction.{k}`` applied at scale ``s``, and
``lens_roles`` steers the dequantized model with the same vector, ``s·v``, at
``blocks.{L}.hook_resid_post`` for ``L = k − 1, k, k + 1``. Both see the same token ids.

For each ``L``: the Pearson correlation of the next-token log-probability shifts
(steered minus unsteered, each backend against its own unsteered run), pooled over
prompts × vocabulary, and how often the two steered runs pick the same greedy token.
The unsteered runs are compared first (llama.cpp runs Q4_1 kernels on quantized
activations, ``lens_roles`` float32 on the dequantized weights), as the baseline gap.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.directions.formats.control_vector import ARCH
from lens_roles.errors import DirectionError, ModelError
from lens_roles.interventions.steering import steer


def control_vector_buffer(path: str | Path, n_layer: int, n_embd: int, scale: float = 1.0) -> np.ndarray:
    """The ``[n_embd × (n_layer − 1)]`` float32 buffer llama.cpp's ``common_control_vector_load`` makes of a file.

    As in llama.cpp's ``common/common.cpp``: ``direction.{k}`` (F32, 1-D) lands, times
    ``scale`` (``--control-vector-scaled``), at offset ``n_embd · (k − 1)`` ("layer 1 at
    [0]"), and ``llama_set_adapter_cvec`` adds row ``il − 1`` to the output of layer ``il``.
    The file is read with the ``gguf`` package directly, not through this project's importer.
    """
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    if arch is None or bytes(arch.parts[arch.data[0]]).decode() != ARCH:
        raise DirectionError(f"{path} is not a control vector")
    buffer = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    for t in reader.tensors:
        k = int(t.name.split(".", 1)[1])
        if k < 1 or k >= n_layer or t.tensor_type != gguf.GGMLQuantizationType.F32 or t.n_elements != n_embd:
            raise DirectionError(f"{path}: llama.cpp would reject {t.name}")
        buffer[n_embd * (k - 1): n_embd * k] += np.asarray(t.data, dtype=np.float32) * np.float32(scale)
    return buffer


class LlamaCppModel:
    """A GGUF model in llama.cpp that returns next-token log-probabilities for given token ids.

    ``n_threads`` defaults to 1: llama.cpp's threads spin while they wait, and beside torch's
    threads on a small, shared machine two of them made a 43-token prompt take 8 s instead of 0.4 s.
    """

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 512, n_threads: int = 1):
        try:
            import llama_cpp  # optional, heavy: a compiled library
        except ImportError as exc:
            raise ModelError("llama-cpp-python is not installed: pip install '.[interop]' (make interop)") from exc
        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx, verbose=False,
                                   n_threads=n_threads, n_threads_batch=n_threads)
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.llm.model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.llm.model))
        self._buffer: np.ndarray | None = None

    def close(self) -> None:
        """Free llama.cpp's model and context now (at interpreter exit llama-cpp-python's own cleanup can fail)."""
        self.llm.close()

    def set_control_vector(self, buffer: np.ndarray | None) -> None:
        """Apply a control-vector buffer to layers ``1 .. n_layer`` (None: remove it)."""
        lib = self._lib
        if buffer is None:
            rc = lib.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1)
        else:
            self._buffer = np.ascontiguousarray(buffer, dtype=np.float32)  # kept alive while applied
            ptr = self._buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = lib.llama_set_adapter_cvec(self.llm.ctx, ptr, self._buffer.size, self.n_embd, 1, self.n_layer)
        if rc != 0:
            raise ModelError(f"llama_set_adapter_cvec failed ({rc})")

    def last_logprobs(self, rows: Sequence[Sequence[int]]) -> Float[Tensor, "prompt d_vocab"]:
        """log-softmax of the logits after each row's last token (float64 of the float32 logits)."""
        out = []
        for ids in rows:
            self.llm.reset()
            self.llm.eval(list(ids))
            logits = torch.from_numpy(np.array(self.llm.scores[len(ids) - 1], dtype=np.float32))
            out.append(torch.log_softmax(logits.double(), dim=-1))
        return torch.stack(out)


def lens_roles_logprobs(model, rows: Sequence[Sequence[int]], direction: Direction | None = None,
                        alpha: float = 0.0) -> Float[Tensor, "prompt d_vocab"]:
    """log-softmax after each row's last token, steered by ``alpha · direction`` at its layers (None: unsteered)."""
    out = []
    for ids in rows:
        tokens = torch.tensor([list(ids)], device=model.cfg.device)
        with torch.no_grad():
            if direction is None:
                logits = model(tokens)[0, -1]
            else:
                with steer(model, direction, alpha):
                    logits = model(tokens)[0, -1]
        out.append(torch.log_softmax(logits.double().cpu(), dim=-1))
    return torch.stack(out)


def shift_correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two ``[prompt, d_vocab]`` tensors, pooled over every entry."""
    x, y = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((x @ y) / (x.norm() * y.norm()))


@dataclass(frozen=True)
class Baseline:
    """Unsteered llama.cpp vs ``lens_roles``: max and mean |Δ log-prob| and greedy agreement."""

    max_abs: float
    mean_abs: float
    top1: float


def baseline(ll: Tensor, lr: Tensor) -> Baseline:
    gap = (ll - lr).abs()
    return Baseline(float(gap.max()), float(gap.mean()), float((ll.argmax(-1) == lr.argmax(-1)).double().mean()))


def layer_agreement(model, llama: LlamaCppModel, rows, vector: Tensor, k: int, scale: float,
                    cvec_path: str | Path, base_ll: Tensor, base_lr: Tensor, offsets=(-1, 0, 1)) -> pd.DataFrame:
    """The agreement table of ``direction.{k}`` (the file at ``cvec_path``) against ``lens_roles`` at ``k + offset``.

    ``vector`` is the ``[d_model]`` vector the file holds at ``direction.{k}``; both backends add
    ``scale · vector``. One row per offset: ``k, lens_roles_layer, shift_corr, greedy_agree,
    greedy_changed_llama, greedy_changed_lens_roles, max_abs_gap, mean_abs_gap``.
    """
    llama.set_control_vector(control_vector_buffer(cvec_path, llama.n_layer, llama.n_embd, scale))
    try:
        steered_ll = llama.last_logprobs(rows)
    finally:
        llama.set_control_vector(None)
    shift_ll = steered_ll - base_ll
    out = []
    for off in offsets:
        layer = k + off
        if not 0 <= layer < model.cfg.n_layers:
            continue
        d = Direction((layer,), vector[None], {"model": model.cfg.model_name})
        steered_lr = lens_roles_logprobs(model, rows, d, scale)
        gap = (steered_ll - steered_lr).abs()
        out.append({
            "k": k, "lens_roles_layer": layer,
            "shift_corr": shift_correlation(shift_ll, steered_lr - base_lr),
            "greedy_agree": float((steered_ll.argmax(-1) == steered_lr.argmax(-1)).double().mean()),
            "greedy_changed_llama": float((steered_ll.argmax(-1) != base_ll.argmax(-1)).double().mean()),
            "greedy_changed_lens_roles": float((steered_lr.argmax(-1) != base_lr.argmax(-1)).double().mean()),
            "max_abs_gap": float(gap.max()), "mean_abs_gap": float(gap.mean()),
        })
    return pd.DataFrame(out)
