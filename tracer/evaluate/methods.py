"""Editing methods as the evaluation harness drives them: apply to a batch of cases, then revert.

    method = make_method("memit", lm)            # any name in METHODS: "none", "ft-l", "rome", "memit", "alphaedit"
    handle = method.apply(lm, cases)             # the model now holds the edits
    method.revert(lm, handle)                    # the original weights, bit for bit

- ``none``: the unedited model.
- ``ft-l``: ROME's constrained fine-tuning baseline (FT+L, Zhu et al. 2020): Adam on the MLP output
  projection at ROME's layer, loss = NLL of the new target after the rewrite prompt, and after every
  step the weight is clipped to ``W0 ± norm_constraint`` (an L∞ ball). ROME's GPT-2 XL settings:
  25 steps, lr 5e-4, ε = 5e-4.
- ``rome``: :func:`tracer.edit.rome.rome_edit` one case at a time (batch size 1), applied with a
  :class:`tracer.edit.ledger.Ledger` and reverted after the case is measured.
- ``memit``: :func:`tracer.edit.memit.compute_memit` on the whole batch.
- ``alphaedit``: :class:`tracer.edit.alphaedit.AlphaEditor` on the whole batch (MEMIT's z and keys,
  the update projected onto the null space of the preserved keys). Its K_p holds the batches
  applied and not yet reverted: none in ``factscope evaluate`` (each batch is reverted after it is
  measured), the earlier batches of a sequence in :mod:`tracer.evaluate.sequence`.

Each is a :class:`MethodSpec` in the registry :data:`METHODS`; a new editor registers one.
``method.parts(lm)`` is what a method resolved on the unedited model (C, context templates,
AlphaEdit's projectors): ``make_method(name, other_lm, parts=...)`` on a copy of the model (a Ray
worker) builds the same method without reading them again. MEMIT and AlphaEdit also take the
batch's z computed already (``apply(lm, cases, zs=...)``, e.g. spread over workers).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol, Sequence

import torch

from ..edit.book import WeightBook
from ..edit.alphaedit import AlphaEditor
from ..edit.hparams import AlphaEditHyperParams, FTLHyperParams, MemitHyperParams, ROMEHyperParams
from ..edit.ledger import Ledger
from ..edit.memit import compute_memit
from ..edit.requests import EditRequest
from ..edit.rome import rome_edit
from ..edit.statistics import checked_pairs, statistics_at
from ..edit.templates import context_templates, rome_templates
from ..edit.zs import ZResult
from ..errors import HyperParameterError
from ..layers import get_module
from ..models import LanguageModel, right_pad
from ..scoring import split_prompt_target
from ..targets import spaced
from .records import Case


class Method(Protocol):
    """What the harness drives: ``apply`` edits the model for a batch of cases and returns a handle
    that ``revert`` takes to give the model its original weights back, bit for bit."""

    name: str

    def settings(self) -> dict: ...

    def parts(self, lm: LanguageModel) -> dict: ...

    def apply(self, lm: LanguageModel, cases: Sequence[Case]) -> Any: ...

    def revert(self, lm: LanguageModel, handle: Any) -> None: ...


class NoEdit:
    name = "none"

    def settings(self) -> dict:
        return {}

    def parts(self, lm: LanguageModel) -> dict:
        return {}

    def apply(self, lm: LanguageModel, cases: Sequence[Case]) -> Any:
        return None

    def revert(self, lm: LanguageModel, handle: Any) -> None:
        return None


class FineTuneL:
    """Constrained fine-tuning of one MLP output matrix (see the module docstring)."""

    name = "ft-l"

    def __init__(self, hp: FTLHyperParams):
        self.hp = hp

    def settings(self) -> dict:
        return self.hp.to_dict()

    def parts(self, lm: LanguageModel) -> dict:
        return {}

    def apply(self, lm: LanguageModel, cases: Sequence[Case]) -> Any:
        weight = get_module(lm.model, lm.layers.mlp_out_name(self.hp.layer)).weight
        original = weight.detach().clone()
        rows = [split_prompt_target(lm.tokenizer, c.rewrite_prompt, c.target_new) for c in cases]
        ids, mask = right_pad([seq for seq, _ in rows], lm.pad_id, "cpu")
        labels = torch.full_like(ids, -100)
        for i, (seq, n_prefix) in enumerate(rows):
            labels[i, n_prefix:len(seq)] = torch.tensor(seq[n_prefix:])
        ids, mask, labels = ids.to(lm.device), mask.to(lm.device), labels.to(lm.device)
        n_tok = (labels != -100).sum(1).clamp(min=1)
        weight.requires_grad_(True)
        opt = torch.optim.Adam([weight], lr=self.hp.lr)
        eps = self.hp.norm_constraint
        try:
            with torch.enable_grad():
                for _ in range(self.hp.steps):
                    opt.zero_grad()
                    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                    lp = torch.log_softmax(logits, -1)
                    tgt = labels[:, 1:]
                    tok_lp = lp.gather(2, tgt.clamp(min=0)[..., None])[..., 0] * (tgt != -100)
                    loss = (-tok_lp.sum(1) / n_tok).mean()  # ROME's FT: mean NLL per target token
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        weight.copy_(torch.minimum(torch.maximum(weight, original - eps), original + eps))
        except BaseException:
            with torch.no_grad():
                weight.copy_(original)
            raise
        finally:
            weight.requires_grad_(False)
            weight.grad = None
        return original

    def revert(self, lm: LanguageModel, handle: Any) -> None:
        weight = get_module(lm.model, lm.layers.mlp_out_name(self.hp.layer)).weight
        with torch.no_grad():
            weight.copy_(handle)


class RomeMethod:
    """ROME, one case per edit, via the ROME module's ledger."""

    name = "rome"

    def __init__(self, lm: LanguageModel, hp=None, stats=None, *, statistics=None, templates=None):
        self.hp = hp or ROMEHyperParams.for_model(lm)
        self.stats = statistics if statistics is not None else stats
        self._templates = templates

    def settings(self) -> dict:
        return self.hp.to_dict()

    def parts(self, lm: LanguageModel) -> dict:
        self._resolve(lm)
        return {"statistics": self.stats, "templates": self._templates}

    def _resolve(self, lm: LanguageModel) -> None:
        """C and the context templates, once, on the unedited model."""
        if self._templates is None:
            self._templates = rome_templates(lm, self.hp)
        if self.stats is None or isinstance(self.stats, str):
            self.stats = statistics_at(lm, self.hp.layer, self.stats, self.hp.stats_tokens,
                                       chunk_tokens=self.hp.stats_chunk_tokens)

    def apply(self, lm: LanguageModel, cases: Sequence[Case]) -> Any:
        self._resolve(lm)
        ledger = Ledger(lm)
        for c in cases:
            req = EditRequest(c.prompt, c.subject, spaced(c.target_new),
                              spaced(c.target_true) if c.target_true and c.target_true.strip() != c.target_new.strip() else None)
            record = rome_edit(lm, req, self.hp, self.stats, context_templates=self._templates, progress=False)
            ledger.apply(record)
        return ledger

    def revert(self, lm: LanguageModel, handle: Any) -> None:
        handle.revert_all()


