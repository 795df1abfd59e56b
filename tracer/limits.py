"""Limits: what a job needs, what the machine has, and the refusals that come before heavy work.

    check_prompt_length(len(ids), lm.max_length, "check prompt 2")   # PromptError: count and limit
    ids = prompt_ids(lm, prompt, what="the prompt", reserve=19, reserved_for="generated tokens")
    check_seed(seed); check_count("samples", samples)                # ranges in COUNT_LIMITS
    est = trace_estimate(ModelShape.of(lm), n_tokens=12, subject=(1, 4), samples=10)
    check_memory(est, lm.device, hint="lower --samples or shorten the prompt")
    value_estimate(ModelShape.of(lm), rows=22, prefix=6, suffix=8, layer=4, picked=30, steps=20)  # v*, z

Every refusal is one line saying the estimate (or the count) and the limit. Memory estimates are
upper-bound-minded sums of the arrays the engine allocates (see :func:`trace_estimate`), in
bytes, compared with the memory available now (``psutil`` or ``/proc/meminfo`` for the CPU,
``torch.cuda.mem_get_info`` for CUDA). They are deliberately simple so that the planner
(:mod:`tracer.plan`) can show them before a job starts, from a model's config alone; they are
not a profiler. ``Estimate.work`` counts token-layers; :func:`flops` turns it into FLOPs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .errors import HyperParameterError, JobTooLargeError, PromptError



class _Model(Protocol):
    """What the checks read of a :class:`tracer.models.LanguageModel` (this module sits below it)."""

    model: torch.nn.Module
    layers: Any  # tracer.layers.LayerMap
    max_length: int
    hidden_size: int
    n_layers: int

    def encode(self, text: str) -> list[int]: ...

try:  # optional: a better "available" figure on every OS; /proc/meminfo otherwise
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

#: NumPy's RandomState (ROME's noise) takes seeds in [0, 2**32); one range for every seed
SEED_LIMIT = 2 ** 32

#: accepted ranges of counts that drive time or memory: name -> (lowest, highest)
COUNT_LIMITS: dict[str, tuple[int, int]] = {
    "samples": (1, 100_000),       # noise samples per restoration (ROME uses 10)
    "n_boot": (0, 100_000),        # bootstrap resamples (the averages use 1,000)
    "batch_tokens": (1, 1 << 26),  # rows x positions per forward pass of the trace engine
    "runs": (1, 100_000),          # copies of a prompt in one logit-lens batch
    "steps": (1, 10_000),          # optimisation steps of v* / z (ROME uses 20-25)
    "window": (1, 10_000),         # MLP / attention layers restored together (ROME uses 10)
}


# ---------------------------------------------------------------------------- prompts, seeds, counts


def _excerpt(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def check_prompt_length(n_tokens: int, max_length: int, what: str = "the prompt", *, reserve: int = 0,
                        reserved_for: str = "") -> None:
    """:class:`PromptError` unless ``n_tokens + reserve`` positions fit the model's ``max_length``.

    ``reserve``: positions the job appends to the prompt (target tokens, generated tokens).
    The one prompt-length check of factscope: every place that tokenises a prompt calls it.
    """
    if n_tokens + reserve <= max_length:
        return
    if reserve:
        raise PromptError(f"{what} has {n_tokens} tokens and {reserve} more are needed for {reserved_for or 'the job'}: "
                          f"{n_tokens + reserve} positions, but the model reads at most {max_length}; shorten it")
    raise PromptError(f"{what} has {n_tokens} tokens but the model reads at most {max_length}; shorten it")


def prompt_ids(lm: _Model, prompt: str, what: str = "the prompt", *, reserve: int = 0,
               reserved_for: str = "") -> list[int]:
    """Token ids of ``prompt`` (special tokens included) after :func:`check_prompt_length`.

    :class:`PromptError` for a non-string or blank prompt too; ``what`` names it in messages
    (the prompt's first 40 characters are added).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{what} must be a non-empty string, got {_excerpt(prompt) if isinstance(prompt, str) else prompt!r}")
    ids = lm.encode(prompt)
    check_prompt_length(len(ids), lm.max_length, f"{what} {_excerpt(prompt)}", reserve=reserve, reserved_for=reserved_for)
    return ids


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**32)`` (NumPy's range, used for every seed); else an error."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise HyperParameterError(f"{name} must be a whole number in [0, {SEED_LIMIT - 1}], got {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise HyperParameterError(f"{name} must be a whole number in [0, {SEED_LIMIT - 1}] (NumPy's seed range), got {seed}")
    return int(seed)


