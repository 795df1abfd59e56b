"""Edit records: what an edit changes and how it was made, identified by a hash of all of it.

- :class:`EditRecord`: one ROME edit, ΔW = v uᵀ at one module.
- :class:`MemitRecord`: one MEMIT batch, a dense ΔW at each of several modules.
- :class:`AlphaEditRecord`: one AlphaEdit batch, a MEMIT-like record that also keeps the keys it wrote.

All follow the protocol of :class:`~tracer.edit.book.EditRecordLike` (``id``, ``modules``,
``module_delta``, ``fingerprints``, ``to_dict``), so one book applies and reverts them and one
file format (:mod:`tracer.edit.record_files`) holds them. A record's ``id`` is 16 hex digits of
SHA-256 over every field of its ``to_dict()`` and all its tensors, so a file whose layer,
fingerprint, k*, settings or anything else was edited does not load. Records written before that
rule (ledger formats 1 and 2, MEMIT format 1) are verified by their own rule (``legacy_id``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import ClassVar, Sequence

import torch

from ..errors import EditError
from ..models import LanguageModel
from .book import WeightBook
from .fields import (MISSING, TENSOR_FIELDS, checked_field, checked_tensor, content_digest, dict_of, is_int, is_number,
                     list_of, verify_content)
from .hparams import AlphaEditHyperParams, MemitHyperParams, ROMEHyperParams
from .requests import EditRequest, Request

RECORD_FORMAT = 2   # an EditRecord dict's "format": 2 = the id covers every field; absent = the old id
MEMIT_FORMAT = 2    # a MemitRecord dict's "format": 2 = the id covers every field; 1 = over modules, requests, ΔW
ALPHAEDIT_FORMAT = 1  # an AlphaEditRecord dict's "format" (its id covers every field, the ΔW and the keys)


@dataclass(frozen=True, eq=False)
class EditRecord:
    """One rank-one edit: ΔW = v uᵀ ("out in") at ``module`` (``layer``), and how it was made.

    ``u`` ("d_k") is C⁻¹k* normalised, ``v`` ("d_out") the right vector; both float64 on the CPU.
    ``k_star``/``v_star`` are the key and target value the update maps onto each other.
    ``before``/``after`` hold ``{"top1", "p_new", "p_true"}`` on the rewrite prompt.
    """

    request: EditRequest
    hparams: ROMEHyperParams
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
        return content_digest(self._content(), [(name, getattr(self, name).double()) for name in TENSOR_FIELDS])

    @property
    def legacy_id(self) -> str:
        """The id rule of ledger formats 1 and 2: the module, the request and the factors' bytes only."""
        h = hashlib.sha256(f"{self.module}|{json.dumps(self.request.to_dict(), sort_keys=True)}".encode())
        for t in (self.u, self.v):
            h.update(t.detach().double().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        """One line of a ledger view: ``{"id", "method", "prompt", "change", "layers", "p_new_after"}`` (plain text)."""
        return {"id": self.id, "method": self.method, "prompt": self.request.text,
                "change": f"{self.target_true} \u2192 {self.request.target_new}", "layers": str(self.layer),
                "p_new_after": self.after.get("p_new")}

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
        return {"format": RECORD_FORMAT, "method": self.method, "request": self.request.to_dict(),
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
            d.update({name: getattr(self, name).tolist() for name in TENSOR_FIELDS})
        return d

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, torch.Tensor] | None = None, *, source: str = "edit record",
                  legacy: bool | None = None) -> "EditRecord":
        """The record of :meth:`to_dict` (tensors in ``d`` as lists, or given), every field checked and
        the id verified (a dict without ``id`` is not verified). ``legacy``: verify by the rule of
        ledger formats 1 and 2 (``None``: by ``d``'s ``format``). Errors name ``source``."""
        if not isinstance(d, dict):
            raise EditError(f"{source} must be a JSON object, got {type(d).__name__}")
        if legacy is None:
            legacy = "format" not in d
        if not legacy:
            checked_field(d, "format", lambda x: x == RECORD_FORMAT, f"{RECORD_FORMAT}", source)
        number_list = list_of(is_number)
        f = lambda name, ok, accepted, default=MISSING: checked_field(d, name, ok, accepted, source, default)  # noqa: E731
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
            for name in TENSOR_FIELDS:
                values = f(name, number_list, "a list of finite numbers")
                tensors[name] = torch.tensor(values, dtype=torch.float64)
        for name in TENSOR_FIELDS:
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


