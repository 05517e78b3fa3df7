"""``lens-roles sweep`` and ``lens-roles generate`` on the tiny model (passed as the model loader)."""

from __future__ import annotations

import functools
import re

import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles import cli


@pytest.fixture
def main(tiny_model):
    """``lens-roles`` with the tiny model as its model loader."""
    return functools.partial(cli.main, load_model=lambda *a, **k: tiny_model)


@pytest.fixture
def vector_file(tiny_model, tmp_path):
    torch.manual_seed(2)
    d = lr.Direction(tuple(range(tiny_model.cfg.n_layers)), torch.randn(tiny_model.cfg.n_layers, 32),
                     {"model": tiny_model.cfg.model_name, "name": "random"})
    return d.save(tmp_path / "v.safetensors")


def test_sweep_writes_csv_and_figures(main, vector_file, tmp_path, capsys):
    pairs = lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl"
    out = tmp_path / "sweep"
    assert main(["sweep", "--vector", str(vector_file), "--pairs", str(pairs), "--layers", "0,2",
                 "--alphas=-1,1", "--eval-fraction", "0.05", "--generate", "1", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    sweep = pd.read_csv(out / "sweep.csv")
    assert list(sweep.columns) == ["layer", "alpha", "metric", "value", "read_layer", "alpha_mode"]
    assert set(sweep.layer) == {0, 2} and set(sweep.alpha) == {-1.0, 0.0, 1.0}
    assert {p.name for p in out.glob("*.html")} == {"cosine_vs_alpha_layer0.html", "cosine_vs_alpha_layer2.html",
                                                     "steering_behaviour.html"}
    assert "logprob_margin" in capsys.readouterr().out


def test_generate_prints_three_continuations(main, vector_file, capsys):
    assert main(["generate", "--vector", str(vector_file), "--layer", "1", "--alpha", "0.5", "--max-new-tokens",
                 "4", "Where are the maps?"]) == 0
    out = capsys.readouterr().out
    assert "unsteered" in out and "+0.5" in out and "-0.5" in out


def test_sweep_bad_input(main, vector_file, tmp_path, capsys, tiny_model):
    pairs = lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl"
    out = tmp_path / "o"
    assert main(["sweep", "--vector", str(vector_file), "--pairs", str(pairs), "--alphas", "1,nan",
                 "--layers", "1", "--out", str(out)]) == 2
    assert "alpha values must be finite" in capsys.readouterr().err
    assert main(["sweep", "--vector", str(vector_file), "--pairs", str(pairs), "--alphas", "one",
                 "--out", str(out)]) == 2
    assert "cannot read --alphas" in capsys.readouterr().err
    assert main(["sweep", "--vector", str(vector_file), "--pairs", str(pairs), "--layers", "9",
                 "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err
    other = lr.Direction((1,), torch.ones(1, 32), {"model": "someone-else"}).save(tmp_path / "other.safetensors")
    assert main(["generate", "--vector", str(other), "--layer", "1", "--alpha", "1", "hi"]) == 2
    assert "extracted from 'someone-else'" in capsys.readouterr().err
    assert not out.exists()


def test_steering_report_progress_goes_to_stderr_only(tiny_model, tmp_path, capsys):
    """run_steering_report shows tqdm bars for its steps on stderr; stdout gets the report table alone."""
    from lens_roles.studies.steering_report import run_steering_report

    torch.manual_seed(3)
    direction = lr.Direction(tuple(range(tiny_model.cfg.n_layers)), torch.randn(tiny_model.cfg.n_layers, 32),
                             {"model": tiny_model.cfg.model_name, "name": "random"})
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl").split(0.9)[1]
    kw = dict(layers=[1], alphas=[-1.0, 1.0], out=tmp_path / "s", n_generate=1, max_new_tokens=4)
    sweep, _ = run_steering_report(tiny_model, direction, pairs, progress=False, **kw)
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == "" and "logprob_margin" in quiet_out
    again, _ = run_steering_report(tiny_model, direction, pairs, **kw)  # progress is on by default
    out, err = capsys.readouterr()
    assert out == quiet_out and "%|" not in out
    # residual norms, the cosine and adherence sweeps, the generations: a bar each (two may share a name)
    assert len(set(re.findall(r"([^\r\n:]+): +\d+%\|", err))) >= 3
    pd.testing.assert_frame_equal(again, sweep)
    assert "%|" not in (tmp_path / "s" / "sweep.csv").read_text()