def check_count(name: str, value, limits: tuple[int, int] | None = None) -> int:
    """``value`` as an int inside ``limits`` (default :data:`COUNT_LIMITS` ``[name]``, a leading
    ``--`` and dashes ignored, so ``"--n-boot"`` names ``n_boot``); else an error."""
    lo, hi = limits if limits is not None else COUNT_LIMITS[name.lstrip("-").replace("-", "_")]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HyperParameterError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    if int(value) < lo:
        raise HyperParameterError(f"{name} must be a whole number in [{lo}, {hi}], got {value}")
    if int(value) > hi:
        raise JobTooLargeError(f"{name}={value} is more than the {hi} factscope accepts; use a value in [{lo}, {hi}]")
    return int(value)


# ---------------------------------------------------------------------------- memory


def format_bytes(n: float) -> str:
    """``1.5 GB``-style size (powers of 1,000)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


#: environment variable capping the memory factscope plans to use (bytes, or e.g. ``8GB``, ``500MB``)
MEMORY_LIMIT_ENV = "FACTSCOPE_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: "str | int", what: str) -> int:
    """Bytes in ``text``: a whole number of bytes or a number with kB, MB, GB, TB (powers of 1,000)
    or KiB, MiB, GiB, TiB (powers of 1,024), e.g. ``8GB``, ``300MiB``; ``what`` (the setting and
    its value) starts the error message."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        number = raw.rstrip("bBiIkKmMgGtT ")
        unit = raw[len(number):].strip().upper()
        unit = unit if unit in _UNITS else unit + "B"
        try:
            value = float(number) * _UNITS[unit]
        except (ValueError, KeyError):
            value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise HyperParameterError(f"{what} is not a size; use bytes or a number with kB, MB, GB, TB "
                                  "or KiB, MiB, GiB, TiB, e.g. 8GB or 300MiB")
    return int(value)


def memory_cap() -> int | None:
    """``$FACTSCOPE_MEMORY_LIMIT`` in bytes (None when unset): a cap below what the machine has,
    for shared machines and for planning."""
    raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    return parse_size(raw, f"{MEMORY_LIMIT_ENV}={raw!r}") if raw else None


def available_memory(device: "torch.device | str" = "cpu") -> int | None:
    """Bytes a new job can allocate on ``device`` now, at most :func:`memory_cap`; None when
    unknown and uncapped (then nothing is refused)."""
    measured = _measured_memory(torch.device(device))
    cap = memory_cap()
    if cap is None or measured is None:
        return cap if measured is None else measured
    return min(cap, measured)


