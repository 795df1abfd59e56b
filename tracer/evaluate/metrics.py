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

Beyond teacher forcing (:func:`greedy_outcomes`, :func:`neighbourhood_kl`):

=================  =========================================================================
ES-g / PS-g        the greedy continuation (``max_new_tokens``) of the rewrite / each paraphrase
                   prompt names the new object and not the true one (:func:`generation_success`)
NS+ / NM+          NS / NM on CounterFact+'s prompts: "{rewrite prompt} {new}. " + neighbourhood
                   prompt (Hoelscher-Obermaier et al. 2023, :func:`plus_prompts`)
NKL                KL(P_unedited ‖ P_edited) of the next-token distribution after each
                   CounterFact+ prompt, in nats (their NKL without the 1/vocabulary factor)
=================  =========================================================================

Each is first averaged over a case's prompts, then over cases; reported × 100 (NKL in nats) with
the standard deviation over cases, as in the papers. zsRE (MEMIT's Table 1): Efficacy, Paraphrase and
Specificity are token-level top-1 accuracies of the target under teacher forcing.
"""
from __future__ import annotations

import math
import re
from statistics import mean, pstdev
from typing import Sequence

import torch

from ..generation import greedy
from ..limits import Estimate, ModelShape, check_memory
from ..models import LanguageModel
from ..scoring import next_token_logprobs, score_targets
from ..targets import spaced
from .records import Case

GROUPS = ("rewrite", "paraphrase", "neighborhood", "neighborhood_plus")


def plus_prompts(case: Case) -> list[str]:
    """CounterFact+'s neighbourhood prompts: the edit stated, then each neighbourhood prompt
    (``"Ferrari F40, developed by Microsoft. Windows 95 was a product of"``); none for zsRE."""
    if not case.target_true:
        return []
    return [f"{case.rewrite_prompt}{spaced(case.target_new)}. {p}" for p in case.neighborhood_prompts]


def measure_probabilities(lm: LanguageModel, case: Case, *, batch_size: int = 64) -> dict:
    """Teacher-forced scores of a case's prompts: one forward per ``batch_size`` pairs.

    Returns ``{group: [{"nll_new", "nll_true", "acc_new", "acc_true"}, ...]}`` for CounterFact
    cases and ``{group: [{"acc", "nll"}, ...]}`` (the group's own target) for zsRE cases.
    """
    prompts = {
        "rewrite": [case.rewrite_prompt],
        "paraphrase": list(case.paraphrase_prompts),
        "neighborhood": list(case.neighborhood_prompts),
        "neighborhood_plus": plus_prompts(case),
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
            targets = case.specificity_targets if g.startswith("neighborhood") else [case.target_new] * len(prompts[g])
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
            sign = -1 if g.startswith("neighborhood") else 1
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
    ("ES-g", "rewrite_gen_success"), ("PS-g", "paraphrase_gen_success"),
    ("NS+", "neighborhood_plus_success"), ("NM+", "neighborhood_plus_diff"), ("NKL", "neighborhood_kl"),
)
#: columns reported as measured, not × 100
UNSCALED = frozenset({"NKL"})
ZSRE_COLUMNS = (("Efficacy", "rewrite_acc"), ("Paraphrase", "paraphrase_acc"), ("Specificity", "neighborhood_acc"))


def summarize(per_case: Sequence[dict[str, float]]) -> dict[str, dict[str, float] | int]:
    """Mean and std over cases, × 100 (:data:`UNSCALED` as measured), named as in the papers; adds
    ``S`` for CounterFact.

    ``per_case`` holds :func:`case_scores` dicts (plus ``ngram_entropy`` / ``reference_score``
    where generations were measured, :func:`generation_scores` and ``neighborhood_kl``). Returns ``{name: {"mean", "std", "n"}}`` and ``"n"``.
    """
    out: dict = {"n": len(per_case)}
    if not per_case:
        return out
    columns = COUNTERFACT_COLUMNS if any("rewrite_success" in c for c in per_case) else ZSRE_COLUMNS
    for name, key in columns:
        vals = [c[key] for c in per_case if key in c and c[key] is not None]
        if vals:
            k = 1 if name in UNSCALED else 100
            out[name] = {"mean": k * mean(vals), "std": k * pstdev(vals), "n": len(vals)}
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




# ---------------------------------------------------------------------------- beyond teacher forcing


def mentions(text: str, obj: str) -> bool:
    """Whether ``obj`` occurs in ``text`` as a whole word or phrase, ignoring case."""
    obj = obj.strip()
    return bool(obj) and re.search(rf"(?<!\w){re.escape(obj.casefold())}(?!\w)", text.casefold()) is not None


def generation_success(text: str, target_new: str, target_true: str) -> bool:
    """A continuation writes the edit when it names the new object and not the true one."""
    return mentions(text, target_new) and not mentions(text, target_true)


def greedy_outcomes(lm: LanguageModel, cases: Sequence[Case], max_new_tokens: int = 16) -> list[dict]:
    """Greedy continuations of each CounterFact case's rewrite and paraphrase prompts, all cases in
    shared batches: ``[{"rewrite": [text], "paraphrase": [text, ...]}, ...]`` (``{}`` for zsRE cases)."""
    prompts: list[str] = []
    spans = []
    for c in cases:
        groups = {"rewrite": [c.rewrite_prompt], "paraphrase": list(c.paraphrase_prompts)} if c.target_true else {}
        spans.append({g: (len(prompts), len(prompts) + len(ps)) for g, ps in groups.items() if ps})
        prompts += [p for ps in groups.values() for p in ps]
    texts = greedy(lm, prompts, max_new_tokens) if prompts else []
    return [{g: texts[a:b] for g, (a, b) in span.items()} for span in spans]


def generation_scores(texts: dict, case: Case) -> dict[str, float]:
    """``rewrite_gen_success`` / ``paraphrase_gen_success``: the share of a case's continuations
    (:func:`greedy_outcomes`) that pass :func:`generation_success`."""
    return {f"{g}_gen_success": mean(float(generation_success(t, case.target_new, case.target_true)) for t in ts)
            for g, ts in texts.items() if ts}


def neighbourhood_distributions(lm: LanguageModel, cases: Sequence[Case]) -> list[torch.Tensor]:
    """Each case's next-token log-distributions after its :func:`plus_prompts`, ``"prompt vocab"``
    (float32, CPU); refused before any pass when the batch's would not fit in memory."""
    counts = [len(plus_prompts(c)) for c in cases]
    need = sum(counts) * ModelShape.of(lm).vocab * 4
    check_memory(Estimate("the unedited next-token distributions of this batch's CounterFact+ prompts", need,
                          (("distributions", need),)), "cpu", hint="evaluate fewer cases per batch (--batch-size)")
    logp = next_token_logprobs(lm, [p for c in cases for p in plus_prompts(c)])
    return list(torch.split(logp, counts)) if counts else []


def neighbourhood_kl(pre: torch.Tensor, post: torch.Tensor) -> float:
    """Mean over prompts of KL(pre ‖ post) in nats, from log-distributions ``"prompt vocab"``."""
    if pre.shape[0] == 0:
        return float("nan")
    kl = (pre.exp() * (pre - post)).sum(-1).clamp(min=0)  # float32 rounding can dip a zero below 0
    return float(kl.mean())
