"""Causal tracing (Meng et al. 2022), batched, with ROME's exact semantics.

    results = trace_all(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    results["mlp"].scores          # [token, layer] probability of " Paris" after restoring

For every (token t, layer l) the subject's embeddings are corrupted with noise and one site is
restored to its clean value: the block output (``hidden``), or a window of ``window`` MLP or
attention outputs centred on ``l`` as in ROME. The score is the mean over noise samples of the
softmax probability of the clean top-1 token at the last position.

How the batched engine saves work, all without changing a number:
- the clean and the fully corrupted run happen once per prompt and are shared by all kinds;
- restorations are packed, with all noise samples, into few large batches;
- a restored run equals the corrupted run below its first restored layer and before the restored
  token, so each batch starts from the cached corrupted states of that layer (earlier blocks are
  skipped) and feeds only the tokens from ``t`` on, with the corrupted keys/values of the earlier
  tokens as an attention cache;
- tokens before the subject see no noise, so restoring them changes nothing: they score the
  corrupted score without a forward pass;
- logits are computed at the last position only.
``naive=True`` runs one forward pass per restoration instead, as the original code does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch
from einops import repeat
from .progress import tqdm

from .errors import HyperParameterError
from .hooks import hooked, record_outputs
from .layers import get_module
from .limits import Estimate, ModelShape, check_count, check_memory, check_seed, trace_estimate
from .models import LanguageModel, as_model, cache_keyword
from .noise import corrupting, draw_noise, resolve_noise
from .subject import tokenize_with_subject
from .trace_result import KINDS, NoiseSpec, TraceKind, TraceResult, restored_layers

#: which token rows a trace computes: every one, the last subject token, or given positions
TokenSelection = Union[Literal["all", "last_subject"], Sequence[int]]

#: tokens (rows x positions) per batch of the batched engine; bounds activation memory
DEFAULT_BATCH_TOKENS = {"cpu": 6144, "cuda": 131072}
#: fixed cost of one forward pass, in token-layers, used to plan batches (launch/Python overhead)
FORWARD_OVERHEAD = {"cpu": 2000, "cuda": 200000}


def trace(model: "LanguageModel | str", prompt: str, subject: str, kind: TraceKind = "hidden", **settings) -> TraceResult:
    """Causal trace of one kind; see :func:`trace_all` for the settings."""
    return trace_all(model, prompt, subject, kinds=(kind,), **settings)[kind]


def trace_all(
    model: "LanguageModel | str",
    prompt: str,
    subject: str,
    kinds: tuple[TraceKind, ...] = KINDS,
    *,
    samples: int = 10,
    noise: "float | str | NoiseSpec" = "3s",
    noise_mode: str = "rome",
    uniform_noise: bool = False,
    replace: bool = False,
    window: int = 10,
    seed: int = 1,
    naive: bool = False,
    severed: TraceKind | None = None,
    tokens: TokenSelection = "all",
    batch_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, TraceResult]:
    """Causal traces of ``prompt`` for each kind in ``kinds``, sharing the clean and corrupted runs.

    - ``noise``: absolute scale (``0.1``) or a multiple of the subject-embedding std (``"3s"``).
    - ``noise_mode``: ``"rome"`` (numpy ``RandomState(seed)``, the original code's draw) or
      ``"torch"`` (seeded ``torch.Generator``); one draw serves every restoration.
    - ``window``: consecutive MLP/attention layers restored together (``mlp``/``attn`` kinds).
    - ``severed``: with ``kind="hidden"``, hold the ``"mlp"`` or ``"attn"`` outputs of all layers
      above the restored one at their corrupted values at the restored token (paper, Fig. 7).
    - ``tokens``: the token rows to trace: ``"all"``, ``"last_subject"`` (the paper's Fig. 7 and
      its per-fact bar charts) or a list of positions; rows not traced are NaN.
    - ``batch_tokens``: rows x positions per forward pass of the batched engine.
    """
    lm = as_model(model)
    kinds = _check_settings(kinds, samples, window, seed, severed, batch_tokens)
    started = time.perf_counter()
    budget = batch_tokens or DEFAULT_BATCH_TOKENS.get(lm.device.type, DEFAULT_BATCH_TOKENS["cpu"])
    ids, span = tokenize_with_subject(lm.tokenizer, prompt, subject, lm.max_length)
    rows = _token_rows(tokens, len(ids), span)
    # refuse what the machine cannot hold before any forward pass or noise draw
    estimate = _estimate(lm, len(ids), span, kinds, samples, severed, naive, budget, window)
    check_memory(estimate, lm.device, hint=f"lower samples ({samples}) or shorten the prompt ({len(ids)} tokens)")
    check_count("samples", samples)
    spec = resolve_noise(lm, noise, noise_mode, "uniform" if uniform_noise else "gaussian", replace)
    run = _prepare(lm, ids, span, spec, samples, seed, kinds, severed)
    prep_seconds = time.perf_counter() - started
    results = {}
    for kind in kinds:
        t0 = time.perf_counter()
        units = _units(lm.n_layers, [t for t in rows if naive or t >= run.span[0]], kind, window)
        scores = torch.full((len(run.ids), lm.n_layers), math.nan, dtype=torch.float64)
        scores[rows] = run.low_score  # tokens before the subject see no noise: restoring them changes nothing
        if naive:
            n_forward = _run_naive(run, kind, units, severed, scores, progress)
        else:
            n_forward = _run_batched(run, kind, units, severed, scores, budget, progress)
        results[kind] = TraceResult(
            prompt=prompt, subject=subject, tokens=[lm.decode(i) for i in run.ids], subject_span=run.span,
            kind=kind, window=1 if kind == "hidden" else window, scores=scores.numpy(),
            low_score=run.low_score, high_score=run.high_score, answer=lm.decode(run.answer_id),
            answer_id=run.answer_id, noise=spec, samples=samples, seed=seed, model=lm.name,
            severed=severed, n_forward=n_forward + 2, seconds=time.perf_counter() - t0 + prep_seconds / len(kinds),
        )
    return results


def estimate_trace(model: "LanguageModel | str", prompt: str, subject: str, kinds: tuple[TraceKind, ...] = KINDS, *,
                   samples: int = 10, window: int = 10, naive: bool = False, severed: TraceKind | None = None,
                   batch_tokens: int | None = None) -> Estimate:
    """Memory (bytes at the peak) and work (token-layers) :func:`trace_all` would need with these
    settings; tokenises the prompt but runs nothing. See :func:`tracer.limits.trace_estimate`."""
    lm = as_model(model)
    kinds = _check_settings(kinds, samples, window, 1, severed, batch_tokens)
    ids, span = tokenize_with_subject(lm.tokenizer, prompt, subject, lm.max_length)
    budget = batch_tokens or DEFAULT_BATCH_TOKENS.get(lm.device.type, DEFAULT_BATCH_TOKENS["cpu"])
    return _estimate(lm, len(ids), span, kinds, samples, severed, naive, budget, window)


def _estimate(lm, n_tokens, span, kinds, samples, severed, naive, budget, window) -> Estimate:
    return trace_estimate(ModelShape.of(lm), n_tokens=n_tokens, subject=span, samples=samples, n_kinds=len(kinds),
                          severed=severed is not None, naive=naive, batch_tokens=budget, window=window)


# ---------------------------------------------------------------------------- preparation


@dataclass
class _Run:
    """The clean and fully corrupted runs of one prompt, shared by all kinds."""

    lm: LanguageModel
    ids: list[int]
    span: tuple[int, int]
    noise: torch.Tensor  # "sample subject_token hidden", float64
    spec: NoiseSpec
    samples: int
    answer_id: int
    high_score: float
    low_score: float
    clean: dict[str, torch.Tensor]  # module -> "pos hidden"
    corrupted: dict[str, torch.Tensor]  # module -> "sample pos hidden"
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, "sample head pos dim"


def _check_settings(kinds, samples, window, seed, severed, batch_tokens) -> tuple[TraceKind, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if kinds == ("all",):
        kinds = KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise HyperParameterError(f"kind must be one of {', '.join(KINDS)} or 'all', got {bad or kinds}")
    check_count("samples", samples, (1, 1 << 62))  # no count cap: the memory estimate refuses what cannot fit
    check_count("window", window)
    check_seed(seed)
    if severed is not None and (severed not in ("mlp", "attn") or kinds != ("hidden",)):
        raise HyperParameterError("severed must be 'mlp' or 'attn' and goes with kind='hidden' only")
    if batch_tokens is not None:
        check_count("batch_tokens", batch_tokens)
    return kinds


def _site_names(lm: LanguageModel, kinds) -> list[str]:
    return [lm.layers.name(k, layer) for k in kinds for layer in range(lm.n_layers)]


def _noise_hook(run: _Run, start: int, rows_per_sample: int):
    """Embedding-output hook corrupting the subject tokens of rows ``"(unit sample)"``.

    ``start`` is the absolute position of the batch's first token.
    """
    b, e = run.span
    lo = max(b, start)
    if lo >= e:
        return None
    noise = repeat(run.noise[:, lo - b: e - b], "s p h -> (u s) p h", u=rows_per_sample)
    return corrupting(lo - start, e - start, noise, run.spec.replace)


def _last_logits(lm: LanguageModel, input_ids: torch.Tensor, **kwargs):
    """Logits at the last position only: ``"row vocab"``, and the backbone's output.

    Runs the backbone (which ends with the final norm) and unembeds one position as a plain
    matrix product; asking the full model for ``logits_to_keep=1`` can fall into a slow
    broadcast batched product on the CPU.
    """
    out = get_module(lm.model, lm.layers.backbone)(input_ids=input_ids, **kwargs)
    last = out.last_hidden_state[:, -1].contiguous()
    return get_module(lm.model, lm.layers.unembed)(last), out


@torch.no_grad()
def _prepare(lm, ids, span, spec, samples, seed, kinds, severed) -> _Run:
    model, device = lm.model, lm.device
    clean_sites = _site_names(lm, set(kinds) | {"hidden"})
    corrupt_sites = _site_names(lm, {"hidden"} | ({severed} if severed else set()))
    input_ids = torch.tensor([ids], device=device)

    fns, clean = record_outputs(clean_sites)
    with hooked(model, outputs=fns):
        logits, _ = _last_logits(lm, input_ids)
    probs = torch.softmax(logits[0].float(), -1)
    answer_id = int(probs.argmax())
    high = float(probs[answer_id])

    noise = draw_noise(spec, samples, span[1] - span[0], lm.hidden_size, seed)
    run = _Run(lm=lm, ids=ids, span=span, noise=noise, spec=spec, samples=samples, answer_id=answer_id,
               high_score=high, low_score=0.0, clean={k: v[0] for k, v in clean.items()}, corrupted={}, kv=[])
    fns, corrupted = record_outputs(corrupt_sites)
    fns[lm.layers.embed] = _noise_hook(run, 0, 1)
    # a cache without a config keeps every position of every layer: a sliding-window layer's own
    # cache keeps only its window, and the restored runs need the keys and values before any ``t``
    from transformers import DynamicCache

    full = {cache_keyword(get_module(model, lm.layers.backbone)): DynamicCache(), "use_cache": True}
    with hooked(model, outputs=fns):
        logits, out = _last_logits(lm, input_ids.expand(samples, -1), **full)
    run.low_score = float(torch.softmax(logits.float(), -1)[:, answer_id].mean())
    run.corrupted = corrupted
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    run.kv = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else []
    return run


def _token_rows(tokens: TokenSelection, n_tokens: int, span: tuple[int, int]) -> list[int]:
    """Positions to trace for ``tokens`` (validated: a user's choice)."""
    if isinstance(tokens, str):
        if tokens == "all":
            return list(range(n_tokens))
        if tokens == "last_subject":
            return [span[1] - 1]
        raise HyperParameterError(f"tokens must be 'all', 'last_subject' or a list of positions, got {tokens!r}")
    try:
        rows = sorted({int(t) for t in tokens})
    except (TypeError, ValueError):
        raise HyperParameterError(f"tokens must be 'all', 'last_subject' or a list of positions, got {tokens!r}") from None
    bad = [t for t in rows if not 0 <= t < n_tokens]
    if bad or not rows:
        raise HyperParameterError(f"token positions must lie in 0..{n_tokens - 1} for this prompt ({n_tokens} tokens), "
                                  f"got {list(tokens)!r}")
    return rows


def _units(n_layers: int, rows: list[int], kind: TraceKind, window: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(token, layer, restored layers) for every heatmap cell of the token ``rows``, ROME's windows."""
    units = []
    for t in rows:
        for layer in range(n_layers):
            units.append((t, layer, restored_layers(kind, layer, window, n_layers)))
    return units


# ---------------------------------------------------------------------------- batched engine


def _run_batched(run: _Run, kind, units, severed, scores, budget, progress) -> int:
    """Fill ``scores`` for ``units``; returns the number of forward passes."""
    by_token: dict[int, list] = {}
    for unit in units:
        by_token.setdefault(unit[0], []).append(unit)
    batches = []
    n_layers, device = run.lm.n_layers, run.lm.device.type
    for t, group in by_token.items():
        group.sort(key=lambda u: u[2][0])
        batches += _plan_batches(group, run.samples * (len(run.ids) - t), n_layers, budget,
                                 FORWARD_OVERHEAD.get(device, FORWARD_OVERHEAD["cpu"]))
    for batch in tqdm(batches, desc=f"trace {kind}", disable=not progress, leave=False):
        probs = _forward_restored(run, kind, batch, severed)
        for (t, layer, _), p in zip(batch, probs.tolist()):
            scores[t, layer] = p
    return len(batches)


def _plan_batches(units, tokens_per_unit: int, n_layers: int, budget: int, overhead: int) -> list[list]:
    """Split ``units`` (sorted by first restored layer) into batches of least estimated cost.

    A batch costs ``tokens x layers it runs`` (it runs from its lowest first restored layer up)
    plus a per-forward ``overhead`` in the same unit; batches hold at most ``budget`` tokens.
    Dynamic programming over split points: O(units^2), units <= layers.
    """
    per_batch = max(1, budget // tokens_per_unit)
    best = [0.0] + [math.inf] * len(units)
    cut = [0] * (len(units) + 1)
    for end in range(1, len(units) + 1):
        for begin in range(max(0, end - per_batch), end):
            cost = best[begin] + overhead + (end - begin) * tokens_per_unit * (n_layers - units[begin][2][0])
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    batches, end = [], len(units)
    while end > 0:
        batches.append(units[cut[end]:end])
        end = cut[end]
    return batches[::-1]


@torch.no_grad()
def _forward_restored(run: _Run, kind: TraceKind, batch, severed) -> torch.Tensor:
    """Mean answer probability for each unit of ``batch`` (all units share the token ``t``)."""
    lm, model, samples = run.lm, run.lm.model, run.samples
    t = batch[0][0]
    n_units, rows = len(batch), len(batch) * samples
    first_layer = min(layers[0] for _, _, layers in batch)
    outputs, replace = {}, {}

    if first_layer == 0:
        hook = _noise_hook(run, t, n_units)
        if hook is not None:
            outputs[lm.layers.embed] = hook
    else:
        start = repeat(run.corrupted[lm.layers.block_name(first_layer - 1)][:, t:], "s p h -> (u s) p h", u=n_units)
        for layer in range(first_layer):
            replace[lm.layers.block_name(layer)] = lambda *args, _h=start, **kwargs: _h

    restore_rows: dict[int, list[int]] = {}
    for u, (_, _, layers) in enumerate(batch):
        for layer in layers:
            restore_rows.setdefault(layer, []).extend(range(u * samples, (u + 1) * samples))
    for layer, rows_ in restore_rows.items():
        outputs[lm.layers.name(kind, layer)] = _set_position0(torch.tensor(rows_), run.clean[lm.layers.name(kind, layer)][t])

    if severed is not None:
        for layer in range(first_layer + 1, lm.n_layers):
            rows_ = [r for u, (_, _, layers) in enumerate(batch) if layers[-1] < layer
                     for r in range(u * samples, (u + 1) * samples)]
            if rows_:
                frozen = repeat(run.corrupted[lm.layers.name(severed, layer)][:, t], "s h -> (u s) h", u=n_units)
                outputs[lm.layers.name(severed, layer)] = _set_position0(torch.tensor(rows_), frozen[rows_])

    kwargs = {}
    if t > 0:
        from transformers import DynamicCache

        prefix = [(repeat(k[:, :, :t], "s h p d -> (u s) h p d", u=n_units),
                   repeat(v[:, :, :t], "s h p d -> (u s) h p d", u=n_units)) for k, v in run.kv]
        kwargs[cache_keyword(get_module(model, lm.layers.backbone))] = DynamicCache(prefix, config=model.config)
        kwargs["use_cache"] = True
    input_ids = torch.tensor([run.ids[t:]], device=lm.device).expand(rows, -1)
    with hooked(model, outputs=outputs, replace=replace):
        logits, _ = _last_logits(lm, input_ids, **kwargs)
    probs = torch.softmax(logits.float(), -1)[:, run.answer_id]
    return probs.view(n_units, samples).double().mean(1)


def _set_position0(rows: torch.Tensor, value: torch.Tensor):
    """Output hook setting ``h[rows, 0]`` to ``value`` (``"hidden"`` or ``"row hidden"``)."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[rows.to(h.device), 0] = value.to(h.device, h.dtype)
        return h

    return fn


# ---------------------------------------------------------------------------- naive engine


def _run_naive(run: _Run, kind, units, severed, scores, progress) -> int:
    """One forward pass per restoration (batch = clean row + samples), as the original code."""
    lm, model, samples = run.lm, run.lm.model, run.samples
    input_ids = torch.tensor([run.ids], device=lm.device).expand(samples + 1, -1)
    add_noise = corrupting(*run.span, run.noise, run.spec.replace, first_row=1)  # row 0 stays clean

    for t, cell_layer, layers in tqdm(units, desc=f"trace {kind} (naive)", disable=not progress, leave=False):
        outputs = {lm.layers.embed: add_noise}
        for layer in layers:
            outputs[lm.layers.name(kind, layer)] = _copy_clean_row(t)
        if severed is not None:
            for layer in range(lm.n_layers):
                if layer > layers[-1]:
                    outputs[lm.layers.name(severed, layer)] = _set_rows(t, run.corrupted[lm.layers.name(severed, layer)][:, t])
        with torch.no_grad(), hooked(model, outputs=outputs):
            logits = model(input_ids=input_ids).logits
        probs = torch.softmax(logits[1:, -1].float(), -1).mean(0)
        scores[t, cell_layer] = float(probs[run.answer_id])
    return len(units)


def _copy_clean_row(t: int):
    def fn(h):
        h = h.clone()
        h[1:, t] = h[0, t]
        return h

    return fn


def _set_rows(t: int, value: torch.Tensor):
    def fn(h):
        h = h.clone()
        h[1:, t] = value.to(h.device, h.dtype)
        return h

    return fn
