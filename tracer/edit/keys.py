"""k: the keys an edit maps — the input of an MLP output projection at the last subject token.

    keys = compute_keys(lm, layer, requests, templates)    # "request template d_k" (ROME's k* is the mean)
    rows = key_rows(lm, requests, templates)               # MEMIT: tokenised once, read at every layer
    k, z = read_keys(lm, rows, layer, z_layer=L)           # plus block L's output there

Every (request, template) row is the template with the request's prompt in it and the subject at
the prompt's ``{}`` (:func:`place`). Rows are read in order of token count, in chunks, so that a
chunk is padded little, and put back in request order; each forward pass stops after the deepest
block it needs (:func:`tracer.hooks.run_until`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..hooks import main_tensor, run_until
from ..layers import get_module
from ..models import LanguageModel, as_model, right_pad
from ..subject import fill_subject


def place(lm: LanguageModel, template: str, prompt: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template`` ∘ ``prompt`` with ``subject`` at the prompt's ``{}``, and the
    position of the last subject token."""
    return fill_subject(lm.tokenizer, template.replace("{}", prompt, 1), subject, lm.max_length)


@dataclass(frozen=True)
class KeyRows:
    """Every (request, template) row, tokenised once and ordered by token count (shortest first)."""

    ids: tuple[tuple[int, ...], ...]
    lookup: tuple[int, ...]      # last subject token of each row
    where: torch.Tensor          # "row": request-major index ``request · n_templates + template`` of each row
    n_requests: int
    n_templates: int


def key_rows(model: "LanguageModel | str", requests: Sequence[Any], templates: Sequence[str]) -> KeyRows:
    """The rows of ``requests`` (anything with ``prompt`` and ``subject``) × ``templates``."""
    lm = as_model(model)
    rows = [place(lm, t, r.prompt, r.subject) for r in requests for t in templates]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    return KeyRows(tuple(tuple(rows[i][0]) for i in order), tuple(rows[i][1] for i in order),
                   torch.tensor(order, dtype=torch.long), len(requests), len(templates))


@torch.no_grad()
def read_keys(model: "LanguageModel | str", rows: KeyRows, layer: int, *, z_layer: int | None = None,
              batch_rows: int = 256, bar=None) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """Keys at ``layer`` ("request template d_k") and, with ``z_layer``, block ``z_layer``'s output at
    the same tokens ("request template hidden"), with the model's current weights. ``bar`` (a tqdm)
    advances by the rows read."""
    lm = as_model(model)
    key_mod = lm.layers.mlp_out_name(layer)
    deepest = layer if z_layer is None else max(layer, z_layer)
    backbone = get_module(lm.model, lm.layers.backbone)
    keys_out, z_out = [], []
    for s in range(0, len(rows.ids), batch_rows):
        chunk = rows.ids[s:s + batch_rows]
        ids, mask = right_pad([list(r) for r in chunk], lm.pad_id, lm.device)
        at = (torch.arange(len(chunk), device=lm.device), torch.tensor(rows.lookup[s:s + batch_rows], device=lm.device))
        got: dict[str, torch.Tensor] = {}
        outputs = {} if z_layer is None else {lm.layers.block_name(z_layer): lambda h: got.__setitem__("z", main_tensor(h)[at])}
        run_until(lm.model, lambda: backbone(input_ids=ids, attention_mask=mask, use_cache=False),
                  lm.layers.block_name(deepest), inputs={key_mod: lambda x: got.__setitem__("k", x[at])}, outputs=outputs)
        keys_out.append(got["k"])
        if z_layer is not None:
            z_out.append(got["z"])
        if bar is not None:
            bar.update(len(chunk))
    where = rows.where.to(lm.device)

    def unsort(parts: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(parts)
        return torch.empty_like(flat).index_copy_(0, where, flat).reshape(rows.n_requests, rows.n_templates, -1)

    return unsort(keys_out), (unsort(z_out) if z_layer is not None else None)


def compute_keys(model: "LanguageModel | str", layer: int, requests: Sequence[Any],
                 context_templates: Sequence[str]) -> torch.Tensor:
    """Keys at the last subject token, "request template d_k" (float32, model device): the input of
    ``lm.layers.mlp_out_name(layer)`` for ``template`` ∘ ``request.prompt`` with the subject filled in."""
    lm = as_model(model)
    return read_keys(lm, key_rows(lm, requests, context_templates), layer)[0].float()


def compute_k(model: "LanguageModel | str", layer: int, requests: Sequence[Any],
              context_templates: Sequence[str]) -> torch.Tensor:
    """k*: :func:`compute_keys` averaged over the templates, "request d_k"."""
    return compute_keys(model, layer, requests, context_templates).mean(1)
