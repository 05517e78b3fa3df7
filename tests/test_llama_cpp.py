"""The llama.cpp control-vector convention, measured: the default model's own GGUF in llama.cpp, steered with
an exported librarian ``direction.{k}``, moves the next-token log-probabilities as ``lens_roles`` steering at
``blocks.{k}.hook_resid_post`` does, and clearly unlike steering at ``k − 1`` or ``k + 1``.

Needs llama-cpp-python (``make interop`` builds and installs it, then runs this test); skipped without it.
"""

from __future__ import annotations

import importlib.util

import pytest

import lens_roles as lr
from lens_roles.directions.formats import export_direction, import_direction
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import Prompt
from lens_roles.interventions.steering import residual_norms
from lens_roles.measures.llama_cpp import LlamaCppModel, baseline, layer_agreement, lens_roles_logprobs
from lens_roles.runtime.models import EMBEDDED_MODELS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.llama_cpp,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (make interop builds it from source)"),
]

K = 10


@pytest.fixture(scope="module")
def setup(real_model):
    train, held = lr.load_pairs("librarian").split(0.75)
    persona = lr.persona_vector(real_model, train.head(24), layers=[K])
    prompts = [Prompt(p.user) for p in list(held)[:6]]
    rows = [item.tokens for item in encode(real_model, prompts)]
    scale = 0.5 * residual_norms(real_model, prompts, layers=[K])[K] / persona.norms()[K]
    llama = LlamaCppModel(EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_path(), n_ctx=256)
    yield persona, rows, scale, llama
    llama.close()


def test_unsteered_llama_cpp_agrees_with_the_dequantized_model(real_model, setup):
    _, rows, _, llama = setup
    b = baseline(llama.last_logprobs(rows), lens_roles_logprobs(real_model, rows))
    # llama.cpp runs Q4_1 kernels on activations quantized to Q8_1, so the logits differ a little
    # (the benchmark measures max |Δ log-prob| 0.93, mean 0.12 over 18 prompts, greedy token 17 of 18)
    assert b.top1 >= 5 / 6 and b.mean_abs < 0.25


def test_direction_k_is_blocks_k_resid_post(real_model, setup, tmp_path):
    persona, rows, scale, llama = setup
    path = export_direction(persona, tmp_path / "librarian.gguf", "gguf")
    assert import_direction(path, "gguf", model=real_model).layers == (K,)
    base_ll, base_lr = llama.last_logprobs(rows), lens_roles_logprobs(real_model, rows)
    table = layer_agreement(real_model, llama, rows, persona[K], K, scale, path, base_ll, base_lr)
    corr = dict(zip(table["lens_roles_layer"], table["shift_corr"]))
    gap = dict(zip(table["lens_roles_layer"], table["mean_abs_gap"]))
    assert corr[K] > 0.99 and corr[K] > max(corr[K - 1], corr[K + 1]), table
    # at k the steered runs differ about as much as the unsteered ones; one layer off, several times more
    assert gap[K] < 0.5 * min(gap[K - 1], gap[K + 1]), table
