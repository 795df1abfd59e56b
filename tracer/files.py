"""The one writer for every file factscope writes: a file is its old version or the whole new one.

    write_json_atomic("out/run.json", settings, exclusive=True)   # FileExistsError if it is there
    write_text_atomic("report.html", html)
    save_safetensors_atomic("edits.safetensors", tensors, metadata)
    with open_append("out/log.jsonl") as f: f.write(line)          # the one append-only writer
    write_directory_atomic("cache/model", lambda d: model.save_pretrained(d))   # a whole folder

:func:`write_atomic` creates its temporary file *exclusively* beside the target
(``O_CREAT | O_EXCL | O_NOFOLLOW``: a planted file or symlink is never opened, let alone written
through) under a name no other process can predict, writes through that one descriptor, fsyncs,
and renames it into place — or links it, for ``exclusive=True``, so that of two processes creating
the same file exactly one succeeds. A symlink at the target is replaced, never followed. Files get
the mode the process's umask gives (``0o666 & ~umask``), as ``open()`` would.

A temporary name carries its writer's host and process (``.<name>~<host>~<pid>~<random>.tmp``), so
a resumed run can tell a stray file of a killed writer from one a live process is still writing,
also when machines share a folder (:func:`stray_writer_dead`).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch
from safetensors.torch import save as safetensors_bytes

#: a temporary file of another host is taken for a leftover once it is this old (seconds)
STALE_AFTER = 3600.0

_TEMP = re.compile(r"^\.(?P<name>.*)~(?P<host>[A-Za-z0-9_.-]+)~(?P<pid>\d+)~(?P<token>[0-9a-f]+)\.tmp$")
#: no system gives a process a larger id (Linux's highest pid_max)
_PID_MAX = 4_194_304
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@lru_cache(maxsize=1)
def host_id() -> str:
    """This machine as it names itself in temporary files: host name plus boot id.

    The boot id changes at every reboot, so files left before one are judged by age, as another
    host's are: their pids mean nothing any more.
    """
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        boot = ""
    return f"{host}-{boot}" if boot else host


def temporary_name(path: Path) -> Path:
    """A fresh, unpredictable ``dir/.<name>~<host>~<pid>~<random>.tmp`` for ``dir/<name>``."""
    return path.with_name(f".{path.name[:120]}~{host_id()}~{os.getpid()}~{secrets.token_hex(8)}.tmp")


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Open a new temporary file beside ``path`` for writing; never an existing file or symlink."""
    for _ in range(100):
        tmp = temporary_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there (FileExistsError otherwise)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name first, then rename onto it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _CLOEXEC, 0o666))
        os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, exclusive: bool = False,
                 fsync: bool = True) -> Path:
    """Call ``write(f)`` on a new temporary file beside ``path``, then put it in place.

    ``exclusive=True`` raises :class:`FileExistsError` when ``path`` exists (also when another
    process creates it first). ``fsync`` (default on) flushes the file and then its folder, so a
    crash leaves the old or the new file. On any error the temporary file is removed and ``path``
    is left as it was. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exclusive and os.path.lexists(path):
        raise FileExistsError(f"{path} exists")
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
        if fsync:
            _fsync_directory(path.parent)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, exclusive: bool = False, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(data), exclusive=exclusive, fsync=fsync)


def write_text_atomic(path: str | os.PathLike, text: str, *, exclusive: bool = False, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"), exclusive=exclusive, fsync=fsync)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = None, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None, exclusive: bool = False,
                      fsync: bool = True) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``json.dumps`` options passed through).

    The JSON is made before any file is touched, so an unserialisable object leaves no trace.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return write_text_atomic(path, text, exclusive=exclusive, fsync=fsync)


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                            *, exclusive: bool = False, fsync: bool = True) -> Path:
    """Write ``tensors`` + ``metadata`` as a safetensors file to ``path`` atomically."""
    return write_bytes_atomic(path, safetensors_bytes(tensors, metadata=metadata), exclusive=exclusive, fsync=fsync)


def write_directory_atomic(target: str | os.PathLike, fill: Callable[[Path], None], *, exist_ok: bool = False) -> Path:
    """Call ``fill(folder)`` on a new, empty folder beside ``target``, then rename it to ``target``.

    For what a library writes as a whole folder (``save_pretrained``): readers see no folder or the
    complete one. The folder is created exclusively under an unpredictable name with the umask's
    mode; its files are fsynced before the rename. When ``target`` exists (or another process puts
    it there first) this raises :class:`FileExistsError`, or with ``exist_ok=True`` returns it as
    it is: nothing already there is ever removed or written into.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        if exist_ok:
            return target
        raise FileExistsError(f"{target} exists")
    for _ in range(100):
        tmp = temporary_name(target)
        try:
            os.mkdir(tmp, 0o777)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary folder beside {target}")
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        try:
            os.rename(tmp, target)
        except OSError:  # somebody else's folder (or file) is there now
            if not os.path.lexists(target):
                raise
            if exist_ok:
                return target
            raise FileExistsError(f"{target} exists") from None
        _fsync_directory(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def open_append(path: str | os.PathLike) -> Iterator[IO[str]]:
    """An append-only text log (UTF-8, line-buffered): created if missing, never through a symlink.

    Each ``write`` of a whole line lands in one ``write(2)`` with ``O_APPEND``, so lines of
    concurrent writers do not interleave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NO_FOLLOW | _CLOEXEC, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8", buffering=1) as f:
        yield f


def stray_writer_dead(tmp: Path, *, stale_after: float = STALE_AFTER) -> bool:
    """Whether a temporary file is a leftover, safe to delete, rather than one a live writer holds.

    A file of this host (and boot) is a leftover when its pid no longer runs (or is this process,
    or is no valid pid). A file of another host, or in a form that names no host, is judged by age:
    a leftover once it has not been written for ``stale_after`` seconds.
    """
    m = _TEMP.match(tmp.name)
    if m is None or m["host"] != host_id():
        try:
            age = time.time() - tmp.lstat().st_mtime
        except FileNotFoundError:
            return True
        return age > stale_after
    pid = int(m["pid"])
    if pid <= 0 or pid > _PID_MAX or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
