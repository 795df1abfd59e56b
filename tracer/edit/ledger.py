"""Edit records and the ledger that applies and reverts them exactly.

    ledger = Ledger(lm)
    ledger.apply(record)              # W <- W0 + Σ v uᵀ over the applied records
    ledger.revert(record)             # bit-exact: the weights depend only on the *set* applied
    ledger.save("edits.safetensors"); Ledger(fresh_lm).apply_all(Ledger.load("edits.safetensors"))
    with edited(lm, [request]) as records: ...   # restored on exit, also on exceptions

The ledger snapshots each module's weight before its first edit. Applying or reverting recomputes
``W = float(W0 + Σ_r v_r u_rᵀ)`` in float64 with the records in a canonical order (by id), so
the result is a function of the set of applied records: any order of apply/revert gives the same
bits, and reverting everything copies the snapshot back. Every check runs before the weight is
written, so an edit that fails leaves the model untouched.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import EditError, UnknownLayerError
from ..models import LanguageModel, as_model
from ..stats import key_fingerprint

log = logging.getLogger(__name__)

_LEDGER_FORMAT = 1
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
    """Applies and reverts :class:`EditRecord` s on one model, exactly; saves and loads them.

    Use one ledger per model for all its edits: the ledger refuses to write a module whose
    weight was changed behind its back (:class:`EditError`).
    """

    def __init__(self, model: "LanguageModel | str"):
        self.lm = as_model(model)
        self._applied: list[EditRecord] = []
        self._original: dict[str, torch.Tensor] = {}
        self._written: dict[str, torch.Tensor] = {}

    @property
    def records(self) -> tuple[EditRecord, ...]:
        """The applied records, in the order they were applied."""
        return tuple(self._applied)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.revert_all()

    # ------------------------------------------------------------------ apply / revert

    def apply(self, record: EditRecord, *, verify: bool = True) -> None:
        """Add ``record``'s ΔW. ``verify`` also checks the model's key fingerprint at the layer."""
        if not isinstance(record, EditRecord):
            raise EditError(f"expected an EditRecord, got {type(record).__name__}")
        if any(r.id == record.id for r in self._applied):
            raise EditError(f"edit {record.id} is already applied to this model")
        weight = self._weight(record)
        if verify:
            fp = key_fingerprint(self.lm, record.layer)
            if fp != record.fingerprint:
                raise EditError(f"edit {record.id} was computed for other weights (fingerprint {record.fingerprint}, this model "
                                f"{fp} at layer {record.layer}); apply ledgers to the model they were made on, in their "
                                "order, or pass verify=False")
        self._check_untouched(record.module, weight)
        new = self._compose(record.module, weight, [r for r in self._applied if r.module == record.module] + [record])
        self._write(record.module, weight, new)
        self._applied.append(record)

    def revert(self, record: EditRecord) -> None:
        """Remove ``record``'s ΔW; the weights equal those of the remaining set, bit for bit."""
        if not any(r.id == record.id for r in self._applied):
            raise EditError(f"edit {record.id} is not applied by this ledger; applied: {[r.id for r in self._applied]}")
        weight = self._weight(record)
        self._check_untouched(record.module, weight)
        rest = [r for r in self._applied if r.id != record.id]
        same = [r for r in rest if r.module == record.module]
        if same:
            self._write(record.module, weight, self._compose(record.module, weight, same))
        else:
            with torch.no_grad():
                weight.copy_(self._original.pop(record.module))
            self._written.pop(record.module)
        self._applied = rest

    def revert_all(self) -> None:
        """Revert every applied record (latest first); the model's weights are the originals."""
        for record in reversed(list(self._applied)):
            self.revert(record)

    def apply_all(self, records: Sequence[EditRecord], *, verify: bool = True) -> None:
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

    def _weight(self, record: EditRecord) -> torch.nn.Parameter:
        try:
            module = self.lm.model.get_submodule(record.module)
        except AttributeError:
            raise UnknownLayerError(f"edit {record.id} targets {record.module!r}, which this model does not have") from None
        weight = module.weight
        d_out, d_k = (weight.shape[1], weight.shape[0]) if self.lm.layers.mlp_out_transposed else weight.shape
        if tuple(record.u.shape) != (d_k,) or tuple(record.v.shape) != (d_out,):
            raise EditError(f"edit {record.id} has factors u {tuple(record.u.shape)}, v {tuple(record.v.shape)}; "
                            f"{record.module} needs u ({d_k},) and v ({d_out},)")
        if not (torch.isfinite(record.u).all() and torch.isfinite(record.v).all()):
            raise EditError(f"edit {record.id} has non-finite factors; it was not applied")
        return weight

    def _check_untouched(self, name: str, weight: torch.Tensor) -> None:
        if name in self._written and not torch.equal(weight.detach(), self._written[name]):
            raise EditError(f"{name} was changed outside this ledger since its last edit; use one ledger per model")

    def _compose(self, name: str, weight: torch.Tensor, records: list[EditRecord]) -> torch.Tensor:
        original = self._original.get(name, weight.detach())
        total = original.double().clone()
        for r in sorted(records, key=lambda r: r.id):
            d = r.delta().to(total.device)
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
    def load(path: str | os.PathLike) -> list[EditRecord]:
        """Records of a ledger file, in their order (verified against their ids)."""
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


def save_records(records: Sequence[EditRecord], path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise EditError(f"cannot write the ledger to {str(path)!r}: directory {str(path.parent)!r} does not exist")
    tensors = {f"{i}.{name}": getattr(r, name).double().contiguous().cpu() for i, r in enumerate(records) for name in _TENSORS}
    meta = {"format": _LEDGER_FORMAT, "records": [r.to_dict() for r in records]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"factscope_ledger": json.dumps(meta)})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_records(path: str | os.PathLike) -> list[EditRecord]:
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
    if meta.get("format") != _LEDGER_FORMAT:
        raise EditError(f"{str(path)!r} has ledger format {meta.get('format')!r}; this version reads {_LEDGER_FORMAT}")
    records = []
    for i, d in enumerate(meta["records"]):
        try:
            parts = {name: tensors[f"{i}.{name}"] for name in _TENSORS}
        except KeyError as e:
            raise EditError(f"{str(path)!r} lacks tensor {e.args[0]}; the file is corrupted") from None
        records.append(EditRecord.from_dict(d, parts))
    return records


@contextmanager
def edited(model: "LanguageModel | str", requests: Sequence, hparams=None, stats=None, **kwargs) -> Iterator[list[EditRecord]]:
    """Apply edits for the ``with`` block and restore the original weights on exit or exception.

    ``requests`` holds :class:`~tracer.edit.rome.EditRequest` s (computed with
    :func:`~tracer.edit.rome.rome_edit` one after another, each on the model with the previous
    ones applied, as ROME does) or ready :class:`EditRecord` s. Yields the records.
    """
    from .rome import ROMEHyperParams, generate_context_templates, rome_edit

    lm = as_model(model)
    ledger = Ledger(lm)
    try:
        records = []
        pending = [item for item in requests if not isinstance(item, EditRecord)]
        if len(pending) > 1 and kwargs.get("context_templates") is None:  # ROME generates them once per model
            hp = hparams or ROMEHyperParams.for_model(lm)
            kwargs["context_templates"] = generate_context_templates(lm, hp.context_template_lengths, hp.template_seed)
        for item in requests:
            record = item if isinstance(item, EditRecord) else rome_edit(lm, item, hparams, stats, **kwargs)
            ledger.apply(record)
            records.append(record)
        yield records
    finally:
        ledger.revert_all()
