"""The steering study of one direction, written to a folder (``lens-roles sweep``, the demo).

For held-out contrast pairs and each steering layer × α (α relative to the
typical residual norm at the layer unless told otherwise):

* ``sweep.csv`` — tidy ``layer, alpha, metric, value`` (plus ``read_layer`` and
  ``alpha_mode``): cosine to the unsteered run at every downstream layer,
  persona adherence (reply log-prob margin), next-token KL, and the perplexity and
  repetition of steered generations;
* ``generations.csv`` — the generations themselves (``layer, alpha, prompt, text``);
* ``cosine_vs_alpha_layer{L}.{html,png,json}`` per steering layer, and
  ``steering_behaviour.{html,png,json}`` — adherence and coherence against α.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from lens_roles._version import __version__
from lens_roles.directions.direction import Direction
from lens_roles.inputs.prompts import PairSet
from lens_roles.interventions.steering import residual_norms
from lens_roles.io import write_csv
from lens_roles.measures.sweeps import adherence_sweep, cosine_sweep, generation_sweep
from lens_roles.runtime.models import validate_layers
from lens_roles.runtime.progress import progress_bar
from lens_roles.viz import behaviour_vs_alpha, cosine_vs_alpha, save_figure


def run_steering_report(model, direction: Direction, pairs: PairSet, *, layers, alphas, relative: bool = True,
                        out: Path, n_generate: int = 3, max_new_tokens: int = 32, batch_size: int = 4,
                        progress: bool = True, file=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the sweeps on ``pairs`` (held out from the direction's data) and write the outputs.

    With ``progress`` each step (residual norms, the cosine and adherence sweeps,
    the generations, the figures) shows a tqdm bar on stderr; the report goes to ``file``
    (default stdout).
    """
    layers = list(validate_layers(model, layers))
    users = [p.user for p in pairs.pairs]
    norms = residual_norms(model, users, layers=layers, progress=progress) if relative else None
    frames = [
        cosine_sweep(model, direction, users, steer_layers=layers, alphas=alphas, relative=norms, progress=progress),
        adherence_sweep(model, direction, pairs, steer_layers=layers, alphas=alphas, relative=norms,
                        batch_size=batch_size, progress=progress),
    ]
    texts = pd.DataFrame(columns=["layer", "alpha", "prompt", "text"])
    if n_generate > 0:
        metrics, texts = generation_sweep(model, direction, users[:n_generate], steer_layers=layers, alphas=alphas,
                                          relative=norms, max_new_tokens=max_new_tokens, progress=progress)
        frames.append(metrics)
    sweep = pd.concat(frames, ignore_index=True)[["layer", "alpha", "metric", "value", "read_layer", "alpha_mode"]]

    meta = {
        "model": model.cfg.model_name,
        "direction": dict(direction.meta).get("name"),
        "direction_dataset": direction.meta.get("dataset"),
        "hook": "blocks.{layer}.hook_resid_post",
        "steered_positions": "all",
        "alpha_mode": "relative to the mean residual norm at the layer (first token excluded)" if relative
        else "absolute",
        "residual_norms": {str(k): v for k, v in (norms or {}).items()},
        "eval_pairs": {"source": pairs.source, "n": len(pairs), "hash": pairs.fingerprint()},
        "lens_roles": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_csv(sweep, out / "sweep.csv")
    write_csv(texts, out / "generations.csv")
    sub = f"{model.cfg.model_name} · {meta['direction']} · steered at resid_post, all positions"
    with progress_bar(progress, len(layers) + 1, "steering figures", unit="figure") as bar:
        for layer in layers:
            save_figure(cosine_vs_alpha(sweep, layer, subtitle=sub), out / f"cosine_vs_alpha_layer{layer}",
                        meta=meta)
            bar.update(1)
        save_figure(behaviour_vs_alpha(sweep, subtitle=sub + f" · {len(pairs)} held-out pairs"),
                    out / "steering_behaviour", meta=meta)
        bar.update(1)
    report(sweep, file=file)
    return sweep, texts


def report(sweep: pd.DataFrame, file=None) -> None:
    """Print adherence, KL and final-layer cosine per steering layer and α."""
    file = file or sys.stdout
    last = sweep[sweep.metric == "cosine"].groupby("layer").read_layer.transform("max")
    cos = sweep[sweep.metric == "cosine"][sweep[sweep.metric == "cosine"].read_layer == last]
    table = pd.concat([
        sweep[sweep.metric.isin(["logprob_margin", "kl_from_unsteered", "perplexity", "repetition"])],
        cos.assign(metric="cosine_final_layer"),
    ]).pivot_table(index=["layer", "metric"], columns="alpha", values="value")
    print(table.round(3).to_string(), file=file)
