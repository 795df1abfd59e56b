"""Key statistics for ROME and MEMIT: C = E[k kᵀ] of the inputs of the MLP output projection.

    cache = StatsCache(cache_dir() / "stats")            # an explicit directory, nothing global
    stats = cache.get(lm, layer=4, n_tokens=100_000)     # computed once (tqdm bar), then loaded
    stats.solve(k)                                       # C⁻¹ k, in float64
    KeyStatistics.identity(lm, layer=4)                  # opting out of C: labelled, never silent

Keys ("tokens d_k") are read with :func:`tracer.hooks.hooked` at the input of
``lm.layers.mlp_out_name(layer)`` while text from a :class:`Corpus` streams through the model in
chunks of at most ``chunk_tokens`` tokens; the forward pass stops at that module. The sum of
``k kᵀ`` is accumulated in float64 (or float32) on the keys' device, whatever the weights' dtype, in
parts that a :mod:`tracer.spread` runner can spread over Ray workers (``cache.get(pool, ...)``);
the parts' float64 sums are added in order by the caller.

A cache file is keyed by the model's name and a fingerprint of every weight the keys depend on
(:func:`key_fingerprint`: embeddings and blocks below ``layer``, and block ``layer`` except the
edited projection, so edits at that layer keep the key), the layer, module, corpus identity,
token count, chunk length and dtype. It is written atomically and verified on load (key, shape,
SHA-256 of the matrix); a truncated or mismatched file is logged and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
from safetensors import safe_open

from .corpus import Corpus, default_corpus  # noqa: F401 (default_corpus: read from here by callers)
from .errors import StatisticsError
from .files import save_safetensors_atomic
from .hooks import run_until
from .models import LanguageModel, as_model
from .placement import named_weights
from .spread import Runner, as_runner

log = logging.getLogger(__name__)

_FORMAT = 1
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ---------------------------------------------------------------------------- fingerprint


def key_fingerprint(lm: LanguageModel, layer: int) -> str:
    """SHA-256 (16 hex digits) of every parameter the keys at ``layer`` depend on.

    Included: all parameters except those of blocks above ``layer``, of the MLP output projection
    at ``layer`` itself, of the final norm and of the unembedding (unless tied to an included
    one). An edit of that projection therefore keeps the fingerprint; any other change does not.
    """
    lmap = lm.layers
    above = [lmap.block_name(i) + "." for i in range(layer + 1, lm.n_layers)]
    return _parameters_fingerprint(lm, above + [lmap.mlp_out_name(layer) + ".", lmap.final_norm + ".", lmap.unembed + "."])


def weights_fingerprint(lm: LanguageModel) -> str:
    """SHA-256 (16 hex digits) of every parameter of the model (names, shapes, dtypes, bytes)."""
    return _parameters_fingerprint(lm, [])


def _parameters_fingerprint(lm: LanguageModel, excluded: list[str]) -> str:
    h = hashlib.sha256()
    for name, p in named_weights(lm.model):  # tied parameters appear once, under the first name
        if any(name.startswith(prefix) for prefix in excluded):
            continue
        t = p.contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- statistics


@dataclass(frozen=True, eq=False)
class KeyStatistics:
    """C = E[k kᵀ] ("d_k d_k", float64 on the CPU) at ``layer``, or the labelled identity.

    ``kind`` is ``"second_moment"`` or ``"identity"`` (the user opted out of C; ``mom2`` is
    ``None`` and :meth:`solve` returns its input).
    """

    kind: Literal["second_moment", "identity"]
    model: str
    fingerprint: str
    layer: int
    module: str
    d_k: int
    n_tokens: int = 0
    corpus: str | None = None
    chunk_tokens: int | None = None
    dtype: str | None = None
    mom2: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def identity(cls, model: "LanguageModel | str", layer: int) -> "KeyStatistics":
        """C = I at ``layer``: the edit ignores key statistics, and its record says so."""
        lm = as_model(model)
        _check_layer(lm, layer)
        return cls(kind="identity", model=lm.name, fingerprint=key_fingerprint(lm, layer), layer=layer,
                   module=lm.layers.mlp_out_name(layer), d_k=_key_dim(lm, layer))

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    @property
    def label(self) -> str:
        """One line for reports, e.g. ``C from 100,000 tokens of enwiki…`` or ``C = I (opted out)``."""
        if self.is_identity:
            return "C = I (key statistics opted out)"
        return f"C from {self.n_tokens:,} tokens of {self.corpus}"

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C⁻¹ k for ``k`` of shape "d_k" or "batch d_k", computed in float64 by Cholesky.

        Returns float64 on ``k``'s device. :class:`StatisticsError` if C is not positive definite.
        """
        if k.shape[-1] != self.d_k:
            raise StatisticsError(f"key of shape {tuple(k.shape)} does not match statistics with d_k={self.d_k} ('... d_k')")
        k64 = k.detach().double()
        if self.is_identity:
            return k64.clone()
        chol, info = torch.linalg.cholesky_ex(self.mom2)
        if int(info) != 0:
            raise StatisticsError(f"the key second moment at layer {self.layer} is singular ({self.n_tokens:,} tokens for "
                                  f"d_k={self.d_k}); collect more tokens")
        rhs = k64.cpu().reshape(-1, self.d_k).T
        out = torch.cholesky_solve(rhs, chol).T.reshape(k.shape)
        return out.to(k.device)

    def to_dict(self) -> dict:
        """Everything but the matrix (what an edit record stores)."""
        return {"kind": self.kind, "model": self.model, "fingerprint": self.fingerprint, "layer": self.layer,
                "module": self.module, "d_k": self.d_k, "n_tokens": self.n_tokens, "corpus": self.corpus,
                "chunk_tokens": self.chunk_tokens, "dtype": self.dtype}

    def cache_key(self) -> dict:
        return _cache_key(self.model, self.fingerprint, self.layer, self.module, self.corpus, self.n_tokens,
                          self.chunk_tokens, self.dtype)


