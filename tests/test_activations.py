"""Unit tests of lens_roles.runtime.activations.collect on the tiny model: exact algebra against
direct ``run_with_cache`` computations, batching, streaming means, the on-disk cache,
errors, and hook hygiene."""

from __future__ import annotations

import pytest
import torch

import lens_roles.runtime.activations as activations_mod
from lens_roles.errors import CacheError, DataError, ModelError
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.inputs.prompts import Prompt, PromptSet
from lens_roles.runtime.activations import Activations, collect
from lens_roles.runtime.models import resid_hook

PROMPTS = [
    Prompt("How do I cite a website in APA style?", reply="Happy to help! You need the author and date."),
    Prompt(
        "I'm looking for books on beekeeping for beginners.",
        system="You are a librarian.",
        reply="Wonderful hobby! Our beekeeping guides are in the 638 section, and I can place a hold.",
    ),
    Prompt("Hi", reply="Hello."),
    Prompt("Can you renew my library card? It expired last month and I need it for a class.", reply="Sure."),
    Prompt("Where are the maps?", reply="Second floor, next to the atlases and the local history room."),
]

# very different lengths, for batching and padding
LONG = " ".join(["Suggest a work-up for a Grignard reaction that formed a persistent emulsion."] * 6)
VARIED = [
    Prompt("Hi", reply="Hey."),
    Prompt(LONG, reply="Add brine and filter through celite, then separate the layers slowly."),
    Prompt("What is NMR?", reply="Nuclear magnetic resonance."),
    Prompt(
        "How do I quench lithium aluminium hydride safely on a large scale?", reply="Use the Fieser method."
    ),
    Prompt("Ok", reply=LONG),
    Prompt("Why?", reply="Because."),
    Prompt(LONG[:120], reply="Fine."),
]


def _direct(model, items, positions, layers):
    """Per-prompt means over the selected positions, from one unbatched run_with_cache each."""
    names = [resid_hook(layer) for layer in layers]
    rows = []
    for item, pos in zip(items, positions):
        _, cache = model.run_with_cache(torch.tensor([item.tokens]), names_filter=lambda n: n in names)
        rows.append(torch.stack([cache[name][0, pos].double().mean(0) for name in names]))
    return torch.stack(rows)  # [batch, layer, d_model] float64


