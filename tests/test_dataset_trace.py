"""tracer.dataset_trace: resumable, atomic, failure-tolerant batch tracing (tiny random model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tracer.dataset_trace as dt
from tracer.aggregate import aggregate_all
from tracer.errors import DatasetError, FactscopeError, HyperParameterError
from tracer.files import host_id

FACTS = [
    {"known_id": 10, "subject": "The city", "prompt": "The city of London is"},
    {"known_id": 11, "subject": "Paris", "prompt": "Paris is the capital of"},
    {"known_id": 12, "subject": "missing", "prompt": "a prompt without the subject"},  # fails: subject absent
    {"known_id": 13, "subject": "the river", "prompt": "He swam in the river"},
    {"known_id": 14, "subject": "music", "prompt": "The music was"},
]
SETTINGS = dict(kinds=("hidden",), samples=2, noise=0.5, progress=False)


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_model

    return make_tiny_model("gpt2", n_layers=3)


def temp_of(path: Path, pid: int, host: str | None = None) -> Path:
    """The temporary file a writer with ``pid`` on ``host`` (default: this machine) uses for ``path``."""
    return path.with_name(f".{path.name}~{host or host_id()}~{pid}~0123abcd.tmp")


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run except the timing log, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "log.jsonl"}


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    summary = dt.trace_dataset(tiny, FACTS, out, **SETTINGS)
    return out, summary


def test_uninterrupted_run_writes_one_file_per_fact(uninterrupted):
    out, summary = uninterrupted
    assert (summary.selected, summary.traced, summary.failed, summary.already_done) == (5, 4, 1, 0)
    assert sorted(p.name for p in (out / "facts").iterdir()) == ["10.json", "11.json", "13.json", "14.json"]
    failure = json.loads((out / "failed" / "12.json").read_text())
    assert failure["index"] == 2 and failure["error"].startswith("SubjectNotFoundError")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["status"] for r in log] == ["ok", "ok", "failed", "ok", "ok"]
    grouped = dt.load_traces(out)
    assert list(grouped) == ["hidden"] and len(grouped["hidden"]) == 4
    assert [t.prompt for t in grouped["hidden"]] == [FACTS[i]["prompt"] for i in (0, 1, 3, 4)]
    first = grouped["hidden"][0]
    assert first.scores.shape == (len(first.tokens), 3) and first.subject_span == (0, 3)
    assert ((first.scores >= 0) & (first.scores <= 1)).all() and 0 < first.high_score <= 1
    avg = aggregate_all(grouped, n_boot=20)["hidden"]
    assert avg.n_facts == 4 and avg.cells[avg.buckets.index("last")] == 4


def test_killed_run_resumes_to_identical_files(tiny, uninterrupted, tmp_path, monkeypatch):
    whole, _ = uninterrupted
    out = tmp_path / "resumed"
    real = dt._trace_fact
    calls = []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C / a kill does between two writes
        return real(*args, **kwargs)

    monkeypatch.setattr(dt, "_trace_fact", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        dt.trace_dataset(tiny, FACTS, out, **SETTINGS)
    monkeypatch.setattr(dt, "_trace_fact", real)
    assert sorted(p.name for p in (out / "facts").iterdir()) == ["10.json", "11.json"]
    # a kill during a write leaves only the temporary file, never half of a fact file
    temp_of(out / "facts" / "13.json", 4194305).write_text('{"half": ')  # a pid above Linux's pid_max: dead
    summary = dt.trace_dataset(tiny, FACTS, out, **SETTINGS)
    assert (summary.already_done, summary.traced, summary.failed) == (2, 2, 1)
    assert snapshot(out) == snapshot(whole)
    # a third start finds nothing to do
    again = dt.trace_dataset(tiny, FACTS, out, **SETTINGS)
    assert (again.already_done, again.traced, again.failed) == (5, 0, 0)


def test_limit_then_extend(tiny, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "limited"
    first = dt.trace_dataset(tiny, FACTS, out, limit=2, **SETTINGS)
    assert (first.selected, first.traced) == (2, 2)
    rest = dt.trace_dataset(tiny, FACTS, out, **SETTINGS)
    assert (rest.already_done, rest.traced, rest.failed) == (2, 2, 1)
    assert snapshot(out) == snapshot(whole)


def test_retry_failed_and_changed_settings(tiny, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "copy"
    dt.trace_dataset(tiny, FACTS[2:3], out, **SETTINGS)
    assert (out / "failed" / "12.json").is_file()
    assert dt.trace_dataset(tiny, FACTS[2:3], out, **SETTINGS).already_done == 1
    retried = dt.trace_dataset(tiny, FACTS[2:3], out, retry_failed=True, **SETTINGS)
    assert (retried.already_done, retried.failed) == (0, 1)
    with pytest.raises(DatasetError, match="different settings.*samples"):
        dt.trace_dataset(tiny, FACTS[2:3], out, **{**SETTINGS, "samples": 3})
    with pytest.raises(HyperParameterError, match="unknown kind"):
        dt.trace_dataset(tiny, FACTS, tmp_path / "x", kinds=("mlps",), progress=False)
    with pytest.raises(HyperParameterError, match="severed"):
        dt.trace_dataset(tiny, FACTS, tmp_path / "x", severed=("hidden",), progress=False)
    with pytest.raises(DatasetError, match="no run.json"):
        dt.load_traces(tmp_path / "nowhere")


def test_fact_file_names():
    assert dt.fact_file_name(17) == "17"
    assert dt.fact_file_name("a/b") != dt.fact_file_name("a_b") and "/" not in dt.fact_file_name("a/b")


def test_cli_end_to_end(tiny, tmp_path, capsys):
    from widgets.cli import main  # --html is the UI layer's option

    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    out = tmp_path / "run"
    code = main(["trace-dataset", "--model", str(model_dir), "--facts", str(facts), "--kind", "hidden",
                 "--severed", "mlp", "--limit", "2", "--samples", "2", "--noise", "0.5", "--out", str(out),
                 "--n-boot", "20", "--html", str(tmp_path / "avg.html"), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0 and "2 traced, 0 failed" in text and "hidden-severed-mlp" in text
    averages = json.loads((out / "averages.json").read_text())
    assert set(averages) == {"hidden", "hidden-severed-mlp"} and averages["hidden"]["n_facts"] == 2
    assert np.isfinite(averages["hidden"]["indirect"][2]).all()
    assert "Average causal effects" in (tmp_path / "avg.html").read_text()
    assert main(["trace-dataset", "--facts", str(tmp_path / "none.json"), "--out", str(out),
                 "--model", str(model_dir), "--device", "cpu"]) == 2
    # `factscope averages` re-reads the finished facts (here: of a finished run) with the same numbers
    code = main(["averages", str(out), "--n-boot", "20", "--json", str(tmp_path / "again.json"), "--markdown", "last_subject"])
    text = capsys.readouterr().out
    again = json.loads((tmp_path / "again.json").read_text())
    assert code == 0 and again["hidden"]["indirect"] == averages["hidden"]["indirect"]
    row = next(line for line in text.splitlines() if line.startswith("| hidden |"))
    peak = int(np.nanargmax(averages["hidden"]["indirect"][2]))
    assert row.split(" | ")[1 + peak].startswith("**") and row.endswith(f"| {peak} | 2 |")
    assert main(["averages", str(tmp_path)]) == 2  # not a trace-dataset directory
    assert "no facts/ folder" in capsys.readouterr().err
    assert main(["averages", str(out), "--n-boot", "0"]) == 2
    assert "--n-boot must be a whole number in [1, 100000], got 0" in capsys.readouterr().err
    assert main(["trace-dataset", "--facts", str(facts), "--out", str(out), "--workers", "2"]) == 2  # before loading
    assert "add --ray" in capsys.readouterr().err
    assert main(["trace-dataset", "--facts", str(facts), "--out", str(out), "--ray", "--workers", "0"]) == 2
    assert "--workers must be a whole number in [1, 4096], got 0" in capsys.readouterr().err
    # argparse names the accepted values in one line (exit 2, no traceback)
    with pytest.raises(SystemExit) as exit_:
        main(["trace-dataset", "--facts", str(facts), "--out", str(out), "--severed-tokens", "first"])
    assert exit_.value.code == 2 and "choose from 'last_subject', 'all'" in capsys.readouterr().err
    # the averages line says a severed trace was not traced at the last token instead of failing
    main(["averages", str(out), "--n-boot", "20"])
    assert "at last token: not traced" in capsys.readouterr().out


def test_sigkilled_process_resumes_to_identical_files(tiny, tmp_path):
    """A real ``kill -9`` of the CLI mid-run, then a restart: same files as an uninterrupted CLI run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    facts = [{"known_id": i, "subject": s, "prompt": f"{s} was seen near the river"}
             for i, s in enumerate(["The city", "Paris", "music", "the house", "A dog", "Rome", "the sea", "He"])]
    (tmp_path / "facts.json").write_text(json.dumps(facts))

    def cli(out: Path) -> subprocess.Popen:
        code = ("import sys, torch; torch.set_num_threads(1); from tracer.cli import main; "
                "sys.exit(main(sys.argv[1:]))")
        return subprocess.Popen(
            [sys.executable, "-c", code, "trace-dataset", "--model", str(model_dir), "--facts",
             str(tmp_path / "facts.json"), "--kind", "hidden", "--samples", "2", "--noise", "0.5", "--out", str(out),
             "--n-boot", "0", "--device", "cpu"],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"})

    whole = tmp_path / "whole"
    assert cli(whole).wait(timeout=600) == 0
    killed = tmp_path / "killed"
    proc = cli(killed)
    deadline = time.monotonic() + 600
    while not any((killed / "facts").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "facts").glob("*.json")))
    assert proc.returncode == -signal.SIGKILL and 1 <= done < len(facts), "the kill must land mid-run"
    assert cli(killed).wait(timeout=600) == 0
    assert snapshot(killed) == snapshot(whole)


