"""Edit records and the ledger that applies and reverts them exactly.

    ledger = Ledger(lm)
    ledger.apply(record)              # W <- W0 + Σ ΔW over the applied records
    ledger.revert(record)             # bit-exact: the weights depend only on the *set* applied
    ledger.apply(compute_memit(lm, requests, apply=False))   # a MEMIT batch is one record too
    ledger.save("edits.safetensors"); Ledger(fresh_lm).apply_all(Ledger.load("edits.safetensors"))
    with edited(lm, [request]) as records: ...   # restored on exit, also on exceptions

Records are ROME's :class:`EditRecord` (ΔW = v uᵀ at one module) and MEMIT's
:class:`~tracer.edit.memit.MemitRecord` (a dense ΔW at each of several modules). The ledger
snapshots each module's weight before its first edit. Applying or reverting recomputes
``W = float(W0 + Σ_r ΔW_r)`` in float64 with the records in a canonical order (by id), so the
result is a function of the set of applied records: any order of apply/revert gives the same
bits, and reverting everything copies the snapshot back. Every check runs before any weight is
written, so an edit that fails leaves the model untouched.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..errors import EditError, UnknownLayerError
from ..files import save_safetensors_atomic
from ..models import LanguageModel, as_model
from ..stats import key_fingerprint

if TYPE_CHECKING:
    from .memit import MemitRecord
    from .rome import EditRequest, ROMEHyperParams

log = logging.getLogger(__name__)

_LEDGER_FORMAT = 2          # 2: ROME and MEMIT records; 1 (ROME only) is still read
_TENSORS = ("u", "v", "k_star", "v_star")


@dataclass(frozen=True, eq=False)
class EditRecord:
    """One rank-one edit: ΔW = v uᵀ ("out in") at ``module`` (``layer``), and how it was made.

    ``u`` ("d_k") is C⁻¹k* normalised, ``v`` ("d_out") the right vector; both float64 on the CPU.
    ``k_star``/``v_star`` are the key and target value the update maps onto each other.
    ``before``/``after`` hold ``{"top1", "p_new", "p_true"}`` on the rewrite prompt.
    """

    request: "EditRequest"
    hparams: "ROMEHyperParams"
    model: str
    family: str
    fingerprint: str
    layer: int
    module: str
    u: torch.Tensor = field(repr=False)
    v: torch.Tensor = field(repr=False)
    k_star: torch.Tensor = field(repr=False)
    v_star: torch.Tensor = field(repr=False)
    target_true: str
    statistics: dict
    context_templates: tuple[str, ...]
    loss: tuple[float, ...] = ()
    loss_terms: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    method: str = "ROME"

    @property
    def id(self) -> str:
        """16 hex digits of SHA-256 over the module, the request and the factors' bytes."""
        h = hashlib.sha256(f"{self.module}|{json.dumps(self.request.to_dict(), sort_keys=True)}".encode())
        for t in (self.u, self.v):
            h.update(t.detach().double().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def delta(self) -> torch.Tensor:
        """ΔW = v uᵀ, float64, shape "d_out d_k" (the ``nn.Linear`` layout)."""
        return torch.outer(self.v.double(), self.u.double())

    @property
    def modules(self) -> list[str]:
        return [self.module]

    @property
    def fingerprints(self) -> dict[int, str]:
        """``{layer: key fingerprint of the model the edit was computed on}``."""
        return {self.layer: self.fingerprint}

    def module_delta(self, name: str) -> torch.Tensor:
        """ΔW at module ``name`` (see :meth:`delta`); a record's modules are :attr:`modules`."""
        return self.delta()

    def to_dict(self, tensors: bool = False) -> dict:
        d = {"id": self.id, "method": self.method, "request": self.request.to_dict(), "hparams": self.hparams.to_dict(),
             "model": self.model, "family": self.family, "fingerprint": self.fingerprint, "layer": self.layer,
             "module": self.module, "target_true": self.target_true, "statistics": dict(self.statistics),
             "context_templates": list(self.context_templates), "loss": list(self.loss),
             "loss_terms": {k: list(v) for k, v in self.loss_terms.items()}, "before": dict(self.before),
             "after": dict(self.after), "seconds": dict(self.seconds),
             "norms": {"u": float(self.u.norm()), "v": float(self.v.norm()), "delta_fro": float(self.u.norm() * self.v.norm())}}
        if tensors:
            d.update({name: getattr(self, name).tolist() for name in _TENSORS})
        return d

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, torch.Tensor] | None = None) -> "EditRecord":
        from .rome import EditRequest, ROMEHyperParams

        tensors = tensors or {name: torch.tensor(d[name], dtype=torch.float64) for name in _TENSORS}
        record = cls(request=EditRequest.from_dict(d["request"]), hparams=ROMEHyperParams.from_dict(d["hparams"]),
                     model=d["model"], family=d["family"], fingerprint=d["fingerprint"], layer=int(d["layer"]),
                     module=d["module"], target_true=d["target_true"], statistics=dict(d["statistics"]),
                     context_templates=tuple(d["context_templates"]), loss=tuple(d["loss"]),
                     loss_terms={k: tuple(v) for k, v in d.get("loss_terms", {}).items()}, before=dict(d.get("before", {})),
                     after=dict(d.get("after", {})), seconds=dict(d.get("seconds", {})), method=d.get("method", "ROME"),
                     **{name: tensors[name].double() for name in _TENSORS})
        if "id" in d and d["id"] != record.id:
            raise EditError(f"edit record {d['id']} does not verify (its factors hash to {record.id}); the file is corrupted")
        return record

    def with_after(self, after: dict) -> "EditRecord":
        return replace(self, after=dict(after))


