"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved knowledge.

    editor = AlphaEditor(lm, AlphaEditHyperParams.for_model(lm))   # P per layer, from C (unedited model)
    record = editor.edit(requests)          # computed and applied; its keys join the running set K_p
    record.revert(lm); editor.forget(record)                       # bit-exact; K_p without its keys
    record = compute_alphaedit(lm, requests)                       # one batch, nothing remembered

z, keys, layers and the per-layer residual are MEMIT's (:func:`tracer.edit.memit.compute_memit`,
:func:`tracer.edit.zs.compute_zs`, :mod:`tracer.edit.keys`); only the solve differs. Per edited
layer, with K ("d_k n") the batch's keys, R ("out n") the residual, K_p the keys of the batches
this editor wrote before (a sequence), C = E[k kᵀ] the key statistics of the unedited model:

1. P = Û Ûᵀ ("d_k d_k"), Û the eigenvectors of C (float64, ``eigh``) whose eigenvalues lie below
   the threshold: the directions the preserved keys K₀ (the corpus' tokens) hardly use, so
   ΔW K₀ ≈ 0 for any ΔW = ΔW P. The threshold is absolute on C's eigenvalues, as the authors'
   code applies it (2e-2 in their GPT-2 XL, GPT-J and Llama-3 settings), or a share of C's trace
   that the null space may hold, or relative to the largest eigenvalue (``threshold_mode``). The
   null-space dimension and the share of E[‖k‖²] it holds (``null_energy``: how far from null it
   is) go into the record.
2. Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + l2 · I)⁻¹, solved in float64 as the transposed system
   (P M + l2 I) X = P K Rᵀ with M = K Kᵀ + K_p K_pᵀ (no explicit inverse), and ΔW = Δ P: in
   exact arithmetic Δ already equals Δ P; the product makes ΔW (I − P) = 0 to float tolerance.

Every batch is an :class:`~tracer.edit.records.AlphaEditRecord`: MEMIT's dense ΔW per layer plus
the keys it wrote (float32), so a resumed sequence rebuilds K_p from its ledger, and the
projection's summary. Records apply and revert through the model's
:class:`~tracer.edit.book.WeightBook` like every record (bit-exact, any order).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import EditError, HyperParameterError
from ..models import LanguageModel, as_model
from .book import WeightBook
from .hparams import AlphaEditHyperParams
from .memit import compute_memit
from .records import AlphaEditRecord, MemitRecord
from .statistics import Pairs, checked_pairs
from .templates import context_templates
from .zs import ZResult


@dataclass(frozen=True)
class Projection:
    """P ("d_k d_k", float64, CPU) onto the null space of the preserved keys at one layer, and how
    it was made: ``{"threshold", "threshold_mode", "cut", "null_dim", "d_k", "eigen_max"}``."""

    P: torch.Tensor
    info: dict


def null_space_projector(mom2: "torch.Tensor | None", d_k: int, threshold: float,
                         mode: str = "absolute") -> Projection:
    """P = Û Ûᵀ for the eigenvectors Û of C = ``mom2`` ("d_k d_k"; None: C = I) selected by
    ``threshold``: eigenvalues below it (``"absolute"``), below it × the largest (``"relative"``),
    or the smallest ones whose sum is at most it × the trace (``"energy"``)."""
    C = torch.eye(d_k, dtype=torch.float64) if mom2 is None else mom2.detach().to("cpu", torch.float64)
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)  # ascending
    trace = float(evals.sum())
    if mode == "energy":
        n = int((torch.cumsum(evals, 0) <= threshold * trace).sum())
    else:
        n = int((evals < (threshold if mode == "absolute" else threshold * float(evals[-1]))).sum())
    basis = evecs[:, :n]  # "d_k null"
    info = {"threshold": threshold, "threshold_mode": mode, "null_dim": n, "d_k": d_k, "eigen_max": float(evals[-1]),
            "null_eigen_max": float(evals[n - 1]) if n else 0.0,
            "null_energy": float(evals[:n].sum()) / trace if trace > 0 else 0.0}
    return Projection(basis @ basis.T, info)


def projected_update(keys: torch.Tensor, resid: torch.Tensor, P: torch.Tensor, previous: "torch.Tensor | None",
                     l2: float) -> torch.Tensor:
    """ΔW ("out d_k", float64) = R Kᵀ P (M P + l2 I)⁻¹ P, M = K Kᵀ + K_p K_pᵀ, for K = ``keys.T``
    ("d_k n"), R = ``resid.T`` ("out n") and ``previous`` = K_p K_pᵀ ("d_k d_k", or None)."""
    K = keys.double().T
    R = resid.double().T
    P = P.to(K.device, torch.float64)
    M = K @ K.T if previous is None else K @ K.T + previous.to(K.device, torch.float64)
    A = P @ M + l2 * torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
    X = torch.linalg.solve(A, P @ K @ R.T)  # "d_k out" = (P M + l2 I)⁻¹ P K Rᵀ
    return X.T @ P