def test_severed_traces_at_the_last_subject_token_and_older_runs(tiny, tmp_path):
    out = tmp_path / "sev"
    dt.trace_dataset(tiny, FACTS[:2], out, severed=("mlp",), **SETTINGS)
    grouped = dt.load_traces(out)
    for plain, sev in zip(grouped["hidden"], grouped["hidden-severed-mlp"]):
        e = plain.subject_span[1]
        assert sev.traced_tokens == [e - 1] and sev.severed == "mlp"
    avg = aggregate_all(grouped, n_boot=10)["hidden-severed-mlp"]
    assert avg.cells.tolist() == [0, 0, 2, 0, 0, 0] and avg.total_effect == pytest.approx(
        aggregate_all(grouped, n_boot=10)["hidden"].total_effect)
    # a run.json written before severed_tokens existed traced every token: resuming it with the
    # new default is refused by name; asking for "all" resumes it
    run = json.loads((out / "run.json").read_text())
    del run["severed_tokens"]
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(DatasetError, match="severed_tokens"):
        dt.trace_dataset(tiny, FACTS[:2], out, severed=("mlp",), **SETTINGS)
    assert dt.trace_dataset(tiny, FACTS[:2], out, severed=("mlp",), severed_tokens="all", **SETTINGS).already_done == 2
    with pytest.raises(HyperParameterError, match="severed_tokens must be"):
        dt.trace_dataset(tiny, FACTS[:2], out, severed=("mlp",), severed_tokens="first", **SETTINGS)


