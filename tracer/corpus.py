"""Text corpora for key statistics: a file or a list of strings, with a stable identity.

    corpus = Corpus.from_source(None)                    # $FACTSCOPE_CORPUS, else the Wikipedia sample
    corpus = Corpus.from_source(["text one", "text two"], name="mine")
    for text in corpus.texts(): ...                      # documents, streamed
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .datapaths import WIKIPEDIA, data_file
from .errors import StatisticsError
from .models import file_sha256


def default_corpus() -> Path:
    """``$FACTSCOPE_CORPUS`` if set, else the Wikipedia sample of the data folder
    (:func:`tracer.datapaths.data_file`). Read when used, so setting a variable later still counts."""
    corpus = os.environ.get("FACTSCOPE_CORPUS", "").strip()
    return Path(corpus) if corpus else data_file(WIKIPEDIA)




@dataclass(frozen=True)
class Corpus:
    """A source of documents with a stable identity (part of the cache key).

    Build with :meth:`from_source`: ``None`` (the default Wikipedia file), a path to a ``.jsonl``
    / ``.jsonl.gz`` file of ``{"text": ...}`` objects or a plain ``.txt`` / ``.txt.gz`` file
    (documents separated by blank lines), or an iterable of strings with a ``name``.
    """

    identity: str
    path: Path | None = None
    texts_: tuple[str, ...] | None = field(default=None, repr=False)

    @classmethod
    def from_source(cls, source: "Corpus | str | os.PathLike | Iterable[str] | None" = None, name: str | None = None) -> "Corpus":
        if isinstance(source, Corpus):
            return source
        if source is None or isinstance(source, (str, os.PathLike)):
            path = Path(source) if source is not None else default_corpus()
            if not path.is_file():
                raise StatisticsError(f"corpus file {str(path)!r} does not exist; pass corpus= (or set FACTSCOPE_CORPUS to) "
                                      "a .jsonl(.gz) file with a 'text' field per line, a .txt file, or a list of strings "
                                      "with corpus_name=")
            return cls(identity=name or f"{path.name}:{path.stat().st_size}:{file_sha256(path)[:16]}", path=path)
        texts = tuple(source)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise StatisticsError("a corpus given as an iterable must yield at least one string")
        digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
        return cls(identity=name or f"texts:{len(texts)}:{digest}", texts_=texts)

    def texts(self) -> Iterator[str]:
        if self.texts_ is not None:
            yield from self.texts_
            return
        assert self.path is not None
        opener = gzip.open if self.path.suffix == ".gz" else open
        jsonl = ".jsonl" in self.path.suffixes or ".json" in self.path.suffixes
        with opener(self.path, "rt", encoding="utf-8") as f:
            if jsonl:
                for line in f:
                    if line.strip():
                        text = json.loads(line).get("text", "")
                        if text.strip():
                            yield text
            else:
                for doc in re.split(r"\n\s*\n", f.read()):
                    if doc.strip():
                        yield doc.strip()
