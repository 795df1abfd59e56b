"""Average causal effects over many traces, bucketed by token role as in the ROME paper.

    avg = aggregate(traces)                     # list[TraceResult] of one kind
    avg.indirect[BUCKETS.index("last_subject")]  # average indirect effect per layer
    avg.peak("last_subject")                    # (layer, effect)

Traces have different lengths, so each fact's positions are put into six buckets (the paper's
Figure 2/3 rows, ROME's ``average_causal_effects.ipynb``)::

    first_subject   token s                   (subject span [s, e))
    middle_subject  tokens s+1 .. e-2
    last_subject    token e-1                 (a one-token subject is first AND last)
    first_after     token e                   (absent when the subject ends the prompt)
    further         tokens e+1 .. n-2
    last            token n-1                 (can also be last_subject or first_after)

Tokens before the subject belong to no bucket. A token in two buckets counts in both, as in ROME.
Rows that were not traced (NaN, e.g. ``tokens="last_subject"``) count in no bucket; a bucket with
no traced cell averages to NaN.
Within a bucket every (fact, token) cell has equal weight (ROME pools middle and further tokens
the same way). Per cell the indirect effect is ``score - low_score`` of its fact and the total
effect ``high_score - low_score``; the bucket averages are means over cells. (ROME subtracts the
mean low score over facts instead, which is the same number for the one-token buckets.)

Confidence intervals: percentile bootstrap over *facts* (the independent unit): ``n_boot``
resamples of the facts with replacement, drawn with ``numpy.random.default_rng(seed)``.

Two back-ends compute the same numbers bit for bit: numba-jitted loops over the flat ragged
arrays (default) and a vectorised NumPy path (the benchmark baseline). Both accumulate every
sum in the same order (token by token within a fact, fact by fact within a resample).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import numba
import numpy as np

from .errors import DatasetError, HyperParameterError
from .limits import Estimate, check_count, check_memory, check_seed
from .markdown import cell as md_cell
from .trace_result import TraceResult

BUCKETS: tuple[str, ...] = ("first_subject", "middle_subject", "last_subject", "first_after", "further", "last")
BUCKET_LABELS: dict[str, str] = {
    "first_subject": "First subject token", "middle_subject": "Middle subject tokens",
    "last_subject": "Last subject token", "first_after": "First subsequent token",
    "further": "Further tokens", "last": "Last token",
}
N_BUCKETS = len(BUCKETS)
Backend = Literal["numba", "numpy"]
_CHUNK = 32  # bootstrap resamples per kernel call (bounds the index array to 32 x n_facts)


@dataclass(frozen=True)
class RaggedTraces:
    """Traces of one kind as flat arrays.

    ``scores`` is ``"(fact token) layer"``: fact ``f``'s rows are ``offsets[f]:offsets[f+1]``.
    ``subject_start``/``subject_end`` are per fact, ``[start, end)`` in that fact's positions.
    """

    scores: np.ndarray         # float64 [total_tokens, layers]
    offsets: np.ndarray        # int64 [facts + 1]
    subject_start: np.ndarray  # int64 [facts]
    subject_end: np.ndarray    # int64 [facts]
    low: np.ndarray            # float64 [facts]
    high: np.ndarray           # float64 [facts]

    @property
    def n_facts(self) -> int:
        return len(self.low)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    @classmethod
    def from_traces(cls, traces: Sequence[TraceResult]) -> "RaggedTraces":
        if not traces:
            raise DatasetError("no traces to aggregate")
        layers = {t.scores.shape[1] for t in traces}
        if len(layers) != 1:
            raise DatasetError(f"traces have different layer counts {sorted(layers)}; aggregate one model at a time")
        lengths = np.array([t.scores.shape[0] for t in traces], dtype=np.int64)
        return cls.build(
            scores=np.concatenate([np.asarray(t.scores, dtype=np.float64) for t in traces]),
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            subject_start=np.array([t.subject_span[0] for t in traces], dtype=np.int64),
            subject_end=np.array([t.subject_span[1] for t in traces], dtype=np.int64),
            low=np.array([t.low_score for t in traces], dtype=np.float64),
            high=np.array([t.high_score for t in traces], dtype=np.float64),
        )

    @classmethod
    def build(cls, scores, offsets, subject_start, subject_end, low, high) -> "RaggedTraces":
        """Checked, contiguous arrays of the right dtypes."""
        r = cls(np.ascontiguousarray(scores, dtype=np.float64), np.ascontiguousarray(offsets, dtype=np.int64),
                np.ascontiguousarray(subject_start, dtype=np.int64), np.ascontiguousarray(subject_end, dtype=np.int64),
                np.ascontiguousarray(low, dtype=np.float64), np.ascontiguousarray(high, dtype=np.float64))
        n = len(r.low)
        if r.scores.ndim != 2:
            raise DatasetError(f"scores must be '(fact token) layer' (2-D), got shape {r.scores.shape}")
        if n == 0 or r.offsets.shape != (n + 1,) or r.subject_start.shape != (n,) or r.subject_end.shape != (n,) \
                or r.high.shape != (n,):
            raise DatasetError(f"ragged arrays disagree: offsets {r.offsets.shape}, spans {r.subject_start.shape}/"
                               f"{r.subject_end.shape}, low {r.low.shape}, high {r.high.shape}; need facts >= 1")
        lengths = np.diff(r.offsets)
        if r.offsets[0] != 0 or r.offsets[-1] != len(r.scores) or (lengths < 1).any():
            raise DatasetError("offsets must start at 0, end at the number of score rows and give every fact >= 1 token")
        bad = np.flatnonzero((r.subject_start < 0) | (r.subject_end <= r.subject_start) | (r.subject_end > lengths))
        if len(bad):
            f = int(bad[0])
            raise DatasetError(f"fact {f}: subject span [{r.subject_start[f]}, {r.subject_end[f]}) is not a non-empty "
                               f"span inside its {lengths[f]} tokens")
        return r


# ---------------------------------------------------------------- numba kernels


@numba.njit(cache=True, nogil=True)
def _buckets_of(t, s, e, n, out):
    """Buckets of position ``t`` (subject [s, e), n tokens) written into ``out``; returns how many."""
    k = 0
    if t == s:
        out[k] = 0
        k += 1
    if s < t < e - 1:
        out[k] = 1
        k += 1
    if t == e - 1:
        out[k] = 2
        k += 1
    if t == e:
        out[k] = 3
        k += 1
    if e < t < n - 1:
        out[k] = 4
        k += 1
    if t == n - 1:
        out[k] = 5
        k += 1
    return k


@numba.njit(cache=True, nogil=True)
def _fact_sums_numba(scores, offsets, starts, ends, low, high):
    """Per fact and bucket: sums of ``score - low`` per layer (+ a last column of ``high - low``)
    and cell counts. Returns ``sums [fact, bucket, layer+1]``, ``counts [fact, bucket]``."""
    n_facts = len(low)
    n_layers = scores.shape[1]
    sums = np.zeros((n_facts, 6, n_layers + 1))
    counts = np.zeros((n_facts, 6), dtype=np.int64)
    which = np.empty(6, dtype=np.int64)
    for f in range(n_facts):
        o = offsets[f]
        n = offsets[f + 1] - o
        te = high[f] - low[f]
        for t in range(starts[f], n):
            if np.isnan(scores[o + t, 0]):  # a row that was not traced
                continue
            k = _buckets_of(t, starts[f], ends[f], n, which)
            for j in range(k):
                b = which[j]
                counts[f, b] += 1
                for layer in range(n_layers):
                    sums[f, b, layer] += scores[o + t, layer] - low[f]
                sums[f, b, n_layers] += te
    return sums, counts


@numba.njit(cache=True, nogil=True)
def _resample_numba(sums, counts, idx):
    """``out[b] = sum_j sums[idx[b, j]]`` accumulated in ``j`` order, and the same for counts."""
    n_rep, n_draw = idx.shape
    out = np.zeros((n_rep, sums.shape[1], sums.shape[2]))
    out_counts = np.zeros((n_rep, counts.shape[1]), dtype=np.int64)
    for b in range(n_rep):
        for j in range(n_draw):
            f = idx[b, j]
            for k in range(sums.shape[1]):
                out_counts[b, k] += counts[f, k]
                for c in range(sums.shape[2]):
                    out[b, k, c] += sums[f, k, c]
    return out, out_counts


# ---------------------------------------------------------------- NumPy path


def bucket_masks(r: RaggedTraces) -> tuple[np.ndarray, np.ndarray]:
    """``(fact_of_row [rows], masks [bucket, rows])``: which flat (traced) rows fall in which bucket."""
    lengths = np.diff(r.offsets)
    fact = np.repeat(np.arange(r.n_facts), lengths)
    t = np.arange(len(r.scores)) - r.offsets[fact]
    s, e, n = r.subject_start[fact], r.subject_end[fact], lengths[fact]
    masks = np.stack([t == s, (t > s) & (t < e - 1), t == e - 1, t == e, (t > e) & (t < n - 1), t == n - 1])
    return fact, masks & ~np.isnan(r.scores[:, 0])  # untraced (NaN) rows are in no bucket


def _fact_sums_numpy(r: RaggedTraces) -> tuple[np.ndarray, np.ndarray]:
    fact, masks = bucket_masks(r)
    n_layers = r.n_layers
    values = np.empty((len(r.scores), n_layers + 1))
    values[:, :n_layers] = r.scores - r.low[fact][:, None]
    values[:, n_layers] = (r.high - r.low)[fact]
    sums = np.zeros((r.n_facts, N_BUCKETS, n_layers + 1))
    counts = np.zeros((r.n_facts, N_BUCKETS), dtype=np.int64)
    for b in range(N_BUCKETS):
        rows = np.flatnonzero(masks[b])  # ascending: token order within each fact
        np.add.at(sums, (fact[rows], b), values[rows])  # unbuffered, applied in row order
        np.add.at(counts, (fact[rows], b), 1)
    return sums, counts


def _resample_numpy(sums: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same sums as :func:`_resample_numba`, in the same order, vectorised.

    Many resamples: one step per draw ``j``, vectorised over resamples. Few (the point estimate):
    ``np.cumsum`` over the draws, a strictly sequential accumulation, with the running total
    prepended so that rows are added in exactly the numba loop's order; blocks bound memory.
    """
    flat = sums.reshape(len(sums), -1)
    out = np.zeros((idx.shape[0], flat.shape[1]))
    if idx.shape[0] >= 8:
        for j in range(idx.shape[1]):
            out += flat[idx[:, j]]
    else:
        step = max(1, (4 << 20) // flat.shape[1])  # draws per block: ~32 MB of float64
        for b in range(idx.shape[0]):
            acc = out[b:b + 1]
            for start in range(0, idx.shape[1], step):
                acc = np.cumsum(np.concatenate([acc, flat[idx[b, start:start + step]]]), axis=0)[-1:]
            out[b] = acc[0]
    return out.reshape((idx.shape[0],) + sums.shape[1:]), counts[idx].sum(axis=1)


_KERNELS = {
    "numba": (lambda r: _fact_sums_numba(r.scores, r.offsets, r.subject_start, r.subject_end, r.low, r.high),
              _resample_numba),
    "numpy": (_fact_sums_numpy, _resample_numpy),
}


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class EffectAverages:
    """Average indirect and total effects per bucket (and layer) over the traces of one kind.

    ``indirect[bucket, layer]``: mean of ``score - low_score`` over the bucket's cells;
    ``total[bucket]``: mean of ``high_score - low_score`` over the same cells (for ``"last"``,
    which has one cell per fact, the paper's average total effect). ``*_ci`` are
    ``[2, ...]`` (lower, upper) percentile-bootstrap bounds at ``confidence``; NaN where a bucket
    has no cell. ``cells[bucket]`` and ``facts[bucket]`` count what went into each bucket.
    """

    kind: str
    n_facts: int
    n_layers: int
    cells: np.ndarray        # int [bucket]
    facts: np.ndarray        # int [bucket]
    indirect: np.ndarray     # [bucket, layer]
    indirect_ci: np.ndarray  # [2, bucket, layer]
    total: np.ndarray        # [bucket]
    total_ci: np.ndarray     # [2, bucket]
    low_score: float
    high_score: float
    confidence: float
    n_boot: int
    seed: int
    model: str = ""
    window: int = 0
    buckets: tuple[str, ...] = BUCKETS

    def bucket(self, name: str) -> np.ndarray:
        """Average indirect effect per layer of bucket ``name``."""
        return self.indirect[self._index(name)]

    def peak(self, name: str) -> tuple[int, float]:
        """``(layer, effect)`` of the largest average indirect effect in bucket ``name``."""
        row = self.bucket(name)
        if np.isnan(row).all():
            raise DatasetError(f"bucket {name!r} has no cells in these traces")
        layer = int(np.nanargmax(row))
        return layer, float(row[layer])

    def peak_text(self, name: str) -> str:
        """``"layer L (0.123)"`` for :meth:`peak`, or ``"not traced"`` when the bucket has no cells."""
        if np.isnan(self.bucket(name)).all():
            return "not traced"
        layer, value = self.peak(name)
        return f"layer {layer} ({value:.3f})"

    def _total_bucket(self) -> int:
        """The one-cell-per-fact bucket the total effect is read from: ``"last"``, or
        ``"last_subject"`` when only that token was traced."""
        last = self._index("last")
        return self._index("last_subject") if np.isnan(self.total[last]) else last

    @property
    def total_effect(self) -> float:
        """Average total effect over facts, ``mean(high - low)``."""
        return float(self.total[self._total_bucket()])

    @property
    def total_effect_ci(self) -> tuple[float, float]:
        """Bootstrap bounds of :attr:`total_effect`."""
        i = self._total_bucket()
        return float(self.total_ci[0, i]), float(self.total_ci[1, i])

    def _index(self, name: str) -> int:
        if name not in self.buckets:
            raise HyperParameterError(f"unknown bucket {name!r}; buckets: {', '.join(self.buckets)}")
        return self.buckets.index(name)

    def to_dict(self) -> dict:
        def arr(x):
            return np.where(np.isnan(x), None, x).tolist() if np.asarray(x).dtype.kind == "f" else np.asarray(x).tolist()

        return {"kind": self.kind, "n_facts": self.n_facts, "n_layers": self.n_layers, "buckets": list(self.buckets),
                "cells": arr(self.cells), "facts": arr(self.facts), "indirect": arr(self.indirect),
                "indirect_ci": arr(self.indirect_ci), "total": arr(self.total), "total_ci": arr(self.total_ci),
                "low_score": self.low_score, "high_score": self.high_score, "confidence": self.confidence,
                "n_boot": self.n_boot, "seed": self.seed, "model": self.model, "window": self.window}

    @classmethod
    def from_dict(cls, d: dict) -> "EffectAverages":
        def f(x):
            return np.array(x, dtype=np.float64)  # None -> nan

        return cls(kind=d["kind"], n_facts=int(d["n_facts"]), n_layers=int(d["n_layers"]),
                   cells=np.array(d["cells"], dtype=np.int64), facts=np.array(d["facts"], dtype=np.int64),
                   indirect=f(d["indirect"]), indirect_ci=f(d["indirect_ci"]), total=f(d["total"]),
                   total_ci=f(d["total_ci"]), low_score=float(d["low_score"]), high_score=float(d["high_score"]),
                   confidence=float(d["confidence"]), n_boot=int(d["n_boot"]), seed=int(d["seed"]),
                   model=d.get("model", ""), window=int(d.get("window", 0)), buckets=tuple(d["buckets"]))


def trace_label(trace: TraceResult) -> str:
    """``"hidden"``, ``"mlp"``, ``"attn"``, or ``"hidden-severed-mlp"`` / ``"hidden-severed-attn"``."""
    return trace.kind if trace.severed is None else f"{trace.kind}-severed-{trace.severed}"


def _means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sums [..., bucket, col] / counts [..., bucket]``; NaN for empty buckets."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[..., None]


def _check_bootstrap(n_boot, confidence, seed) -> None:
    """Bootstrap settings, refused before any trace is read: ``n_boot`` in ``COUNT_LIMITS``,
    ``confidence`` in (0, 1), ``seed`` in [0, 2**32)."""
    check_count("n_boot", n_boot)
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0 < confidence < 1:
        raise HyperParameterError(f"confidence must be a number in (0, 1), got {confidence!r}")
    check_seed(seed)


def bucket_effects(ragged: RaggedTraces, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
                   backend: Backend = "numba") -> dict[str, np.ndarray]:
    """The numbers behind :class:`EffectAverages` from flat arrays.

    Returns ``means [bucket, layer+1]`` (last column: total effect), ``cells [bucket]``,
    ``facts [bucket]`` and ``boot [n_boot, bucket, layer+1]`` (resample means).
    """
    if backend not in _KERNELS:
        raise HyperParameterError(f"backend must be 'numba' or 'numpy', got {backend!r}")
    _check_bootstrap(n_boot, confidence, seed)
    fact_sums, resample = _KERNELS[backend]
    # the resample means [n_boot, bucket, layer+1] float64 and one chunk of indices and sums
    boot_bytes = n_boot * N_BUCKETS * (ragged.n_layers + 1) * 8
    chunk_bytes = _CHUNK * (ragged.n_facts * (2 + N_BUCKETS) + 2 * N_BUCKETS * (ragged.n_layers + 1)) * 8
    check_memory(Estimate("the bootstrap", boot_bytes + chunk_bytes, (("resample means", boot_bytes), ("one chunk", chunk_bytes))),
                 hint=f"lower n_boot ({n_boot})")
    sums, counts = fact_sums(ragged)
    every = np.arange(ragged.n_facts, dtype=np.int64)[None, :]
    total, total_counts = resample(sums, counts, every)
    boot = np.empty((n_boot,) + sums.shape[1:])
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _CHUNK):
        idx = rng.integers(0, ragged.n_facts, size=(min(_CHUNK, n_boot - start), ragged.n_facts), dtype=np.int64)
        idx.sort(axis=1)  # a resample is a multiset; ascending draws read the sums sequentially
        boot_sums, boot_counts = resample(sums, counts, idx)
        boot[start:start + len(idx)] = _means(boot_sums, boot_counts)
    return {"means": _means(total, total_counts)[0], "cells": total_counts[0], "facts": (counts > 0).sum(0),
            "boot": boot}


