"""The ``lens-roles`` command line. ``main(argv)`` is testable without a subprocess.

Commands:

* ``extract`` — a persona vector from contrast pairs → ``.safetensors`` + ``.json``;
* ``roles`` — one role vector per role against the baseline, all layers → a folder;
* ``sweep`` / ``generate`` — steering studies;
* ``evaluate`` — role vectors on multiple-choice domains (addition, ablation,
  prompting; in-domain vs off-domain with bootstrap intervals);
* ``ab-curve`` — CAA behaviour curves against the steering multiplier;
* ``demo`` — the main job: the librarian persona and every role on the default
  model, with held-out separation and split-half agreement, written to ``figures/``;
* ``patch`` — activation and attribution patching between a clean and a corrupt
  prompt over resid/attn/mlp/heads grids → CSV + heatmaps;
* ``psr train|compare`` — Prompt Steering Replacement;
* ``train-sae`` — residual-stream SAEs (``sae_lens``) on the model's own seeded
  generations, with their quality table;
* ``sae-align`` / ``sae-attribute`` — the SAE features a direction is made of
  (alignment, decomposition, cards) and those that carry it (attribution checked
  by ablation).

Every library error is printed as one line ``lens-roles: error: …`` with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lens_roles.errors import LensRolesError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="embedded name, local Hugging Face folder or TransformerLens name (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--layers", default="all", help="all, 5, 3,7 or 10-20 (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", default=None, help="activation cache folder (default: none)")
    p.add_argument(
        "--template",
        choices=["chat", "plain"],
        default=None,
        help="chat template (default: the model's own if it has one, else plain)",
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    """Model, device, dtype and batch size (the commands that do not take --layers)."""
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--batch-size", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens-roles", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="persona vector from contrast pairs")
    p.add_argument("--pairs", required=True, help="JSONL {user, positive, negative} or CAA JSON {positive, negative}")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--positions", default="reply", choices=["reply", "last", "eoi", "user", "all"])
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca", "probe"])
    _model_args(p)

    p = sub.add_parser("roles", help="role vectors (role instructions minus baseline), one file per role")
    p.add_argument("--roles", default="all", help="'all' or comma-separated role names from --roles-dir")
    p.add_argument("--roles-dir", default=None, help="folder of <role>.jsonl (default: lens_roles/data/roles)")
    p.add_argument("--baseline", default=None, help="baseline JSONL/JSON (default: the shipped roles/baseline.jsonl)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--positions", default="eoi", choices=["eoi", "last", "user", "all"])
    _model_args(p)

    p = sub.add_parser("sweep", help="steer with a vector over layers x alpha: cosine, adherence, coherence")
    p.add_argument("--vector", required=True, help="direction .safetensors (from extract)")
    p.add_argument("--pairs", required=True, help="contrast pairs; the last --eval-fraction of them are evaluated")
    p.add_argument("--layers", default="12", help="steering layers: 5, 3,7 or 10-20 (default: 12)")
    p.add_argument("--alphas", default="-0.5,-0.25,0.25,0.5", help="comma-separated α values (0 is always added)")
    p.add_argument(
        "--absolute",
        action="store_true",
        help="α in residual units (default: α × the typical residual norm at the layer)",
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.25,
        help="evaluate on the last fraction of the pairs (default 0.25: held out by extract's demo split)",
    )
    p.add_argument("--generate", type=int, default=3, help="prompts to generate from per α (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="output folder: sweep.csv, generations.csv, figures")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--batch-size", type=int, default=4)

    p = sub.add_parser("generate", help="generate with and without steering")
    p.add_argument("prompt", nargs="+", help="user prompt(s)")
    p.add_argument("--vector", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--alpha", type=float, required=True, help="α (× typical residual norm unless --absolute)")
    p.add_argument("--absolute", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))

    p = sub.add_parser("evaluate", help="role vectors on multiple-choice domains: addition, ablation, prompting")
    p.add_argument(
        "--roles",
        default="domain",
        help="'domain' (the first role of each evaluated domain in --role-domains), 'all', "
        "comma-separated names from --roles-dir, or paths to prompt files (JSONL or Role-Vectors "
        "JSON)",
    )
    p.add_argument(
        "--questions",
        required=True,
        help="a folder of domain files (target_test_<domain>.json, else *.json/*.jsonl) or one file",
    )
    p.add_argument("--domains", default=None, help="comma-separated domains to keep (default: every file)")
    p.add_argument("--out", required=True, help="output folder: CSV tables, study.json, figures, vectors/")
    p.add_argument("--roles-dir", default=None, help="folder of <role>.jsonl (default: lens_roles/data/roles)")
    p.add_argument("--baseline", default=None, help="baseline JSONL/JSON (default: the shipped roles/baseline.jsonl)")
    p.add_argument(
        "--role-domains",
        default=None,
        help="JSON {domain: [roles]} saying which role is in-domain where (default: the shipped roles/domains.json)",
    )
    p.add_argument(
        "--select-layers", default=None, help="addition layers tried on validation (default: 25/50/75%% of depth)"
    )
    p.add_argument("--alphas", default="0.5,1,2", help="multiples of the role vector tried on validation")
    p.add_argument("--conditions", default="addition,ablation,prompting")
    p.add_argument("--validation", type=float, default=0.25, help="fraction of each domain used for selection")
    p.add_argument("--max-val", type=int, default=16, help="validation questions per domain (0: all)")
    p.add_argument("--max-test", type=int, default=30, help="test questions per domain (0: all)")
    p.add_argument("--letters", default="ABCD", help="option letters, in order")
    p.add_argument("--answer-format", default="{letter}", help="how the reply writes a letter, e.g. '({letter})'")
    p.add_argument("--system-template", default="You are {article} {role}.", help="persona prompt")
    p.add_argument("--skip-invalid", action="store_true", help="leave out malformed questions instead of failing")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    _model_args(p)

    p = sub.add_parser("ab-curve", help="CAA A/B behaviour curves: p(matching answer) against the multiplier")
    p.add_argument("--pairs", required=True, nargs="+", help="CAA JSON files {positive, negative} (one per behaviour)")
    p.add_argument("--layer", type=int, required=True, help="layer the vector is read at and added to")
    p.add_argument(
        "--multipliers",
        default="-2,-1,-0.5,0,0.5,1,2",
        help="comma-separated multiples of the raw mean-difference vector",
    )
    p.add_argument("--n-train", type=int, default=128, help="pairs that build the vector")
    p.add_argument("--n-test", type=int, default=64, help="disjoint pairs that are scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder: curves.csv, scores.csv, monotonicity.csv, figure")
    _run_args(p)
    p.add_argument("--template", choices=["chat", "plain"], default=None)

    p = sub.add_parser("demo", help="the main job: librarian persona + all roles, figures to figures/")
    p.add_argument("--out", default="figures", help="figure folder (default: figures)")
    p.add_argument("--directions-out", default="build/directions", help="where the vectors are saved")
    p.add_argument("--no-steering", action="store_true", help="skip the steering sweep")
    _model_args(p)
    p = sub.add_parser("patch", help="activation and attribution patching between a clean and a corrupt prompt")
    p.add_argument("--clean", required=True, help="clean user text (e.g. role-flavoured)")
    p.add_argument("--corrupt", required=True, help="corrupt (baseline) user text, same token length")
    p.add_argument("--clean-system", default=None, help="system prompt of the clean run (e.g. 'You are a chemist.')")
    p.add_argument("--corrupt-system", default=None, help="system prompt of the corrupt run")
    p.add_argument(
        "--metric",
        required=True,
        choices=["projection", "logprob_margin", "logit_diff"],
        help="projection: final-position residual on --vector after --read-layer; logprob_margin: "
        "log p(--good) - log p(--bad) continuations; logit_diff: logit(--good) - logit(--bad) tokens",
    )
    p.add_argument("--vector", default=None, help="direction .safetensors (projection)")
    p.add_argument(
        "--read-layer",
        type=int,
        default=None,
        help="layer the projection is read after (default: the vector's only layer)",
    )
    p.add_argument("--good", default=None, help="continuation or token the clean run should favour")
    p.add_argument("--bad", default=None, help="continuation or token the corrupt run should favour")
    p.add_argument(
        "--grid",
        default="resid",
        help="resid, attn, mlp, heads, attn_pos, mlp_pos, or a comma-separated list (default: resid)",
    )
    p.add_argument("--method", default="both", choices=["activation", "attribution", "both"])
    p.add_argument("--layers", default=None, help="layers to patch: 5, 3,7 or 10-20 (default: up to the read layer)")
    p.add_argument(
        "--align", action="store_true", help="pad the shorter prompt with filler tokens when the token lengths differ"
    )
    p.add_argument("--out", required=True, help="output folder: patch.csv, agreement.csv, heatmaps")
    p.add_argument("--batch-size", type=int, default=32, help="patched runs per forward (default 32)")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    # --- psr (issue 7): Prompt Steering Replacement
    p = sub.add_parser("psr", help="Prompt Steering Replacement: token-specific steering trained to mimic prompting")
    psr_sub = p.add_subparsers(dest="psr_command", required=True)
    q = psr_sub.add_parser("train", help="train a PSR to mimic a system prompt; held-out distance, λ heatmap")
    q.add_argument("--vector", required=True, help="direction .safetensors (from extract or roles)")
    q.add_argument("--system-prompt", required=True, help="the system prompt to mimic")
    q.add_argument(
        "--prompts",
        required=True,
        help="contrast pairs JSONL (the positive replies are used) or a prompt set (no replies: mse only)",
    )
    q.add_argument("--layers", default="one", choices=["one", "all"], help="one layer (S-PSR) or all (A-PSR)")
    q.add_argument("--layer", type=int, default=None, help="the steered layer of S-PSR (default: the middle one)")
    q.add_argument("--objective", default="mse", choices=["mse", "kl"])
    q.add_argument("--alpha", type=float, default=None, help="α (default: prompting's mean strength on v)")
    q.add_argument("--epochs", type=int, default=4)
    q.add_argument("--lr", type=float, default=0.02)
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--train-fraction", type=float, default=0.75, help="the first fraction trains, the rest is held out")
    q.add_argument("--max-prompts", type=int, default=24, help="training prompts used (0: all)")
    q.add_argument("--max-held-out", type=int, default=12, help="held-out prompts scored (0: all)")
    q.add_argument("--out", required=True, help="folder: psr.safetensors, history.csv, distance.csv, figure")
    q.add_argument("--model", default=None)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    q = psr_sub.add_parser("compare", help="constant steering vs PSR vs prompting at matched coherence")
    q.add_argument("--vector", required=True, help="the direction the PSR was trained with")
    q.add_argument("--psr", required=True, help="psr.safetensors from 'psr train'")
    q.add_argument(
        "--pairs",
        required=True,
        help="contrast pairs; the last --eval-fraction are evaluated. For a role: its instructions "
        "(a prompt set; needs --questions, whose multiple-choice effect is then the behaviour)",
    )
    q.add_argument("--system-prompt", default=None, help="default: the one the PSR was trained to mimic")
    q.add_argument("--eval-fraction", type=float, default=0.25)
    q.add_argument("--max-pairs", type=int, default=8, help="held-out pairs evaluated (0: all)")
    q.add_argument("--target-perplexity", type=float, default=None, help="default: prompting's perplexity")
    q.add_argument("--max-new-tokens", type=int, default=24)
    q.add_argument("--steps", type=int, default=5, help="bisection steps per method")
    q.add_argument("--questions", default=None, help="optional multiple-choice domain folder or file")
    q.add_argument("--domains", default=None, help="comma-separated domains of --questions")
    q.add_argument("--max-questions", type=int, default=16, help="questions per domain")
    q.add_argument("--out", required=True, help="folder: matched.csv, curve.csv, figure")
    q.add_argument("--model", default=None)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    # --- sae (issue 6): sparse autoencoders and role features
    p = sub.add_parser("train-sae", help="train residual-stream SAEs (sae_lens) on the model's own seeded generations")
    p.add_argument("--layer", required=True, help="layer(s): 12, 6,12,24 or 10-12")
    p.add_argument("--d-sae", type=int, default=2304, help="number of features (default 2304 = 4 x d_model of SmolLM2)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--k", type=int, default=None, help="TopK SAE with k active features (default: 32)")
    kind.add_argument("--l1", type=float, default=None, help="ReLU SAE with this L1 coefficient instead of TopK")
    p.add_argument("--tokens", type=int, default=600_000, help="training activations drawn (epochs over the corpus)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--corpus",
        default=None,
        help="corpus JSON: read it if it exists, else generate it and write it there "
        "(default: generate into OUT/corpus.json)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48, help="generated tokens per continued prompt")
    p.add_argument(
        "--max-prompts",
        type=int,
        default=384,
        help="corpus prompts the model continues (0: all); the others enter as prompts alone",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out sequences for the quality table")
    p.add_argument("--dtype-out", default="float16", choices=["float16", "float32"], help="weights on disk")
    p.add_argument("--out", required=True, help="folder: layer_<L>/ (sae_lens format), quality.csv, corpus.json")
    _run_args(p)

    p = sub.add_parser(
        "sae-align", help="SAE features aligned with a direction, its sparse decomposition, feature cards"
    )
    p.add_argument("--vector", required=True, help="direction .safetensors (from extract or roles)")
    p.add_argument("--sae", required=True, help="SAE folder (sae_lens format), or a registry release with --sae-id")
    p.add_argument("--sae-id", default=None, help="sae_id within the registry release given as --sae")
    p.add_argument("--top", type=int, default=10, help="aligned features listed and carded")
    p.add_argument("--decompose", type=int, default=16, help="most features in the decomposition")
    p.add_argument(
        "--cards",
        default="auto",
        choices=["auto", "yes", "no"],
        help="feature cards (need the model and a corpus; auto: when a corpus is found)",
    )
    p.add_argument("--corpus", default=None, help="corpus JSON for the cards (default: corpus.json beside the SAE)")
    p.add_argument(
        "--roles", default=None, help="folder of role vectors (from 'lens-roles roles') for the cards' alignment table"
    )
    p.add_argument("--out", required=True, help="folder: alignment.csv, decomposition.csv, figures, cards.html")
    _run_args(p)

    p = sub.add_parser(
        "sae-attribute",
        help="gradient x activation attribution of a direction's projection to SAE features, checked by ablation",
    )
    p.add_argument("--vector", required=True, help="direction .safetensors; the metric is the projection on it")
    p.add_argument("--sae", required=True, help="SAE folder, or a registry release with --sae-id")
    p.add_argument("--sae-id", default=None)
    p.add_argument("--prompts", required=True, help="prompt set JSONL/JSON, or contrast pairs (both replies are used)")
    p.add_argument("--system-prompt", default=None, help="system prompt added to every prompt")
    p.add_argument(
        "--read-layer",
        type=int,
        default=None,
        help="layer whose residual stream is projected (default: the direction's deepest layer)",
    )
    p.add_argument("--max-prompts", type=int, default=128, help="prompts used (0: all)")
    p.add_argument("--top", type=int, default=20, help="features listed")
    p.add_argument("--check", type=int, default=16, help="top features ablated one by one to check (0: none)")
    p.add_argument("--out", required=True, help="folder: attribution.csv, check.csv, figure")
    _run_args(p)
    return parser


def _load(args):
    from lens_roles.runtime.models import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=_DTYPES[args.dtype])
    print(
        f"loaded {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}) "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return model


def _collect_kw(args) -> dict:
    return dict(batch_size=args.batch_size, cache_dir=args.cache_dir, template=args.template, progress=True)


def cmd_extract(args) -> int:
    from lens_roles.directions.builders import persona_vector
    from lens_roles.inputs.prompts import load_pairs
    from lens_roles.runtime.models import parse_layers, validate_layers

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise LensRolesError(f"--out must end in .safetensors, got {out}")
    pairs = load_pairs(args.pairs)
    model = _load(args)
    layers = validate_layers(model, parse_layers(args.layers))
    direction = persona_vector(
        model, pairs, layers=layers, positions=args.positions, method=args.method, **_collect_kw(args)
    )
    direction.save(out)
    print(f"wrote {out} ({len(pairs)} pairs, {len(direction.layers)} layers, method {args.method})")
    return 0


def cmd_roles(args) -> int:
    from lens_roles.directions.builders import role_vectors
    from lens_roles.inputs.prompts import load_baseline, load_role, resolve_roles
    from lens_roles.runtime.models import parse_layers, validate_layers

    names = resolve_roles(args.roles, args.roles_dir)
    role_sets = [load_role(name, args.roles_dir) for name in names]
    baseline = load_baseline(args.baseline)
    model = _load(args)
    layers = validate_layers(model, parse_layers(args.layers))
    vectors = role_vectors(model, role_sets, baseline, layers=layers, positions=args.positions, **_collect_kw(args))
    out = Path(args.out)
    for name, direction in vectors.items():
        direction.save(out / f"{name.replace(' ', '_')}.safetensors")
    print(f"wrote {len(vectors)} role vectors ({len(layers)} layers each) to {out}/")
    return 0


def cmd_demo(args) -> int:
    from lens_roles.studies.demo import default_steer_layers, run_demo

    model = _load(args)
    steer_layers = [] if args.no_steering else default_steer_layers(model.cfg.n_layers)
    run_demo(
        model,
        out=Path(args.out),
        directions_out=Path(args.directions_out),
        layers=args.layers,
        steer_layers=steer_layers,
        **_collect_kw(args),
    )
    return 0


def _parse_alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise LensRolesError(f"cannot read --alphas {text!r}: use comma-separated numbers") from None


def _check_model_match(direction, model) -> None:
    from lens_roles.errors import DirectionError

    if direction.meta.get("model") not in (None, model.cfg.model_name):
        raise DirectionError(
            f"the vector was extracted from {direction.meta.get('model')!r}, but the model is "
            f"{model.cfg.model_name!r}; pass --model {direction.meta.get('model')}"
        )


def cmd_sweep(args) -> int:
    from lens_roles.directions.direction import Direction
    from lens_roles.inputs.prompts import load_pairs
    from lens_roles.runtime.models import parse_layers
    from lens_roles.studies.steering_report import run_steering_report

    direction = Direction.load(args.vector)
    pairs = load_pairs(args.pairs)
    alphas = _parse_alphas(args.alphas)
    if not 0 < args.eval_fraction < 1:
        raise LensRolesError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    model = _load(args)
    _check_model_match(direction, model)
    _, held = pairs.split(1 - args.eval_fraction)
    run_steering_report(
        model,
        direction,
        held,
        layers=parse_layers(args.layers),
        alphas=alphas,
        relative=not args.absolute,
        out=Path(args.out),
        n_generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    return 0


def cmd_generate(args) -> int:
    from lens_roles.directions.direction import Direction
    from lens_roles.interventions.steering import residual_norms, steer
    from lens_roles.runtime.generation import generate

    direction = Direction.load(args.vector)
    model = _load(args)
    _check_model_match(direction, model)
    relative = None if args.absolute else residual_norms(model, args.prompt, layers=[args.layer])
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    base = generate(model, args.prompt, **kw)
    with steer(model, direction, args.alpha, layers=[args.layer], relative=relative):
        plus = generate(model, args.prompt, **kw)
    with steer(model, direction, -args.alpha, layers=[args.layer], relative=relative):
        minus = generate(model, args.prompt, **kw)
    unit = "residual units" if args.absolute else "x typical residual norm"
    for b, p, m in zip(base, plus, minus):
        print(f"prompt: {b.prompt}")
        print(f"  unsteered      : {b.text.strip()}")
        print(f"  +{args.alpha:g} ({unit}): {p.text.strip()}")
        print(f"  -{args.alpha:g} ({unit}): {m.text.strip()}")
    return 0


def _role_sets(spec: str, roles_dir, domains: list[str], role_domains: dict[str, str]):
    """Prompt sets for ``evaluate --roles``: 'domain', 'all', names, or prompt-file paths."""
    from lens_roles.inputs.prompts import load_prompt_set, load_role, resolve_roles

    if spec == "domain":
        names = []
        for d in domains:
            home = [r for r, dom in role_domains.items() if dom == d]
            if home:
                names.append(home[0])
        if not names:
            raise LensRolesError(
                f"no role in --role-domains belongs to the domains {', '.join(domains)}; name the roles with --roles"
            )
        return [load_role(n, roles_dir) for n in names]
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if any(s.endswith((".json", ".jsonl")) for s in parts):
        sets = []
        for s in parts:
            path = Path(s)
            stem = path.stem.removeprefix("target_train_").replace(" ", "_")
            sets.append(load_prompt_set(path, stem))
        return sets
    return [load_role(n, roles_dir) for n in resolve_roles(spec if spec == "all" else parts, roles_dir)]


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LensRolesError(f"cannot read {what} {text!r}: use comma-separated integers") from None


def cmd_evaluate(args) -> int:
    from lens_roles.directions.builders import role_vectors
    from lens_roles.directions.geometry import cosine_matrix, role_map
    from lens_roles.inputs.prompts import load_baseline
    from lens_roles.inputs.questions import load_domains
    from lens_roles.runtime.models import validate_layers
    from lens_roles.studies.role_study import StudyConfig, load_role_domains, run_role_study, write_role_study
    from lens_roles.viz.plots import role_cosine_heatmap, save_figure
    from lens_roles.viz.plots import role_map as role_map_figure

    domains = load_domains(
        args.questions,
        domains=args.domains.split(",") if args.domains else None,
        letters=args.letters,
        skip_invalid=args.skip_invalid,
    )
    role_domains = load_role_domains(args.role_domains)
    role_sets = _role_sets(args.roles, args.roles_dir, list(domains), role_domains)
    baseline = load_baseline(args.baseline)
    try:
        config = StudyConfig(
            layers=tuple(_int_list(args.select_layers, "--select-layers")) if args.select_layers else None,
            alphas=tuple(_parse_alphas(args.alphas)),
            validation=args.validation,
            max_val=args.max_val or None,
            max_test=args.max_test or None,
            conditions=tuple(c.strip() for c in args.conditions.split(",") if c.strip()),
            n_boot=args.n_boot,
            seed=args.seed,
            batch_size=args.batch_size,
            answer_format=args.answer_format,
            system_template=args.system_template,
        )
    except ValueError as exc:
        raise LensRolesError(str(exc)) from None
    model = _load(args)
    if config.layers:
        validate_layers(model, list(config.layers))
    vectors = role_vectors(model, role_sets, baseline, **_collect_kw(args))
    out = Path(args.out)
    study = run_role_study(
        model,
        vectors,
        domains,
        role_domains=role_domains,
        config=config,
        progress=True,
    )
    write_role_study(study, out)
    for name, direction in vectors.items():
        direction.save(out / "vectors" / f"{name}.safetensors")
    if len(vectors) > 1:
        cos = cosine_matrix(vectors)
        save_figure(role_cosine_heatmap(cos, subtitle=model.cfg.model_name), out / "role_cosine")
        layer = study.selection.layer.mode().iloc[0] if not study.selection.empty else model.cfg.n_layers // 2
        save_figure(
            role_map_figure(role_map(vectors, int(layer), groups=role_domains), subtitle=model.cfg.model_name),
            out / "role_map",
        )
    summary = study.summary[study.summary.metric == "accuracy"]
    print(study.baseline[study.baseline.metric == "accuracy"].round(3).to_string(index=False))
    print(summary.round(3).to_string(index=False))
    print(f"wrote {out}/ in {study.meta['seconds']['total']:.0f} s")
    return 0


def cmd_ab_curve(args) -> int:
    import pandas as pd

    from lens_roles.inputs.prompts import load_pairs
    from lens_roles.io import write_csv
    from lens_roles.studies.ab_curves import ab_curve, monotonicity
    from lens_roles.viz.plots import ab_curves, save_figure

    pair_sets = [load_pairs(p) for p in args.pairs]
    multipliers = _parse_alphas(args.multipliers)
    model = _load(args)
    out = Path(args.out)
    curves = []
    for pairs in pair_sets:
        curve = ab_curve(
            model,
            pairs,
            layer=args.layer,
            multipliers=multipliers,
            n_train=args.n_train,
            n_test=args.n_test,
            seed=args.seed,
            template=args.template,
            batch_size=args.batch_size,
        )
        curve.vector.save(out / "vectors" / f"{pairs.name}.safetensors")
        curves.append(curve)
        p = curve.frame.p_match
        print(
            f"{pairs.name}: p(match) {p.iloc[0]:.3f} at {multipliers[0]:g} → {p.iloc[-1]:.3f} at {multipliers[-1]:g}",
            file=sys.stderr,
        )
    frame = pd.concat([c.frame for c in curves], ignore_index=True)
    mono = monotonicity(frame)
    write_csv(frame, out / "curves.csv")
    write_csv(pd.concat([c.scores for c in curves], ignore_index=True), out / "scores.csv")
    write_csv(mono, out / "monotonicity.csv")
    meta = {"model": model.cfg.model_name, "behaviours": [c.meta for c in curves]}
    save_figure(
        ab_curves(frame, subtitle=f"{model.cfg.model_name} · layer {args.layer} · held-out pairs, 95% bootstrap bands"),
        out / "ab_curves",
        meta=meta,
    )
    print(frame.round(3).to_string(index=False))
    print(mono.round(3).to_string(index=False))
    return 0


def cmd_patch(args) -> int:
    """``lens-roles patch``: one PatchSetup, the asked grids by the asked methods, written to --out."""
    import pandas as pd

    from lens_roles.analysis.patching.grids import get_grid
    from lens_roles.analysis.patching.metrics import DirectionProjection, LogitDiff, LogprobMargin
    from lens_roles.analysis.patching.result import patch_agreement
    from lens_roles.analysis.patching.runs import PatchSetup
    from lens_roles.directions.direction import Direction
    from lens_roles.errors import PatchingError
    from lens_roles.inputs.prompts import Prompt
    from lens_roles.io import write_csv
    from lens_roles.runtime.models import parse_layers
    from lens_roles.viz.plots import patch_heatmap, patch_scatter, save_figure

    grids = [g.strip() for g in args.grid.split(",") if g.strip()]
    if not grids:
        raise PatchingError("--grid names no grid")
    for grid in grids:
        get_grid(grid)  # unknown grids fail before the model loads
    layers = parse_layers(args.layers)
    layers = None if layers == "all" else layers
    if args.batch_size < 1:
        raise PatchingError(f"--batch-size must be >= 1, got {args.batch_size}")
    direction = None
    if args.metric == "projection":
        if not args.vector:
            raise PatchingError("--metric projection needs --vector (a direction .safetensors) and --read-layer")
        direction = Direction.load(args.vector)
        if args.read_layer is None and len(direction.layers) != 1:
            raise PatchingError(
                f"--metric projection needs --read-layer: the vector has {len(direction.layers)} layers"
            )
    elif args.good is None or args.bad is None:
        raise PatchingError(f"--metric {args.metric} needs --good and --bad")
    model = _load(args)
    if direction is not None:
        _check_model_match(direction, model)
        read = direction.layers[0] if args.read_layer is None else args.read_layer
        metric = DirectionProjection(direction, read)  # a layer the vector lacks is a DirectionError
    elif args.metric == "logit_diff":
        metric = LogitDiff(args.good, args.bad)
    else:
        metric = LogprobMargin(args.good, args.bad)
    setup = PatchSetup(
        model,
        Prompt(args.clean, system=args.clean_system),
        Prompt(args.corrupt, system=args.corrupt_system),
        metric,
        align=args.align,
    )
    print(setup)
    out = Path(args.out)
    methods = ["activation", "attribution"] if args.method == "both" else [args.method]
    results = []
    for grid in grids:
        pair = []
        for method in methods:
            if method == "activation":
                result = setup.activation_patch(grid, layers=layers, batch_size=args.batch_size)
            else:
                result = setup.attribution_patch(grid, layers=layers)
            pair.append(result)
            best = result.top(1).iloc[0]
            where = ", ".join(f"{k} {best[k]}" for k in ("layer", "pos", "head") if not pd.isna(best[k]))
            print(f"{grid:8s} {method:11s} {result.meta['seconds']:7.2f} s   strongest: {where} ({best.value:+.3f})")
        results += pair
        subtitle = (
            f"{setup.meta['model']} · {metric.label} · clean {setup.clean_value:.3g}, "
            f"corrupt {setup.corrupt_value:.3g} · 0 = corrupt, 1 = clean"
        )
        save_figure(
            patch_heatmap(pair, title=f"Patching: {grid}", subtitle=subtitle),
            out / f"patch_{grid}",
            meta=dict(pair[0].meta, methods=methods),
        )
    write_csv(pd.concat([r.to_frame() for r in results], ignore_index=True), out / "patch.csv")
    if len(grids) > 1:
        save_figure(
            patch_heatmap(results, title="Patching: every grid", subtitle=subtitle),
            out / "patch_overview",
            meta=dict(setup.meta, grids=grids, methods=methods),
        )
    if len(methods) == 2:
        agreement = patch_agreement(results[0::2], results[1::2])
        write_csv(agreement, out / "agreement.csv")
        save_figure(
            patch_scatter(results, subtitle=f"{setup.meta['model']} · {metric.label}"),
            out / "attribution_vs_activation",
            meta=dict(setup.meta, grids=grids),
        )
        for row in agreement.itertuples():
            print(f"attribution vs activation, {row.grid}: Pearson r = {row.pearson:.3f} over {row.cells} cells")
    print(f"wrote {out}/patch.csv and heatmaps")
    return 0


COMMANDS = {
    "extract": cmd_extract,
    "roles": cmd_roles,
    "sweep": cmd_sweep,
    "generate": cmd_generate,
    "evaluate": cmd_evaluate,
    "ab-curve": cmd_ab_curve,
    "demo": cmd_demo,
}
COMMANDS["patch"] = cmd_patch


# --- psr (issue 7)
def _head(items, n: int):
    return list(items)[:n] if n else list(items)


def cmd_psr_train(args) -> int:
    from lens_roles.directions.direction import Direction
    from lens_roles.errors import DataError
    from lens_roles.inputs.prompts import Prompt, load_pairs, load_prompt_set
    from lens_roles.interventions.psr.align import prompt_pairs
    from lens_roles.interventions.psr.evaluate import activation_distance, token_coefficients
    from lens_roles.interventions.psr.train import TrainConfig, make_psr, prepare, train_psr
    from lens_roles.io import write_csv
    from lens_roles.viz.plots import save_figure, token_heatmap

    direction = Direction.load(args.vector)
    prompt_pairs([Prompt("x")], args.system_prompt)  # fail early on an empty system prompt
    config = TrainConfig(objective=args.objective, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    try:
        pairs = load_pairs(args.prompts)
        train, held = pairs.split(args.train_fraction)
        train = [Prompt(p.user, None, p.positive) for p in train.pairs]
        held = [Prompt(p.user, None, p.positive) for p in held.pairs]
    except DataError:
        train, held = (list(s.prompts) for s in load_prompt_set(args.prompts).split(args.train_fraction))
    train, held = _head(train, args.max_prompts), _head(held, args.max_held_out)
    model = _load(args)
    psr = make_psr(model, direction, train, args.system_prompt, layers=args.layers, layer=args.layer, alpha=args.alpha)
    print(
        f"{psr.meta['variant']} at layer(s) {list(psr.layers)[:3]}{'...' if len(psr.layers) > 3 else ''}, "
        f"α = {float(psr.alpha):.3f}",
        file=sys.stderr,
    )
    history = train_psr(model, psr, train, args.system_prompt, config, progress=True)
    data = prepare(model, psr, held, args.system_prompt, read_layers=psr.meta["read_layers"])
    distance = activation_distance(model, psr, data)
    lam = token_coefficients(model, psr, held[:1])
    out = Path(args.out)
    psr.meta.update({"vector": str(args.vector), "prompts": str(args.prompts), "held_out": len(held)})
    psr.save(out / "psr.safetensors")
    write_csv(history, out / "history.csv")
    write_csv(distance, out / "distance.csv")
    write_csv(lam, out / "lambda_tokens.csv")
    meta = {"model": model.cfg.model_name, "psr": psr.meta, "layers": list(psr.layers)}
    save_figure(
        token_heatmap(lam, subtitle=f"{model.cfg.model_name} · {psr.meta['variant']} · held-out prompt 0"),
        out / "lambda_tokens",
        meta=meta,
    )
    print(history.round(4).to_string(index=False))
    print("held-out distance to the prompted activations (relative = / unsteered):")
    print(distance.round(4).to_string(index=False))
    print(f"wrote {out}/")
    return 0


def cmd_psr_compare(args) -> int:
    from lens_roles.directions.direction import Direction
    from lens_roles.errors import DataError
    from lens_roles.inputs.prompts import PairSet, PromptSet, load_pairs, load_prompt_set
    from lens_roles.inputs.questions import QuestionSet, load_domains
    from lens_roles.interventions.psr.model import PSR
    from lens_roles.io import write_csv
    from lens_roles.studies.psr_compare import CompareConfig, compare_at_matched_coherence
    from lens_roles.viz.plots import psr_coherence_curve, save_figure

    direction = Direction.load(args.vector)
    config = CompareConfig(
        target_perplexity=args.target_perplexity, max_new_tokens=args.max_new_tokens, steps=args.steps
    )
    try:
        pairs = load_pairs(args.pairs)
        held = pairs.split(1 - args.eval_fraction)[1]
        held = PairSet(held.name, tuple(_head(held.pairs, args.max_pairs)), held.source)
    except DataError:  # a role: instructions, no contrast pairs; behaviour = the multiple-choice effect
        if not args.questions:
            raise
        prompts = load_prompt_set(args.pairs)
        held = prompts.split(1 - args.eval_fraction)[1]
        held = PromptSet(held.name, tuple(_head(held.prompts, args.max_pairs)), held.source)
    questions = None
    if args.questions:
        domains = args.domains.split(",") if args.domains else None
        sets = load_domains(args.questions, domains=domains)
        questions = QuestionSet("+".join(sets), tuple(q for s in sets.values() for q in _head(s, args.max_questions)))
    model = _load(args)
    psr = PSR.load(args.psr, model)
    system = args.system_prompt or psr.meta.get("system")
    result = compare_at_matched_coherence(
        model,
        direction,
        psr,
        held,
        system,
        questions=questions,
        config=config,
        progress=True,
    )
    out = Path(args.out)
    write_csv(result.table, out / "matched.csv")
    write_csv(result.curve, out / "curve.csv")
    kind = "pairs" if isinstance(held, PairSet) else "prompts"
    save_figure(
        psr_coherence_curve(
            result.curve,
            result.table,
            subtitle=f"{model.cfg.model_name} · layer(s) {list(psr.layers)[:3]} · {len(held)} held-out {kind}",
            y="margin" if kind == "pairs" else "mean_strength",
        ),
        out / "matched_coherence",
        meta=result.meta,
    )
    print("behaviour at matched coherence:")
    print(result.table.round(3).to_string(index=False))
    return 0


def cmd_psr(args) -> int:
    return {"train": cmd_psr_train, "compare": cmd_psr_compare}[args.psr_command](args)


COMMANDS["psr"] = cmd_psr


# --- sae (issue 6)
def cmd_train_sae(args) -> int:
    """``lens-roles train-sae``: corpus → activations → one SAE per layer → quality table."""
    from dataclasses import asdict

    import pandas as pd

    from lens_roles.analysis.sae.core import harvest
    from lens_roles.analysis.sae.corpus import Corpus, build_corpus
    from lens_roles.analysis.sae.quality import sae_quality
    from lens_roles.analysis.sae.training import SAETrainConfig, save_sae, train_sae
    from lens_roles.io import write_csv
    from lens_roles.runtime.models import parse_layers, validate_layers

    layers = parse_layers(args.layer)
    if layers == "all":
        raise LensRolesError("--layer all would train one SAE per layer; name the layers, e.g. 6,12,24")
    try:
        k = None if args.l1 is not None else (32 if args.k is None else args.k)
        config = SAETrainConfig(d_sae=args.d_sae, k=k, l1=args.l1, samples=args.tokens, lr=args.lr, seed=args.seed)
    except ValueError as exc:
        raise LensRolesError(f"train-sae: {exc}") from None
    out = Path(args.out)
    model = _load(args)
    layers = validate_layers(model, layers)
    corpus_path = Path(args.corpus) if args.corpus else out / "corpus.json"
    if corpus_path.is_file():
        corpus = Corpus.load(corpus_path)
        if corpus.meta.get("model") != model.cfg.model_name:
            raise LensRolesError(
                f"{corpus_path} was generated by {corpus.meta.get('model')!r}, not {model.cfg.model_name!r}"
            )
        print(f"corpus: {corpus_path} ({len(corpus)} sequences, {corpus.n_tokens} tokens)")
    else:
        t0 = time.perf_counter()
        corpus = build_corpus(
            model,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            max_prompts=args.max_prompts or None,
            batch_size=128,
            progress=True,
        )
        corpus.save(corpus_path)
        print(
            f"corpus: generated {len(corpus)} sequences, {corpus.n_tokens} tokens in "
            f"{time.perf_counter() - t0:.0f} s -> {corpus_path}"
        )
    train, held = corpus.split(args.eval_fraction, seed=args.seed)
    t0 = time.perf_counter()
    acts = harvest(model, train.sequences, layers, batch_size=args.batch_size, progress=True)
    held_acts = harvest(model, held.sequences, layers, batch_size=args.batch_size)
    print(f"activations: {len(acts[layers[0]])} training tokens per layer in {time.perf_counter() - t0:.0f} s")
    rows = []
    for layer in layers:
        t0 = time.perf_counter()
        sae = train_sae(
            acts.pop(layer),
            layer=layer,
            model_name=model.cfg.model_name,
            config=config,
            provenance={"corpus": corpus.meta},
        )
        seconds = time.perf_counter() - t0
        quality = sae_quality(model, sae, held.sequences, batch_size=args.batch_size, acts=held_acts.pop(layer))
        quality.update(
            train_seconds=round(seconds, 1),
            tokens_per_second=round(config.samples / seconds),
            kind=f"topk k={config.k}" if config.k else f"l1 {config.l1}",
        )
        folder = save_sae(
            sae,
            out / f"layer_{layer}",
            dtype=getattr(torch, args.dtype_out),
            extra={"quality": quality, "corpus": corpus.meta, "train": asdict(config)},
        )
        quality["size_mb"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 2)
        rows.append(quality)
        print(
            f"layer {layer}: EV {quality['explained_variance']:.3f}, L0 {quality['l0']:.1f}, "
            f"dead {quality['dead_fraction']:.3f}, CE clean/SAE/zero {quality['ce_clean']:.3f}/"
            f"{quality['ce_sae']:.3f}/{quality['ce_zero']:.3f}, recovered {quality['loss_recovered']:.3f} "
            f"({seconds:.0f} s, {config.samples / seconds:.0f} tokens/s) -> {folder}"
        )
    write_csv(pd.DataFrame(rows), out / "quality.csv")
    print(f"wrote {out}/quality.csv")
    return 0


COMMANDS["train-sae"] = cmd_train_sae


def _load_sae_for(args, direction):
    """Load --sae and check it against the direction (width, layer) before any model loads."""
    from lens_roles.analysis.sae.core import load_sae, sae_layer
    from lens_roles.errors import SAEError

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


def _sae_meta(args, direction, layer) -> dict:
    return {
        "vector": str(args.vector),
        "direction": direction.meta.get("name"),
        "direction_model": direction.meta.get("model"),
        "sae": str(args.sae),
        "sae_id": args.sae_id,
        "sae_layer": layer,
    }


def cmd_sae_align(args) -> int:
    """``lens-roles sae-align``: alignment, decomposition and cards of one direction against one SAE."""
    from lens_roles.analysis.sae.cards import feature_cards, write_cards
    from lens_roles.analysis.sae.core import check_sae
    from lens_roles.analysis.sae.corpus import Corpus
    from lens_roles.analysis.sae.features import decompose, feature_alignment
    from lens_roles.directions.direction import Direction
    from lens_roles.io import write_csv
    from lens_roles.viz.plots import decomposition_plot, sae_alignment_bars, save_figure

    if args.top < 1 or args.decompose < 1:
        raise LensRolesError("--top and --decompose must be >= 1")
    direction = Direction.load(args.vector)
    sae, layer = _load_sae_for(args, direction)
    name = str(direction.meta.get("name", Path(args.vector).stem))
    corpus_path = Path(args.corpus) if args.corpus else Path(args.sae).parent / "corpus.json"
    if args.cards == "yes" and not corpus_path.is_file():
        raise LensRolesError(f"--cards yes needs a corpus: no {corpus_path} (pass --corpus)")
    out = Path(args.out)
    meta = _sae_meta(args, direction, layer)
    alignment = feature_alignment(sae, direction)
    write_csv(alignment, out / "alignment.csv")
    dec = decompose(sae, direction, max_features=args.decompose)
    write_csv(dec.to_frame(), out / "decomposition.csv")
    top = alignment.head(args.top)
    sub = f"{direction.meta.get('model')} · SAE at layer {layer} ({sae.cfg.d_sae} features)"
    save_figure(sae_alignment_bars({f"{name}, layer {layer}": top}, subtitle=sub), out / "alignment", meta=meta)
    save_figure(
        decomposition_plot({name: dec}, subtitle=sub + f" · residual {dec.relative_residual:.3f} of ‖v‖"),
        out / "decomposition",
        meta=meta,
    )
    print(f"top {args.top} features by cosine with {name} at layer {layer}:")
    print(top.round(3).to_string(index=False))
    print(f"decomposition: {len(dec.features)} features, relative residual {dec.relative_residual:.3f}")
    print(dec.to_frame().round(3).to_string(index=False))
    if args.cards == "yes" or (args.cards == "auto" and corpus_path.is_file()):
        model = _load(args)
        _check_model_match(direction, model)
        check_sae(sae, model, layer)
        corpus = Corpus.load(corpus_path)
        roles = {name: direction}
        if args.roles:
            for path in sorted(Path(args.roles).glob("*.safetensors")):
                roles[path.stem] = Direction.load(path)
        features = list(dict.fromkeys([int(f) for f in top.feature] + [int(f) for f in dec.features[:5]]))
        notes = {
            int(r.feature): f"rank {int(r.rank)} by cosine with {name} ({r.cosine:+.3f})" for r in top.itertuples()
        }
        cards = feature_cards(
            model, sae, features, corpus.sequences, directions=roles, notes=notes, batch_size=args.batch_size
        )
        write_cards(
            cards,
            out / "cards.html",
            title=f"Features of {name} at layer {layer}",
            subtitle=f"{sub} · corpus {corpus_path} ({len(corpus)} sequences)",
            meta=meta,
        )
        print(f"wrote {out}/cards.html ({len(cards)} cards)")
    print(f"wrote {out}/alignment.csv, decomposition.csv and figures")
    return 0


def cmd_sae_attribute(args) -> int:
    """``lens-roles sae-attribute``: attribution of the projection metric to features, ablation check."""
    from lens_roles.analysis.sae.core import check_sae
    from lens_roles.analysis.sae.features import ProjectionMetric, ablation_check, attribute_features
    from lens_roles.directions.direction import Direction
    from lens_roles.inputs.prompts import Prompt, load_pairs, load_prompt_set
    from lens_roles.io import write_csv
    from lens_roles.viz.plots import attribution_check_scatter, save_figure

    if args.max_prompts < 0 or args.top < 1 or args.check < 0:
        raise LensRolesError(
            f"--max-prompts must be >= 0, --top >= 1 and --check >= 0 (got {args.max_prompts}, "
            f"{args.top}, {args.check})"
        )
    direction = Direction.load(args.vector)
    sae, layer = _load_sae_for(args, direction)
    read = max(direction.layers) if args.read_layer is None else args.read_layer
    metric = ProjectionMetric(direction, read)  # a layer the vector lacks is a DirectionError
    try:  # contrast pairs: both replies; else a prompt set
        items = [q for pair in load_pairs(args.prompts).pairs for q in pair.as_prompts()]
    except LensRolesError:
        items = list(load_prompt_set(args.prompts).prompts)
    prompts = [Prompt(q.user, args.system_prompt or q.system, q.reply) for q in items]
    prompts = prompts[: args.max_prompts or None]
    model = _load(args)
    _check_model_match(direction, model)
    check_sae(sae, model, layer)
    out = Path(args.out)
    meta = dict(
        _sae_meta(args, direction, layer),
        read_layer=read,
        prompts=str(args.prompts),
        n_prompts=len(prompts),
        system_prompt=args.system_prompt,
    )
    t0 = time.perf_counter()
    frame = attribute_features(model, sae, prompts, metric, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    write_csv(frame, out / "attribution.csv")
    print(
        f"{metric.label}: mean {frame.attrs['metric']:.3f} over {len(prompts)} prompts; attribution in {seconds:.1f} s"
    )
    print(frame.head(args.top).round(4).to_string(index=False))
    if args.check:
        check = ablation_check(model, sae, prompts, metric, frame, top=args.check, batch_size=args.batch_size)
        write_csv(check, out / "check.csv")
        save_figure(
            attribution_check_scatter(
                check, subtitle=f"{model.cfg.model_name} · SAE layer {layer} · {metric.label} · {len(prompts)} prompts"
            ),
            out / "attribution_vs_ablation",
            meta=dict(meta, pearson=check.attrs["pearson"]),
        )
        print(check.round(4).to_string(index=False))
        print(f"attribution vs ablation over the top {len(check)} features: Pearson r = {check.attrs['pearson']:.3f}")
    print(f"wrote {out}/attribution.csv")
    return 0


COMMANDS["sae-align"] = cmd_sae_align
COMMANDS["sae-attribute"] = cmd_sae_attribute


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LensRolesError as exc:
        print(f"lens-roles: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
