"""MEMIT's z: the hidden vector each request should reach at the last edited layer, with checkpoints.

    zres = compute_zs(lm, requests, hp, templates, checkpoint_dir="out/z")   # "n hidden", resumable
    zres = compute_zs(pool, requests, hp, templates)      # chunks on the workers of a tracer.spread runner

z_i = h_L + δ_i at block L = ``hp.layers[-1]``, δ_i from ROME's v* optimisation
(:func:`tracer.edit.values.compute_v` with ``reference="hidden"`` and MEMIT's clamp), batched over
requests in chunks. With a checkpoint directory every finished chunk is written there (atomically)
and requests whose z is already there — for the same weights, layer, v* settings and templates —
are not optimised again, so a long run (10,000 edits) that is interrupted resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from ..files import save_safetensors_atomic
from ..models import LanguageModel
from ..spread import Runner, as_runner
from ..stats import weights_fingerprint
from ..targets import target_ids
from .fields import is_number, list_of
from .hparams import MemitHyperParams
from .keys import place
from .requests import Request
from .templates import context_templates
from .values import compute_v

log = logging.getLogger(__name__)


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


def compute_zs(model: "LanguageModel | str | Runner", requests: Sequence[Any], hp: MemitHyperParams,
               templates: Sequence[str] | None = None, *, progress: bool = True,
               checkpoint_dir: str | Path | None = None) -> ZResult:
    """z_i = h_L + δ_i at block L = ``hp.layers[-1]``: ROME's v* optimisation
    (:func:`tracer.edit.rome.compute_v` with ``reference="hidden"``, MEMIT's clamp), batched over
    requests in chunks of ``hp.chunk_requests`` (or as many as fit ``hp.memory_mb``). Chunks take
    requests of similar token length together (a chunk is padded to its longest row); each z depends
    only on its own request, so the order changes the time, not the result.

    ``model`` may be a :mod:`tracer.spread` runner (a :class:`~tracer.spread.RayPool`): the
    chunks are then optimised on its workers, in parallel, and gathered here. The chunks are the
    same whatever the runner (they do not depend on the number of workers), so the z are too.
    The returned ``z`` is on the CPU.

    With ``checkpoint_dir`` every finished chunk is written there (atomically, by this process) and
    requests whose z is already there — for the same weights, layer, v* settings and templates —
    are not optimised again, so a long run (10,000 edits) that is interrupted resumes where it stopped.
    """
    runner = as_runner(model)
    reqs = [Request.coerce(r) for r in requests]
    templates, chunk, extents, hidden, prefix = runner.call(_z_plan, reqs, hp, templates, checkpoint_dir is not None)
    started = time.perf_counter()
    found: dict[str, tuple[torch.Tensor, list[float], dict | None]] = {}
    keys: list[str] = []
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        keys = [_request_key(prefix, r) for r in reqs]
        found = _read_z_checkpoints(checkpoint_dir, set(keys), hidden)
    todo = [i for i, k in enumerate(keys) if k not in found] if keys else list(range(len(reqs)))
    # chunks of requests with similar token extents: a chunk is padded to its longest row
    todo.sort(key=lambda i: extents[i])
    z_of: dict[int, torch.Tensor] = {}
    loss_of: dict[int, list[float]] = {}
    costs = []
    for i, k in enumerate(keys):
        if k in found:
            z_of[i], loss_of[i] = found[k][0], found[k][1]
            costs.append(found[k][2])
    reused_cost = {"wall_s": sum(c["wall_s"] for c in costs if c), "cpu_s": sum(c["cpu_s"] for c in costs if c),
                   "untimed": sum(1 for c in costs if not c)}
    if progress and len(todo) < len(reqs):
        log.info("MEMIT z: %d of %d requests read from %s", len(reqs) - len(todo), len(reqs), checkpoint_dir)
    parts = [todo[s:s + chunk] for s in range(0, len(todo), chunk)]
    where = f" on {runner.workers} workers" if runner.workers > 1 else ""
    for done in runner.map(_z_chunk, [(n, [reqs[i].edit_request() for i in part]) for n, part in enumerate(parts)],
                           shared=(hp, templates), desc=f"MEMIT z (layer {hp.layers[-1]}){where}", unit="req",
                           sizes=[len(p) for p in parts], progress=progress, errors="raise"):
        part = parts[done.key]
        z, part_losses = done.result
        for j, i in enumerate(part):
            z_of[i], loss_of[i] = z[j], part_losses[j]
        if checkpoint_dir is not None:
            _write_z_checkpoint(checkpoint_dir, [keys[i] for i in part], z, part_losses,
                                {"wall_s": done.seconds, "cpu_s": done.cpu_seconds})
    return ZResult(layer=hp.layers[-1], z=torch.stack([z_of[i] for i in range(len(reqs))]),
                   losses=[loss_of[i] for i in range(len(reqs))], seconds=time.perf_counter() - started,
                   reused=len(reqs) - len(todo), reused_cost=reused_cost)


def _z_plan(lm: LanguageModel, reqs: list[Request], hp: MemitHyperParams, templates: Sequence[str] | None,
            keyed: bool) -> tuple[tuple[str, ...], int, list[tuple[int, int]], int, str | None]:
    """Where the model is: the templates, the requests per chunk, each request's token extent
    (:func:`extent`), the hidden size and, when ``keyed``, the checkpoint key prefix."""
    templates = tuple(templates) if templates is not None else context_templates(lm, hp)
    chunk = hp.chunk_requests or auto_chunk(lm, hp, len(templates))
    extents = [extent(lm, r.edit_request()) for r in reqs]
    return templates, chunk, extents, lm.hidden_size, _z_key_prefix(lm, hp, templates) if keyed else None


def _z_chunk(lm: LanguageModel, part: list, shared: tuple[MemitHyperParams, tuple[str, ...]]
             ) -> tuple[torch.Tensor, list[list[float]]]:
    """The task: z ("n hidden", CPU) and the loss curves of one chunk of edit requests."""
    hp, templates = shared
    vres = compute_v(lm, hp.layers[-1], part, templates, hp.rome_hparams(), reference="hidden")
    z = (vres.hidden_init + vres.delta).detach()
    curve = vres.loss.T.tolist()  # "request step"
    return z.cpu(), [c[:_steps_taken(c, hp.early_stop_loss)] for c in curve]


def extent(lm: LanguageModel, request) -> tuple[int, int]:
    """(tokens the v* engine feeds per step: the last subject token to the end of the target row,
    tokens before the last subject token) of the bare prompt of ``request`` (an ``EditRequest``)."""
    ids, last = place(lm, "{}", request.prompt, request.subject)
    return len(ids) - last + len(target_ids(lm.tokenizer, request.target_new)) - 1, last


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
        except BadZFile as e:
            log.warning("skipping z checkpoint %s: %s; its requests are optimised again", path, e)
            continue
        out.update(got)
    return out


class BadZFile(Exception):
    """A z checkpoint file that cannot be used (the message says why)."""


def _read_z_file(path: Path, wanted: set[str], hidden: int) -> dict[str, tuple[torch.Tensor, list[float], dict | None]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("factscope_z")
            if text is None:
                raise BadZFile("no factscope_z metadata")
            meta = json.loads(text)
            if not isinstance(meta, dict) or not list_of(lambda k: isinstance(k, str))(meta.get("keys")) or not meta["keys"]:
                raise BadZFile("field 'keys' must be a non-empty list of strings")
            if not wanted.intersection(meta["keys"]):
                return {}
            if set(f.keys()) != {"z"}:
                raise BadZFile(f"tensors {sorted(f.keys())}, expected just 'z'")
            z = f.get_tensor("z")
    except BadZFile:
        raise
    except Exception as e:  # a torn or foreign file
        raise BadZFile(f"unreadable ({type(e).__name__})") from None
    keys = meta["keys"]
    n = len(keys)
    if len(set(keys)) != n:
        raise BadZFile("field 'keys' repeats a key")
    if z.dtype != torch.float32 or tuple(z.shape) != (n, hidden):
        raise BadZFile(f"z is {z.dtype} of shape {tuple(z.shape)}, expected float32 ({n}, {hidden}) for its {n} keys "
                        "and this model")
    if not torch.isfinite(z).all():
        raise BadZFile("z has non-finite values")
    losses = meta.get("losses")
    if not (list_of(list_of(is_number))(losses) and len(losses) == n):
        raise BadZFile(f"field 'losses' must be {n} lists of finite numbers")
    share = None
    if "cpu_s" in meta or "wall_s" in meta:
        if not all(is_number(meta.get(k)) and meta[k] >= 0 for k in ("wall_s", "cpu_s")):
            raise BadZFile("fields 'wall_s' and 'cpu_s' must be numbers >= 0")
        share = {k: meta[k] / n for k in ("wall_s", "cpu_s")}
    return {key: (z[j], losses[j], share) for j, key in enumerate(keys) if key in wanted}


def _write_z_checkpoint(directory: Path, keys: list[str], z: torch.Tensor, losses: list[list[float]],
                        cost: dict[str, float]) -> None:
    """One chunk's z with its requests' keys, loss curves and ``cost`` (the chunk's wall and process
    CPU seconds, so the time of a run done in pieces can be added up from its checkpoints)."""
    name = "z-" + hashlib.sha256("".join(keys).encode()).hexdigest()[:16] + ".safetensors"
    save_safetensors_atomic(directory / name, {"z": z.detach().float().contiguous().cpu()},
                            {"factscope_z": json.dumps({"keys": keys, "losses": losses, **cost})})


def _steps_taken(curve: list[float], stop: float) -> int:
    for i, v in enumerate(curve):
        if v < stop:
            return i + 1
    return len(curve)


def auto_chunk(lm: LanguageModel, hp: MemitHyperParams, n_templates: int) -> int:
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
