"""Does localisation inform editing? Edit one fact at every layer and set the scores beside its trace.

    sweep = layer_sweep(lm, case, layers=range(13))      # a tracer.evaluate Case (CounterFact's shape)
    print(sweep.markdown())                              # layer | MLP effect | ES EM PS PM NS NM ES-g | rewrite score
    localisation_correlation([sweep, ...])               # over many facts, with bootstrap intervals

For each layer ℓ the fact is written with ROME at ℓ (the model's other ROME settings, one set of
context templates for every layer) and measured as ``factscope evaluate`` measures it
(:mod:`tracer.evaluate.metrics`: teacher-forced ES / PS / NS and magnitudes, greedy ES-g / PS-g,
CounterFact+ NKL), then reverted. Beside it: the MLP-window indirect effect at the last subject
token (:func:`tracer.edit.calibrate.last_subject_effects`) and Hase et al.'s (2023) rewrite score
``(P_post(new) − P_pre(new)) / (1 − P_pre(new))`` of the rewrite prompt and the paraphrases.

:func:`localisation_correlation` asks their question of many sweeps: across facts and layers, does
the trace effect at (fact, layer) predict the edit's success there? It reports the pooled
Spearman correlation, the within-layer Pearson correlation (both variables centred per layer, so
the layer itself explains nothing), and the variance explained by the layer alone against layer
plus trace effect, each with a percentile-bootstrap interval over facts.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from .edit.calibrate import last_subject_effects
from .edit.hparams import ROMEHyperParams
from .edit.requests import EditRequest
from .edit.rome import edited, rome_edit
from .edit.templates import rome_templates
from .errors import HyperParameterError
from .evaluate.metrics import (case_scores, generation_scores, greedy_outcomes, measure_probabilities,
                               neighbourhood_distributions, neighbourhood_kl)
from .evaluate.records import Case
from .markdown import cell as md_cell
from .models import LanguageModel, as_model
from .targets import spaced

#: per-layer scores of a sweep (case_scores keys, then the greedy and KL ones, then Hase's)
SCORES = ("rewrite_success", "rewrite_diff", "paraphrase_success", "paraphrase_diff", "neighborhood_success",
          "neighborhood_diff", "rewrite_gen_success", "paraphrase_gen_success", "neighborhood_kl", "rewrite_score",
          "paraphrase_score")


@dataclass(frozen=True)
class LayerSweep:
    """One fact edited at each of ``layers``: ``scores[i]`` belongs to ``layers[i]``; ``effect`` is the
    trace's MLP effect at the last subject token for every layer of the model."""

    case: dict
    model: str
    layers: tuple[int, ...]
    effect: tuple[float, ...]
    before: dict
    scores: tuple[dict, ...]
    settings: dict
    seconds: dict

    def effect_at(self) -> list[float]:
        """The trace effect at each swept layer."""
        return [self.effect[layer] for layer in self.layers]

    def column(self, name: str) -> list[float]:
        return [float(s.get(name, math.nan)) for s in self.scores]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(layers=list(self.layers), effect=list(self.effect), scores=[dict(s) for s in self.scores])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSweep":
        return cls(dict(d["case"]), d["model"], tuple(d["layers"]), tuple(d["effect"]), dict(d["before"]),
                   tuple(dict(s) for s in d["scores"]), dict(d["settings"]), dict(d["seconds"]))

    def markdown(self) -> str:
        """One row per layer: the trace effect, then the edit's scores (× 100, NKL in nats)."""
        head = ["layer", "MLP effect", "ES", "EM", "PS", "PM", "NS", "NM", "ES-g", "PS-g", "NKL", "rewrite score"]
        keys = ("rewrite_success", "rewrite_diff", "paraphrase_success", "paraphrase_diff", "neighborhood_success",
                "neighborhood_diff", "rewrite_gen_success", "paraphrase_gen_success")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        peak = int(np.argmax(self.effect_at()))
        for i, (layer, s) in enumerate(zip(self.layers, self.scores)):
            cells = [str(layer), ("**%.3f**" if i == peak else "%.3f") % self.effect[layer]]
            cells += ["–" if k not in s else f"{100 * s[k]:.1f}" for k in keys]
            cells += ["–" if "neighborhood_kl" not in s else f"{s['neighborhood_kl']:.3f}", f"{s['rewrite_score']:.3f}"]
            lines.append("| " + " | ".join(md_cell(c) if not c.startswith("**") else c for c in cells) + " |")
        return "\n".join(lines) + "\n"


def _rewrite_score(pre: list[dict], post: list[dict]) -> float:
    """Hase et al.'s rewrite score averaged over prompts: (P_post(new) − P_pre(new)) / (1 − P_pre(new))."""
    vals = [(math.exp(-b["nll_new"]) - math.exp(-a["nll_new"])) / max(1e-12, 1 - math.exp(-a["nll_new"]))
            for a, b in zip(pre, post)]
    return float(np.mean(vals)) if vals else math.nan