def aggregate(traces: Sequence[TraceResult], *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
              backend: Backend = "numba") -> EffectAverages:
    """Average effects per bucket and layer over ``traces`` (one kind, one model)."""
    _check_bootstrap(n_boot, confidence, seed)
    if not traces:
        raise DatasetError("no traces to aggregate")
    labels = {trace_label(t) for t in traces}
    if len(labels) != 1:
        raise DatasetError(f"traces mix kinds {sorted(labels)}; aggregate each kind separately")
    models = {t.model for t in traces}
    if len(models) != 1:
        raise DatasetError(f"traces come from different models {sorted(models)}; aggregate one model at a time")
    ragged = RaggedTraces.from_traces(traces)
    nums = bucket_effects(ragged, n_boot=n_boot, confidence=confidence, seed=seed, backend=backend)
    alpha = (1 - confidence) / 2 * 100
    if n_boot:
        with warnings.catch_warnings():  # a bucket empty in every resample gives NaN bounds, quietly
            warnings.simplefilter("ignore", RuntimeWarning)
            ci = np.nanpercentile(nums["boot"], [alpha, 100 - alpha], axis=0)
    else:
        ci = np.full((2,) + nums["means"].shape, np.nan)
    n_layers = ragged.n_layers
    return EffectAverages(
        kind=labels.pop(), n_facts=ragged.n_facts, n_layers=n_layers, cells=nums["cells"], facts=nums["facts"],
        indirect=nums["means"][:, :n_layers], indirect_ci=ci[:, :, :n_layers], total=nums["means"][:, n_layers],
        total_ci=ci[:, :, n_layers], low_score=float(ragged.low.mean()), high_score=float(ragged.high.mean()),
        confidence=confidence, n_boot=int(n_boot), seed=seed, model=traces[0].model, window=traces[0].window,
    )


