"""Which key statistics C an edit uses: one resolution rule for ROME, MEMIT and their methods.

    ks = statistics_at(lm, layer, stats, n_tokens)        # KeyStatistics (C, or the labelled identity)
    pairs = load_statistics(lm, hp, stats)                # MEMIT: {layer: (C or None, info)}

``stats`` may be ``None`` (a :class:`~tracer.stats.StatsCache` under the factscope cache), the
string ``"identity"`` (C = I, labelled so in the record), a ``StatsCache``, or ready
:class:`~tracer.stats.KeyStatistics` (checked against the model and layer). MEMIT also takes
``{layer: KeyStatistics}`` (each checked so), ``{layer: C}`` or a callable ``(lm, layer) -> C``. ``n_tokens = 0`` means C = I.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import HyperParameterError, StatisticsError
from ..models import LanguageModel, as_model, cache_dir
from ..stats import KeyStatistics, StatsCache, key_fingerprint
from .hparams import MemitHyperParams

ACCEPTED = "None, 'identity', a StatsCache or KeyStatistics"

#: what MEMIT passes between batches: ``{layer: (C or None for C = I, its description)}``
Pairs = dict[int, tuple["torch.Tensor | None", dict]]


def statistics_at(model: "LanguageModel | str", layer: int, stats: Any, n_tokens: int, *,
                  chunk_tokens: int | None = None, progress: bool = True) -> KeyStatistics:
    """``stats`` (see the module docstring) as :class:`KeyStatistics` for ``layer`` of ``model``."""
    lm = as_model(model)
    if isinstance(stats, str):
        if stats != "identity":
            raise StatisticsError(f"stats must be {ACCEPTED}; got {stats!r}")
        return KeyStatistics.identity(lm, layer)
    if stats is None or isinstance(stats, StatsCache):
        if n_tokens == 0:
            return KeyStatistics.identity(lm, layer)
        cache = stats if stats is not None else StatsCache(cache_dir() / "stats")
        return cache.get(lm, layer, n_tokens, chunk_tokens=chunk_tokens, progress=progress)
    if not isinstance(stats, KeyStatistics):
        raise StatisticsError(f"stats must be {ACCEPTED}; got {type(stats).__name__}")
    if stats.layer != layer or stats.module != lm.layers.mlp_out_name(layer):
        raise StatisticsError(f"statistics are for {stats.module} (layer {stats.layer}) but the edit is at layer {layer}")
    fp = key_fingerprint(lm, layer)
    if stats.fingerprint != fp:
        raise StatisticsError(f"statistics were computed on other weights (fingerprint {stats.fingerprint}, model {fp}); "
                              "recompute them for this model")
    return stats


def load_statistics(model: "LanguageModel | str", hp: MemitHyperParams, stats: Any = None, *,
                    progress: bool = True) -> Pairs:
    """C per edited layer of a MEMIT batch, read on the current (unedited) model:
    ``{layer: (C or None, info)}`` (``hp.mom2_n_tokens`` tokens of the default Wikipedia corpus)."""
    lm = as_model(model)
    out: Pairs = {}
    for layer in hp.layers:
        if isinstance(stats, dict) and isinstance(stats[layer], KeyStatistics):  # read elsewhere (e.g. by a pool)
            ks = statistics_at(lm, layer, stats[layer], hp.mom2_n_tokens)
            out[layer] = (ks.mom2, ks.to_dict())
        elif isinstance(stats, dict):
            out[layer] = (stats[layer], {"kind": "given"})
        elif callable(stats) and not isinstance(stats, StatsCache):
            out[layer] = (stats(lm, layer), {"kind": "given"})
        else:
            ks = statistics_at(lm, layer, stats, hp.mom2_n_tokens, progress=progress)
            out[layer] = (ks.mom2, ks.to_dict())
    return out


def checked_pairs(model: "LanguageModel | str", hp: MemitHyperParams, stats: Any, statistics: "Pairs | None",
                  progress: bool) -> Pairs:
    """``statistics`` if given (checked: :func:`load_statistics`' form for every edited layer), else
    C read by :func:`load_statistics` from ``stats``."""
    if statistics is None:
        return load_statistics(model, hp, stats, progress=progress)
    if not isinstance(statistics, dict):
        raise HyperParameterError(f"statistics must be the dict load_statistics returns ({{layer: (C or None, info)}}), "
                                  f"got {type(statistics).__name__}")
    missing = [l for l in hp.layers if l not in statistics]
    if missing:
        raise HyperParameterError(f"statistics lack layers {missing}: they hold {sorted(statistics)}, the edit needs "
                                  f"{list(hp.layers)} (call load_statistics with the same hyper-parameters)")
    bad = [l for l in hp.layers if not (isinstance(statistics[l], tuple) and len(statistics[l]) == 2
                                        and (statistics[l][0] is None or isinstance(statistics[l][0], torch.Tensor)))]
    if bad:
        raise HyperParameterError(f"statistics[{bad[0]}] must be a pair (C: tensor or None, info: dict), "
                                  f"got {type(statistics[bad[0]]).__name__}")
    return statistics