class MemitMethod:
    """MEMIT on each batch; C is read once on the unedited model and reused for every batch."""

    name = "memit"

    def __init__(self, lm: LanguageModel, hp=None, stats=None, progress: bool = False, *, statistics=None,
                 templates=None):
        self.hp = hp or MemitHyperParams.for_model(lm)
        self.statistics = checked_pairs(lm, self.hp, stats, statistics, progress)
        self.templates = tuple(templates) if templates is not None else context_templates(lm, self.hp)
        self.progress = progress
        self.checkpoint_dir = None  # a sequence sets <out>/z (the harness passes its own to compute_zs)

    def settings(self) -> dict:
        return {**self.hp.to_dict(), "statistics": [info for _, info in self.statistics.values()]}

    def parts(self, lm: LanguageModel) -> dict:
        return {"statistics": self.statistics, "templates": self.templates}

    def apply(self, lm: LanguageModel, cases: Sequence[Case], zs: ZResult | None = None) -> Any:
        return compute_memit(lm, cases, self.hp, statistics=self.statistics, templates=self.templates,
                             progress=self.progress, checkpoint_dir=self.checkpoint_dir, zs=zs)

    def revert(self, lm: LanguageModel, handle: Any) -> None:
        WeightBook.of(lm).revert(handle)


