"""tracer.plan: a job's memory per device and time from the model's config alone, and the refusals
every heavy command takes from it before the weights load.

The planner builds the model on the meta device, so a model folder without its weights file plans
like the full one; its shapes equal the loaded model's, its trace phase is the engine's own
estimate, and a planned trace of a tiny model lands within 30 % of the peak resident memory the
trace really reaches (the embedded model's jobs: bench/plan_accuracy.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import FAMILIES, make_tiny_model

from tracer.errors import HyperParameterError, JobTooLargeError, ModelNotFoundError
from tracer.limits import ModelShape
from tracer.models import load_model, model_skeleton
from tracer.plan import Plan, check_plan, plan
from tracer.trace import estimate_trace

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.fixture(scope="module")
def config_only(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 folder without its weights: config and tokenizer only."""
    folder = tmp_path_factory.mktemp("config-only")
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, folder / f.name)
    return folder


def test_skeleton_has_the_loaded_models_shapes_and_no_weights(tiny_model_dir, config_only):
    skeleton = model_skeleton(str(config_only))
    assert {p.device.type for p in skeleton.model.parameters()} == {"meta"}
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert ModelShape.of(skeleton) == ModelShape.of(loaded)
    assert ModelShape.of(skeleton).weight_bytes == sum(p.numel() * 4 for p in loaded.model.parameters())
    with pytest.raises(ModelNotFoundError):
        load_model(str(config_only), device="cpu")  # what a planner must not need


@pytest.mark.parametrize("family", FAMILIES)
def test_skeleton_matches_every_family(family, tmp_path):
    lm = make_tiny_model(family)
    lm.model.config.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    assert ModelShape.of(model_skeleton(str(tmp_path))) == ModelShape.of(lm)
    bf16 = ModelShape.of(model_skeleton(str(tmp_path), "bfloat16"))
    assert bf16.itemsize == 2 and bf16.weight_bytes * 2 == ModelShape.of(lm).weight_bytes


def test_trace_plan_is_the_engines_estimate_plus_runtime_and_weights(tiny_model_dir, config_only):
    p = plan("trace", str(config_only), device="cpu", prompt=PROMPT, subject=SUBJECT, samples=10, measure=False)
    engine = estimate_trace(load_model(str(tiny_model_dir), device="cpu"), PROMPT, SUBJECT, ("hidden",), samples=10)
    assert p.phases == (engine,)  # one set of estimates: the planner's trace is the engine's
    assert p.per_device == {"cpu": p.runtime_bytes + p.weights["cpu"] + engine.bytes}
    assert p.peak_bytes == sum(p.per_device.values()) and p.seconds is None
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    timed = plan("trace", str(config_only), device="cpu", prompt=PROMPT, subject=SUBJECT, samples=10)
    assert timed.flops_per_second > 1e6 and timed.seconds == timed.flops / timed.flops_per_second > 0


def test_memory_grows_with_the_jobs_sizes(config_only):
    def peak(job, **sizes):
        return plan(job, str(config_only), device="cpu", measure=False, **sizes)

    few, many = peak("trace", prompt=PROMPT, subject=SUBJECT, samples=10), peak("trace", prompt=PROMPT, subject=SUBJECT, samples=5000)
    assert many.largest.bytes > 100 * few.largest.bytes / 2
    one, fifty = peak("memit", edits=1, chunk_requests=1), peak("memit", edits=50, chunk_requests=50)
    assert fifty.settings["chunk_requests"] == 50 and fifty.largest.bytes > 10 * one.largest.bytes
    edit = peak("edit")
    assert [e.what for e in edit.phases][1:] == ["v* optimisation", "rank-one update", "checks and generations"]
    assert edit.settings["rows"] == 22  # "{}", 20 generated templates and the KL prompt
    for job in ("evaluate", "stats", "trace-dataset"):
        assert peak(job).peak_bytes > peak(job).runtime_bytes
    for method in ("rome", "memit"):  # --ray --workers 2: each worker holds its model, runtime and largest phase
        one, two = peak("evaluate", method=method, edits=4), peak("evaluate", method=method, edits=4, workers=2)
        per = dict(two.largest.parts)["one worker"]
        assert two.largest.bytes == 2 * per and per > one.largest.bytes + one.weights["cpu"]
        assert two.largest.what == f"2 workers' {one.largest.what}"
        assert two.settings["workers"] == 2 and two.peak_bytes > one.peak_bytes
    with pytest.raises(HyperParameterError, match="job must be one of"):
        peak("train")


