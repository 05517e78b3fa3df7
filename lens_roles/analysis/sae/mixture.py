"""A broad SAE training corpus: the model's own samples, installed text and code, chat, conversations.

The chat-only corpus of :mod:`lens_roles.analysis.sae.corpus` made SAEs that
reconstruct role chat and little else. :func:`build_mixture` adds the model's
pre-training-like text and ordinary documents and code, all made offline from
what is on this machine:

=================  =========================================================================
source             what
=================  =========================================================================
``samples``        unconditional samples from the BOS token alone (the model's own
                   pre-training distribution as it learned it), temperature 1, seeded
                   batches through :func:`~lens_roles.runtime.generation.generate_from_tokens`
``docs``           ``.md`` / ``.rst`` / ``.txt`` files of the installed Python distributions
``code``           ``.py`` files of the installed Python distributions
``chat_*``         the chat corpus (:func:`~lens_roles.analysis.sae.corpus.build_corpus`):
                   project prompts with seeded system prompts, the model's replies to some
                   (``chat_generation``), the rest alone (``chat_prompt``), written persona
                   replies (``chat_written``)
``conversation``   multi-turn chat: the shipped conversations, and seeded conversations of a
                   persona-space archetype answering several persona users with written replies
=================  =========================================================================

**Licence-aware selection.** Only distributions whose metadata declares a permissive
licence (MIT, BSD, Apache, PSF, ISC, Unlicense, zlib — :data:`PERMISSIVE`, matched in
``License-Expression``, ``License`` or the trove classifiers) contribute files; files
named like licence or notice texts are skipped. Files are taken in the order of
``sha256(seed:distribution/path)`` (so the pick is deterministic and spread over
packages), each distribution capped at ``per_dist_fraction`` of the source's budget, each
file read as UTF-8 and cut into up to ``chunks_per_file`` chunks of ``seq_len - 1``
tokens after a BOS, until the token budget is reached.

**Limits.** The text sources depend on what is installed: the same command on another
machine (other packages or versions) gives another corpus, and the fingerprint tells.
Generated parts are reproducible for the same weights, torch build and hardware. The
corpus is English-and-Python heavy; there is no web text other than what the model
itself samples.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as im
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lens_roles.analysis.sae.corpus import Corpus, build_corpus
from lens_roles.config import Config
from lens_roles.errors import ConfigError, DataError
from lens_roles.inputs.conversations import conversation_from_record, encode_conversation, load_conversations
from lens_roles.inputs.prompts import data_dir, load_pairs, read_records
from lens_roles.runtime.generation import generate_from_tokens
from lens_roles.runtime.progress import progress_bar

#: Lower-case substrings of a licence field or classifier that mark a permissive licence.
PERMISSIVE = ("mit", "bsd", "apache", "psf", "python software foundation", "isc license", "isc ", "unlicense",
              "zlib")
#: File name stems (lower case) never read: licence and notice texts.
SKIPPED_STEMS = ("license", "licence", "copying", "notice", "authors", "third_party", "thirdparty")
#: Which evaluation group each corpus kind belongs to.
SOURCE_GROUPS = {"samples": "samples", "docs": "docs", "code": "code", "chat_generation": "chat",
                 "chat_prompt": "chat", "chat_written": "chat", "conversation": "conversations"}


@dataclass(frozen=True)
class MixtureRecipe(Config):
    """How much of each source goes into the corpus (token budgets are approximate upper bounds).

    The defaults give about 1.1M tokens on the development machine: samples 1536 x 128 (0.18M),
    docs 0.19M (all the permissively licensed prose installed there allows: 315 files of 29
    distributions; the 0.3M budget is not reached), code 0.5M, chat (0.11M with 512 replies
    of 96 tokens), conversations (0.13M).
    """

    samples: int = 1536
    sample_tokens: int = 128
    docs_tokens: int = 300_000
    code_tokens: int = 500_000
    chat_replies: int = 512
    chat_new_tokens: int = 96
    conversations: int = 600
    seq_len: int = 256
    chunks_per_file: int = 8
    per_dist_fraction: float = 0.1
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("samples", "docs_tokens", "code_tokens", "chat_replies", "conversations"):
            if getattr(self, name) < 0:
                raise ConfigError(f"MixtureRecipe: {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("sample_tokens", "chat_new_tokens", "chunks_per_file", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MixtureRecipe: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.seq_len < 8:
            raise ConfigError(f"MixtureRecipe: seq_len must be >= 8, got {self.seq_len!r}")
        if not 0 < self.per_dist_fraction <= 1:
            raise ConfigError(f"MixtureRecipe: per_dist_fraction must be in (0, 1], got {self.per_dist_fraction!r}")


# --------------------------------------------------------------------------- installed text and code


def is_permissive(dist: im.Distribution) -> bool:
    """Whether ``dist``'s metadata declares a permissive licence (see :data:`PERMISSIVE`)."""
    meta = dist.metadata
    fields = [meta.get("License-Expression") or "", (meta.get("License") or "")[:200]]
    fields += [c for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    text = " ".join(fields).lower()
    return any(word in text for word in PERMISSIVE)


def installed_files(suffixes: tuple[str, ...], *, seed: int = 0) -> list[tuple[str, Path]]:
    """``(distribution, file)`` for every file with one of ``suffixes`` of a permissively licensed
    installed distribution, in the seeded hash order used by :func:`text_chunks`.

    Distributions are de-duplicated by name (the first found on ``sys.path`` wins);
    licence/notice files and files over 256 kB are left out.
    """
    seen: set[str] = set()
    out: list[tuple[str, str, Path]] = []
    for dist in sorted(im.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        name = (dist.metadata.get("Name") or "").lower()
        if not name or name in seen or name == "lens-roles":
            continue
        seen.add(name)
        if not is_permissive(dist):
            continue
        for rel in dist.files or []:
            rel_s = str(rel)
            if not rel_s.endswith(suffixes) or ".dist-info/" in rel_s or ".egg-info/" in rel_s:
                continue
            if any(Path(rel_s).stem.lower().startswith(s) for s in SKIPPED_STEMS):
                continue
            path = Path(dist.locate_file(rel))
            try:
                if not path.is_file() or path.stat().st_size > 256_000 or path.stat().st_size < 64:
                    continue
            except OSError:
                continue
            key = hashlib.sha256(f"{seed}:{name}/{rel_s}".encode()).hexdigest()
            out.append((key, name, path))
    out.sort()
    return [(name, path) for _, name, path in out]


def text_chunks(tokenizer, files: list[tuple[str, Path]], *, budget: int, seq_len: int, chunks_per_file: int,
                per_dist_fraction: float, bos: int) -> tuple[list[tuple[int, ...]], list[str]]:
    """Token chunks ``[BOS, t_1..t_{seq_len-1}]`` of ``files`` in order until ``budget`` tokens.

    Returns the chunks and the ``distribution/file`` names that contributed.
    """
    cap = max(seq_len, int(budget * per_dist_fraction))
    used: dict[str, int] = {}
    chunks: list[tuple[int, ...]] = []
    names: list[str] = []
    total = 0
    for name, path in files:
        if total >= budget:
            break
        if used.get(name, 0) >= cap:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        took = 0
        for start in range(0, len(ids), seq_len - 1):
            piece = ids[start:start + seq_len - 1]
            if len(piece) < 16 or took >= chunks_per_file or total >= budget or used.get(name, 0) >= cap:
                break
            chunks.append((bos, *piece))
            used[name] = used.get(name, 0) + len(piece) + 1
            total += len(piece) + 1
            took += 1
        if took:
            names.append(f"{name}/{path.name}")
    return chunks, names


# --------------------------------------------------------------------------- samples and conversations


@torch.no_grad()
def bos_samples(model, n: int, *, max_new_tokens: int, seed: int, batch_size: int = 64,
                progress: bool = False) -> list[tuple[int, ...]]:
    """``n`` unconditional samples: BOS then up to ``max_new_tokens`` tokens at temperature 1.

    Batch ``b`` samples with seed ``seed * 100003 + b`` (fixed batches, so reproducible);
    a sample stops at EOS.
    """
    bos = model.tokenizer.bos_token_id
    if bos is None:
        raise DataError(f"{model.cfg.model_name}'s tokenizer has no BOS token to sample from")
    out: list[tuple[int, ...]] = []
    starts = range(0, n, batch_size)
    with progress_bar(progress, len(starts), "BOS samples", unit="batch") as bar:
        for b, start in enumerate(starts):
            rows = [[bos]] * min(batch_size, n - start)
            gens = generate_from_tokens(model, rows, max_new_tokens=max_new_tokens, temperature=1.0,
                                        seed=seed * 100_003 + b, labels=[""] * len(rows))
            out += [(bos, *g.tokens) for g in gens if g.tokens]
            bar.update(1)
    return out


def persona_conversations(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` seeded multi-turn conversation records: a persona-space archetype's system prompt, then
    2–4 user turns of the persona pairs, each answered with that pair's positive or negative reply."""
    rng = random.Random(seed)
    archetypes = [rec for _, rec in read_records(data_dir() / "persona_space" / "archetypes.jsonl")]
    pairs = [pair for path in sorted((data_dir() / "personas").glob("*.jsonl")) for pair in load_pairs(path).pairs]
    if not archetypes or not pairs:
        raise DataError(f"no persona-space archetypes or persona pairs under {data_dir()}")
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": rng.choice(archetypes)["system"]}] if rng.random() < 0.7 else []
        for pair in rng.sample(pairs, rng.randint(2, 4)):
            messages += [{"role": "user", "content": pair.user},
                         {"role": "assistant", "content": pair.positive if rng.random() < 0.5 else pair.negative}]
        records.append({"id": f"persona-{i}", "category": "persona", "messages": messages})
    return records


def conversation_sequences(model, n_synthetic: int, *, seed: int, seq_len: int) -> list[tuple[int, ...]]:
    """The shipped conversations and ``n_synthetic`` persona conversations, tokenised with the chat
    template: each cut after its last assistant message that ends within ``4 * seq_len`` tokens and
    the model's context (a conversation whose first exchange is longer is left out)."""
    convs = load_conversations()
    convs += [conversation_from_record(rec, "persona conversation", rec["id"])
              for rec in persona_conversations(n_synthetic, seed=seed)]
    limit = min(4 * seq_len, getattr(model.cfg, "n_ctx", None) or 4 * seq_len)
    out = []
    for conv in convs:
        for end in reversed(conv.turns()):
            text = model.tokenizer.apply_chat_template(conv.upto(end).as_dicts(), tokenize=False)
            if len(model.tokenizer.encode(text, add_special_tokens=False)) < limit - 1:
                out.append(tuple(encode_conversation(model, conv.upto(end)).tokens))
                break
    return out


# --------------------------------------------------------------------------- the whole mixture


def fingerprint(sequences, kinds) -> str:
    """First 16 hex digits of the sha256 of the token ids and kinds."""
    return hashlib.sha256(json.dumps([list(kinds), [list(s) for s in sequences]]).encode()).hexdigest()[:16]


@torch.no_grad()
def build_mixture(model, recipe: MixtureRecipe = MixtureRecipe(), *, progress: bool = False) -> Corpus:
    """Build the broad corpus (module docstring) with ``recipe``'s budgets.

    ``kinds`` name each sequence's source; ``meta["sources"]`` gives per source the
    sequences, tokens and share of all tokens (the mixture weights), ``meta["recipe"]``
    the recipe, ``meta["files"]`` how many installed files were read and a hash of their names,
    ``meta["fingerprint"]`` the hash of everything.
    """
    tok = model.tokenizer
    bos = tok.bos_token_id
    parts: list[tuple[str, list[tuple[int, ...]]]] = []
    if recipe.samples:
        parts.append(("samples", bos_samples(model, recipe.samples, max_new_tokens=recipe.sample_tokens,
                                             seed=recipe.seed, batch_size=recipe.batch_size, progress=progress)))
    files_meta = {}
    for kind, suffixes, budget in (("docs", (".md", ".rst", ".txt"), recipe.docs_tokens),
                                   ("code", (".py",), recipe.code_tokens)):
        if not budget:
            continue
        chunks, names = text_chunks(tok, installed_files(suffixes, seed=recipe.seed), budget=budget,
                                    seq_len=recipe.seq_len, chunks_per_file=recipe.chunks_per_file,
                                    per_dist_fraction=recipe.per_dist_fraction, bos=bos)
        files_meta[kind] = {"files": len(names), "distributions": len({n.split("/")[0] for n in names}),
                            "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]}
        parts.append((kind, chunks))
    chat = build_corpus(model, max_new_tokens=recipe.chat_new_tokens, seed=recipe.seed,
                        batch_size=recipe.batch_size, max_prompts=recipe.chat_replies, progress=progress)
    for kind in ("generation", "prompt", "written"):
        parts.append((f"chat_{kind}", [s for s, k in zip(chat.sequences, chat.kinds) if k == kind]))
    parts.append(("conversation", conversation_sequences(model, recipe.conversations, seed=recipe.seed,
                                                         seq_len=recipe.seq_len)))
    sequences = [s for _, seqs in parts for s in seqs]
    kinds = [kind for kind, seqs in parts for _ in seqs]
    total = sum(len(s) for s in sequences)
    sources = {kind: {"sequences": len(seqs), "tokens": sum(len(s) for s in seqs),
                      "share": round(sum(len(s) for s in seqs) / max(total, 1), 4)} for kind, seqs in parts}
    meta = {"model": str(model.cfg.model_name), "recipe": recipe.to_dict(), "sources": sources,
            "files": files_meta, "n_sequences": len(sequences), "n_tokens": total,
            "fingerprint": fingerprint(sequences, kinds), "torch": torch.__version__,
            "kind": "mixture"}
    return Corpus(tuple(sequences), tuple(kinds), meta)
