"""Spread work over model workers: one model per worker, loaded once; the caller writes every file.

    runner = as_runner(lm)                                   # this process, with the model given
    with RayPool("smollm2-135m", workers=2) as runner:       # a local Ray cluster (address=...: join one)
        name = runner.call(model_name)                       # one worker answers
        for done in runner.map(trace_one, items, shared=settings, desc="tracing", unit="fact"):
            save(done.key, done.result)                      # in completion order, one tqdm bar

A *task* is a module-level function ``fn(lm, payload, shared) -> result`` that runs where the
model is (here, or in a Ray actor) and leaves the model as it found it. ``items`` are
``(key, payload)`` pairs; ``shared`` goes to every task, read-only (in Ray, put once in the object
store and read once per worker, which hands the same object to each of its tasks, as this process does).
Results travel back to the caller, so no shared file system is needed: jobs keep their
resumable file formats by writing each result as it arrives.

:class:`RayPool` starts ``workers`` actors, each loading the model once (a name :func:`load_model`
accepts, or a :class:`LanguageModel` shipped through the object store): one GPU each where the
cluster has GPUs, else CPU workers whose torch thread counts split the free CPUs so they do not
fight over cores. A task that raises a :class:`FactscopeError` (bad input: it would fail the same
way again) is reported at once; any other exception, or the loss of its worker, sends the item
to a worker again, up to ``retries`` more times, then it is reported with its error. A lost
worker's items go to the others and a replacement is started (at most ``workers`` per pool).
A job that cannot go on without every result passes ``errors="raise"``: the first item that
fails for good raises its exception instead.
:class:`LocalRunner` runs the same tasks in this process, one after another, with the same bar.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Literal, Protocol, Sequence

import torch
from .progress import tqdm

from .errors import FactscopeError, WorkerError
from .limits import check_count
from .models import LanguageModel, as_model, load_model

Task = Callable[[LanguageModel, Any, Any], Any]
#: what :meth:`Runner.map` does with an item that failed for good: yield it as a :class:`Done` with
#: its ``error`` ("report"), or raise its exception and stop ("raise": a job that cannot go on
#: without every result; in this process the task's own exception, from a Ray worker its cause,
#: or :class:`WorkerError` when its workers were lost)
Errors = Literal["report", "raise"]


@dataclass(frozen=True)
class Done:
    """One finished item: its ``result``, or ``error`` (``"Type: message"``) when it failed for good."""

    key: Hashable
    result: Any = None
    error: str | None = None
    seconds: float = 0.0       # wall time of the last attempt, measured where it ran
    cpu_seconds: float = 0.0   # CPU time of the last attempt (that worker process)
    attempts: int = 1
    worker: int = 0            # the worker slot that ran the last attempt (0 in this process)

    @property
    def ok(self) -> bool:
        return self.error is None


class Runner(Protocol):
    """What jobs spread their work through: :class:`LocalRunner` or :class:`RayPool`."""

    workers: int

    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def map(self, fn: Task, items: Iterable[tuple[Hashable, Any]], *, shared: Any = None, desc: str = "",
            unit: str = "item", sizes: Sequence[int] | None = None, progress: bool = True,
            errors: Errors = "report") -> Iterator[Done]: ...


def describe_error(e: BaseException) -> str:
    """``"Type: first line of the message"``, as the failure records of every job store it."""
    return f"{type(e).__name__}: {e}"


def model_name(lm: LanguageModel) -> str:
    """A task for :meth:`Runner.call`: the model's name as the workers loaded it."""
    return lm.name


def _timed(fn: Task, lm: LanguageModel, payload: Any, shared: Any) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(lm, payload, shared)
    return result, time.perf_counter() - t0, time.process_time() - c0