def test_placement_splits_the_weights(config_only):
    whole = plan("trace", str(config_only), device="cpu", prompt=PROMPT, subject=SUBJECT, measure=False)
    split = plan("trace", str(config_only), device_map="auto", max_memory="cpu=200kB", prompt=PROMPT, subject=SUBJECT,
                 measure=False)
    assert 0 < split.weights["cpu"] < whole.weights["cpu"]  # the rest offloaded to disk, read one layer at a time


def test_check_plan_refuses_in_one_line_with_estimate_and_limit(config_only):
    p = plan("trace", str(config_only), device="cpu", prompt=PROMPT, subject=SUBJECT, samples=5000, measure=False)
    need = p.per_device["cpu"] - p.runtime_bytes
    check_plan(p, available={"cpu": need})
    with pytest.raises(JobTooLargeError, match=r"^this trace needs about [\d.]+ MB of cpu memory \(largest part: .*\) "
                                               r"but 1.0 MB is available; lower samples \(5000\)"):
        check_plan(p, available={"cpu": 1_000_000})


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_plan_json(config_only):
    proc = _cli("plan", "--model", str(config_only), "--device", "cpu", "--job", "trace", "--prompt", PROMPT,
                "--subject", SUBJECT, "--samples", "10", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["peak_bytes"] == sum(out["per_device"].values()) and set(out["per_device"]) == {"cpu"}
    assert out["seconds"] > 0 and out["fits"] and out["job"] == "trace" and out["settings"]["samples"] == 10


@pytest.mark.parametrize("command", [
    ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "5000", "--noise", "0.5"],
    ["edit", "--prompt", "{} is located in the city of", "--subject", SUBJECT, "--target", " Rome", "--no-stats"],
    ["evaluate", "--method", "memit", "--dataset", "counterfact", "--limit", "50", "--out", "{tmp}/eval"],
])
def test_heavy_commands_refuse_before_the_weights_load(config_only, tmp_path, command):
    """The folder has no weights: the one line comes from the planner, never from a load."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    proc = _cli(*args, "--model", str(config_only), "--device", "cpu", env={"FACTSCOPE_MEMORY_LIMIT": "2MB"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"factscope {args[0]}: error:")]
    assert len(errors) == 1 and re.search(rf"this {args[0]} needs about [\d.]+ [kMG]B of cpu memory .* but 2.0 MB is "
                                          "available", errors[0]), proc.stderr[-2000:]
    assert not (tmp_path / "eval").exists()


#: runs the CLI and prints the process's own peak resident set (VmHWM) last: ``ru_maxrss`` from
#: ``wait4`` would report the test process's peak instead, since a vfork-started child keeps it across exec
_PEAK_CHILD = ("import sys\nfrom tracer.cli import main\nrc = main(sys.argv[1:])\n"
               "line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
               "print(int(line.split()[1]) * 1024)\nsys.exit(rc)")


def _planned_and_measured_trace(model: str) -> tuple[int, int]:
    """``factscope plan --json``'s peak and the peak resident set of ``factscope trace`` (own process each)."""
    args = ["--model", model, "--device", "cpu", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "10"]
    planned = json.loads(_cli("plan", "--job", "trace", "--json", "--no-time", *args).stdout)["peak_bytes"]
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, "trace", "--no-progress", *args], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return planned, int(proc.stdout.split()[-1])


def test_planned_trace_within_30_percent_of_the_measured_peak(tiny_model_dir):
    planned, measured = _planned_and_measured_trace(str(tiny_model_dir))
    assert abs(planned - measured) <= 0.3 * measured, (planned, measured)


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_trace_plan_within_30_percent_of_the_measured_peak():
    """The issue's check: the embedded model's default trace (bench/plan_accuracy.py: +12 %)."""
    planned, measured = _planned_and_measured_trace("smollm2-135m")
    assert abs(planned - measured) <= 0.3 * measured, (planned, measured)
