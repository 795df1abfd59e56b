"""v*: the vector an edit writes at the last subject token, optimised so the new target follows.

    result = compute_v(lm, layer, requests, templates, hparams)     # one delta per request, batched

ROME's v* optimisation (and MEMIT's z, which is the same with ``reference="hidden"``): a vector
``delta`` added to the MLP output of ``layer`` at the last subject token of every context-template
prompt of a request is optimised with Adam so that the new target's tokens become likely after each,
plus the KL term on ``"{subject} is a"``, weight decay and a norm clamp.

``engine="fast"`` (default): the states below the edit layer, and the states of every token before
the last subject token at all layers, do not depend on ``delta``, so they are computed once and
cached (a key/value prefix cache); each step runs only the tokens from the last subject token on
through the layers above the edit, and unembeds only the positions the loss reads.
``engine="reference"`` is ROME's full forward pass; both give the same loss curve up to float
rounding (tested).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ..errors import EditError, HyperParameterError
from ..hooks import hooked
from ..limits import check_prompt_length
from ..models import LanguageModel, as_model, cache_keyword, right_pad
from ..targets import target_ids
from .hparams import ROMEHyperParams
from .keys import place
from .requests import EditRequest

log = logging.getLogger(__name__)

Engine = Literal["fast", "reference"]


@dataclass(frozen=True, eq=False)
class ValueResult:
    """Output of :func:`compute_v` for a batch of requests.

    ``delta`` ("request d_model") is the optimised vector added at the edit layer's output at the
    last subject token; ``mlp_init`` / ``hidden_init`` ("request d_model") are the MLP output and
    the block output there for the bare prompt before the edit (ROME's v* = mlp_init + delta;
    MEMIT's z = hidden_init + delta). ``loss`` etc. are per step, "step request".
    """

    delta: torch.Tensor
    mlp_init: torch.Tensor
    hidden_init: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    weight_decay: torch.Tensor
    p_target: torch.Tensor
    steps: int
    rows: int


@dataclass
class _Rows:
    ids: list[list[int]]
    lookup: list[int]
    request: list[int]
    bare: list[int]              # row of each request's bare rewrite prompt
    targets: list[tuple[int, int, int]]  # (row, position predicting it, token)
    kl_rows: list[int]
    n_requests: int
    n_target_tokens: list[int]


def _build_rows(lm, requests, templates, kl_prompt) -> _Rows:
    r = _Rows([], [], [], [], [], [], len(requests), [])
    for q, req in enumerate(requests):
        tgt = target_ids(lm.tokenizer, req.target_new)
        r.n_target_tokens.append(len(tgt))
        for t, template in enumerate(templates):
            ids, last = place(lm, template, req.prompt, req.subject)
            text = req.prompt.replace("{}", req.subject, 1)
            check_prompt_length(len(ids), lm.max_length, f"the edit prompt {text[:40]!r}",
                                reserve=len(tgt) - 1, reserved_for="the target's tokens")
            row = len(r.ids)
            if t == 0:
                r.bare.append(row)
            r.targets += [(row, len(ids) - 1 + j, tok) for j, tok in enumerate(tgt)]
            r.ids.append(ids + tgt[:-1])
            r.lookup.append(last)
            r.request.append(q)
    for q, req in enumerate(requests):
        ids, last = place(lm, "{}", kl_prompt, req.subject)
        r.kl_rows.append(len(r.ids))
        r.ids.append(ids)
        r.lookup.append(last)
        r.request.append(q)
    return r


class _Reference:
    """ROME's forward: the whole model on right-padded rows, delta added by an MLP output hook."""

    def __init__(self, lm: LanguageModel, layer: int, rows: _Rows, site: Literal["mlp", "hidden"] = "mlp"):
        self.lm, self.rows = lm, rows
        self.ids, self.mask = right_pad(rows.ids, lm.pad_id, lm.device)
        self.mlp, self.block = lm.layers.name("mlp", layer), lm.layers.block_name(layer)
        self.site = lm.layers.name(site, layer)
        self.row_idx = torch.arange(len(rows.ids), device=lm.device)
        self.look = torch.tensor(rows.lookup, device=lm.device)
        self.req = torch.tensor(rows.request, device=lm.device)
        bare = torch.tensor(rows.bare, device=lm.device)
        with torch.no_grad():
            store = {}
            with hooked(lm.model, outputs={self.mlp: lambda h: store.__setitem__("mlp", h.detach()),
                                           self.block: lambda h: store.__setitem__("block", h.detach())}):
                lm.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        self.mlp_init = store["mlp"][bare, self.look[bare]].float()
        self.hidden_init = store["block"][bare, self.look[bare]].float()

    def forward(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def add(h):
            add_rows = torch.zeros_like(h)
            add_rows = add_rows.index_put((self.row_idx, self.look), delta[self.req].to(h.dtype))
            return h + add_rows

        with hooked(self.lm.model, outputs={self.site: add}):
            logits = self.lm.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
        log_probs = torch.log_softmax(logits.float(), -1)
        t = self.rows.targets
        target_lp = log_probs[[r for r, _, _ in t], [p for _, p, _ in t], [k for _, _, k in t]]
        kl = self.rows.kl_rows
        return target_lp, log_probs[kl, self.look[kl]]


class _Fast:
    """Prefix-cached forward: rows are aligned so every row's last subject token sits in column P.

    Columns before P (left-padded prefixes) never change; their keys/values at every layer are
    cached once. Each step feeds columns P.. through the blocks from ``layer`` on (``site="mlp"``:
    blocks below are replaced by their cached output and delta is added to block ``layer``'s MLP
    output, which is right also where a norm follows the MLP) or above it (``"hidden"``: block
    ``layer``'s cached output plus delta) and unembeds only the positions the loss reads.
    """

    def __init__(self, lm: LanguageModel, layer: int, rows: _Rows, site: Literal["mlp", "hidden"] = "mlp"):
        from transformers import DynamicCache

        self.lm, self.rows, self.layer = lm, rows, layer
        self._DynamicCache = DynamicCache
        model, device = lm.model, lm.device
        n = len(rows.ids)
        P = max(rows.lookup)
        S = max(len(ids) - last for ids, last in zip(rows.ids, rows.lookup))
        ids = torch.full((n, P + S), lm.pad_id, dtype=torch.long)
        mask = torch.zeros((n, P + S), dtype=torch.long)
        pos = torch.zeros((n, P + S), dtype=torch.long)
        for i, (row, last) in enumerate(zip(rows.ids, rows.lookup)):
            off = P - last
            ids[i, off:off + len(row)] = torch.tensor(row)
            mask[i, off:off + len(row)] = 1
            pos[i, off:off + len(row)] = torch.arange(len(row))
        self.P, self.ids, self.mask, self.pos = P, ids.to(device), mask.to(device), pos.to(device)
        self.backbone = model.get_submodule(lm.layers.backbone)
        self.unembed = model.get_submodule(lm.layers.unembed)
        self.cache_kw = cache_keyword(self.backbone)
        self.req = torch.tensor(rows.request, device=device)
        mlp, block = lm.layers.name("mlp", layer), lm.layers.block_name(layer)
        # delta goes where the site is: at the MLP output, block ``layer`` itself runs each step (its MLP
        # output feeds a norm before the residual in Gemma 2/3) on the cached output of block ``layer - 1``
        self.mlp_site = site == "mlp"
        store = {}
        rec = {mlp: lambda h: store.__setitem__("mlp", h.detach()), block: lambda h: store.__setitem__("block", h.detach())}
        if self.mlp_site and layer > 0:
            rec[lm.layers.block_name(layer - 1)] = lambda h: store.__setitem__("below", h.detach())
        with torch.no_grad(), hooked(model, outputs=rec):
            out = self.backbone(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                                **{self.cache_kw: DynamicCache()})  # every position, also in sliding-window layers
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        # padded prefix columns are masked; make sure they hold finite numbers all the same
        self.prefix = [(torch.nan_to_num(layer_.keys[:, :, :P]), torch.nan_to_num(layer_.values[:, :, :P]))
                       for layer_ in cache.layers] if P > 0 else None
        self.h_clean = (None if self.mlp_site and layer == 0  # block 0 runs on the embeddings each step
                        else store["below" if self.mlp_site else "block"][:, P:])
        self.mlp_name = mlp
        bare = torch.tensor(rows.bare, device=device)
        self.mlp_init = store["mlp"][bare, P].float()
        self.hidden_init = store["block"][bare, P].float()
        t = rows.targets
        self.t_rows = torch.tensor([r for r, _, _ in t], device=device)
        self.t_cols = torch.tensor([p - rows.lookup[r] for r, p, _ in t], device=device)
        self.t_tok = torch.tensor([k for _, _, k in t], device=device)
        self.kl_rows = torch.tensor(rows.kl_rows, device=device)
        self.replaced = [lm.layers.block_name(i) for i in range(layer + (0 if self.mlp_site else 1))]

    def forward(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def add(x: torch.Tensor) -> torch.Tensor:  # delta at column 0: the last subject token
            return torch.cat([x[:, :1] + delta[self.req].to(x.dtype)[:, None], x[:, 1:]], 1)

        h = self.h_clean if self.mlp_site else add(self.h_clean)
        kwargs = {"input_ids": self.ids[:, self.P:], "attention_mask": self.mask, "position_ids": self.pos[:, self.P:],
                  "use_cache": True}
        if self.prefix is not None:
            kwargs[self.cache_kw] = self._DynamicCache(self.prefix, config=self.lm.model.config)
        with hooked(self.lm.model, replace={name: (lambda *a, **k: h) for name in self.replaced},
                    outputs={self.mlp_name: add} if self.mlp_site else {}):
            hidden = self.backbone(**kwargs).last_hidden_state
        picked = torch.cat([hidden[self.t_rows, self.t_cols], hidden[self.kl_rows, 0]], 0)
        log_probs = torch.log_softmax(self.unembed(picked).float(), -1)
        n_t = len(self.t_rows)
        return log_probs[torch.arange(n_t, device=picked.device), self.t_tok], log_probs[n_t:]


def compute_v(model: "LanguageModel | str", layer: int, requests: Sequence[EditRequest], context_templates: Sequence[str],
              hparams: ROMEHyperParams, *, engine: Engine = "fast", reference: Literal["mlp", "hidden"] = "mlp",
              progress: bool = False) -> ValueResult:
    """Optimise one ``delta`` per request (batched: one forward per step for all requests).

    For request r: ``delta_r`` is added at the output of block ``layer`` (equivalently of its MLP)
    at the last subject token of every row of r: ``template ∘ prompt + target[:-1]`` for each
    context template, and ``hparams.kl_prompt`` with the subject. Loss per request, as ROME:
    mean over templates of the target tokens' mean NLL, plus ``kl_factor`` · KL(current ‖ initial)
    of the next-token distribution at the KL prompt's last subject token, plus
    ``v_weight_decay`` · ‖delta‖ / ‖init‖². After each Adam step delta is clamped to
    ``clamp_norm_factor`` · ‖init‖, where init is ``mlp_init`` (``reference="mlp"``, ROME) or
    ``hidden_init`` (``"hidden"``, MEMIT). A request stops (its delta frozen) once its loss is
    below ``early_stop_loss``; as ROME, the last step only evaluates.
    """
    lm = as_model(model)
    if engine not in ("fast", "reference"):
        raise HyperParameterError(f"engine must be 'fast' or 'reference', got {engine!r}")
    rows = _build_rows(lm, requests, context_templates, hparams.kl_prompt)
    site = "mlp" if reference == "mlp" else "hidden"
    run = _Fast(lm, layer, rows, site) if engine == "fast" else _Reference(lm, layer, rows, site)
    n_req, device = len(requests), lm.device
    init = run.mlp_init if reference == "mlp" else run.hidden_init
    init_norm = init.norm(dim=-1)
    max_norm = hparams.clamp_norm_factor * init_norm
    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    t_req = torch.tensor([rows.request[r] for r, _, _ in rows.targets], device=device)
    t_row = torch.tensor([r for r, _, _ in rows.targets], device=device)
    n_tok = torch.tensor(rows.n_target_tokens, device=device, dtype=torch.float32)
    n_templates = len(context_templates)
    done = torch.zeros(n_req, dtype=torch.bool, device=device)
    kl_init = None
    curves = {k: [] for k in ("loss", "nll", "kl", "wd", "p")}
    steps = 0
    with torch.enable_grad():
        for it in range(hparams.v_num_grad_steps):
            steps = it + 1
            opt.zero_grad()
            target_lp, kl_lp = run.forward(delta)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            # per row: sum of target log-probs / number of target tokens; per request: mean over templates
            row_lp = torch.zeros(len(rows.ids), device=device).index_add(0, t_row, target_lp)
            req_of_row = torch.tensor(rows.request, device=device)
            nll = torch.zeros(n_req, device=device).index_add(0, req_of_row, -row_lp) / n_tok / n_templates
            kl = hparams.kl_factor * (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
            wd = hparams.v_weight_decay * delta.norm(dim=-1) / init_norm ** 2
            loss = nll + kl + wd
            p_mean = torch.zeros(n_req, device=device).index_add(0, t_req, target_lp.detach().exp()) / n_tok / n_templates
            for name, value in zip(("loss", "nll", "kl", "wd", "p"), (loss, nll, kl, wd, p_mean)):
                curves[name].append(value.detach().float().cpu())
            done |= loss.detach() < hparams.early_stop_loss
            if not torch.isfinite(loss).all():
                raise EditError(f"the v* optimisation diverged (loss {loss.tolist()}); lower v_lr or raise v_weight_decay")
            if bool(done.all()) or it == hparams.v_num_grad_steps - 1:
                break
            frozen = delta.detach().clone()
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                norms = delta.norm(dim=-1)
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                delta.mul_(scale[:, None])
                delta[done] = frozen[done]
            if progress:
                log.info("v* step %d: loss %s", it, [round(x, 4) for x in loss.tolist()])
    stack = {k: torch.stack(v) for k, v in curves.items()}
    return ValueResult(delta=delta.detach(), mlp_init=run.mlp_init, hidden_init=run.hidden_init, loss=stack["loss"],
                       nll=stack["nll"], kl=stack["kl"], weight_decay=stack["wd"], p_target=stack["p"], steps=steps,
                       rows=len(rows.ids))