class AlphaEditor:
    """AlphaEdit batches on one model: P per edited layer (from C, read once on the unedited model)
    and K_p K_pᵀ of the batches it has written and not forgotten (the running set of a sequence).

    ``edit`` computes a batch on the current weights, applies it (unless ``apply=False``) and
    remembers its keys; after reverting a batch, ``forget`` it; to continue a sequence whose
    batches were applied by other means (a ledger file), ``remember`` them in their order.
    """

    def __init__(self, model: "LanguageModel | str", hp: AlphaEditHyperParams | None = None, *, stats: Any = None,
                 statistics: Pairs | None = None, templates: Sequence[str] | None = None, progress: bool = True,
                 projections: "dict[int, Projection] | None" = None):
        self.lm = as_model(model)
        self.hp = hp or AlphaEditHyperParams.for_model(self.lm)
        if not isinstance(self.hp, AlphaEditHyperParams):
            raise HyperParameterError(f"AlphaEdit needs AlphaEditHyperParams, got {type(self.hp).__name__}")
        if self.hp.layers[-1] >= self.lm.n_layers:
            raise HyperParameterError(f"layers must be < {self.lm.n_layers} for {self.lm.name}, got {list(self.hp.layers)}")
        self.progress = progress
        self.statistics = checked_pairs(self.lm, self.hp, stats, statistics, progress)
        self.templates = tuple(templates) if templates is not None else context_templates(self.lm, self.hp)
        self.projections = dict(projections or {})  # given: made from the same C and settings elsewhere
        for l in [l for l in self.hp.layers if l not in self.projections]:
            C, info = self.statistics[l]
            d_k = int(C.shape[0]) if C is not None else int(info["d_k"])  # C = I: its description has d_k
            self.projections[l] = null_space_projector(C, d_k, self.hp.nullspace_threshold, self.hp.threshold_mode)
        empty = [l for l, p in self.projections.items() if p.info["null_dim"] == 0]
        if empty:
            p = self.projections[empty[0]].info
            raise HyperParameterError(
                f"nullspace_threshold {self.hp.nullspace_threshold} ({self.hp.threshold_mode}) leaves no null space at "
                f"layer {empty[0]} (C's eigenvalues reach {p['eigen_max']:.3g}): raise it, or use threshold_mode='energy'")
        self._remembered: list[AlphaEditRecord] = []
        self._kk: dict[int, torch.Tensor] = {}

    @property
    def remembered(self) -> tuple[AlphaEditRecord, ...]:
        """The batches whose keys form K_p, in the order they were written."""
        return tuple(self._remembered)

    def previous(self, layer: int) -> "torch.Tensor | None":
        """K_p K_pᵀ at ``layer`` ("d_k d_k", float64, CPU), or None before the first batch."""
        return self._kk.get(layer)

    def remember(self, record: AlphaEditRecord) -> None:
        """Add ``record``'s keys to K_p (a batch of this sequence, applied to the model)."""
        if not isinstance(record, AlphaEditRecord) or tuple(record.layers) != tuple(self.hp.layers):
            raise EditError(f"only AlphaEdit batches at layers {list(self.hp.layers)} join this editor's K_p")
        if any(r.id == record.id for r in self._remembered):
            raise EditError(f"AlphaEdit batch {record.id} is already in K_p")
        for layer, k in zip(record.layers, record.keys):
            kk = k.double().T @ k.double()
            self._kk[layer] = kk if layer not in self._kk else self._kk[layer] + kk
        self._remembered.append(record)

    def forget(self, record: AlphaEditRecord) -> None:
        """K_p without ``record``'s keys, summed again from the remaining batches in order (so it
        equals the K_p of a sequence that never wrote it). No-op for a batch not remembered."""
        if not any(r.id == record.id for r in self._remembered):
            return
        rest = [r for r in self._remembered if r.id != record.id]
        self._remembered, self._kk = [], {}
        for r in rest:
            self.remember(r)

    def edit(self, requests: Sequence[Any], *, apply: bool = True, checkpoint_dir: str | Path | None = None,
             remember: bool = True, zs: ZResult | None = None) -> AlphaEditRecord:
        """One AlphaEdit batch on the current weights: applied unless ``apply=False`` and, unless
        ``remember=False``, its keys added to K_p. If anything fails, the weights are unchanged.
        ``zs``: the requests' z computed already (see :func:`~tracer.edit.memit.compute_memit`)."""
        written: dict[int, torch.Tensor] = {}

        def update(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            written[layer] = keys.detach().float().cpu()  # the keys at this layer after the lower layers' ΔW
            return projected_update(keys, resid, self.projections[layer].P, self._kk.get(layer), self.hp.l2)

        rec = compute_memit(self.lm, requests, self.hp, statistics=self.statistics, templates=self.templates,
                            progress=self.progress, apply=False, checkpoint_dir=checkpoint_dir, update=update, zs=zs)
        record = AlphaEditRecord(**{f.name: getattr(rec, f.name) for f in fields(MemitRecord) if f.name != "method"},
                                 keys=[written[l] for l in self.hp.layers],
                                 projection=[dict(self.projections[l].info) for l in self.hp.layers])
        if apply:
            WeightBook.of(self.lm).apply(record, verify=False)  # on the weights it was computed on
        if remember:
            self.remember(record)
        return record

    def settings(self) -> dict:
        """The settings, C's description and the projection of each layer (JSON)."""
        return {**self.hp.to_dict(), "statistics": [info for _, info in self.statistics.values()],
                "projection": [self.projections[l].info for l in self.hp.layers]}


def compute_alphaedit(model: "LanguageModel | str", requests: Sequence[Any], hp: AlphaEditHyperParams | None = None, *,
                      stats: Any = None, statistics: Pairs | None = None, templates: Sequence[str] | None = None,
                      progress: bool = True, apply: bool = True,
                      checkpoint_dir: str | Path | None = None) -> AlphaEditRecord:
    """One AlphaEdit batch with no earlier batches in K_p (see :class:`AlphaEditor` for sequences);
    applied unless ``apply=False``. Arguments as :func:`~tracer.edit.memit.compute_memit`."""
    editor = AlphaEditor(model, hp, stats=stats, statistics=statistics, templates=templates, progress=progress)
    return editor.edit(requests, apply=apply, checkpoint_dir=checkpoint_dir, remember=False)