def _cache_key(model, fingerprint, layer, module, corpus, n_tokens, chunk_tokens, dtype) -> dict:
    return {"format": _FORMAT, "model": model, "fingerprint": fingerprint, "layer": int(layer), "module": module,
            "corpus": corpus, "n_tokens": int(n_tokens), "chunk_tokens": int(chunk_tokens), "dtype": dtype}


def _check_layer(lm: LanguageModel, layer: int) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < lm.n_layers:
        raise StatisticsError(f"layer must be an integer in [0, {lm.n_layers - 1}] for {lm.name}, got {layer!r}")


def _key_dim(lm: LanguageModel, layer: int) -> int:
    w = lm.model.get_submodule(lm.layers.mlp_out_name(layer)).weight
    return int(w.shape[0] if lm.layers.mlp_out_transposed else w.shape[1])


def _chunk_tokens(lm: LanguageModel, chunk_tokens: int | None) -> int:
    """Chunk length: ``chunk_tokens`` or min(1024, the model's context) (ROME's 1024-token texts)."""
    return min(1024, lm.max_length) if chunk_tokens is None else chunk_tokens


def _pieces(tokenizer, corpus: Corpus, chunk_tokens: int, n_tokens: int) -> list[torch.Tensor]:
    """Token id rows ("pos") of at most ``chunk_tokens`` from the corpus's documents, the last one
    trimmed so that they hold ``n_tokens`` in all (fewer when the corpus is shorter)."""
    pieces, seen = [], 0
    for text in corpus.texts():
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), chunk_tokens):
            piece = ids[start:start + chunk_tokens]
            if len(piece) > 1:
                pieces.append(torch.tensor(piece[: n_tokens - seen], dtype=torch.long))
                seen += len(pieces[-1])
                if seen >= n_tokens:
                    return pieces
    return pieces


