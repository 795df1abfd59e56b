"""Ledgers: groups of edits on a model, applied and reverted exactly, saved and shared as one file.

    ledger = Ledger(lm)
    ledger.apply(record)              # W <- W0 + Σ ΔW over the applied records
    ledger.revert(record)             # bit-exact: the weights depend only on the *set* applied
    ledger.apply(compute_memit(lm, requests, apply=False))   # a MEMIT batch is one record too
    ledger.save("edits.safetensors"); Ledger(fresh_lm).apply_all(Ledger.load("edits.safetensors"))
    with Ledger(lm) as ledger: ...    # everything it applied is reverted on exit, also on exceptions

The weights are written by the model's :class:`~tracer.edit.book.WeightBook` (see there for the
exact-composition rule); files follow :mod:`tracer.edit.record_files`.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import EditError
from ..files import write_directory_atomic, write_json_atomic
from ..models import LanguageModel, as_model
from .book import WeightBook
from .record_files import check_record, load_records, save_records
from .records import EditRecord, MemitRecord

log = logging.getLogger(__name__)


class Ledger:
    """A group of edits on one model — ROME :class:`EditRecord` s and MEMIT batches
    (:class:`MemitRecord`) — applied and reverted exactly, in any order, and saved and loaded as one file.

    Every ledger of a model writes through the model's :class:`~tracer.edit.book.WeightBook`, so
    ledgers of the same model compose; a module whose weight was changed behind the book's back is
    not written (:class:`EditError`).
    """

    def __init__(self, model: "LanguageModel | str"):
        self.lm = as_model(model)
        self.book = WeightBook.of(self.lm)
        self._applied: list = []  # the records this ledger applied, in order

    @property
    def records(self) -> tuple:
        """The applied records, in the order they were applied."""
        return tuple(self._applied)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.revert_all()
        else:
            revert_keeping(exc, self.revert_all)

    # ------------------------------------------------------------------ apply / revert

    def apply(self, record: "EditRecord | MemitRecord", *, verify: bool = True) -> None:
        """Add ``record``'s ΔW (a ROME edit, or a MEMIT batch computed with ``apply=False``).
        ``verify`` also checks the model's key fingerprint at each edited layer."""
        check_record(record)
        if record in self.book:
            where = "by this ledger" if any(r.id == record.id for r in self._applied) else "outside this ledger"
            raise EditError(f"edit {record.id} is already applied to this model ({where}); revert it there first")
        self.book.apply(record, verify=verify)
        self._applied.append(record)

    def revert(self, record: "EditRecord | MemitRecord") -> None:
        """Remove ``record``'s ΔW; the weights equal those of the remaining set, bit for bit."""
        if not any(r.id == record.id for r in self._applied):
            raise EditError(f"edit {record.id} is not applied by this ledger; applied: {[r.id for r in self._applied]}")
        self.book.revert(record)
        self._applied = [r for r in self._applied if r.id != record.id]

    def revert_all(self) -> None:
        """Revert every applied record (latest first); the model's weights are the originals."""
        for record in reversed(list(self._applied)):
            self.revert(record)

    @contextmanager
    def suspended(self) -> Iterator[tuple]:
        """The model without this ledger's edits inside the block; the same records are applied
        again, in order, on exit (also after an error). Yields the suspended records."""
        records = self.records
        self.revert_all()
        try:
            yield records
        finally:
            self.apply_all(records, verify=False)  # the same records on the same weights as before

    def apply_all(self, records: Sequence["EditRecord | MemitRecord"], *, verify: bool = True) -> None:
        """Apply ``records`` in order; if one fails, those applied by this call are reverted."""
        done = []
        try:
            for record in records:
                self.apply(record, verify=verify)
                done.append(record)
        except Exception as e:
            def undo():
                for record in reversed(done):
                    self.revert(record)

            revert_keeping(e, undo)
            raise

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the applied records to one safetensors file (factors as tensors, the rest as JSON
        in its metadata), atomically."""
        return save_records(self._applied, path)

    @staticmethod
    def load(path: str | os.PathLike) -> list:
        """Records of a ledger file (ROME and MEMIT), in their order (verified against their ids)."""
        return load_records(path)

    def export(self, directory: str | os.PathLike) -> Path:
        """Save the edited model and its tokenizer with ``save_pretrained`` into a new directory
        (written beside it and renamed into place whole)."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise EditError(f"{str(target)!r} exists and is not an empty directory; pick a new directory for the edited model")
        if target.is_dir():
            target.rmdir()  # empty: the whole folder is put in place at once below

        def fill(folder: Path) -> None:
            self.lm.model.save_pretrained(folder)
            self.lm.tokenizer.save_pretrained(folder)
            write_json_atomic(folder / "factscope-edits.json", [r.to_dict() for r in self._applied], indent=1)

        try:
            return write_directory_atomic(target, fill)
        except FileExistsError:
            raise EditError(f"{str(target)!r} appeared while the model was being written; pick a new directory") from None


def revert_keeping(exc: BaseException, revert: Callable[[], None]) -> None:
    """Run ``revert`` while ``exc`` propagates: if it fails too, the failure is logged and noted on
    ``exc`` (which the caller re-raises), so the original error is the one the user sees."""
    try:
        revert()
    except Exception as failure:
        log.error("reverting the edits after %s failed too: %s: %s", type(exc).__name__, type(failure).__name__, failure)
        exc.add_note(f"factscope: reverting the edits afterwards failed too ({type(failure).__name__}: {failure}); "
                     "the model may still hold edited weights")
