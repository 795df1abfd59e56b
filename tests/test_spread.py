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
import tracer.limits as limits
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


def test_map_raises_the_first_failure_for_good_when_asked(tiny, pool, tmp_path):
    for runner in (LocalRunner(tiny), pool):
        with pytest.raises(DatasetError, match="^b is malformed$"):
            list(runner.map(_flaky, [("b", ("bad input", "b"))], shared=str(tmp_path), progress=False, errors="raise"))
        with pytest.raises(RuntimeError, match="^c failed$"):  # the pool: after its retries
            list(runner.map(_flaky, [("c", ("always", "c"))], shared=str(tmp_path), progress=False, errors="raise"))


_KEPT: list = []  # in each worker: every shared object a task saw, alive, so no two share an id


def _shared_seen(lm, item, shared):
    _KEPT.append(shared)
    time.sleep(0.05)
    return os.getpid(), id(shared), float(shared["C"].sum())


def test_each_worker_reads_the_shared_object_once_per_map(pool):
    wait_for_both(pool)
    for scale in (1.0, 2.0):  # a second map ships its own shared object
        shared = {"C": torch.full((256, 256), scale, dtype=torch.float64)}
        done = list(pool.map(_shared_seen, [(i, i) for i in range(8)], shared=shared, progress=False))
        seen = {}
        for d in done:
            pid, ident, total = d.result
            seen.setdefault(pid, set()).add(ident)
            assert total == 256 * 256 * scale
        assert len(seen) == 2 and all(len(ids) == 1 for ids in seen.values())  # one copy per worker, not per task


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


def test_cli_trace_dataset_with_ray(tiny, pool, runs, tmp_path, capsys, monkeypatch):
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
    # the CPU check, whatever memory this machine has free (5 planned workers need ~20 GB)
    monkeypatch.setattr(limits, "available_memory", lambda device="cpu": 1 << 40)
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


# ---------------------------------------------------------------------------- evaluate --ray

def _counterfact(n: int) -> list[dict]:
    subjects = ["The tower", "The river Nile", "Paris", "A dog", "The museum"]
    targets = [("Rome", "Paris"), ("Berlin", "Cairo"), ("Tokyo", "France"), ("London", "Texas"), ("Madrid", "Oslo")]
    return [{"case_id": 20 + i, "pararel_idx": i,
             "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P1", "subject": subjects[i],
                                   "target_new": {"str": targets[i][0], "id": "Q1"},
                                   "target_true": {"str": targets[i][1], "id": "Q2"}},
             "paraphrase_prompts": [f"People say that {subjects[i]} is in"],
             "neighborhood_prompts": ["The museum is located in", "The bridge is located in"],
             "attribute_prompts": ["The forum is located in"],
             "generation_prompts": [f"{subjects[i]} is famous for"]} for i in range(n)]


#: the options of each method: C over 300 tokens of the shared corpus (read through the runner),
#: few optimisation steps; MEMIT's z one request per chunk, so a batch's z spread over both workers
EVAL_METHODS = {
    "rome": {"layer": 1, "stats_tokens": 300, "v_num_grad_steps": 5, "context_template_lengths": ((4, 2),)},
    "ft-l": {"layer": 1, "steps": 3, "lr": 1e-2, "norm_constraint": 1e-2},
    "memit": {"layers": (1, 2), "mom2_n_tokens": 300, "v_steps": 5, "chunk_requests": 1,
              "context_templates_per_start": 0},
    "alphaedit": {"layers": (1, 2), "mom2_n_tokens": 300, "v_steps": 5, "chunk_requests": 1,
                  "context_templates_per_start": 0, "nullspace_threshold": 1e-2, "threshold_mode": "relative"},
}


def evaluate_run(model, method: str, out: Path, data: Path, **extra):
    """``run_evaluation`` of ``method`` with its own statistics cache (C read anew by each runner)."""
    from tracer.evaluate import Tfidf, run_evaluation
    from tracer.stats import StatsCache

    options = {**EVAL_METHODS[method]}
    if method != "ft-l":
        options["stats"] = StatsCache(out.parent / f"{out.name}-stats")
    tfidf = Tfidf.fit(["The forum is located in Rome", "Paris is a city", "The tower is famous"])
    return run_evaluation(model, method, "counterfact", out, data_path=data, batch_size=None, tfidf=tfidf,
                          generation=method == "rome", generation_length=12, greedy_tokens=4,
                          method_options=options, progress=False, **extra)


def case_files(out: Path) -> dict[str, dict]:
    """The case files without their timings (wall seconds differ from run to run)."""
    files = {}
    for p in sorted((out / "cases").glob("*.json")):
        data = json.loads(p.read_text())
        data.pop("seconds")
        files[p.name] = data
    return files


