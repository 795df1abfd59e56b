"""MEMIT (Meng et al. 2023): many facts written into a range of MLP layers at once.

    hp = MemitHyperParams.for_model(lm)                      # per-architecture defaults
    record = compute_memit(lm, requests, hp, stats=StatsCache(cache_dir() / "stats"))   # computed and applied
    record.revert(lm)                                        # bit-exact, in any order
    record.apply(lm)                                         # re-apply (also onto a fresh copy)
    records, health = sequential_memit(lm, requests, 100)    # tracer.edit.sequential

For a batch of requests (subject, prompt template with ``{}``, new target):

1. z_i at the last edited layer L: ROME's v* optimisation, batched over requests — a vector
   δ_i is added to the output of block L at the last subject token of every context-template
   prompt of request i, and optimised (Adam, ``v_steps``) so the new target's tokens become
   likely, with ROME's KL term on "{subject} is a", weight decay and norm clamp. Each request
   has its own δ and Adam state, so the batch equals the requests optimised one by one.
2. For each edited layer l in order: keys K ("d_k n", last subject token, averaged over context
   templates), the residual R = (z − h_L(current weights)) / (layers left), and
   ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ solved in float64 by Cholesky (``torch.linalg.solve`` if C is not
   positive definite) — never an explicit inverse. C = E[k kᵀ] comes from :mod:`tracer.stats`,
   read once on the unedited model.

A :class:`MemitRecord` keeps each layer's float32 ΔW (CPU). Applied, it also keeps on the CPU
the few elements where fl(W₁ − ΔW) misses the original bits, and a hash of each weight it wrote:
revert restores the original bits (after checking the weights are still what apply left), and
re-applying gives the same bits again. Every ΔW is checked finite before a weight is written.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from ..progress import tqdm

from ..errors import EditError, HyperParameterError
from ..layers import get_module
from ..models import LanguageModel, as_model
from ..stats import key_fingerprint
from .book import WeightBook
from .hparams import MemitHyperParams
from .keys import KeyRows, key_rows, read_keys
from .records import MemitRecord
from .requests import Request
from .statistics import checked_pairs
from .post_norm import PostNorm
from .templates import context_templates
from .zs import ZResult, compute_zs


@torch.no_grad()
def keys_and_z(lm: LanguageModel, rows: KeyRows, layer: int, z_layer: int, batch_rows: int,
                bar=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``layer`` ("n d_k", MEMIT's average over template groups: ``"{}"`` alone, then the
    generated ones) and block ``z_layer``'s output at the bare prompt's last subject token ("n hidden")."""
    k, z = read_keys(lm, rows, layer, z_layer=z_layer, batch_rows=batch_rows, bar=bar)
    keys = (k[:, 0] + k[:, 1:].mean(1)) / 2 if rows.n_templates > 1 else k[:, 0]
    return keys, z[:, 0]


def mlp_output(lm: LanguageModel, module: str, keys: torch.Tensor) -> torch.Tensor:
    """The MLP output projection's output for ``keys`` ("n d_k" -> "n hidden", float64)."""
    proj = get_module(lm.model, module)
    w = proj.weight.detach().double().to(keys.device)
    out = keys.double() @ (w if lm.layers.mlp_out_transposed else w.T)
    bias = getattr(proj, "bias", None)
    return out if bias is None else out + bias.detach().double().to(keys.device)


def solve_update(keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor | None, mom2_weight: float) -> torch.Tensor:
    """ΔW ("out d_k") = R Kᵀ (λC + K Kᵀ)⁻¹ in float64, for K = ``keys.T`` ("d_k n") and
    R = ``resid.T`` ("out n"); C = I when ``mom2`` is None. Cholesky, or LU solve if not PD."""
    K = keys.double().T
    Rm = resid.double().T
    C = torch.eye(K.shape[0], dtype=torch.float64, device=K.device) if mom2 is None else mom2.to(K.device, torch.float64)
    A = mom2_weight * C + K @ K.T
    chol, info = torch.linalg.cholesky_ex(A)
    adj = torch.cholesky_solve(K, chol) if int(info) == 0 else torch.linalg.solve(A, K)  # "d_k n" = A⁻¹K
    return Rm @ adj.T