def resident_memory() -> int:
    """Bytes this process holds in memory now (its resident set: Python, torch, libraries, models)."""
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    return _proc_bytes("/proc/self/status", "VmRSS:") or 0


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key`` line of a ``/proc`` file (kB) in bytes, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _measured_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    available = _proc_bytes("/proc/meminfo", "MemAvailable:")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a model that memory estimates need (read from its config and weights)."""

    n_layers: int
    hidden: int
    intermediate: int  # MLP inner width
    heads: int
    kv_dim: int  # key (= value) width per token per layer: key/value heads x head size
    vocab: int
    max_length: int
    itemsize: int  # bytes per activation element (the weights' dtype)
    eager_attention: bool = False  # attention scores materialised ("eager"), not fused (sdpa, flash)
    layer_params: int = 0  # parameters of one block: a token through it costs 2 x this FLOPs
    params: int = 0  # parameters of the whole model, tied ones once (its weights: params x itemsize)

    @classmethod
    def of(cls, lm: _Model) -> "ModelShape":
        cfg = lm.model.config
        hidden = lm.hidden_size

        def first(*names, default):
            for n in names:
                v = getattr(cfg, n, None)
                if isinstance(v, int) and v > 0:
                    return v
            return default

        heads = first("num_attention_heads", "n_head", default=1)
        head_dim = first("head_dim", default=max(1, hidden // heads))
        kv_heads = first("num_key_value_heads", default=heads)
        out = lm.model.get_output_embeddings()
        vocab = int(out.weight.shape[0]) if out is not None else first("vocab_size", default=hidden)
        block = lm.model.get_submodule(lm.layers.block_name(0))
        return cls(n_layers=lm.n_layers, hidden=hidden, intermediate=first("intermediate_size", "n_inner", default=4 * hidden),
                   heads=heads, kv_dim=kv_heads * head_dim, vocab=vocab, max_length=lm.max_length,
                   itemsize=next(lm.model.parameters()).element_size(),
                   eager_attention=getattr(cfg, "_attn_implementation", "eager") in (None, "eager"),
                   layer_params=sum(p.numel() for p in block.parameters()),
                   params=sum(p.numel() for p in lm.model.parameters()))

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights (``params x itemsize``; 0 when the shape was written by hand)."""
        return self.params * self.itemsize


@dataclass(frozen=True)
class Estimate:
    """What a job needs: ``bytes`` at its peak (the sum of ``parts``) and ``work`` in token-layers
    (one token through one layer; a planner turns it into seconds with a measured rate)."""

    what: str
    bytes: int
    parts: tuple[tuple[str, int], ...] = field(default=())
    work: float = 0.0

    def largest(self) -> str:
        name, size = max(self.parts, key=lambda p: p[1]) if self.parts else ("all", self.bytes)
        return f"{name} {format_bytes(size)}"


def forward_bytes(shape: ModelShape, rows: int, positions: int, prefix: int = 0, logit_positions: int = 1) -> int:
    """Peak activation bytes of one no-grad forward pass of ``rows x positions`` tokens.

    Per layer (freed before the next): residual, norm, attention and hook copies (``4 hidden``),
    MLP inner activations (``2 intermediate``; gate, up and their product), and with eager
    attention the scores ``rows x heads x positions x (prefix + positions)`` (fused attention does
    not materialise them), all doubled because an operation's input and output coexist; plus the
    logits, their float32 copy (none when they are float32 already) and softmax at
    ``logit_positions`` positions per row. Checked against the peak resident memory of real jobs
    (``bench/plan_accuracy.py``).
    """
    per_token = 2 * (4 * shape.hidden + 2 * shape.intermediate)
    scores = 2 * shape.heads * positions * (prefix + positions) if shape.eager_attention else 0
    per_logit = shape.itemsize + 4 + (4 if shape.itemsize != 4 else 0)
    return rows * (positions * per_token + scores) * shape.itemsize + rows * logit_positions * shape.vocab * per_logit


