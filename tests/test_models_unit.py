"""Unit tests of lens_roles.runtime.models that need no real weights."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import torch

from lens_roles.errors import ModelError
from lens_roles.runtime.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    cache_root,
    load_hf_model,
    load_model,
    model_id,
    parse_layers,
    resid_hook,
    resolve_hf_folder,
    validate_layers,
)


def _fake(n_layers=3, name="fake-model"):
    return SimpleNamespace(cfg=SimpleNamespace(n_layers=n_layers, model_name=name))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------- validate_layers


def test_validate_layers_all_and_none(tiny_model):
    assert validate_layers(tiny_model, "all") == (0, 1, 2)
    assert validate_layers(tiny_model, None) == (0, 1, 2)
    assert validate_layers(_fake(5), None) == (0, 1, 2, 3, 4)


def test_validate_layers_negative_duplicates_order(tiny_model):
    assert validate_layers(tiny_model, -1) == (2,)
    assert validate_layers(tiny_model, [-3, -1]) == (0, 2)
    assert validate_layers(tiny_model, [2, 0, 2, -1]) == (0, 2)
    assert validate_layers(tiny_model, 1) == (1,)
    assert validate_layers(tiny_model, (1, 0)) == (0, 1)
    assert validate_layers(tiny_model, range(3)) == (0, 1, 2)


@pytest.mark.parametrize("bad", [3, -4, [0, 3], 100])
def test_validate_layers_out_of_range(tiny_model, bad):
    with pytest.raises(ModelError) as err:
        validate_layers(tiny_model, bad)
    msg = str(err.value)
    assert "3 layers" in msg and tiny_model.cfg.model_name in msg


@pytest.mark.parametrize("bad", [True, [False], [1.0], ["1"], "3", "first", []])
def test_validate_layers_rejects_non_integers(tiny_model, bad):
    with pytest.raises(ModelError):
        validate_layers(tiny_model, bad)


# ---------------------------------------------------------------------- parse_layers


def test_parse_layers():
    assert parse_layers("all") == "all"
    assert parse_layers(" all ") == "all"
    assert parse_layers("3") == [3]
    assert parse_layers("3,5") == [3, 5]
    assert parse_layers(" 3 , 5 ,7") == [3, 5, 7]
    assert parse_layers("10-12") == [10, 11, 12]
    assert parse_layers("1,10-12") == [1, 10, 11, 12]
    assert parse_layers("-1") == [-1]
    assert parse_layers(None) is None
    assert parse_layers([1, 2]) == [1, 2]


@pytest.mark.parametrize("bad", ["garbage", "3,x", "1-", "a-b", "", "3;5", "1.5"])
def test_parse_layers_garbage(bad):
    with pytest.raises(ModelError) as err:
        parse_layers(bad)
    assert repr(bad) in str(err.value)


def test_parse_then_validate(tiny_model):
    assert validate_layers(tiny_model, parse_layers("0-2")) == (0, 1, 2)
    assert validate_layers(tiny_model, parse_layers("all")) == (0, 1, 2)
    with pytest.raises(ModelError, match="3 layers"):
        validate_layers(tiny_model, parse_layers("1-3"))


# ------------------------------------------------------------------------ names, misc


def test_resid_hook_and_model_id(tiny_model):
    assert resid_hook(0) == "blocks.0.hook_resid_post"
    assert resid_hook(12) == "blocks.12.hook_resid_post"
    assert resid_hook(2) in tiny_model.hook_dict
    assert model_id(tiny_model) == tiny_model.cfg.model_name
    assert model_id(_fake(name="abc")) == "abc"


def test_embedded_names():
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert set(EMBEDDED_MODELS) == {"smollm2-135m-instruct", "gemma-3-270m"}
    for name, spec in EMBEDDED_MODELS.items():
        assert spec.name == name


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LENS_ROLES_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("LENS_ROLES_CACHE")
    assert cache_root().parts[-2:] == (".cache", "lens_roles")


# ------------------------------------------------------------------------- load_model


def test_load_model_unknown_name_lists_embedded(no_network):
    import transformer_lens  # noqa: F401  (import time is not the function's time)

    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model("no-such-model-xyz")
    elapsed = time.perf_counter() - start
    msg = str(err.value)
    assert "'no-such-model-xyz'" in msg
    assert "smollm2-135m-instruct" in msg and "gemma-3-270m" in msg
    assert elapsed < 20.0, f"load_model of an unknown name took {elapsed:.1f}s"


def test_folder_without_config_is_rejected(tmp_path, no_network):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError) as err:
        load_model(str(folder))
    assert str(folder) in str(err.value) and "config.json" in str(err.value)
    with pytest.raises(ModelError, match="config.json"):
        load_hf_model(str(folder))


def test_resolve_hf_folder(tmp_path):
    assert resolve_hf_folder("no-such-model-xyz") is None
    (tmp_path / "config.json").write_text("{}")
    assert resolve_hf_folder(str(tmp_path)) == tmp_path


def test_load_hf_model_unknown_name(no_network):
    with pytest.raises(ModelError, match="not a local or embedded model"):
        load_hf_model("no-such-model-xyz")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_raises_before_loading(no_network):
    with pytest.raises(ModelError, match="CUDA"):
        load_model("no-such-model-xyz", device="cuda")


@pytest.mark.parametrize("n_devices, match", [(0, "positive integer"), (2, "needs device cuda and 2 GPUs")])
def test_n_devices_is_checked_before_loading(no_network, n_devices, match):
    with pytest.raises(ModelError, match=match):
        load_model("no-such-model-xyz", n_devices=n_devices)


def test_forward_layout_keeps_every_output_bit_for_bit_and_makes_the_unembedding_a_view(tiny_tokenizer):
    """use_forward_layout changes only strides: the logits are identical, and the unembedding's
    transposed weight is no longer copied at every call."""
    from conftest import make_tiny_model

    from lens_roles.runtime.models import use_forward_layout
    from lens_roles.runtime.readout import final_logits

    model = make_tiny_model(tiny_tokenizer, seed=3)
    tokens = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 2, 6]])
    with torch.no_grad():
        before = model(tokens)
    assert use_forward_layout(model) > 0
    w = model.unembed.W_U
    assert w.T.is_contiguous() and w.T.contiguous().data_ptr() == w.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(tokens), before)
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        assert torch.equal(final_logits(model, resid), before)  # the readout's kept weight is the same view


def test_loading_in_one_call_gives_the_per_key_load(tiny_tokenizer):
    """TransformerLens's per-key loading of processed weights and loads_in_one_call end with the same
    parameters (folded and centred the same way) and the same logits."""
    from conftest import make_tiny_model

    from lens_roles.runtime.models import loads_in_one_call

    source = {k: v.clone() for k, v in make_tiny_model(tiny_tokenizer, seed=5).state_dict().items()}
    per_key, one_call = make_tiny_model(tiny_tokenizer, seed=6), make_tiny_model(tiny_tokenizer, seed=7)
    per_key.load_and_process_state_dict(dict(source), fold_ln=True, center_writing_weights=True)
    with loads_in_one_call(one_call):
        one_call.load_and_process_state_dict(dict(source), fold_ln=True, center_writing_weights=True)
    a, b = per_key.state_dict(), one_call.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "load_state_dict" not in vars(one_call)  # the model's own method is back
    tokens = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        assert torch.equal(per_key(tokens), one_call(tokens))
