"""ROME (Meng et al., 2022): rewrite one fact with a rank-one update of an MLP output projection.

    request = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
    record = rome_edit(lm, request)               # computes the edit; the model is not changed
    Ledger(lm).apply(record)                      # see tracer.edit.ledger
    with edited(lm, [request]): ...               # edited inside the block only

Steps, as in the paper and the authors' code:

1. context templates: ``"{}"`` plus short texts the model samples itself (top-5 sampling from a
   document-start token or from start words, ``template_starts``), :func:`~tracer.edit.templates.rome_templates`; kept in the record.
2. k*: the key (input of the output projection) at the last subject token, averaged over the
   templates, :func:`~tracer.edit.keys.compute_keys`.
3. v*: a vector ``delta`` added to the MLP output at the last subject token is optimised with Adam
   so that the new target's tokens become likely after every template, plus the KL term on
   ``"{subject} is a"``, weight decay and a norm clamp, :func:`~tracer.edit.values.compute_v`.
4. ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*) with the same k* in both places (``update=
   "corrected"``, Gupta et al. 2024) or the paper's original form (``update="original"``: the
   bare prompt's key in the denominator and as the point where v* is reached).

:func:`edited` applies edits for a ``with`` block and restores the weights on exit.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Sequence

import torch

from ..errors import EditError, HyperParameterError
from ..models import LanguageModel, as_model
from ..targets import target_ids
from .hparams import ROMEHyperParams
from .keys import compute_keys, place
from .ledger import Ledger, revert_keeping
from .record_files import RECORD_TYPES
from .records import EditRecord
from .requests import EditRequest
from .statistics import statistics_at
from .templates import check_templates, rome_templates
from .values import Engine, compute_v

log = logging.getLogger(__name__)


@torch.no_grad()
def _next_token_probs(lm: LanguageModel, prompt: str) -> torch.Tensor:
    ids = torch.tensor([lm.encode(prompt)], device=lm.device)
    return torch.softmax(lm.model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)


def _summary(lm: LanguageModel, probs: torch.Tensor, new_id: int, true_id: int) -> dict:
    return {"top1": lm.decode(int(probs.argmax())), "p_new": float(probs[new_id]), "p_true": float(probs[true_id])}


def rome_edit(model: "LanguageModel | str", request: EditRequest, hparams: ROMEHyperParams | None = None, stats=None, *,
              context_templates: Sequence[str] | None = None, engine: Engine = "fast", progress: bool = True) -> EditRecord:
    """Compute the ROME edit for ``request``; the model's weights are not changed.

    ``stats``: see :func:`resolve_statistics`. ``context_templates`` overrides the generated ones.
    Returns an :class:`EditRecord` (apply it with :class:`~tracer.edit.ledger.Ledger` or
    :func:`~tracer.edit.ledger.edited`).
    """
    lm = as_model(model)
    if not isinstance(request, EditRequest):
        raise EditError(f"request must be an EditRequest, got {type(request).__name__}")
    hp = hparams or ROMEHyperParams.for_model(lm)
    if not isinstance(hp, ROMEHyperParams):
        raise HyperParameterError(f"hparams must be ROMEHyperParams, got {type(hp).__name__}")
    if hp.layer >= lm.n_layers:
        raise HyperParameterError(f"layer {hp.layer} does not exist: {lm.name} has layers 0..{lm.n_layers - 1}")
    clock = {}
    t0 = time.perf_counter()
    new_ids = target_ids(lm.tokenizer, request.target_new)
    place(lm, "{}", request.prompt, request.subject)  # validates prompt and subject before any work
    stats_ = statistics_at(lm, hp.layer, stats, hp.stats_tokens, chunk_tokens=hp.stats_chunk_tokens,
                            progress=progress)
    clock["statistics"] = time.perf_counter() - t0

    t = time.perf_counter()
    probs = _next_token_probs(lm, request.text)
    target_true = request.target_true if request.target_true is not None else lm.decode(int(probs.argmax()))
    true_id = target_ids(lm.tokenizer, target_true)[0]
    before = _summary(lm, probs, new_ids[0], true_id)
    if int(probs.argmax()) == new_ids[0]:
        log.warning("the model already answers %r to %r; the edit will mostly reinforce it", request.target_new, request.text)
    templates = check_templates(context_templates) if context_templates is not None else rome_templates(lm, hp)
    clock["templates"] = time.perf_counter() - t

    t = time.perf_counter()
    keys = compute_keys(lm, hp.layer, [request], templates)[0].double()  # "template d_k"
    k_star = keys.mean(0)
    clock["k_star"] = time.perf_counter() - t
    t = time.perf_counter()
    vres = compute_v(lm, hp.layer, [request], templates, hp, engine=engine, progress=progress)
    clock["v_star"] = time.perf_counter() - t

    module = lm.model.get_submodule(lm.layers.mlp_out_name(hp.layer))
    W = module.weight.detach().double()
    W = W.T if lm.layers.mlp_out_transposed else W  # "d_out d_k"
    bias = module.bias.detach().double() if getattr(module, "bias", None) is not None else torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    u = stats_.solve(k_star)
    u = u / u.norm()
    delta = vres.delta[0].double()
    v_star = vres.mlp_init[0].double() + delta
    if hp.update == "corrected":
        k = k_star
        right = (v_star - (W @ k + bias)) / (u @ k)
    else:
        k = keys[0]
        right = delta / (u @ k)
    if not (torch.isfinite(u).all() and torch.isfinite(right).all()):
        raise EditError("the update is not finite (C⁻¹k* or u·k* vanished); try other statistics or another layer")
    record = EditRecord(
        request=request, hparams=hp, model=lm.name, family=lm.layers.family,
        fingerprint=stats_.fingerprint, layer=hp.layer, module=lm.layers.mlp_out_name(hp.layer), u=u.cpu(),
        v=right.cpu(), k_star=k.cpu(), v_star=v_star.cpu(), target_true=target_true, statistics=stats_.to_dict(),
        context_templates=templates, loss=tuple(vres.loss[:, 0].tolist()),
        loss_terms={"nll": tuple(vres.nll[:, 0].tolist()), "kl": tuple(vres.kl[:, 0].tolist()),
                    "weight_decay": tuple(vres.weight_decay[:, 0].tolist()), "p_target": tuple(vres.p_target[:, 0].tolist())},
        before=before, seconds=clock)
    with Ledger(lm) as ledger:
        ledger.apply(record, verify=False)
        after = _summary(lm, _next_token_probs(lm, request.text), new_ids[0], true_id)
    clock["total"] = time.perf_counter() - t0
    return replace(record, after=after, seconds=dict(clock))


@contextmanager
def edited(model: "LanguageModel | str", requests: Sequence, hparams=None, stats=None, **kwargs) -> Iterator[list[EditRecord]]:
    """Apply edits for the ``with`` block and restore the original weights on exit or exception.

    ``requests`` holds :class:`EditRequest` s (computed with :func:`rome_edit` one after another, each on the model with the previous
    ones applied, as ROME does) or ready records (:class:`EditRecord`, or unapplied
    :class:`MemitRecord` batches). Yields the records.
    """
    lm = as_model(model)
    ledger = Ledger(lm)
    try:
        records = []
        pending = [item for item in requests if not isinstance(item, RECORD_TYPES)]
        if len(pending) > 1 and kwargs.get("context_templates") is None:  # ROME generates them once per model
            hp = hparams or ROMEHyperParams.for_model(lm)
            kwargs["context_templates"] = rome_templates(lm, hp)
        for item in requests:
            record = item if isinstance(item, RECORD_TYPES) else rome_edit(lm, item, hparams, stats, **kwargs)
            ledger.apply(record)
            records.append(record)
        yield records
    except BaseException as e:
        revert_keeping(e, ledger.revert_all)
        raise
    else:
        ledger.revert_all()
