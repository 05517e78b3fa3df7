"""Hostile files and values: each gives one LensRolesError naming the culprit, and nothing half-written stays.

Regression tests for the root causes found by trying bad input as a hostile user
would (file reading, stored formats, writes, PNG export, interventions, SAE splices).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError, DirectionError, LensRolesError, OutputError, PSRError, SAEError
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.steering import steer
from lens_roles.io import atomic_write, check_writable, parse_json, parse_jsonl, read_text, save_tensors

D = 32
READ_ONLY = "/proc/lens-roles-out"  # really read-only, also for root (chmod 555 does not stop root)


def direction(layers=(0, 1)) -> Direction:
    return Direction(layers, torch.randn(len(layers), D), {"model": "tiny-test", "name": "d"})


# ------------------------------------------------------------------ reading text


def test_read_text_refuses_what_is_not_a_utf8_file(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"user": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "utf16.jsonl").write_text('{"user": "x"}\n', encoding="utf-16")
    os.mkfifo(tmp_path / "fifo.jsonl")
    cases = {
        tmp_path / "latin1.jsonl": "not valid UTF-8",
        tmp_path / "utf16.jsonl": "UTF-16",
        tmp_path / "fifo.jsonl": "not a regular file",
        tmp_path: "is a folder",
        tmp_path / "missing.jsonl": "no such",
    }
    for path, message in cases.items():
        with pytest.raises(DataError, match=message) as err:
            read_text(path)
        assert str(path) in str(err.value)


def test_read_text_drops_a_bom_and_limits_size(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf{}\n")
    assert read_text(path) == "{}\n"
    with pytest.raises(DataError, match="more than the 2"):
        read_text(path, max_bytes=2)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ("[" * 70 + "]" * 70, "nested more than 64"),
    ("1" * 5000, "unreadable JSON value"),
    ('"\\ud800"', "lone surrogate"),
    ('{"a": ["\\udfff"]}', "lone surrogate"),
    ("{", "not valid JSON"),
])
def test_parse_json_turns_every_failure_into_a_data_error(text, message):
    with pytest.raises(DataError, match=message) as err:
        parse_json(text, "where.json")
    assert "where.json" in str(err.value)


def test_jsonl_splits_on_newlines_only():
    text = '{"user": "a\u2028b"}\n{"user": "c\u2029d\x85e"}\r\n\n'
    assert parse_jsonl(text, "f.jsonl") == [(1, {"user": "a\u2028b"}), (2, {"user": "c\u2029d\x85e"})]
    with pytest.raises(DataError, match="f.jsonl:2"):
        parse_jsonl('{}\n{"a": \n', "f.jsonl")


# ------------------------------------------------------------------ stored formats


def write_direction_file(path, meta, vectors=None):
    vectors = torch.ones(2, D) if vectors is None else vectors
    save_file({"vectors": vectors}, str(path), metadata=None if meta is None else {"meta": meta})


@pytest.mark.parametrize("meta, vectors, message", [
    ("null", None, "not an object"),
    ("5", None, "not an object"),
    ("[1, 2]", None, "not an object"),
    ("{not json", None, "not valid JSON"),
    ('{"layers": "ab"}', None, "no layer list"),
    ('{"layers": [0.5, 1]}', None, "not an integer block index"),
    ('{"layers": [true, 1]}', None, "not an integer block index"),
    ('{"layers": [0, 5000]}', None, "not a block index"),
    ('{"layers": [0, 0]}', None, "duplicate"),
    ('{"layers": [0, 1]}', torch.tensor(3.0), "shape"),
    ('{"layers": [0, 1]}', torch.ones(2, 0), "d_model >= 1"),
    ('{"layers": []}', torch.ones(0, D), "at least one layer"),
    ('{"layers": [0, 1]}', torch.full((2, D), float("nan")), "NaN"),
    ('{"layers": [0, 1]}', torch.ones(2, D, dtype=torch.bool), "floats"),
])
def test_direction_load_checks_what_it_reads(tmp_path, meta, vectors, message):
    path = tmp_path / "d.safetensors"
    write_direction_file(path, meta, vectors)
    with pytest.raises(DirectionError, match=message) as err:
        Direction.load(path)
    assert str(path) in str(err.value)


def test_direction_load_checks_the_sidecar(tmp_path):
    a, b = direction(), Direction((0, 1), torch.randn(2, D), {"model": "other", "name": "d"})
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert Direction.load(tmp_path / "a.safetensors").layers == (0, 1)
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())  # a stale sidecar
    with pytest.raises(DirectionError, match="does not describe a.safetensors"):
        Direction.load(tmp_path / "a.safetensors")
    (tmp_path / "a.json").write_text("[[[")
    with pytest.raises(DataError, match="a.json"):
        Direction.load(tmp_path / "a.safetensors")


def test_directions_need_integer_layers():
    for layers in ((), (0.5,), ("a",), (-1,), (True,)):
        with pytest.raises(DirectionError):
            Direction(layers, torch.ones(len(layers), D))
    assert "layers=0..1" in repr(direction())


def test_psr_load_checks_what_it_reads(tmp_path):
    good = PSR(direction(), [1], 2.0)
    path = tmp_path / "psr.safetensors"
    good.save(path)
    assert float(PSR.load(path).alpha) == 2.0
    info = json.loads((tmp_path / "psr.json").read_text())
    tensors = {"w": torch.zeros(1, D), "b": torch.ones(1), "vectors": torch.ones(1, D)}
    cases = [
        (dict(info, kind="direction"), tensors, "kind"),
        (dict(info, layers=["x"]), tensors, "layer list"),
        (dict(info, layers=[1, 2]), tensors, "shape"),
        (dict(info, alpha="big"), tensors, "alpha"),
        (dict(info, alpha=float("nan")), tensors, "alpha"),
        ({k: v for k, v in info.items() if k != "alpha"}, tensors, "alpha"),
        (info, {k: v for k, v in tensors.items() if k != "b"}, "no tensor 'b'"),
        (info, dict(tensors, w=torch.zeros(1, D + 1)), "shape"),
        (info, dict(tensors, b=torch.tensor([float("inf")])), "finite"),
    ]
    for meta, tens, message in cases:
        bad = tmp_path / "bad.safetensors"
        save_file(tens, str(bad), metadata={"meta": json.dumps(meta)})
        with pytest.raises(PSRError, match=message) as err:
            PSR.load(bad)
        assert str(bad) in str(err.value)


# ------------------------------------------------------------------ writing


def test_writes_name_the_location_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.csv").mkdir()
    for target, message in [(f"{READ_ONLY}/x.csv", "cannot write"), (tmp_path / "file" / "x.csv", "cannot write"),
                            (tmp_path / "folder.csv", "a folder of that name")]:
        with pytest.raises(OutputError, match=message):
            atomic_write(target, lambda tmp: open(tmp, "w").write("data"))
    for target in (f"{READ_ONLY}/x.csv", tmp_path / "file" / "x.csv"):
        with pytest.raises(OutputError, match=str(target)):
            check_writable(target)
    check_writable(tmp_path / "new" / "deeper" / "x.csv")
    assert not (tmp_path / "new").exists()  # asking writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.csv"]


def test_a_direction_and_its_sidecar_are_written_together_or_not_at_all(tmp_path):
    (tmp_path / "d.json").mkdir()  # the sidecar cannot be written
    with pytest.raises(OutputError, match="d.json"):
        direction().save(tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
    with pytest.raises(OutputError):
        save_tensors(f"{READ_ONLY}/d.safetensors", {"x": torch.ones(1)}, {})


# ------------------------------------------------------------------ interventions and splices


def test_steering_values_are_checked_before_any_hook(tiny_model):
    d = Direction(tuple(range(tiny_model.cfg.n_layers)), torch.randn(tiny_model.cfg.n_layers, tiny_model.cfg.d_model))
    for alpha in ("abc", b"1", True, [[1.0]], {"a": 1}, float("nan")):
        with pytest.raises(DirectionError, match="alpha"):
            with steer(tiny_model, d, alpha, layers=[1]):
                pass
    for norms in ({1: float("nan")}, {1: 0.0}, {1: "x"}, {}):
        with pytest.raises(DirectionError, match="residual norms"):
            with steer(tiny_model, d, 0.5, layers=[1], relative=norms):
                pass


def test_a_splice_checks_the_sae_first(tiny_model):
    from lens_roles.analysis.sae import identity_sae, spliced

    narrow = identity_sae(8, layer=1)
    deep = identity_sae(tiny_model.cfg.d_model, layer=tiny_model.cfg.n_layers + 3)
    tokens = torch.tensor([[1, 2, 3]])
    for sae, message in ((narrow, "8-wide"), (deep, "only")):
        with pytest.raises(SAEError, match=message):
            with spliced(tiny_model, sae):
                tiny_model(tokens)


def test_errors_are_lens_roles_errors():
    for cls in (DataError, DirectionError, OutputError, PSRError, SAEError):
        assert issubclass(cls, LensRolesError)


def test_an_sae_folder_whose_weights_disagree_with_its_config(tmp_path):
    from lens_roles.analysis.sae import identity_sae, load_sae, save_sae

    folder = save_sae(identity_sae(D, layer=1), tmp_path / "sae")
    assert load_sae(folder).cfg.d_in == D
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(dict(cfg, d_sae=cfg["d_sae"] + 1)))
    with pytest.raises(SAEError, match="do not belong together") as err:
        load_sae(folder)
    assert len(str(err.value).splitlines()) == 1
    bad_configs = (("[]", "positive integers"), ("{", "not valid JSON"), ('{"d_in": 0, "d_sae": 4}', "positive"))
    for text, message in bad_configs:
        (folder / "cfg.json").write_text(text)
        with pytest.raises(SAEError, match=message):
            load_sae(folder)


def test_prompts_are_checked_before_the_tokenizer_and_the_model(tiny_model):
    import lens_roles as lr

    cases = [(["a", None], "prompt 1 is NoneType"), (["a", 5], "prompt 1 is int"),
             (["\ud800 hello"], "lone surrogate"), ([lr.Prompt("hi", system=3)], "system must be"),
             ([lr.Prompt("")], "user must be a non-empty"),
             (["word " * 400], "more than tiny-test's context of 256 tokens")]
    for prompts, message in cases:
        with pytest.raises(DataError, match=message):
            lr.collect(tiny_model, prompts, layers=[0])


def test_the_activation_cache_checks_its_entries_and_its_folder(tiny_model, tmp_path):
    import lens_roles as lr
    from lens_roles.errors import CacheError

    prompts = ["Where are the maps?", "Find me a book on birds."]
    first = lr.collect(tiny_model, prompts, layers=[0, 1], cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    tensors, meta = {"mean": first.mean}, dict(first.meta)
    cases = [
        ({"mean": torch.full_like(first.mean, float("nan"))}, meta, "not finite"),
        ({"mean": first.mean[:1]}, meta, "mean shape"),
        (tensors, dict(meta, layers=[0, 2]), "layers"),
        (tensors, dict(meta, count="two"), "count"),
        (tensors, None, "cache_key"),
    ]
    for tens, info, message in cases:
        save_file(tens, str(entry), metadata=None if info is None else {"meta": json.dumps(info)})
        with pytest.raises(CacheError, match=message) as err:
            lr.collect(tiny_model, prompts, layers=[0, 1], cache_dir=tmp_path / "cache")
        assert str(entry) in str(err.value)
    for bad in (tmp_path / "file", READ_ONLY):
        (tmp_path / "file").write_text("x")
        with pytest.raises(OutputError, match="activation cache folder"):
            lr.collect(tiny_model, prompts, layers=[0], cache_dir=bad)


def test_generation_must_fit_the_context(tiny_model):
    from lens_roles.runtime.generation import generate

    with pytest.raises(DataError, match="plus 250 tokens to generate"):
        generate(tiny_model, ["word " * 10], max_new_tokens=250)


def test_a_bad_device_or_model_folder_is_a_model_error(tmp_path):
    import lens_roles as lr
    from lens_roles.errors import ModelError

    with pytest.raises(ModelError, match="unknown device 'foo'"):
        lr.load_model(str(tmp_path), device="foo")
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelError, match=str(tmp_path)):
        lr.load_model(str(tmp_path))


def test_study_settings_and_role_folders_fail_early(tmp_path):
    from lens_roles.errors import ConfigError
    from lens_roles.inputs.prompts import available_roles
    from lens_roles.studies.role_study import StudyConfig

    for template in ("You are {bogus}.", "You are {0}.", "You are {role"):
        with pytest.raises(ConfigError, match="system_template"):
            StudyConfig(system_template=template)
    with pytest.raises(DataError, match="no such folder"):
        available_roles(tmp_path / "missing")


def test_train_sae_reads_its_corpus_before_the_model(tmp_path):
    from lens_roles.cli import main

    def loader(*args, **kwargs):
        raise AssertionError("the model was loaded")

    (tmp_path / "corpus.json").write_text('{"sequences": [[1, 2]], "kinds": []}')
    for corpus in (tmp_path / "corpus.json", tmp_path, f"{READ_ONLY}/corpus.json"):
        assert main(["train-sae", "--layer", "1", "--corpus", str(corpus), "--out", str(tmp_path / "saes")],
                    load_model=loader) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.json"]


def test_an_sae_folder_is_written_whole_or_reports_where_it_cannot(tmp_path):
    from lens_roles.analysis.sae import identity_sae, save_sae

    sae = identity_sae(D, layer=1)
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "sae", f"{READ_ONLY}/sae"):
        with pytest.raises(OutputError, match="SAE folder"):
            save_sae(sae, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
