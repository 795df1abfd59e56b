"""tracer.spread on a 2-worker local Ray cluster: the files of one process, lost workers, retries, resumes.

One cluster (4 logical CPUs) and one pool of two workers serve the whole module, to keep its
start-up (some seconds) out of every test.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import tracer.dataset_trace as dt
from tracer.errors import DatasetError, ModelNotFoundError
from tracer.spread import LocalRunner, RayPool, model_name
from tracer.stats import StatsCache, compute_key_statistics

ray = pytest.importorskip("ray")

FACTS = [
    {"known_id": 10, "subject": "The city", "prompt": "The city of London is"},
    {"known_id": 11, "subject": "Paris", "prompt": "Paris is the capital of"},
    {"known_id": 12, "subject": "missing", "prompt": "a prompt without the subject"},  # fails: subject absent
    {"known_id": 13, "subject": "the river", "prompt": "He swam in the river"},
    {"known_id": 14, "subject": "music", "prompt": "The music was"},
    {"known_id": 15, "subject": "A dog", "prompt": "A dog was seen near the house"},
]
SETTINGS = dict(kinds=("hidden", "mlp"), samples=2, noise=0.5, progress=False)
TEXTS = ["The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. " * 4,
         "Rome is the capital city of Italy and a special comune. " * 5,
         "The Louvre is the world's most-visited museum, and a historic landmark in Paris. " * 4]


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_model

    return make_tiny_model("gpt2", n_layers=3)


@pytest.fixture(scope="module")
def pool(tiny):
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests' tasks
    try:
        with RayPool(tiny, workers=2, threads=1) as p:  # the model object travels to both workers
            yield p
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def runs(tiny, pool, tmp_path_factory):
    """The same facts traced in this process and on the pool."""
    here, spread = tmp_path_factory.mktemp("here"), tmp_path_factory.mktemp("spread")
    return (here, dt.trace_dataset(tiny, FACTS, here, **SETTINGS)), (spread, dt.trace_dataset(pool, FACTS, spread, **SETTINGS))


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "log.jsonl"}


def assert_same_json(a, b, tol: float = 1e-6, where: str = "") -> None:
    """Same keys, texts and shapes; numbers equal up to ``tol`` (float summation order across thread counts)."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_json(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_json(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), f"{where}: {a} != {b}"
    else:
        assert a == b, where


def assert_same_run(a: Path, b: Path) -> None:
    files_a, files_b = snapshot(a), snapshot(b)
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        assert_same_json(json.loads(files_a[name]), json.loads(files_b[name]), where=name)


