"""Extraction, the role study and the SAE harvest on a local Ray cluster equal the single-process
result, survive a dying worker, and fail clearly on bad input.

One 2-CPU Ray cluster per module (1-3 min to start on a small machine); its workers build the
same tiny model from a file the driver saved, or load the default model.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_tiny_model
from test_shards import make_study_inputs, mc_counts

from lens_roles.analysis.sae.core import harvest, harvest_shards, read_harvest
from lens_roles.distributed import ModelSpec, RayExecutor, check_address
from lens_roles.distributed.cluster import LocalCluster
from lens_roles.directions.builders import persona_vector, role_vectors
from lens_roles.errors import ModelError, UsageError
from lens_roles.inputs.prompts import PairSet, PromptSet, load_pairs, load_prompt_set
from lens_roles.runtime.activations import collect, collect_sets
from lens_roles.studies import role_study as rs

ray = pytest.importorskip("ray", reason="needs ray (pip install -e '.[distributed]'; make distributed)")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(os.environ.get("LENS_ROLES_DISTRIBUTED") != "1",
                       reason="starts a local Ray cluster (1-3 min on 2 cores): run `make distributed` "
                              "(or set LENS_ROLES_DISTRIBUTED=1)"),
]
DATA = Path(__file__).resolve().parent.parent / "lens_roles" / "data"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU Ray cluster for this module: ``$LENS_ROLES_RAY_ADDRESS`` if set, else a
    :class:`~lens_roles.distributed.cluster.LocalCluster` (``ray start --head`` with fixed agent
    ports, up to 5 attempts: ``ray.init(num_cpus=2)`` aborts when the agents start slowly, as they
    do on two loaded cores). Every Ray process is stopped at the end, whatever failed."""
    address = os.environ.get("LENS_ROLES_RAY_ADDRESS")
    head = None
    try:
        if address is None:
            try:
                head = LocalCluster(2, log_dir=tmp_path_factory.mktemp("ray"))
            except UsageError as exc:
                pytest.fail(str(exc))
            address = head.address
        ray.init(address=address, log_to_driver=False)
        # this module's helpers (CrashOnce) travel to the workers by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield address
    finally:
        ray.shutdown()
        if head is not None:
            head.stop()


@pytest.fixture(scope="module")
def tiny_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(tiny_model, path)
    return path


@pytest.fixture(scope="module")
def executor(cluster, tiny_file):
    with RayExecutor(functools.partial(torch.load, tiny_file, weights_only=False), workers=2) as ex:
        yield ex


@pytest.fixture(scope="module")
def pairs():
    p = load_pairs(DATA / "personas" / "librarian.jsonl")
    return PairSet("librarian", p.pairs[:6], p.source)