def aggregate_all(grouped: dict[str, Sequence[TraceResult]], **settings) -> dict[str, EffectAverages]:
    """:func:`aggregate` for each label of ``grouped`` (e.g. from :func:`tracer.dataset_trace.load_traces`)."""
    return {label: aggregate(traces, **settings) for label, traces in grouped.items() if traces}



def layer_table(averages: dict[str, EffectAverages], bucket: str = "last_subject", digits: int = 3) -> str:
    """Markdown: one row per kind, one column per layer, the average indirect effect in ``bucket``
    (the peak in bold), then the number of facts."""
    if not averages:
        return ""
    n_layers = max(a.n_layers for a in averages.values())
    head = "| kind | " + " | ".join(f"L{i}" for i in range(n_layers)) + " | peak | facts |"
    rows = [head, "|" + "---|" * (n_layers + 3)]
    for label, a in averages.items():
        row = a.bucket(bucket)
        peak = a.peak(bucket)[0] if not np.isnan(row).all() else "–"
        cells = ["–" if np.isnan(v) else (f"**{v:.{digits}f}**" if i == peak else f"{v:.{digits}f}") for i, v in enumerate(row)]
        cells += [""] * (n_layers - len(cells))
        rows.append(f"| {md_cell(label)} | " + " | ".join(cells) + f" | {peak} | {a.n_facts} |")
    return "\n".join(rows)
