"""One batch of an evaluation, where the model is: the task the harness runs in this process or on Ray workers.

    method = prepare_method(runner, "memit", options, progress=True)    # C read once (through the pool), shipped
    job = BatchJob(method, settings_key, greedy_tokens=16, ...)
    for done in runner.map(evaluate_batch, [(0, (cases, zs))], shared=job, errors="raise"):
        write(done.result)                                              # one dict per case: the case file

:func:`evaluate_batch` measures the unedited model (teacher-forced probabilities, greedy
continuations, CounterFact+ next-token distributions), edits it, measures again (with sampled
generations and the neighbourhood KL), reverts the edit and returns each case's file contents;
the model is left as it was found. The caller (the driver) writes every file.

:func:`prepare_method` resolves on the driver what every task needs so that no worker reads it
again: the method's hyper-parameters and key statistics C (read through the runner's workers by
:class:`~tracer.stats.StatsCache`, so the cache is written here), then on one worker the
context templates and AlphaEdit's null-space projectors (:meth:`Method.parts`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..edit.hparams import MemitHyperParams, ROMEHyperParams
from ..edit.zs import ZResult
from ..generation import sample
from ..models import LanguageModel, cache_dir
from ..progress import tqdm
from ..spread import Runner
from ..stats import StatsCache
from .methods import make_method, method_hparams
from .metrics import (case_scores, generation_scores, greedy_outcomes, measure_probabilities, neighbourhood_distributions,
                      neighbourhood_kl, reference_text)
from .records import Case
from .text import Tfidf, mean_ngram_entropy


@dataclass(frozen=True)
class PreparedMethod:
    """A method resolved on the unedited model: rebuilt on any copy of it by :meth:`build`."""

    name: str
    model: str               # the model's name, as the workers loaded it
    hparams: Any             # None for ``none``
    options: dict            # make_method's options (layer, layers, overrides; stats resolved)
    parts: dict              # Method.parts: C, templates, projectors
    settings: dict           # Method.settings(): what the run's settings key holds

    def build(self, lm: LanguageModel, progress: bool = False):
        return make_method(self.name, lm, progress=progress, parts=self.parts, **self.options)


def _statistics_for(runner: Runner, hp: Any, stats: Any, progress: bool) -> Any:
    """C of the method's layers as :class:`~tracer.stats.KeyStatistics` read through ``runner`` (each
    layer once, its corpus parts spread over the workers), or ``stats`` as given when there is
    nothing to read (C = I, ready statistics, methods without C)."""
    if not (stats is None or isinstance(stats, StatsCache)):
        return stats
    cache = stats if stats is not None else StatsCache(cache_dir() / "stats")
    if isinstance(hp, MemitHyperParams) and hp.mom2_n_tokens:
        return {layer: cache.get(runner, layer, hp.mom2_n_tokens, progress=progress) for layer in hp.layers}
    if isinstance(hp, ROMEHyperParams) and hp.stats_tokens:
        return cache.get(runner, hp.layer, hp.stats_tokens, chunk_tokens=hp.stats_chunk_tokens, progress=progress)
    return stats


def _prepare(lm: LanguageModel, name: str, options: dict) -> PreparedMethod:
    method = make_method(name, lm, **options)
    rest = {k: v for k, v in options.items() if k != "stats"}  # C travels once, in the parts
    return PreparedMethod(name, lm.name, getattr(method, "hp", None), rest, method.parts(lm), method.settings())


def prepare_method(runner: Runner, name: str, options: dict | None = None, *, progress: bool = True) -> PreparedMethod:
    """Method ``name`` with ``options`` (those of :func:`~tracer.evaluate.methods.make_method`)
    resolved once for every task of a run (see the module docstring)."""
    options = dict(options or {})
    hp = runner.call(_hparams, name, options)
    stats = _statistics_for(runner, hp, options.get("stats"), progress)
    if stats is not None:
        options["stats"] = stats
    return runner.call(_prepare, name, options)


def _hparams(lm: LanguageModel, name: str, options: dict) -> Any:
    return method_hparams(lm, name, **options)


@dataclass(frozen=True)
class BatchJob:
    """What every task of one evaluation shares (shipped once to each worker)."""

    method: PreparedMethod
    settings_key: str
    greedy_tokens: int
    generation: bool
    generation_prompts: int | None
    generation_length: int
    seed: int
    tfidf: Tfidf | None
    progress: bool = False  # a bar over a batch's cases (in this process; a Ray worker has no screen)


def _generation_metrics(lm: LanguageModel, case: Case, tfidf: Tfidf | None, n_prompts: int | None, length: int,
                        seed: int) -> dict:
    prompts = list(case.generation_prompts[:n_prompts] if n_prompts else case.generation_prompts)
    if not prompts:
        return {}
    texts = sample(lm, prompts, max_length=length, top_k=5, seed=seed + case.case_id)
    out = {"texts": texts, "ngram_entropy": mean_ngram_entropy(texts)}
    if tfidf is not None and case.attribute_prompts:
        out["reference_score"] = tfidf.similarity(" ".join(texts), reference_text(case))
    return out


def _phase(probs: dict, texts: dict, case: Case, kl: float | None) -> dict:
    """One phase of a case file: teacher-forced probabilities, greedy continuations, their scores."""
    scores = {**case_scores(probs), **generation_scores(texts, case)}
    if kl is not None:
        scores["neighborhood_kl"] = kl
    return {"probs": probs, "scores": scores, **({"greedy": texts} if texts else {})}


def evaluate_batch(lm: LanguageModel, payload: tuple[Sequence[Case], ZResult | None], job: BatchJob) -> list[dict]:
    """The task: the case files of one batch (``payload`` = its cases and, for MEMIT and AlphaEdit,
    their z computed already, or None), edited as one and reverted; the model is left as found."""
    batch, zs = payload
    method = job.method.name
    editor = job.method.build(lm)
    greedy = job.greedy_tokens
    t0 = time.perf_counter()
    bars = job.progress and len(batch) > 1  # a MEMIT batch of thousands is one task: show its steps
    pre = [measure_probabilities(lm, c) for c in tqdm(batch, desc="measuring before", unit="case", leave=False,
                                                      disable=not bars)]
    pre_text = greedy_outcomes(lm, batch, greedy) if greedy else [{} for _ in batch]
    pre_dist = None if method == "none" else neighbourhood_distributions(lm, batch)
    t1 = time.perf_counter()
    handle = editor.apply(lm, batch) if zs is None else editor.apply(lm, batch, zs=zs)
    t2 = time.perf_counter()
    edit_s = t2 - t1 + (zs.seconds if zs is not None else 0.0)  # z spread over workers: their wall time too
    out = []
    try:
        if method == "none":
            post_text, post_dist = pre_text, pre_dist
        else:
            post_text = greedy_outcomes(lm, batch, greedy) if greedy else [{} for _ in batch]
            post_dist = neighbourhood_distributions(lm, batch)
        for i, (c, p) in enumerate(tqdm(list(zip(batch, pre)), desc="measuring after", unit="case", leave=False,
                                        disable=not bars)):
            post = p if method == "none" else measure_probabilities(lm, c)
            g = (_generation_metrics(lm, c, job.tfidf, job.generation_prompts, job.generation_length, job.seed)
                 if job.generation else {})
            kl: dict = {}
            if c.target_true and c.neighborhood_prompts:  # CounterFact+: 0 before the edit, by definition
                kl = {"pre": 0.0, "post": 0.0 if pre_dist is None else neighbourhood_kl(pre_dist[i], post_dist[i])}
            out.append({
                "case_id": c.case_id, "settings_key": job.settings_key, "case": c.to_dict(),
                "pre": _phase(p, pre_text[i], c, kl.get("pre")),
                "post": {**_phase(post, post_text[i], c, kl.get("post")), **({"generation": g} if g else {})},
                "seconds": {"measure_pre": (t1 - t0) / len(batch), "edit": edit_s / len(batch),
                            "batch_edit": edit_s, "batch_size": len(batch)},
            })
    finally:
        editor.revert(lm, handle)
    return out
