"""The evaluation harness: edit, measure, revert, write one JSON per case, then a summary.

    summary = run_evaluation(lm, "memit", "counterfact", out_dir="out/memit", limit=200, batch_size=100)

Per batch of cases (:func:`tracer.evaluate.work.evaluate_batch`, in this process or on Ray
workers): the unedited probabilities, greedy continuations and CounterFact+ next-token
distributions ("pre"), the edit, the same for the edited model plus its sampled generations and
the neighbourhood KL ("post"), the revert. This process writes each case to
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..datapaths import WIKIPEDIA, data_file
from ..edit.zs import compute_zs
from ..errors import FactscopeError, HyperParameterError
from ..files import write_json_atomic, write_text_atomic
from ..models import LanguageModel, cache_dir
from ..spread import LocalRunner, Runner, as_runner
from .metrics import summarize
from .methods import method_spec
from .records import Case, load_cases
from .report import summary_html, summary_markdown
from .text import Tfidf
from .work import BatchJob, evaluate_batch, prepare_method

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


def run_evaluation(
    model: "LanguageModel | str | Runner",
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

    ``model`` is a model (or its name), evaluated in this process, or a :mod:`tracer.spread`
    runner such as a :class:`~tracer.spread.RayPool`: its workers run the batches (ROME and FT-L:
    one case per task; MEMIT and AlphaEdit: the z of each batch in chunks, then the batch) while
    this process writes every file, so a run resumes with or without Ray.
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
    runner = as_runner(model)
    batched = method_spec(method).batched
    if batch_size is None:  # MEMIT, AlphaEdit: all cases in one batch
        batch_size = max(1, len(cases)) if batched else 1
    if batch_size < 1:
        raise HyperParameterError(f"batch_size must be >= 1, got {batch_size}")
    if greedy_tokens < 0:
        raise HyperParameterError(f"greedy_tokens must be >= 0 (0: no greedy continuations), got {greedy_tokens}")
    if method in ("rome", "ft-l") and batch_size != 1:
        raise HyperParameterError(f"{method} edits one fact at a time; use --batch-size 1 (MEMIT takes batches)")
    prepared = prepare_method(runner, method, method_options, progress=progress)
    gen = generation and any(c.generation_prompts for c in cases)
    settings = EvalSettings(model=prepared.model, method=method, dataset=dataset, batch_size=batch_size,
                            method_settings=prepared.settings, generation=gen, generation_prompts=generation_prompts,
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
    if gen and tfidf is None and any(c.attribute_prompts for c in cases):
        tfidf = Tfidf.cached(data_file(WIKIPEDIA), cache_dir() / "tfidf")
    job = BatchJob(prepared, settings.key(), greedy_tokens=greedy_tokens, generation=gen,
                   generation_prompts=generation_prompts, generation_length=generation_length, seed=seed, tfidf=tfidf,
                   progress=progress and isinstance(runner, LocalRunner))
    todo = [c for c in cases if not (case_dir / f"{c.case_id}.json").is_file()]
    log.info("%s on %s: %d cases, %d already done", method, dataset, len(cases), len(cases) - len(todo))
    step = 1 if method in ("rome", "ft-l") else 50 if method == "none" else batch_size
    batches = [todo[s:s + step] for s in range(0, len(todo), step)]
    where = f" on {runner.workers} workers" if runner.workers > 1 else ""

    def save(done) -> None:
        for result in done.result:
            _write_json(case_dir / f"{result['case_id']}.json", result)

    if not batched:  # independent tasks: spread over the workers, written as they finish
        for done in runner.map(evaluate_batch, [(n, (b, None)) for n, b in enumerate(batches)], shared=job,
                               desc=f"evaluate {method}{where}", unit="case", sizes=[len(b) for b in batches],
                               progress=progress, errors="raise"):
            save(done)
    for n, batch in enumerate(batches if batched else ()):  # z spread over the workers, then the batch on one
        zs = compute_zs(runner, batch, prepared.hparams, prepared.parts["templates"], progress=progress,
                        checkpoint_dir=out / "z")
        for done in runner.map(evaluate_batch, [(n, (batch, zs))], shared=job, desc=f"evaluate {method}",
                               unit="case", sizes=[len(batch)], progress=progress, errors="raise"):
            save(done)
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
