"""Fact editing: ROME edits and MEMIT batches as reversible, shareable records.

    from tracer.edit import EditRequest, rome_edit, edited, check_edit
    with edited(lm, [EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")]):
        ...                                   # the edited model; restored on exit

The modules, lowest first (each imports only those above it in this list):

- :mod:`~tracer.edit.fields`: checked fields and content hashes of records;
- :mod:`~tracer.edit.requests`: :class:`EditRequest` (ROME), :class:`Request` (MEMIT);
- :mod:`~tracer.edit.defaults`: one defaults table keyed by model identity, with evidence;
- :mod:`~tracer.edit.hparams`: :class:`ROMEHyperParams`, :class:`MemitHyperParams`, :class:`FTLHyperParams`;
- :mod:`~tracer.edit.statistics`: which key statistics C an edit uses;
- :mod:`~tracer.edit.templates`: context templates; :mod:`~tracer.edit.keys`: k;
  :mod:`~tracer.edit.values`: v* (ROME) and δ for MEMIT's z;
- :mod:`~tracer.edit.book`: the one exact apply/revert path (:class:`WeightBook`);
- :mod:`~tracer.edit.records`: :class:`EditRecord`, :class:`MemitRecord`;
  :mod:`~tracer.edit.record_files`: their one file format;
- :mod:`~tracer.edit.ledger`: :class:`Ledger`;
- :mod:`~tracer.edit.rome`: :func:`rome_edit`, :func:`edited`;
  :mod:`~tracer.edit.zs`, :mod:`~tracer.edit.memit`: :func:`compute_memit`;
  :mod:`~tracer.edit.sequential`: :func:`sequential_memit`;
- :mod:`~tracer.edit.check`: :func:`check_edit`.
"""
from .book import WeightBook
from .check import EditCheck, check_edit
from .defaults import Defaults, ModelIdentity, defaults_for
from .hparams import FTLHyperParams, MemitHyperParams, ROMEHyperParams
from .keys import compute_k, compute_keys
from .ledger import Ledger
from .memit import compute_memit, solve_update
from .record_files import load_records, save_records
from .records import EditRecord, MemitRecord
from .requests import EditRequest, Request
from .rome import edited, rome_edit
from .sequential import Health, sequential_memit
from .statistics import load_statistics
from .templates import context_templates, generate_context_templates, rome_templates
from .values import compute_v

__all__ = ["Defaults", "EditCheck", "EditRecord", "EditRequest", "FTLHyperParams", "Health", "Ledger", "MemitHyperParams",
           "MemitRecord", "ModelIdentity", "ROMEHyperParams", "Request", "WeightBook", "check_edit", "compute_k",
           "compute_keys", "compute_memit", "compute_v", "context_templates", "defaults_for", "edited",
           "generate_context_templates", "load_records", "load_statistics", "rome_edit", "rome_templates", "save_records",
           "sequential_memit", "solve_update"]
