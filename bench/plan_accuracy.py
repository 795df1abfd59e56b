"""The planner's estimates against what the jobs really take: peak resident memory and time.

    python bench/plan_accuracy.py                     # trace, ROME edit, 50-edit MEMIT; embedded model, CPU
    python bench/plan_accuracy.py --jobs trace --model DIR --no-result

For each job, ``factscope plan --json`` runs in a fresh process (as a user would run it before the
job), then the job runs in another; the job's peak resident set comes from ``os.wait4`` (the
kernel's ``ru_maxrss`` of that child alone) and its time from the wall clock and its CPU seconds.
Every child gets ``--threads`` torch threads. Writes ``bench/results/plan_accuracy.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import add_result_arguments, save_result  # noqa: E402

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
EDIT = ["--prompt", "{} is located in the city of", "--subject", SUBJECT, "--target", " Rome"]


def jobs(edits: int) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (``factscope plan`` arguments, the job's command after ``python``)."""
    cli = ["-m", "tracer.cli"]
    return {
        "trace": (["--job", "trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "10"],
                  cli + ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "10", "--no-progress"]),
        "rome": (["--job", "edit", *EDIT], cli + ["edit", *EDIT]),
        f"memit_{edits}": (["--job", "memit", "--edits", str(edits)], [str(Path(__file__).resolve()), "--child-memit", str(edits)]),
    }


def child_memit(model: str, device: str, edits: int) -> None:
    """One MEMIT batch of the first ``edits`` CounterFact records (what ``--job memit`` plans)."""
    from tracer.edit import compute_memit
    from tracer.evaluate import load_cases
    from tracer.models import load_model

    lm = load_model(model, device=device)
    record = compute_memit(lm, load_cases("counterfact", limit=edits), progress=False)
    print(f"MEMIT batch of {len(record.requests)} edits", flush=True)


def run_measured(argv: list[str], env: dict) -> dict:
    """Run ``python argv`` and return its wall seconds, CPU seconds and peak resident bytes."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{err[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_bytes": usage.ru_maxrss * 1024,
            "stdout": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--edits", type=int, default=50)
    ap.add_argument("--jobs", default=None, help="comma list of trace, rome, memit_N (default all)")
    ap.add_argument("--child-memit", type=int, default=None, help=argparse.SUPPRESS)
    add_result_arguments(ap, "plan_accuracy")
    args = ap.parse_args()
    model = ["--model", args.model, "--device", args.device]
    if args.child_memit is not None:
        import torch

        torch.set_num_threads(args.threads)
        child_memit(args.model, args.device, args.child_memit)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    table = jobs(args.edits)
    chosen = args.jobs.split(",") if args.jobs else list(table)
    figures = {"model": args.model, "device": args.device, "jobs": {}}
    for name in chosen:
        plan_args, job = table[name]
        extra = model + (["--threads", str(args.threads)] if "--child-memit" in job else [])
        planned = json.loads(run_measured(["-m", "tracer.cli", "plan", *plan_args, *model, "--json"], env)["stdout"])
        measured = run_measured(job + extra, env)
        error = planned["peak_bytes"] / measured["peak_bytes"] - 1
        figures["jobs"][name] = {
            "planned_peak_bytes": planned["peak_bytes"], "measured_peak_bytes": measured["peak_bytes"],
            "peak_error": error, "planned_seconds": planned["seconds"], "measured_wall_s": measured["wall_s"],
            "measured_cpu_s": measured["cpu_s"], "runtime_bytes": planned["runtime_bytes"],
            "weights_bytes": sum(planned["weights"].values()), "largest_phase": planned["largest_phase"],
            "phases": {p["name"]: p["bytes"] for p in planned["phases"]}, "settings": planned["settings"],
            "command": "python " + " ".join(job + extra)}
        print(f"{name:10s} planned {planned['peak_bytes'] / 2**20:7.0f} MiB  measured {measured['peak_bytes'] / 2**20:7.0f} MiB"
              f"  error {error:+.1%}   planned {planned['seconds']:7.1f} s  wall {measured['wall_s']:7.1f} s  "
              f"cpu {measured['cpu_s']:7.1f} s", flush=True)
    figures["load_average"] = list(os.getloadavg())
    save_result(args, args.result_name, figures, threads=args.threads)


if __name__ == "__main__":
    main()
