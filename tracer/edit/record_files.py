"""One file format for every edit record: a safetensors file (tensors) with the rest as JSON metadata.

    save_records([rome_record, memit_batch], "edits.safetensors")
    load_records("edits.safetensors")        # verified against their ids; MEMIT batches unapplied

Ledger format 3 (ids over every field) is written; formats 1 and 2 are read and verified by their
own rule, and so is a MEMIT batch in its older two-file form (``batch.safetensors`` +
``batch.safetensors.json``). A malformed file is an :class:`~tracer.errors.EditError` naming the
file and the field.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from ..errors import EditError
from ..files import save_safetensors_atomic
from .fields import TENSOR_FIELDS, checked_field, list_of
from .records import AlphaEditRecord, EditRecord, MemitRecord

LEDGER_FORMAT = 3             # 3: ids over every field; 2 (ROME and MEMIT) and 1 (ROME only) are still read
LEGACY_LEDGER_FORMATS = (1, 2)
RECORD_TYPES = (EditRecord, MemitRecord)  # AlphaEditRecord is a MemitRecord


def check_record(record) -> None:
    """An :class:`EditError` unless ``record`` is a ROME :class:`EditRecord`, a MEMIT :class:`MemitRecord`
    or an :class:`AlphaEditRecord`."""
    if not isinstance(record, RECORD_TYPES):
        raise EditError(f"expected an EditRecord (ROME), a MemitRecord (MEMIT batch) or an AlphaEditRecord, "
                        f"got {type(record).__name__}")


def _record_tensors(i: int, record) -> dict[str, torch.Tensor]:
    if isinstance(record, EditRecord):
        return {f"{i}.{name}": getattr(record, name).double().contiguous().cpu() for name in TENSOR_FIELDS}
    out = {f"{i}.delta.{j}": d.contiguous().cpu() for j, d in enumerate(record.deltas)}
    if isinstance(record, AlphaEditRecord):
        out.update({f"{i}.keys.{j}": k.float().contiguous().cpu() for j, k in enumerate(record.keys)})
    return out


def save_records(records: Sequence, path: str | os.PathLike) -> Path:
    """Write ROME and MEMIT records to one safetensors file (tensors; the rest as JSON metadata), atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise EditError(f"cannot write the ledger to {str(path)!r}: directory {str(path.parent)!r} does not exist")
    for r in records:
        check_record(r)
    tensors = {k: v for i, r in enumerate(records) for k, v in _record_tensors(i, r).items()}
    meta = {"format": LEDGER_FORMAT, "records": [r.to_dict() for r in records]}
    return save_safetensors_atomic(path, tensors, {"factscope_ledger": json.dumps(meta)})


def load_records(path: str | os.PathLike) -> list:
    """The records of a ledger file (ROME :class:`EditRecord` s, MEMIT and AlphaEdit batches), in their
    order, each verified against its id; batches come back unapplied. A malformed file is an
    :class:`EditError` naming the file and the field."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise EditError(f"ledger file {name} does not exist")
    if Path(str(path) + ".json").is_file() and _is_memit_pair(path):
        return [_load_memit_pair(path)]
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {})["factscope_ledger"]
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(text)
    except Exception as e:
        raise EditError(f"{name} is not a factscope ledger ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise EditError(f"{name} is not a factscope ledger (its metadata is {type(meta).__name__}, not a JSON object)")
    fmt = meta.get("format")
    if fmt not in (*LEGACY_LEDGER_FORMATS, LEDGER_FORMAT):
        raise EditError(f"{name} has ledger format {fmt!r}; this version reads 1, 2 and {LEDGER_FORMAT}")
    entries = checked_field(meta, "records", list_of(lambda x: isinstance(x, dict)), "a list of JSON objects", name)
    legacy = fmt in LEGACY_LEDGER_FORMATS
    records, used = [], set()
    for i, d in enumerate(entries):
        source = f"{name} record {i}"
        checked_field(d, "id", lambda x: isinstance(x, str), "the record's id (a string)", source)
        if d.get("method") in ("MEMIT", "AlphaEdit"):
            modules = checked_field(d, "modules", list_of(lambda x: isinstance(x, str)), "a list of module names", source)
            deltas = [f"{i}.delta.{j}" for j in range(len(modules))]
            key_names = [f"{i}.keys.{j}" for j in range(len(modules))] if d["method"] == "AlphaEdit" else []
            keys = deltas + key_names
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise EditError(f"{name} lacks tensor {missing[0]!r}; the file is corrupted")
            if d["method"] == "AlphaEdit":
                if legacy:
                    raise EditError(f"{source}: an AlphaEdit record in a ledger of format {fmt}, which had none; "
                                    "the file is corrupted")
                records.append(AlphaEditRecord.from_dict(d, [tensors[k] for k in deltas], [tensors[k] for k in key_names],
                                                         source=source))
            else:
                records.append(MemitRecord.from_dict(d, [tensors[k] for k in deltas], source=source, legacy=legacy))
        else:
            keys = [f"{i}.{t}" for t in TENSOR_FIELDS]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise EditError(f"{name} lacks tensor {missing[0]!r}; the file is corrupted")
            records.append(EditRecord.from_dict(d, {t: tensors[f"{i}.{t}"] for t in TENSOR_FIELDS}, source=source,
                                                legacy=legacy))
        used.update(keys)
    extra = sorted(set(tensors) - used)
    if extra:
        raise EditError(f"{name} holds tensor {extra[0]!r}, which no record names; the file is corrupted")
    return records


def _is_memit_pair(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return "factscope_ledger" not in (f.metadata() or {})
    except Exception:  # not a safetensors file: load_records says so
        return False


def _load_memit_pair(path: Path) -> MemitRecord:
    """A MEMIT batch in the two-file form written before one file format held every record
    (``path``: the ΔW; ``path`` + ``.json``: the rest), verified like any record."""
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    for p in (path, meta_path):
        if not p.is_file():
            raise EditError(f"MEMIT record file {str(p)!r} does not exist")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EditError(f"{str(meta_path)!r} is not a MEMIT record's JSON ({type(e).__name__}: {str(e)[:80]})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EditError(f"{str(path)!r} is not a MEMIT record's safetensors file ({type(e).__name__}: {str(e)[:80]})") from None
    source = repr(str(path))
    if not isinstance(meta, dict):
        raise EditError(f"{str(meta_path)!r} must hold a JSON object, got {type(meta).__name__}")
    modules = checked_field(meta, "modules", list_of(lambda x: isinstance(x, str)), "a list of module names", source)
    names = [f"delta.{i}" for i in range(len(modules))]
    odd = [k for k in names if k not in tensors] or sorted(set(tensors) - set(names))
    if odd:
        raise EditError(f"{source} {'lacks' if odd[0] in names else 'holds an unexpected'} tensor {odd[0]!r}; "
                        "the file is corrupted or belongs to another record")
    return MemitRecord.from_dict(meta, [tensors[k] for k in names], source=source)
