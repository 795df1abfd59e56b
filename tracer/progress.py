"""Progress and cancellation of long work: the engine's progress bar, and one way to watch and stop it.

    from tracer.progress import tqdm                   # every loop of the engine: tqdm.auto's bar
    for batch in tqdm(batches, desc="trace mlp", disable=not progress): ...

    stop = threading.Event()
    with watching(lm, on_step=lambda s: print(s.desc, s.n, s.total), stop=stop):
        rome_edit(lm, request)     # raises Cancelled soon after stop.set()

A watcher belongs to the thread that entered :func:`watching` (a context variable), so a panel
that runs work in a thread of its own watches only that work. Each bar of the engine reports every
step to it, also a bar hidden with ``progress=False``. ``stop`` is checked at every step of a bar
and after every transformer block of every forward pass of the model (one hook per block, through
:func:`tracer.hooks.hooked`), so work stops within one block's time. :class:`Cancelled` then
propagates like any error: hooks are removed and edits applied for the duration of a block
(:func:`tracer.edit.edited`, a ledger's ``with``) are reverted, so the weights are those before.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

from tqdm.auto import tqdm as _auto_tqdm

from .errors import Cancelled
from .hooks import hooked
from .models import LanguageModel, as_model


@dataclass(frozen=True)
class Step:
    """One step of a bar: its description, the steps done and how many there are (None: unknown)."""

    desc: str
    n: int
    total: int | None


class _Watch:
    def __init__(self, on_step: Callable[[Step], None] | None, stop: threading.Event | None):
        self.on_step, self.stop = on_step, stop

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Cancelled("cancelled; nothing was changed")

    def step(self, step: Step) -> None:
        if self.on_step is not None:
            self.on_step(step)
        self.check()


_WATCH: ContextVar[_Watch | None] = ContextVar("factscope_watch", default=None)


class tqdm(_auto_tqdm):  # noqa: N801 (the name every tqdm user expects)
    """tqdm.auto's bar that also reports each step to this thread's watcher (:func:`watching`),
    and raises :class:`Cancelled` there once the watcher's ``stop`` is set."""

    def __init__(self, iterable=None, *args, **kwargs):
        self._fs_watch = _WATCH.get()
        self._fs_desc = str(kwargs.get("desc", args[0] if args else "") or "")
        self._fs_count = int(kwargs.get("initial", 0) or 0)
        super().__init__(iterable, *args, **kwargs)
        if self._fs_watch is not None:
            self._fs_watch.step(Step(self._fs_desc, self._fs_count, self.total))

    def __iter__(self):
        if self._fs_watch is None:
            yield from super().__iter__()
            return
        for obj in super().__iter__():
            yield obj  # the caller's step runs here; it is done when the next item is asked for
            self._fs_report(1)

    def update(self, n=1):
        out = super().update(n)
        if self._fs_watch is not None:
            self._fs_report(n)
        return out

    def _fs_report(self, n) -> None:
        self._fs_count += n
        self._fs_watch.step(Step(self._fs_desc, int(self._fs_count), self.total))


@contextmanager
def watching(model: "LanguageModel | str", *, on_step: Callable[[Step], None] | None = None,
             stop: threading.Event | None = None) -> Iterator[None]:
    """Inside the block, in this thread: every step of the engine's bars goes to ``on_step``, and
    once ``stop`` is set the work raises :class:`Cancelled` at its next step or transformer block
    of ``model``. Watching blocks nest (the innermost watcher is the one used)."""
    lm = as_model(model)
    watch = _Watch(on_step, stop)
    token = _WATCH.set(watch)

    def check(_h):
        watch.check()

    try:
        watch.check()
        with hooked(lm.model, outputs={lm.layers.block_name(i): check for i in range(lm.n_layers)}):
            yield
    finally:
        _WATCH.reset(token)
