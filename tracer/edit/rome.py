"""ROME (Meng et al., 2022): rewrite one fact with a rank-one update of an MLP output projection.

    request = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
    record = rome_edit(lm, request)               # computes the edit; the model is not changed
    Ledger(lm).apply(record)                      # see tracer.edit.ledger

Steps, as in the paper and the authors' code:

1. context templates: ``"{}"`` plus short texts the model samples itself (top-5 sampling from a
   document-start token), :func:`generate_context_templates`; kept in the record.
2. k*: the key (input of the output projection) at the last subject token, averaged over the
   templates, :func:`compute_keys` / :func:`compute_k`.
3. v*: a vector ``delta`` added to the MLP output at the last subject token is optimised with Adam
   so that the new target's tokens become likely after every template, plus the KL term on
   ``"{subject} is a"``, weight decay and a norm clamp, :func:`compute_v`.
4. ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*) with the same k* in both places (``update=
   "corrected"``, Gupta et al. 2024) or the paper's original form (``update="original"``: the
   bare prompt's key in the denominator and as the point where v* is reached).

The v* optimisation runs ``engine="fast"`` by default: the states below the edit layer, and the
states of every token before the last subject token at all layers, do not depend on ``delta``,
so they are computed once and cached (a key/value prefix cache); each step runs only the tokens
from the last subject token on through the layers above the edit, and unembeds only the positions
the loss reads. ``engine="reference"`` is ROME's full forward pass; both give the same loss
curve up to float rounding (tested).
"""
from __future__ import annotations

import inspect
import logging
import time
import unicodedata
from dataclasses import asdict, dataclass, replace
from typing import Literal, Sequence

import torch

from ..errors import EditError, HyperParameterError, StatisticsError, SubjectNotFoundError
from ..hooks import hooked
from ..limits import COUNT_LIMITS, check_prompt_length
from ..models import LanguageModel, as_model, cache_dir, right_pad
from ..stats import KeyStatistics, StatsCache, key_fingerprint
from ..subject import tokenize_prompt
from ..targets import spaced
from .ledger import EditRecord, edited

log = logging.getLogger(__name__)

Engine = Literal["fast", "reference"]


# ---------------------------------------------------------------------------- request


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``prompt`` (with ``{}`` where ``subject`` goes) to continue with ``target_new``.

    A prompt without ``{}`` must contain the subject; its first occurrence becomes ``{}``.
    ``target_true`` names the old answer (default: the model's top-1 before the edit).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):
            if not isinstance(getattr(self, name), str):
                raise EditError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not self.subject.strip():
            raise EditError("the subject is empty; pass the words that name it, e.g. 'The Eiffel Tower'")
        if "{}" not in self.prompt:
            if self.subject not in self.prompt:
                raise SubjectNotFoundError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}; pass a prompt "
                                           "with '{}' where the subject goes, or one that contains the subject")
            object.__setattr__(self, "prompt", self.prompt.replace(self.subject, "{}", 1))
        if self.prompt.count("{}") != 1:
            raise EditError(f"the prompt must contain '{{}}' exactly once, got {self.prompt!r}")
        if not self.target_new.strip():
            raise EditError("target_new is empty; pass the new answer, e.g. ' Rome' (with its leading space)")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            raise EditError("target_true must be a non-empty string or None")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise EditError(f"target_new and target_true are both {self.target_new!r}; there is nothing to change")

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EditRequest":
        return cls(**d)

    @classmethod
    def from_counterfact(cls, record: dict) -> "EditRequest":
        """A request from a CounterFact record (ROME's format; targets get ROME's leading space)."""
        rw = record["requested_rewrite"]

        return cls(rw["prompt"], rw["subject"], spaced(rw["target_new"]["str"]), spaced(rw["target_true"]["str"]))


# ---------------------------------------------------------------------------- hyper-parameters