@pytest.fixture(scope="module")
def roles():
    chem = PromptSet("chemist", load_prompt_set(DATA / "roles" / "chemist.jsonl").prompts[:5])
    law = PromptSet("lawyer", load_prompt_set(DATA / "roles" / "lawyer.jsonl").prompts[:4])
    base = PromptSet("baseline", load_prompt_set(DATA / "roles" / "baseline.jsonl").prompts[:6])
    return [chem, law], base


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-layer relative difference ``|a - b| / |b|`` (float64)."""
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


class CrashOnce:
    """``fn`` that kills its worker process the first time it is given ``shard`` (flagged by a file)."""

    def __init__(self, fn, shard, flag: Path):
        self.fn, self.shard, self.flag = fn, list(shard), flag

    def __call__(self, model, shared, payload):
        if list(payload) == self.shard and self.flag.exists():
            self.flag.unlink()
            os._exit(1)
        return self.fn(model, shared, payload)


class CrashingExecutor:
    """A :class:`RayExecutor` whose workers die on the first attempt at its second shard."""

    def __init__(self, ex: RayExecutor, flag: Path):
        self.ex, self.flag = ex, flag
        self.check, self.shards = ex.check, ex.shards

    def map(self, fn, shared, payloads, **kw):
        return self.ex.map(CrashOnce(fn, payloads[1], self.flag), shared, payloads, **kw)


def test_collect_sets_on_ray_equals_one_process(executor, tiny_model, pairs, one_thread):
    sets = [pairs.positives(), pairs.negatives()]
    kw = dict(layers="all", positions="reply", batch_size=2, keep_per_prompt=True)
    one = collect_sets(tiny_model, sets, **kw)
    many = collect_sets(tiny_model, sets, executor=executor, **kw)
    for a, b in zip(one, many):
        assert a.count == b.count and a.layers == b.layers
        assert torch.equal(a.per_prompt, b.per_prompt)  # identical rows, in prompt order
        assert rel(b.mean, a.mean).max() <= 1e-12
        assert a.meta == b.meta


def test_direction_builders_on_ray(executor, tiny_model, pairs, roles, one_thread):
    role_sets, base = roles
    one = role_vectors(tiny_model, role_sets, base, batch_size=2)
    many = role_vectors(tiny_model, role_sets, base, batch_size=2, executor=executor)
    for name in one:
        assert rel(many[name].vectors, one[name].vectors).max() <= 1e-12
    for method in ("mean_diff", "pca"):
        a = persona_vector(tiny_model, pairs, batch_size=2, method=method)
        b = persona_vector(tiny_model, pairs, batch_size=2, method=method, executor=executor)
        assert rel(b.vectors, a.vectors).max() <= 1e-12, method


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    return make_study_inputs(tmp_path_factory.mktemp("splits"))


def test_role_study_on_ray_equals_one_process(executor, tiny_model, study_inputs, one_thread):
    """Every scoring of the study (selection grid, test conditions, prompting) runs as shards on the workers."""
    roles, domains, role_domains, config = study_inputs
    one = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config, progress=False)
    many = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config, progress=False,
                             executor=executor)
    for name in ("scores", "selection", "table", "summary", "baseline"):  # identical per-question rows
        pd.testing.assert_frame_equal(getattr(one, name), getattr(many, name), check_exact=True, obj=name)
    assert mc_counts(one.scores) == mc_counts(many.scores)  # correct / total / Σ p(correct) per cell


def test_sae_harvest_on_ray_reads_back_equal(executor, tiny_model, tmp_path, one_thread):
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, tiny_model.cfg.d_vocab, (int(n),), generator=gen).tolist()
            for n in torch.randint(4, 12, (9,), generator=gen)]
    files = harvest_shards(tiny_model, seqs, [0, 2], tmp_path, batch_size=2, executor=executor)
    assert len(files) == 5  # 2 workers x 4 shards each, capped at the 5 batches
    one, back = harvest(tiny_model, seqs, [0, 2], batch_size=2), read_harvest(tmp_path)
    assert all(torch.equal(back[k], one[k]) for k in one)


def test_a_worker_dying_mid_shard_is_replaced_and_its_shard_rerun(executor, tiny_model, pairs, tmp_path,
                                                                  caplog, one_thread):
    flag = tmp_path / "crash-once"
    flag.write_text("die on the first attempt")
    sets = [pairs.positives(), pairs.negatives()]
    kw = dict(positions="reply", batch_size=2, keep_per_prompt=True)
    pids = set(executor.pids())
    with caplog.at_level(logging.WARNING, logger="lens_roles.distributed"):
        many = collect_sets(tiny_model, sets, executor=CrashingExecutor(executor, flag), **kw)
    assert not flag.exists()  # the crash happened
    assert "died while holding shard 1 (attempt 1); re-running shard 1" in caplog.text
    assert set(executor.pids()) != pids  # one worker process was replaced
    one = collect_sets(tiny_model, sets, **kw)
    for a, b in zip(one, many):
        assert a.count == b.count
        assert torch.equal(a.per_prompt, b.per_prompt)
        assert rel(b.mean, a.mean).max() <= 1e-12


def test_more_workers_than_chunks_runs_what_there_is_and_says_so(executor, tiny_model, caplog, one_thread):
    with caplog.at_level(logging.WARNING, logger="lens_roles.distributed"):
        acts = collect(tiny_model, ["Only one prompt."], executor=executor, keep_per_prompt=True)
    assert "2 Ray workers but only 1 chunk(s) of work" in caplog.text
    assert torch.equal(acts.per_prompt, collect(tiny_model, ["Only one prompt."], keep_per_prompt=True).per_prompt)


def test_a_worker_that_cannot_load_the_model_is_one_clear_error(cluster):
    with pytest.raises(ModelError, match=r"could not load the model .*unknown model 'no-such-model'"):
        RayExecutor(ModelSpec("no-such-model"), workers=1, cpus_per_worker=0)  # the module's 2 CPUs are taken


def test_more_workers_than_free_cpus_is_one_clear_error(executor):
    with pytest.raises(UsageError, match="need 4 CPUs, but the Ray cluster has 0 free"):
        RayExecutor(ModelSpec(), workers=4)


def test_workers_hold_another_model_than_the_driver(executor, tiny_tokenizer):
    other = make_tiny_model(tiny_tokenizer, n_layers=2, name="tiny-other")
    with pytest.raises(UsageError, match="the Ray workers hold"):
        collect(other, ["A prompt."], executor=executor)


def test_an_unreachable_address_is_one_clear_error():
    with pytest.raises(UsageError, match="cannot reach a Ray cluster at 127.0.0.1:9"):
        check_address("127.0.0.1:9")
    with pytest.raises(UsageError, match="is not host:port"):
        check_address("nowhere")


@pytest.mark.integration
def test_the_default_model_on_ray_equals_one_process(cluster, real_model, roles, pairs, study_inputs, one_thread):
    """Two workers each load SmolLM2-135M-Instruct with ``load_model``: role and persona vectors, rows and the
    role study's multiple-choice counts match the single process."""
    role_sets, base = roles
    role_sets = [PromptSet(r.name, r.prompts[:3]) for r in role_sets]
    base = PromptSet(base.name, base.prompts[:4])
    few = PairSet(pairs.name, pairs.pairs[:4], pairs.source)
    _, domains, role_domains, config = study_inputs
    config = rs.StudyConfig(layers=(10, 20), alphas=(4.0,), max_val=3, max_test=4, n_boot=200, batch_size=2)
    domains = {"law": domains["law"]}
    kw = dict(layers="all", batch_size=2)
    with RayExecutor(None, workers=2, cpus_per_worker=0) as ex:  # beside the module's executor
        many = role_vectors(real_model, role_sets, base, executor=ex, **kw)
        rows = collect(real_model, base, keep_per_prompt=True, executor=ex, **kw)
        persona = {m: persona_vector(real_model, few, method=m, executor=ex, **kw) for m in ("mean_diff", "pca")}
        study = rs.run_role_study(real_model, many, domains, role_domains=role_domains, config=config,
                                  progress=False, executor=ex)
    one = role_vectors(real_model, role_sets, base, **kw)
    for name in one:
        assert rel(many[name].vectors, one[name].vectors).max() <= 1e-12, name
    assert torch.equal(rows.per_prompt, collect(real_model, base, keep_per_prompt=True, **kw).per_prompt)
    for method, direction in persona.items():
        assert rel(direction.vectors, persona_vector(real_model, few, method=method, **kw).vectors).max() <= 1e-12
    alone = rs.run_role_study(real_model, many, domains, role_domains=role_domains, config=config, progress=False)
    pd.testing.assert_frame_equal(alone.scores, study.scores, check_exact=True)
    assert mc_counts(alone.scores) == mc_counts(study.scores)
