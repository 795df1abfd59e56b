"""bench/gpu_suite.sh, run as a GPU machine would, with tiny models on the CPU: every job runs in its
own process, the planner's figure stands beside each measured peak, and the batched and naive traces
agree (the suite's own check that it measured the same work)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_runs_at_tiny_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--tiny", "--device", "cpu", "--threads", "1",
                           "--no-result", "--json", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["jobs"]) == {"trace_batched", "trace_naive", "rome", "memit"}
    for name, job in figures["jobs"].items():
        assert "error" not in job, (name, job)
        assert job["planned_device_bytes"] == job["planned"]["per_device"]["cpu"] > 0 and job["peak_bytes"] > 0
        assert abs(job["peak_error"]) < 0.3, (name, job["planned_device_bytes"], job["peak_bytes"])
    assert figures["jobs"]["memit"]["edits"] == 20
    assert figures["jobs"]["trace_naive"]["forwards"] > figures["jobs"]["trace_batched"]["forwards"]
    assert figures["trace_max_abs_score_difference"] < 1e-5
