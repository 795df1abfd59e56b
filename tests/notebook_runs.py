"""Executing the notebooks once per test session (shared by test_notebooks and test_browser)."""
from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def kernel_env() -> dict:
    """Environment of kernels started by tests: the repository importable, 2 threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@lru_cache(maxsize=None)
def executed(name: str):
    """``(notebook node, seconds)`` of ``notebooks/<name>.ipynb`` run top to bottom by nbclient."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    saved = dict(os.environ)
    os.environ.update(kernel_env())  # the kernel inherits this process's environment
    try:
        started = time.perf_counter()
        NotebookClient(nb, timeout=900, kernel_name="python3", store_widget_state=True,
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        return nb, time.perf_counter() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)