def compute_memit(model: "LanguageModel | str", requests: Sequence[Any], hp: MemitHyperParams | None = None, *,
                  stats: Any = None, templates: Sequence[str] | None = None, progress: bool = True,
                  statistics: dict | None = None, apply: bool = True,
                  checkpoint_dir: str | Path | None = None,
                  update: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  zs: ZResult | None = None) -> MemitRecord:
    """Compute and apply one MEMIT batch; returns its record (already applied).

    ``apply=False`` returns the record with the model unchanged, e.g. to hand it to a
    :class:`tracer.edit.Ledger` (which then reverts batches and ROME edits in any order).
    ``checkpoint_dir`` keeps each chunk's z there, so an interrupted batch resumes (see :func:`compute_zs`).

    ``statistics`` (from :func:`load_statistics`) lets sequential batches reuse C computed on the
    unedited model. If anything fails midway, the weights are restored before the error propagates.

    ``update(layer, keys, resid)`` replaces MEMIT's solve (:func:`solve_update` with C and λ): ΔW
    ("hidden d_k") from the keys ("n d_k") and residuals ("n hidden") of each layer, in order, on
    the weights the lower layers' ΔW already changed (AlphaEdit's projected update).

    ``zs`` are the requests' z computed already (:func:`compute_zs` for the same requests, weights,
    hyper-parameters and templates, e.g. spread over Ray workers); they are not computed again.
    """
    lm = as_model(model)
    reqs = [Request.coerce(r) for r in requests]
    if not reqs:
        raise EditError("no requests to edit")
    hp = hp or MemitHyperParams.for_model(lm)
    if hp.layers[-1] >= lm.n_layers:
        raise HyperParameterError(f"layers must be < {lm.n_layers} for {lm.name}, got {list(hp.layers)}")
    t0 = time.perf_counter()
    statistics = checked_pairs(lm, hp, stats, statistics, progress)
    t_stats = time.perf_counter() - t0
    templates = tuple(templates) if templates is not None else context_templates(lm, hp)
    if zs is None:
        zres = compute_zs(lm, reqs, hp, templates, progress=progress, checkpoint_dir=checkpoint_dir)
    elif zs.layer != hp.layers[-1] or tuple(zs.z.shape) != (len(reqs), lm.hidden_size):
        raise EditError(f"the given z are {tuple(zs.z.shape)} at layer {zs.layer}; this batch needs "
                        f"({len(reqs)}, {lm.hidden_size}) at layer {hp.layers[-1]}")
    else:
        zres = zs
    bad = [i for i, ok in enumerate(torch.isfinite(zres.z).all(1).tolist()) if not ok]
    if bad:
        raise EditError(f"the target vectors z of {len(bad)} requests are not finite (first: {reqs[bad[0]].text!r}); "
                        "the model was left unchanged (lower v_lr or check the checkpoint files)")
    fingerprints = {layer: key_fingerprint(lm, layer) for layer in hp.layers}  # the model the batch is computed on
    modules = [lm.layers.mlp_out_name(l) for l in hp.layers]
    weights = [get_module(lm.model, n).weight for n in modules]
    originals = [w.detach().to("cpu", copy=True) for w in weights]  # restored on failure and before the record applies
    deltas: list[torch.Tensor] = []
    batch_rows = max(8, hp.chunk_requests * len(templates) if hp.chunk_requests else 256)
    t1 = time.perf_counter()
    rows = key_rows(lm, reqs, templates)
    post_norms = {l: PostNorm.of(lm, l) for l in hp.layers} if lm.layers.mlp_post_norm else {}
    shortfalls: list[torch.Tensor] = []  # per layer, "n": what the norm could not give
    bar = tqdm(total=len(hp.layers) * len(rows.ids), desc=f"MEMIT keys and update (layers {hp.layers[0]}-{hp.layers[-1]})",
               unit="row", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for i, layer in enumerate(hp.layers):
                keys, cur = keys_and_z(lm, rows, layer, hp.layers[-1], batch_rows, bar)
                resid = (zres.z.to(cur.device) - cur) / (len(hp.layers) - i)  # "n hidden"
                if layer in post_norms:  # the share carried back through the post-MLP norm (float64, as the solves read it)
                    resid, short = post_norms[layer].targets(mlp_output(lm, modules[i], keys), resid)
                    shortfalls.append(short)
                dw = (update(layer, keys, resid) if update is not None
                      else solve_update(keys, resid, statistics[layer][0], hp.mom2_weight)).float()  # "hidden d_k"
                w = weights[i]
                stored = (dw.T if lm.layers.mlp_out_transposed else dw).to(w.dtype)
                if not (torch.isfinite(dw).all() and torch.isfinite(w + stored).all()):
                    raise EditError(f"the MEMIT update for layer {layer} is not finite in {w.dtype} (keys or C "
                                    "degenerate, or λ too small); the model was left unchanged")
                w.data.add_(stored)
                deltas.append(dw.cpu())
    except BaseException:
        with torch.no_grad():
            for w, o in zip(weights, originals):
                w.data.copy_(o.to(w.device))
        raise
    finally:
        bar.close()
    # the record re-applies ΔW from the original weights (all layers or none), keeping what revert needs
    with torch.no_grad():
        for w, o in zip(weights, originals):
            w.data.copy_(o.to(w.device))
    del originals
    record = MemitRecord(requests=reqs, hparams=hp, modules=modules, deltas=deltas, templates=templates,
                         stats=[statistics[l][1] for l in hp.layers], z_losses=zres.losses,
                         timings={"statistics_s": t_stats, "z_s": zres.seconds, "z_reused": zres.reused,
                                  **{f"z_reused_{k}": v for k, v in zres.reused_cost.items()},
                                  "update_s": time.perf_counter() - t1,
                                  **({"post_norm_shortfall_mean": float(torch.cat(shortfalls).mean()),
                                      "post_norm_shortfall_max": float(torch.cat(shortfalls).max())}
                                     if shortfalls else {})},
                         fingerprints=fingerprints)
    if apply:
        WeightBook.of(lm).apply(record, verify=False)  # on the weights it was computed on
    return record