def _parts(pieces: list[torch.Tensor], n_parts: int) -> list[list[torch.Tensor]]:
    """``pieces`` cut into at most ``n_parts`` consecutive groups of about equal token counts."""
    total = sum(len(p) for p in pieces)
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_parts)]
    before = 0
    for p in pieces:
        parts[min(n_parts - 1, before * n_parts // total)].append(p)
        before += len(p)
    return [part for part in parts if part]


def _layer_facts(lm: LanguageModel, layer: int, chunk_tokens: int | None) -> dict:
    """A task (:mod:`tracer.spread`): what statistics at ``layer`` need of the model, its tokenizer too."""
    _check_layer(lm, layer)
    return {"model": lm.name, "fingerprint": key_fingerprint(lm, layer), "module": lm.layers.mlp_out_name(layer),
            "d_k": _key_dim(lm, layer), "chunk_tokens": _chunk_tokens(lm, chunk_tokens), "max_length": lm.max_length,
            "tokenizer": lm.tokenizer}


def _moment_part(lm: LanguageModel, pieces: list[torch.Tensor], shared: tuple[str, int, str]) -> torch.Tensor:
    """A task: Σ k kᵀ ("d_k d_k", float64 on the CPU) over the keys of ``pieces``, accumulated in
    ``dtype`` on the keys' device (a dispatched model's layers may differ); the forward pass stops
    at the module."""
    module, d_k, dtype = shared
    total: torch.Tensor | None = None
    keys: list[torch.Tensor] = []
    with torch.no_grad():
        for piece in pieces:
            keys.clear()
            run_until(lm.model, lambda: lm.model(input_ids=piece.view(1, -1).to(lm.device), use_cache=False), module,
                      inputs={module: lambda x: keys.append(x.detach())})
            k = keys[0].reshape(-1, d_k).to(_DTYPES[dtype])
            if total is None:
                total = torch.zeros(d_k, d_k, dtype=k.dtype, device=k.device)
            total.addmm_(k.T, k.to(total.device))
    return total.double().cpu()


def compute_key_statistics(
    model: "LanguageModel | str | Runner",
    layer: int,
    n_tokens: int,
    corpus: "Corpus | str | os.PathLike | Iterable[str] | None" = None,
    *,
    corpus_name: str | None = None,
    chunk_tokens: int | None = None,
    dtype: Literal["float64", "float32"] = "float64",
    progress: bool = True,
) -> KeyStatistics:
    """C = E[k kᵀ] over exactly ``n_tokens`` tokens of ``corpus`` (no cache; see :class:`StatsCache`).

    Documents are tokenised and cut into chunks of at most ``chunk_tokens`` tokens (default
    min(1024, context length)); the last chunk is trimmed so the count is exact.
    :class:`StatisticsError` when the corpus is too short or ``n_tokens < d_k`` (C would be
    singular). ``model`` may be a :mod:`tracer.spread` runner (a :class:`~tracer.spread.RayPool`):
    the chunks are cut into four parts per worker, each worker returns its parts' sums of k kᵀ
    (float64) and they are added here in the parts' order, so the result equals the one-process
    one up to float64 summation order.
    """
    runner = as_runner(model)
    return _compute(runner, runner.call(_layer_facts, layer, chunk_tokens), layer, n_tokens,
                    Corpus.from_source(corpus, corpus_name), dtype, progress)


def _compute(runner: "Runner", about: dict, layer: int, n_tokens: int, source: Corpus, dtype: str,
             progress: bool) -> KeyStatistics:
    d_k, chunk_tokens = about["d_k"], about["chunk_tokens"]
    if dtype not in _DTYPES:
        raise StatisticsError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(n_tokens, int) or n_tokens < d_k:
        raise StatisticsError(f"n_tokens must be an integer >= d_k={d_k} (fewer keys give a singular C), got {n_tokens!r}; "
                              "use KeyStatistics.identity(...) to opt out of C")
    if not isinstance(chunk_tokens, int) or not 2 <= chunk_tokens <= about["max_length"]:
        raise StatisticsError(f"chunk_tokens must be an integer in [2, {about['max_length']}], got {chunk_tokens!r}")
    pieces = _pieces(about["tokenizer"], source, chunk_tokens, n_tokens)
    seen = sum(len(p) for p in pieces)
    if seen < n_tokens:
        raise StatisticsError(f"corpus {source.identity!r} has only {seen:,} tokens; asked for {n_tokens:,}")
    parts = _parts(pieces, 4 * runner.workers)
    sums: dict[int, torch.Tensor] = {}
    total = torch.zeros(d_k, d_k, dtype=torch.float64)
    merged = 0
    for done in runner.map(_moment_part, enumerate(parts), shared=(about["module"], d_k, dtype),
                           desc=f"key statistics L{layer}", unit="tok", sizes=[sum(len(p) for p in part) for part in parts],
                           progress=progress):
        if not done.ok:
            raise StatisticsError(f"key statistics at layer {layer}: part {done.key + 1} of {len(parts)} failed: {done.error}")
        sums[done.key] = done.result
        while merged in sums:  # in the parts' order, whatever order they finish in
            total += sums.pop(merged)
            merged += 1
    return KeyStatistics(kind="second_moment", model=about["model"], fingerprint=about["fingerprint"], layer=layer,
                         module=about["module"], d_k=d_k, n_tokens=seen, corpus=source.identity,
                         chunk_tokens=chunk_tokens, dtype=dtype, mom2=total / seen)


# ---------------------------------------------------------------------------- cache


class StatsCache:
    """Key statistics on disk under ``directory``, one safetensors file per cache key.

    ``get`` loads a verified file or computes and writes one (atomically: a temporary file in the
    same directory, then ``os.replace``). A file that fails verification is logged and replaced.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()

    def __repr__(self) -> str:
        return f"StatsCache({str(self.directory)!r})"

    def path_for(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(key["model"])).name)[:40] or "model"
        return self.directory / f"{slug}-L{key['layer']}-{key['n_tokens']}tok-{digest}.safetensors"

    def get(
        self,
        model: "LanguageModel | str | Runner",
        layer: int,
        n_tokens: int,
        corpus: "Corpus | str | os.PathLike | Iterable[str] | None" = None,
        *,
        corpus_name: str | None = None,
        chunk_tokens: int | None = None,
        dtype: Literal["float64", "float32"] = "float64",
        progress: bool = True,
    ) -> KeyStatistics:
        """Cached :func:`compute_key_statistics` (same arguments)."""
        runner = as_runner(model)
        about = runner.call(_layer_facts, layer, chunk_tokens)
        source = Corpus.from_source(corpus, corpus_name)
        key = _cache_key(about["model"], about["fingerprint"], layer, about["module"], source.identity, n_tokens,
                         about["chunk_tokens"], dtype)
        path = self.path_for(key)
        stats = self.load(path, key)
        if stats is not None:
            return stats
        stats = _compute(runner, about, layer, n_tokens, source, dtype, progress)
        self.save(stats)
        return stats

    def load(self, path: Path, key: dict) -> KeyStatistics | None:
        """The statistics in ``path`` if it exists and verifies against ``key``; else ``None``."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                mom2 = f.get_tensor("mom2")
            stored = json.loads(meta.get("key", "null"))
            problem = None
            if stored != key:
                problem = "its key does not match"
            elif mom2.dtype != torch.float64 or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
                problem = f"its matrix has shape {tuple(mom2.shape)} and dtype {mom2.dtype}"
            elif _tensor_sha256(mom2) != meta.get("sha256"):
                problem = "its checksum does not match"
            elif not bool(torch.isfinite(mom2).all()):
                problem = "its matrix is not finite"
        except Exception as e:  # truncated or foreign files raise many kinds of errors
            problem = f"it cannot be read ({type(e).__name__}: {str(e)[:80]})"
        if problem:
            log.warning("ignoring key statistics %s: %s; recomputing", path, problem)
            return None
        return KeyStatistics(kind="second_moment", model=key["model"], fingerprint=key["fingerprint"], layer=key["layer"],
                             module=key["module"], d_k=int(mom2.shape[0]), n_tokens=key["n_tokens"], corpus=key["corpus"],
                             chunk_tokens=key["chunk_tokens"], dtype=key["dtype"], mom2=mom2)

    def save(self, stats: KeyStatistics) -> Path:
        """Write ``stats`` atomically; returns the path."""
        if stats.is_identity:
            raise StatisticsError("C = I is not cached; there is nothing to store")
        key = stats.cache_key()
        path = self.path_for(key)
        mom2 = stats.mom2.double().contiguous().cpu()
        return save_safetensors_atomic(path, {"mom2": mom2}, {"key": json.dumps(key, sort_keys=True),
                                                              "sha256": _tensor_sha256(mom2)}, fsync=True)


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
