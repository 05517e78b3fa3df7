"""Sharded jobs without Ray: any cut of the schedule, merged, equals the one-process result (activations,
the role study's multiple-choice scores, A/B curves)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles.analysis.sae.core import harvest, harvest_shards, read_harvest
from lens_roles.directions.builders import persona_vector
from lens_roles.errors import DataError, SAEError, UsageError
from lens_roles.inputs.prompts import ContrastPair, PairSet, load_pairs
from lens_roles.inputs.questions import load_domains
from lens_roles.measures import multiple_choice as mc
from lens_roles.runtime.activations import collect_sets
from lens_roles.runtime.shards import split_units
from lens_roles.studies import persona_space as ps
from lens_roles.studies import role_study as rs
from lens_roles.studies.ab_curves import ab_curve

DATA = Path(__file__).resolve().parent.parent / "lens_roles" / "data"


class InProcess:
    """An executor that runs every shard here, in reverse order, optionally returning one shard twice."""

    def __init__(self, n_shards: int, duplicate: bool = False):
        self.n_shards, self.duplicate, self.payloads, self.calls = n_shards, duplicate, [], []

    def check(self, model) -> None:
        pass

    def shards(self, n_units: int) -> int:
        return min(self.n_shards, n_units)

    def map(self, fn, shared, payloads, *, desc, progress):
        self.payloads = list(payloads)
        self.calls.append((fn.__name__, len(payloads)))
        out = [fn(self.model, shared, p) for p in reversed(payloads)][::-1]
        return out + out[:1] if self.duplicate else out


@pytest.fixture(scope="module")
def pairs():
    p = load_pairs(DATA / "personas" / "librarian.jsonl")
    return PairSet("librarian", p.pairs[:6], p.source)


def test_split_units_covers_every_unit_once_in_order():
    for sizes, n in [([5, 1, 1, 1, 1, 1], 3), ([1] * 5, 5), ([3, 3], 1), ([1, 1, 1, 1, 10], 2), ([2] * 7, 4)]:
        shards = split_units(sizes, n)
        assert len(shards) == n and all(shards)
        assert [u for s in shards for u in s] == list(range(len(sizes)))
    with pytest.raises(UsageError, match="cannot cut 2 unit"):
        split_units([1, 1], 3)


@pytest.mark.parametrize("n_shards", [2, 3, 100])
def test_sharded_collection_equals_one_process(tiny_model, pairs, n_shards, one_thread):
    ex = InProcess(n_shards)
    ex.model = tiny_model
    sets = [pairs.positives(), pairs.negatives()]
    kw = dict(positions="reply", batch_size=2, keep_per_prompt=True)
    one = collect_sets(tiny_model, sets, **kw)
    many = collect_sets(tiny_model, sets, executor=ex, **kw)
    assert 1 < len(ex.payloads) <= n_shards  # really cut, and never more shards than chunks
    for a, b in zip(one, many):
        assert torch.equal(a.per_prompt, b.per_prompt)
        rel = (b.mean - a.mean).norm(dim=-1) / a.mean.norm(dim=-1)
        assert rel.max() <= 1e-12
    for method in ("mean_diff", "pca"):
        d1 = persona_vector(tiny_model, pairs, batch_size=2, method=method)
        d2 = persona_vector(tiny_model, pairs, batch_size=2, method=method, executor=ex)
        rel = (d2.vectors.double() - d1.vectors.double()).norm(dim=-1) / d1.vectors.double().norm(dim=-1)
        assert rel.max() <= 1e-12, method


def test_a_shard_merged_twice_is_an_error(tiny_model, pairs, one_thread):
    ex = InProcess(3, duplicate=True)
    ex.model = tiny_model
    with pytest.raises(DataError, match=r"not each of 0\.\.\d+ once"):
        collect_sets(tiny_model, [pairs.positives()], positions="reply", batch_size=2, executor=ex)


# ------------------------------------------------------------- multiple choice and A/B curves on shards


def _question(i: int, answer: str) -> dict:
    return {"instruction": f"Question number {i} about the law?\n\t\t\tA. one\n\t\t\tB. two\n\t\t\tC. three\n"
                           f"\t\t\tD. four\n\t\t\tAnswer with the letter of the correct answer.\n\t\t\tAnswer:",
            "target_score": answer, "dataset": "law"}


def make_study_inputs(folder: Path):
    """Three random role directions, two 14-question domains written to ``folder``, and a small study config."""
    for k, name in enumerate(["econ", "law"]):
        (folder / f"target_test_{name}.json").write_text(json.dumps([_question(i, "ABCD"[(i * 3 + k) % 4])
                                                                     for i in range(14)]))
    torch.manual_seed(1)
    roles = {name: lr.Direction(tuple(range(3)), torch.randn(3, 32), {"model": "tiny-test", "name": name})
             for name in ("economist", "lawyer", "historian")}
    config = rs.StudyConfig(layers=(0, 2), alphas=(1.0, 4.0), max_val=4, max_test=8, n_boot=200, batch_size=2)
    return roles, load_domains(folder), {"economist": "econ", "lawyer": "law"}, config


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    return make_study_inputs(tmp_path_factory.mktemp("splits"))


def mc_counts(scores) -> dict:
    """Correct / total and the sum of p(correct) per (role, domain, condition, layer, α)."""
    keys = ["role", "domain", "condition", "layer", "alpha"]
    g = scores.fillna({"layer": -1, "alpha": 0.0}).groupby(keys)
    return {k: (int(v.correct.sum()), len(v), float(v.p_correct.sum())) for k, v in g}


@pytest.mark.parametrize("n_shards", [2, 100])
def test_role_study_on_shards_equals_one_process(tiny_model, study_inputs, n_shards, one_thread, no_hook_leaks):
    roles, domains, role_domains, config = study_inputs
    ex = InProcess(n_shards)
    ex.model = tiny_model
    one = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config, progress=False)
    many = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config, progress=False,
                             executor=ex)
    assert len(ex.payloads) > 1  # the last scoring was really cut
    for name in ("scores", "selection", "table", "summary", "baseline"):  # identical per-question rows and tables
        pd.testing.assert_frame_equal(getattr(one, name), getattr(many, name), check_exact=True, obj=name)
    assert mc_counts(one.scores) == mc_counts(many.scores)
    assert len(mc_counts(one.scores)) == 2 + 3 * 3 * 2  # none per domain; roles × conditions × domains


def test_ab_curve_on_shards_equals_one_process(tiny_model, one_thread, no_hook_leaks):
    pairs = []
    for i in range(16):
        q = f"Would you like item {i}?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:"
        pairs.append(ContrastPair(q, *(("(A)", "(B)") if i % 2 else ("(B)", "(A)"))))
    pairs = PairSet("toy-behaviour", tuple(pairs), "memory")
    ex = InProcess(3)
    ex.model = tiny_model
    kw = dict(layer=[0, 2], multipliers=(-2, 0, 1), n_train=8, n_test=8, n_boot=200, batch_size=2, progress=False)
    one, many = ab_curve(tiny_model, pairs, **kw), ab_curve(tiny_model, pairs, executor=ex, **kw)
    assert len(ex.payloads) == 3
    assert torch.equal(one.vector.vectors, many.vector.vectors)
    for name in ("frame", "scores", "steerability"):  # the curve sums, from identical per-pair probabilities
        pd.testing.assert_frame_equal(getattr(one, name), getattr(many, name), check_exact=True, obj=name)


def test_a_prompting_condition_is_not_a_branch(tiny_model, study_inputs):
    _, domains, _, _ = study_inputs
    items = mc.choice_items(tiny_model, list(domains["law"])[:2])
    ex = InProcess(2)
    ex.model = tiny_model
    with pytest.raises(DataError, match="prompting condition is scored on its own"):
        mc.sharded_choice_logprobs(tiny_model, items, [(mc.Condition("none"), None),
                                                       (mc.Condition("prompting", system="You are a judge."), None)],
                                   executor=ex)


def test_persona_space_on_shards_equals_one_process(tiny_model, tmp_path, one_thread):
    """Replies generated batch by batch on the shards, then the activations: the same replies, rows and axis."""
    arch = tmp_path / "arch.jsonl"
    arch.write_text("".join(json.dumps({"name": n, "system": f"You are a {n}.", "group": "g"}) + "\n"
                            for n in ("bard", "ghost")))
    config = ps.PersonaSpaceConfig(roles=("chemist", "lawyer"), archetypes=str(arch), n_questions=3,
                                   max_new_tokens=4, batch_size=2)
    ex = InProcess(3)
    ex.model = tiny_model
    one = ps.run_persona_space(tiny_model, config=config)
    many = ps.run_persona_space(tiny_model, config=config, executor=ex)
    assert ex.calls == [("_reply_batches", 3), ("activation_sums", 3)]  # both jobs really cut
    assert one.replies == many.replies
    rel = (many.axis.vectors.double() - one.axis.vectors.double()).norm(dim=-1) / one.axis.vectors.double().norm(
        dim=-1)
    assert rel.max() <= 1e-12
    pd.testing.assert_frame_equal(one.table, many.table, check_exact=False, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------- SAE harvest shards


class RerunFirst(InProcess):
    """Runs the first shard twice (as after a worker died holding it), then the rest."""

    def map(self, fn, shared, payloads, *, desc, progress):
        fn(self.model, shared, payloads[0])
        return super().map(fn, shared, payloads, desc=desc, progress=progress)


def test_harvest_shards_read_back_equal_harvest(tiny_model, tmp_path, one_thread):
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, tiny_model.cfg.d_vocab, (int(n),), generator=gen).tolist()
            for n in torch.randint(4, 12, (11,), generator=gen)]
    one = harvest(tiny_model, seqs, [0, 2], batch_size=2)
    ex = RerunFirst(4)
    ex.model = tiny_model
    files = harvest_shards(tiny_model, seqs, [0, 2], tmp_path / "h", batch_size=2, executor=ex)
    assert [f.name for f in files] == [f"shard-{i:05d}-of-00004.safetensors" for i in range(4)]
    back = read_harvest(tmp_path / "h")
    assert set(back) == {0, 2} and all(torch.equal(back[k], one[k]) for k in one)  # the re-run shard counted once
    again = InProcess(4)
    again.model = tiny_model
    harvest_shards(tiny_model, seqs, [0, 2], tmp_path / "h", batch_size=2, executor=again)
    assert again.calls == []  # a resumed job finds its shards on disk and runs none
    local = harvest_shards(tiny_model, seqs, [0, 2], tmp_path / "one", batch_size=2)  # no executor: one shard
    assert len(local) == 1 and all(torch.equal(read_harvest(tmp_path / "one")[k], one[k]) for k in one)
    # a shard of another job among the listed ones is refused
    (tmp_path / "h" / files[1].name).write_bytes((tmp_path / "one" / local[0].name).read_bytes())
    with pytest.raises(SAEError, match="belongs to another harvest"):
        read_harvest(tmp_path / "h")
