"""Causal traces of a whole facts file, resumable, one fact per file.

    summary = trace_dataset(lm, "knowns.json", "out/traces", severed=("mlp", "attn"))
    grouped = load_traces("out/traces")       # {"hidden": [TraceResult, ...], "mlp": ..., ...}

Layout of ``out_dir``::

    run.json            settings of the run (model, kinds, noise, samples, window, seed, facts file)
    facts/<id>.json     {"index", "fact", "traces": {label: TraceResult dict}}   one per finished fact
    failed/<id>.json    {"index", "fact", "error"}                               one per failed fact
    log.jsonl           one line per fact attempted: id, status, wall and CPU seconds (timings live only here)

Every file is written by this process (the driver) to a temporary name and renamed, so a killed
run leaves whole files only. Every setting is checked before anything is created. ``run.json`` is
created exclusively, so of two runs started together on one directory one writes it and the other
compares with it. A restart with the same settings skips facts that have a ``facts/`` (or
``failed/``) file and continues; different settings are refused (:class:`DatasetError`) rather than
mixed. Temporary files of a killed writer are removed on restart
(:func:`tracer.files.stray_writer_dead`). The per-fact files hold no timings, so an
interrupted-and-resumed run writes the same bytes as an uninterrupted one. A fact whose tracing
raises is recorded under ``failed/`` and the run goes on.

The facts are traced through a :mod:`tracer.spread` runner: in this process on the model given,
or on a :class:`tracer.spread.RayPool` of model workers (``factscope trace-dataset --ray``), which
return each fact's traces for this process to write: the same files, no shared file system.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from .errors import DatasetError, HyperParameterError, PromptError, SubjectNotFoundError
from .files import open_append, stray_writer_dead, write_json_atomic
from .knowns import load_facts, normalize_facts
from .limits import check_count, check_seed, check_memory
from .models import LanguageModel
from .noise import resolve_noise
from .spread import Runner, as_runner
from .trace import estimate_trace, trace, trace_all
from .trace_result import KINDS, NoiseSpec, TraceResult

log = logging.getLogger(__name__)

_FORMAT = 1
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


@dataclass(frozen=True)
class DatasetTraceSettings:
    """What a dataset run computes; stored in ``run.json`` and compared on restart."""

    model: str
    kinds: tuple[str, ...]
    severed: tuple[str, ...]
    samples: int
    noise: NoiseSpec
    window: int
    seed: int
    facts_md5: str
    severed_tokens: str = "last_subject"  # the token rows of the severed traces: "last_subject" or "all"

    @property
    def labels(self) -> tuple[str, ...]:
        """Trace labels per fact: the kinds, then ``hidden-severed-<x>`` for each severed kind."""
        return self.kinds + tuple(f"hidden-severed-{s}" for s in self.severed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(format=_FORMAT, kinds=list(self.kinds), severed=list(self.severed), noise=self.noise.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetTraceSettings":
        d = {k: v for k, v in d.items() if k != "format"}
        d.setdefault("severed_tokens", "all")  # runs written before the field existed traced every token
        return cls(**{**d, "kinds": tuple(d["kinds"]), "severed": tuple(d["severed"]),
                      "noise": NoiseSpec.from_dict(d["noise"])})


@dataclass(frozen=True)
class DatasetRunSummary:
    """What one call of :func:`trace_dataset` did."""

    selected: int       # facts in scope (after ``limit``)
    already_done: int   # skipped because a facts/ or failed/ file existed
    traced: int         # finished in this call
    failed: int         # failed in this call
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def fact_file_name(known_id) -> str:
    """File stem for a fact id: the id itself when it is a safe name, else a short hash."""
    key = str(known_id)
    return key if _SAFE_ID.match(key) else "id-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _save(path: Path, data) -> None:
    """Per-fact and run files: sorted keys (same bytes on every run), flushed to disk before the rename."""
    write_json_atomic(path, data, sort_keys=True, fsync=True)


def _check_kinds(kinds: Iterable[str], severed: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    kinds, severed = tuple(kinds), tuple(severed)
    for k in kinds:
        if k not in KINDS:
            raise HyperParameterError(f"unknown kind {k!r}; kinds: {', '.join(KINDS)} (or 'all')")
    for s in severed:
        if s not in ("mlp", "attn"):
            raise HyperParameterError(f"severed must name 'mlp' or 'attn', got {s!r}")
    if not kinds and not severed:
        raise HyperParameterError("nothing to trace: pass at least one kind or severed path")
    return tuple(dict.fromkeys(kinds)), tuple(dict.fromkeys(severed))


def check_settings(*, kinds: Iterable[str] = KINDS, severed: Iterable[str] = (), samples: int = 10, window: int = 10,
                   seed: int = 1, severed_tokens: str = "last_subject", limit: int | None = None,
                   retry_failed: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Check every setting of :func:`trace_dataset` but the noise (which needs the model) before
    anything is loaded or created; returns the deduplicated kinds and severed paths."""
    kinds, severed = _check_kinds(kinds, severed)
    check_count("samples", samples)
    check_count("window", window)
    check_seed(seed)
    if severed_tokens not in ("last_subject", "all"):
        raise HyperParameterError(f"severed_tokens must be 'last_subject' or 'all', got {severed_tokens!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise HyperParameterError(f"limit must be a positive integer, got {limit!r}")
    if not isinstance(retry_failed, bool):
        raise HyperParameterError(f"retry_failed must be True or False, got {retry_failed!r}")
    return kinds, severed


def _check_memory_for_longest(lm: LanguageModel, facts: list[dict], kinds: tuple[str, ...], samples: int,
                              window: int) -> None:
    """Refuse (:class:`JobTooLargeError`) a run whose longest fact's trace cannot fit in memory,
    before anything is created; a fact that cannot be traced at all fails on its own later."""
    longest = max(facts, key=lambda f: len(f["prompt"]), default=None)
    if longest is None:
        return
    try:
        estimate = estimate_trace(lm, longest["prompt"], longest["subject"], kinds, samples=samples, window=window)
    except (PromptError, SubjectNotFoundError):
        return
    check_memory(estimate, lm.device, hint=f"lower --samples ({samples})")


def _prepare(lm: LanguageModel, noise, noise_mode: str, longest: list[dict], kinds: tuple[str, ...], samples: int,
             window: int) -> tuple[str, NoiseSpec]:
    """Where the model is: its name and the noise resolved on its weights, after the memory check."""
    spec = resolve_noise(lm, noise, noise_mode)
    _check_memory_for_longest(lm, longest, kinds, samples, window)
    return lm.name, spec


def _read_run_file(run_file: Path) -> DatasetTraceSettings:
    """The settings stored in ``run.json``; a one-line :class:`DatasetError` when it is malformed."""
    try:
        return DatasetTraceSettings.from_dict(json.loads(run_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        reason = (str(e).splitlines() or [""])[0][:200]
        raise DatasetError(f"{run_file} is unreadable ({type(e).__name__}: {reason}); use a new --out directory") from None


def _claim_dir(out_dir: Path, settings: DatasetTraceSettings) -> None:
    """Create ``out_dir/run.json`` exclusively, or check that the one there has ``settings``.

    Of two processes starting on one new directory, exactly one creates ``run.json``; the other
    reads that complete file and resumes with it when the settings match, and is refused
    (:class:`DatasetError`, naming the settings that differ) when they do not.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"--out {str(out_dir)!r} is a file; pass a directory (new, or of a run to resume)")
    run_file = out_dir / "run.json"
    try:
        write_json_atomic(run_file, settings.to_dict(), sort_keys=True, exclusive=True)
    except FileExistsError:
        stored = _read_run_file(run_file)
        if stored != settings:
            mine, theirs = settings.to_dict(), stored.to_dict()
            diff = [k for k in mine if mine[k] != theirs.get(k)]
            raise DatasetError(f"{out_dir} holds a run with different settings ({', '.join(diff)}); "
                               "resume with the same settings or use a new --out directory") from None
    for sub in ("facts", "failed"):
        (out_dir / sub).mkdir(exist_ok=True)
    for folder in (out_dir, out_dir / "facts", out_dir / "failed"):
        for stray in folder.glob(".*.tmp"):  # left by a killed writer (not by another live run)
            if stray_writer_dead(stray):
                stray.unlink(missing_ok=True)


def _trace_fact(lm: LanguageModel, fact: dict, s: DatasetTraceSettings) -> dict[str, dict]:
    """The task: every trace of one fact as JSON-ready dicts."""
    common = dict(samples=s.samples, noise=s.noise, noise_mode=s.noise.mode, window=s.window, seed=s.seed,
                  progress=False)
    results = dict(trace_all(lm, fact["prompt"], fact["subject"], kinds=s.kinds, **common)) if s.kinds else {}
    for sev in s.severed:
        results[f"hidden-severed-{sev}"] = trace(lm, fact["prompt"], fact["subject"], "hidden", severed=sev,
                                                 tokens=s.severed_tokens, **common)
    out = {}
    for label, result in results.items():
        d = result.to_dict()
        d.pop("seconds", None)  # timings go to log.jsonl so that fact files are reproducible bytes
        out[label] = d
    return out


def trace_dataset(
    model: "LanguageModel | str | Runner",
    facts: list[dict] | str | Path,
    out_dir: str | Path,
    *,
    kinds: Iterable[str] = KINDS,
    severed: Iterable[str] = (),
    samples: int = 10,
    noise: "float | str | NoiseSpec" = "3s",
    noise_mode: str = "rome",
    window: int = 10,
    seed: int = 1,
    limit: int | None = None,
    retry_failed: bool = False,
    severed_tokens: str = "last_subject",
    progress: bool = True,
) -> DatasetRunSummary:
    """Trace the first ``limit`` facts (all when None) into ``out_dir``, skipping finished ones.

    ``model`` is a model (or its name), traced in this process, or a :mod:`tracer.spread` runner
    such as a :class:`~tracer.spread.RayPool`, whose workers trace the facts while this process
    writes the files. ``kinds`` are traced with :func:`tracer.trace.trace_all`; each entry of
    ``severed`` adds a hidden-state trace with that path severed (``"mlp"``/``"attn"``, the paper's
    Figure 7), at the last subject token as in the paper (``severed_tokens="last_subject"``;
    ``"all"`` traces every token from the subject on). ``retry_failed`` traces facts recorded under
    ``failed/`` again.
    """
    kinds, severed = check_settings(kinds=kinds, severed=severed, samples=samples, window=window, seed=seed,
                                    severed_tokens=severed_tokens, limit=limit, retry_failed=retry_failed)
    runner = as_runner(model)
    if isinstance(facts, (str, Path)):
        facts_path = Path(facts)
        facts = load_facts(facts_path)
        md5 = hashlib.md5(facts_path.read_bytes()).hexdigest()
    else:
        facts = normalize_facts(list(facts))
        md5 = hashlib.md5(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    longest = [max(facts[:limit], key=lambda f: len(f["prompt"]))] if facts else []
    name, spec = runner.call(_prepare, noise, noise_mode, longest, kinds or ("hidden",), samples, window)
    settings = DatasetTraceSettings(model=name, kinds=kinds, severed=severed, samples=samples, noise=spec,
                                    window=window, seed=seed, facts_md5=md5, severed_tokens=severed_tokens)
    out_dir = Path(out_dir)
    _claim_dir(out_dir, settings)  # the first file system change of the run

    selected = list(enumerate(facts))[:limit]
    finished = {p.stem for p in (out_dir / "facts").glob("*.json")}
    failed_before = {p.stem for p in (out_dir / "failed").glob("*.json")}
    skip = finished if retry_failed else finished | failed_before
    todo = [(i, f) for i, f in selected if fact_file_name(f["known_id"]) not in skip]
    started = time.perf_counter()
    n_ok = n_failed = 0
    where = f" on {runner.workers} workers" if runner.workers > 1 else ""
    with open_append(out_dir / "log.jsonl") as log_file:
        for done in runner.map(_trace_fact, todo, shared=settings, desc=f"tracing {len(todo)} of {len(selected)} "
                               f"facts{where}", unit="fact", progress=progress):
            index, fact = done.key, facts[done.key]
            name = fact_file_name(fact["known_id"])
            if done.ok:
                n_ok += 1
                _save(out_dir / "facts" / f"{name}.json", {"index": index, "fact": fact, "traces": done.result})
                (out_dir / "failed" / f"{name}.json").unlink(missing_ok=True)
            else:
                n_failed += 1
                log.warning("fact %s failed: %s", fact["known_id"], done.error)
                _save(out_dir / "failed" / f"{name}.json", {"index": index, "fact": fact, "error": done.error})
            log_file.write(json.dumps({"id": fact["known_id"], "status": "ok" if done.ok else "failed",
                                       "seconds": round(done.seconds, 3),
                                       "cpu_seconds": round(done.cpu_seconds, 3)}) + "\n")
            log_file.flush()
    return DatasetRunSummary(selected=len(selected), already_done=len(selected) - len(todo), traced=n_ok,
                             failed=n_failed, seconds=time.perf_counter() - started)


def read_settings(out_dir: str | Path) -> DatasetTraceSettings:
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        raise DatasetError(f"{out_dir} is not a dataset-trace directory (no run.json)")
    return _read_run_file(path)


def load_traces(out_dir: str | Path) -> dict[str, list[TraceResult]]:
    """Finished traces of a run grouped by label, in the facts file's order."""
    out_dir = Path(out_dir)
    settings = read_settings(out_dir)
    records = []
    for path in (out_dir / "facts").glob("*.json"):
        records.append(json.loads(path.read_text()))
    records.sort(key=lambda r: r["index"])
    grouped: dict[str, list[TraceResult]] = {label: [] for label in settings.labels}
    for rec in records:
        for label, d in rec["traces"].items():
            grouped.setdefault(label, []).append(TraceResult.from_dict(d))
    return grouped


def load_failures(out_dir: str | Path) -> list[dict]:
    """The ``failed/`` records of a run (index, fact, error), in the facts file's order."""
    recs = [json.loads(p.read_text()) for p in (Path(out_dir) / "failed").glob("*.json")]
    return sorted(recs, key=lambda r: r["index"])