@dataclass(frozen=True)
class ROMEHyperParams:
    """ROME's settings (defaults: the authors' GPT-2 XL file), overridable field by field.

    ``context_template_lengths`` lists ``(tokens, count)``: ``count`` templates of ``tokens``
    tokens (the start token included, as ROME counts). ``stats_tokens`` is the token count of
    the key statistics C that :func:`rome_edit` uses when it is not given statistics.
    """

    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    context_template_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    template_seed: int = 0
    update: Literal["corrected", "original"] = "corrected"
    stats_tokens: int = 100_000
    stats_chunk_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "context_template_lengths", tuple(tuple(int(x) for x in p) for p in self.context_template_lengths))
        checks = [
            (isinstance(self.layer, int) and self.layer >= 0, "layer must be an integer >= 0"),
            (isinstance(self.v_num_grad_steps, int) and 1 <= self.v_num_grad_steps <= COUNT_LIMITS["steps"][1],
             f"v_num_grad_steps must be an integer in [1, {COUNT_LIMITS['steps'][1]}]"),
            (self.v_lr > 0, "v_lr must be > 0"),
            (self.v_weight_decay >= 0, "v_weight_decay must be >= 0"),
            (self.clamp_norm_factor > 0, "clamp_norm_factor must be > 0"),
            (self.kl_factor >= 0, "kl_factor must be >= 0"),
            (self.early_stop_loss >= 0, "early_stop_loss must be >= 0"),
            (self.kl_prompt.count("{}") == 1, "kl_prompt must contain '{}' exactly once"),
            (all(len(p) == 2 and p[0] >= 2 and p[1] >= 0 for p in self.context_template_lengths),
             "context_template_lengths must be (tokens >= 2, count >= 0) pairs"),
            (self.update in ("corrected", "original"), "update must be 'corrected' or 'original'"),
            (isinstance(self.stats_tokens, int) and self.stats_tokens >= 0, "stats_tokens must be an integer >= 0 (0 = C = I)"),
        ]
        for ok, message in checks:
            if not ok:
                raise HyperParameterError(f"{message}; got {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["context_template_lengths"] = [list(p) for p in self.context_template_lengths]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ROMEHyperParams":
        return cls(**d)

    @classmethod
    def for_model(cls, model: "LanguageModel | str", **overrides) -> "ROMEHyperParams":
        """Defaults for the model's family and depth (:data:`FAMILY_DEFAULTS`), then ``overrides``."""
        lm = as_model(model)
        family = _FAMILY_DEFAULTS.get(lm.layers.family, _FAMILY_DEFAULTS["llama"])
        n = lm.n_layers
        layer = family["layers"].get(n, min(n - 1, max(0, round(family["fraction"] * n))))
        params = {"layer": layer, **family["params"], **overrides}
        hp = cls(**params)
        if hp.layer >= n:
            raise HyperParameterError(f"layer {hp.layer} does not exist: {lm.name} has layers 0..{n - 1}")
        return hp


#: Per family: the edit layer by depth (the ROME authors' choices; SmolLM2-135M's 30 layers from
#: our MLP causal traces), a depth fraction for other sizes, and settings that differ from the
#: GPT-2 XL defaults.
_FAMILY_DEFAULTS: dict[str, dict] = {
    "gpt2": {"layers": {48: 17, 36: 12, 24: 8}, "fraction": 17 / 48, "params": {}},
    "gptj": {"layers": {28: 5}, "fraction": 5 / 28, "params": {}},
    "gpt_neox": {"layers": {44: 15}, "fraction": 15 / 44, "params": {}},
    "llama": {"layers": {30: 4}, "fraction": 4 / 30, "params": {}},
}


# ---------------------------------------------------------------------------- context templates


@torch.no_grad()
def generate_context_templates(model: "LanguageModel | str", lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)),
                               seed: int = 0) -> tuple[str, ...]:
    """``"{}"`` plus ``"<text>. {}"`` for texts the model samples from a document-start token.

    As ROME's ``generate_fast``: top-5 sampling, ``tokens`` counts the start token, blank lines
    become spaces and braces are removed. Deterministic for a given ``seed`` (a CPU generator).
    """
    lm = as_model(model)
    tok = lm.tokenizer
    start = _document_start_id(tok)
    gen = torch.Generator().manual_seed(int(seed))
    templates = ["{}"]
    for length, count in lengths:
        if count == 0:
            continue
        ids = torch.full((count, 1), start, dtype=torch.long, device=lm.device)
        for _ in range(length - 1):
            logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1].float().cpu()
            top = torch.topk(torch.softmax(logits, -1), 5, dim=-1)
            pick = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=gen)
            ids = torch.cat([ids, top.indices.gather(1, pick).to(lm.device)], 1)
        for row in ids[:, 1:].tolist():
            text = unicodedata.normalize("NFKD", tok.decode(row, skip_special_tokens=True)).replace("\n\n", " ")
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return tuple(templates)


def _document_start_id(tokenizer) -> int:
    """GPT-2's ``<|endoftext|>`` where the vocabulary has it (ROME's choice), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>",):
        if candidate in vocab:
            return int(vocab[candidate])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise EditError("the tokenizer has no <|endoftext|>, BOS or EOS token to start context templates from; "
                    "pass context_templates= explicitly")


# ---------------------------------------------------------------------------- rows


def _place(lm: LanguageModel, template: str, prompt: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template`` ∘ ``prompt`` with ``subject`` filled in, and the index of the last
    subject token (found through character offsets at the exact place of ``{}``)."""
    full = template.replace("{}", prompt, 1)
    at = full.index("{}")
    text = full[:at] + subject + full[at + 2:]
    ids, offsets = tokenize_prompt(lm.tokenizer, text, lm.max_length)
    lo, hi = at + len(subject) - len(subject.lstrip()), at + len(subject.rstrip())
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]
    if not inside:
        raise SubjectNotFoundError(f"subject {subject!r} maps to no token of {text!r}")
    return ids, inside[-1]


