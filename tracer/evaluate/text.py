"""Text statistics of generations: n-gram entropy (fluency) and TF-IDF similarity (consistency).

    ngram_entropy("the cat sat on the mat")          # ROME's weighted bi-/tri-gram entropy, bits
    tfidf = Tfidf.fit(wikipedia_texts)                # or Tfidf.cached(path_to_jsonl_gz, cache_dir)
    tfidf.similarity(generated_text, reference_text)  # cosine of the two TF-IDF vectors

Definitions follow ROME's ``experiments/py/eval_utils_counterfact.py``:

- ``compute_n_gram_entropy``: for n in (2, 3) the Shannon entropy (bits) of the n-gram frequency
  distribution of one text, weighted 2/3 and 4/3, then the arithmetic mean of the two.
  Difference: ROME tokenises words with NLTK's ``word_tokenize``; here a regular expression
  splits words and punctuation (``\\w+|[^\\w\\s]``), which agrees on plain prose and needs no
  NLTK data download.
- ``tfidf_similarity``: scikit-learn's ``TfidfVectorizer`` defaults — lower-cased tokens of two or
  more word characters, raw term counts, smoothed idf ``ln((1 + n) / (1 + df)) + 1``, l2
  normalisation — then the cosine of the two vectors. Words outside the fitted vocabulary are
  ignored, as in ``TfidfVectorizer.transform``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import StatisticsError
from ..files import write_json_atomic

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+|[^\w\s]")
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_TFIDF_FORMAT = 1


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted n-gram entropy of one text in bits (0 for a text with no n-grams)."""
    tokens = word_tokens(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def mean_ngram_entropy(texts: Sequence[str]) -> float:
    """ROME's ``n_gram_entropy`` (arithmetic mean over texts)."""
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def tfidf_tokens(text: str) -> list[str]:
    return _TFIDF_TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Tfidf:
    """Inverse document frequencies over a corpus (scikit-learn's smoothed definition)."""

    idf: dict[str, float]
    n_documents: int
    corpus: str = ""

    @classmethod
    def fit(cls, documents: Iterable[str], corpus: str = "") -> "Tfidf":
        df: Counter[str] = Counter()
        n = 0
        for doc in documents:
            df.update(set(tfidf_tokens(doc)))
            n += 1
        if n == 0:
            raise StatisticsError("cannot fit TF-IDF on an empty corpus; pass at least one document")
        idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}
        return cls(idf=idf, n_documents=n, corpus=corpus)

    def vector(self, text: str) -> dict[str, float]:
        """l2-normalised TF-IDF vector of ``text`` as a sparse dict."""
        counts = Counter(w for w in tfidf_tokens(text) if w in self.idf)
        vec = {w: c * self.idf[w] for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {w: v / norm for w, v in vec.items()} if norm > 0 else {}

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the TF-IDF vectors of ``a`` and ``b`` (0 when either is empty)."""
        va, vb = self.vector(a), self.vector(b)
        if len(vb) < len(va):
            va, vb = vb, va
        return sum(v * vb.get(w, 0.0) for w, v in va.items())

    def to_dict(self) -> dict:
        return {"format": _TFIDF_FORMAT, "n_documents": self.n_documents, "corpus": self.corpus, "idf": self.idf}

    @classmethod
    def from_dict(cls, d: dict) -> "Tfidf":
        if d.get("format") != _TFIDF_FORMAT:
            raise StatisticsError(f"TF-IDF file format {d.get('format')!r} is not {_TFIDF_FORMAT}")
        return cls(idf={str(k): float(v) for k, v in d["idf"].items()}, n_documents=int(d["n_documents"]), corpus=d["corpus"])

    @classmethod
    def cached(cls, corpus_path: str | Path, cache_dir: str | Path, *, max_documents: int | None = None) -> "Tfidf":
        """Fit on a ``{"text": ...}`` JSON-lines file (gzip or plain), or load the cached fit.

        The cache file is keyed by the corpus file's SHA-256 and ``max_documents``; a file that
        does not parse or names another corpus is refitted, never used.
        """
        corpus_path = Path(corpus_path)
        if not corpus_path.is_file():
            raise StatisticsError(f"corpus file {corpus_path} does not exist; pass a JSON-lines file with a 'text' field")
        digest = hashlib.sha256(corpus_path.read_bytes()).hexdigest()
        key = f"{digest[:16]}-{max_documents or 'all'}"
        target = Path(cache_dir) / f"tfidf-{key}.json"
        if target.is_file():
            try:
                model = cls.from_dict(json.loads(target.read_text()))
                if model.corpus == key:
                    return model
            except (OSError, ValueError, KeyError, TypeError):
                pass
            log.warning("TF-IDF cache %s does not verify; fitting again", target)
        model = cls.fit(_read_texts(corpus_path, max_documents), corpus=key)
        write_json_atomic(target, model.to_dict())
        return model


def _read_texts(path: Path, limit: int | None) -> Iterable[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            if line.strip():
                yield json.loads(line)["text"]
