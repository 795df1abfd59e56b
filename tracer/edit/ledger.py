"""Edit records and the ledger that applies and reverts them exactly.

    ledger = Ledger(lm)
    ledger.apply(record)              # W <- W0 + Σ ΔW over the applied records
    ledger.revert(record)             # bit-exact: the weights depend only on the *set* applied
    ledger.apply(compute_memit(lm, requests, apply=False))   # a MEMIT batch is one record too
    ledger.save("edits.safetensors"); Ledger(fresh_lm).apply_all(Ledger.load("edits.safetensors"))
    with edited(lm, [request]) as records: ...   # restored on exit, also on exceptions

Records are ROME's :class:`EditRecord` (ΔW = v uᵀ at one module) and MEMIT's
:class:`~tracer.edit.memit.MemitRecord` (a dense ΔW at each of several modules). The ledger
snapshots each module's weight before its first edit (on the CPU, in its own dtype) and keeps a
hash of what it last wrote, to notice writes behind its back. Applying or reverting recomputes
``W = float(W0 + Σ_r ΔW_r)`` in float64 with the records in a canonical order (by id), so the
result is a function of the set of applied records: any order of apply/revert gives the same
bits, and reverting everything copies the snapshot back. Every check runs before any weight is
written, so an edit that fails leaves the model untouched.

A record's ``id`` is 16 hex digits of SHA-256 over every field of its ``to_dict()`` and all its
tensors, so a file whose layer, fingerprint, k*, settings or anything else was edited does not
load. Files written before that rule (ledger formats 1 and 2, MEMIT record format 1) are still
read and verified by their own rule (module, request and factors or ΔW only). Every field read
from a file is checked; a malformed one is an :class:`EditError` naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ..errors import EditError, UnknownLayerError
from ..files import save_safetensors_atomic, write_directory_atomic, write_json_atomic
from ..models import LanguageModel, as_model
from ..stats import key_fingerprint

if TYPE_CHECKING:
    from .memit import MemitRecord
    from .rome import EditRequest, ROMEHyperParams

log = logging.getLogger(__name__)

_LEDGER_FORMAT = 3          # 3: ids over every field; 2 (ROME and MEMIT) and 1 (ROME only) are still read
_LEGACY_LEDGER_FORMATS = (1, 2)
_RECORD_FORMAT = 2          # an EditRecord dict's "format": 2 = the id covers every field; absent = the old id
_TENSORS = ("u", "v", "k_star", "v_star")


# ---------------------------------------------------------------------------- checked fields


_MISSING = object()


def _brief(value: Any) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, torch.Tensor) else f"a tensor {tuple(value.shape)}"
    return (text[:60] + "…") if len(text) > 60 else text


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def list_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, list) and all(ok(v) for v in x)


def dict_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, dict) and all(isinstance(k, str) and ok(v) for k, v in x.items())


def checked_field(d: dict, name: str, ok: Callable[[Any], bool], accepted: str, source: str, default: Any = _MISSING):
    """``d[name]`` if ``ok`` accepts it, else an :class:`EditError` naming ``source``, the field and
    what is ``accepted``; a missing field is ``default`` or an error when there is none."""
    if name not in d:
        if default is not _MISSING:
            return default
        raise EditError(f"{source} lacks field {name!r} ({accepted}); the file is corrupted or not a factscope record")
    if not ok(d[name]):
        raise EditError(f"{source}: field {name!r} must be {accepted}, got {_brief(d[name])}")
    return d[name]


def checked_tensor(t: Any, name: str, source: str, ndim: int, shape: tuple | None = None) -> torch.Tensor:
    """``t`` if it is a finite floating tensor with ``ndim`` dimensions (and ``shape`` where given)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != ndim or min(t.shape, default=1) < 1:
        what = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise EditError(f"{source}: tensor {name!r} must be a non-empty {ndim}-D floating tensor, got {what}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise EditError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, its record needs {tuple(shape)}")
    if not torch.isfinite(t).all():
        raise EditError(f"{source}: tensor {name!r} has non-finite values; the file is corrupted")
    return t


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The same bits as an integer tensor of the same width (bit-exact comparisons, hashing)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def weight_hash(w: torch.Tensor) -> str:
    """32 hex digits of SHA-256 over a weight's dtype, shape and bits."""
    h = hashlib.sha256(f"{w.dtype}|{tuple(w.shape)}|".encode())
    h.update(bits_view(w.detach()).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def content_digest(content: dict, tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """16 hex digits of SHA-256 over ``content`` (as canonical JSON) and each tensor's name, dtype,
    shape and bytes: the id rule of current records."""
    text = json.dumps(json.loads(json.dumps(content)), sort_keys=True)  # int keys and tuples as JSON has them
    h = hashlib.sha256(text.encode())
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def verify_content(record, d: dict, source: str, legacy: bool, kind: str) -> None:
    """Check ``d`` (the dict a file holds) against ``record`` (built from it): its id by the rule of
    its format and, for current files, every field equal to what the record gives back."""
    if legacy:
        if d["id"] != record.legacy_id:
            raise EditError(f"{source}: {kind} {d['id']} does not verify (its content hashes to {record.legacy_id}); "
                            "the file is corrupted")
        return
    back = json.loads(json.dumps(record.to_dict()))
    got = json.loads(json.dumps({k: v for k, v in d.items() if k not in _TENSORS}))

    def text(v):
        return json.dumps(v, sort_keys=True) if v is not _MISSING else None

    for key in sorted(set(back) | set(got)):
        if key != "id" and text(back.get(key, _MISSING)) != text(got.get(key, _MISSING)):
            raise EditError(f"{source}: field {key!r} does not verify against {kind} {d['id']}; the file is corrupted "
                            "or was edited")
    if d["id"] != record.id:
        raise EditError(f"{source}: {kind} {d['id']} does not verify (its content hashes to {record.id}); "
                        "the file is corrupted or was edited")


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

    @cached_property
    def id(self) -> str:
        """16 hex digits of SHA-256 over every field of :meth:`to_dict` and the four tensors (computed once)."""
        return content_digest(self._content(), [(name, getattr(self, name).double()) for name in _TENSORS])

    @property
    def legacy_id(self) -> str:
        """The id rule of ledger formats 1 and 2: the module, the request and the factors' bytes only."""
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

    def _content(self) -> dict:
        return {"format": _RECORD_FORMAT, "method": self.method, "request": self.request.to_dict(),
                "hparams": self.hparams.to_dict(), "model": self.model, "family": self.family,
                "fingerprint": self.fingerprint, "layer": self.layer, "module": self.module,
                "target_true": self.target_true, "statistics": dict(self.statistics),
                "context_templates": list(self.context_templates), "loss": list(self.loss),
                "loss_terms": {k: list(v) for k, v in self.loss_terms.items()}, "before": dict(self.before),
                "after": dict(self.after), "seconds": dict(self.seconds),
                "norms": {"u": float(self.u.norm()), "v": float(self.v.norm()), "delta_fro": float(self.u.norm() * self.v.norm())}}

    def to_dict(self, tensors: bool = False) -> dict:
        d = {"id": self.id, **self._content()}
        if tensors:
            d.update({name: getattr(self, name).tolist() for name in _TENSORS})
        return d

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, torch.Tensor] | None = None, *, source: str = "edit record",
                  legacy: bool | None = None) -> "EditRecord":
        """The record of :meth:`to_dict` (tensors in ``d`` as lists, or given), every field checked and
        the id verified (a dict without ``id`` is not verified). ``legacy``: verify by the rule of
        ledger formats 1 and 2 (``None``: by ``d``'s ``format``). Errors name ``source``."""
        from .rome import EditRequest, ROMEHyperParams

        if not isinstance(d, dict):
            raise EditError(f"{source} must be a JSON object, got {type(d).__name__}")
        if legacy is None:
            legacy = "format" not in d
        if not legacy:
            checked_field(d, "format", lambda x: x == _RECORD_FORMAT, f"{_RECORD_FORMAT}", source)
        number_list = list_of(is_number)
        f = lambda name, ok, accepted, default=_MISSING: checked_field(d, name, ok, accepted, source, default)  # noqa: E731
        request = f("request", lambda x: isinstance(x, dict), "a JSON object (prompt, subject, target_new, target_true)")
        hparams = f("hparams", lambda x: isinstance(x, dict), "a JSON object of ROME settings")
        try:
            request = EditRequest.from_dict(request)
        except (TypeError, ValueError) as e:
            raise EditError(f"{source}: field 'request' is not a valid edit request ({str(e)[:120]})") from None
        try:
            hparams = ROMEHyperParams.from_dict(hparams)
        except (TypeError, ValueError) as e:
            raise EditError(f"{source}: field 'hparams' holds invalid ROME settings ({str(e)[:120]})") from None
        if tensors is None:
            tensors = {}
            for name in _TENSORS:
                values = f(name, number_list, "a list of finite numbers")
                tensors[name] = torch.tensor(values, dtype=torch.float64)
        for name in _TENSORS:
            if name not in tensors:
                raise EditError(f"{source} lacks tensor {name!r}; the file is corrupted")
        u = checked_tensor(tensors["u"], "u", source, 1)
        v = checked_tensor(tensors["v"], "v", source, 1)
        k_star = checked_tensor(tensors["k_star"], "k_star", source, 1, tuple(u.shape))
        v_star = checked_tensor(tensors["v_star"], "v_star", source, 1, tuple(v.shape))
        record = cls(request=request, hparams=hparams,
                     model=f("model", lambda x: isinstance(x, str), "a string"),
                     family=f("family", lambda x: isinstance(x, str), "a string"),
                     fingerprint=f("fingerprint", lambda x: isinstance(x, str), "a string"),
                     layer=f("layer", lambda x: is_int(x) and x >= 0, "an integer >= 0"),
                     module=f("module", lambda x: isinstance(x, str) and x != "", "a module name"),
                     target_true=f("target_true", lambda x: isinstance(x, str), "a string"),
                     statistics=dict(f("statistics", lambda x: isinstance(x, dict), "a JSON object")),
                     context_templates=tuple(f("context_templates", list_of(lambda x: isinstance(x, str)), "a list of strings")),
                     loss=tuple(f("loss", number_list, "a list of finite numbers")),
                     loss_terms={k: tuple(v_) for k, v_ in f("loss_terms", dict_of(number_list),
                                                             "a JSON object of number lists", {}).items()},
                     before=dict(f("before", lambda x: isinstance(x, dict), "a JSON object", {})),
                     after=dict(f("after", lambda x: isinstance(x, dict), "a JSON object", {})),
                     seconds=dict(f("seconds", dict_of(is_number), "a JSON object of numbers", {})),
                     method=f("method", lambda x: x == "ROME", "'ROME'", "ROME"),
                     u=u.double(), v=v.double(), k_star=k_star.double(), v_star=v_star.double())
        if "id" in d:
            f("id", lambda x: isinstance(x, str), "a string")
            verify_content(record, d, source, legacy, "edit record")
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
        self._original: dict[str, torch.Tensor] = {}  # each edited weight before its first edit, on the CPU
        self._written: dict[str, str] = {}            # weight_hash of what the ledger last wrote there

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
            _revert_keeping(exc, self.revert_all)

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
                    weight.copy_(self._original.pop(name).to(weight.device))
                self._written.pop(name)
        self._applied = rest

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

            _revert_keeping(e, undo)
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
        if name in self._written and weight_hash(weight) != self._written[name]:
            raise EditError(f"{name} was changed outside this ledger since its last edit; use one ledger per model")

    def _compose(self, name: str, weight: torch.Tensor, records: list) -> torch.Tensor:
        original = self._original[name].to(weight.device) if name in self._original else weight.detach()
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
            self._original[name] = weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            weight.copy_(new)
        self._written[name] = weight_hash(weight)

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


