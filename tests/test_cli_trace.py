"""``factscope trace``: output, --json, and one-line errors with a non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from float32 import prob_tol

from tracer.cli import main
from tracer.models import load_model
from tracer.trace import trace_all


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def test_trace_all_writes_three_results(tiny_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    args = ["trace", "--model", str(tiny_dir), "--prompt", "The Eiffel Tower is located in", "--subject", "Eiffel Tower",
            "--kind", "all", "--samples", "3", "--noise", "0.5", "--window", "2", "--device", "cpu", "--no-progress",
            "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "high score (clean)" in printed and "strongest restorations" in printed
    payload = json.loads(out.read_text())
    assert [d["kind"] for d in payload] == ["hidden", "mlp", "attn"]
    # the CLI's numbers are the library's numbers
    lm = load_model(str(tiny_dir), device="cpu")
    direct = trace_all(lm, "The Eiffel Tower is located in", "Eiffel Tower", samples=3, noise=0.5, window=2, progress=False)
    for d in payload:
        # the same computation in the same process, and JSON round-trips doubles: the same bits
        np.testing.assert_array_equal(np.array(d["scores"]), direct[d["kind"]].scores)
        assert d["subject_span"] == list(direct[d["kind"]].subject_span) and d["answer"] == direct[d["kind"]].answer


def test_naive_flag_gives_same_numbers(tiny_dir, tmp_path):
    common = ["trace", "--model", str(tiny_dir), "--prompt", "The Eiffel Tower is in", "--subject", "Eiffel",
              "--samples", "2", "--noise", "0.5", "--device", "cpu", "--no-progress"]
    assert main(common + ["--json", str(tmp_path / "a.json")]) == 0
    assert main(common + ["--naive", "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    # float32 sums in other orders (batch shapes, key/value cache): the bound of tests/float32.py
    np.testing.assert_allclose(a["scores"], b["scores"], atol=prob_tol(load_model(str(tiny_dir), device="cpu"),
                                                                        len(a["tokens"])), rtol=0)
    assert a["n_forward"] < b["n_forward"]


@pytest.mark.parametrize("extra,message", [
    (["--subject", "Louvre"], "does not occur in prompt"),
    (["--subject", "Eiffel", "--samples", "0"], "samples must be"),
    (["--subject", "Eiffel", "--noise", "loud"], "noise 'loud' is not understood"),
    (["--subject", "Eiffel", "--json", "/no/such/dir/t.json"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(tiny_dir, extra, message):
    cmd = [sys.executable, "-m", "tracer.cli", "trace", "--model", str(tiny_dir), "--device", "cpu",
           "--prompt", "The Eiffel Tower is in", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("factscope trace: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in proc.stderr