class AlphaEditMethod(MemitMethod):
    """AlphaEdit on each batch: C and P read once on the unedited model; K_p = the keys of the
    batches applied through this method and not reverted (:meth:`adopt` adds batches a ledger applied)."""

    name = "alphaedit"

    def __init__(self, lm: LanguageModel, hp=None, stats=None, progress: bool = False, *, statistics=None,
                 templates=None, projections=None):
        super().__init__(lm, hp or AlphaEditHyperParams.for_model(lm), stats, progress, statistics=statistics,
                         templates=templates)
        self.editor = AlphaEditor(lm, self.hp, statistics=self.statistics, templates=self.templates, progress=progress,
                                  projections=projections)

    def settings(self) -> dict:
        return self.editor.settings()

    def parts(self, lm: LanguageModel) -> dict:
        """C, the templates and P; not K_p (a method built from them starts with no batches in K_p)."""
        return {**super().parts(lm), "projections": self.editor.projections}

    def apply(self, lm: LanguageModel, cases: Sequence[Case], zs: ZResult | None = None) -> Any:
        return self.editor.edit(cases, checkpoint_dir=self.checkpoint_dir, zs=zs)

    def revert(self, lm: LanguageModel, handle: Any) -> None:
        WeightBook.of(lm).revert(handle)
        self.editor.forget(handle)

    def adopt(self, records: Sequence[Any]) -> None:
        """Batches of this sequence applied by other means (a resumed ledger), in order: into K_p."""
        for record in records:
            self.editor.remember(record)


@dataclass(frozen=True)
class MethodSpec:
    """A registered editing method: its hyper-parameter class (None: no settings), how to build it
    for a model (``build(lm, hp, stats, progress, **parts)``, ``parts`` from :meth:`Method.parts`)
    and which of ``layer``/``layers`` picks its layers."""

    name: str
    hparams: type | None
    build: Callable[..., Method]
    layer_option: str | None
    description: str
    batched: bool = False  # edits a whole batch at once (``factscope evaluate``'s default: every case in one batch)


#: the methods ``factscope evaluate --method`` accepts, by name
METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (a new editor registers itself here to be evaluated)."""
    if spec.name in METHODS:
        raise HyperParameterError(f"a method called {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


register(MethodSpec("none", None, lambda lm, hp, stats, progress: NoEdit(), None, "the unedited model"))
register(MethodSpec("ft-l", FTLHyperParams, lambda lm, hp, stats, progress: FineTuneL(hp), "layer",
                    "constrained fine-tuning of ROME's layer (FT+L)"))
register(MethodSpec("rome", ROMEHyperParams, lambda lm, hp, stats, progress, **parts: RomeMethod(lm, hp, stats, **parts),
                    "layer", "ROME, one case per edit"))
register(MethodSpec("memit", MemitHyperParams,
                    lambda lm, hp, stats, progress, **parts: MemitMethod(lm, hp, stats, progress, **parts),
                    "layers", "MEMIT on each batch of cases", batched=True))
register(MethodSpec("alphaedit", AlphaEditHyperParams,
                    lambda lm, hp, stats, progress, **parts: AlphaEditMethod(lm, hp, stats, progress, **parts), "layers",
                    "AlphaEdit (MEMIT projected onto the preserved keys' null space) on each batch of cases", batched=True))


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``, or a :class:`HyperParameterError` listing the accepted ones."""
    if name not in METHODS:
        raise HyperParameterError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]


def check_overrides(name: str, overrides: dict) -> None:
    """Raise :class:`HyperParameterError` naming the accepted fields when ``overrides`` has a key
    that method ``name``'s hyper-parameters do not have."""
    cls = method_spec(name).hparams
    accepted = sorted(f.name for f in fields(cls)) if cls is not None else []
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise HyperParameterError(
            f"{name} has no hyper-parameter {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}")


def method_hparams(lm: LanguageModel, name: str, *, layer: int | None = None, layers: Sequence[int] | None = None,
                   stats: Any = None, **overrides) -> Any:
    """The hyper-parameters of method ``name`` for ``lm`` with the options of :func:`make_method`
    (None for ``none``); ``stats`` is accepted and ignored, so the same options serve both."""
    spec = method_spec(name)
    check_overrides(name, overrides)
    if spec.layer_option == "layer" and layer is not None:
        overrides["layer"] = layer
    if spec.layer_option == "layers" and layers:
        overrides["layers"] = tuple(layers)
    return spec.hparams.for_model(lm, **overrides) if spec.hparams is not None else None


def make_method(name: str, lm: LanguageModel, *, layer: int | None = None, layers: Sequence[int] | None = None,
                stats: Any = None, progress: bool = False, parts: dict | None = None, **overrides) -> Method:
    """The method called ``name`` with its defaults for ``lm`` (``layer``: ROME / FT-L layer;
    ``layers``: MEMIT's range; ``overrides``: hyper-parameter fields; ``parts``: what
    :meth:`Method.parts` returned for the same options on a copy of the model)."""
    hp = method_hparams(lm, name, layer=layer, layers=layers, **overrides)
    return method_spec(name).build(lm, hp, stats, progress, **(parts or {}))