def _bar(total: int, desc: str, unit: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


class LocalRunner:
    """Tasks in this process on one model, one item after another (what every job does without Ray)."""

    workers = 1

    def __init__(self, model: LanguageModel | str):
        self.lm = as_model(model)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.lm, *args)

    def map(self, fn: Task, items: Iterable[tuple[Hashable, Any]], *, shared: Any = None, desc: str = "",
            unit: str = "item", sizes: Sequence[int] | None = None, progress: bool = True,
            errors: Errors = "report") -> Iterator[Done]:
        _check_errors(errors)
        items = list(items)
        bar = _bar(sum(sizes) if sizes is not None else len(items), desc, unit, progress)
        failed = 0
        try:
            for i, (key, payload) in enumerate(items):
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    result, seconds, cpu = _timed(fn, self.lm, payload, shared)
                except Exception as e:  # reported, not fatal; KeyboardInterrupt still stops the job
                    if errors == "raise":
                        raise
                    failed += 1
                    done = Done(key, error=describe_error(e), seconds=time.perf_counter() - t0,
                                cpu_seconds=time.process_time() - c0)
                else:
                    done = Done(key, result, seconds=seconds, cpu_seconds=cpu)
                bar.update(sizes[i] if sizes is not None else 1)
                bar.set_postfix(failed=failed, refresh=False)
                yield done
        finally:
            bar.close()


def as_runner(model: "LanguageModel | str | Runner") -> "Runner":
    """A runner as given, or a :class:`LocalRunner` on the model (loaded when a name is given)."""
    return model if hasattr(model, "map") and hasattr(model, "call") else LocalRunner(model)


class _Worker:
    """The Ray actor: one model, loaded once by :meth:`load`, then tasks one at a time."""

    def __init__(self, model: "LanguageModel | str", device: str, threads: int, load_options: dict):
        self.model, self.device, self.threads, self.load_options = model, device, threads, load_options
        self.lm: LanguageModel | None = None
        self.shared_id, self.shared = None, None  # the map's shared object, read once per worker

    def load(self) -> dict:
        torch.set_num_threads(self.threads)
        if isinstance(self.model, LanguageModel):
            self.lm = self.model
            self.lm.model.to(self.device)
        else:
            self.lm = load_model(self.model, device=self.device, **self.load_options)
        self.model = None
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.lm.device),
                "threads": torch.get_num_threads(), "model": self.lm.name}

    def run(self, fn: Task, payload: Any, shared_box: list) -> tuple[Any, float, float]:
        """``shared_box``: ``[ref]`` of the map's ``shared`` (boxed, so Ray hands the reference
        over instead of a fresh copy per task: key statistics of a 7B model are gigabytes)."""
        import ray

        [ref] = shared_box
        if ref.hex() != self.shared_id:
            self.shared, self.shared_id = ray.get(ref), ref.hex()
        return _timed(fn, self.lm, payload, self.shared)

    def call(self, fn: Callable[..., Any], args: tuple) -> Any:
        return fn(self.lm, *args)


