"""Sub-commands of the ``factscope`` CLI; see :mod:`tracer.cli`."""
from __future__ import annotations

from pathlib import Path

from ..errors import FactscopeError


def check_output_path(path: Path | None, what: str = "output file") -> Path | None:
    """Fail before any work when ``path``'s folder does not exist or ``path`` is a folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise FactscopeError(f"{what} {str(path)!r} is a directory; pass a file name")
    if not path.parent.exists():
        raise FactscopeError(f"folder {str(path.parent)!r} for the {what} does not exist; create it first")
    return path