class Ledger:
    """Applies and reverts ROME :class:`EditRecord` s and MEMIT batches
    (:class:`~tracer.edit.memit.MemitRecord`) on one model, exactly, in any order; saves and loads them.

    Use one ledger per model for all its edits: the ledger refuses to write a module whose
    weight was changed behind its back (:class:`EditError`).
    """

    def __init__(self, model: "LanguageModel | str"):
        self.lm = as_model(model)
        self._applied: list = []  # EditRecord and MemitRecord
        self._original: dict[str, torch.Tensor] = {}
        self._written: dict[str, torch.Tensor] = {}

    @property
    def records(self) -> tuple:
        """The applied records, in the order they were applied."""
        return tuple(self._applied)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.revert_all()

    # ------------------------------------------------------------------ apply / revert

    def apply(self, record: "EditRecord | MemitRecord", *, verify: bool = True) -> None:
        """Add ``record``'s ΔW (a ROME edit, or a MEMIT batch computed with ``apply=False``).
        ``verify`` also checks the model's key fingerprint at each edited layer."""
        _check_record(record)
        if getattr(record, "applied", False):
            raise EditError(f"MEMIT batch {record.id} is already applied outside a ledger (compute_memit applies by "
                            "default); call record.revert(model) first, or compute it with apply=False")
        if any(r.id == record.id for r in self._applied):
            raise EditError(f"edit {record.id} is already applied to this model")
        weights = {name: self._weight(record, name, record.module_delta(name)) for name in record.modules}
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
        for name, weight in weights.items():
            self._write(name, weight, new[name])
        self._applied.append(record)

    def revert(self, record: "EditRecord | MemitRecord") -> None:
        """Remove ``record``'s ΔW; the weights equal those of the remaining set, bit for bit."""
        if not any(r.id == record.id for r in self._applied):
            raise EditError(f"edit {record.id} is not applied by this ledger; applied: {[r.id for r in self._applied]}")
        weights = {name: self.lm.model.get_submodule(name).weight for name in record.modules}
        for name, weight in weights.items():
            self._check_untouched(name, weight)
        rest = [r for r in self._applied if r.id != record.id]
        new = {}
        for name, weight in weights.items():
            same = [r for r in rest if name in r.modules]
            new[name] = self._compose(name, weight, same) if same else None
        for name, weight in weights.items():
            if new[name] is not None:
                self._write(name, weight, new[name])
            else:
                with torch.no_grad():
                    weight.copy_(self._original.pop(name))
                self._written.pop(name)
        self._applied = rest

    def revert_all(self) -> None:
        """Revert every applied record (latest first); the model's weights are the originals."""
        for record in reversed(list(self._applied)):
            self.revert(record)

    def apply_all(self, records: Sequence["EditRecord | MemitRecord"], *, verify: bool = True) -> None:
        """Apply ``records`` in order; if one fails, those applied by this call are reverted."""
        done = []
        try:
            for record in records:
                self.apply(record, verify=verify)
                done.append(record)
        except Exception:
            for record in reversed(done):
                self.revert(record)
            raise

    def _touching(self, name: str) -> list:
        return [r for r in self._applied if name in r.modules]

    def _weight(self, record, name: str, delta: torch.Tensor) -> torch.nn.Parameter:
        try:
            module = self.lm.model.get_submodule(name)
        except AttributeError:
            raise UnknownLayerError(f"edit {record.id} targets {name!r}, which this model does not have") from None
        weight = module.weight
        d_out, d_k = (weight.shape[1], weight.shape[0]) if self.lm.layers.mlp_out_transposed else weight.shape
        if tuple(delta.shape) != (d_out, d_k):
            factors = (f" (factors u {tuple(record.u.shape)}, v {tuple(record.v.shape)}; needs u ({d_k},), v ({d_out},))"
                       if isinstance(record, EditRecord) else "")
            raise EditError(f"edit {record.id} has ΔW of shape {tuple(delta.shape)} for {name}, which needs "
                            f"({d_out}, {d_k}) (d_out, d_k){factors}")
        if not torch.isfinite(delta).all():
            raise EditError(f"edit {record.id} has non-finite values; it was not applied")
        return weight

    def _check_untouched(self, name: str, weight: torch.Tensor) -> None:
        if name in self._written and not torch.equal(weight.detach(), self._written[name]):
            raise EditError(f"{name} was changed outside this ledger since its last edit; use one ledger per model")

    def _compose(self, name: str, weight: torch.Tensor, records: list) -> torch.Tensor:
        original = self._original.get(name, weight.detach())
        total = original.double().clone()
        for r in sorted(records, key=lambda r: r.id):
            d = r.module_delta(name).to(total.device)
            total += d.T if self.lm.layers.mlp_out_transposed else d
        new = total.to(weight.dtype)
        if not torch.isfinite(new).all():
            raise EditError(f"the edit makes {name} non-finite in {weight.dtype}; it was not applied")
        return new

    def _write(self, name: str, weight: torch.Tensor, new: torch.Tensor) -> None:
        if name not in self._original:
            self._original[name] = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(new)
        self._written[name] = new

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
        """Save the edited model and its tokenizer with ``save_pretrained`` into a new directory."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise EditError(f"{str(target)!r} exists and is not an empty directory; pick a new directory for the edited model")
        target.mkdir(parents=True, exist_ok=True)
        self.lm.model.save_pretrained(target)
        self.lm.tokenizer.save_pretrained(target)
        (target / "factscope-edits.json").write_text(json.dumps([r.to_dict() for r in self._applied], indent=1))
        return target


def _memit_record_type():
    from .memit import MemitRecord

    return MemitRecord


def _is_record(item) -> bool:
    return isinstance(item, (EditRecord, _memit_record_type()))


def _check_record(record) -> None:
    if not _is_record(record):
        raise EditError(f"expected an EditRecord (ROME) or a MemitRecord (MEMIT batch), got {type(record).__name__}")


def _record_tensors(i: int, record) -> dict[str, torch.Tensor]:
    if isinstance(record, EditRecord):
        return {f"{i}.{name}": getattr(record, name).double().contiguous().cpu() for name in _TENSORS}
    return {f"{i}.delta.{j}": d.contiguous().cpu() for j, d in enumerate(record.deltas)}


def save_records(records: Sequence, path: str | os.PathLike) -> Path:
    """Write ROME and MEMIT records to one safetensors file (tensors; the rest as JSON metadata), atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise EditError(f"cannot write the ledger to {str(path)!r}: directory {str(path.parent)!r} does not exist")
    for r in records:
        _check_record(r)
    tensors = {k: v for i, r in enumerate(records) for k, v in _record_tensors(i, r).items()}
    meta = {"format": _LEDGER_FORMAT, "records": [r.to_dict() for r in records]}
    return save_safetensors_atomic(path, tensors, {"factscope_ledger": json.dumps(meta)})


