"""The planner: what a job will need, per device and in seconds, from the model's config alone.

    p = plan("trace", "smollm2-135m", prompt="The Eiffel Tower is in", subject="The Eiffel Tower", samples=10)
    p.peak_bytes, p.per_device, p.seconds          # {"cpu": 1.4e9}, about 60 s on this machine
    check_plan(p)                                  # JobTooLargeError (one line: estimate, limit) if it cannot fit

No weight is loaded: :func:`tracer.models.model_skeleton` builds the model on the meta device
from its config, so the engine's own rules (the layer map, the editing defaults, MEMIT's chunk
size, the tokenizer's prompt lengths) decide the sizes. Memory is the sum of three things, each
from :mod:`tracer.limits`' one set of estimates:

- ``runtime``: what this process holds now (Python, torch, the tokenizer), on the CPU;
- ``weights``: parameters x bytes per element, on the devices the placement puts them on;
- the job's largest phase (trace, v*, MEMIT's update, ...) on the device it computes on.

Time is the job's FLOPs (:func:`tracer.limits.flops`) over a short matrix-product measurement of
this machine (:func:`measure_throughput`); it ignores overheads, so it is a lower bound.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from accelerate import infer_auto_device_map

from .datapaths import KNOWNS, data_file
from .edit.hparams import MemitHyperParams, ROMEHyperParams
from .edit.requests import EditRequest, Request
from .edit.zs import auto_chunk, extent
from .errors import FactscopeError, HyperParameterError
from .evaluate.records import load_cases
from .knowns import load_facts
from .limits import (Estimate, ModelShape, check_count, check_memory, flops, format_bytes, forward_bytes,
                     memit_update_estimate, resident_memory, statistics_estimate, trace_estimate, value_estimate)
from .models import LanguageModel, cache_dir, model_skeleton
from .placement import describe, placement_arguments, resolve_dtype
from .subject import tokenize_with_subject
from .targets import target_ids
from .trace import DEFAULT_BATCH_TOKENS
from .trace_result import KINDS

Job = Literal["trace", "edit", "memit", "evaluate", "stats", "trace-dataset"]
JOBS: tuple[str, ...] = ("trace", "edit", "memit", "evaluate", "stats", "trace-dataset")
#: the request planned when a job names none (the README's example)
EXAMPLE = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")


@dataclass(frozen=True)
class Plan:
    """What a job needs: ``per_device`` bytes at the peak, ``seconds``, and how they add up.

    ``phases`` are the job's steps, each an :class:`~tracer.limits.Estimate` of what it holds
    beyond the runtime and the weights; the largest decides the peak. ``seconds`` is None when
    the throughput was not measured.
    """

    job: str
    model: str
    dtype: str
    device: str
    runtime_bytes: int
    weights: dict[str, int]
    phases: tuple[Estimate, ...]
    flops: float
    flops_per_second: float | None = None
    settings: dict = field(default_factory=dict)
    hint: str = ""
    staging_bytes: int = 0  # CPU bytes a load passes through before the weights move to another device

    @property
    def largest(self) -> Estimate:
        return max(self.phases, key=lambda e: e.bytes)

    @property
    def per_device(self) -> dict[str, int]:
        out = {d: b for d, b in self.weights.items()}
        out["cpu"] = out.get("cpu", 0) + self.runtime_bytes + self.staging_bytes
        out[self.device] = out.get(self.device, 0) + self.largest.bytes
        return out

    @property
    def peak_bytes(self) -> int:
        return sum(self.per_device.values())

    @property
    def seconds(self) -> float | None:
        return None if not self.flops_per_second else self.flops / self.flops_per_second

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "per_device": self.per_device, "seconds": self.seconds,
                "job": self.job, "model": self.model, "dtype": self.dtype, "device": self.device,
                "runtime_bytes": self.runtime_bytes, "weights": dict(self.weights), "largest_phase": self.largest.what,
                "phases": [{"name": e.what, "bytes": e.bytes, "parts": dict(e.parts), "work": e.work} for e in self.phases],
                "flops": self.flops, "flops_per_second": self.flops_per_second, "settings": dict(self.settings),
                "hint": self.hint, "staging_bytes": self.staging_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        phases = tuple(Estimate(p["name"], int(p["bytes"]), tuple((k, int(v)) for k, v in p["parts"].items()), float(p["work"]))
                       for p in d["phases"])
        return cls(job=d["job"], model=d["model"], dtype=d["dtype"], device=d["device"], runtime_bytes=int(d["runtime_bytes"]),
                   weights={k: int(v) for k, v in d["weights"].items()}, phases=phases, flops=float(d["flops"]),
                   flops_per_second=d["flops_per_second"], settings=dict(d["settings"]), hint=d.get("hint", ""),
                   staging_bytes=int(d.get("staging_bytes", 0)))

    def format(self) -> str:
        """A few lines for people: the peak per device, the time, the phases."""
        where = ", ".join(f"{d} {format_bytes(b)}" for d, b in self.per_device.items())
        time_ = f"about {self.seconds:,.0f} s on this machine" if self.seconds is not None else "time not measured"
        lines = [f"{self.job} on {self.model} ({self.dtype}, computing on {self.device}): peak {format_bytes(self.peak_bytes)} "
                 f"({where}); {time_}",
                 f"  runtime (this process now) {format_bytes(self.runtime_bytes)}; weights "
                 + ", ".join(f"{d} {format_bytes(b)}" for d, b in self.weights.items())]
        for e in self.phases:
            mark = "*" if e is self.largest else " "
            parts = ", ".join(f"{n} {format_bytes(b)}" for n, b in e.parts)
            lines.append(f" {mark}{e.what:<24} {format_bytes(e.bytes):>9}  ({parts})")
        return "\n".join(lines)


def check_plan(p: Plan, available: "dict[str, int] | None" = None) -> None:
    """:class:`~tracer.errors.JobTooLargeError` (one line: the estimate and the limit) when a device
    lacks what ``p`` needs there beyond what this process already holds; ``available`` overrides
    :func:`tracer.limits.available_memory` per device."""
    for device, need in p.per_device.items():
        beyond = need - (p.runtime_bytes if device == "cpu" else 0)  # the runtime is resident already
        parts = [("weights", p.weights.get(device, 0))] + (list(p.largest.parts) if device == p.device else [])
        check_memory(Estimate(f"this {p.job}", beyond, tuple(parts)), device,
                     available=None if available is None else available.get(device), hint=p.hint)


def measure_throughput(device: "torch.device | str" = "cpu", dtype: "torch.dtype | str" = torch.float32,
                       seconds: float = 0.25, size: int = 512) -> float:
    """FLOP/s of ``size x size`` matrix products in ``dtype`` on ``device``, timed for ``seconds``."""
    device, dtype = torch.device(device), resolve_dtype(dtype)
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    (a @ b).sum().item()  # warm-up
    runs, started = 0, time.perf_counter()
    while True:
        c = a @ b
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            del c
            return 2.0 * size ** 3 * runs / elapsed


def plan(job: str, model: "str | LanguageModel" = "smollm2-135m", *, dtype: "torch.dtype | str | None" = None,
         device: "str | None" = None, device_map=None, max_memory=None, measure: bool = True, **sizes: Any) -> Plan:
    """Plan ``job`` (one of :data:`JOBS`) on ``model`` (a name, built as a skeleton, or a
    :class:`LanguageModel`, e.g. a skeleton already built) with the job's own sizes:

    - ``trace``: ``prompt``, ``subject`` (or ``tokens``), ``samples``, ``kinds``, ``window``, ``naive``, ``severed``;
    - ``edit``: ``prompt`` (with ``{}``), ``subject``, ``target``, ``layer``, ``steps``, ``stats_tokens``;
    - ``memit``: ``edits`` (the first records of ``dataset``, or ``requests``), ``layers``, ``chunk_requests``,
      ``memory_mb``, ``stats_tokens`` (0: C = I);
    - ``evaluate``: ``method`` (none, ft-l, rome, memit, alphaedit), ``edits``, ``batch_size``, ``generation``, ``workers``;
    - ``stats``: ``layers``, ``stats_tokens``, ``chunk_tokens``;
    - ``trace-dataset``: ``facts`` (a facts file), ``limit``, ``samples``, ``kinds``, ``window``, ``workers``.
    """
    if job not in JOBS:
        raise HyperParameterError(f"job must be one of {', '.join(JOBS)}, got {job!r}")
    dtype_ = resolve_dtype(dtype)
    placement = placement_arguments(device, device_map, max_memory, None)
    lm = model if isinstance(model, LanguageModel) else model_skeleton(model, dtype_)
    shape = ModelShape.of(lm)
    weights, compute = _weights(lm, shape, placement, dtype_)
    phases, work, logit_rows, hint, settings = _JOBS[job](lm, shape, compute, **sizes)
    # tracer.models.load_model reads the weights on the CPU, then moves them to a single other device
    staging = shape.weight_bytes if compute.type != "cpu" and "device_map" not in placement else 0
    rate = measure_throughput(compute, dtype_) if measure else None
    return Plan(job=job, model=lm.name, dtype=str(dtype_).removeprefix("torch."), device=_name(compute),
                runtime_bytes=resident_memory(), weights=weights, phases=phases, flops=flops(shape, work, logit_rows),
                flops_per_second=rate, settings=settings, hint=hint, staging_bytes=staging)


# ---------------------------------------------------------------------------- placement


def _name(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def _weights(lm: LanguageModel, shape: ModelShape, placement: dict, dtype: torch.dtype) -> tuple[dict[str, int], torch.device]:
    """Bytes of weights per device and the device the job computes on (where the embeddings are)."""
    if "device_map" not in placement:
        device = placement["device"]
        return {_name(device): shape.weight_bytes}, device
    try:
        mapping = placement["device_map"] if isinstance(placement["device_map"], dict) else infer_auto_device_map(
            lm.model, max_memory=placement.get("max_memory"), dtype=dtype,
            no_split_module_classes=getattr(lm.model, "_no_split_modules", None) or [])
    except ValueError as e:
        raise HyperParameterError(f"cannot place the model with {describe(placement)}: {' '.join(str(e).split())}") from None
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, where in mapping.items():
        key = "cpu" if where in ("cpu", "disk") else _name(torch.device(where if isinstance(where, str) else f"cuda:{where}"))
        module = lm.model.get_submodule(name) if name else lm.model
        for p in module.parameters():
            if id(p) not in seen and where != "disk":  # offloaded layers pass through one at a time
                seen.add(id(p))
                out[key] = out.get(key, 0) + p.numel() * p.element_size()
    embed = next((w for n, w in mapping.items() if lm.layers.embed.startswith(n)), "cpu")
    compute = torch.device("cpu" if embed in ("cpu", "disk") else embed if isinstance(embed, str) else f"cuda:{embed}")
    return out, compute


# ---------------------------------------------------------------------------- jobs


def _trace(lm, shape, device, *, prompt: str | None = None, subject: str | None = None, tokens: int = 12,
           samples: int = 10, kinds: Sequence[str] = ("hidden",), window: int = 10, naive: bool = False,
           severed: str | None = None, batch_tokens: int | None = None, facts: int = 1):
    check_count("samples", samples)
    check_count("window", window)
    kinds = tuple(KINDS if kinds in ("all", ("all",)) else ((kinds,) if isinstance(kinds, str) else kinds))
    if prompt is not None:
        ids, span = tokenize_with_subject(lm.tokenizer, prompt, subject or prompt, lm.max_length)
        n = len(ids)
    else:
        n, span = tokens, (1, min(tokens, 4))
    budget = batch_tokens or DEFAULT_BATCH_TOKENS.get(device.type, DEFAULT_BATCH_TOKENS["cpu"])
    est = trace_estimate(shape, n_tokens=n, subject=span, samples=samples, n_kinds=len(kinds), severed=severed is not None,
                         naive=naive, batch_tokens=budget, window=window)
    scored = len(kinds) * n * shape.n_layers * (samples + 1) * (n if naive else 1)
    settings = {"tokens": n, "subject": list(span), "samples": samples, "kinds": list(kinds), "window": window,
                "naive": naive, "batch_tokens": budget, "facts": facts}
    return (est,), est.work * facts, scored * facts, f"lower samples ({samples}) or shorten the prompt ({n} tokens)", settings


def _requests(lm, edits: int | None, requests, dataset: str) -> list:
    if requests is not None:
        return [Request.coerce(r) for r in requests]
    n = check_count("--edits", edits if edits is not None else 1, (1, 1_000_000))
    try:
        cases = [Request.coerce(c) for c in load_cases(dataset, limit=n)]
    except FactscopeError:  # no dataset here: the example request stands in
        cases = []
    return cases + [Request.coerce(EXAMPLE)] * (n - len(cases))


def _rows(lm, requests, template_tokens: int, n_templates: int, chunk: int | None = None) -> dict:
    """The v* engine's rows for ``chunk`` requests at a time (default all): every template row and
    one KL row per request, aligned on the last subject token and as wide as the widest request
    (:func:`tracer.edit.zs.extent`), with the target tokens of the ``chunk`` longest targets."""
    extents = [extent(lm, r.edit_request()) for r in requests]
    n = len(requests) if chunk is None else chunk
    n_target = sorted((len(target_ids(lm.tokenizer, r.target_new)) for r in requests), reverse=True)[:n]
    return {"rows": n * (n_templates + 1), "prefix": max(p for _, p in extents) + template_tokens,
            "suffix": max(s for s, _ in extents), "picked": sum(n_target) * n_templates + n}


def _edit(lm, shape, device, *, prompt: str = EXAMPLE.prompt, subject: str = EXAMPLE.subject,
          target: str = EXAMPLE.target_new, layer: int | None = None, steps: int | None = None,
          stats_tokens: int | None = None, check: bool = True):
    overrides = {k: v for k, v in (("layer", layer), ("v_num_grad_steps", steps), ("stats_tokens", stats_tokens)) if v is not None}
    hp = ROMEHyperParams.for_model(lm, **overrides)
    request = EditRequest(prompt, subject, target)
    n_templates = 1 + sum(c for _, c in hp.context_template_lengths)
    longest = max((t for t, c in hp.context_template_lengths if c), default=0)
    geo = _rows(lm, [Request.coerce(request)], longest + 1, n_templates)
    c = shape.intermediate * shape.intermediate * 8  # C, float64, held from the statistics on
    phases, work = _statistics(lm, shape, [hp.layer], hp.stats_tokens, None) if hp.stats_tokens else ((), 0.0)
    v = value_estimate(shape, layer=hp.layer, steps=hp.v_num_grad_steps, **geo)
    update = 2 * shape.hidden * shape.intermediate * 8 + 2 * c  # W in float64, its product; C and its factor
    phases += (_with(v, "v* optimisation", ("C", c)),
               Estimate("rank-one update", c + update, (("C", c), ("W in float64 and C's factor", update))))
    if check:
        phases += (_generation(shape, rows=4, length=max(40, geo["prefix"] + 20), what="checks and generations"),)
    settings = {"layer": hp.layer, "steps": hp.v_num_grad_steps, "stats_tokens": hp.stats_tokens,
                "templates": n_templates, **geo}
    return phases, work + v.work, geo["picked"] * hp.v_num_grad_steps, "shorten the prompt or the target", settings


def _memit(lm, shape, device, *, edits: int | None = None, requests=None, dataset: str = "counterfact",
           layers: Sequence[int] | None = None, chunk_requests: int | None = None, memory_mb: int | None = None,
           stats_tokens: int | None = None, projected: bool = False):
    overrides = {k: v for k, v in (("layers", layers), ("chunk_requests", chunk_requests), ("memory_mb", memory_mb),
                                   ("mom2_n_tokens", stats_tokens)) if v is not None}
    hp = MemitHyperParams.for_model(lm, **overrides)
    reqs = _requests(lm, edits, requests, dataset)
    n_templates = 1 + 5 * hp.context_templates_per_start
    chunk = min(len(reqs), hp.chunk_requests or auto_chunk(lm, hp, n_templates))
    geo = _rows(lm, reqs, hp.context_template_length + 1, n_templates, chunk=max(1, chunk))
    c = len(hp.layers) * shape.intermediate ** 2 * 8 if hp.mom2_n_tokens else 0  # 0 tokens: C = I
    phases, work = _statistics(lm, shape, list(hp.layers), hp.mom2_n_tokens, None) if hp.mom2_n_tokens else ((), 0.0)
    z = value_estimate(shape, layer=hp.layers[-1], steps=hp.v_steps, **geo)
    batch_rows = max(8, hp.chunk_requests * n_templates if hp.chunk_requests else 256)
    upd = memit_update_estimate(shape, requests=len(reqs), templates=n_templates, layers=len(hp.layers),
                                batch_rows=min(batch_rows, len(reqs) * n_templates), width=geo["prefix"] + geo["suffix"],
                                deepest=hp.layers[-1])
    chunks = math.ceil(len(reqs) / max(1, chunk))
    if projected:  # AlphaEdit: P and K_p K_pᵀ per layer kept in float64, eigh's workspace for one layer
        kept = 2 * len(hp.layers) * shape.intermediate ** 2 * 8
        upd = _with(upd, "AlphaEdit update", ("null-space projectors and K_p K_pᵀ", kept),
                    ("eigendecomposition", 3 * shape.intermediate ** 2 * 8))
        work += len(hp.layers) * 10 * shape.intermediate ** 3
    else:
        upd = _with(upd, "MEMIT update")
    phases += (_with(z, f"z ({chunk} requests per chunk)", ("C of every layer", c)), upd)
    settings = {"edits": len(reqs), "layers": list(hp.layers), "chunk_requests": chunk, "templates": n_templates, **geo}
    return (phases, work + chunks * z.work + upd.work, chunks * geo["picked"] * hp.v_steps,
            f"edit fewer facts at once ({len(reqs)}) or set chunk_requests", settings)


def _evaluate(lm, shape, device, *, method: str = "rome", edits: int = 1, requests=None, batch_size: int | None = None,
              generation: bool = True, dataset: str = "counterfact", workers: int = 1, **method_sizes):
    if method not in ("none", "ft-l", "rome", "memit", "alphaedit"):
        raise HyperParameterError(f"method must be none, ft-l, rome, memit or alphaedit, got {method!r}")
    reqs = _requests(lm, edits, requests, dataset)
    batch = len(reqs) if method in ("memit", "alphaedit") and batch_size is None else (batch_size or 1)
    if method in ("memit", "alphaedit"):
        phases, work, logits, hint, settings = _memit(lm, shape, device, requests=reqs[:batch],
                                                      projected=method == "alphaedit", **method_sizes)
        work *= math.ceil(len(reqs) / batch)
    elif method in ("rome", "ft-l"):  # FT-L: gradients through the same rows, one layer's weights trained
        r = reqs[0]
        phases, work, logits, hint, settings = _edit(lm, shape, device, prompt=r.prompt, subject=r.subject,
                                                     target=r.target_new, check=False, **method_sizes)
        work *= len(reqs)
    else:
        phases, work, logits, hint, settings = (), 0.0, 0.0, "", {}
    scoring = Estimate("scoring", forward_bytes(shape, 64, 32, logit_positions=32), (("a batch of 64 prompts", 0),))
    phases += (scoring,) + ((_generation(shape, rows=10, length=100, what="generations"),) if generation else ())
    work += len(reqs) * 64 * 32 * shape.n_layers
    phases = _on_workers(shape, phases, workers, lambda e: e.what)
    return phases, work, logits, hint or f"evaluate fewer records ({len(reqs)})", {
        **settings, "method": method, "batch_size": batch, "records": len(reqs), "workers": workers}


def _stats(lm, shape, device, *, layers: Sequence[int] | None = None, stats_tokens: int = 100_000,
           chunk_tokens: int | None = None):
    layers = list(layers) if layers is not None else [ROMEHyperParams.for_model(lm).layer]
    bad = [l for l in layers if not 0 <= l < lm.n_layers]
    if bad:
        raise HyperParameterError(f"layer {bad[0]} does not exist: {lm.name} has layers 0..{lm.n_layers - 1}")
    phases, work = _statistics(lm, shape, layers, stats_tokens, chunk_tokens, cached_too=True)
    return phases, work, 0.0, f"lower the token count ({stats_tokens})", {"layers": layers, "stats_tokens": stats_tokens}


def _trace_dataset(lm, shape, device, *, facts=None, limit: int | None = None, workers: int = 1, **trace_sizes):
    rows = load_facts(facts if facts is not None else data_file(KNOWNS))[:limit]
    if not rows:
        raise HyperParameterError("the facts file holds no facts")
    longest = max(rows, key=lambda f: len(lm.encode(f["prompt"])))
    phases, work, logits, hint, settings = _trace(lm, shape, device, prompt=longest["prompt"], subject=longest["subject"],
                                                  facts=len(rows), **trace_sizes)
    phases = _on_workers(shape, phases, workers, lambda e: "traces")
    return phases, work, logits, hint, {**settings, "workers": workers, "longest_prompt": longest["prompt"]}


def _on_workers(shape: ModelShape, phases: tuple[Estimate, ...], workers: int, what) -> tuple[Estimate, ...]:
    """``phases`` run on ``workers`` Ray workers at once (one machine), each holding its own model
    and runtime beside this process: every phase held ``workers`` times; ``what(phase)`` names it."""
    if workers <= 1:
        return phases
    out = []
    for e in phases:
        per = e.bytes + shape.weight_bytes + resident_memory()
        out.append(Estimate(f"{workers} workers' {what(e)}", workers * per, (("one worker", per),), e.work))
    return tuple(out)


_JOBS = {"trace": _trace, "edit": _edit, "memit": _memit, "evaluate": _evaluate, "stats": _stats,
         "trace-dataset": _trace_dataset}


# ---------------------------------------------------------------------------- shared phases


def _with(e: Estimate, what: str, *held: tuple[str, int]) -> Estimate:
    """``e`` renamed ``what``, with ``held`` (name, bytes) kept beside it."""
    return Estimate(what, e.bytes + sum(b for _, b in held), tuple(e.parts) + tuple(held), e.work)


def _generation(shape: ModelShape, *, rows: int, length: int, what: str) -> Estimate:
    cache = 2 * shape.n_layers * rows * length * shape.kv_dim * shape.itemsize
    fwd = forward_bytes(shape, rows, length)
    return Estimate(what, fwd + cache, (("forward pass", fwd), ("key/value cache", cache)), float(rows * length * shape.n_layers))


def _statistics(lm, shape, layers, n_tokens, chunk_tokens, cached_too: bool = False) -> tuple[tuple[Estimate, ...], float]:
    """The key-statistics phase of ``layers`` (its memory always; its work only for layers whose
    cache file is missing, found by name in ``$FACTSCOPE_CACHE/stats``: the weights' fingerprint
    that completes the key needs the weights)."""
    chunk = chunk_tokens or min(1024, lm.max_length)
    est = statistics_estimate(shape, layer=max(layers), n_tokens=n_tokens, chunk_tokens=chunk)
    folder = cache_dir() / "stats"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(lm.name).name)[:40] or "model"  # tracer.stats.StatsCache's names
    missing = [l for l in layers if cached_too or not any(folder.glob(f"{slug}-L{l}-{n_tokens}tok-*.safetensors"))]
    work = sum(n_tokens * (l + 1) for l in missing)
    return (_with(est, f"key statistics ({len(missing)} of {len(layers)} to compute)"),), float(work)