class RayPool:
    """``workers`` Ray actors with one model each; a :class:`Runner` (use as a context manager).

    ``address=None`` starts a local Ray cluster on this machine (stopped on close); an address
    (``"HOST:6379"``, ``"auto"``) joins a running one. In a process already connected to Ray the
    pool uses that connection. ``workers`` defaults to the cluster's free GPUs, else its free
    CPUs; ``device`` (``"cpu"``, ``"cuda"``; default: GPUs where the cluster has them);
    ``threads`` per CPU worker defaults to the free CPUs divided among the workers. Workers that
    do not fit the cluster are refused at once; those that wait for resources others hold start
    when they are freed, or fail after ``load_timeout`` seconds.
    """

    def __init__(self, model: "LanguageModel | str", *, workers: int | None = None, address: str | None = None,
                 device: str | None = None, threads: int | None = None, retries: int = 2,
                 load_timeout: float = 900.0, load_options: dict | None = None):
        if workers is not None:
            check_count("workers", workers, (1, 4096))
        if threads is not None:
            check_count("threads", threads, (1, 4096))
        check_count("retries", retries, (0, 100))
        self.model, self.address, self.device, self.threads = model, address, device, threads
        self.requested, self.retries, self.load_timeout = workers, retries, load_timeout
        self.load_options = dict(load_options or {})  # load_model's other options (dtype, ...) on every worker
        self.workers = 0
        self.info: list[dict] = []       # per slot: host, pid, device, threads, model (of the live actor)
        self._actors: list = []
        self._live: list[bool] = []
        self._loading: dict = {}         # load ObjectRef -> slot (replacements starting)
        self._owns_ray = False
        self._spare = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "RayPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise WorkerError("--ray needs Ray on this machine and on every worker: pip install ray") from None
        try:
            if not ray.is_initialized():
                local = self.address is None
                ray.init(address="local" if local else self.address, include_dashboard=False,
                         num_cpus=max(_local_cpus(), self.requested or 1) if local else None,
                         logging_level=logging.WARNING)
                self._owns_ray = True
            self._start_actors(ray)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, ray) -> None:
        total, free = ray.cluster_resources(), ray.available_resources()
        cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
        free_cpus, free_gpus = int(free.get("CPU", 0)), int(free.get("GPU", 0))
        gpu = self.device.startswith("cuda") if self.device else gpus > 0
        self.workers = self.requested or (max(1, free_gpus) if gpu else max(1, free_cpus))
        threads = self.threads or max(1, free_cpus // self.workers)
        need_gpu, need_cpu = (self.workers, self.workers) if gpu else (0, self.workers * threads)
        if need_gpu > gpus or need_cpu > cpus:
            raise WorkerError(f"{self.workers} workers need {need_cpu} CPUs and {need_gpu} GPUs but the Ray cluster "
                              f"has {cpus} CPUs and {gpus} GPUs; pass fewer --workers")
        shipped = ray.put(self.model) if isinstance(self.model, LanguageModel) else self.model
        self._options = dict(num_cpus=1 if gpu else threads, num_gpus=1 if gpu else 0, max_restarts=0)
        self._args = (shipped, "cuda" if gpu else (self.device or "cpu"), 1 if gpu else threads, self.load_options)
        self._spare = self.workers
        for _ in range(self.workers):
            self._actors.append(ray.remote(_Worker).options(**self._options).remote(*self._args))
            self._live.append(False)
            self.info.append({})
        loads = [a.load.remote() for a in self._actors]
        ready, _ = ray.wait(loads, num_returns=len(loads), timeout=self.load_timeout)
        if len(ready) < len(loads):
            raise WorkerError(f"only {len(ready)} of {self.workers} workers started within {self.load_timeout:.0f} s; "
                              "the cluster may lack the CPUs or GPUs each worker needs on one node")
        for slot, ref in enumerate(loads):
            try:
                self.info[slot] = _unwrap(ray, ref)
            except ray.exceptions.RayActorError as e:
                reason = (str(e).splitlines() or [""])[0][:200]
                raise WorkerError(f"Ray worker {slot + 1} of {self.workers} died while loading the model ({reason}); "
                                  "see the worker logs above") from None
            self._live[slot] = True

    def close(self) -> None:
        """Stop the workers (and the local cluster this pool started)."""
        try:
            import ray
        except ImportError:
            return
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self._actors, self._live, self._loading = [], [], {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    @property
    def live_workers(self) -> int:
        return sum(self._live)

    # ------------------------------------------------------------------ work

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(lm, *args)`` on one live worker; its exception is raised here (a lost worker: the next)."""
        import ray
        from ray.exceptions import RayActorError

        for slot in [s for s, live in enumerate(self._live) if live]:
            try:
                return _unwrap(ray, self._actors[slot].call.remote(fn, args))
            except RayActorError:
                self._lost(ray, slot)
        raise WorkerError("no Ray worker is left to run the job; see the worker logs above")

    def map(self, fn: Task, items: Iterable[tuple[Hashable, Any]], *, shared: Any = None, desc: str = "",
            unit: str = "item", sizes: Sequence[int] | None = None, progress: bool = True,
            errors: Errors = "report") -> Iterator[Done]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        _check_errors(errors)
        items = list(items)
        shared_ref = ray.put(shared)
        queue, attempts = deque(range(len(items))), [0] * len(items)
        running: dict = {}          # ObjectRef -> (slot, item index)
        busy: set[int] = set()
        failed = retried = 0
        bar = _bar(sum(sizes) if sizes is not None else len(items), desc, unit, progress)
        try:
            while queue or running:
                for slot in range(len(self._actors)):
                    if queue and self._live[slot] and slot not in busy:
                        i = queue.popleft()
                        running[self._actors[slot].run.remote(fn, items[i][1], [shared_ref])] = (slot, i)
                        busy.add(slot)
                if not running:
                    if not self._loading:
                        raise WorkerError(f"every Ray worker was lost with {len(queue)} items left; "
                                          "see the worker logs above")
                    self._await_replacement(ray)
                    continue
                [ref], _ = ray.wait(list(running) + list(self._loading), num_returns=1)
                if ref in self._loading:
                    self._replacement_ready(ray, ref)
                    continue
                slot, i = running.pop(ref)
                busy.discard(slot)
                attempts[i] += 1
                key, again, cause = items[i][0], False, None
                try:
                    result, seconds, cpu = ray.get(ref)
                    done = Done(key, result, seconds=seconds, cpu_seconds=cpu, attempts=attempts[i], worker=slot)
                except RayTaskError as e:
                    cause = e.cause if isinstance(e.cause, BaseException) else e
                    done = Done(key, error=describe_error(cause), attempts=attempts[i], worker=slot)
                    again = not isinstance(cause, FactscopeError)
                except RayActorError as e:
                    self._lost(ray, slot)
                    reason = (str(e).splitlines() or [""])[0][:200]
                    done = Done(key, error=f"WorkerError: worker lost ({reason})", attempts=attempts[i], worker=slot)
                    again = True
                if again and attempts[i] <= self.retries:
                    queue.appendleft(i)
                    retried += 1
                    continue
                if errors == "raise" and not done.ok:
                    if isinstance(cause, BaseException):
                        raise cause from None
                    raise WorkerError(f"item {key!r}: {done.error}")
                failed += not done.ok
                bar.update(sizes[i] if sizes is not None else 1)
                bar.set_postfix(workers=self.live_workers, retried=retried, failed=failed, refresh=False)
                yield done
        finally:
            bar.close()

    # ------------------------------------------------------------------ lost workers

    def _lost(self, ray, slot: int) -> None:
        """Mark a worker dead and start a replacement in its slot (while the pool has spares)."""
        if not self._live[slot]:
            return
        self._live[slot] = False
        self.info[slot] = {}
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:
            pass
        if self._spare > 0:
            self._spare -= 1
            self._actors[slot] = ray.remote(_Worker).options(**self._options).remote(*self._args)
            self._loading[self._actors[slot].load.remote()] = slot

    def _replacement_ready(self, ray, ref) -> None:
        slot = self._loading.pop(ref)
        try:
            self.info[slot] = _unwrap(ray, ref)
            self._live[slot] = True
        except Exception:  # the replacement could not load: the slot stays empty
            pass

    def _await_replacement(self, ray) -> None:
        [ref], _ = ray.wait(list(self._loading), num_returns=1)
        self._replacement_ready(ray, ref)


def _check_errors(errors: str) -> None:
    if errors not in ("report", "raise"):
        raise ValueError(f"errors must be 'report' or 'raise', got {errors!r}")


def _local_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _unwrap(ray, ref) -> Any:
    """``ray.get(ref)``, raising a task's own exception (a one-line FactscopeError stays one line)."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        if isinstance(e.cause, BaseException):
            raise e.cause from None
        raise