def _revert_keeping(exc: BaseException, revert: Callable[[], None]) -> None:
    """Run ``revert`` while ``exc`` propagates: if it fails too, the failure is logged and noted on
    ``exc`` (which the caller re-raises), so the original error is the one the user sees."""
    try:
        revert()
    except Exception as failure:
        log.error("reverting the edits after %s failed too: %s: %s", type(exc).__name__, type(failure).__name__, failure)
        exc.add_note(f"factscope: reverting the edits afterwards failed too ({type(failure).__name__}: {failure}); "
                     "the model may still hold edited weights")


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
    each verified against its id; MEMIT batches come back unapplied. A malformed file is an
    :class:`EditError` naming the file and the field."""
    from safetensors import safe_open

    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise EditError(f"ledger file {name} does not exist")
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
    if fmt not in (*_LEGACY_LEDGER_FORMATS, _LEDGER_FORMAT):
        raise EditError(f"{name} has ledger format {fmt!r}; this version reads 1, 2 and {_LEDGER_FORMAT}")
    entries = checked_field(meta, "records", list_of(lambda x: isinstance(x, dict)), "a list of JSON objects", name)
    legacy = fmt in _LEGACY_LEDGER_FORMATS
    records, used = [], set()
    for i, d in enumerate(entries):
        source = f"{name} record {i}"
        checked_field(d, "id", lambda x: isinstance(x, str), "the record's id (a string)", source)
        if d.get("method") == "MEMIT":
            modules = checked_field(d, "modules", list_of(lambda x: isinstance(x, str)), "a list of module names", source)
            keys = [f"{i}.delta.{j}" for j in range(len(modules))]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise EditError(f"{name} lacks tensor {missing[0]!r}; the file is corrupted")
            records.append(_memit_record_type().from_dict(d, [tensors[k] for k in keys], source=source, legacy=legacy))
        else:
            keys = [f"{i}.{t}" for t in _TENSORS]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise EditError(f"{name} lacks tensor {missing[0]!r}; the file is corrupted")
            records.append(EditRecord.from_dict(d, {t: tensors[f"{i}.{t}"] for t in _TENSORS}, source=source,
                                                legacy=legacy))
        used.update(keys)
    extra = sorted(set(tensors) - used)
    if extra:
        raise EditError(f"{name} holds tensor {extra[0]!r}, which no record names; the file is corrupted")
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
    except BaseException as e:
        _revert_keeping(e, ledger.revert_all)
        raise
    else:
        ledger.revert_all()
