"""The one path by which edits reach a model's weights: its :class:`WeightBook`.

    book = WeightBook.of(lm)        # one per model object
    book.apply(record)              # W <- float(W0 + Σ ΔW) over the applied set
    book.revert(record)             # bit-exact, in any order

A record is anything with the edit-record protocol (:class:`EditRecordLike`): an ``id``, the
``modules`` it writes, ``module_delta(name)`` (ΔW, float64, "d_out d_k") and ``fingerprints``
(``{layer: key fingerprint of the model it was computed on}``) — ROME's
:class:`~tracer.edit.records.EditRecord` and MEMIT's :class:`~tracer.edit.records.MemitRecord`
alike. The book snapshots each module's weight before its first edit (on the CPU, in its own
dtype) and keeps a hash of what it last wrote, to notice writes behind its back. Applying or
reverting recomputes ``W = float(W0 + Σ_r ΔW_r)`` in float64 with the records in a canonical
order (by id), so the weights are a function of the *set* applied: any order of apply/revert gives
the same bits, and reverting everything copies the snapshot back. Every check runs before any
weight is written, so an edit that fails leaves the model untouched.

Every :class:`~tracer.edit.ledger.Ledger` of a model, and ``MemitRecord.apply``, go through that
model's book, so no two of them can write the same record twice or undo each other's writes.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Protocol, runtime_checkable

import torch
from accelerate.utils import has_offloaded_params

from ..errors import EditError, UnknownLayerError
from ..models import LanguageModel, as_model
from ..stats import key_fingerprint
from .fields import weight_hash


@runtime_checkable
class EditRecordLike(Protocol):
    """What the book needs of a record."""

    @property
    def id(self) -> str: ...

    @property
    def modules(self) -> list[str]: ...

    @property
    def fingerprints(self) -> dict[int, str]: ...

    def module_delta(self, name: str) -> torch.Tensor: ...

    def to_dict(self) -> dict: ...


_BOOKS: "weakref.WeakKeyDictionary[torch.nn.Module, WeightBook]" = weakref.WeakKeyDictionary()


class WeightBook:
    """The applied edits of one model and what its edited weights were before them."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self._applied: dict[str, EditRecordLike] = {}      # by id, in the order applied
        self._original: dict[str, torch.Tensor] = {}       # each edited weight before its first edit, on the CPU
        self._written: dict[str, str] = {}                 # weight_hash of what the book last wrote there

    @classmethod
    def of(cls, model: "LanguageModel | str") -> "WeightBook":
        """The book of ``model`` (created on first use, dropped with the model)."""
        lm = as_model(model)
        book = _BOOKS.get(lm.model)
        if book is None:
            book = _BOOKS[lm.model] = cls(lm)
        return book

    @staticmethod
    def holding(record: EditRecordLike) -> list["WeightBook"]:
        """The books (of live models) where ``record`` is applied."""
        return [b for b in list(_BOOKS.values()) if record.id in b._applied]

    @property
    def records(self) -> tuple:
        """The applied records, in the order they were applied."""
        return tuple(self._applied.values())

    def __contains__(self, record: EditRecordLike) -> bool:
        return record.id in self._applied

    def apply(self, record: EditRecordLike, *, verify: bool = True) -> None:
        """Add ``record``'s ΔW. ``verify`` also checks the model's key fingerprint at each edited layer."""
        if not isinstance(record, EditRecordLike):
            raise EditError(f"expected an edit record (ROME EditRecord or MEMIT MemitRecord), got {type(record).__name__}")
        if record.id in self._applied:
            raise EditError(f"edit {record.id} is already applied to this model; revert it first")
        weights = {name: self._weight(record, name) for name in record.modules}
        if verify:
            for layer, expected in record.fingerprints.items():
                fp = key_fingerprint(self.lm, layer)
                if fp != expected:
                    raise EditError(f"edit {record.id} was computed for other weights (fingerprint {expected}, this model "
                                    f"{fp} at layer {layer}); apply ledgers to the model they were made on, in their "
                                    "order, or pass verify=False")
        for name, weight in weights.items():
            self._check_untouched(name, weight)
        new = {name: self._compose(name, weight, self._touching(name) + [record]) for name, weight in weights.items()}
        with self._all_or_none(weights):
            for name, weight in weights.items():
                self._write(name, weight, new[name])
        self._applied[record.id] = record

    def revert(self, record: EditRecordLike) -> None:
        """Remove ``record``'s ΔW; the weights equal those of the remaining set, bit for bit."""
        if record.id not in self._applied:
            raise EditError(f"edit {record.id} is not applied to this model; applied: {list(self._applied)}")
        weights = {name: self.lm.model.get_submodule(name).weight for name in record.modules}
        for name, weight in weights.items():
            self._check_untouched(name, weight)
        rest = [r for r in self._applied.values() if r.id != record.id]
        new = {}
        for name, weight in weights.items():
            same = [r for r in rest if name in r.modules]
            new[name] = self._compose(name, weight, same) if same else None
        with self._all_or_none(weights):
            for name, weight in weights.items():
                if new[name] is not None:
                    self._write(name, weight, new[name])
                else:
                    self._restore_original(name, weight)
        del self._applied[record.id]

    def discard(self) -> None:
        """Forget every applied record and snapshot without writing anything: for when the weights
        were put back by other means (a reload, a copy) after a revert failed."""
        self._applied.clear()
        self._original.clear()
        self._written.clear()

    @property
    def held_bytes(self) -> int:
        """CPU bytes of the snapshots kept to revert exactly (one copy of each edited weight)."""
        return sum(t.numel() * t.element_size() for t in self._original.values())

    @contextmanager
    def _all_or_none(self, weights: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """If writing fails midway (out of memory, say), give every module in ``weights`` back the
        bits of the applied set as it stands (the set changes only after the block succeeds)."""
        try:
            yield
        except BaseException:
            for name, weight in weights.items():
                same = self._touching(name)
                if same:
                    self._write(name, weight, self._compose(name, weight, same))
                elif name in self._original:
                    self._restore_original(name, weight)
            raise

    def _restore_original(self, name: str, weight: torch.nn.Parameter) -> None:
        with torch.no_grad():
            weight.copy_(self._original.pop(name).to(weight.device))
        self._written.pop(name)

    def _touching(self, name: str) -> list:
        return [r for r in self._applied.values() if name in r.modules]

    def _weight(self, record: EditRecordLike, name: str) -> torch.nn.Parameter:
        try:
            module = self.lm.model.get_submodule(name)
        except AttributeError:
            raise UnknownLayerError(f"edit {record.id} targets {name!r}, which this model does not have") from None
        if has_offloaded_params(module):
            raise EditError(f"edit {record.id} writes {name}, whose weight is offloaded (on disk or the meta device); "
                            "load the model with more --max-memory so the edited layers stay on a device; nothing was applied")
        weight = module.weight
        delta = record.module_delta(name)
        d_out, d_k = (weight.shape[1], weight.shape[0]) if self.lm.layers.mlp_out_transposed else weight.shape
        if tuple(delta.shape) != (d_out, d_k):
            raise EditError(f"edit {record.id} has ΔW of shape {tuple(delta.shape)} for {name}, which needs "
                            f"({d_out}, {d_k}) (d_out, d_k): it was computed for another model; nothing was applied")
        if not torch.isfinite(delta).all():
            raise EditError(f"edit {record.id} has non-finite ΔW for {name}; nothing was applied")
        return weight

    def _check_untouched(self, name: str, weight: torch.Tensor) -> None:
        if name in self._written and weight_hash(weight) != self._written[name]:
            raise EditError(f"{name} was changed outside factscope's edits since its last edit; undo that change "
                            "first (nothing was written)")

    def _compose(self, name: str, weight: torch.Tensor, records: list) -> torch.Tensor:
        original = self._original[name].to(weight.device) if name in self._original else weight.detach()
        total = original.double().clone()
        for r in sorted(records, key=lambda r: r.id):
            d = r.module_delta(name).to(total.device)
            total += d.T if self.lm.layers.mlp_out_transposed else d
        new = total.to(weight.dtype)
        if not torch.isfinite(new).all():
            raise EditError(f"the edit makes {name} non-finite in {weight.dtype}; nothing was applied")
        return new

    def _write(self, name: str, weight: torch.Tensor, new: torch.Tensor) -> None:
        if name not in self._original:
            self._original[name] = weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            weight.copy_(new)
        self._written[name] = weight_hash(weight)