@pytest.fixture(scope="module")
def cf_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cf") / "cf.json"
    path.write_text(json.dumps(_counterfact(4)))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """This process computes with the workers' thread count: the same floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", list(EVAL_METHODS))
def test_evaluate_on_two_workers_writes_the_case_files_of_one_process(tiny, pool, cf_data, one_thread, method,
                                                                      tmp_path):
    weights = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    here = evaluate_run(tiny, method, tmp_path / "here", cf_data)
    spread = evaluate_run(pool, method, tmp_path / "spread", cf_data)
    assert all(torch.equal(weights[k], v) for k, v in tiny.model.state_dict().items())
    assert (tmp_path / "spread" / "settings.json").read_bytes() == (tmp_path / "here" / "settings.json").read_bytes()
    files = case_files(tmp_path / "here")
    assert sorted(files) == [f"{20 + i}.json" for i in range(4)]
    assert_same_json(files, case_files(tmp_path / "spread"))
    assert spread["n_cases"] == here["n_cases"] == 4 and spread["post"].keys() == here["post"].keys()
    assert here["post"]["EM"]["mean"] != here["pre"]["EM"]["mean"]  # the edits were in place
    if method in ("memit", "alphaedit"):  # the batch's z: one checkpoint file per chunk, written by this process
        assert len(list((tmp_path / "spread" / "z").glob("z-*.safetensors"))) == 4
    if method == "rome":
        assert files["20.json"]["post"]["generation"]["texts"][0].startswith("The tower is famous for")


def _evaluate_where(lm, payload, job):
    """evaluate_batch, each case marked with the worker process that ran it."""
    from tracer.evaluate.work import evaluate_batch

    return [{**result, "pid": os.getpid()} for result in evaluate_batch(lm, payload, job)]


def test_evaluate_finishes_a_killed_workers_cases(tiny, cf_data, one_thread, tmp_path, monkeypatch):
    import tracer.evaluate.harness as harness

    here = evaluate_run(tiny, "rome", tmp_path / "here", cf_data)
    real, killed, pids = harness._write_json, [], []

    def kill_the_other_worker_at_first_case(path, obj):
        if Path(path).parent.name == "cases":
            pids.append(obj.pop("pid"))
            if not killed:  # the other worker is busy with a case: it goes to this one
                killed.append(next(info["pid"] for info in own.info if info["pid"] != pids[0]))
                os.kill(killed[0], signal.SIGKILL)
        real(path, obj)

    monkeypatch.setattr(harness, "_write_json", kill_the_other_worker_at_first_case)
    monkeypatch.setattr(harness, "evaluate_batch", _evaluate_where)
    with RayPool(tiny, workers=2, threads=1) as own:  # its own pool: the module's has no spare workers left
        spread = evaluate_run(own, "rome", tmp_path / "spread", cf_data)
    assert killed and killed[0] not in pids and len(pids) == 4
    assert spread["n_cases"] == here["n_cases"] == 4
    assert_same_json(case_files(tmp_path / "here"), case_files(tmp_path / "spread"))


def test_interrupted_evaluate_ray_run_resumes_with_or_without_ray(tiny, pool, cf_data, one_thread, tmp_path,
                                                                  monkeypatch):
    import tracer.evaluate.harness as harness

    whole = tmp_path / "whole"
    evaluate_run(tiny, "rome", whole, cf_data)
    real = harness._write_json
    for first, then in ((pool, tiny), (tiny, pool)):
        out, written = tmp_path / f"{type(first).__name__}-then-{type(then).__name__}", []

        def interrupted_at_third(path, obj):
            if Path(path).parent.name == "cases":
                if len(written) == 2:
                    raise KeyboardInterrupt  # Ctrl-C in the driver between two case files
                written.append(path)
            real(path, obj)

        monkeypatch.setattr(harness, "_write_json", interrupted_at_third)
        with pytest.raises(KeyboardInterrupt):
            evaluate_run(first, "rome", out, cf_data)
        monkeypatch.setattr(harness, "_write_json", real)
        assert len(list((out / "cases").glob("*.json"))) == 2
        summary = evaluate_run(then, "rome", out, cf_data)
        assert summary["n_cases"] == 4
        assert_same_json(case_files(whole), case_files(out))


def test_cli_evaluate_with_ray(tiny, pool, cf_data, tmp_path, capsys):
    from tracer.cli import main

    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    common = ["evaluate", "--model", str(model_dir), "--device", "cpu", "--method", "memit", "--dataset",
              "counterfact", "--data", str(cf_data), "--layers", "1-2", "--stats", "identity", "--no-generation",
              "--hparam", "v_steps=5", "--hparam", "chunk_requests=2", "--hparam", "context_templates_per_start=0",
              "--hparam", "mom2_weight=1.0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    finally:
        torch.set_num_threads(threads)
    # joins this process's cluster (2 CPUs left free by the module's pool): two more workers
    assert main([*common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    assert "| memit (batch 4) | 4 |" in capsys.readouterr().out
    assert_same_json(case_files(tmp_path / "plain"), case_files(tmp_path / "ray"))
    assert len(list((tmp_path / "ray" / "z").glob("z-*.safetensors"))) == 2
    assert main([*common, "--out", str(tmp_path / "more"), "--workers", "2"]) == 2  # --workers needs --ray
    assert "add --ray" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_evaluate_with_ray_equals_without(shared_data, tmp_path):
    """`factscope evaluate --method rome --dataset counterfact --limit 2 --ray --workers 2` writes the
    case files of the same command without --ray (but for their timings)."""
    from tracer.cli import main

    common = ["evaluate", "--method", "rome", "--dataset", "counterfact", "--limit", "2"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    files = case_files(tmp_path / "plain")
    assert len(files) == 2 and all(f["post"]["generation"]["texts"] for f in files.values())
    assert_same_json(files, case_files(tmp_path / "ray"))
