"""Constant steering, PSR and prompting compared at matched coherence (``lens-roles psr compare``).

Every point the bisection tries steers from the first steered layer on, so the
blocks below it are run once per comparison, unsteered, and each point branches
from there (:mod:`lens_roles.runtime.branching`): the generations resume from one
prefill of the coherence prompts (:func:`~lens_roles.runtime.generation.generate_branched`),
the behaviour margin from one run of each batch of pairs, and the matched points'
multiple-choice scores share one branched run
(:func:`~lens_roles.measures.multiple_choice.branched_choice_logprobs`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from lens_roles._version import __version__
from lens_roles.config import Config
from lens_roles.directions.direction import Direction
from lens_roles.errors import ConfigError, PSRError
from lens_roles.inputs.positions import check_context, encode
from lens_roles.inputs.prompts import PairSet, Prompt, PromptSet, as_prompts
from lens_roles.inputs.sets import fingerprint
from lens_roles.interventions.psr.align import check_direction
from lens_roles.interventions.psr.evaluate import token_coefficients
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.steering import steering_hooks
from lens_roles.io import to_plain
from lens_roles.measures.behaviour import (
    generation_coherence,
    logprob_margin,
    reply_logprob,
    reply_logprobs,
)
from lens_roles.measures.multiple_choice import branched_choice_logprobs, choice_frame, choice_items, score_questions
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.branching import Branch, branch_batch, shared_run, unsteered
from lens_roles.runtime.generation import Prefill, generate, generate_branched, prefill
from lens_roles.runtime.progress import progress_bar

METHODS = ("none", "constant", "psr", "prompting")


@dataclass(frozen=True)
class CompareConfig(Config):
    """Settings of :func:`compare_at_matched_coherence`.

    Attributes:
        target_perplexity: coherence to match (default: prompting's own perplexity).
        max_new_tokens: length of the generations scored for coherence.
        steps: bisection steps per method (after bracketing).
        alpha_hi: first upper bracket, as a multiple of the PSR's α (doubled until it brackets).
        tolerance: a method's point counts as matched (``matched`` column) when its
            perplexity is within this relative distance of the target (``|log(ppl/target)|``).
    """

    target_perplexity: float | None = None
    max_new_tokens: int = 24
    steps: int = 5
    alpha_hi: float = 2.0
    tolerance: float = 0.05

    def __post_init__(self):
        if self.target_perplexity is not None and not (self.target_perplexity > 1
                                                       and math.isfinite(self.target_perplexity)):
            raise ConfigError(f"CompareConfig: target_perplexity must be finite and > 1 (or None for "
                              f"prompting's own), got {self.target_perplexity!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 2:
            raise ConfigError(f"CompareConfig: max_new_tokens must be an integer >= 2, got {self.max_new_tokens!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"CompareConfig: steps must be a positive integer, got {self.steps!r}")
        if not self.alpha_hi > 0:
            raise ConfigError(f"CompareConfig: alpha_hi must be positive, got {self.alpha_hi!r}")
        if not self.tolerance > 0:
            raise ConfigError(f"CompareConfig: tolerance must be positive, got {self.tolerance!r}")


@dataclass(frozen=True)
class Comparison:
    """``curve``: every evaluated point (``method, alpha, perplexity, repetition, margin, mean_strength``);
    ``table``: behaviour at matched coherence, one row per method; ``meta``: provenance."""

    curve: pd.DataFrame
    table: pd.DataFrame
    meta: dict


def _branch(model, method: str, direction: Direction, psr: PSR, alpha: float) -> Branch | None:
    """A steering method at strength ``alpha`` as a branch of the unsteered run (None for ``none`` and
    ``prompting``, which do not steer): its hooks, from the first steered layer on."""
    if method == "constant":
        if psr.has_sink:  # the same tokens as the PSR: every one but the sink
            hooks = psr.constant_twin(alpha).hooks(model)
        else:
            hooks = steering_hooks(model, direction, alpha, layers=list(psr.layers))
    elif method == "psr":
        hooks = psr.hooks(model, alpha=alpha)
    else:
        return None
    return Branch(min(psr.layers), tuple(hooks))


class _Shared:
    """The unsteered runs below the first steered layer, made once per comparison and branched from at
    every α the bisection tries (:mod:`lens_roles.runtime.branching`).

    ``prefill`` is that of the coherence prompts' generations, ``margin`` the
    forwards of the behaviour prompts, one :class:`~lens_roles.runtime.branching.Shared`
    per batch; each is made on first use.
    """

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        self.prefills: dict = {}
        self.margins: dict = {}

    def prefill(self, rows: list[list[int]]) -> Prefill:
        key = tuple(map(tuple, rows))
        if key not in self.prefills:
            self.prefills[key] = prefill(self.model, rows, [self.layer])
        return self.prefills[key]

    def margin(self, key, batches) -> list:
        if key not in self.margins:
            self.margins[key] = [shared_run(self.model, batch, [self.layer]) for batch in batches]
        return self.margins[key]


def _coherence(model, prompts: list[Prompt], system: str | None, max_new_tokens: int, *,
               branch: Branch | None = None, shared: _Shared | None = None) -> tuple[float, float]:
    """Mean perplexity (under the unsteered, unprompted model) and repetition of greedy non-empty generations.

    With ``branch`` the generations run under it, resuming from ``shared``'s prefill of the
    prompts (the blocks below the branch's layer run once per comparison).
    """
    gen_prompts = [Prompt(p.user, system) for p in prompts]
    with torch.no_grad():
        if branch is None:
            outs = generate(model, gen_prompts, max_new_tokens=max_new_tokens)
        else:
            plist = as_prompts(gen_prompts)
            items = encode(model, plist)
            check_context(model, items, plist, extra=max_new_tokens)
            rows = [it.tokens for it in items]
            outs = generate_branched(model, rows, [branch], labels=[p.user for p in plist],
                                     max_new_tokens=max_new_tokens,
                                     shared=None if shared is None else shared.prefill(rows))[0]
    items = encode(model, [Prompt(p.user) for p in prompts])
    ppl, rep = generation_coherence(model, [it.tokens for it in items], [o.tokens for o in outs]).nanmean(0)
    return float(ppl), float(rep)


def _margin(model, pairs: PairSet, system: str | None, batch_size: int = 8, *, branch: Branch | None = None,
            shared: _Shared | None = None) -> float:
    """Persona adherence: mean log p(positive reply) − mean log p(negative reply), per token, over pairs.

    With ``branch`` each batch runs under it from ``shared``'s unsteered run of the batch
    below the branch's layer (made once per comparison), else in full.
    """
    prompts = [Prompt(p.user, system, r) for p in pairs.pairs for r in (p.positive, p.negative)]
    items = encode(model, prompts)
    lps = []
    batches = list(token_batches(model, [it.tokens for it in items], batch_size, sort=False))
    runs = None
    if branch is not None:
        runs = (shared or _Shared(model, branch.layer)).margin((system, batch_size), batches)
    with torch.no_grad():
        for k, batch in enumerate(batches):
            if runs is None:
                resid = batch.forward(model, stop_at_layer=model.cfg.n_layers)
            else:
                resid = branch_batch(model, runs[k], branch, stop_at_layer=model.cfg.n_layers)
            for r, it in enumerate(items[i] for i in batch.index):
                a, b = it.reply
                lps.append(reply_logprob(reply_logprobs(model, resid[r], it.reply).cpu(), it.tokens[a:b]))
    lp = torch.stack(lps).double()
    return float(logprob_margin(lp[0::2], lp[1::2]).mean())


def _mc(model, questions, branches: dict[str, Branch | None], system: str) -> dict[str, tuple[float, float]]:
    """Multiple-choice accuracy and mean probability of the right letter per method: the branches (None:
    unsteered) scored in one branched run, ``prompting`` with ``system`` on its own."""
    qs = list(questions)
    items = choice_items(model, qs)
    names = list(branches)
    logps = branched_choice_logprobs(model, items, [branches[m] or unsteered(model) for m in names])
    frames = {m: choice_frame(qs, items, branch_logps) for m, branch_logps in zip(names, logps)}
    frames["prompting"] = score_questions(model, qs, system=system)
    return {m: (float(frame.correct.mean()), float(frame.p_correct.mean())) for m, frame in frames.items()}


def bisect_to_target(evaluate: Callable[[float], dict], hi: float, target: float, steps: int, *,
                     max_brackets: int = 8, on_bracket: Callable[[], None] | None = None) -> dict:
    """The evaluated point whose perplexity is closest to ``target`` along α ≥ 0.

    ``evaluate(alpha)`` returns a row with a ``"perplexity"``. First ``hi`` is doubled
    (at most ``max_brackets`` times, calling ``on_bracket`` each time) until its
    perplexity reaches the target; then ``[lo, hi]`` is bisected ``steps`` times.
    Perplexity is assumed to grow with α; the closest point is returned either way
    (in log-ratio), so a target out of reach yields the nearest point tried.
    """
    lo = 0.0
    row = evaluate(hi)
    for _ in range(max_brackets):  # bracket: grow hi until the perplexity passes the target
        if row["perplexity"] >= target:
            break
        lo, hi = hi, 2 * hi
        if on_bracket is not None:
            on_bracket()
        row = evaluate(hi)
    tried = [row]
    for _ in range(steps):
        mid = (lo + hi) / 2
        row = evaluate(mid)
        tried.append(row)
        if row["perplexity"] >= target:
            hi = mid
        else:
            lo = mid
    return min(tried, key=lambda r: abs(math.log(r["perplexity"] / target)))


def compare_at_matched_coherence(model, direction: Direction, psr: PSR, pairs: PairSet | PromptSet, system: str,
                                 *, questions=None, config: CompareConfig = CompareConfig(),
                                 progress: bool = True) -> Comparison:
    """Constant steering, PSR and prompting at matched coherence (see the module docs).

    Coherence is measured on the pairs' user turns; behaviour on the pairs (held
    out: pass pairs not used to build the direction or train the PSR). A role has
    instructions, not contrast pairs: ``pairs`` may then be a :class:`PromptSet`
    (or a list of prompts), whose user turns give the coherence, and the
    behaviour is the multiple-choice effect alone (``margin`` is NaN, and
    ``questions`` are required). For each
    steering method α is bisected on ``[0, hi]`` so that the perplexity of its
    generations reaches the target; the point closest to it is the matched one.
    With ``questions``, the matched points (and prompting, and no intervention)
    are also scored on them: ``accuracy`` and ``p_correct`` and their changes from
    no intervention (the multiple-choice effect).

    With ``progress`` a tqdm bar on stderr counts the evaluated points (its postfix
    shows the latest α, perplexity and margin). A steering method whose closest
    point misses the target perplexity is reported by a ``UserWarning``.
    """
    check_direction(model, direction)
    psr.check_model(model)
    missing = [layer for layer in psr.layers if layer not in direction]
    if missing or not torch.allclose(torch.stack([direction[layer] for layer in psr.layers]),
                                     psr.vectors.cpu(), rtol=1e-4, atol=1e-6):
        raise PSRError(f"the PSR steers with a different direction (or layers {missing}) than the one compared "
                       "against")
    has_pairs = isinstance(pairs, PairSet)
    if has_pairs:
        users = [Prompt(p.user) for p in pairs.pairs]
        lam_prompts = [Prompt(p.user, None, p.positive) for p in pairs.pairs]
    else:
        plist = as_prompts(pairs)
        if questions is None:
            raise PSRError("without contrast pairs there is no persona margin: pass questions (the multiple-choice "
                           "effect is then the behaviour)")
        users = [Prompt(p.user) for p in plist]
        lam_prompts = [Prompt(p.user, None, p.reply) for p in plist]
        if not users:
            raise PSRError("no prompts to measure coherence on")
    t0 = time.perf_counter()
    points = []
    # the points to evaluate: none, prompting, and per steering method one bracket and the bisection steps
    # (each further bracket adds one), then each method on the questions
    bar = progress_bar(progress, 2 + 2 * (1 + config.steps) + (4 if questions is not None else 0),
                       "matched coherence", unit="point")

    shared = _Shared(model, min(psr.layers))

    def evaluate(method: str, alpha: float) -> dict:
        system_ = system if method == "prompting" else None
        branch = _branch(model, method, direction, psr, alpha)
        ppl, rep = _coherence(model, users, system_, config.max_new_tokens, branch=branch, shared=shared)
        margin = (_margin(model, pairs, system_, branch=branch, shared=shared) if has_pairs else float("nan"))
        row = {"method": method, "alpha": alpha, "perplexity": ppl, "repetition": rep, "margin": margin}
        points.append(row)
        bar.set_postfix_str(f"{method} α={alpha:.3g}: perplexity {ppl:.2f}"
                            + (f", margin {margin:.3f}" if has_pairs else ""), refresh=False)
        bar.update()
        return row

    base = evaluate("none", 0.0)
    prompting = evaluate("prompting", 0.0)
    target = config.target_perplexity or prompting["perplexity"]
    matched = {"none": base, "prompting": prompting}
    # PSR's mean λ on these texts, so that both methods start bracketing at the same mean strength
    lam = token_coefficients(model, psr, lam_prompts)
    mean_lambda = float(lam.lam.mean())
    if mean_lambda <= 0:
        raise PSRError("the PSR's λ is 0 on every token of these prompts: it does not steer at all")
    strength = {"none": 0.0, "prompting": float("nan"), "constant": 1.0, "psr": mean_lambda}
    for method in ("constant", "psr"):
        first_hi = config.alpha_hi * float(psr.alpha) / strength[method]
        matched[method] = bisect_to_target(lambda alpha, m=method: evaluate(m, alpha), first_hi, target,
                                           config.steps, on_bracket=lambda: setattr(bar, "total", bar.total + 1))
    rows = []
    for method in ("none", "prompting", "constant", "psr"):
        m = matched[method]
        rows.append({"method": method, "alpha": m["alpha"], "perplexity": m["perplexity"],
                     "target_perplexity": target, "repetition": m["repetition"], "margin": m["margin"]})
    table = pd.DataFrame(rows)
    # the closest point found is reported either way; say whether it is a matched one
    table["matched"] = [abs(math.log(p / target)) <= config.tolerance for p in table.perplexity]
    table["mean_strength"] = table.alpha * table.method.map(strength)
    table["margin_gain"] = table.margin - base["margin"]
    if questions is not None:
        accs = _mc(model, questions, {m: _branch(model, m, direction, psr, matched[m]["alpha"])
                                      for m in ("none", "constant", "psr")}, system)
        bar.set_postfix_str("multiple-choice accuracy " + ", ".join(f"{m} {accs[m][0]:.3f}" for m in accs),
                            refresh=False)
        bar.update(4)
        table["mc_accuracy"] = table.method.map(lambda m: accs[m][0])
        table["mc_p_correct"] = table.method.map(lambda m: accs[m][1])
        table["mc_effect"] = table.mc_p_correct - accs["none"][1]
    bar.close()
    for row in table[~table.matched & table.method.isin(["constant", "psr"])].itertuples():
        warnings.warn(f"{row.method} did not reach the target perplexity {target:.3f} (closest: "
                      f"{row.perplexity:.3f} at α={row.alpha:.3g}); its row is not a matched-coherence point. More "
                      "bisection steps (CompareConfig.steps) bring it closer; a target out of reach needs a lower "
                      "target_perplexity", stacklevel=2)
    curve = pd.DataFrame(points)
    curve["mean_strength"] = curve.alpha * curve.method.map(strength)
    meta = {"model": model.cfg.model_name, "layers": list(psr.layers), "system": system,
            "pairs": getattr(pairs, "name", "prompts"), "pairs_kind": "contrast pairs" if has_pairs else "prompts",
            "pairs_hash": pairs.fingerprint() if hasattr(pairs, "fingerprint") else fingerprint(
                [(p.system, p.user, p.reply) for p in plist]), "n_pairs": len(users), "target_perplexity": target,
            "max_new_tokens": config.max_new_tokens, "bisection_steps": config.steps, "psr_mean_lambda": mean_lambda,
            "psr": dict(psr.meta, alpha=float(psr.alpha)), "direction": to_plain(direction.meta),
            "questions": None if questions is None else getattr(questions, "name", "questions"),
            "n_questions": None if questions is None else len(list(questions)), "lens_roles": __version__,
            "seconds": time.perf_counter() - t0}
    return Comparison(curve, table, meta)
