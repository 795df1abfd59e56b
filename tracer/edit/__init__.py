"""Fact editing: ROME edits as reversible, shareable records.

    from tracer.edit import EditRequest, rome_edit, edited, check_edit
    with edited(lm, [EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")]):
        ...                                   # the edited model; restored on exit

- :mod:`tracer.edit.rome`: requests, hyper-parameters, k*/v* (reusable by MEMIT), :func:`rome_edit`.
- :mod:`tracer.edit.ledger`: :class:`EditRecord`, :class:`Ledger` (exact apply/revert, files),
  :func:`edited`.
- :mod:`tracer.edit.memit`: MEMIT batches (:func:`compute_memit`, :func:`sequential_memit`).
- :mod:`tracer.edit.check`: :func:`check_edit`, before/after predictions and generations.
"""
from .check import EditCheck, check_edit
from .ledger import EditRecord, Ledger, edited
from .memit import MemitHyperParams, MemitRecord, compute_memit, sequential_memit
from .rome import EditRequest, ROMEHyperParams, compute_k, compute_keys, compute_v, generate_context_templates, rome_edit

__all__ = ["EditCheck", "EditRecord", "EditRequest", "Ledger", "MemitHyperParams", "MemitRecord", "ROMEHyperParams",
           "check_edit", "compute_k", "compute_keys", "compute_memit", "compute_v", "edited",
           "generate_context_templates", "rome_edit", "sequential_memit"]
