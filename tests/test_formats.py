"""Vector files of other tools: round trips for every format (bit for bit in float32), files written the way
each tool writes them, the GGUF keys llama.cpp reads, and one clear error for each kind of bad file."""

from __future__ import annotations

import dataclasses
import fractions
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lens_roles.directions.direction import Direction
from lens_roles.directions.formats import CONVENTIONS, FORMATS, ModelShape, export_direction, import_direction
from lens_roles.errors import DirectionError, LensRolesError

N_LAYERS, D_MODEL = 6, 16
SHAPE = ModelShape(N_LAYERS, D_MODEL, "tiny-test")
SUFFIX = {"gguf": ".gguf", "repeng": ".gguf", "steering-vectors": ".pt", "persona-pt": ".pt",
          "assistant-axis": ".pt", "npz": ".npz"}


def make_direction(layers=(1, 3, 5), seed=0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(layers), D_MODEL, generator=g) * torch.logspace(-3, 3, D_MODEL)
    return Direction(layers, vectors, {"model": "tiny-test", "name": "librarian", "method": "mean_diff"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_bit_for_bit(tmp_path, fmt):
    d = make_direction()
    path = export_direction(d, tmp_path / f"v{SUFFIX[fmt]}", fmt, n_layers=N_LAYERS)
    back = import_direction(path, fmt, model=SHAPE, layer_offset=0 if fmt == "npz" else None)
    assert back.layers == d.layers
    assert torch.equal(back.vectors, d.vectors)
    assert back.meta["source"] == CONVENTIONS[fmt].tool and back.meta["format"] == fmt
    assert back.meta["convention"] == CONVENTIONS[fmt].text
    assert back.meta["model"] == "tiny-test"
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temporary file left behind


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_of_a_subset_of_layers(tmp_path, fmt):
    d = make_direction((1, 2, 3, 4, 5), seed=1)
    path = export_direction(d, tmp_path / f"v{SUFFIX[fmt]}", fmt, layers=[2, 4], n_layers=N_LAYERS)
    back = import_direction(path, fmt, model=SHAPE, layer_offset=0 if fmt == "npz" else None)
    assert back.layers == (2, 4)
    assert torch.equal(back.vectors, d.select([2, 4]).vectors)


def test_npz_layer_offset_round_trips(tmp_path):
    d = make_direction((0, 2))
    path = export_direction(d, tmp_path / "v.npz", "npz", layer_offset=-1)
    assert sorted(np.load(path).files) == ["layer_1", "layer_3"]
    back = import_direction(path, "npz", layer_offset=-1)
    assert back.layers == (0, 2) and torch.equal(back.vectors, d.vectors)


def test_gguf_has_exactly_the_keys_and_tensors_llama_cpp_reads(tmp_path):
    d = make_direction((1, 3, 5))
    path = export_direction(d, tmp_path / "v.gguf", "gguf")
    reader = gguf.GGUFReader(path)
    fields = {name: reader.get_field(name) for name in reader.fields}
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = fields["controlvector.model_hint"]
    assert hint.types == [gguf.GGUFValueType.STRING] and bytes(hint.parts[hint.data[0]]).decode() == "tiny-test"
    count = fields["controlvector.layer_count"]
    assert count.types == [gguf.GGUFValueType.UINT32] and int(count.parts[count.data[0]][0]) == 3
    assert sorted(k for k in fields if not k.startswith("GGUF.")) == [
        "controlvector.layer_count", "controlvector.model_hint", "general.architecture"]
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.3", "direction.5"]
    for t, layer in zip(reader.tensors, d.layers):
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [D_MODEL]
        assert np.array_equal(np.asarray(t.data), d[layer].numpy())


# ----------------------------------------------------------------- files written the way each tool writes them


def _write_gguf(path, tensors: dict, *, arch="controlvector", hint="llama", types=None):
    """A control vector written as repeng's export_gguf does (GGUFWriter, model_hint, layer_count)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", hint)
    writer.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, value in tensors.items():
        writer.add_tensor(name, value, raw_dtype=(types or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_repeng_style_gguf_reads_with_layer_zero(tmp_path):
    rng = np.random.default_rng(0)
    dirs = {k: rng.standard_normal(D_MODEL).astype(np.float32) for k in (0, 2, 4)}
    path = _write_gguf(tmp_path / "r.gguf", {f"direction.{k}": v for k, v in dirs.items()})
    d = import_direction(path, "repeng", model=SHAPE)
    assert d.layers == (0, 2, 4) and d.meta["source_info"]["model_hint"] == "llama"
    assert all(np.array_equal(d[k].numpy(), v) for k, v in dirs.items())
    with pytest.raises(DirectionError, match="direction.0 is not a llama.cpp"):
        import_direction(path, "gguf", model=SHAPE)


def test_repeng_writes_and_reads_our_gguf(tmp_path):
    try:
        import repeng
    except Exception as exc:  # repeng 0.4.0 pins numpy<2 and fails to import under numpy 2 (np.float_)
        pytest.skip(f"repeng cannot be imported here ({type(exc).__name__}: {exc}); "
                    "test_repeng_style_gguf_reads_with_layer_zero writes its export_gguf's file instead")
    rng = np.random.default_rng(1)
    cv = repeng.ControlVector("llama", {k: rng.standard_normal(D_MODEL).astype(np.float32) for k in (1, 5)})
    cv.export_gguf(str(tmp_path / "cv.gguf"))
    d = import_direction(tmp_path / "cv.gguf", "gguf", model=SHAPE)
    assert d.layers == (1, 5) and all(np.array_equal(d[k].numpy(), cv.directions[k]) for k in (1, 5))
    ours = export_direction(make_direction(), tmp_path / "ours.gguf", "repeng")
    back = repeng.ControlVector.import_gguf(str(ours))
    assert sorted(back.directions) == [1, 3, 5]
    assert all(np.array_equal(back.directions[k], make_direction()[k].numpy()) for k in (1, 3, 5))


def test_steering_vectors_dict_reads(tmp_path):
    layer_acts = {1: torch.randn(D_MODEL, dtype=torch.float64), -1: torch.randn(D_MODEL)}
    torch.save({"layer_activations": layer_acts, "layer_type": "decoder_block"}, tmp_path / "sv.pt")
    d = import_direction(tmp_path / "sv.pt", "steering-vectors", model=SHAPE)
    assert d.layers == (1, N_LAYERS - 1)
    assert torch.equal(d[1], layer_acts[1].float()) and torch.equal(d[N_LAYERS - 1], layer_acts[-1])
    with pytest.raises(DirectionError, match="counts from the end"):
        import_direction(tmp_path / "sv.pt", "steering-vectors")


def test_steering_vectors_library_round_trip(tmp_path):
    sv_mod = pytest.importorskip("steering_vectors",
                                 reason="steering-vectors is not installed (make bench installs it --no-deps)")
    sv = sv_mod.SteeringVector({2: torch.randn(D_MODEL), 4: torch.randn(D_MODEL)}, "decoder_block")
    torch.save(dataclasses.asdict(sv), tmp_path / "sv.pt")
    d = import_direction(tmp_path / "sv.pt", "steering-vectors", model=SHAPE)
    assert d.layers == (2, 4) and torch.equal(d[2], sv.layer_activations[2])
    out = export_direction(make_direction(), tmp_path / "ours.pt", "steering-vectors")
    back = sv_mod.SteeringVector(**torch.load(out, weights_only=True))
    assert back.layer_type == "decoder_block" and sorted(back.layer_activations) == [1, 3, 5]
    torch.save(sv, tmp_path / "pickled.pt")
    with pytest.raises(DirectionError, match="pickles other objects"):
        import_direction(tmp_path / "pickled.pt", "steering-vectors")


def test_persona_vectors_file_as_generate_vec_writes_it(tmp_path):
    # generate_vec.py: torch.stack([pos[l].mean(0) - neg[l].mean(0) for l in range(n_layers + 1)])
    hidden = torch.randn(N_LAYERS + 1, 4, D_MODEL)
    diff = torch.stack([hidden[layer].mean(0).float() for layer in range(N_LAYERS + 1)], dim=0)
    torch.save(diff, tmp_path / "librarian_response_avg_diff.pt")
    d = import_direction(tmp_path / "librarian_response_avg_diff.pt", "persona-pt", model=SHAPE)
    assert d.layers == tuple(range(N_LAYERS))
    assert torch.equal(d.vectors, diff[1:])  # row k + 1 is block k
    assert d.meta["source"] == "persona_vectors"
    assert d.meta["source_info"]["embedding_row_norm_left_out"] == pytest.approx(float(diff[0].norm()))


def test_assistant_axis_files_as_its_pipeline_writes_them(tmp_path):
    vector = torch.randn(N_LAYERS, D_MODEL)
    torch.save({"vector": vector, "type": "pos_3", "role": "librarian"}, tmp_path / "librarian.pt")
    d = import_direction(tmp_path / "librarian.pt", "assistant-axis", model=SHAPE)
    assert d.layers == tuple(range(N_LAYERS)) and torch.equal(d.vectors, vector)
    assert d.meta["source_info"]["role"] == "librarian"
    torch.save({"axis": vector, "default_mean": vector, "role_mean": vector, "n_default": 1, "n_roles": 2},
               tmp_path / "axis.pt")
    assert torch.equal(import_direction(tmp_path / "axis.pt", "assistant-axis", model=SHAPE).vectors, vector)


def test_hidden_states_npy_with_offset_minus_one(tmp_path):
    table = np.random.default_rng(2).standard_normal((N_LAYERS + 1, D_MODEL)).astype(np.float32)
    np.save(tmp_path / "h.npy", table)
    d = import_direction(tmp_path / "h.npy", "npz", model=SHAPE, layer_offset=-1)
    assert d.layers == tuple(range(N_LAYERS)) and np.array_equal(d.vectors.numpy(), table[1:])
    assert list(d.meta["source_info"]["embeddings_left_out"]) == ["the array[0]"]


# ----------------------------------------------------------------------------------------------- bad input


def test_gguf_without_direction_tensors(tmp_path):
    path = _write_gguf(tmp_path / "empty.gguf", {"other.1": np.zeros(D_MODEL, np.float32)})
    with pytest.raises(DirectionError, match=r"empty.gguf: no direction\.\* tensors"):
        import_direction(path, "gguf")


def test_gguf_layer_out_of_range(tmp_path):
    path = _write_gguf(tmp_path / "deep.gguf", {f"direction.{N_LAYERS}": np.ones(D_MODEL, np.float32)})
    with pytest.raises(DirectionError, match=rf"deep.gguf: direction.{N_LAYERS} is block {N_LAYERS}, out of range"):
        import_direction(path, "gguf", model=SHAPE)


def test_gguf_width_mismatch(tmp_path):
    path = _write_gguf(tmp_path / "wide.gguf", {"direction.1": np.ones(D_MODEL + 1, np.float32)})
    with pytest.raises(DirectionError, match=rf"wide.gguf: the vectors have width {D_MODEL + 1}, .* {D_MODEL}"):
        import_direction(path, "gguf", model=SHAPE)


def test_gguf_non_f32_tensor(tmp_path):
    path = _write_gguf(tmp_path / "half.gguf", {"direction.1": np.ones(D_MODEL, np.float16)})
    with pytest.raises(DirectionError, match=r"half.gguf: direction.1 is F16, not F32"):
        import_direction(path, "gguf")


def test_gguf_model_file_is_not_a_control_vector(tmp_path):
    path = _write_gguf(tmp_path / "model.gguf", {"direction.1": np.ones(D_MODEL, np.float32)}, arch="llama")
    with pytest.raises(DirectionError, match="general.architecture is 'llama'"):
        import_direction(path, "gguf")


def test_gguf_export_refuses_layer_zero(tmp_path):
    with pytest.raises(DirectionError, match="layer 0 cannot be written for llama.cpp"):
        export_direction(make_direction((0, 1)), tmp_path / "v.gguf", "gguf")
    assert not list(tmp_path.iterdir())


def test_persona_vector_file_of_the_wrong_shape(tmp_path):
    torch.save(torch.randn(N_LAYERS, D_MODEL), tmp_path / "p.pt")  # no embeddings row
    with pytest.raises(DirectionError, match=rf"p.pt: .* has shape \({N_LAYERS}, {D_MODEL}\), but {N_LAYERS + 1} rows"):
        import_direction(tmp_path / "p.pt", "persona-pt", model=SHAPE)
    torch.save(torch.randn(D_MODEL), tmp_path / "flat.pt")
    with pytest.raises(DirectionError, match=r"flat.pt: .* \[rows, d_model\]"):
        import_direction(tmp_path / "flat.pt", "persona-pt")


def test_persona_vector_width_mismatch(tmp_path):
    torch.save(torch.randn(N_LAYERS + 1, D_MODEL * 2), tmp_path / "p.pt")
    with pytest.raises(DirectionError, match=rf"width {D_MODEL * 2}"):
        import_direction(tmp_path / "p.pt", "persona-pt", model=SHAPE)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"layer_activations": {1: torch.ones(D_MODEL)}, "layer_type": "decoder_block",
                "extra": fractions.Fraction(1, 3)}, tmp_path / "obj.pt")
    with pytest.raises(DirectionError, match="pickles other objects"):
        import_direction(tmp_path / "obj.pt", "steering-vectors")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DirectionError, match="pickled objects"):
        import_direction(tmp_path / "obj.npy", "npz", layer_offset=0)


def test_steering_vectors_other_layer_type_is_refused(tmp_path):
    torch.save({"layer_activations": {1: torch.ones(D_MODEL)}, "layer_type": "mlp"}, tmp_path / "m.pt")
    with pytest.raises(DirectionError, match="layer_type 'mlp' is not the residual stream"):
        import_direction(tmp_path / "m.pt", "steering-vectors")


def test_npz_needs_an_offset_and_full_depth_export_needs_a_depth(tmp_path):
    export_direction(make_direction(), tmp_path / "v.npz", "npz")
    with pytest.raises(DirectionError, match="give the layer offset"):
        import_direction(tmp_path / "v.npz", "npz")
    with pytest.raises(DirectionError, match="give the model's depth"):
        export_direction(make_direction(), tmp_path / "p.pt", "persona-pt")
    with pytest.raises(DirectionError, match=r"layer\(s\) \[5\] do not exist in a model of 4 layers"):
        export_direction(make_direction(), tmp_path / "p.pt", "persona-pt", n_layers=4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_and_missing_files_are_one_error(tmp_path, fmt):
    bad = tmp_path / f"bad{SUFFIX[fmt]}"
    bad.write_bytes(b"\x00\x01 not a vector file" * 7)
    offset = 0 if fmt == "npz" else None
    with pytest.raises(LensRolesError, match="bad"):
        import_direction(bad, fmt, layer_offset=offset)
    with pytest.raises(LensRolesError, match="no such"):
        import_direction(tmp_path / "missing.x", fmt, layer_offset=offset)
    with pytest.raises(LensRolesError, match="folder"):
        import_direction(tmp_path, fmt, layer_offset=offset)


# ------------------------------------------------------------------------ generated damage (hypothesis)

_VALID: dict[str, bytes] = {}


def _valid_bytes(fmt: str) -> bytes:
    """The bytes of a valid file of ``fmt`` (made once)."""
    if fmt not in _VALID:
        with tempfile.TemporaryDirectory() as folder:
            path = export_direction(make_direction(), Path(folder) / f"v{SUFFIX[fmt]}", fmt, n_layers=N_LAYERS)
            _VALID[fmt] = path.read_bytes()
    return _VALID[fmt]


@st.composite
def damaged_files(draw):
    """``(format, bytes)``: random bytes, or a valid file truncated or with some bytes overwritten."""
    fmt = draw(st.sampled_from(FORMATS))
    kind = draw(st.sampled_from(["random", "truncated", "overwritten"]))
    if kind == "random":
        return fmt, draw(st.binary(max_size=400))
    data = bytearray(_valid_bytes(fmt))
    if kind == "truncated":
        return fmt, bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return fmt, bytes(data)


@settings(derandomize=True, database=None, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(damaged_files())
def test_damaged_vector_files_load_or_raise_one_error(case):
    fmt, content = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"damaged{SUFFIX[fmt]}"
        path.write_bytes(content)
        try:
            d = import_direction(path, fmt, model=SHAPE, layer_offset=0 if fmt == "npz" else None)
        except LensRolesError as exc:
            assert "damaged" in str(exc), f"error does not name the file: {exc}"
            assert "\n" not in str(exc).strip(), f"error is not one line: {exc!r}"
        else:
            assert d.d_model == D_MODEL and max(d.layers) < N_LAYERS
        assert os.listdir(folder) == [path.name]
