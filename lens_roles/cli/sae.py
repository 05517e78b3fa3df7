"""``sae-corpus``, ``train-sae``, ``sae-align`` and ``sae-attribute``: sparse autoencoders and the features of a
direction."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lens_roles.analysis.sae.core import FREQUENCY_FILE, check_sae, load_feature_frequencies, load_sae, sae_layer
from lens_roles.analysis.sae.corpus import Corpus
from lens_roles.analysis.sae.features import ProjectionMetric
from lens_roles.analysis.sae.mixture import MixtureRecipe, build_mixture
from lens_roles.analysis.sae.training import SAETrainConfig
from lens_roles.cli.options import (
    ModelLoader,
    add_command,
    add_input,
    add_model_options,
    add_output,
    add_ray_options,
    check_model_match,
    finite_float,
    fraction,
    int_at_least,
    layer_spec,
    load_pairs_or_prompts,
    open_model,
    ray_executor,
)
from lens_roles.directions.direction import Direction
from lens_roles.errors import SAEError, UsageError
from lens_roles.inputs.prompts import PairSet, Prompt
from lens_roles.io import check_writable
from lens_roles.studies.sae_report import run_alignment_report, run_attribution_report, write_direction_cards
from lens_roles.studies.sae_suite import corpus_for, save_corpus_record, train_broad_suite, train_sae_suite


def run_sae_corpus(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles sae-corpus``: build the broad SAE training corpus (:mod:`lens_roles.analysis.sae.mixture`)."""
    try:
        recipe = MixtureRecipe(samples=args.samples, sample_tokens=args.sample_tokens, docs_tokens=args.docs_tokens,
                               code_tokens=args.code_tokens, chat_replies=args.chat_replies,
                               chat_new_tokens=args.chat_new_tokens, conversations=args.conversations,
                               seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_writable(Path(args.out), "corpus")
    model = open_model(args, load_model)
    corpus = build_mixture(model, recipe, progress=True)
    corpus.meta["dtype"] = args.dtype
    corpus.save(args.out)
    shares = ", ".join(f"{k} {v['tokens']} ({v['share']:.1%})" for k, v in corpus.meta["sources"].items())
    print(f"wrote {args.out}: {len(corpus)} sequences, {corpus.n_tokens} tokens, fingerprint "
          f"{corpus.meta['fingerprint']}; {shares}")
    return 0


def parse_sweep(spec: str, *, tokens: int, lr: float, seed: int) -> list[SAETrainConfig]:
    """``ARCH:WIDTH:K,...`` (e.g. ``topk:2304:32,batchtopk:4608:64``) as training configurations."""
    configs = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise UsageError(f"--sweep item {item!r} is not ARCH:WIDTH:K (e.g. topk:2304:32)")
        try:
            configs.append(SAETrainConfig(d_sae=int(parts[1]), k=int(parts[2]), architecture=parts[0],
                                          samples=tokens, lr=lr, seed=seed))
        except ValueError as exc:
            raise UsageError(f"--sweep item {item!r}: {exc}") from None
    return configs


def run_train_sae(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles train-sae``: one SAE per ``--layer`` on the model's generations, and their quality table."""
    try:
        k = None if args.l1 is not None else (32 if args.k is None else args.k)
        config = SAETrainConfig(d_sae=args.d_sae, k=k, l1=args.l1, samples=args.tokens, lr=args.lr, seed=args.seed)
    except ValueError as exc:  # SAETrainConfig's own checks: a bad argument, found before the model loads
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    if args.sweep is not None:
        return run_train_broad(args, load_model, out)
    corpus_path = Path(args.corpus) if args.corpus else out / "corpus.json"
    # an existing corpus is read now, so that a damaged one fails before the model loads; a new one must be writable
    loaded = Corpus.load(corpus_path) if corpus_path.exists() else None
    if loaded is None:
        check_writable(corpus_path, "corpus")
    model = open_model(args, load_model)
    layers = args.layer.resolve(model)
    corpus = corpus_for(
        model,
        corpus_path,
        loaded=loaded,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        max_prompts=args.max_prompts or None,
    )
    with ray_executor(args) as executor:
        train_sae_suite(
            model,
            layers,
            out,
            config=config,
            corpus=corpus,
            eval_fraction=args.eval_fraction,
            batch_size=args.batch_size,
            dtype=getattr(torch, args.dtype_out),
            executor=executor,
        )
    print(f"wrote {out}/quality.csv")
    return 0


def load_sae_for(args: argparse.Namespace, direction: Direction):
    """``(sae, layer)``: ``--sae`` (``--sae-id``) checked against the direction before any model loads.

    Raises:
        SAEError: the SAE's width is not the direction's, or it reads a layer the direction lacks.
    """
    sae = load_sae(args.sae, args.sae_id, device=args.device)
    layer = sae_layer(sae)
    if direction.d_model != sae.cfg.d_in:
        raise SAEError(
            f"{args.vector} is {direction.d_model}-wide, but the SAE {args.sae} reads {sae.cfg.d_in}-wide activations"
        )
    if layer not in direction:
        raise SAEError(
            f"the SAE {args.sae} reads layer {layer}, but {args.vector} has no vector there "
            f"(its layers: {list(direction.layers)})"
        )
    return sae, layer


def sae_meta(args: argparse.Namespace, direction: Direction, layer: int) -> dict:
    """The provenance of an SAE analysis of a direction (written beside its figures)."""
    return {
        "vector": str(args.vector),
        "direction": direction.meta.get("name"),
        "direction_model": direction.meta.get("model"),
        "sae": str(args.sae),
        "sae_id": args.sae_id,
        "sae_layer": layer,
    }


def run_sae_align(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles sae-align``: alignment, decomposition and cards of one direction against one SAE."""
    direction = Direction.load(args.vector)
    sae, layer = load_sae_for(args, direction)
    name = str(direction.meta.get("name", Path(args.vector).stem))
    corpus_path = Path(args.corpus) if args.corpus else Path(args.sae).parent / "corpus.json"
    if args.cards == "yes" and not corpus_path.is_file():
        raise UsageError(f"--cards yes needs a corpus: no {corpus_path} (pass --corpus)")
    meta = sae_meta(args, direction, layer)
    frequencies = load_feature_frequencies(args.sae) if args.sae_id is None else None
    if args.exclude_dead_dense and frequencies is None:
        raise UsageError(f"--exclude-dead-dense needs the features' firing frequencies: {args.sae} has no "
                         f"{FREQUENCY_FILE} (train-sae --sweep writes one)")
    report = run_alignment_report(
        sae, direction, layer=layer, name=name, out=Path(args.out), top=args.top, max_features=args.decompose,
        meta=meta, frequencies=frequencies, exclude=args.exclude_dead_dense,
    )
    dec = report.decomposition
    print(f"top {args.top} features by cosine with {name} at layer {layer}:")
    print(report.top.round(3).to_string(index=False))
    print(f"decomposition: {len(dec.features)} features, relative residual {dec.relative_residual:.3f}, "
          f"{dec.span_fraction:.3f} of the direction in the span of the {dec.candidates} candidate decoder rows")
    print(dec.to_frame().round(3).to_string(index=False))
    if args.cards == "yes" or (args.cards == "auto" and corpus_path.is_file()):
        model = open_model(args, load_model)
        check_model_match(direction, model)
        check_sae(sae, model, layer)
        corpus = Corpus.load(corpus_path)
        roles = {name: direction}
        if args.roles:
            for path in sorted(Path(args.roles).glob("*.safetensors")):
                roles[path.stem] = Direction.load(path)
        cards = write_direction_cards(
            model, sae, report, corpus, name=name, layer=layer, directions=roles, out=Path(args.out),
            corpus_label=str(corpus_path), batch_size=args.batch_size, meta=meta,
        )
        print(f"wrote {args.out}/cards.html ({len(cards)} cards)")
    print(f"wrote {args.out}/alignment.csv, decomposition.csv and figures")
    return 0


def run_sae_attribute(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles sae-attribute``: attribution of the projection metric to features, checked by ablation."""
    direction = Direction.load(args.vector)
    sae, layer = load_sae_for(args, direction)
    read = max(direction.layers) if args.read_layer is None else args.read_layer
    metric = ProjectionMetric(direction, read)  # a layer the vector lacks is a DirectionError
    items = load_pairs_or_prompts(args.prompts)
    if isinstance(items, PairSet):  # contrast pairs: both replies
        items = [q for pair in items.pairs for q in pair.as_prompts()]
    else:
        items = list(items.prompts)
    prompts = [Prompt(q.user, args.system_prompt or q.system, q.reply) for q in items]
    prompts = prompts[: args.max_prompts or None]
    model = open_model(args, load_model)
    check_model_match(direction, model)
    check_sae(sae, model, layer)
    meta = dict(
        sae_meta(args, direction, layer),
        read_layer=read,
        prompts=str(args.prompts),
        n_prompts=len(prompts),
        system_prompt=args.system_prompt,
    )
    report = run_attribution_report(
        model, sae, prompts, metric, layer=layer, out=Path(args.out), check=args.check, batch_size=args.batch_size,
        meta=meta,
    )
    frame, check = report.frame, report.check
    print(
        f"{metric.label}: mean {frame.attrs['metric']:.3f} over {len(prompts)} prompts; "
        f"attribution in {report.seconds:.1f} s"
    )
    print(frame.head(args.top).round(4).to_string(index=False))
    if check is not None:
        print(check.round(4).to_string(index=False))
        print(f"attribution vs ablation over the top {len(check)} features: Pearson r = {check.attrs['pearson']:.3f}")
    print(f"wrote {args.out}/attribution.csv")
    return 0


def run_train_broad(args: argparse.Namespace, load_model: ModelLoader, out: Path) -> int:
    """``train-sae --sweep``: choose a configuration on ``--sweep-layer`` and train it at every layer on a
    corpus from ``sae-corpus``; writes the SAEs, ``sweep.csv``, ``quality.csv``, the corpus record
    (``corpus_recipe.json``) and a card slice of the corpus (``corpus.json``)."""
    if not args.corpus:
        raise UsageError("train-sae --sweep needs --corpus: a corpus file written by lens-roles sae-corpus")
    sweep = parse_sweep(args.sweep, tokens=args.tokens, lr=args.lr, seed=args.seed)
    corpus = Corpus.load(args.corpus)
    check_writable(out / "quality.csv", "quality table")
    model = open_model(args, load_model)
    if corpus.meta.get("model") != model.cfg.model_name:
        raise SAEError(f"{args.corpus} was built with {corpus.meta.get('model')!r}, not {model.cfg.model_name!r}")
    layers = args.layer.resolve(model)
    sweep_layer = args.sweep_layer if args.sweep_layer is not None else layers[len(layers) // 2]
    train_broad_suite(model, layers, out, corpus=corpus, sweep=sweep, sweep_layer=sweep_layer,
                      train_tokens=args.train_tokens or None, eval_tokens=args.eval_tokens,
                      batch_size=args.batch_size, dtype=getattr(torch, args.dtype_out))
    save_corpus_record(corpus, out, card_tokens=args.card_tokens)
    print(f"wrote {out}/quality.csv, {out}/sweep.csv, {out}/corpus_recipe.json")
    return 0


def register(sub) -> None:
    """Add ``sae-corpus``, ``train-sae``, ``sae-align`` and ``sae-attribute`` to the subparsers ``sub``."""
    p = add_command(sub, "sae-corpus", run_sae_corpus,
                    help="build the broad SAE training corpus (model samples, installed docs and code, chat, "
                         "conversations)")
    d = MixtureRecipe()
    p.add_argument("--samples", type=int_at_least("--samples", 0), default=d.samples,
                   help="unconditional samples from BOS")
    p.add_argument("--sample-tokens", type=int_at_least("--sample-tokens", 1), default=d.sample_tokens,
                   help="tokens per sample")
    p.add_argument("--docs-tokens", type=int_at_least("--docs-tokens", 0), default=d.docs_tokens,
                   help="tokens of installed .md/.rst/.txt files")
    p.add_argument("--code-tokens", type=int_at_least("--code-tokens", 0), default=d.code_tokens,
                   help="tokens of installed .py files")
    p.add_argument("--chat-replies", type=int_at_least("--chat-replies", 0), default=d.chat_replies,
                   help="chat prompts the model answers (the others enter as prompts alone)")
    p.add_argument("--chat-new-tokens", type=int_at_least("--chat-new-tokens", 1), default=d.chat_new_tokens)
    p.add_argument("--conversations", type=int_at_least("--conversations", 0), default=d.conversations,
                   help="seeded persona conversations (besides the shipped ones)")
    p.add_argument("--seq-len", type=int_at_least("--seq-len", 8), default=d.seq_len,
                   help="tokens per chunk of installed text")
    p.add_argument("--seed", type=int, default=0)
    add_output(p, "--out", required=True, help="corpus JSON")
    add_model_options(p, batch=None)
    # the recipe's own batch (64 sequences), not the interactive generation default of 4: sampling
    # 1,536 x 128 tokens four at a time took 13 s a batch, 83 min in all, on 2 cores
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=d.batch_size,
                   help=f"sequences per generation batch (default: {d.batch_size}); part of the recipe, "
                        f"so it changes the sampled text and the fingerprint")

    p = add_command(sub, "train-sae", run_train_sae,
                    help="train residual-stream SAEs (sae_lens) on the model's own seeded generations")
    p.add_argument("--layer", required=True, type=layer_spec("--layer", allow_all=False, why_not_all=(
        "would train one SAE per layer; name the layers, e.g. 6,12,24")), help="layer(s): 12, 6,12,24 or 10-12")
    p.add_argument("--d-sae", type=int_at_least("--d-sae", 1), default=2304,
                   help="number of features (default 2304 = 4 x d_model of SmolLM2)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--k", type=int_at_least("--k", 1), default=None,
                      help="TopK SAE with k active features (default: 32)")
    kind.add_argument("--l1", type=finite_float("--l1", above=0), default=None,
                      help="ReLU SAE with this L1 coefficient instead of TopK")
    p.add_argument("--tokens", type=int_at_least("--tokens", 1), default=600_000,
                   help="training activations drawn (epochs over the corpus)")
    p.add_argument("--lr", type=finite_float("--lr", above=0), default=5e-4, help="Adam learning rate")
    p.add_argument(
        "--corpus",
        default=None,
        help="corpus JSON: read it if it exists, else generate it and write it there "
        "(default: generate into OUT/corpus.json)",
    )
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=48,
                   help="generated tokens per continued prompt")
    p.add_argument(
        "--max-prompts",
        type=int_at_least("--max-prompts", 0, note=" (0: all)"),
        default=384,
        help="corpus prompts the model continues (0: all); the others enter as prompts alone",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=fraction("--eval-fraction"), default=0.1,
                   help="held-out sequences for the quality table")
    p.add_argument("--dtype-out", default="float16", choices=["float16", "float32"], help="weights on disk")
    p.add_argument("--sweep", default=None,
                   help="ARCH:WIDTH:K,... (topk or batchtopk): choose among these on --sweep-layer, then train the "
                        "chosen one at every layer on --corpus (from sae-corpus); --k/--d-sae/--l1 are then unused")
    p.add_argument("--sweep-layer", type=int, default=None, help="layer of the sweep (default: the middle one)")
    p.add_argument("--train-tokens", type=int_at_least("--train-tokens", 0, note=" (0: all)"), default=0,
                   help="with --sweep: train on a seeded subset of the corpus of this many tokens (0: all)")
    p.add_argument("--eval-tokens", type=int_at_least("--eval-tokens", 16), default=2000,
                   help="with --sweep: held-out tokens per source in the quality table")
    p.add_argument("--card-tokens", type=int_at_least("--card-tokens", 0), default=80_000,
                   help="with --sweep: tokens of the corpus slice written as OUT/corpus.json for feature cards")
    add_output(p, "--out", required=True, help="folder: layer_<L>/ (sae_lens format), quality.csv, corpus.json")
    add_model_options(p, batch="read")
    add_ray_options(p)  # --ray: the activations are harvested on the workers, as shard files under OUT/harvest/

    p = add_command(sub, "sae-align", run_sae_align,
                    help="SAE features aligned with a direction, its sparse decomposition, feature cards")
    add_input(p, "--vector", required=True, help="direction .safetensors (from extract or roles)")
    p.add_argument("--sae", required=True, help="SAE folder (sae_lens format), or a registry release with --sae-id")
    p.add_argument("--sae-id", default=None, help="sae_id within the registry release given as --sae")
    p.add_argument("--top", type=int_at_least("--top", 1), default=10, help="aligned features listed and carded")
    p.add_argument("--exclude-dead-dense", action="store_true",
                   help="leave dead and dense features (by the frequencies shipped beside the SAE) out of the "
                        "ranking and the decomposition; without it they are only marked")
    p.add_argument("--decompose", type=int_at_least("--decompose", 1), default=16,
                   help="most features in the decomposition")
    p.add_argument(
        "--cards",
        default="auto",
        choices=["auto", "yes", "no"],
        help="feature cards (need the model and a corpus; auto: when a corpus is found)",
    )
    add_input(p, "--corpus", default=None, help="corpus JSON for the cards (default: corpus.json beside the SAE)")
    add_input(p, "--roles", kind="folder", default=None,
              help="folder of role vectors (from 'lens-roles roles') for the cards' alignment table")
    add_output(p, "--out", required=True, help="folder: alignment.csv, decomposition.csv, figures, cards.html")
    add_model_options(p, batch="read")

    p = add_command(sub, "sae-attribute", run_sae_attribute,
                    help="gradient x activation attribution of a direction's projection to SAE features, "
                    "checked by ablation")
    add_input(p, "--vector", required=True, help="direction .safetensors; the metric is the projection on it")
    p.add_argument("--sae", required=True, help="SAE folder, or a registry release with --sae-id")
    p.add_argument("--sae-id", default=None)
    add_input(p, "--prompts", required=True,
              help="prompt set JSONL/JSON, or contrast pairs (both replies are used)")
    p.add_argument("--system-prompt", default=None, help="system prompt added to every prompt")
    p.add_argument(
        "--read-layer",
        type=int,
        default=None,
        help="layer whose residual stream is projected (default: the direction's deepest layer)",
    )
    p.add_argument("--max-prompts", type=int_at_least("--max-prompts", 0, note=" (0: all)"), default=128,
                   help="prompts used (0: all)")
    p.add_argument("--top", type=int_at_least("--top", 1), default=20, help="features listed")
    p.add_argument("--check", type=int_at_least("--check", 0, note=" (0: none)"), default=16,
                   help="top features ablated one by one to check (0: none)")
    add_output(p, "--out", required=True, help="folder: attribution.csv, check.csv, figure")
    add_model_options(p, batch="read")
