"""Sequential editing: MEMIT batch after batch, each on the model the ones before it edited, with health.

    records, health = sequential_memit(lm, requests, batch_size=100)   # Health before and after each batch

After each batch a :class:`Health` read-out: the Frobenius norm of every edited matrix relative to
the original, and the perplexity of held-out Wikipedia text (:func:`heldout_texts`, which the key
statistics never read). C is read once, on the unedited model.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import HyperParameterError
from ..layers import get_module
from ..models import LanguageModel, as_model
from ..stats import default_corpus
from .hparams import MemitHyperParams
from .memit import compute_memit
from .records import MemitRecord
from .statistics import checked_pairs
from .templates import context_templates

log = logging.getLogger(__name__)


def heldout_texts(n: int = 16, chars: int = 2000, path: str | Path | None = None) -> list[str]:
    """The last ``n`` articles of the shared Wikipedia file (truncated to ``chars``): text the key
    statistics, read from the start of the file, do not use for any reasonable token count."""
    path = Path(path) if path is not None else default_corpus()
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
        lines = f.readlines()
    return [json.loads(line)["text"][:chars] for line in lines[-n:] if line.strip()]


@torch.no_grad()
def perplexity(model: "LanguageModel | str", texts: Sequence[str], max_tokens: int = 256) -> float:
    """exp(mean token NLL) over ``texts``, each cut to ``max_tokens`` tokens (at most what the model reads)."""
    lm = as_model(model)
    total, count = 0.0, 0
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"][:min(max_tokens, lm.max_length)]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=lm.device)
        logits = lm.model(input_ids=x, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return math.exp(total / count)


@dataclass(frozen=True)
class Health:
    """After a batch: Frobenius norm of each edited matrix relative to the original, perplexity;
    with the guarded runner (:mod:`tracer.evaluate.sequence`) also the n-gram entropy of sampled
    text, the fraction of this batch's edits that hold (``efficacy``) and of a sample of earlier
    ones that still do (``retention``; None before there are earlier ones)."""

    batch: int
    n_edits: int
    norm_ratio: dict[str, float]
    perplexity: float
    seconds: float
    entropy: float | None = None
    efficacy: float | None = None
    retention: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Health":
        return cls(**{k: d[k] for k in (f.name for f in fields(cls)) if k in d})


def sequential_memit(model: "LanguageModel | str", requests: Sequence[Any], batch_size: int,
                     hp: MemitHyperParams | None = None, *, stats: Any = None, texts: Sequence[str] | None = None,
                     progress: bool = True, on_batch: Callable[[MemitRecord, Health], None] | None = None,
                     checkpoint_dir: str | Path | None = None,
                     statistics: dict | None = None) -> tuple[list[MemitRecord], list[Health]]:
    """MEMIT in consecutive batches of ``batch_size`` (each on the model edited by the ones before),
    with a :class:`Health` read-out before the first and after every batch. C is read once, on the
    unedited model. Revert with ``r.revert(lm)`` for each record, in any order (bit-exact).

    ``checkpoint_dir`` keeps every batch's z there (see :func:`compute_zs`): z keys include a hash of
    the weights, so batch k's z are found again only after the same k − 1 batches, and a rerun of an
    interrupted sequence recomputes nothing it finished.

    ``statistics`` (from :func:`load_statistics` on the unedited model) skips reading C again, e.g.
    for a second sequence in the same notebook."""
    lm = as_model(model)
    if batch_size < 1:
        raise HyperParameterError(f"batch_size must be >= 1, got {batch_size}")
    hp = hp or MemitHyperParams.for_model(lm)
    statistics = checked_pairs(lm, hp, stats, statistics, progress)
    templates = context_templates(lm, hp)
    texts = list(texts) if texts is not None else heldout_texts()
    modules = [lm.layers.mlp_out_name(l) for l in hp.layers]
    norms0 = {m: float(get_module(lm.model, m).weight.double().norm()) for m in modules}

    def health(batch: int, n: int, seconds: float) -> Health:
        ratio = {m: float(get_module(lm.model, m).weight.double().norm()) / norms0[m] for m in modules}
        return Health(batch=batch, n_edits=n, norm_ratio=ratio, perplexity=perplexity(lm, texts), seconds=seconds)

    records, report = [], [health(0, 0, 0.0)]
    for b, s in enumerate(range(0, len(requests), batch_size), start=1):
        t = time.perf_counter()
        rec = compute_memit(lm, requests[s:s + batch_size], hp, statistics=statistics, templates=templates,
                            progress=progress, checkpoint_dir=checkpoint_dir)
        records.append(rec)
        report.append(health(b, s + len(requests[s:s + batch_size]), time.perf_counter() - t))
        log.info("batch %d: %d edits, norm ratios %s, perplexity %.2f", b, report[-1].n_edits,
                 {k.split(".")[-3]: round(v, 4) for k, v in report[-1].norm_ratio.items()}, report[-1].perplexity)
        if on_batch is not None:
            on_batch(rec, report[-1])
    return records, report
