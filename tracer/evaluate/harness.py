"""The evaluation harness: edit, measure, revert, write one JSON per case, then a summary.

    summary = run_evaluation(lm, "memit", "counterfact", out_dir="out/memit", limit=200, batch_size=100)

Per batch of cases: the unedited probabilities, greedy continuations and CounterFact+
next-token distributions ("pre"), the edit, the same for the edited model plus its sampled
generations and the neighbourhood KL ("post"), the revert. Each case is written to
``out_dir/cases/<case_id>.json`` atomically with the run's settings; a second run with the same
settings skips the cases already there (resumable), one with other settings refuses the
directory. ``summary.json``, ``summary.md`` and ``summary.html`` are rewritten at the end.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..datapaths import WIKIPEDIA, data_file
from ..errors import FactscopeError, HyperParameterError
from ..files import write_json_atomic, write_text_atomic
from ..models import LanguageModel, as_model, cache_dir
from ..generation import sample
from .metrics import (case_scores, generation_scores, greedy_outcomes, measure_probabilities, neighbourhood_distributions,
                      neighbourhood_kl, reference_text, summarize)
from .methods import make_method, method_spec
from .records import Case, load_cases
from .report import summary_html, summary_markdown
from .text import Tfidf, mean_ngram_entropy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """What makes two runs comparable (stored with every case; a resumed run must match)."""

    model: str
    method: str
    dataset: str
    batch_size: int
    method_settings: dict
    generation: bool
    generation_prompts: int | None
    generation_length: int
    seed: int
    greedy_tokens: int = 0  # new tokens of the greedy continuations (ES-g, PS-g); 0: none (runs before they existed)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1, default=str)


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


def run_evaluation(
    model: "LanguageModel | str",
    method: str,
    dataset: str,
    out_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int | None = 1,
    data_path: str | os.PathLike | None = None,
    generation: bool = True,
    generation_prompts: int | None = None,
    generation_length: int = 100,
    tfidf: Tfidf | None = None,
    seed: int = 0,
    method_options: dict | None = None,
    progress: bool = True,
    cases: Sequence[Case] | None = None,
    greedy_tokens: int = 16,
) -> dict:
    """Evaluate ``method`` on ``dataset`` and write per-case JSON and the summary; returns the summary.

    ``batch_size`` is how many cases one edit holds (MEMIT: the batch, ``None`` = all cases; ROME and FT-L use 1, as in
    the papers; ``none`` ignores it). Generations (fluency, consistency) need the dataset's
    generation prompts (full CounterFact only); ``generation_prompts`` caps how many per case.
    ``cases`` are the records to evaluate when the caller has read them already (by
    :func:`~tracer.evaluate.records.load_cases`); by default they are read from ``data_path``.
    ``greedy_tokens`` is the length of the greedy continuations behind ES-g and PS-g (0: none);
    CounterFact+'s NS+ and NKL are always measured on CounterFact cases.
    """
    if cases is None:  # read (and check) the records before a model is loaded
        cases = load_cases(dataset, data_path, limit=limit)
    lm = as_model(model)
    if batch_size is None:  # MEMIT, AlphaEdit: all cases in one batch
        batch_size = max(1, len(cases)) if method_spec(method).batched else 1
    if batch_size < 1:
        raise HyperParameterError(f"batch_size must be >= 1, got {batch_size}")
    if greedy_tokens < 0:
        raise HyperParameterError(f"greedy_tokens must be >= 0 (0: no greedy continuations), got {greedy_tokens}")
    if method in ("rome", "ft-l") and batch_size != 1:
        raise HyperParameterError(f"{method} edits one fact at a time; use --batch-size 1 (MEMIT takes batches)")
    editor = make_method(method, lm, progress=progress, **(method_options or {}))
    gen = generation and any(c.generation_prompts for c in cases)
    settings = EvalSettings(model=lm.name, method=method, dataset=dataset, batch_size=batch_size,
                            method_settings=editor.settings(), generation=gen, generation_prompts=generation_prompts,
                            generation_length=generation_length, seed=seed, greedy_tokens=greedy_tokens)
    out = Path(out_dir)
    case_dir = out / "cases"
    settings_file = out / "settings.json"
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        if old.get("key") != settings.key():
            raise FactscopeError(f"{out} holds a run with other settings ({old.get('settings', {}).get('method')!r}, key "
                                 f"{old.get('key')}); pass a new --out directory or delete it")
    _write_json(settings_file, {"key": settings.key(), "settings": settings.to_dict()})
    if hasattr(editor, "checkpoint_dir"):
        editor.checkpoint_dir = out / "z"
    if gen and tfidf is None and any(c.attribute_prompts for c in cases):
        tfidf = Tfidf.cached(data_file(WIKIPEDIA), cache_dir() / "tfidf")
    todo = [c for c in cases if not (case_dir / f"{c.case_id}.json").is_file()]
    log.info("%s on %s: %d cases, %d already done", method, dataset, len(cases), len(cases) - len(todo))
    step = 1 if method in ("rome", "ft-l") else 50 if method == "none" else batch_size
    bar = tqdm(total=len(todo), desc=f"evaluate {method}", unit="case", disable=not progress)
    started = time.perf_counter()
    try:
        for s in range(0, len(todo), step):
            batch = todo[s:s + step]
            t0 = time.perf_counter()
            pre = [measure_probabilities(lm, c) for c in batch]
            pre_text = greedy_outcomes(lm, batch, greedy_tokens) if greedy_tokens else [{} for _ in batch]
            pre_dist = None if method == "none" else neighbourhood_distributions(lm, batch)
            t1 = time.perf_counter()
            handle = editor.apply(lm, batch)
            t2 = time.perf_counter()
            try:
                if method == "none":
                    post_text, post_dist = pre_text, pre_dist
                else:
                    post_text = greedy_outcomes(lm, batch, greedy_tokens) if greedy_tokens else [{} for _ in batch]
                    post_dist = neighbourhood_distributions(lm, batch)
                for i, (c, p) in enumerate(zip(batch, pre)):
                    post = p if method == "none" else measure_probabilities(lm, c)
                    g = _generation_metrics(lm, c, tfidf, generation_prompts, generation_length, seed) if gen else {}
                    kl: dict = {}
                    if c.target_true and c.neighborhood_prompts:  # CounterFact+: 0 before the edit, by definition
                        kl = {"pre": 0.0, "post": 0.0 if pre_dist is None else neighbourhood_kl(pre_dist[i], post_dist[i])}
                    _write_json(case_dir / f"{c.case_id}.json", {
                        "case_id": c.case_id, "settings_key": settings.key(), "case": c.to_dict(),
                        "pre": _phase(p, pre_text[i], c, kl.get("pre")),
                        "post": {**_phase(post, post_text[i], c, kl.get("post")), **({"generation": g} if g else {})},
                        "seconds": {"measure_pre": (t1 - t0) / len(batch), "edit": (t2 - t1) / len(batch),
                                    "batch_edit": t2 - t1, "batch_size": len(batch)},
                    })
                    bar.update(1)
            finally:
                editor.revert(lm, handle)
            done = s + len(batch)
            rate = done / (time.perf_counter() - started)
            bar.set_postfix_str(f"{rate:.3f} cases/s, ETA {(len(todo) - done) / rate:.0f} s")
    finally:
        bar.close()
    return write_summary(out, settings=settings, cases=cases)


def load_case_results(out_dir: str | os.PathLike, case_ids: Sequence[int] | None = None) -> list[dict]:
    case_dir = Path(out_dir) / "cases"
    files = sorted(case_dir.glob("*.json"), key=lambda p: int(p.stem)) if case_ids is None else \
        [case_dir / f"{i}.json" for i in case_ids if (case_dir / f"{i}.json").is_file()]
    return [json.loads(p.read_text()) for p in files]


def summarize_results(results: Sequence[dict]) -> dict:
    """``{"pre": summary, "post": summary}`` over per-case results (see :func:`metrics.summarize`)."""
    out = {}
    for phase in ("pre", "post"):
        rows = []
        for r in results:
            row = dict(r[phase]["scores"])
            g = r[phase].get("generation") or {}
            for k in ("ngram_entropy", "reference_score"):
                if k in g:
                    row[k] = g[k]
            rows.append(row)
        out[phase] = summarize(rows)
    edit_s = [r["seconds"]["edit"] for r in results]
    out["seconds_per_edit"] = sum(edit_s) / len(edit_s) if edit_s else None
    return out


def build_summary(out_dir: str | os.PathLike, *, settings: EvalSettings | None = None,
                  cases: Sequence[Case] | None = None) -> dict:
    """The summary of the case files in ``out_dir`` so far (a finished or a running evaluation)."""
    out = Path(out_dir)
    if settings is None:
        settings_file = out / "settings.json"
        if not settings_file.is_file():
            raise FactscopeError(f"{out} is not a `factscope evaluate` directory (no settings.json)")
        settings = EvalSettings(**json.loads(settings_file.read_text())["settings"])
    results = load_case_results(out, [c.case_id for c in cases] if cases is not None else None)
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "n_cases": len(results),
        **summarize_results(results),
    }


def write_summary(out_dir: str | os.PathLike, *, settings: EvalSettings | None = None, cases: Sequence[Case] | None = None) -> dict:
    """(Re)write ``summary.json`` / ``.md`` / ``.html`` from the case files in ``out_dir``."""
    out = Path(out_dir)
    summary = build_summary(out, settings=settings, cases=cases)
    _write_json(out / "summary.json", summary)
    method, dataset = summary["settings"]["method"], summary["settings"]["dataset"]
    write_text_atomic(out / "summary.md", summary_markdown([summary]))
    write_text_atomic(out / "summary.html", summary_html([summary], title=f"factscope evaluation: {method} on {dataset}"))
    return summary
