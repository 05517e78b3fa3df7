"""Integration tests on the embedded default model, SmolLM2-135M-Instruct.

They load the real weights (dequantized once into the cache) and check the
promises a user relies on: the residual stream is the model's native basis, the
librarian persona direction is stable across disjoint halves of the pairs, and a
role vector separates held-out role instructions from held-out baseline ones.
The per-layer numbers are printed (``pytest -s`` shows them) and asserted.
"""

from __future__ import annotations

import functools

import pytest
import torch

import lens_roles as lr
from lens_roles import cli

pytestmark = pytest.mark.integration


def _parity_errors(model, name) -> list[float]:
    """Relative error per layer of ``hook_resid_post`` against transformers' hidden states."""
    hf, _ = lr.load_hf_model(name)
    prompt = lr.Prompt("Which databases index nineteenth-century newspapers?", reply="Try Chronicling America.")
    item = lr.encode(model, [prompt])[0]
    ids = torch.tensor([item.tokens])
    captured = {}
    handle = hf.model.norm.register_forward_pre_hook(lambda mod, args: captured.setdefault("pre_norm", args[0]))
    try:
        with torch.no_grad():
            hidden = hf(ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    _, cache = model.run_with_cache(ids, names_filter=lambda hook: hook.endswith("hook_resid_post"))
    n = model.cfg.n_layers
    errors = []
    for layer in range(n):
        # transformers applies the final norm to its last hidden state; compare the pre-norm stream there
        ref = hidden[layer + 1] if layer < n - 1 else captured["pre_norm"]
        errors.append(float((cache[lr.resid_hook(layer)] - ref).norm() / ref.norm()))
    print(f"{name or 'default'}: relative error per layer:", " ".join(f"{e:.1e}" for e in errors))
    return errors


def test_native_basis_parity_with_transformers(real_model):
    """``blocks.{l}.hook_resid_post`` equals transformers' hidden state after block l (1e-4 relative)."""
    assert max(_parity_errors(real_model, None)) < 1e-4


def test_gemma_loads_in_native_basis():
    """The second embedded model, Gemma-3-270m, loads and keeps the native basis too."""
    model = lr.load_model("gemma-3-270m")
    assert (model.cfg.n_layers, model.cfg.d_model) == (18, 640)
    assert max(_parity_errors(model, "gemma-3-270m")) < 1e-4


def test_librarian_direction_split_half_agreement(real_model):
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    frame = lr.split_half_agreement(real_model, pairs, batch_size=24)
    cosines = frame.sort_values("layer").value.tolist()
    print("librarian split-half cosine per layer:", " ".join(f"{c:.3f}" for c in cosines))
    assert len(cosines) == real_model.cfg.n_layers
    assert min(cosines) > 0.8, "the two halves of the pairs should give nearly the same direction at every layer"


def test_role_vector_separates_held_out_instructions(real_model):
    role = lr.load_role("chemist")
    baseline = lr.load_baseline()
    role_train, role_held = role.split(0.75)
    base_train, base_held = baseline.split(0.75)
    vector = lr.role_vector(real_model, role_train, base_train, batch_size=24)
    held_role = lr.collect(real_model, role_held, positions="eoi", keep_per_prompt=True, batch_size=24)
    held_base = lr.collect(real_model, base_held, positions="eoi", keep_per_prompt=True, batch_size=24)
    auc = lr.separation_auc(vector, held_role, held_base).sort_values("layer")
    print("chemist held-out AUC per layer:", " ".join(f"{a:.3f}" for a in auc.value))
    assert auc.value.max() == 1.0
    assert auc[auc.layer >= 10].value.min() > 0.95


def test_cli_extract_and_roles_write_loadable_directions(real_model, tmp_path, capsys):
    main = functools.partial(cli.main, load_model=lambda *a, **k: real_model)
    out = tmp_path / "librarian.safetensors"
    pairs = lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl"
    assert main(["extract", "--pairs", str(pairs), "--out", str(out), "--layers", "10-12", "--batch-size", "24"]) == 0
    direction = lr.Direction.load(out)
    assert direction.layers == (10, 11, 12)
    assert direction.meta["positions"] == "reply" and direction.meta["model"] == "smollm2-135m-instruct"
    assert (tmp_path / "librarian.json").is_file()

    roles_out = tmp_path / "roles"
    assert main(["roles", "--roles", "chemist,lawyer", "--out", str(roles_out), "--layers", "5"]) == 0
    assert sorted(p.name for p in roles_out.glob("*.safetensors")) == ["chemist.safetensors", "lawyer.safetensors"]
    assert lr.Direction.load(roles_out / "chemist.safetensors").meta["positions"] == "eoi"


def test_cli_bad_input_gives_one_clear_error_and_writes_nothing(real_model, tmp_path, capsys):
    main = functools.partial(cli.main, load_model=lambda *a, **k: real_model)
    pairs = lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl"
    out = tmp_path / "v.safetensors"

    assert main(["extract", "--pairs", str(pairs), "--out", str(out), "--layers", "30"]) == 2
    assert "layer 30 is out of range" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "a", "positive": "b", "negative": "c"}\n{"user": "a", "positive": \n')
    assert main(["extract", "--pairs", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert not out.exists()

    assert main(["roles", "--roles", "astronaut", "--out", str(tmp_path / "r")]) == 2
    assert "unknown role(s) 'astronaut'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_unknown_model_lists_embedded_names(tmp_path, capsys):
    pairs = lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl"
    out = str(tmp_path / "v.safetensors")
    code = cli.main(["extract", "--pairs", str(pairs), "--out", out, "--model", "no-such-model"])
    err = capsys.readouterr().err
    assert code == 2
    assert "smollm2-135m-instruct" in err and "gemma-3-270m" in err


def test_librarian_steering_raises_adherence_and_lowers_similarity(real_model):
    """On held-out pairs, adding the persona vector raises the positive-reply margin and moves
    the residual stream away from the unsteered run, more so for larger |α|."""
    from lens_roles.interventions.steering import residual_norms
    from lens_roles.measures.sweeps import adherence_sweep, cosine_sweep

    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    train, held = pairs.split(0.75)
    persona = lr.persona_vector(real_model, train, layers=[12], batch_size=24)
    few = lr.PairSet("librarian", held.pairs[:6])
    norms = residual_norms(real_model, [p.user for p in few.pairs], layers=[12])
    alphas = [-0.5, 0.5]
    adherence = adherence_sweep(real_model, persona, few, steer_layers=[12], alphas=alphas, relative=norms)
    margin = adherence[adherence.metric == "logprob_margin"].sort_values("alpha").value.tolist()
    print("librarian margin at alpha -0.5, 0, 0.5 (layer 12):", [round(m, 3) for m in margin])
    assert margin[0] < margin[1] < margin[2]
    cos = cosine_sweep(real_model, persona, [p.user for p in few.pairs], steer_layers=[12], alphas=[0.25, 0.5],
                       relative=norms)
    last = cos[cos.read_layer == real_model.cfg.n_layers - 1].sort_values("alpha").value.tolist()
    print("cosine to unsteered at the last layer, alpha 0, 0.25, 0.5:", [round(c, 3) for c in last])
    assert last[0] == 1.0 and last[0] > last[1] > last[2]
