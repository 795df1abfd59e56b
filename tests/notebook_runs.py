"""Executing the notebooks once per test session (shared by test_notebooks and test_browser)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
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
    """``(notebook node, seconds)`` of ``notebooks/<name>.ipynb`` run top to bottom by nbclient, in a
    fresh working folder (what a notebook writes, e.g. a dataset run, stays out of the checkout and
    is not found again by the next run); the folder is removed when the tests end. A cell may take
    ``$FACTSCOPE_NOTEBOOK_TIMEOUT`` seconds (default 900)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    workdir = tempfile.mkdtemp(prefix=f"factscope-{name}-")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    saved = dict(os.environ)
    os.environ.update(kernel_env())  # the kernel inherits this process's environment
    try:
        started = time.perf_counter()
        NotebookClient(nb, timeout=int(os.environ.get("FACTSCOPE_NOTEBOOK_TIMEOUT", 900)), kernel_name="python3", store_widget_state=True,
                       resources={"metadata": {"path": workdir}}).execute()
        return nb, time.perf_counter() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)
