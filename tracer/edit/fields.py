"""Checked fields and content hashes: how edit records are read from files and identified.

Every field read from a file goes through :func:`checked_field` / :func:`checked_tensor`, so a
malformed file is an :class:`~tracer.errors.EditError` naming the file, the field and what is
accepted. :func:`content_digest` is the id rule of current records (SHA-256 over canonical JSON
and every tensor's bytes); :func:`weight_hash` notices weights written behind a ledger's back.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Sequence

import torch

from ..errors import EditError

#: record fields that are tensors (ROME's factors); :func:`verify_content` compares the rest
TENSOR_FIELDS = ("u", "v", "k_star", "v_star")

MISSING = object()


def brief(value: Any) -> str:
    """``value`` as at most 60 characters of JSON, for error messages."""
    text = json.dumps(value, default=repr) if not isinstance(value, torch.Tensor) else f"a tensor {tuple(value.shape)}"
    return (text[:60] + "…") if len(text) > 60 else text


def is_number(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool)


def list_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check: a list whose every item ``ok`` accepts."""
    return lambda x: isinstance(x, list) and all(ok(v) for v in x)


def dict_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check: a dict of string keys whose every value ``ok`` accepts."""
    return lambda x: isinstance(x, dict) and all(isinstance(k, str) and ok(v) for k, v in x.items())


def checked_field(d: dict, name: str, ok: Callable[[Any], bool], accepted: str, source: str, default: Any = MISSING):
    """``d[name]`` if ``ok`` accepts it, else an :class:`EditError` naming ``source``, the field and
    what is ``accepted``; a missing field is ``default`` or an error when there is none."""
    if name not in d:
        if default is not MISSING:
            return default
        raise EditError(f"{source} lacks field {name!r} ({accepted}); the file is corrupted or not a factscope record")
    if not ok(d[name]):
        raise EditError(f"{source}: field {name!r} must be {accepted}, got {brief(d[name])}")
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
    got = json.loads(json.dumps({k: v for k, v in d.items() if k not in TENSOR_FIELDS}))

    def text(v):
        return json.dumps(v, sort_keys=True) if v is not MISSING else None

    for key in sorted(set(back) | set(got)):
        if key != "id" and text(back.get(key, MISSING)) != text(got.get(key, MISSING)):
            raise EditError(f"{source}: field {key!r} does not verify against {kind} {d['id']}; the file is corrupted "
                            "or was edited")
    if d["id"] != record.id:
        raise EditError(f"{source}: {kind} {d['id']} does not verify (its content hashes to {record.id}); "
                        "the file is corrupted or was edited")
