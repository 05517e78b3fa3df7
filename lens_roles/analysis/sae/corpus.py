"""The SAE training text: the model's own seeded generations from the project's prompts.

No pretrained SAE exists for the embedded models and nothing may be downloaded at
run time, so the SAEs are trained on text that any user can rebuild offline from
the repository alone:

1. **Prompts** — every instruction of the project's prompt sets (``lens_roles/data/roles/*.jsonl``,
   the baseline included) and every user turn of the persona pairs
   (``lens_roles/data/personas/*.jsonl``), rendered with the model's chat template. Each gets a
   system prompt drawn by a seeded RNG: none (half of them), "You are a <role>." for
   a project role, or a persona system prompt — so the template tokens, role words
   and persona talk the analyses read all occur.
2. **Generations** — the prompts continued by the model itself (all, or the first
   ``max_prompts`` of the shuffled mix, the rest entering as prompts alone), sampled
   at ``temperature`` with a seeded generator (``max_new_tokens`` per prompt).
3. **Written replies** — the persona pairs with their positive and their negative
   reply, as written in the data.

Limits: the text is narrow (assistant chat about the project's topics, a few
thousand sequences), so the SAEs describe this distribution — role and persona
chat — and not the model's pre-training distribution; generations repeat the
model's habits. Sampling is reproducible for the same model weights, torch version
and hardware; another BLAS or device can change the sampled tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import Prompt, available_roles, data_dir, load_baseline, load_pairs, load_role
from lens_roles.inputs.sets import split_indices
from lens_roles.io import atomic_write, parse_json, read_text
from lens_roles.runtime.generation import generate

PERSONA_SYSTEMS = (
    "You are a helpful librarian.",
    "You are a rude, dismissive clerk.",
    "You are a patient teacher.",
    "You are a sarcastic assistant.",
)


@dataclass(frozen=True)
class Corpus:
    """Token sequences for SAE training and feature cards.

    Attributes:
        sequences: token ids per sequence (BOS first), prompt then continuation.
        kinds: ``"generation"`` or ``"written"`` per sequence.
        meta: how the corpus was made (model, seed, sizes) and its fingerprint.
    """

    sequences: tuple[tuple[int, ...], ...]
    kinds: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def split(self, eval_fraction: float = 0.1, seed: int = 0) -> tuple["Corpus", "Corpus"]:
        """A seeded split into (train, eval) by sequence: the eval part is the *first* part of the one
        split rule (:func:`lens_roles.inputs.sets.split_indices` with this seed), the train part the rest."""
        eval_idx, train_idx = split_indices(len(self), eval_fraction, seed=seed, what="corpus")
        pick = lambda idx, part: Corpus(tuple(self.sequences[i] for i in idx),  # noqa: E731
                                        tuple(self.kinds[i] for i in idx), dict(self.meta, part=part))
        return pick(train_idx, "train"), pick(eval_idx, "eval")

    def take(self, max_tokens: int, seed: int = 0) -> "Corpus":
        """A seeded random subset of whole sequences with at most ``max_tokens`` tokens in all (sequences
        in a seeded shuffled order, kept while they fit), so each source keeps its share in expectation."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        keep, total = [], 0
        for i in order:
            if total + len(self.sequences[i]) <= max_tokens:
                keep.append(i)
                total += len(self.sequences[i])
        keep.sort()
        return Corpus(tuple(self.sequences[i] for i in keep), tuple(self.kinds[i] for i in keep),
                      dict(self.meta, taken_tokens=total))

    def save(self, path: str | Path) -> Path:
        """Write the corpus as JSON (token ids, kinds, meta), atomically."""
        data = {"meta": self.meta, "kinds": list(self.kinds), "sequences": [list(s) for s in self.sequences]}
        return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))

    @classmethod
    def load(cls, path: str | Path) -> "Corpus":
        """Read a corpus written by :meth:`save`, checking its schema.

        Raises:
            DataError: naming the file: unreadable or not JSON, or not an object with
                ``sequences`` (non-empty lists of token ids ≥ 0), ``kinds`` (one string
                per sequence) and ``meta`` (an object).
        """
        path = Path(path)
        data = parse_json(read_text(path, "corpus file"), str(path))

        def bad(what: str) -> DataError:
            return DataError(f"{path} is not a corpus file written by Corpus.save: {what}")

        if not isinstance(data, dict):
            raise bad(f"it holds a JSON {type(data).__name__}, not an object")
        sequences, kinds, meta = data.get("sequences"), data.get("kinds"), data.get("meta", {})
        if not isinstance(sequences, list) or not isinstance(kinds, list) or not isinstance(meta, dict):
            raise bad("it needs a list 'sequences', a list 'kinds' and an object 'meta'")
        if len(sequences) != len(kinds):
            raise bad(f"{len(sequences)} sequences but {len(kinds)} kinds")
        for i, (seq, kind) in enumerate(zip(sequences, kinds)):
            if not isinstance(seq, list) or not seq or any(
                    isinstance(tok, bool) or not isinstance(tok, int) or tok < 0 for tok in seq):
                raise bad(f"sequence {i} is not a non-empty list of token ids")
            if not isinstance(kind, str):
                raise bad(f"kind {i} is {kind!r}, not a string")
        return cls(tuple(tuple(s) for s in sequences), tuple(kinds), meta)


