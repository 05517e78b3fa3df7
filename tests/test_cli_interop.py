"""``lens-roles export`` / ``import`` on the tiny model: every format round-trips through the command line, the
model is loaded only when ``--model`` is given, and each kind of bad request is one line with exit code 2."""

from __future__ import annotations

import functools

import pytest
import torch

import lens_roles as lr
from lens_roles import cli
from lens_roles.directions.formats import FORMATS

SUFFIX = {"gguf": ".gguf", "repeng": ".gguf", "steering-vectors": ".pt", "persona-pt": ".pt",
          "assistant-axis": ".pt", "npz": ".npz"}


@pytest.fixture
def main(tiny_model, one_thread):
    asked = []

    def loader(name, *, device, dtype):
        asked.append(name)
        return tiny_model

    run = functools.partial(cli.main, load_model=loader)
    run.asked = asked
    return run


@pytest.fixture
def vector(tmp_path, tiny_model):
    g = torch.Generator().manual_seed(3)
    d = lr.Direction((1, 2), torch.randn(2, tiny_model.cfg.d_model, generator=g),
                     {"model": tiny_model.cfg.model_name, "name": "librarian"})
    return d, d.save(tmp_path / "librarian.safetensors")


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_import_gives_the_same_direction(main, vector, tmp_path, capsys, fmt):
    d, path = vector
    out = tmp_path / f"exported{SUFFIX[fmt]}"
    assert main(["export", "--vector", str(path), "--format", fmt, "--out", str(out), "--n-layers", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    back = tmp_path / "back.safetensors"
    argv = ["import", "--format", fmt, "--in", str(out), "--out", str(back), "--model", "tiny"]
    assert main(argv + (["--layer-offset", "0"] if fmt == "npz" else [])) == 0
    loaded = lr.Direction.load(back)
    assert loaded.layers == d.layers and torch.equal(loaded.vectors, d.vectors)
    assert loaded.meta["format"] == fmt and loaded.meta["model"] == d.meta["model"]
    assert main.asked == ["tiny"]


def test_export_of_chosen_layers_and_import_without_a_model(main, vector, tmp_path):
    d, path = vector
    out = tmp_path / "v.gguf"
    assert main(["export", "--vector", str(path), "--format", "gguf", "--out", str(out), "--layers", "2"]) == 0
    assert main(["import", "--format", "gguf", "--in", str(out), "--out", str(tmp_path / "b.safetensors")]) == 0
    back = lr.Direction.load(tmp_path / "b.safetensors")
    assert back.layers == (2,) and torch.equal(back[2], d[2]) and back.meta.get("model") is None
    assert main.asked == []  # no --model: nothing loaded


def _fails(main, argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after "loaded <model>" when one was loaded
    assert err.startswith("lens-roles ")
    for needle in needles:
        assert needle in err, err


def test_bad_requests_are_one_line(main, vector, tmp_path, capsys, tiny_model):
    d, path = vector
    layer0 = lr.Direction((0, 1), torch.randn(2, tiny_model.cfg.d_model)).save(tmp_path / "zero.safetensors")
    _fails(main, ["export", "--vector", str(layer0), "--format", "gguf", "--out", str(tmp_path / "z.gguf")], capsys,
           "layer 0 cannot be written for llama.cpp")
    _fails(main, ["export", "--vector", str(path), "--format", "gguf", "--out", str(tmp_path / "z.pt")], capsys,
           "--out must end in .gguf")
    _fails(main, ["export", "--vector", str(path), "--format", "persona-pt", "--out", str(tmp_path / "p.pt")],
           capsys, "--n-layers")
    _fails(main, ["export", "--vector", str(path), "--format", "npz", "--out", str(tmp_path / "v.npz"),
                  "--layers", "0"], capsys, "no vector at layer(s) [0]")
    assert main(["export", "--vector", str(path), "--format", "npz", "--out", str(tmp_path / "v.npz")]) == 0
    _fails(main, ["import", "--format", "npz", "--in", str(tmp_path / "v.npz"), "--out",
                  str(tmp_path / "b.safetensors")], capsys, "--layer-offset")
    wide = lr.Direction((1,), torch.randn(1, tiny_model.cfg.d_model + 8)).save(tmp_path / "wide.safetensors")
    assert main(["export", "--vector", str(wide), "--format", "gguf", "--out", str(tmp_path / "w.gguf")]) == 0
    _fails(main, ["import", "--format", "gguf", "--in", str(tmp_path / "w.gguf"), "--out",
                  str(tmp_path / "b.safetensors"), "--model", "tiny"], capsys, "w.gguf", "width 40")
    deep = lr.Direction((5,), torch.randn(1, tiny_model.cfg.d_model)).save(tmp_path / "deep.safetensors")
    assert main(["export", "--vector", str(deep), "--format", "gguf", "--out", str(tmp_path / "d.gguf")]) == 0
    _fails(main, ["import", "--format", "gguf", "--in", str(tmp_path / "d.gguf"), "--out",
                  str(tmp_path / "b.safetensors"), "--model", "tiny"], capsys, "direction.5 is block 5, out of range")
    _fails(main, ["import", "--format", "gguf", "--in", str(tmp_path / "missing.gguf"), "--out",
                  str(tmp_path / "b.safetensors")], capsys, "--in")
    assert not (tmp_path / "b.safetensors").exists()