def trace_estimate(shape: ModelShape, *, n_tokens: int, subject: tuple[int, int], samples: int, n_kinds: int = 1,
                   severed: bool = False, naive: bool = False, batch_tokens: int = 6144, window: int = 10) -> Estimate:
    """Memory and work of :func:`tracer.trace.trace_all` for one prompt, as the engine allocates:

    - ``noise``: ``samples x subject_tokens x hidden`` float64, drawn and scaled (two copies);
    - ``clean states``: every traced site at every position, ``(kinds + 1) x layers x tokens x hidden``;
    - ``corrupted states``: the block outputs (and the severed kind's) of the corrupted run,
      ``samples x tokens x hidden`` per layer, and its keys/values ``2 x samples x tokens x kv_dim``;
    - the larger of the corrupted forward pass and one restored batch: the batched engine packs
      at most ``max(1, batch_tokens // (samples x suffix))`` restorations of ``samples`` rows over the
      suffix from the first subject token, with the corrupted prefix as cache and the starting
      states repeated per row; the naive engine runs ``samples + 1`` full rows with full logits.
    """
    b, e = subject
    n_sub, layers = e - b, shape.n_layers
    item = shape.itemsize
    noise = 2 * samples * n_sub * shape.hidden * 8
    clean = (n_kinds + 1) * layers * n_tokens * shape.hidden * item
    states = (1 + int(severed)) * layers * samples * n_tokens * shape.hidden * item
    kv = 2 * layers * samples * n_tokens * shape.kv_dim * item
    corrupted_pass = forward_bytes(shape, samples, n_tokens)
    suffix, prefix = n_tokens - b, b
    if naive:
        rows = samples + 1
        batch = forward_bytes(shape, rows, n_tokens, logit_positions=n_tokens)
    else:
        per_batch = min(layers, max(1, batch_tokens // max(1, samples * suffix)))
        rows = per_batch * samples
        batch = (forward_bytes(shape, rows, suffix, prefix)
                 + rows * suffix * shape.hidden * item  # starting states repeated per row
                 # the prefix cache repeated per row, kept while each layer's cache grows into a new
                 # tensor of every position (old and new coexist)
                 + 2 * layers * rows * (n_tokens + prefix) * shape.kv_dim * item)
    parts = (("noise", noise), ("clean states", clean), ("corrupted states", states + kv),
             ("forward pass", max(corrupted_pass, batch)))
    # work: the two full runs, then per kind every traced token t >= b restores each layer's window,
    # running samples x (n - t) tokens through the layers from the window's first layer up
    full = (1 + samples) * n_tokens * layers
    if naive:
        work = full + n_kinds * n_tokens * layers * (samples + 1) * n_tokens * layers
    else:
        token_sum = suffix * (suffix + 1) / 2  # sum over t in [b, n) of (n - t)
        layer_sum = sum(layers - max(0, layer - window // 2) for layer in range(layers))
        work = full + n_kinds * samples * token_sum * layer_sum
    return Estimate(what="this trace", bytes=int(sum(p for _, p in parts)), parts=parts, work=float(work))


def flops(shape: ModelShape, token_layers: float, logit_rows: float = 0.0) -> float:
    """FLOPs of ``token_layers`` (one token through one block: two per block parameter; 12 hidden²
    parameters when the shape does not say) and ``logit_rows`` unembedded positions."""
    per_layer = shape.layer_params or 12 * shape.hidden ** 2
    return 2.0 * (token_layers * per_layer + logit_rows * shape.hidden * shape.vocab)


def value_estimate(shape: ModelShape, *, rows: int, prefix: int, suffix: int, layer: int, picked: int,
                   steps: int) -> Estimate:
    """Memory and work of the v* engine (:func:`tracer.edit.values.compute_v`, fast engine): ROME's
    v* and MEMIT's z for ``rows`` rows aligned on the last subject token, ``prefix`` positions
    before it and ``suffix`` from it, optimised at ``layer`` with ``picked`` unembedded positions:

    - ``prefix cache``: keys/values of every layer before the last subject token, and the block
      output from it (held for the whole optimisation);
    - ``forward and backward``: the larger of the first pass (every position, its key/value cache)
      and one step: what autograd keeps for the blocks above ``layer`` (about 10 hidden +
      4 intermediate per token, the figure :func:`tracer.edit.zs.auto_chunk` uses), the caches
      those blocks extend (old and new), the picked logits in float32 (log-softmax and gradient)
      and one block's working set of the backward pass.
    """
    n_layers, item = shape.n_layers, shape.itemsize
    above, width, kv = max(0, n_layers - layer - 1), prefix + suffix, 2 * shape.kv_dim * item  # kv: per token-layer
    held = n_layers * rows * prefix * kv + rows * suffix * shape.hidden * item
    first = forward_bytes(shape, rows, width, logit_positions=0) + n_layers * rows * width * kv
    step = (rows * suffix * above * (10 * shape.hidden + 4 * shape.intermediate) * item + 2 * above * rows * width * kv
            + picked * shape.vocab * 4 * 3 + forward_bytes(shape, rows, suffix, prefix, logit_positions=0))
    parts = (("prefix cache", held), ("forward and backward", max(first, step)))
    work = rows * width * n_layers + steps * 3 * rows * suffix * above  # a backward pass costs about two forwards
    return Estimate(what="this optimisation", bytes=held + max(first, step), parts=parts, work=float(work))


def statistics_estimate(shape: ModelShape, *, layer: int, n_tokens: int, chunk_tokens: int) -> Estimate:
    """Memory and work of key statistics C at ``layer`` (:func:`tracer.stats.compute_key_statistics`):
    one chunk's forward pass up to the layer, its keys (and their float64 copy), the running and the
    part's sums of k kᵀ in float64 (and the part's copy), and the corpus's token ids."""
    d_k = shape.intermediate
    parts = (("forward pass", forward_bytes(shape, 1, chunk_tokens, logit_positions=0)),
             ("keys", chunk_tokens * d_k * (shape.itemsize + 8)), ("sums of k kᵀ", 3 * d_k * d_k * 8),
             ("token ids", n_tokens * 8))
    return Estimate(what="these key statistics", bytes=sum(b for _, b in parts), parts=parts,
                    work=float(n_tokens * (layer + 1)))


def memit_update_estimate(shape: ModelShape, *, requests: int, templates: int, layers: int, batch_rows: int,
                          width: int, deepest: int) -> Estimate:
    """Memory and work of MEMIT's update after z (:func:`tracer.edit.memit.compute_memit`): C for
    every edited layer (float64) and the edited weights' originals and ΔW held throughout; per
    layer, a key pass of ``batch_rows`` rows of ``width`` tokens up to block ``deepest``, the keys
    of all ``requests x templates`` rows, and the float64 solve (K, λC + K Kᵀ and its Cholesky
    factor, A⁻¹K, R, ΔW)."""
    d_k, hidden, n = shape.intermediate, shape.hidden, requests
    held = layers * (d_k * d_k * 8 + hidden * d_k * (shape.itemsize + 4)) + n * hidden * 4
    keys = (forward_bytes(shape, batch_rows, width, logit_positions=0)
            + n * templates * (d_k + hidden) * shape.itemsize * 2)  # keys and z, read and put back in order
    solve = 2 * d_k * d_k * 8 + 3 * d_k * n * 8 + hidden * n * 8 + hidden * d_k * (8 + 4)
    parts = (("C, originals and ΔW", held), ("keys and solve", max(keys, solve)))
    return Estimate(what="this MEMIT update", bytes=held + max(keys, solve), parts=parts,
                    work=float(layers * n * templates * width * (deepest + 1)))


def check_memory(estimate: Estimate, device: "torch.device | str" = "cpu", *, available: int | None = None,
                 hint: str = "") -> None:
    """:class:`JobTooLargeError` when ``estimate.bytes`` exceeds the memory available on ``device``
    (``available`` overrides the measurement); the message says both and what to change."""
    device = torch.device(device)
    limit = available if available is not None else available_memory(device)
    if limit is None or estimate.bytes <= limit:
        return
    raise JobTooLargeError(f"{estimate.what} needs about {format_bytes(estimate.bytes)} of {device.type} memory "
                           f"(largest part: {estimate.largest()}) but {format_bytes(limit)} is available"
                           f"{'; ' + hint if hint else ''}")

