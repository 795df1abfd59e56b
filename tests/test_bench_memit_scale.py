"""bench/memit_scale.py: bad flags fail at once with one line (before the model loads)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memit_scale.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--rome-ledger", "x.st"], "--rome-ledger needs --rome N"),
    (["--rome", "5", "--rome-ledger", "no/such/dir/x.st"], "directory 'no/such/dir' does not exist"),
    (["--sizes", "10,abc"], "--sizes takes comma-separated edit counts"),
    (["--rome", "-1"], "must be >= 0"),
    (["--rome", "5", "--rome-every", "-2"], "--rome-every, --sequential and --eval must be >= 0"),
])
def test_bad_flags_give_one_line_errors(args, message):
    out = _run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    bad = tmp_path / "ledger.st"
    bad.write_bytes(b"not a ledger")
    out = _run("--sizes", "0", "--rome", "5", "--rome-ledger", str(bad))
    assert out.returncode == 2
    assert "--rome-ledger:" in out.stderr and "Traceback" not in out.stderr
