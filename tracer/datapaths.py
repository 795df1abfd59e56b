"""Where factscope finds its data files: facts, evaluation datasets, the Wikipedia corpus.

    data_file(KNOWNS)                        # $FACTSCOPE_DATA/known_1000.json, else ../shared/data/...
    data_file(KNOWNS, explicit=args.facts)   # the user's own file, when given
    data_file(COUNTERFACT, folder=data_dir)  # <data_dir>/counterfact/counterfact_2191.json

The first of these that is given wins:

1. an explicit file (a function argument or command-line option), as given;
2. an explicit data folder (a ``data_dir`` argument);
3. ``$FACTSCOPE_DATA``, a data folder the user chose;
4. the ``shared/data`` folder beside the checkout (``../shared/data`` from the repository) — used
   only when nobody but its owner can have put files there: every folder from ``/`` down to the
   file, and the file, must belong to root or to the user running factscope and must not be
   writable by others, nor by a group other than the user's own private group (a folder with the sticky bit, like ``/tmp``, may be: others can
   add entries there but not replace ours, and an entry of theirs fails the owner rule). Anything
   else is refused with a one-line :class:`~tracer.errors.DatasetError` that says to set
   ``FACTSCOPE_DATA`` or pass the path, instead of reading a file someone else may have planted.

The explicit choices (1-3) are trusted as the user gave them. A file that does not exist is
returned all the same; the caller says which file it needed.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import DatasetError

#: the environment variable naming a data folder
DATA_ENV = "FACTSCOPE_DATA"
#: data files, relative to a data folder
KNOWNS = "known_1000.json"
WIKIPEDIA = "wikipedia/enwiki_2015_3220_articles.jsonl.gz"
COUNTERFACT = "counterfact/counterfact_2191.json"
COUNTERFACT_10K = "counterfact/counterfact_edit_10k.json"
ZSRE = "zsre/zsre_mend_train_1k.json"
ROME_REFERENCE_TRACE = "rome_reference_trace.json"


def checkout_data_dir() -> Path:
    """``shared/data`` beside the checkout this package was imported from."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(relative: str, explicit: "str | os.PathLike | None" = None, *,
              folder: "str | os.PathLike | None" = None) -> Path:
    """The path of data file ``relative`` (e.g. :data:`KNOWNS`), by the order in the module docstring."""
    if explicit is not None:
        return Path(explicit)
    if folder is not None:
        return Path(folder) / relative
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return Path(env) / relative
    path = checkout_data_dir() / relative
    check_trusted(path)
    return path


def check_trusted(path: Path) -> None:
    """Refuse (:class:`DatasetError`) a fallback ``path`` that someone other than root or this user
    could have put there; the parts of ``path`` that do not exist are skipped."""
    me = os.getuid() if hasattr(os, "getuid") else None
    if me is None:  # no POSIX owners (Windows): only an explicit choice is safe
        raise DatasetError(f"cannot check who owns {path}; set {DATA_ENV} to a data folder or pass the file's path")
    chain = [p for p in (*reversed(path.parents), path)]
    real = Path(os.path.realpath(path))
    chain += [p for p in (*reversed(real.parents), real) if p not in chain]  # where symlinks lead
    for part in chain:
        try:
            st = part.lstat()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise DatasetError(f"cannot inspect {part} ({e.strerror}); set {DATA_ENV} to a data folder or pass "
                               "the file's path") from None
        problem = _untrusted(st, me)
        if problem:
            raise DatasetError(f"refusing the default data file {path}: {part} {problem}, so anyone could have put "
                               f"it there; set {DATA_ENV} to a data folder you trust or pass the file's path")


def _untrusted(st: os.stat_result, me: int) -> str:
    """Why a file or folder with status ``st`` is not safe to read data from ('' when it is)."""
    if st.st_uid not in (0, me):
        return f"belongs to another user (uid {st.st_uid})"
    if stat.S_ISLNK(st.st_mode):  # a link's own mode means nothing; its owner is checked above
        return ""
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return ""
        if not st.st_mode & stat.S_IWOTH and _private_group(st.st_gid, me):
            return ""
        return "is writable by " + ("others" if st.st_mode & stat.S_IWOTH else "its group")
    return ""


def _private_group(gid: int, me: int) -> bool:
    """Whether group ``gid`` is this user's own (a user-private group, as umask 002 systems give
    every user): named after the user and with no other members."""
    try:
        import grp
        import pwd
    except ImportError:  # not POSIX
        return False
    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(me)
    except KeyError:
        return False
    return group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}