BAD_SETTINGS = [
    (dict(samples=0), "samples must be"), (dict(samples=2.5), "samples must be"), (dict(window=0), "window must be"),
    (dict(seed=-1), "seed must be"), (dict(seed=2**32), "seed must be"), (dict(noise="loud"), "noise 'loud'"),
    (dict(noise=-1.0), "noise scale"), (dict(noise=float("nan")), "noise scale"), (dict(noise_mode="numpy"), "noise mode"),
    (dict(kinds=("mlps",)), "unknown kind"), (dict(kinds=(), severed=()), "nothing to trace"),
    (dict(severed=("hidden",)), "severed"), (dict(severed_tokens="first"), "severed_tokens"), (dict(limit=0), "limit"),
    (dict(retry_failed="yes"), "retry_failed"),
]


@pytest.mark.parametrize("bad, message", BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_settings_are_refused_before_anything_is_created(tiny, tmp_path, bad, message):
    out = tmp_path / "new"
    with pytest.raises(FactscopeError, match=message):
        dt.trace_dataset(tiny, FACTS, out, **{**SETTINGS, **bad})
    assert not out.exists()


def test_missing_facts_file_and_file_as_out_dir(tiny, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        dt.trace_dataset(tiny, tmp_path / "missing.json", tmp_path / "new", **SETTINGS)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        dt.trace_dataset(tiny, FACTS, tmp_path / "file", **SETTINGS)


def test_run_json_created_first_by_another_process_wins(tiny, tmp_path, monkeypatch):
    """Another start creates run.json after this one looked and before it writes: this one is refused
    (different settings) or joins (same settings); neither overwrites the other's run.json."""
    other = {**SETTINGS, "samples": 3}
    real, raced = dt.write_json_atomic, []

    def other_process_first(path, obj, **kwargs):
        if Path(path).name == "run.json" and not raced:
            raced.append(path)
            dt.trace_dataset(tiny, FACTS[:2], Path(path).parent, limit=1, **other)  # the other start, all of it
        return real(path, obj, **kwargs)

    monkeypatch.setattr(dt, "write_json_atomic", other_process_first)
    out = tmp_path / "raced"
    with pytest.raises(DatasetError, match=r"different settings \(samples\)"):
        dt.trace_dataset(tiny, FACTS[:2], out, **SETTINGS)
    assert dt.read_settings(out).samples == 3 and len(list((out / "facts").iterdir())) == 1
    raced.clear()
    joined = dt.trace_dataset(tiny, FACTS[:2], tmp_path / "joined", **other)  # same settings: joins the run
    assert raced and (joined.already_done, joined.traced) == (1, 1)


def test_two_cli_starts_with_different_settings_do_not_mix(tiny, tmp_path):
    """Two real processes started together on one new --out: one runs, the other is refused in one line."""
    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    (tmp_path / "facts.json").write_text(json.dumps(FACTS[:2]))
    out = tmp_path / "shared"
    code = "import sys, torch; torch.set_num_threads(1); from tracer.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, "trace-dataset", "--model", str(model_dir), "--facts",
                               str(tmp_path / "facts.json"), "--kind", "hidden", "--samples", str(samples), "--noise",
                               "0.5", "--out", str(out), "--n-boot", "0", "--device", "cpu"],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for samples in (2, 3)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = [2, 3][[code for code, _ in results].index(0)]
    err = next(err for code, err in results if code == 2)
    assert "Traceback" not in err and "different settings (samples)" in err.strip().splitlines()[-1]
    assert dt.read_settings(out).samples == winner
    assert {t.samples for t in dt.load_traces(out)["hidden"]} == {winner}


@pytest.mark.parametrize("text", ["[]", "{}", '{"kinds": 3}', "not json", "\udcff"])
def test_malformed_run_json_is_a_one_line_error(tiny, tmp_path, text):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(text, errors="surrogateescape")
    with pytest.raises(DatasetError, match="run.json is unreadable") as e:
        dt.trace_dataset(tiny, FACTS, out, **SETTINGS)
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="run.json is unreadable"):
        dt.load_traces(out)
