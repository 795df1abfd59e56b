"""Atomic file writes: a file is either its old version or the complete new one, never half.

Every writer goes through :func:`write_atomic`: the content goes to ``.<name>.<pid>.tmp`` beside
the target, then ``os.replace`` puts it in place. The writer's pid in the temporary name lets a
resumed run tell a stray file of a killed writer from one another live process is still writing
(:func:`stray_writer_dead`). Files are readable by all (0644), like other outputs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch


def temporary_name(path: Path) -> Path:
    """``dir/.<name>.<pid>.tmp`` for ``dir/<name>``: where this process writes ``path`` first."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    ``fsync`` flushes the file to disk before the rename. On any error the temporary file is
    removed and ``path`` is left as it was. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = None, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None, fsync: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``json.dumps`` options passed through)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return write_text_atomic(path, text, fsync=fsync)


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                            *, fsync: bool = False) -> Path:
    """Write ``tensors`` + ``metadata`` as a safetensors file to ``path`` atomically."""
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=fsync)


def stray_writer_dead(tmp: Path) -> bool:
    """Whether ``.<name>.<pid>.tmp`` was left by a process that no longer runs (or by this one,
    or has no pid in its name): such a file is a leftover, safe to delete."""
    try:
        pid = int(tmp.name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return True
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