def test_trace_dataset_on_two_workers_writes_the_files_of_one_process(runs):
    (here, local), (spread, pooled) = runs
    assert (pooled.selected, pooled.traced, pooled.failed) == (local.selected, local.traced, local.failed) == (6, 5, 1)
    assert (spread / "run.json").read_bytes() == (here / "run.json").read_bytes()
    assert (spread / "failed" / "12.json").read_bytes() == (here / "failed" / "12.json").read_bytes()
    assert_same_run(here, spread)
    log = [json.loads(line) for line in (spread / "log.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in log) == [f["known_id"] for f in FACTS]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in log if r["status"] == "ok")


def test_interrupted_ray_run_resumes_to_identical_files(tiny, pool, runs, tmp_path, monkeypatch):
    _, (whole, _) = runs
    out = tmp_path / "resumed"
    real, saved = dt._save, []

    def interrupted_at_third(path, data):
        if Path(path).parent.name == "facts":
            if len(saved) == 2:
                raise KeyboardInterrupt  # Ctrl-C in the driver between two writes
            saved.append(path)
        real(path, data)

    monkeypatch.setattr(dt, "_save", interrupted_at_third)
    with pytest.raises(KeyboardInterrupt):
        dt.trace_dataset(pool, FACTS, out, **SETTINGS)
    monkeypatch.setattr(dt, "_save", real)
    assert len(list((out / "facts").glob("*.json"))) == 2
    summary = dt.trace_dataset(pool, FACTS, out, **SETTINGS)
    assert summary.already_done >= 2 and summary.already_done + summary.traced + summary.failed == len(FACTS)
    assert snapshot(out) == snapshot(whole)  # same workers, same thread count: the same bytes


def _pid_after(lm, seconds, shared):
    time.sleep(seconds)
    return os.getpid()


def _dies_once(lm, item, marker_dir):
    """Kills its own worker the first time it sees item 3."""
    marker = Path(marker_dir) / str(item)
    if item == 3 and not marker.exists():
        marker.touch()
        os._exit(1)
    return item * item


def test_a_killed_workers_items_are_finished_by_the_other(pool, tmp_path):
    assert [info["threads"] for info in pool.info] == [1, 1]  # CPU workers split the cores
    done = list(pool.map(_dies_once, [(i, i) for i in range(6)], shared=str(tmp_path), progress=False))
    assert sorted(d.key for d in done) == list(range(6)) and all(d.ok for d in done)
    assert [d.result for d in sorted(done, key=lambda d: d.key)] == [i * i for i in range(6)]
    assert {d.key: d.attempts for d in done}[3] == 2
    wait_for_both(pool)  # the pool started a replacement; some more work and both slots serve again
    # kill -9 of a worker from outside while the work runs; its item goes to the other worker
    results, victim = [], None
    for d in pool.map(_pid_after, [(i, 0.3) for i in range(8)], progress=False):
        results.append(d)
        if victim is None:
            victim = pool.info[1 - d.worker]["pid"]
            os.kill(victim, signal.SIGKILL)
    assert sorted(d.key for d in results) == list(range(8)) and all(d.ok for d in results)
    pids = [d.result for d in results]
    assert pids.count(victim) <= 1 and max(d.attempts for d in results) == 2  # its item was sent again
    wait_for_both(pool)
    assert pool.call(model_name) == "tiny-gpt2"


def wait_for_both(pool: RayPool) -> None:
    deadline = time.monotonic() + 120
    while pool.live_workers < 2 and time.monotonic() < deadline:
        list(pool.map(_pid_after, [(0, 0.05)], progress=False))
    assert pool.live_workers == 2


def _flaky(lm, item, marker_dir):
    kind, name = item
    marker = Path(marker_dir) / name
    if kind == "bad input":
        raise DatasetError(f"{name} is malformed")
    if kind == "always" or not marker.exists():
        marker.touch()
        raise RuntimeError(f"{name} failed")
    return name


def test_failed_work_is_retried_and_bad_input_is_not(pool, tmp_path):
    items = [("a", ("once", "a")), ("b", ("bad input", "b")), ("c", ("always", "c"))]
    done = {d.key: d for d in pool.map(_flaky, items, shared=str(tmp_path), progress=False)}
    assert done["a"].ok and done["a"].result == "a" and done["a"].attempts == 2
    assert (done["b"].error, done["b"].attempts) == ("DatasetError: b is malformed", 1)
    assert (done["c"].error, done["c"].attempts) == ("RuntimeError: c failed", 1 + pool.retries)



def test_local_runner_reports_errors_at_once(tiny, tmp_path):
    items = [("a", ("once", "a")), ("b", ("bad input", "b"))]
    done = list(LocalRunner(tiny).map(_flaky, items, shared=str(tmp_path), progress=False))
    assert [(d.key, d.error, d.attempts, d.worker) for d in done] == [
        ("a", "RuntimeError: a failed", 1, 0), ("b", "DatasetError: b is malformed", 1, 0)]


def test_key_statistics_over_two_workers_equal_one_process(tiny, pool, tmp_path):
    n, layer = 300, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the keys are then the same floats
    try:
        here = compute_key_statistics(tiny, layer, n, TEXTS, corpus_name="three", chunk_tokens=32, progress=False)
    finally:
        torch.set_num_threads(threads)
    spread = compute_key_statistics(pool, layer, n, TEXTS, corpus_name="three", chunk_tokens=32, progress=False)
    assert spread.to_dict() == here.to_dict() and spread.n_tokens == n
    assert torch.allclose(spread.mom2, here.mom2, rtol=1e-12, atol=1e-15)
    cache = StatsCache(tmp_path)
    first = cache.get(pool, layer, n, TEXTS, corpus_name="three", chunk_tokens=32, progress=False)
    again = cache.get(tiny, layer, n, TEXTS, corpus_name="three", chunk_tokens=32, progress=False)  # the same key
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and torch.equal(first.mom2, again.mom2)


def test_cli_trace_dataset_with_ray(tiny, pool, runs, tmp_path, capsys):
    from tracer.cli import main

    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    common = ["trace-dataset", "--model", str(model_dir), "--facts", str(facts), "--kind", "hidden,mlp", "--samples",
              "2", "--noise", "0.5", "--n-boot", "0", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    # joins this process's cluster (2 CPUs left free by the module's pool): two more workers
    assert main([*common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    assert "5 traced, 1 failed" in capsys.readouterr().out
    assert_same_run(tmp_path / "plain", tmp_path / "ray")
    assert main([*common, "--out", str(tmp_path / "more"), "--ray", "--workers", "5"]) == 2
    assert "5 workers need 5 CPUs and 0 GPUs but the Ray cluster has 4 CPUs" in capsys.readouterr().err
    with pytest.raises(ModelNotFoundError):
        RayPool(str(tmp_path / "no-model"), workers=1).start()


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_trace_dataset_with_ray_equals_without(shared_data, tmp_path):
    """`factscope trace-dataset --facts F --kind hidden --samples 3 --ray --workers 2` writes the
    facts/*.json of the same command without --ray (bytes equal where the thread counts are)."""
    from tracer.cli import main

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(json.loads((shared_data / "known_1000.json").read_text())[:4]))
    common = ["trace-dataset", "--facts", str(facts), "--kind", "hidden", "--samples", "3", "--n-boot", "0"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    assert_same_run(tmp_path / "plain", tmp_path / "ray")
    assert len(list((tmp_path / "ray" / "facts").glob("*.json"))) == 4