def layer_sweep(model: "LanguageModel | str", case: Case, layers: Sequence[int], *, samples: int = 10, window: int = 10,
                noise: Any = "3s", seed: int = 1, stats: Any = None, greedy_tokens: int = 16, progress: bool = True,
                **overrides) -> LayerSweep:
    """Trace ``case``'s fact, then edit it with ROME at each of ``layers`` and measure (module docstring).
    ``overrides``: ROME hyper-parameter fields for every layer (e.g. ``v_num_grad_steps``)."""
    lm = as_model(model)
    layers = tuple(int(x) for x in layers)
    if not layers or any(not 0 <= x < lm.n_layers for x in layers) or len(set(layers)) != len(layers):
        raise HyperParameterError(f"layers must be distinct layers of {lm.name} (0..{lm.n_layers - 1}), got {list(layers)}")
    if not case.target_true:
        raise HyperParameterError("a layer sweep needs the true target (CounterFact's target_true) to score the edit")
    request = EditRequest(case.prompt, case.subject, spaced(case.target_new), spaced(case.target_true))
    hps = [ROMEHyperParams.for_model(lm, **{**overrides, "layer": layer}) for layer in layers]  # checked before any work
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    effect, tr = last_subject_effects(lm, case.rewrite_prompt, case.subject, samples=samples, window=window,
                                      noise=noise, seed=seed)
    seconds["trace"] = time.perf_counter() - t0
    pre = measure_probabilities(lm, case)
    pre_dist = neighbourhood_distributions(lm, [case])[0]
    before = {**case_scores(pre), **(generation_scores(greedy_outcomes(lm, [case], greedy_tokens)[0], case)
                                     if greedy_tokens else {})}
    templates = rome_templates(lm, hps[0])
    rows = []
    t0 = time.perf_counter()
    for hp in tqdm(hps, desc="layer sweep", unit="layer", disable=not progress):
        t = time.perf_counter()
        record = rome_edit(lm, request, hp, stats, context_templates=templates, progress=False)
        with edited(lm, [record]):
            post = measure_probabilities(lm, case)
            texts = greedy_outcomes(lm, [case], greedy_tokens)[0] if greedy_tokens else {}
            post_dist = neighbourhood_distributions(lm, [case])[0]
        row = {**case_scores(post), **generation_scores(texts, case),
               "rewrite_score": _rewrite_score(pre["rewrite"], post["rewrite"]),
               "paraphrase_score": _rewrite_score(pre["paraphrase"], post["paraphrase"]),
               "seconds": time.perf_counter() - t}
        if pre_dist.shape[0]:
            row["neighborhood_kl"] = neighbourhood_kl(pre_dist, post_dist)
        rows.append(row)
    seconds["edits"] = time.perf_counter() - t0
    return LayerSweep(case=case.to_dict(), model=lm.name, layers=layers, effect=tuple(float(x) for x in effect),
                      before=before, scores=tuple(rows),
                      settings={"samples": samples, "window": window, "noise": tr.noise.to_dict(), "seed": seed,
                                "greedy_tokens": greedy_tokens, "rome": hps[0].to_dict() | {"layer": None},
                                "statistics": "identity" if isinstance(stats, str) else "second moment",
                                "answer": tr.answer, "high_score": tr.high_score, "low_score": tr.low_score},
                      seconds=seconds)


# ---------------------------------------------------------------------------- many facts


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


def _r2(y: np.ndarray, x: np.ndarray) -> float:
    """R² of the least-squares fit of ``y`` on the columns of ``x`` (with an intercept)."""
    design = np.column_stack([np.ones(len(y)), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - (resid ** 2).sum() / total) if total > 0 else math.nan


def _statistics(effect: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """``effect`` and ``score`` are "fact layer"; the four numbers of :func:`localisation_correlation`."""
    n_layers = effect.shape[1]
    e, s = effect.ravel(), score.ravel()
    dummies = np.tile(np.eye(n_layers)[:, 1:], (effect.shape[0], 1))  # "fact·layer layer-1"
    return {"spearman": _pearson(_ranks(e), _ranks(s)),
            "within_layer_pearson": _pearson((effect - effect.mean(0)).ravel(), (score - score.mean(0)).ravel()),
            "r2_layer": _r2(s, dummies), "r2_layer_and_effect": _r2(s, np.column_stack([dummies, e]))}


def localisation_correlation(sweeps: Sequence[LayerSweep], score: str = "rewrite_score", *, n_boot: int = 1000,
                             seed: int = 0, confidence: float = 0.95) -> dict:
    """Does the trace effect predict ``score`` across (fact, layer)? Each statistic with its
    percentile-bootstrap interval over facts (all sweeps must cover the same layers)."""
    if len(sweeps) < 3:
        raise HyperParameterError(f"a correlation over facts needs at least 3 sweeps, got {len(sweeps)}")
    layers = sweeps[0].layers
    if any(s.layers != layers for s in sweeps):
        raise HyperParameterError("the sweeps cover different layers; sweep every fact over the same layers")
    if score not in SCORES:
        raise HyperParameterError(f"unknown score {score!r}; accepted: {', '.join(SCORES)}")
    effect = np.array([s.effect_at() for s in sweeps])
    value = np.array([s.column(score) for s in sweeps])
    point = _statistics(effect, value)
    rng = np.random.default_rng(seed)
    boot = [_statistics(effect[idx], value[idx]) for idx in rng.integers(0, len(sweeps), size=(n_boot, len(sweeps)))]
    alpha = (1 - confidence) / 2
    out = {"score": score, "n_facts": len(sweeps), "layers": list(layers), "n_boot": n_boot, "confidence": confidence}
    for k, v in point.items():
        vals = np.array([b[k] for b in boot], dtype=float)
        vals = vals[~np.isnan(vals)]
        lo, hi = (np.quantile(vals, [alpha, 1 - alpha]).tolist() if len(vals) else [math.nan, math.nan])
        out[k] = {"value": v, "ci": [lo, hi]}
    peaks_trace = effect.argmax(1)
    peaks_edit = value.argmax(1)
    out["same_peak_share"] = float((peaks_trace == peaks_edit).mean())
    out["mean_by_layer"] = {"effect": effect.mean(0).tolist(), score: value.mean(0).tolist()}
    return out
