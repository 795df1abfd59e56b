"""MEMIT (Meng et al. 2023): many facts written into a range of MLP layers at once.

    hp = MemitHyperParams.for_model(lm)                      # per-architecture defaults
    record = apply_memit(lm, requests, hp, stats=StatsCache(cache_dir() / "stats"))
    record.revert(lm)                                        # bit-exact
    record.apply(lm)                                         # re-apply (also onto a fresh copy)

For a batch of requests (subject, prompt template with ``{}``, new target):

1. z_i at the last edited layer L: ROME's v* optimisation, batched over requests — a vector
   δ_i is added to the output of block L at the last subject token of every context-template
   prompt of request i, and optimised (Adam, ``v_steps``) so the new target's tokens become
   likely, with ROME's KL term on "{subject} is a", weight decay and norm clamp. Each request
   has its own δ and Adam state, so the batch equals the requests optimised one by one.
2. For each edited layer l in order: keys K ("d_k n", last subject token, averaged over context
   templates), the residual R = (z − h_L(current weights)) / (layers left), and
   ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ solved in float64 by Cholesky (``torch.linalg.solve`` if C is not
   positive definite) — never an explicit inverse. C = E[k kᵀ] comes from :mod:`tracer.stats`,
   read once on the unedited model.

A :class:`MemitRecord` keeps each layer's float32 ΔW (CPU). Applied, it also keeps on the CPU
the few elements where fl(W₁ − ΔW) misses the original bits, and a hash of each weight it wrote:
revert restores the original bits (after checking the weights are still what apply left), and
re-applying gives the same bits again. Every ΔW is checked finite before a weight is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import EditError, HyperParameterError
from ..files import save_safetensors_atomic, write_json_atomic
from ..hooks import hooked, main_tensor
from ..layers import get_module
from ..models import LanguageModel, as_model, right_pad
from ..stats import key_fingerprint, weights_fingerprint
from ..targets import spaced
from .ledger import (bits_view, checked_field, checked_tensor, content_digest, dict_of, is_int, is_number, list_of,
                     verify_content, weight_hash)

log = logging.getLogger(__name__)

#: start words of ROME/MEMIT's generated context templates
TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")
_FORMAT = 2  # of a record: 2 = the id covers every field; 1 (id over modules, requests, ΔW) is still read


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MemitHyperParams:
    """MEMIT settings (names follow the MEMIT code's ``MEMITHyperParams``).

    ``mom2_weight`` is λ; ``mom2_n_tokens`` the token count of C. ``chunk_requests`` fixes how
    many requests share one z-optimisation batch; ``None`` derives it from ``memory_mb``.
    """

    layers: tuple[int, ...]
    mom2_weight: float = 15000.0
    mom2_n_tokens: int = 100_000
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    context_template_length: int = 10
    context_templates_per_start: int = 1
    chunk_requests: int | None = None
    memory_mb: int = 2048
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise HyperParameterError(f"layers must be a non-empty increasing list of distinct layers, got {list(self.layers)}")
        for name in ("mom2_weight", "v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise HyperParameterError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.v_steps < 1 or self.memory_mb < 16 or (self.chunk_requests is not None and self.chunk_requests < 1):
            raise HyperParameterError("v_steps and chunk_requests must be >= 1 and memory_mb >= 16")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemitHyperParams":
        """From :meth:`to_dict` (e.g. read from a file): every setting's type is checked first."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise HyperParameterError(f"unknown MEMIT settings {sorted(unknown)}; accepted: {sorted(names)}")
        for name, value in d.items():
            if name == "layers":
                ok = isinstance(value, (list, tuple)) and all(is_int(x) and x >= 0 for x in value)
                accepted = "a list of layer numbers"
            elif name == "chunk_requests":
                ok, accepted = value is None or is_int(value), "an integer or null"
            elif name in _INT_SETTINGS:
                ok, accepted = is_int(value), "an integer"
            else:
                ok, accepted = is_number(value), "a finite number"
            if not ok:
                raise HyperParameterError(f"MEMIT setting {name!r} must be {accepted}, got {value!r:.40}")
        return cls(**d)

    def rome_hparams(self):
        """The v* settings as :class:`tracer.edit.rome.ROMEHyperParams` at the last edited layer."""
        from .rome import ROMEHyperParams

        return ROMEHyperParams(layer=self.layers[-1], v_num_grad_steps=self.v_steps, v_lr=self.v_lr,
                               v_weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                               kl_factor=self.kl_factor, early_stop_loss=self.early_stop_loss, stats_tokens=0)

    @classmethod
    def for_model(cls, model: "LanguageModel | str", **overrides) -> "MemitHyperParams":
        """Defaults for ``model``: the papers' for GPT-2 XL and GPT-J, measured ones for the embedded
        SmolLM2, else the GPT-J range scaled to the depth (layers 11%-29% of the stack)."""
        lm = as_model(model)
        n = lm.n_layers
        family = lm.layers.family
        if lm.name == "smollm2-135m":
            base = dict(EMBEDDED_DEFAULTS)
        elif family == "gpt2" and n == 48:
            base = {"layers": (13, 14, 15, 16, 17), "mom2_weight": 20000.0}
        elif family == "gptj" and n == 28:
            base = {"layers": (3, 4, 5, 6, 7, 8), "mom2_weight": 15000.0}
        else:
            lo = max(0, round(0.11 * n))
            hi = max(lo, min(n - 2, round(0.29 * n)))
            base = {"layers": tuple(range(lo, hi + 1))}
        base.update(overrides)
        return cls(**base)


_INT_SETTINGS = {"mom2_n_tokens", "v_steps", "context_template_length", "context_templates_per_start", "memory_mb", "seed"}

#: the embedded model's defaults: layer range from MLP causal traces; λ from a sweep on 20 held-out
#: CounterFact records (1000-1019) in one batch — S 29.0 / 53.3 / 86.1 / 88.8 / 89.3 / 89.1 for
#: λ = 50,000 / 15,000 / 5,000 / 1,500 / 500 / 150; 1,500 is the largest λ within one point of the
#: best S (a larger λ protects unrelated keys better as batches grow). See the README.
EMBEDDED_DEFAULTS: dict[str, Any] = {"layers": (2, 3, 4, 5, 6), "mom2_weight": 1500.0}


@dataclass(frozen=True)
class Request:
    """One fact to write: ``prompt`` has ``{}`` where ``subject`` goes; ``target_new`` is the new object."""

    subject: str
    prompt: str
    target_new: str

    @classmethod
    def coerce(cls, r: Any) -> "Request":
        """From a :class:`Request`, a dict, or any object with ``subject`` / ``prompt`` / ``target_new``
        (an ``EditRequest`` or an evaluation ``Case``)."""
        get = (lambda k: r.get(k)) if isinstance(r, dict) else (lambda k: getattr(r, k, None))
        subject, prompt, target = get("subject"), get("prompt"), get("target_new")
        if isinstance(target, dict):  # ROME's {"str": ...}
            target = target.get("str")
        if not isinstance(subject, str) or not subject.strip():
            raise EditError(f"request {r!r} has no subject")
        if not isinstance(prompt, str) or "{}" not in prompt:
            if isinstance(prompt, str) and subject in prompt:
                prompt = prompt.replace(subject, "{}", 1)
            else:
                raise EditError(f"prompt {prompt!r} must contain '{{}}' (or the subject {subject!r})")
        if not isinstance(target, str) or not target.strip():
            raise EditError(f"request for {subject!r} has an empty target_new")
        return cls(subject=subject, prompt=prompt, target_new=target)

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    def edit_request(self):
        """As :class:`tracer.edit.rome.EditRequest` (target with ROME's leading space)."""
        from .rome import EditRequest

        t = spaced(self.target_new)
        return EditRequest(self.prompt, self.subject, t)


# ---------------------------------------------------------------------------- tokens


@dataclass
class _Row:
    ids: list[int]
    lookup: int  # last subject token


def _row(lm: LanguageModel, template: str, subject: str) -> _Row:
    """Tokens of ``template`` with the subject filled in; ``lookup`` is the subject's last token."""
    start = template.index("{}")
    text = template.replace("{}", subject, 1)
    enc = lm.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    end = start + len(subject.rstrip())
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not inside:
        raise EditError(f"subject {subject!r} maps to no token of {text!r}")
    return _Row(ids=ids, lookup=inside[-1])


def context_templates(model: "LanguageModel | str", hp: MemitHyperParams | None = None) -> tuple[str, ...]:
    """``"{}"`` plus short texts the model writes itself, each followed by ``". {}"`` (ROME/MEMIT)."""
    from ..evaluate.generation import generate

    lm = as_model(model)
    length = hp.context_template_length if hp else 10
    per = hp.context_templates_per_start if hp else 1
    seed = hp.seed if hp else 0
    starts = [s for s in TEMPLATE_STARTS for _ in range(per)]
    texts = generate(lm, starts, max_length=length, top_k=5, seed=seed)
    return ("{}",) + tuple(t.replace("{", " ").replace("}", " ") + ". {}" for t in texts)


def _pad_id(lm: LanguageModel) -> int:
    return lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0


# ---------------------------------------------------------------------------- forward helpers


class _Stop(Exception):
    pass


def _run_to(lm: LanguageModel, ids, mask, *, outputs=None, inputs=None, stop_after: str | None = None) -> None:
    """Forward the backbone, stopping once ``stop_after`` has produced its output."""
    outputs = dict(outputs or {})
    if stop_after is not None:
        inner = outputs.get(stop_after)

        def stop(h):
            if inner is not None:
                inner(h)
            raise _Stop

        outputs[stop_after] = stop
    backbone = get_module(lm.model, lm.layers.backbone)
    try:
        with hooked(lm.model, outputs=outputs, inputs=inputs or {}):
            backbone(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass


@dataclass
class _KeyRows:
    """Every (request, template) row of a batch, tokenised once and ordered by token count, so that a
    chunk of consecutive rows is padded little; ``where`` maps them back to request-major order."""

    rows: list[_Row]         # shortest first
    where: torch.Tensor      # "row": index ``request · n_templates + template`` of each sorted row
    n_requests: int
    n_templates: int


def _key_rows(lm: LanguageModel, reqs: Sequence[Request], templates: Sequence[str]) -> _KeyRows:
    rows = [_row(lm, t.replace("{}", r.prompt, 1) if t != "{}" else r.prompt, r.subject) for r in reqs for t in templates]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    return _KeyRows([rows[i] for i in order], torch.tensor(order, dtype=torch.long), len(reqs), len(templates))


@torch.no_grad()
def _keys_and_z(lm: LanguageModel, key_rows: _KeyRows, layer: int, z_layer: int, batch_rows: int,
                bar=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``layer`` ("n d_k", MEMIT's average over template groups) and the block-``z_layer``
    output at the bare prompt's last subject token ("n hidden"), with the current weights.
    ``bar`` (a tqdm) advances by the rows done."""
    rows, T = key_rows.rows, key_rows.n_templates
    keys_out, z_out = [], []
    key_mod, z_mod = lm.layers.mlp_out_name(layer), lm.layers.block_name(z_layer)
    for s in range(0, len(rows), batch_rows):
        chunk = rows[s:s + batch_rows]
        ids, mask = right_pad([r.ids for r in chunk], _pad_id(lm), lm.device)
        at = (torch.arange(len(chunk), device=lm.device), torch.tensor([r.lookup for r in chunk], device=lm.device))
        got: dict[str, torch.Tensor] = {}
        _run_to(lm, ids, mask, inputs={key_mod: lambda x: got.__setitem__("k", x[at])},
                outputs={z_mod: lambda h: got.__setitem__("z", main_tensor(h)[at])}, stop_after=lm.layers.block_name(max(layer, z_layer)))
        keys_out.append(got["k"])
        z_out.append(got["z"])
        if bar is not None:
            bar.update(len(chunk))
    where = key_rows.where.to(lm.device)
    k_sorted, z_sorted = torch.cat(keys_out), torch.cat(z_out)
    k = torch.empty_like(k_sorted).index_copy_(0, where, k_sorted).reshape(key_rows.n_requests, T, -1)
    # MEMIT averages within each template group ("{}" alone, then the generated ones), then across groups
    keys = (k[:, 0] + k[:, 1:].mean(1)) / 2 if T > 1 else k[:, 0]
    z = torch.empty_like(z_sorted).index_copy_(0, where, z_sorted).reshape(key_rows.n_requests, T, -1)[:, 0]
    return keys, z


# ---------------------------------------------------------------------------- z optimisation


@dataclass(frozen=True)
class ZResult:
    """Target hidden vectors ("n hidden") at block ``layer`` and each request's loss curve."""

    layer: int
    z: torch.Tensor
    losses: list[list[float]]
    seconds: float
    reused: int = 0  # requests whose z came from a checkpoint
    #: what the reused z cost when they were optimised (their chunks' recorded seconds, shared evenly
    #: over each chunk's requests): ``wall_s``, ``cpu_s``, and ``untimed`` requests from older files
    reused_cost: dict[str, float] = field(default_factory=dict)


def compute_zs(model: "LanguageModel | str", requests: Sequence[Any], hp: MemitHyperParams,
               templates: Sequence[str] | None = None, *, progress: bool = True,
               checkpoint_dir: str | Path | None = None) -> ZResult:
    """z_i = h_L + δ_i at block L = ``hp.layers[-1]``: ROME's v* optimisation
    (:func:`tracer.edit.rome.compute_v` with ``reference="hidden"``, MEMIT's clamp), batched over
    requests in chunks of ``hp.chunk_requests`` (or as many as fit ``hp.memory_mb``). Chunks take
    requests of similar token length together (a chunk is padded to its longest row); each z depends
    only on its own request, so the order changes the time, not the result.

    With ``checkpoint_dir`` every finished chunk is written there (atomically) and requests whose
    z is already there — for the same weights, layer, v* settings and templates — are not
    optimised again, so a long run (10,000 edits) that is interrupted resumes where it stopped.
    """
    from .rome import compute_v

    lm = as_model(model)
    reqs = [Request.coerce(r) for r in requests]
    templates = tuple(templates) if templates is not None else context_templates(lm, hp)
    chunk = hp.chunk_requests or _auto_chunk(lm, hp, len(templates))
    rhp = hp.rome_hparams()
    started = time.perf_counter()
    found: dict[str, tuple[torch.Tensor, list[float], dict | None]] = {}
    keys: list[str] = []
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        prefix = _z_key_prefix(lm, hp, templates)
        keys = [_request_key(prefix, r) for r in reqs]
        found = _read_z_checkpoints(checkpoint_dir, set(keys), lm.hidden_size)
    todo = [i for i, k in enumerate(keys) if k not in found] if keys else list(range(len(reqs)))
    # chunks of requests with similar token extents: a chunk is padded to its longest row
    edit_reqs = {i: reqs[i].edit_request() for i in todo}
    todo.sort(key=lambda i: _extent(lm, edit_reqs[i]))
    z_of: dict[int, torch.Tensor] = {}
    loss_of: dict[int, list[float]] = {}
    costs = []
    for i, k in enumerate(keys):
        if k in found:
            z_of[i], loss_of[i] = found[k][0].to(lm.device), found[k][1]
            costs.append(found[k][2])
    reused_cost = {"wall_s": sum(c["wall_s"] for c in costs if c), "cpu_s": sum(c["cpu_s"] for c in costs if c),
                   "untimed": sum(1 for c in costs if not c)}
    bar = tqdm(total=len(todo), desc=f"MEMIT z (layer {hp.layers[-1]})", unit="req", disable=not progress, leave=False)
    if progress and len(todo) < len(reqs):
        log.info("MEMIT z: %d of %d requests read from %s", len(reqs) - len(todo), len(reqs), checkpoint_dir)
    try:
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            wall0, cpu0 = time.perf_counter(), time.process_time()
            vres = compute_v(lm, hp.layers[-1], [edit_reqs[i] for i in part], templates, rhp, reference="hidden")
            z = (vres.hidden_init + vres.delta).detach()
            curve = vres.loss.T.tolist()  # "request step"
            part_losses = [c[:_steps_taken(c, hp.early_stop_loss)] for c in curve]
            for j, i in enumerate(part):
                z_of[i], loss_of[i] = z[j], part_losses[j]
            if checkpoint_dir is not None:
                _write_z_checkpoint(checkpoint_dir, [keys[i] for i in part], z, part_losses,
                                    {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0})
            bar.update(len(part))
            if progress:
                done = s + len(part)
                rate = done / (time.perf_counter() - started)
                bar.set_postfix_str(f"{rate:.2f} req/s, ETA {(len(todo) - done) / rate:.0f} s")
    finally:
        bar.close()
    return ZResult(layer=hp.layers[-1], z=torch.stack([z_of[i] for i in range(len(reqs))]),
                   losses=[loss_of[i] for i in range(len(reqs))], seconds=time.perf_counter() - started,
                   reused=len(reqs) - len(todo), reused_cost=reused_cost)


def _extent(lm: LanguageModel, request) -> tuple[int, int]:
    """(tokens the v* engine feeds per step: the last subject token to the end of the target row,
    tokens before the last subject token) of the bare prompt of ``request`` (an ``EditRequest``)."""
    from .rome import _place, _target_ids

    ids, last = _place(lm, "{}", request.prompt, request.subject)
    return len(ids) - last + len(_target_ids(lm, request.target_new)) - 1, last


def _z_key_prefix(lm: LanguageModel, hp: MemitHyperParams, templates: Sequence[str]) -> str:
    """What z depends on besides the request: all weights, layer L, the v* settings, the templates."""
    return json.dumps({"weights": weights_fingerprint(lm), "layer": hp.layers[-1], "v": hp.rome_hparams().to_dict(),
                       "templates": list(templates)}, sort_keys=True)


def _request_key(prefix: str, request: Request) -> str:
    return hashlib.sha256((prefix + json.dumps(asdict(request), sort_keys=True)).encode()).hexdigest()[:32]


def _read_z_checkpoints(directory: Path, wanted: set[str], hidden: int
                        ) -> dict[str, tuple[torch.Tensor, list[float], dict | None]]:
    """``{request key: (z, loss curve, its share of the chunk's recorded seconds or None)}`` from the
    chunk files in ``directory``. Every field of a file holding a wanted key is checked (z float32,
    finite, shape (n, ``hidden``) for its n keys; keys, loss curves and seconds well-formed); a file
    that fails is skipped with a warning naming it and the field, and its requests are optimised
    again: the directory is a cache, and a torn or foreign entry costs only its time."""
    out = {}
    for path in sorted(directory.glob("z-*.safetensors")):
        try:
            got = _read_z_file(path, wanted, hidden)
        except _BadZFile as e:
            log.warning("skipping z checkpoint %s: %s; its requests are optimised again", path, e)
            continue
        out.update(got)
    return out


class _BadZFile(Exception):
    pass


def _read_z_file(path: Path, wanted: set[str], hidden: int) -> dict[str, tuple[torch.Tensor, list[float], dict | None]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("factscope_z")
            if text is None:
                raise _BadZFile("no factscope_z metadata")
            meta = json.loads(text)
            if not isinstance(meta, dict) or not list_of(lambda k: isinstance(k, str))(meta.get("keys")) or not meta["keys"]:
                raise _BadZFile("field 'keys' must be a non-empty list of strings")
            if not wanted.intersection(meta["keys"]):
                return {}
            if set(f.keys()) != {"z"}:
                raise _BadZFile(f"tensors {sorted(f.keys())}, expected just 'z'")
            z = f.get_tensor("z")
    except _BadZFile:
        raise
    except Exception as e:  # a torn or foreign file
        raise _BadZFile(f"unreadable ({type(e).__name__})") from None
    keys = meta["keys"]
    n = len(keys)
    if len(set(keys)) != n:
        raise _BadZFile("field 'keys' repeats a key")
    if z.dtype != torch.float32 or tuple(z.shape) != (n, hidden):
        raise _BadZFile(f"z is {z.dtype} of shape {tuple(z.shape)}, expected float32 ({n}, {hidden}) for its {n} keys "
                        "and this model")
    if not torch.isfinite(z).all():
        raise _BadZFile("z has non-finite values")
    losses = meta.get("losses")
    if not (list_of(list_of(is_number))(losses) and len(losses) == n):
        raise _BadZFile(f"field 'losses' must be {n} lists of finite numbers")
    share = None
    if "cpu_s" in meta or "wall_s" in meta:
        if not all(is_number(meta.get(k)) and meta[k] >= 0 for k in ("wall_s", "cpu_s")):
            raise _BadZFile("fields 'wall_s' and 'cpu_s' must be numbers >= 0")
        share = {k: meta[k] / n for k in ("wall_s", "cpu_s")}
    return {key: (z[j], losses[j], share) for j, key in enumerate(keys) if key in wanted}


def _write_z_checkpoint(directory: Path, keys: list[str], z: torch.Tensor, losses: list[list[float]],
                        cost: dict[str, float]) -> None:
    """One chunk's z with its requests' keys, loss curves and ``cost`` (the chunk's wall and process
    CPU seconds, so the time of a run done in pieces can be added up from its checkpoints)."""
    from ..files import save_safetensors_atomic

    name = "z-" + hashlib.sha256("".join(keys).encode()).hexdigest()[:16] + ".safetensors"
    save_safetensors_atomic(directory / name, {"z": z.detach().float().contiguous().cpu()},
                            {"factscope_z": json.dumps({"keys": keys, "losses": losses, **cost})})


def _steps_taken(curve: list[float], stop: float) -> int:
    for i, v in enumerate(curve):
        if v < stop:
            return i + 1
    return len(curve)


def _auto_chunk(lm: LanguageModel, hp: MemitHyperParams, n_templates: int) -> int:
    """Requests per z batch so that the activations kept for the backward pass fit ``hp.memory_mb``.

    Per token and layer above L a block keeps about 10·hidden + 4·mlp floats; the prefix-cached
    v* engine feeds ~12 tokens per row (the last subject token on), ``n_templates + 1`` rows per
    request, and unembeds ~2 positions per row.
    """
    cfg = lm.model.config
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * lm.hidden_size
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    layers_after = lm.n_layers - hp.layers[-1]
    rows = n_templates + 1
    per_request = 4 * rows * (12 * layers_after * (10 * lm.hidden_size + 4 * inter) + 2 * 3 * vocab)
    return max(1, int(hp.memory_mb * 2**20 // per_request))


# ---------------------------------------------------------------------------- the update


def solve_update(keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor | None, mom2_weight: float) -> torch.Tensor:
    """ΔW ("out d_k") = R Kᵀ (λC + K Kᵀ)⁻¹ in float64, for K = ``keys.T`` ("d_k n") and
    R = ``resid.T`` ("out n"); C = I when ``mom2`` is None. Cholesky, or LU solve if not PD."""
    K = keys.double().T
    Rm = resid.double().T
    C = torch.eye(K.shape[0], dtype=torch.float64, device=K.device) if mom2 is None else mom2.to(K.device, torch.float64)
    A = mom2_weight * C + K @ K.T
    chol, info = torch.linalg.cholesky_ex(A)
    adj = torch.cholesky_solve(K, chol) if int(info) == 0 else torch.linalg.solve(A, K)  # "d_k n" = A⁻¹K
    return Rm @ adj.T


# ---------------------------------------------------------------------------- record


@dataclass(frozen=True)
class _Undo:
    """What :meth:`MemitRecord.revert` needs to give one weight its bits back (on the CPU).

    ``fl(W₁ − ΔW)`` in the weight's dtype equals the original weight W₀ except at a few elements:
    ``index`` (flat positions, int32 or int64) holds them and ``values`` their original values. When
    keeping those would cost half a copy of W₀ or more, ``index`` is None and ``values`` is W₀ itself. ``after``
    is the SHA-256 of W₁, the weight as :meth:`MemitRecord.apply` left it.
    """

    index: torch.Tensor | None
    values: torch.Tensor
    after: str

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (self.index.nbytes if self.index is not None else 0)


def _undo_for(before: torch.Tensor, after: torch.Tensor, d: torch.Tensor) -> _Undo:
    """The :class:`_Undo` that takes ``after`` (= fl(``before`` + ``d``)) back to ``before``, bit for bit."""
    back = (after - d).reshape(-1)
    flat = before.reshape(-1)
    wrong = (bits_view(back) != bits_view(flat)).nonzero().squeeze(1)
    n = flat.numel()
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    index_bytes = 4 if index_dtype == torch.int32 else 8
    if wrong.numel() * (index_bytes + flat.element_size()) >= n * flat.element_size() // 2:
        return _Undo(None, before.detach().to("cpu", copy=True), weight_hash(after))
    return _Undo(wrong.to("cpu", index_dtype), flat[wrong].to("cpu", copy=True), weight_hash(after))


def _undo(w: torch.Tensor, d: torch.Tensor, undo: _Undo) -> None:
    """Give ``w`` (the weight apply left, ``d`` the ΔW apply added, in its dtype) its original bits."""
    if undo.index is None:
        w.copy_(undo.values.to(w.device))
        return
    back = (w - d).contiguous()
    back.view(-1)[undo.index.to(w.device, torch.long)] = undo.values.to(w.device)
    w.copy_(back)


#: ``{id(weight): [ids of the MEMIT batches applied to it with MemitRecord.apply, in order]}``, so a
#: revert out of order can name the batch to revert first; an entry goes when its weight is freed
_APPLIED: dict[int, list[str]] = {}


def _applied_to(w: torch.Tensor) -> list[str]:
    key = id(w)
    if key not in _APPLIED:
        _APPLIED[key] = []
        weakref.finalize(w, _APPLIED.pop, key, None)
    return _APPLIED[key]


@dataclass(eq=False)
class MemitRecord:
    """One MEMIT batch: per-layer ΔW ("out d_k", float32, CPU) and the settings it was made with.

    :meth:`apply` adds ΔW to every edited weight, or to none if any check fails; :meth:`revert`
    restores the bits the weights had before, after checking that they are still those apply left
    (records applied directly revert latest first; a :class:`tracer.edit.Ledger` reverts in any
    order). While applied, a record keeps on the CPU the few elements where fl(W₁ − ΔW) differs
    from W₀ (or W₀ itself when that is cheaper), and a hash of each weight it wrote.
    """

    requests: list[Request]
    hparams: MemitHyperParams
    modules: list[str]
    deltas: list[torch.Tensor]
    templates: tuple[str, ...]
    stats: list[dict]
    z_losses: list[list[float]]
    timings: dict[str, float]
    applied: bool = False
    fingerprints: dict[int, str] = field(default_factory=dict)
    method: str = "MEMIT"
    undo: list[_Undo] | None = field(default=None, init=False, repr=False)

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

    @property
    def undo_bytes(self) -> int:
        """CPU bytes this record holds to revert exactly while applied (0 when not applied)."""
        return sum(u.nbytes for u in self.undo) if self.undo else 0

    def module_delta(self, name: str) -> torch.Tensor:
        """ΔW at module ``name``, float64, shape "d_out d_k" (the ``nn.Linear`` layout) — what a
        :class:`tracer.edit.Ledger` adds there when it applies this batch."""
        return self.deltas[self.modules.index(name)].double()

    def _weights(self, lm: LanguageModel) -> list[torch.nn.Parameter]:
        return [get_module(lm.model, name).weight for name in self.modules]

    def _stored(self, lm: LanguageModel, delta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """ΔW in ``w``'s layout, dtype and device: what apply adds and revert takes away."""
        return (delta.T if lm.layers.mlp_out_transposed else delta).to(w.device, w.dtype)

    @torch.no_grad()
    def apply(self, model: "LanguageModel | str") -> "MemitRecord":
        """Add ΔW to every edited weight. Every check (modules, shapes, finite ΔW and finite result in
        the weights' dtype) runs before the first write; if writing fails, the weights written are restored."""
        lm = as_model(model)
        if self.applied:
            raise EditError(f"MEMIT batch {self.id} is already applied; revert it first")
        if len(self.deltas) != len(self.modules):
            raise EditError(f"MEMIT batch {self.id} names {len(self.modules)} modules but has {len(self.deltas)} ΔW")
        ws = self._weights(lm)
        for name, w, dw in zip(self.modules, ws, self.deltas):
            stored = dw.T if lm.layers.mlp_out_transposed else dw
            if tuple(stored.shape) != tuple(w.shape):
                raise EditError(f"MEMIT batch {self.id} has ΔW of shape {tuple(dw.shape)} for {name}, whose weight "
                                f"is {tuple(w.shape)}: it was computed for another model; nothing was applied")
            if not torch.isfinite(dw).all():
                raise EditError(f"MEMIT batch {self.id} has non-finite ΔW for {name}; nothing was applied")
            if not torch.isfinite(w + self._stored(lm, dw, w)).all():
                raise EditError(f"MEMIT batch {self.id} makes {name} non-finite in {w.dtype}; nothing was applied")
        undo: list[_Undo] = []
        try:
            for w, dw in zip(ws, self.deltas):
                d = self._stored(lm, dw, w)
                before = w.detach().clone()
                try:
                    w.add_(d)
                    undo.append(_undo_for(before, w.detach(), d))
                except BaseException:
                    w.copy_(before)
                    raise
        except BaseException:
            for w, dw, u in reversed(list(zip(ws, self.deltas, undo))):
                _undo(w, self._stored(lm, dw, w), u)
            raise
        for w in ws:
            _applied_to(w).append(self.id)
        self.undo = undo
        self.applied = True
        return self

    @torch.no_grad()
    def revert(self, model: "LanguageModel | str") -> "MemitRecord":
        """Restore the weights' bits from before :meth:`apply`; refused (nothing written) when a weight
        is no longer what apply left, naming the batch to revert first where one is known."""
        lm = as_model(model)
        if not self.applied or self.undo is None:
            raise EditError(f"MEMIT batch {self.id} is not applied; nothing to revert")
        ws = self._weights(lm)
        for name, w, u in zip(self.modules, ws, self.undo):
            if weight_hash(w) != u.after:
                stack = _applied_to(w)
                later = stack[len(stack) - stack[::-1].index(self.id):] if self.id in stack else []
                if later:
                    raise EditError(f"MEMIT batch {self.id} cannot be reverted yet: batch {later[-1]} was applied "
                                    f"after it at {name}; revert {later[-1]} first (latest first), or use a Ledger "
                                    "to revert in any order")
                raise EditError(f"{name} was changed since MEMIT batch {self.id} was applied (not by another batch's "
                                "apply); undo that change first; nothing was reverted")
        for w, dw, u in zip(ws, self.deltas, self.undo):
            _undo(w, self._stored(lm, dw, w), u)
            stack = _applied_to(w)
            if self.id in stack:
                del stack[len(stack) - 1 - stack[::-1].index(self.id)]
        self.undo = None
        self.applied = False
        return self

    def _content(self) -> dict:
        return {"format": _FORMAT, "method": "MEMIT", "requests": [asdict(r) for r in self.requests],
                "hparams": self.hparams.to_dict(), "modules": list(self.modules), "templates": list(self.templates),
                "stats": self.stats, "z_losses": self.z_losses, "timings": self.timings,
                "fingerprints": {str(k): v for k, v in self.fingerprints.items()}}

    def to_dict(self) -> dict:
        return {"id": self.id, **self._content()}

    @classmethod
    def from_dict(cls, meta: dict, deltas: Sequence[torch.Tensor], *, source: str = "MEMIT record",
                  legacy: bool | None = None) -> "MemitRecord":
        """The (unapplied) record from :meth:`to_dict` and its ΔW tensors, every field checked and
        verified against ``meta["id"]`` (by the format-1 rule for format-1 records, or when
        ``legacy``). Errors are :class:`EditError` s naming ``source`` and the field."""
        if not isinstance(meta, dict):
            raise EditError(f"{source} must be a JSON object, got {type(meta).__name__}")
        fmt = meta.get("format")
        if legacy is None:
            legacy = fmt == 1
        want = 1 if legacy else _FORMAT
        if fmt != want or meta.get("method") != "MEMIT":
            raise EditError(f"{source} is not a MEMIT record of format {want} (format {fmt!r:.40}, "
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
            hparams = MemitHyperParams.from_dict(f("hparams", lambda x: isinstance(x, dict), "a JSON object"))
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
                     fingerprints=fingerprints)
        if "id" in meta:
            f("id", is_str, "a string")
            verify_content(record, meta, source, legacy, "MEMIT record")
        return record

    def save(self, path: str | Path) -> Path:
        """``path`` (.safetensors with the ΔW) and ``path`` + ``.json`` (everything else), each atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(path, {f"delta.{i}": d.detach().float().contiguous().cpu() for i, d in enumerate(self.deltas)},
                                {"factscope_memit": json.dumps({"format": _FORMAT, "id": self.id})})
        write_json_atomic(Path(str(path) + ".json"), self.to_dict(), indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MemitRecord":
        """The record :meth:`save` wrote (unapplied); a missing, malformed or altered file is an
        :class:`EditError` naming the file and what is wrong."""
        from safetensors import safe_open

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
        return cls.from_dict(meta, [tensors[k] for k in names], source=source)


# ---------------------------------------------------------------------------- statistics


StatsSource = Callable[[LanguageModel, int], "torch.Tensor | None"]


def load_statistics(model: "LanguageModel | str", hp: MemitHyperParams, stats: Any = None, *,
                    progress: bool = True) -> dict[int, tuple[torch.Tensor | None, dict]]:
    """C per edited layer, read on the current (unedited) model: ``{layer: (mom2 or None, info)}``.

    ``stats`` is a :class:`tracer.stats.StatsCache` (``hp.mom2_n_tokens`` tokens of the default
    Wikipedia corpus), ``"identity"`` (C = I, labelled so), a callable ``(lm, layer) -> C``, or a
    dict ``{layer: C}``. ``None`` uses a ``StatsCache`` under the factscope cache directory.
    """
    from ..models import cache_dir
    from ..stats import KeyStatistics, StatsCache

    lm = as_model(model)
    out = {}
    for layer in hp.layers:
        if isinstance(stats, str) and stats == "identity":
            out[layer] = (None, KeyStatistics.identity(lm, layer).to_dict())
        elif isinstance(stats, dict):
            out[layer] = (stats[layer], {"kind": "given"})
        elif callable(stats) and not hasattr(stats, "get"):
            out[layer] = (stats(lm, layer), {"kind": "given"})
        else:
            cache = stats if stats is not None else StatsCache(cache_dir() / "stats")
            ks = cache.get(lm, layer, hp.mom2_n_tokens, progress=progress)
            out[layer] = (ks.mom2, ks.to_dict())
    return out


# ---------------------------------------------------------------------------- entry points


def _statistics_for(lm: LanguageModel, hp: MemitHyperParams, stats: Any, statistics: dict | None,
                    progress: bool) -> dict:
    """``statistics`` if given (checked: as :func:`load_statistics` returns it, ``{layer: (C or None, info)}``
    for every edited layer), else C read by :func:`load_statistics` from ``stats``."""
    if statistics is None:
        return load_statistics(lm, hp, stats, progress=progress)
    if not isinstance(statistics, dict):
        raise HyperParameterError(f"statistics must be the dict load_statistics returns ({{layer: (C or None, info)}}), "
                                  f"got {type(statistics).__name__}")
    missing = [l for l in hp.layers if l not in statistics]
    if missing:
        raise HyperParameterError(f"statistics lack layers {missing}: they hold {sorted(statistics)}, the edit needs "
                                  f"{list(hp.layers)} (call load_statistics with the same hyper-parameters)")
    bad = [l for l in hp.layers if not (isinstance(statistics[l], tuple) and len(statistics[l]) == 2
                                        and (statistics[l][0] is None or isinstance(statistics[l][0], torch.Tensor)))]
    if bad:
        raise HyperParameterError(f"statistics[{bad[0]}] must be a pair (C: tensor or None, info: dict), "
                                  f"got {type(statistics[bad[0]]).__name__}")
    return statistics


def compute_memit(model: "LanguageModel | str", requests: Sequence[Any], hp: MemitHyperParams | None = None, *,
                  stats: Any = None, templates: Sequence[str] | None = None, progress: bool = True,
                  statistics: dict | None = None, apply: bool = True,
                  checkpoint_dir: str | Path | None = None) -> MemitRecord:
    """Compute and apply one MEMIT batch; returns its record (already applied).

    ``apply=False`` returns the record with the model unchanged, e.g. to hand it to a
    :class:`tracer.edit.Ledger` (which then reverts batches and ROME edits in any order).
    ``checkpoint_dir`` keeps each chunk's z there, so an interrupted batch resumes (see :func:`compute_zs`).

    ``statistics`` (from :func:`load_statistics`) lets sequential batches reuse C computed on the
    unedited model. If anything fails midway, the weights are restored before the error propagates.
    """
    lm = as_model(model)
    reqs = [Request.coerce(r) for r in requests]
    if not reqs:
        raise EditError("no requests to edit")
    hp = hp or MemitHyperParams.for_model(lm)
    if hp.layers[-1] >= lm.n_layers:
        raise HyperParameterError(f"layers must be < {lm.n_layers} for {lm.name}, got {list(hp.layers)}")
    t0 = time.perf_counter()
    statistics = _statistics_for(lm, hp, stats, statistics, progress)
    t_stats = time.perf_counter() - t0
    templates = tuple(templates) if templates is not None else context_templates(lm, hp)
    zres = compute_zs(lm, reqs, hp, templates, progress=progress, checkpoint_dir=checkpoint_dir)
    bad = [i for i, ok in enumerate(torch.isfinite(zres.z).all(1).tolist()) if not ok]
    if bad:
        raise EditError(f"the target vectors z of {len(bad)} requests are not finite (first: {reqs[bad[0]].text!r}); "
                        "the model was left unchanged (lower v_lr or check the checkpoint files)")
    fingerprints = {layer: key_fingerprint(lm, layer) for layer in hp.layers}  # the model the batch is computed on
    modules = [lm.layers.mlp_out_name(l) for l in hp.layers]
    weights = [get_module(lm.model, n).weight for n in modules]
    originals = [w.detach().to("cpu", copy=True) for w in weights]  # restored on failure and before the record applies
    deltas: list[torch.Tensor] = []
    batch_rows = max(8, hp.chunk_requests * len(templates) if hp.chunk_requests else 256)
    t1 = time.perf_counter()
    key_rows = _key_rows(lm, reqs, templates)
    bar = tqdm(total=len(hp.layers) * len(key_rows.rows), desc=f"MEMIT keys and update (layers {hp.layers[0]}-{hp.layers[-1]})",
               unit="row", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for i, layer in enumerate(hp.layers):
                keys, cur = _keys_and_z(lm, key_rows, layer, hp.layers[-1], batch_rows, bar)
                resid = (zres.z - cur) / (len(hp.layers) - i)  # "n hidden"
                dw = solve_update(keys, resid, statistics[layer][0], hp.mom2_weight).float()  # "hidden d_k"
                w = weights[i]
                stored = (dw.T if lm.layers.mlp_out_transposed else dw).to(w.dtype)
                if not (torch.isfinite(dw).all() and torch.isfinite(w + stored).all()):
                    raise EditError(f"the MEMIT update for layer {layer} is not finite in {w.dtype} (keys or C "
                                    "degenerate, or λ too small); the model was left unchanged")
                w.data.add_(stored)
                deltas.append(dw.cpu())
    except BaseException:
        with torch.no_grad():
            for w, o in zip(weights, originals):
                w.data.copy_(o.to(w.device))
        raise
    finally:
        bar.close()
    # the record re-applies ΔW from the original weights (all layers or none), keeping what revert needs
    with torch.no_grad():
        for w, o in zip(weights, originals):
            w.data.copy_(o.to(w.device))
    del originals
    record = MemitRecord(requests=reqs, hparams=hp, modules=modules, deltas=deltas, templates=templates,
                         stats=[statistics[l][1] for l in hp.layers], z_losses=zres.losses,
                         timings={"statistics_s": t_stats, "z_s": zres.seconds, "z_reused": zres.reused,
                                  **{f"z_reused_{k}": v for k, v in zres.reused_cost.items()},
                                  "update_s": time.perf_counter() - t1},
                         fingerprints=fingerprints)
    return record.apply(lm) if apply else record


def apply_memit(model: "LanguageModel | str", requests: Sequence[Any], hp: MemitHyperParams | None = None,
                **kwargs) -> MemitRecord:
    """Alias of :func:`compute_memit` (compute and apply)."""
    return compute_memit(model, requests, hp, **kwargs)


# ---------------------------------------------------------------------------- sequential editing


def heldout_texts(n: int = 16, chars: int = 2000, path: str | Path | None = None) -> list[str]:
    """The last ``n`` articles of the shared Wikipedia file (truncated to ``chars``): text the key
    statistics, read from the start of the file, do not use for any reasonable token count."""
    import gzip

    from ..stats import default_corpus

    path = Path(path) if path is not None else default_corpus()
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
        lines = f.readlines()
    return [json.loads(line)["text"][:chars] for line in lines[-n:] if line.strip()]


@torch.no_grad()
def perplexity(model: "LanguageModel | str", texts: Sequence[str], max_tokens: int = 256) -> float:
    """exp(mean token NLL) over ``texts``, each cut to ``max_tokens`` tokens."""
    lm = as_model(model)
    total, count = 0.0, 0
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=lm.device)
        logits = lm.model(input_ids=x, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return math.exp(total / count)


@dataclass(frozen=True)
class Health:
    """After a batch: Frobenius norm of each edited matrix relative to the original, perplexity."""

    batch: int
    n_edits: int
    norm_ratio: dict[str, float]
    perplexity: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def sequential_memit(model: "LanguageModel | str", requests: Sequence[Any], batch_size: int,
                     hp: MemitHyperParams | None = None, *, stats: Any = None, texts: Sequence[str] | None = None,
                     progress: bool = True, on_batch: Callable[[MemitRecord, Health], None] | None = None,
                     checkpoint_dir: str | Path | None = None,
                     statistics: dict | None = None) -> tuple[list[MemitRecord], list[Health]]:
    """MEMIT in consecutive batches of ``batch_size`` (each on the model edited by the ones before),
    with a :class:`Health` read-out before the first and after every batch. C is read once, on the
    unedited model. Revert with ``for r in reversed(records): r.revert(lm)`` (bit-exact).

    ``checkpoint_dir`` keeps every batch's z there (see :func:`compute_zs`): z keys include a hash of
    the weights, so batch k's z are found again only after the same k − 1 batches, and a rerun of an
    interrupted sequence recomputes nothing it finished.

    ``statistics`` (from :func:`load_statistics` on the unedited model) skips reading C again, e.g.
    for a second sequence in the same notebook."""
    lm = as_model(model)
    if batch_size < 1:
        raise HyperParameterError(f"batch_size must be >= 1, got {batch_size}")
    hp = hp or MemitHyperParams.for_model(lm)
    statistics = _statistics_for(lm, hp, stats, statistics, progress)
    templates = context_templates(lm, hp)
    texts = list(texts) if texts is not None else heldout_texts()
    modules = [lm.layers.mlp_out_name(l) for l in hp.layers]
    norms0 = {m: float(get_module(lm.model, m).weight.double().norm()) for m in modules}

    def health(batch: int, n: int, seconds: float) -> Health:
        ratio = {m: float(get_module(lm.model, m).weight.double().norm()) / norms0[m] for m in modules}
        return Health(batch=batch, n_edits=n, norm_ratio=ratio, perplexity=perplexity(lm, texts), seconds=seconds)

    records, report = [], [health(0, 0, 0.0)]
    for b, s in enumerate(range(0, len(requests), batch_size), start=1):
        t = time.perf_counter()
        rec = compute_memit(lm, requests[s:s + batch_size], hp, statistics=statistics, templates=templates,
                            progress=progress, checkpoint_dir=checkpoint_dir)
        records.append(rec)
        report.append(health(b, s + len(requests[s:s + batch_size]), time.perf_counter() - t))
        log.info("batch %d: %d edits, norm ratios %s, perplexity %.2f", b, report[-1].n_edits,
                 {k.split(".")[-3]: round(v, 4) for k, v in report[-1].norm_ratio.items()}, report[-1].perplexity)
        if on_batch is not None:
            on_batch(rec, report[-1])
    return records, report