def _target_ids(lm: LanguageModel, target: str) -> list[int]:
    ids = list(lm.tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EditError(f"target {target!r} encodes to no tokens")
    return ids


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------- k*


@torch.no_grad()
def compute_keys(model: "LanguageModel | str", layer: int, requests: Sequence[EditRequest],
                 context_templates: Sequence[str]) -> torch.Tensor:
    """Keys at the last subject token, "request template d_k" (float32, model device).

    Key = input of ``lm.layers.mlp_out_name(layer)`` for ``template`` ∘ ``request.prompt`` with the
    subject filled in. One batched forward pass that stops at the edit layer.
    """
    lm = as_model(model)
    rows, lookups = [], []
    for req in requests:
        for template in context_templates:
            ids, last = _place(lm, template, req.prompt, req.subject)
            rows.append(ids)
            lookups.append(last)
    ids, mask = right_pad(rows, _pad_id(lm), lm.device)
    captured = []

    def grab(x):
        captured.append(x.detach())
        raise _Stop

    try:
        with hooked(lm.model, inputs={lm.layers.mlp_out_name(layer): grab}):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    keys = captured[0][torch.arange(len(rows), device=lm.device), torch.tensor(lookups, device=lm.device)]
    return keys.float().view(len(requests), len(context_templates), -1)


def compute_k(model: "LanguageModel | str", layer: int, requests: Sequence[EditRequest],
              context_templates: Sequence[str]) -> torch.Tensor:
    """k*: :func:`compute_keys` averaged over the templates, "request d_k"."""
    return compute_keys(model, layer, requests, context_templates).mean(1)


def _pad_id(lm: LanguageModel) -> int:
    tid = lm.tokenizer.pad_token_id
    return int(tid if tid is not None else (lm.tokenizer.eos_token_id or 0))


# ---------------------------------------------------------------------------- v*


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
        tgt = _target_ids(lm, req.target_new)
        r.n_target_tokens.append(len(tgt))
        for t, template in enumerate(templates):
            ids, last = _place(lm, template, req.prompt, req.subject)
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
        ids, last = _place(lm, "{}", kl_prompt, req.subject)
        r.kl_rows.append(len(r.ids))
        r.ids.append(ids)
        r.lookup.append(last)
        r.request.append(q)
    return r


class _Reference:
    """ROME's forward: the whole model on right-padded rows, delta added by an MLP output hook."""

    def __init__(self, lm: LanguageModel, layer: int, rows: _Rows):
        self.lm, self.rows = lm, rows
        self.ids, self.mask = right_pad(rows.ids, _pad_id(lm), lm.device)
        self.mlp, self.block = lm.layers.name("mlp", layer), lm.layers.block_name(layer)
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

        with hooked(self.lm.model, outputs={self.mlp: add}):
            logits = self.lm.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
        log_probs = torch.log_softmax(logits.float(), -1)
        t = self.rows.targets
        target_lp = log_probs[[r for r, _, _ in t], [p for _, p, _ in t], [k for _, _, k in t]]
        kl = self.rows.kl_rows
        return target_lp, log_probs[kl, self.look[kl]]


class _Fast:
    """Prefix-cached forward: rows are aligned so every row's last subject token sits in column P.

    Columns before P (left-padded prefixes) never change; their keys/values at every layer are
    cached once. Each step feeds columns P.. through the blocks above ``layer`` only (blocks
    0..layer are replaced by the cached block output plus delta at column P) and unembeds only
    the positions the loss reads.
    """

    def __init__(self, lm: LanguageModel, layer: int, rows: _Rows):
        from transformers import DynamicCache

        self.lm, self.rows, self.layer = lm, rows, layer
        self._DynamicCache = DynamicCache
        model, device = lm.model, lm.device
        n = len(rows.ids)
        P = max(rows.lookup)
        S = max(len(ids) - last for ids, last in zip(rows.ids, rows.lookup))
        ids = torch.full((n, P + S), _pad_id(lm), dtype=torch.long)
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
        params = inspect.signature(self.backbone.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.req = torch.tensor(rows.request, device=device)
        mlp, block = lm.layers.name("mlp", layer), lm.layers.block_name(layer)
        store = {}
        with torch.no_grad(), hooked(model, outputs={mlp: lambda h: store.__setitem__("mlp", h.detach()),
                                                     block: lambda h: store.__setitem__("block", h.detach())}):
            out = self.backbone(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        # padded prefix columns are masked; make sure they hold finite numbers all the same
        self.prefix = [(torch.nan_to_num(layer_.keys[:, :, :P]), torch.nan_to_num(layer_.values[:, :, :P]))
                       for layer_ in cache.layers] if P > 0 else None
        self.h_clean = store["block"][:, P:]
        bare = torch.tensor(rows.bare, device=device)
        self.mlp_init = store["mlp"][bare, P].float()
        self.hidden_init = store["block"][bare, P].float()
        t = rows.targets
        self.t_rows = torch.tensor([r for r, _, _ in t], device=device)
        self.t_cols = torch.tensor([p - rows.lookup[r] for r, p, _ in t], device=device)
        self.t_tok = torch.tensor([k for _, _, k in t], device=device)
        self.kl_rows = torch.tensor(rows.kl_rows, device=device)
        self.replaced = [lm.layers.block_name(i) for i in range(layer + 1)]

    def forward(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = self.h_clean[:, :1] + delta[self.req].to(self.h_clean.dtype)[:, None]
        h = torch.cat([h0, self.h_clean[:, 1:]], 1)
        kwargs = {"input_ids": self.ids[:, self.P:], "attention_mask": self.mask, "position_ids": self.pos[:, self.P:],
                  "use_cache": True}
        if self.prefix is not None:
            kwargs[self.cache_kw] = self._DynamicCache(self.prefix, config=self.lm.model.config)
        with hooked(self.lm.model, replace={name: (lambda *a, **k: h) for name in self.replaced}):
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
    run = _Fast(lm, layer, rows) if engine == "fast" else _Reference(lm, layer, rows)
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


# ---------------------------------------------------------------------------- the edit


def resolve_statistics(lm: LanguageModel, hparams: ROMEHyperParams, stats) -> KeyStatistics:
    """``stats`` as :class:`KeyStatistics` for ``hparams.layer``.

    ``None``: a :class:`StatsCache` under ``$FACTSCOPE_CACHE/stats`` with ``hparams.stats_tokens``
    (0 means C = I, labelled). ``"identity"``: C = I. A :class:`StatsCache`: its ``get``.
    A :class:`KeyStatistics`: checked against the model and layer.
    """
    layer = hparams.layer
    if stats is None:
        if hparams.stats_tokens == 0:
            return KeyStatistics.identity(lm, layer)
        stats = StatsCache(cache_dir() / "stats")
    if isinstance(stats, str):
        if stats != "identity":
            raise StatisticsError(f"stats must be None, 'identity', a StatsCache or KeyStatistics; got {stats!r}")
        return KeyStatistics.identity(lm, layer)
    if isinstance(stats, StatsCache):
        if hparams.stats_tokens == 0:
            return KeyStatistics.identity(lm, layer)
        return stats.get(lm, layer, hparams.stats_tokens, chunk_tokens=hparams.stats_chunk_tokens)
    if not isinstance(stats, KeyStatistics):
        raise StatisticsError(f"stats must be None, 'identity', a StatsCache or KeyStatistics; got {type(stats).__name__}")
    if stats.layer != layer or stats.module != lm.layers.mlp_out_name(layer):
        raise StatisticsError(f"statistics are for {stats.module} (layer {stats.layer}) but the edit is at layer {layer}")
    fp = key_fingerprint(lm, layer)
    if stats.fingerprint != fp:
        raise StatisticsError(f"statistics were computed on other weights (fingerprint {stats.fingerprint}, model {fp}); "
                              "recompute them for this model")
    return stats


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
    new_ids = _target_ids(lm, request.target_new)
    _place(lm, "{}", request.prompt, request.subject)  # validates prompt and subject before any work
    stats_ = resolve_statistics(lm, hp, stats)
    clock["statistics"] = time.perf_counter() - t0

    t = time.perf_counter()
    probs = _next_token_probs(lm, request.text)
    target_true = request.target_true if request.target_true is not None else lm.decode(int(probs.argmax()))
    true_id = _target_ids(lm, target_true)[0]
    before = _summary(lm, probs, new_ids[0], true_id)
    if int(probs.argmax()) == new_ids[0]:
        log.warning("the model already answers %r to %r; the edit will mostly reinforce it", request.target_new, request.text)
    templates = tuple(context_templates) if context_templates is not None else generate_context_templates(
        lm, hp.context_template_lengths, hp.template_seed)
    if not templates or templates[0] != "{}" or any(t_.count("{}") != 1 for t_ in templates):
        raise EditError("context_templates must start with '{}' and each contain '{}' exactly once")
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
    with edited(lm, [record]):
        after = _summary(lm, _next_token_probs(lm, request.text), new_ids[0], true_id)
    clock["total"] = time.perf_counter() - t0
    return replace(record, after=after, seconds=dict(clock))
