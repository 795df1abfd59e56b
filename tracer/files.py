"""Atomic file writes: a file is either its old version or the complete new one, never half."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                            *, fsync: bool = False) -> Path:
    """Write ``tensors`` + ``metadata`` to ``path`` via a temporary file in the same directory and
    ``os.replace``; ``fsync`` flushes it to disk first. The file is readable by all (0644)."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; caches and ledgers are shared like other outputs
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
