"""The papers' metrics: per-case measurements and the summary over cases.

CounterFact (ROME, Meng et al. 2022, and MEMIT, Meng et al. 2023; definitions from ROME's
``experiments/summarize.py``). P(o) is the per-token geometric mean probability of the whole
target o, exp(-mean token NLL), as ROME's ``test_batch_prediction`` computes it.

=================  =========================================================================
Efficacy ES / EM   rewrite prompt: mean[P(new) > P(true)] / mean[P(new) - P(true)]
Generalization     paraphrase prompts: PS = mean[P(new) > P(true)], PM = mean[P(new) - P(true)]
Specificity        neighbourhood prompts: NS = mean[P(true) > P(new)], NM = mean[P(true) - P(new)]
Score S            harmonic mean of ES, PS, NS
Fluency GE         weighted bi-/tri-gram entropy of generations (:func:`text.ngram_entropy`)
Consistency RS     TF-IDF cosine of generations vs reference texts about the new object
=================  =========================================================================

Each is first averaged over a case's prompts, then over cases; reported × 100 with the standard
deviation over cases, as in the papers. zsRE (MEMIT's Table 1): Efficacy, Paraphrase and
Specificity are token-level top-1 accuracies of the target under teacher forcing.
"""
from __future__ import annotations

import math
from statistics import mean, pstdev
from typing import Sequence

from ..models import LanguageModel
from .records import Case
from ..scoring import score_targets

GROUPS = ("rewrite", "paraphrase", "neighborhood")


def measure_probabilities(lm: LanguageModel, case: Case, *, batch_size: int = 64) -> dict:
    """Teacher-forced scores of a case's prompts: one forward per ``batch_size`` pairs.

    Returns ``{group: [{"nll_new", "nll_true", "acc_new", "acc_true"}, ...]}`` for CounterFact
    cases and ``{group: [{"acc", "nll"}, ...]}`` (the group's own target) for zsRE cases.
    """
    prompts = {
        "rewrite": [case.rewrite_prompt],
        "paraphrase": list(case.paraphrase_prompts),
        "neighborhood": list(case.neighborhood_prompts),
    }
    pairs: list[tuple[str, str]] = []
    index: list[tuple[str, str]] = []
    if case.target_true:
        for g in GROUPS:
            for p in prompts[g]:
                pairs += [(p, case.target_new), (p, case.target_true)]
                index += [(g, "pair")]
    else:  # zsRE: rewrite/paraphrase score the new target, neighbourhood its own answer
        for g in GROUPS:
            targets = case.specificity_targets if g == "neighborhood" else [case.target_new] * len(prompts[g])
            for p, t in zip(prompts[g], targets):
                pairs.append((p, t))
                index.append((g, "single"))
    scores = score_targets(lm, pairs, batch_size=batch_size)
    out: dict[str, list[dict]] = {g: [] for g in GROUPS}
    k = 0
    for g, kind in index:
        if kind == "pair":
            new, true = scores[k], scores[k + 1]
            out[g].append({"nll_new": new.nll, "nll_true": true.nll, "acc_new": new.accuracy, "acc_true": true.accuracy})
            k += 2
        else:
            out[g].append({"nll": scores[k].nll, "acc": scores[k].accuracy})
            k += 1
    return out


def case_scores(probs: dict) -> dict[str, float]:
    """Per-case success / magnitude (CounterFact) or accuracy (zsRE) from :func:`measure_probabilities`."""
    res: dict[str, float] = {}
    for g in GROUPS:
        rows = probs.get(g) or []
        if not rows:
            continue
        if "nll_new" in rows[0]:
            sign = -1 if g == "neighborhood" else 1
            res[f"{g}_success"] = mean(float(sign * (r["nll_true"] - r["nll_new"]) > 0) for r in rows)
            res[f"{g}_diff"] = mean(sign * (math.exp(-r["nll_new"]) - math.exp(-r["nll_true"])) for r in rows)
        else:
            res[f"{g}_acc"] = mean(r["acc"] for r in rows)
    return res


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (scipy's ``hmean`` convention for the score S)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


#: summary rows: (paper name, per-case key)
COUNTERFACT_COLUMNS = (
    ("ES", "rewrite_success"), ("EM", "rewrite_diff"),
    ("PS", "paraphrase_success"), ("PM", "paraphrase_diff"),
    ("NS", "neighborhood_success"), ("NM", "neighborhood_diff"),
    ("GE", "ngram_entropy"), ("RS", "reference_score"),
)
ZSRE_COLUMNS = (("Efficacy", "rewrite_acc"), ("Paraphrase", "paraphrase_acc"), ("Specificity", "neighborhood_acc"))


def summarize(per_case: Sequence[dict[str, float]]) -> dict[str, dict[str, float] | int]:
    """Mean and std over cases, × 100, named as in the papers; adds ``S`` for CounterFact.

    ``per_case`` holds :func:`case_scores` dicts (plus ``ngram_entropy`` / ``reference_score``
    where generations were measured). Returns ``{name: {"mean", "std", "n"}}`` and ``"n"``.
    """
    out: dict = {"n": len(per_case)}
    if not per_case:
        return out
    columns = COUNTERFACT_COLUMNS if any("rewrite_success" in c for c in per_case) else ZSRE_COLUMNS
    for name, key in columns:
        vals = [c[key] for c in per_case if key in c and c[key] is not None]
        if vals:
            out[name] = {"mean": 100 * mean(vals), "std": 100 * pstdev(vals), "n": len(vals)}
    if all(k in out for k in ("ES", "PS", "NS")):
        out["S"] = {"mean": harmonic_mean([out[k]["mean"] for k in ("ES", "PS", "NS")]), "std": None, "n": len(per_case)}
    return out


def reference_text(case: Case) -> str:
    """Reference text about the new object for the consistency metric.

    ROME compares generations with Wikipedia snippets about other subjects that share the new
    object (its ``attribute_snippets.json``, not shipped here). We use the case's own
    ``attribute_prompts`` — prompts about other subjects whose true object is the new target —
    each completed with the new target, e.g. "Xbox is a product of Microsoft".
    """
    return " ".join(f"{p} {case.target_new}." for p in case.attribute_prompts)


