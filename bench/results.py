"""Benchmark results as JSON files with their provenance, for the tables in ``docs/`` and the README.

    from results import write_result          # in a bench script (bench/ is on sys.path)
    write_result("trace_speed", {"naive": {...}, "batched": {...}}, threads=2)

Every file ``bench/results/<name>.json`` holds one measurement::

    {"name": ..., "command": "python bench/trace_speed.py --facts 2", "commit": "<git HEAD>",
     "dirty": false, "date": "2026-12-02T12:00:00+00:00", "machine": {...}, "threads": 2,
     "figures": {...}}

``figures`` is what the script measured, in the shape its renderer in ``bench/render_docs.py``
reads; ``machine`` names the CPU, core count, GPU (if any), platform, Python and torch versions.
Files transcribed from earlier hand-written tables carry ``"source"`` saying so. After a bench
run, ``python bench/render_docs.py`` puts the new numbers into the docs.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tracer.files import write_json_atomic  # noqa: E402


def git_commit(root: Path = ROOT) -> tuple[str | None, bool | None]:
    """(``git rev-parse HEAD``, whether tracked files differ from it); (None, None) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head or None, dirty


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The CPU, its core count, the GPU (None without CUDA), platform, Python and torch versions."""
    info: dict[str, Any] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "gpu": None,
                            "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch  # noqa: PLC0415 (optional: aggregate_speed.py does not load torch)
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def torch_threads() -> int | None:
    """torch's intra-op thread count, or None when torch is not loaded (NumPy-only benches)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def command_line(argv: list[str] | None = None) -> str:
    """How this process was started, as a shell command with the script path relative to the checkout."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        argv[0] = str(script.resolve().relative_to(ROOT))
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def write_result(name: str, figures: dict[str, Any], *, command: str | None = None, threads: int | None = None,
                 results_dir: str | os.PathLike | None = None, **extra: Any) -> Path:
    """Write ``figures`` with their provenance to ``<results_dir>/<name>.json`` (atomically); returns the path.

    ``command`` defaults to this process's command line, ``threads`` to torch's thread count;
    ``extra`` (e.g. ``settings=...``) is stored beside them.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"result name {name!r} must be letters, digits, '_' or '-'")
    commit, dirty = git_commit()
    record = {
        "name": name,
        "command": command or command_line(),
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": threads if threads is not None else torch_threads(),
        **extra,
        "figures": figures,
    }
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(folder / f"{name}.json", record, indent=1)


def add_result_arguments(parser, default_name: str | None) -> None:
    """``--result-name`` (default ``default_name``) and ``--no-result`` for a bench script's parser."""
    parser.add_argument("--result-name", default=default_name,
                        help=f"write bench/results/NAME.json (default {default_name or 'by configuration'}); "
                             "another name leaves the documented result alone")
    parser.add_argument("--no-result", action="store_true", help="write no result file")


def save_result(args, name: str, figures: dict[str, Any], **kwargs: Any) -> Path | None:
    """:func:`write_result` unless ``args.no_result``; prints where the file went."""
    if getattr(args, "no_result", False):
        return None
    path = write_result(name, figures, **kwargs)
    print(f"result written to {path}", flush=True)
    return path


def load_result(name: str, results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The result ``<results_dir>/<name>.json`` as written by :func:`write_result`."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