def corpus_prompts(seed: int = 0, roles_dir: str | Path | None = None) -> list[Prompt]:
    """The prompt mix: every project instruction and persona user turn, each with a seeded system prompt."""
    rng = random.Random(seed)
    roles = available_roles(roles_dir)
    users = [p.user for role in roles for p in load_role(role, roles_dir).prompts]
    users += [p.user for p in load_baseline().prompts]
    for path in sorted((data_dir() / "personas").glob("*.jsonl")):
        users += [pair.user for pair in load_pairs(path).pairs]
    systems = [f"You are a {role.replace('_', ' ')}." for role in roles] + list(PERSONA_SYSTEMS)
    prompts = []
    for user in users:
        system = None if rng.random() < 0.5 else rng.choice(systems)
        prompts.append(Prompt(user, system=system))
    rng.shuffle(prompts)  # so that any prefix of the mix covers every source
    return prompts


def written_replies() -> list[Prompt]:
    """Every persona pair's user turn with its positive and with its negative reply."""
    out = []
    for path in sorted((data_dir() / "personas").glob("*.jsonl")):
        for pair in load_pairs(path).pairs:
            out += [Prompt(pair.user, reply=pair.positive), Prompt(pair.user, reply=pair.negative)]
    return out


@torch.no_grad()
def generate_sequences(model, prompts: list[Prompt], *, max_new_tokens: int, temperature: float, seed: int,
                       batch_size: int = 32, progress: bool = False) -> list[tuple[int, ...]]:
    """Each prompt's tokens followed by its sampled continuation, in the generation order of :func:`build_corpus`.

    Prompts run in batches of ``batch_size`` taken in order of their user text's length
    (ties by index), each batch through :func:`~lens_roles.runtime.generation.generate`
    (left-padded, KV cache) with its own seed ``seed * 100003 + batch``: the sampled
    tokens depend on the seed and on which prompts share a batch, so both are fixed here.
    """
    sequences: list[tuple[int, ...]] = []
    # length-sorted batches pad less; the order is fixed by the data, so still reproducible
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].user), i))
    for b, start in enumerate(tqdm(range(0, len(order), batch_size), desc="corpus generation", unit="batch",
                                   disable=not progress)):
        batch = [prompts[i] for i in order[start:start + batch_size]]
        heads = encode(model, batch)
        outs = generate(model, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed * 100_003 + b)
        sequences += [tuple(head.tokens) + tuple(out.tokens) for head, out in zip(heads, outs)]
    return sequences


@torch.no_grad()
def build_corpus(model, *, max_new_tokens: int = 96, temperature: float = 1.0, seed: int = 0,
                 batch_size: int = 32, max_prompts: int | None = None, progress: bool = False) -> Corpus:
    """Generate the SAE training corpus (see the module docstring).

    Args:
        max_new_tokens: sampled tokens per prompt (generation stops early at EOS).
        temperature: sampling temperature (``> 0``; the corpus should not be greedy).
        seed: seeds the system-prompt draw and every batch's sampler.
        max_prompts: continue only the first prompts of the (shuffled) mix; the others
            enter the corpus as prompts alone (kind ``"prompt"``). None: continue all; 0: none.
    """
    if temperature <= 0:
        raise DataError(f"the corpus needs sampling: temperature must be > 0, got {temperature}")
    mix = corpus_prompts(seed)
    n_continued = len(mix) if max_prompts is None else min(max_prompts, len(mix))
    prompts, rest = mix[:n_continued], mix[n_continued:]
    written = written_replies()
    sequences = [] if not prompts else generate_sequences(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
        progress=progress)
    kinds = ["generation"] * len(sequences)
    for kind, extra in (("prompt", rest), ("written", written)):
        for item in encode(model, extra):
            sequences.append(tuple(item.tokens))
            kinds.append(kind)
    digest = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:16]
    meta = {"model": str(model.cfg.model_name), "seed": seed, "temperature": temperature,
            "max_new_tokens": max_new_tokens, "n_continued": len(prompts), "n_prompt_only": len(rest),
            "n_written": len(written),
            "n_sequences": len(sequences), "n_tokens": sum(len(s) for s in sequences), "fingerprint": digest,
            "torch": torch.__version__}
    return Corpus(tuple(sequences), tuple(kinds), meta)