def load_records(path: str | os.PathLike) -> list:
    """The records of a ledger file (ROME :class:`EditRecord` s and MEMIT batches), in their order,
    each verified against its id; MEMIT batches come back unapplied."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EditError(f"ledger file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["factscope_ledger"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EditError(f"{str(path)!r} is not a factscope ledger ({type(e).__name__}: {str(e)[:80]})") from None
    if meta.get("format") not in (1, _LEDGER_FORMAT):
        raise EditError(f"{str(path)!r} has ledger format {meta.get('format')!r}; this version reads 1 and {_LEDGER_FORMAT}")
    records = []
    for i, d in enumerate(meta["records"]):
        try:
            if d.get("method") == "MEMIT":
                records.append(_memit_record_type().from_dict(d, [tensors[f"{i}.delta.{j}"] for j in range(len(d["modules"]))]))
            else:
                records.append(EditRecord.from_dict(d, {name: tensors[f"{i}.{name}"] for name in _TENSORS}))
        except KeyError as e:
            raise EditError(f"{str(path)!r} lacks tensor {e.args[0]}; the file is corrupted") from None
    return records


@contextmanager
def edited(model: "LanguageModel | str", requests: Sequence, hparams=None, stats=None, **kwargs) -> Iterator[list[EditRecord]]:
    """Apply edits for the ``with`` block and restore the original weights on exit or exception.

    ``requests`` holds :class:`~tracer.edit.rome.EditRequest` s (computed with
    :func:`~tracer.edit.rome.rome_edit` one after another, each on the model with the previous
    ones applied, as ROME does) or ready records (:class:`EditRecord`, or unapplied
    :class:`~tracer.edit.memit.MemitRecord` batches). Yields the records.
    """
    from .rome import ROMEHyperParams, generate_context_templates, rome_edit

    lm = as_model(model)
    ledger = Ledger(lm)
    try:
        records = []
        pending = [item for item in requests if not _is_record(item)]
        if len(pending) > 1 and kwargs.get("context_templates") is None:  # ROME generates them once per model
            hp = hparams or ROMEHyperParams.for_model(lm)
            kwargs["context_templates"] = generate_context_templates(lm, hp.context_template_lengths, hp.template_seed)
        for item in requests:
            record = item if _is_record(item) else rome_edit(lm, item, hparams, stats, **kwargs)
            ledger.apply(record)
            records.append(record)
        yield records
    finally:
        ledger.revert_all()
