"""Unit tests of lens_roles.directions and lens_roles.directions.separation: the Direction value,
its I/O, the builders on the tiny model, PCA / probe on planted synthetic data, and AUC."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from lens_roles._version import __version__
from lens_roles.directions.builders import (
    diff_in_means,
    pca_direction,
    persona_vector,
    probe_direction,
    role_vector,
    role_vectors,
)
from lens_roles.directions.direction import Direction
from lens_roles.directions.separation import roc_auc, separation_auc, split_half_agreement
from lens_roles.errors import DataError, DirectionError
from lens_roles.inputs.prompts import ContrastPair, PairSet, PromptSet, load_pairs, load_prompt_set
from lens_roles.runtime.activations import Activations, collect, collect_sets

DATA = Path(__file__).resolve().parent.parent / "lens_roles" / "data"

D = 8


def _direction(seed=0, layers=(0, 1, 2), model="m", **meta):
    g = torch.Generator().manual_seed(seed)
    return Direction(tuple(layers), torch.randn(len(layers), D, generator=g), {"model": model, **meta})


# --------------------------------------------------------------- the Direction value


def test_direction_fills_provenance():
    d = _direction(name="x", method="test")
    assert d.layers == (0, 1, 2) and d.d_model == D and len(d) == 3
    assert d.vectors.dtype == torch.float32
    assert d.meta["d_model"] == D
    assert d.meta["hook"] == "resid_post"
    assert d.meta["lens_roles"] == __version__
    assert d.meta["raw_norms"] == {str(layer): float(d.vectors[i].norm()) for i, layer in enumerate(d.layers)}
    assert d.norms() == {layer: float(d.vectors[i].norm()) for i, layer in enumerate(d.layers)}
    assert d.method == "test"
    assert 1 in d and 5 not in d


def test_direction_is_immutable():
    d = _direction()
    assert isinstance(d.meta, MappingProxyType)
    with pytest.raises(TypeError):
        d.meta["model"] = "other"
    with pytest.raises(AttributeError):
        d.layers = (5,)
    before = d.vectors.clone()
    v = d[1]
    v += 100.0
    v.zero_()
    assert torch.equal(d.vectors, before)
    assert torch.equal(d[1], before[1])
    # the constructor copies its inputs
    source = torch.ones(1, D)
    meta = {"model": "m"}
    e = Direction((0,), source, meta)
    source.add_(1.0)
    meta["model"] = "changed"
    assert torch.equal(e[0], torch.ones(D)) and e.meta["model"] == "m"


def test_direction_nested_meta_is_immutable():
    dataset = {"positive": "aaaa", "negative": "bbbb"}
    d = Direction((0,), torch.ones(1, D), {"model": "m", "dataset": dataset})
    dataset["positive"] = "changed"
    try:
        d.meta["raw_norms"]["0"] = -1.0
    except TypeError:
        pass
    assert d.meta["dataset"]["positive"] == "aaaa"
    assert d.meta["raw_norms"]["0"] == pytest.approx(math.sqrt(D))


def test_direction_vectors_attribute_is_read_only():
    d = Direction((0,), torch.ones(1, D), {"model": "m"})
    try:
        d.vectors[0, 0] = 1000.0
    except RuntimeError:
        pass
    assert torch.equal(d[0], torch.ones(D))


def test_direction_validation():
    with pytest.raises(DirectionError, match="NaN or infinite"):
        Direction((0, 1), torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(DirectionError, match="NaN or infinite"):
        Direction((0,), torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(DirectionError, match="2 rows"):
        Direction((0, 1), torch.ones(3, D))
    with pytest.raises(DirectionError):
        Direction((0,), torch.ones(D))
    with pytest.raises(DirectionError, match="duplicate"):
        Direction((1, 1), torch.ones(2, D))


def test_missing_layer_names_the_layer():
    d = _direction(name="librarian")
    with pytest.raises(DirectionError) as err:
        d[7]
    assert "layer 7" in str(err.value) and "[0, 1, 2]" in str(err.value)
    with pytest.raises(DirectionError, match="layer 7"):
        d.unit(7)
    with pytest.raises(DirectionError, match="layer 7"):
        d.select([0, 7])


def test_unit_select_normalized_cosine():
    d = _direction()
    for layer in d.layers:
        assert torch.allclose(d.unit(layer), d[layer] / d[layer].norm(), atol=0, rtol=0)
        assert d.unit(layer).norm().item() == pytest.approx(1.0, abs=1e-6)
    s = d.select([2, 0])
    assert s.layers == (2, 0)
    assert torch.equal(s[2], d[2]) and torch.equal(s[0], d[0])
    n = d.normalized()
    assert all(abs(v - 1.0) < 1e-6 for v in n.norms().values())
    assert n.meta["raw_norms_before"] == dict(d.meta["raw_norms"])
    assert d.cosine(d) == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0}, abs=1e-6)
    assert d.cosine(-d) == pytest.approx({0: -1.0, 1: -1.0, 2: -1.0}, abs=1e-6)
    assert d.cosine(d.select([1])) == pytest.approx({1: 1.0}, abs=1e-6)
    with pytest.raises(DirectionError, match="zero"):
        Direction((0,), torch.zeros(1, D)).unit(0)


def test_arithmetic_is_exact():
    a, b = _direction(0, method="A"), _direction(1, method="B")
    assert torch.equal((a - b).vectors, a.vectors - b.vectors)
    assert torch.equal((a + b).vectors, a.vectors + b.vectors)
    assert torch.equal((2 * a).vectors, a.vectors * 2.0)
    assert torch.equal((a * 2).vectors, a.vectors * 2.0)
    assert torch.equal((-a).vectors, -a.vectors)
    assert torch.equal((a / 4).vectors, a.vectors * 0.25)
    assert torch.equal(((a + b) - b).vectors, (a.vectors + b.vectors) - b.vectors)
    assert (a - b).layers == a.layers
    assert (a - b).method == "(A) - (B)"
    assert (2 * a).method == "2 * (A)"
    assert (a - b).meta["model"] == "m"
    assert (a - b).meta["raw_norms"] == {
        str(layer): float(n) for layer, n in zip(a.layers, (a.vectors - b.vectors).norm(dim=1))
    }
    # the operands are untouched
    assert torch.equal(a.vectors, _direction(0).vectors)
    with pytest.raises(TypeError):
        a * torch.ones(1)


def test_incompatible_directions():
    a = _direction(0, model="model-a")
    with pytest.raises(DirectionError, match="model"):
        a - _direction(1, model="model-b")
    with pytest.raises(DirectionError, match="model"):
        a.cosine(_direction(1, model="model-b"))
    with pytest.raises(DirectionError, match="d_model"):
        a + Direction((0, 1, 2), torch.ones(3, D + 1), {"model": "model-a"})
    with pytest.raises(DirectionError, match="hook"):
        a + _direction(1, model="model-a", hook="resid_pre")
    with pytest.raises(DirectionError, match="different layers"):
        a + _direction(1, layers=(0, 1), model="model-a")
    with pytest.raises(DirectionError):
        a + 1.0


# ------------------------------------------------------------------------------ I/O


def test_save_load_round_trip(tmp_path):
    d = _direction(
        3,
        name="librarian",
        method="mean_diff",
        positions="reply",
        dataset={"positive": "p", "negative": "n"},
        n_positive=4,
    )
    path = d.save(tmp_path / "sub" / "librarian.safetensors")
    assert path == tmp_path / "sub" / "librarian.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["librarian.json", "librarian.safetensors"]
    sidecar = json.loads((tmp_path / "sub" / "librarian.json").read_text())
    assert sidecar == {"layers": [0, 1, 2], **dict(d.meta)}
    loaded = Direction.load(path)
    assert loaded.layers == d.layers
    assert torch.equal(loaded.vectors, d.vectors)  # bit-exact
    assert dict(loaded.meta) == dict(d.meta)
    # the sidecar is optional
    (tmp_path / "sub" / "librarian.json").unlink()
    assert torch.equal(Direction.load(path).vectors, d.vectors)


def test_save_rejects_other_suffix(tmp_path):
    d = _direction()
    target = tmp_path / "out" / "librarian.pt"
    with pytest.raises(DirectionError, match=".safetensors"):
        d.save(target)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(DirectionError, match="no such"):
        Direction.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(DirectionError) as err:
        Direction.load(bad)
    assert str(bad) in str(err.value)
    # a valid safetensors file without the direction's layer list
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"vectors": torch.ones(2, D)}, str(other))
    with pytest.raises(DirectionError, match="layer list"):
        Direction.load(other)
    wrong_key = tmp_path / "wrong.safetensors"
    save_file(
        {"weights": torch.ones(2, D)}, str(wrong_key), metadata={"meta": json.dumps({"layers": [0, 1]})}
    )
    with pytest.raises(DirectionError):
        Direction.load(wrong_key)


# ----------------------------------------------------------------- builders (tiny model)


@pytest.fixture(scope="module")
def small_pairs():
    pairs = load_pairs(DATA / "personas" / "librarian.jsonl")
    return PairSet("librarian", pairs.pairs[:6], pairs.source)


def test_persona_vector_mean_diff(tiny_model, small_pairs):
    d = persona_vector(tiny_model, small_pairs, layers=[0, 2], method="mean_diff", batch_size=4)
    pos = collect(tiny_model, small_pairs.positives(), layers=[0, 2], positions="reply", batch_size=4)
    neg = collect(tiny_model, small_pairs.negatives(), layers=[0, 2], positions="reply", batch_size=4)
    assert d.layers == (0, 2)
    # persona_vector runs both sides together (sharing each pair's user turn): equal to rounding
    torch.testing.assert_close(d.vectors, (pos.mean - neg.mean).float(), rtol=1e-5, atol=1e-6)
    joint_pos, joint_neg = collect_sets(tiny_model, [small_pairs.positives(), small_pairs.negatives()],
                                        layers=[0, 2], positions="reply", batch_size=4)
    assert torch.equal(d.vectors, (joint_pos.mean - joint_neg.mean).float())
    assert d.meta["method"] == "mean_diff"
    assert d.meta["positions"] == "reply"
    assert d.meta["model"] == tiny_model.cfg.model_name
    assert d.meta["template"] == "chat"
    assert d.meta["dataset"] == small_pairs.fingerprint()
    assert d.meta["n_positive"] == d.meta["n_negative"] == 6
    with pytest.raises(DirectionError, match="unknown method"):
        persona_vector(tiny_model, small_pairs, method="svm")
    with pytest.raises(TypeError, match="keep_per_prompt"):
        persona_vector(tiny_model, small_pairs, keep_per_prompt=True)


@pytest.mark.parametrize("method, builder", [("pca", pca_direction), ("probe", probe_direction)])
def test_persona_vector_pca_probe(tiny_model, small_pairs, method, builder):
    d = persona_vector(tiny_model, small_pairs, layers=[1], method=method)
    pos = collect(tiny_model, small_pairs.positives(), layers=[1], positions="reply", keep_per_prompt=True)
    neg = collect(tiny_model, small_pairs.negatives(), layers=[1], positions="reply", keep_per_prompt=True)
    ref = builder(pos, neg)
    assert d.meta["method"] == method
    assert torch.allclose(d.vectors, ref.vectors, atol=1e-5, rtol=1e-4)


def test_role_vector_and_role_vectors(tiny_model):
    chem = PromptSet("chemist", load_prompt_set(DATA / "roles" / "chemist.jsonl").prompts[:4])
    law = PromptSet("lawyer", load_prompt_set(DATA / "roles" / "lawyer.jsonl").prompts[:4])
    base = PromptSet("baseline", load_prompt_set(DATA / "roles" / "baseline.jsonl").prompts[:5])
    d = role_vector(tiny_model, chem, base, layers=[0, 1])
    c = collect(tiny_model, chem, layers=[0, 1], positions="eoi")
    b = collect(tiny_model, base, layers=[0, 1], positions="eoi")
    # one run over baseline and roles together: the same numbers as separate runs, to float rounding
    torch.testing.assert_close(d.vectors, (c.mean - b.mean).float())
    assert d.meta["method"] == "role_vector"
    assert d.meta["name"] == "chemist" and d.meta["baseline"] == "baseline"
    assert d.meta["positions"] == "eoi"
    assert d.meta["dataset"] == {"positive": chem.fingerprint(), "negative": base.fingerprint()}
    many = role_vectors(tiny_model, [chem, law], base, layers=[0, 1])
    assert list(many) == ["chemist", "lawyer"]
    torch.testing.assert_close(many["chemist"].vectors, d.vectors)
    joint = collect_sets(tiny_model, [base, chem, law], layers=[0, 1], positions="eoi")
    assert torch.equal(many["chemist"].vectors, (joint[1].mean - joint[0].mean).float())
    lw = collect(tiny_model, law, layers=[0, 1], positions="eoi")
    torch.testing.assert_close(many["lawyer"].vectors, (lw.mean - b.mean).float())
    # role vectors of one baseline subtract exactly
    diff = many["chemist"] - many["lawyer"]
    assert torch.equal(diff.vectors, many["chemist"].vectors - many["lawyer"].vectors)
    with pytest.raises(TypeError):
        role_vector(tiny_model, chem, base, layers=[0], positons="last")


def test_diff_in_means_checks():
    mean = torch.zeros(2, D, dtype=torch.float64)
    a = Activations((0, 1), mean, 3, None, {"model": "m", "positions": "eoi"})
    b = Activations((0, 1), mean + 1, 3, None, {"model": "m", "positions": "eoi"})
    d = diff_in_means(a, b, extra="x")
    assert torch.equal(d.vectors, -torch.ones(2, D))
    assert d.meta["extra"] == "x" and d.meta["n_positive"] == 3
    with pytest.raises(DirectionError, match="different layers"):
        diff_in_means(a, Activations((0,), mean[:1], 3, None, {"model": "m", "positions": "eoi"}))
    with pytest.raises(DirectionError, match="positions"):
        diff_in_means(a, Activations((0, 1), mean, 3, None, {"model": "m", "positions": "last"}))


# --------------------------------------------------------- PCA / probe on planted data


def _planted(seed=0, n=64, layers=(0, 3), noise=0.05, shift=2.0, d=16):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(len(layers), d, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    center = torch.randn(len(layers), d, generator=g, dtype=torch.float64)
    neg = center + noise * torch.randn(n, len(layers), d, generator=g, dtype=torch.float64)
    pos = center + shift * u + noise * torch.randn(n, len(layers), d, generator=g, dtype=torch.float64)

    def acts(x):
        x = x.float()
        return Activations(
            tuple(layers), x.double().mean(0), n, x, {"model": "synthetic", "positions": "reply"}
        )

    return u.float(), acts(pos), acts(neg)


@pytest.mark.parametrize("builder", [pca_direction, probe_direction])
def test_planted_direction_is_recovered(builder):
    u, pos, neg = _planted()
    d = builder(pos, neg, name="planted")
    assert d.layers == (0, 3) and d.meta["name"] == "planted"
    assert d.meta["method"] == ("pca" if builder is pca_direction else "probe")
    diff = (pos.mean - neg.mean).float()
    for j, layer in enumerate(d.layers):
        unit = d.unit(layer)
        assert float(unit @ u[j]) > 0.99  # recovered, with the positive sign
        proj = float(unit @ diff[j])
        assert proj > 0
        # scaled to the mean-difference projection on the unit vector
        assert float(d[layer].norm()) == pytest.approx(proj, rel=1e-5)
        assert float(d[layer] @ unit) == pytest.approx(proj, rel=1e-5)
    # swapping the sets flips the sign
    flipped = builder(neg, pos)
    for j, layer in enumerate(flipped.layers):
        assert float(flipped.unit(layer) @ u[j]) < -0.99


def test_pca_unpaired_and_errors():
    u, pos, neg = _planted(seed=1)
    d = pca_direction(pos, neg, paired=False)
    for j, layer in enumerate(d.layers):
        assert float(d.unit(layer) @ u[j]) > 0.99
    short = Activations(neg.layers, neg.mean, neg.count - 1, neg.per_prompt[:-1], neg.meta)
    with pytest.raises(DirectionError, match="equal counts"):
        pca_direction(pos, short)
    bare = Activations(pos.layers, pos.mean, pos.count, None, pos.meta)
    for builder in (pca_direction, probe_direction):
        with pytest.raises(DirectionError, match="keep_per_prompt"):
            builder(bare, neg)


# ------------------------------------------------------------------------ evaluation


def _auc_loop(pos, neg):
    total = 0.0
    for p in pos.tolist():
        for n in neg.tolist():
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def test_roc_auc_against_double_loop():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (17,), generator=g).float()  # many ties
    neg = torch.randint(0, 6, (11,), generator=g).float()
    assert roc_auc(pos, neg) == pytest.approx(_auc_loop(pos, neg), abs=1e-12)
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])) == 0.875
    assert roc_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert roc_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0])) == 0.0
    with pytest.raises(DataError):
        roc_auc(torch.tensor([]), torch.tensor([1.0]))


def test_separation_auc_against_direct_computation():
    _, pos, neg = _planted(seed=2, noise=1.0, shift=0.5, n=20)
    g = torch.Generator().manual_seed(5)
    d = Direction(pos.layers, torch.randn(2, 16, generator=g), {"model": "synthetic"})
    frame = separation_auc(d, pos, neg)
    assert list(frame.columns) == ["layer", "metric", "value"]
    assert frame["layer"].tolist() == [0, 3] and set(frame["metric"]) == {"auc"}
    for j, layer in enumerate(d.layers):
        unit = d[layer] / d[layer].norm()
        expected = _auc_loop(pos.per_prompt[:, j] @ unit, neg.per_prompt[:, j] @ unit)
        assert frame["value"][j] == pytest.approx(expected, abs=1e-12)
    # the planted direction itself separates perfectly when the shift dwarfs the noise
    u2, pos2, neg2 = _planted(seed=3)
    planted = Direction(pos2.layers, u2, {"model": "synthetic"})
    assert separation_auc(planted, pos2, neg2)["value"].tolist() == [1.0, 1.0]
    assert separation_auc(-planted, pos2, neg2)["value"].tolist() == [0.0, 0.0]
    with pytest.raises(DataError, match="keep_per_prompt"):
        separation_auc(d, Activations(pos.layers, pos.mean, pos.count), neg)


def test_separation_auc_pools_several_sets():
    """Several sets on one side count as their prompts pooled: as one set holding them all."""
    _, pos, neg = _planted(seed=2, noise=1.0, shift=0.5, n=20)
    _, neg2, _ = _planted(seed=4, noise=1.0, shift=0.5, n=20)
    d = Direction(pos.layers, torch.randn(2, 16, generator=torch.Generator().manual_seed(5)), {"model": "synthetic"})
    pooled = torch.cat([neg.per_prompt, neg2.per_prompt])
    one = Activations(neg.layers, pooled.double().mean(0), len(pooled), pooled, {})
    expected = separation_auc(d, pos, one)
    assert separation_auc(d, pos, [neg, neg2]).equals(expected)
    assert separation_auc(d, [pos], (neg, neg2)).equals(expected)
    # each set is read at its own index of the layer, whatever its layer order
    flipped = Activations(neg2.layers[::-1], neg2.mean.flip(0), neg2.count, neg2.per_prompt.flip(1), {})
    assert separation_auc(d, pos, [neg, flipped]).equals(expected)
    with pytest.raises(DataError, match="no negative activation sets"):
        separation_auc(d, pos, [])
    with pytest.raises(DataError, match="keep_per_prompt"):
        separation_auc(d, pos, [neg, Activations(neg2.layers, neg2.mean, neg2.count)])


def test_split_half_agreement(tiny_model, small_pairs):
    frame = split_half_agreement(tiny_model, small_pairs, layers=[0, 2], batch_size=4)
    assert list(frame.columns) == ["layer", "metric", "value"]
    assert frame["layer"].tolist() == [0, 2]
    assert set(frame["metric"]) == {"split_half_cosine"}
    assert all(-1.0 <= v <= 1.0 for v in frame["value"])
    first, second = small_pairs.halves()
    a = persona_vector(tiny_model, first, layers=[0, 2], batch_size=4)
    b = persona_vector(tiny_model, second, layers=[0, 2], batch_size=4)
    for layer, value in zip(frame["layer"], frame["value"]):
        expected = float(torch.nn.functional.cosine_similarity(a[layer], b[layer], dim=0))
        assert value == pytest.approx(expected, abs=1e-6)

    # a custom builder that returns the same direction for both halves agrees perfectly
    fixed = Direction((1,), torch.ones(1, tiny_model.cfg.d_model), {"model": "x"})
    same = split_half_agreement(tiny_model, small_pairs, build=lambda model, pairs: fixed)
    assert same["value"].tolist() == pytest.approx([1.0])
    with pytest.raises(DataError):
        split_half_agreement(tiny_model, PairSet("one", (ContrastPair("u", "a", "b"),)))


def test_split_half_agreement_of_collected_activations_is_the_demos_computation(tiny_model, small_pairs):
    """With ``activations=`` the function runs exactly what ``run_demo`` computed by hand before it
    used it (even vs odd pairs of one collection, difference of the halves' means)."""
    pos, neg = collect_sets(tiny_model, [small_pairs.positives(), small_pairs.negatives()], layers=[0, 2],
                            positions="reply", keep_per_prompt=True, batch_size=4)
    frame = split_half_agreement(tiny_model, small_pairs, activations=(pos, neg))
    # the demo's former code, verbatim
    evens, odds = range(0, len(small_pairs), 2), range(1, len(small_pairs), 2)
    half_a = diff_in_means(pos.subset(evens), neg.subset(evens))
    half_b = diff_in_means(pos.subset(odds), neg.subset(odds))
    old = [{"layer": layer, "metric": "split_half_cosine", "value": c} for layer, c in half_a.cosine(half_b).items()]
    assert frame["layer"].tolist() == [0, 2] and set(frame["metric"]) == {"split_half_cosine"}
    for row, expected in zip(frame.to_dict("records"), old):
        assert row["layer"] == expected["layer"]
        assert row["value"] == pytest.approx(expected["value"], rel=1e-12, abs=1e-12)
    # the same halves as PairSet.halves: collecting each half on its own agrees to float rounding
    separate = split_half_agreement(tiny_model, small_pairs, layers=[0, 2], batch_size=4)
    assert frame["value"].tolist() == pytest.approx(separate["value"].tolist(), abs=1e-5)


def test_split_half_agreement_refuses_unfit_activations(tiny_model, small_pairs):
    pos, neg = collect_sets(tiny_model, [small_pairs.positives(), small_pairs.negatives()], layers=[1],
                            positions="reply", keep_per_prompt=True, batch_size=4)
    with pytest.raises(DataError, match="nothing is collected or built; drop build$"):
        split_half_agreement(tiny_model, small_pairs, activations=(pos, neg), build=persona_vector)
    with pytest.raises(DataError, match="drop batch_size, layers$"):
        split_half_agreement(tiny_model, small_pairs, activations=(pos, neg), layers=[1], batch_size=4)
    with pytest.raises(DataError, match=r"positive activations must hold one per-prompt vector per pair \(6 pairs"):
        split_half_agreement(tiny_model, small_pairs, activations=(pos.subset(range(4)), neg))
    with pytest.raises(DataError, match="negative activations .* per_prompt None"):
        split_half_agreement(tiny_model, small_pairs, activations=(pos, Activations(neg.layers, neg.mean, neg.count)))