@dataclass(eq=False)
class MemitRecord:
    """One MEMIT batch: per-layer ΔW ("out d_k", float32, CPU) and the settings it was made with.

    :meth:`apply` and :meth:`revert` go through the model's :class:`~tracer.edit.book.WeightBook`,
    like every ledger: all layers or none, bit-exact in any order.
    """

    requests: list[Request]
    hparams: MemitHyperParams
    modules: list[str]
    deltas: list[torch.Tensor]
    templates: tuple[str, ...]
    stats: list[dict]
    z_losses: list[list[float]]
    timings: dict[str, float]
    fingerprints: dict[int, str] = field(default_factory=dict)
    method: str = "MEMIT"

    #: what a file's "method" and "format" must say, and the settings class, for this record type
    METHOD: ClassVar[str] = "MEMIT"
    FORMAT: ClassVar[int] = MEMIT_FORMAT
    HPARAMS: ClassVar[type] = MemitHyperParams

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.hparams.layers)

    @cached_property
    def id(self) -> str:
        """16 hex digits of SHA-256 over every field of :meth:`to_dict` and the ΔW (computed once)."""
        return content_digest(self._content(), [(f"delta.{i}", d.detach().float()) for i, d in enumerate(self.deltas)])

    @property
    def legacy_id(self) -> str:
        """The id rule of format-1 records: the modules, the requests and the ΔW bytes only."""
        h = hashlib.sha256(json.dumps({"modules": self.modules, "requests": [asdict(r) for r in self.requests]},
                                      sort_keys=True).encode())
        for d in self.deltas:
            h.update(d.detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def module_delta(self, name: str) -> torch.Tensor:
        """ΔW at module ``name``, float64, shape "d_out d_k" (the ``nn.Linear`` layout) — what a
        :class:`tracer.edit.Ledger` adds there when it applies this batch."""
        return self.deltas[self.modules.index(name)].double()

    def summary(self) -> dict:
        """One line of a ledger view (see :meth:`EditRecord.summary`): the first request, and how many more."""
        first = self.requests[0]
        more = f" (+{len(self.requests) - 1} more)" if len(self.requests) > 1 else ""
        layers = f"{self.layers[0]}\u2013{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])
        return {"id": self.id, "method": self.method, "prompt": first.text + more, "change": f"\u2192 {first.target_new}",
                "layers": layers, "p_new_after": None}

    @property
    def applied(self) -> bool:
        """Whether the batch is applied to a live model (through :meth:`apply` or a ledger)."""
        return bool(WeightBook.holding(self))

    def apply(self, model: "LanguageModel | str") -> "MemitRecord":
        """Add ΔW to every edited weight, through the model's :class:`~tracer.edit.book.WeightBook`
        (all layers or none; bit-exact revert in any order)."""
        WeightBook.of(model).apply(self, verify=False)
        return self

    def revert(self, model: "LanguageModel | str") -> "MemitRecord":
        """Restore the weights the model would have without this batch, bit for bit."""
        WeightBook.of(model).revert(self)
        return self

    def _content(self) -> dict:
        return {"format": MEMIT_FORMAT, "method": "MEMIT", "requests": [asdict(r) for r in self.requests],
                "hparams": self.hparams.to_dict(), "modules": list(self.modules), "templates": list(self.templates),
                "stats": self.stats, "z_losses": self.z_losses, "timings": self.timings,
                "fingerprints": {str(k): v for k, v in self.fingerprints.items()}}

    def to_dict(self) -> dict:
        return {"id": self.id, **self._content()}

    @classmethod
    def from_dict(cls, meta: dict, deltas: Sequence[torch.Tensor], *, source: str = "MEMIT record",
                  legacy: bool | None = None, **extra) -> "MemitRecord":
        """The (unapplied) record from :meth:`to_dict` and its ΔW tensors, every field checked and
        verified against ``meta["id"]`` (by the format-1 rule for format-1 records, or when
        ``legacy``). Errors are :class:`EditError` s naming ``source`` and the field. ``extra``:
        fields of a subclass, already checked (:meth:`AlphaEditRecord.from_dict`)."""
        if not isinstance(meta, dict):
            raise EditError(f"{source} must be a JSON object, got {type(meta).__name__}")
        fmt = meta.get("format")
        if legacy is None:
            legacy = fmt == 1 and cls.METHOD == "MEMIT"
        want = 1 if legacy else cls.FORMAT
        if fmt != want or meta.get("method") != cls.METHOD:
            raise EditError(f"{source} is not a {cls.METHOD} record of format {want} (format {fmt!r:.40}, "
                            f"method {meta.get('method')!r:.40})")

        def f(name, ok, accepted, *default):
            return checked_field(meta, name, ok, accepted, source, *default)

        is_str = lambda x: isinstance(x, str)  # noqa: E731
        modules = f("modules", lambda x: list_of(is_str)(x) and len(x) > 0, "a non-empty list of module names")
        if len(deltas) != len(modules):
            raise EditError(f"{source} names {len(modules)} modules but has {len(deltas)} ΔW tensors")
        deltas = [checked_tensor(d, f"delta.{i}", source, 2).float() for i, d in enumerate(deltas)]
        if len({tuple(d.shape) for d in deltas}) != 1:
            raise EditError(f"{source}: its ΔW tensors differ in shape ({[tuple(d.shape) for d in deltas]}); "
                            "the file is corrupted")
        reqs = f("requests", lambda x: isinstance(x, list) and len(x) > 0 and all(
            isinstance(r, dict) and set(r) == {"subject", "prompt", "target_new"} and all(map(is_str, r.values()))
            for r in x), "a non-empty list of {subject, prompt, target_new} strings")
        try:
            requests = [Request.coerce(r) for r in reqs]
            hparams = cls.HPARAMS.from_dict(f("hparams", lambda x: isinstance(x, dict), "a JSON object"))
        except (TypeError, ValueError) as e:
            raise EditError(f"{source}: invalid requests or hparams ({str(e)[:120]})") from None
        if [Request(**r) for r in reqs] != requests:
            raise EditError(f"{source}: field 'requests' must hold prompts with '{{}}' in them")
        if len(hparams.layers) != len(modules):
            raise EditError(f"{source}: field 'hparams' edits {len(hparams.layers)} layers but 'modules' names "
                            f"{len(modules)}")
        fingerprints = f("fingerprints", dict_of(is_str), "a JSON object {layer: fingerprint}", {})
        try:
            fingerprints = {int(k): v for k, v in fingerprints.items()}
        except ValueError:
            raise EditError(f"{source}: field 'fingerprints' must be keyed by layer numbers") from None
        record = cls(requests=requests, hparams=hparams, modules=list(modules), deltas=deltas,
                     templates=tuple(f("templates", lambda x: list_of(is_str)(x) and len(x) > 0, "a list of strings")),
                     stats=f("stats", list_of(lambda x: isinstance(x, dict)), "a list of JSON objects"),
                     z_losses=f("z_losses", list_of(list_of(is_number)), "a list of loss curves (finite numbers)"),
                     timings=f("timings", dict_of(is_number), "a JSON object of numbers"),
                     fingerprints=fingerprints, **extra)
        if "id" in meta:
            f("id", is_str, "a string")
            verify_content(record, meta, source, legacy, f"{cls.METHOD} record")
        return record


@dataclass(eq=False)
class AlphaEditRecord(MemitRecord):
    """One AlphaEdit batch (:mod:`tracer.edit.alphaedit`): ΔW per layer as in :class:`MemitRecord`,
    each in the null space of its layer's preserved keys, plus what a sequence needs after it:

    - ``keys``: the keys the batch wrote at each layer ("n d_k", float32, CPU): later batches of a
      sequence keep them (the running set K_p), so a resumed sequence rebuilds K_p from its ledger;
    - ``projection``: per layer, how P was made (threshold, its rule, the null-space dimension).

    Applied, reverted, saved and loaded like any record (bit-exact; the id covers every field,
    the ΔW and the keys).
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    projection: list[dict] = field(default_factory=list)
    method: str = "AlphaEdit"

    METHOD: ClassVar[str] = "AlphaEdit"
    FORMAT: ClassVar[int] = ALPHAEDIT_FORMAT
    HPARAMS: ClassVar[type] = AlphaEditHyperParams

    @cached_property
    def id(self) -> str:
        """16 hex digits of SHA-256 over every field of :meth:`to_dict`, the ΔW and the keys (computed once)."""
        return content_digest(self._content(), [(f"delta.{i}", d.detach().float()) for i, d in enumerate(self.deltas)]
                              + [(f"keys.{i}", k.detach().float()) for i, k in enumerate(self.keys)])

    @property
    def legacy_id(self) -> str:
        raise EditError("AlphaEdit records have no legacy format")

    def _content(self) -> dict:
        return {**super()._content(), "format": ALPHAEDIT_FORMAT, "method": "AlphaEdit", "projection": self.projection}

    @classmethod
    def from_dict(cls, meta: dict, deltas: Sequence[torch.Tensor], keys: Sequence[torch.Tensor] = (), *,
                  source: str = "AlphaEdit record", legacy: bool | None = None) -> "AlphaEditRecord":
        """The (unapplied) record from :meth:`to_dict`, its ΔW and its keys, checked and verified as
        :meth:`MemitRecord.from_dict` does (one key tensor "n d_k" per ΔW, n = the requests)."""
        if legacy:
            raise EditError(f"{source}: AlphaEdit records have no legacy format")
        if not isinstance(meta, dict):
            raise EditError(f"{source} must be a JSON object, got {type(meta).__name__}")
        projection = checked_field(meta, "projection", list_of(dict_of(lambda x: isinstance(x, str) or is_number(x))),
                                   "a list of JSON objects of numbers and strings", source)
        n = len(meta.get("requests") or [])
        keys = [checked_tensor(k, f"keys.{i}", source, 2).float() for i, k in enumerate(keys)]
        if len(keys) != len(deltas) or len(projection) != len(deltas):
            raise EditError(f"{source} has {len(deltas)} ΔW tensors but {len(keys)} key tensors and {len(projection)} "
                            "projection entries; the file is corrupted")
        for i, (k, d) in enumerate(zip(keys, deltas)):
            if k.shape[0] != n or k.shape[1] != d.shape[-1]:
                raise EditError(f"{source}: tensor 'keys.{i}' has shape {tuple(k.shape)}, its record needs ({n}, "
                                f"{d.shape[-1]}) (requests, d_k); the file is corrupted")
        return super().from_dict(meta, deltas, source=source, legacy=False, keys=keys, projection=list(projection))