def _explicit(items):
    return [[0, len(it) // 2, -1] for it in items]


@pytest.mark.parametrize("rule", ["last", "eoi", "reply", "all", "user", "explicit"])
def test_mean_equals_direct_computation(tiny_model, rule):
    items = encode(tiny_model, PROMPTS)
    positions = _explicit(items) if rule == "explicit" else rule
    selected = select_positions(items, positions)
    layers = (0, 1, 2)
    direct = _direct(tiny_model, items, selected, layers)
    acts = collect(tiny_model, PROMPTS, layers="all", positions=positions, batch_size=3, keep_per_prompt=True)
    assert acts.layers == layers
    assert acts.count == len(PROMPTS)
    assert acts.mean.dtype == torch.float64 and acts.mean.shape == (3, tiny_model.cfg.d_model)
    assert torch.allclose(acts.mean, direct.mean(0), atol=1e-5, rtol=0)
    # per-prompt rows come back in the prompts' order, not the length-sorted batch order
    assert acts.per_prompt.dtype == torch.float32
    assert acts.per_prompt.shape == (len(PROMPTS), 3, tiny_model.cfg.d_model)
    assert torch.allclose(acts.per_prompt.double(), direct, atol=1e-5, rtol=0)


def test_layer_subset_matches_direct(tiny_model):
    items = encode(tiny_model, PROMPTS)
    selected = select_positions(items, "eoi")
    acts = collect(tiny_model, PROMPTS, layers=[2, 0], positions="eoi")
    assert acts.layers == (0, 2)
    assert acts.per_prompt is None
    direct = _direct(tiny_model, items, selected, (0, 2))
    assert torch.allclose(acts.mean, direct.mean(0), atol=1e-5, rtol=0)
    single = collect(tiny_model, PROMPTS, layers=-2, positions="eoi")
    assert single.layers == (1,)
    assert torch.allclose(
        single.mean[0], _direct(tiny_model, items, selected, (1,)).mean(0)[0], atol=1e-5, rtol=0
    )


def test_strings_and_promptset_inputs(tiny_model):
    texts = ["How do I cite a website?", "Where are the maps?"]
    from_strings = collect(tiny_model, texts, layers=[1])
    from_set = collect(tiny_model, PromptSet("s", tuple(Prompt(t) for t in texts)), layers=[1])
    assert torch.equal(from_strings.mean, from_set.mean)
    assert from_set.meta["dataset"] == PromptSet("s", tuple(Prompt(t) for t in texts)).fingerprint()
    # a plain list is fingerprinted by its token ids
    assert from_strings.meta["dataset"] == activations_mod._fingerprint_items(
        encode(tiny_model, [Prompt(t) for t in texts])
    )
    assert from_strings.meta["dataset"] != activations_mod._fingerprint_items(
        encode(tiny_model, [Prompt(texts[0])])
    )


def test_meta_records_provenance(tiny_model):
    acts = collect(tiny_model, PROMPTS, layers=[0, 2], positions="reply")
    assert acts.meta["model"] == tiny_model.cfg.model_name
    assert acts.meta["hook"] == "resid_post"
    assert acts.meta["layers"] == [0, 2]
    assert acts.meta["positions"] == "reply"
    assert acts.meta["template"] == "chat"
    assert acts.meta["prepend_bos"] is False
    assert acts.meta["count"] == len(PROMPTS)
    plain = collect(tiny_model, PROMPTS, layers=[0], template="plain")
    assert plain.meta["template"] == "plain" and plain.meta["prepend_bos"] is True
    assert acts.layer_index(2) == 1
    with pytest.raises(DataError, match="layer 1 was not collected"):
        acts.layer_index(1)


def test_hooks_only_requested_layers_and_stop_early(tiny_model, monkeypatch):
    seen_hooks, seen_stop = [], []
    cls = type(tiny_model)
    original_hooks = cls.hooks
    original_forward = cls.forward

    def spy_hooks(self, fwd_hooks=(), **kw):
        seen_hooks.append([name for name, _ in fwd_hooks])
        return original_hooks(self, fwd_hooks=fwd_hooks, **kw)

    def spy_forward(self, *args, **kw):
        seen_stop.append(kw.get("stop_at_layer"))
        return original_forward(self, *args, **kw)

    monkeypatch.setattr(cls, "hooks", spy_hooks)
    monkeypatch.setattr(cls, "forward", spy_forward)
    collect(tiny_model, PROMPTS, layers=[0, 1], batch_size=2)
    assert seen_hooks == [[resid_hook(0), resid_hook(1)]] * 3  # hooks on the three suffix batches only
    assert seen_stop and set(seen_stop) == {2}  # trunk and suffix passes all stop early


@pytest.mark.parametrize("rule", ["all", "last", "reply"])
def test_batched_equals_unbatched(tiny_model, rule):
    lengths = [len(it) for it in encode(tiny_model, VARIED)]
    assert max(lengths) > 5 * min(lengths)
    one = collect(tiny_model, VARIED, positions=rule, batch_size=1, keep_per_prompt=True)
    five = collect(tiny_model, VARIED, positions=rule, batch_size=5, keep_per_prompt=True)
    assert torch.allclose(one.per_prompt, five.per_prompt, atol=1e-5, rtol=0)
    assert torch.allclose(one.mean, five.mean, atol=1e-5, rtol=0)


def test_streaming_mean_equals_full_mean(tiny_model):
    acts = collect(tiny_model, VARIED, positions="all", batch_size=2, keep_per_prompt=True)
    assert acts.mean.dtype == torch.float64
    assert torch.allclose(acts.mean, acts.per_prompt.double().mean(0), atol=1e-12, rtol=0)
    big = collect(tiny_model, VARIED, positions="all", batch_size=len(VARIED))
    assert torch.allclose(acts.mean, big.mean, atol=1e-5, rtol=0)
    # every prompt weighs equally, whatever its number of selected tokens
    weighted = collect(tiny_model, VARIED[:2], positions="all", batch_size=2, keep_per_prompt=True)
    assert torch.allclose(weighted.mean, weighted.per_prompt.double().mean(0), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- cache


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_cache_round_trip(tiny_model, tmp_path, monkeypatch):
    first = collect(
        tiny_model, PROMPTS, layers=[0, 2], positions="reply", keep_per_prompt=True, cache_dir=tmp_path
    )
    files = _files(tmp_path)
    assert len(files) == 1 and files[0].endswith(".safetensors") and not files[0].startswith(".")
    assert first.meta["cache_key"] == files[0].removesuffix(".safetensors")

    # the second call must come from disk: computing anything would raise
    def no_compute(*a, **k):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(activations_mod, "run_batches", no_compute)
    second = collect(
        tiny_model, PROMPTS, layers=[0, 2], positions="reply", keep_per_prompt=True, cache_dir=tmp_path
    )
    assert torch.equal(first.mean, second.mean) and first.mean.dtype == second.mean.dtype
    assert torch.equal(first.per_prompt, second.per_prompt)
    assert second.layers == first.layers and second.count == first.count
    assert second.meta == first.meta
    assert _files(tmp_path) == files


def test_cache_keys_differ(tiny_model, tmp_path):
    collect(tiny_model, PROMPTS, layers=[0, 2], positions="last", cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 1
    collect(tiny_model, PROMPTS, layers=[0, 2], positions="eoi", cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 2
    collect(tiny_model, PROMPTS, layers=[0], positions="last", cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 3
    collect(tiny_model, PROMPTS, layers=[0], positions="last", keep_per_prompt=True, cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 4
    collect(tiny_model, PROMPTS[:4], layers=[0], positions="last", cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 5
    # repeating a request adds nothing
    collect(tiny_model, PROMPTS, layers=[0, 2], positions="eoi", cache_dir=tmp_path)
    files = _files(tmp_path)
    assert len(files) == 5 and all(f.endswith(".safetensors") and not f.startswith(".") for f in files)


def test_corrupt_cache_raises_cache_error(tiny_model, tmp_path):
    collect(tiny_model, PROMPTS, layers=[1], cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"\x00garbage, not a safetensors file" * 3)
    with pytest.raises(CacheError) as err:
        collect(tiny_model, PROMPTS, layers=[1], cache_dir=tmp_path)
    assert str(path) in str(err.value)


def test_cache_file_for_another_key_is_rejected(tiny_model, tmp_path):
    collect(tiny_model, PROMPTS, layers=[1], positions="last", cache_dir=tmp_path)
    (a,) = tmp_path.iterdir()
    collect(tiny_model, PROMPTS, layers=[1], positions="eoi", cache_dir=tmp_path)
    (b,) = [p for p in tmp_path.iterdir() if p != a]
    a.write_bytes(b.read_bytes())
    with pytest.raises(CacheError) as err:
        collect(tiny_model, PROMPTS, layers=[1], positions="last", cache_dir=tmp_path)
    assert str(a) in str(err.value)


# -------------------------------------------------------------------------- errors


def test_errors(tiny_model):
    with pytest.raises(ModelError, match="3 layers"):
        collect(tiny_model, PROMPTS, layers=[3])
    with pytest.raises(ModelError):
        collect(tiny_model, PROMPTS, layers=[-4])
    with pytest.raises(DataError, match="no prompts"):
        collect(tiny_model, [])
    with pytest.raises(DataError, match="batch_size"):
        collect(tiny_model, PROMPTS, batch_size=0)
    with pytest.raises(DataError, match="batch_size"):
        collect(tiny_model, PROMPTS, batch_size=2.0)
    with pytest.raises(DataError, match="no reply"):
        collect(tiny_model, ["no reply here"], positions="reply")


def test_bare_string_is_not_split_into_characters(tiny_model):
    try:
        acts = collect(tiny_model, "Hello there", layers=[0])
    except DataError:
        return
    assert acts.count == 1


def test_raising_hook_leaves_model_clean(tiny_model, monkeypatch):
    from conftest import hooks_left

    original = torch.einsum

    def boom(equation, *operands):
        if equation == "bp,bpd->bd":
            raise RuntimeError("boom in reduce hook")
        return original(equation, *operands)

    monkeypatch.setattr(activations_mod.torch, "einsum", boom)
    with pytest.raises(RuntimeError, match="boom in reduce hook"):
        collect(tiny_model, PROMPTS, layers=[0, 2], batch_size=2)
    assert hooks_left(tiny_model) == []
    assert tiny_model.context_level == 0
    monkeypatch.undo()
    # the model still works and gives the same numbers as before
    acts = collect(tiny_model, PROMPTS, layers=[0, 2], batch_size=2)
    items = encode(tiny_model, PROMPTS)
    direct = _direct(tiny_model, items, select_positions(items, "last"), (0, 2))
    assert torch.allclose(acts.mean, direct.mean(0), atol=1e-5, rtol=0)


def test_activations_dataclass_by_hand():
    mean = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    acts = Activations((4, 7), mean, 5)
    assert acts.per_prompt is None and acts.meta == {}
    assert acts.layer_index(7) == 1
    with pytest.raises(DataError):
        acts.layer_index(5)
